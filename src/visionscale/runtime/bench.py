"""Deprecated: moved to :mod:`visionscale.deploy.bench` (benchmarking across tasks knows every domain,
so it lives above them; the runtime core imports none). Kept importable for one release."""

from __future__ import annotations

from visionscale._deprecated import moved

__getattr__ = moved(__name__, {"*": "visionscale.deploy.bench"})

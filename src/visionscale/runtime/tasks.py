"""Deprecated: moved to :mod:`visionscale.deploy.tasks` (benchmarking across tasks knows every domain,
so it lives above them; the runtime core imports none). Kept importable for one release."""

from __future__ import annotations

import warnings


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn(f"visionscale.runtime.tasks.{name} moved to visionscale.deploy.tasks.{name}", DeprecationWarning,
                  stacklevel=2)
    from visionscale.deploy import tasks as _moved  # the one upward import: this shim forwards, nothing else

    return getattr(_moved, name)

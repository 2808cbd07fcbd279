"""Old name of :mod:`visionscale.study` (the resolution study, the project's main job).

Renamed so the layout shows where the main job lives. ``visionscale.profiling`` and its
submodules (``visionscale.profiling.sweep`` ...) keep working for one release, with a
``DeprecationWarning``; they are the very same module objects as ``visionscale.study.*``.
"""

from __future__ import annotations

import importlib
import sys
import warnings

warnings.warn("visionscale.profiling was renamed visionscale.study; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)

_SUBMODULES = ("fit", "gpus", "memory", "report", "sweep", "timing")
for _name in _SUBMODULES:
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"visionscale.study.{_name}")

from visionscale.study import *  # noqa: E402,F401,F403
from visionscale.study import __all__  # noqa: E402,F401

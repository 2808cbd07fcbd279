"""Imported first by the bundle scripts that run where torch must not be importable.

Importing it makes ``import torch`` raise ImportError (before visionscale is imported);
:func:`loaded` lists the torch / onnx modules loaded since, for the script's report.
"""

import importlib
import sys

sys.modules["torch"] = None  # `import torch` now raises ImportError
try:
    importlib.import_module("torch")
except ImportError:
    pass
else:
    raise SystemExit("torch should not be importable here")


def loaded() -> list[str]:
    return sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "onnx"))

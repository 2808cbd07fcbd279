"""One device resolver for every command and API: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` picks the first CUDA GPU when PyTorch sees one, else the CPU. Anything else that is
not a CPU or an existing CUDA device raises :class:`DeviceError` naming what was asked for and
what this machine has, so a typo or a CPU-only build never surfaces as a traceback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from visionscale.errors import DeviceError

if TYPE_CHECKING:
    import torch

# torch is imported where a device is resolved, not here: the CLI's options read DEVICE_HELP, and
# `visionscale serve BUNDLE` runs on machines without torch.

__all__ = ["DeviceError", "resolve_device", "DEVICE_HELP"]

DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def _have() -> str:
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA GPU is available (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'})")
    n = torch.cuda.device_count()
    return f"this machine has {n} CUDA GPU{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1})"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``device`` into a :class:`torch.device` this machine has, or raise :class:`DeviceError`."""
    import torch

    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        kind, index = device.type, device.index
    else:
        spec = str(device).strip().lower()
        m = _SPEC.match(spec)
        if m is None or (m.group(1) in ("auto",) and m.group(2) is not None):
            raise DeviceError(f"device {str(device)!r} is not one of {DEVICE_HELP}")
        kind, index = m.group(1), None if m.group(2) is None else int(m.group(2))
        if kind == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cpu" and index not in (None, 0):
            raise DeviceError(f"device {str(device)!r}: the CPU has no index; use 'cpu'")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise DeviceError(f"device {str(device)!r} is not one of {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} was asked for but {_have()}; use 'cpu' or 'auto'")
    if index is not None and index >= torch.cuda.device_count():
        raise DeviceError(f"device {str(device)!r} was asked for but {_have()}")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")

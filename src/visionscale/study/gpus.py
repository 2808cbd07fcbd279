"""A catalogue of GPUs (usable memory as the driver reports it) and camera sensor sizes.

Memory figures are the totals ``nvidia-smi`` shows for each card, in MiB; the CUDA
context (a few hundred MiB, not counted by PyTorch's allocator) is added to every
prediction separately (``cuda_context_bytes``). Users add their own cards with
``--gpu "NAME=SIZE"`` (``24GiB``, ``16000MiB``, ``80GB``) or :func:`parse_gpu`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from visionscale.errors import InvalidValueError

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    vram_bytes: int


GPUS: tuple[GPU, ...] = (
    GPU("T4 16GB", 15360 * MiB),
    GPU("L4 24GB", 23034 * MiB),
    GPU("RTX 3090 24GB", 24576 * MiB),
    GPU("RTX 4090 24GB", 24564 * MiB),
    GPU("A100 40GB", 40960 * MiB),
    GPU("A100 80GB", 81920 * MiB),
    GPU("H100 80GB", 81559 * MiB),
    GPU("H200 141GB", 143771 * MiB),
)

# Default allowance for the CUDA context and cuDNN/cuBLAS workspaces, which the caching
# allocator's statistics do not include.
CUDA_CONTEXT_BYTES = 512 * MiB

# Camera sensors as square images (seed 000 assumes 1:1, as most AD models expect).
SENSORS_MP: tuple[float, ...] = (2.0, 5.0, 12.0, 20.0)

# The sensors the study's tile plans are given for: the sizes that need tiles on most cards.
TILE_SENSORS_MP: tuple[float, ...] = (5.0, 12.0, 20.0)


def sensor_side(megapixels: float) -> int:
    """Side length in px of a square image with ``megapixels`` million pixels."""
    return int(round(math.sqrt(megapixels * 1e6)))


_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "kib": 1024, "mib": MiB, "gib": GiB,
          "tib": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"16000 MiB"``, ``"80GB"``, ``"1TiB"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)\s*", text.lower())
    if not m:
        raise InvalidValueError(f"cannot read memory size {text!r}; use e.g. 24GiB, 16000MiB or 80GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_gpu(spec: str) -> GPU:
    """``"My card=24GiB"`` -> GPU."""
    name, sep, size = spec.partition("=")
    if not sep or not name.strip():
        raise InvalidValueError(f"GPU must be given as NAME=SIZE (e.g. 'RTX 6000 Ada=48GiB'), got {spec!r}")
    return GPU(name.strip(), parse_size(size))

"""Precision helpers: the one precision vocabulary, autocast contexts and what this machine supports.

:data:`PRECISIONS` is the only table of precision names in visionscale: the Runner, export,
bench and the resolution study (whose config field is still called ``dtype``) all read it
through :func:`parse_precision`, :func:`parse_precisions`, :func:`torch_dtype` and
:func:`bytes_per_element`.

The Runner's ``precision`` is *mixed* precision by autocast for the PyTorch backends
(``eager``, ``compile``): weights stay fp32 and each op runs in the precision autocast picks
for it (convolutions and matmuls in fp16/bf16, reductions and softmax in fp32). That is
what keeps FP16 inference near-lossless on a GPU. Exported graphs (ONNX, TensorRT) are
cast as a whole instead (``model.half()``), the way those runtimes expect them.
"""

from __future__ import annotations

from visionscale.errors import VisionscaleError

import contextlib
from collections.abc import Iterator, Sequence

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Other spellings people (and torch) use for the same three precisions.
ALIASES: dict[str, str] = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                           "bfloat16": "bf16"}


class PrecisionError(VisionscaleError, ValueError):
    """A precision that is unknown or cannot run on the chosen device/backend."""


def parse_precision(name: str, *, field: str = "precision") -> str:
    """The canonical name (``fp32``, ``fp16``, ``bf16``) of a precision or one of its aliases.

    ``field`` names the setting in the error message (the study calls it ``dtype``)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise PrecisionError(f"{field} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return key


def parse_precisions(names: str | Sequence[str], *, field: str = "precision") -> tuple[str, ...]:
    """A comma list (``"fp32,bf16"``) or sequence of precisions: canonical names, in order, no repeats."""
    items = names.split(",") if isinstance(names, str) else list(names)
    parsed = tuple(dict.fromkeys(parse_precision(p, field=field) for p in items if str(p).strip()))
    if not parsed:
        raise PrecisionError(f"{field} must be one of {', '.join(PRECISIONS)}, got {names!r}")
    return parsed


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name or alias (``"half"`` -> ``torch.float16``)."""
    return PRECISIONS[parse_precision(name)]


def bytes_per_element(name: str) -> int:
    """Bytes one value takes in this precision (4 for fp32, 2 for fp16 and bf16)."""
    return torch.empty((), dtype=torch_dtype(name)).element_size()


def cpu_capability() -> str:
    """PyTorch's CPU kernel level on this machine (``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - very old torch
        return "unknown"


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic (AVX512-BF16 or AMX); otherwise bf16 is emulated."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001
        return False


def check_precision(precision: str, device: torch.device) -> str | None:
    """Raise :class:`PrecisionError` when ``precision`` cannot run on ``device``; else a note or None.

    On CUDA, bf16 needs compute capability 8.0 (Ampere) or newer. On the CPU, both fp16 and
    bf16 run through autocast (torch >= 2.1 has CPU fp16 autocast), but without native
    instructions they are emulated and usually *slower* than fp32: the note says so, and
    ``visionscale bench`` measures it rather than assuming a speed-up.
    """
    precision = parse_precision(precision)
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise PrecisionError(f"bf16 needs a GPU with compute capability >= 8.0 (Ampere or newer); {name} has none")
        return None
    if device.type == "cpu":
        # Measured on a 2-core AVX2 EPYC with torch 2.13: EfficientAD-S's teacher (4x4 convolutions,
        # 256-384 channels) at 256 px took 118 s in bf16 and 126 s in fp16 autocast against 0.30 s in
        # fp32; small ResNets were 2-5x slower. Hence "far slower", not merely "slower".
        if precision == "bf16" and not cpu_has_native_bf16():
            return (f"bf16 on this CPU ({cpu_capability()}, no AVX512-BF16/AMX) is emulated: expect it slower than "
                    "fp32, for some convolutions hundreds of times slower")
        if precision == "fp16":
            return (f"fp16 on the CPU ({cpu_capability()}) runs through autocast with mostly emulated kernels: expect "
                    "it slower than fp32, for some convolutions hundreds of times slower")
        return None
    raise PrecisionError(f"precision {precision} is not supported on device {device}")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to ``precision`` on ``device`` (no-op for fp32)."""
    precision = parse_precision(precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=PRECISIONS[precision]):
        yield


def to_float32(out):
    """Cast every floating tensor in an output (tensor, tuple/list, dict) back to fp32."""
    from visionscale.runtime.outputs import tree_map

    return tree_map(lambda t: t.float() if t.is_floating_point() and t.dtype != torch.float32 else t, out)

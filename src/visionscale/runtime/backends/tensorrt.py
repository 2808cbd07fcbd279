"""TensorRT through torch-tensorrt (``ir="dynamo"``): needs a CUDA GPU and the torch_tensorrt package.

The model is compiled into TensorRT engines for a shape range (min/opt/max) with the
chosen precision enabled; layers TensorRT cannot take stay in PyTorch. Building engines
takes seconds to minutes and is timed apart (``build_seconds``). For TensorRT through
ONNX use the ``onnxruntime`` backend with ``providers=["tensorrt"]``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from visionscale.runtime.errors import BackendUnavailableError
from visionscale.runtime.outputs import OutputSpec
from visionscale.runtime.precision import PRECISIONS, to_float32


def import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "backend 'tensorrt' needs the torch_tensorrt package (pip install torch-tensorrt, matching your torch "
            "and CUDA), which is not installed; for TensorRT through ONNX use backend 'onnxruntime' with "
            "providers=['tensorrt'] (onnxruntime-gpu)") from None
    return torch_tensorrt


def tensorrt_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU; none is available (torch.cuda.is_available() is False)"
    try:
        import_torch_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def trt_inputs(example: Tensor, precision: str, dynamic_batch: int | None = None,
               hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None):
    """A torch_tensorrt.Input for ``example``'s shape, optionally a batch and H/W range."""
    trt = import_torch_tensorrt()
    dtype = PRECISIONS[precision] if precision != "fp32" else torch.float32
    b, c, h, w = example.shape
    if dynamic_batch is None and hw_range is None:
        return [trt.Input(shape=tuple(example.shape), dtype=dtype)]
    (h0, w0), (h1, w1) = hw_range or ((h, w), (h, w))
    bmax = dynamic_batch or b
    return [trt.Input(min_shape=(1, c, h0, w0), opt_shape=(b, c, h, w), max_shape=(bmax, c, h1, w1), dtype=dtype)]


def compile_tensorrt(model: nn.Module, example: Tensor, precision: str, **input_kw) -> nn.Module:
    """Compile ``model`` (on CUDA, eval) with torch_tensorrt for ``example``'s shape."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    trt = import_torch_tensorrt()
    enabled = {torch.float32} | ({PRECISIONS[precision]} if precision != "fp32" else set())
    return trt.compile(model, ir="dynamo", inputs=trt_inputs(example, precision, **input_kw),
                       enabled_precisions=enabled)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model: nn.Module, device: torch.device, precision: str, example: Tensor) -> None:
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend 'tensorrt' runs on a CUDA device, not {device}")
        model = model.to(device).eval()
        self.precision = precision
        self.device = device
        with torch.inference_mode():
            self.spec = OutputSpec.of(model(example.to(device)))
        if precision != "fp32":  # TensorRT takes a graph in the target precision
            model = model.to(PRECISIONS[precision])
        from visionscale.runtime.outputs import FlatOutputs

        t0 = time.perf_counter()
        self.module = compile_tensorrt(FlatOutputs(model, self.spec), example.to(device, PRECISIONS[precision]), precision)
        self.build_seconds = time.perf_counter() - t0

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Any:
        x = x.to(self.device, PRECISIONS[self.precision])
        return to_float32(self.spec.unflatten(list(self.module(x))))

    def info(self) -> dict[str, Any]:
        import_torch_tensorrt()
        import torch_tensorrt

        return {"torch_tensorrt": torch_tensorrt.__version__, "build_seconds": self.build_seconds}

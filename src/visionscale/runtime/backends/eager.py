"""Eager PyTorch: autocast precision, channels-last, optional CUDA graph replay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from visionscale.runtime.errors import RunnerError
from visionscale.runtime.outputs import tree_map
from visionscale.runtime.precision import autocast, to_float32


class CudaGraphCall:
    """Captures ``fn`` for one static input shape in a CUDA graph and replays it.

    CUDA graphs record kernel launches with fixed addresses and shapes, so they only apply
    when every call has the same input shape (and the model has no data-dependent control
    flow or host synchronisation). A call with another shape raises instead of recapturing
    silently. Outputs are cloned out of the graph's static buffers.
    """

    def __init__(self, fn, warmup: int = 3) -> None:
        self.fn = fn
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: Tensor | None = None
        self.static_out: Any = None

    def __call__(self, x: Tensor) -> Any:
        if self.graph is None:
            self._capture(x)
        assert self.static_in is not None
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            raise RunnerError(f"cuda_graphs=True needs a static input: captured for {tuple(self.static_in.shape)} "
                              f"{self.static_in.dtype}, got {tuple(x.shape)} {x.dtype}; build another Runner per shape")
        self.static_in.copy_(x)
        self.graph.replay()
        return tree_map(lambda t: t.clone(), self.static_out)

    def _capture(self, x: Tensor) -> None:
        self.static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as the CUDA graph docs ask
            for _ in range(self.warmup):
                self.fn(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(self.static_in)


class EagerBackend:
    name = "eager"

    def __init__(self, model: nn.Module, device: torch.device, precision: str, channels_last: bool = False,
                 cuda_graphs: bool = False) -> None:
        if cuda_graphs and device.type != "cuda":
            raise RunnerError("cuda_graphs=True needs a CUDA device; this Runner runs on " + device.type)
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._graph = CudaGraphCall(self._forward) if cuda_graphs else None

    def prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward(self, x: Tensor) -> Any:
        with autocast(self.precision, self.device):
            return self.model(x)

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Any:
        x = self.prepare(x)
        out = self._graph(x) if self._graph is not None else self._forward(x)
        return to_float32(out)

    def info(self) -> dict[str, Any]:
        return {"autocast": self.precision != "fp32", "cuda_graphs": self._graph is not None}

"""``torch.compile``: the eager backend's forward, compiled; compile time kept apart.

The first call with a new input shape compiles (seconds to minutes: Inductor generates and
builds C++/OpenMP kernels on the CPU, Triton kernels on a GPU). That time is recorded in
``compile_seconds`` and must never be mixed into latency; :meth:`CompileBackend.warmup`
triggers it explicitly. ``cuda_graphs=True`` selects ``mode="reduce-overhead"``
(Inductor's CUDA graphs, which re-record per new shape).
"""

from __future__ import annotations

import shutil
import sys
import time
import types
from typing import Any

import torch
from torch import Tensor, nn

from visionscale.runtime.backends.eager import EagerBackend
from visionscale.runtime.errors import BackendUnavailableError, RunnerError
from visionscale.runtime.precision import to_float32


def compile_unavailable_reason(compile_backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    if compile_backend == "inductor" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
        return "torch.compile's Inductor backend needs a C++ compiler (g++ or clang++) on PATH for CPU kernels; none found"
    if sys.platform == "win32" and compile_backend == "inductor":
        return "Inductor on Windows needs MSVC and is not supported by this tool; use backend 'eager' or 'onnxruntime'"
    return None


_COUNTER = [0]


def _private_copy(method):
    """``method`` re-bound to a copy of its function with a code object of its own."""
    fn = method.__func__
    _COUNTER[0] += 1
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_runner{_COUNTER[0]}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


class CompileBackend(EagerBackend):
    name = "compile"

    def __init__(self, model: nn.Module, device: torch.device, precision: str, channels_last: bool = False,
                 cuda_graphs: bool = False, compile_backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None) -> None:
        reason = compile_unavailable_reason(compile_backend)
        if reason:
            raise BackendUnavailableError(reason)
        super().__init__(model, device, precision, channels_last, cuda_graphs=False)
        if cuda_graphs:
            if device.type != "cuda":
                from visionscale.runtime.errors import RunnerError

                raise RunnerError("cuda_graphs=True needs a CUDA device; this Runner runs on " + device.type)
            mode = mode or "reduce-overhead"
        self.mode = mode
        self.compile_backend = compile_backend
        self.cuda_graphs = cuda_graphs
        # Dynamo keys its cache and its "automatic dynamic shapes" state by the code object
        # of the compiled frame, shared by every Runner in the process: a Runner built after
        # others had seen other shapes got a dynamic-shape graph (40x slower in our CPU
        # benchmark) and could hit the recompile limit, where Dynamo silently runs eager.
        # A private copy of the forward's code object keeps each Runner's compilation its own.
        # dynamic=False by default: one static graph per input shape, as deployment uses.
        self._compiled = torch.compile(_private_copy(self._forward), backend=compile_backend, mode=mode,
                                       dynamic=bool(dynamic))
        self._seen: set[tuple] = set()
        self.compile_seconds: dict[str, float] = {}

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Any:
        x = self.prepare(x)
        key = (tuple(x.shape), x.dtype)
        if key in self._seen:
            return to_float32(self._compiled(x))
        # First call for this shape: this is where compilation happens; time it apart.
        t0 = time.perf_counter()
        try:
            out = self._compiled(x)
        except Exception as exc:  # noqa: BLE001 - dynamo/inductor raise many types, asserts included
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RunnerError(f"torch.compile failed on input {tuple(x.shape)}: {type(exc).__name__}: {first[:300]} "
                              "(run this model with backend eager or onnxruntime)") from exc
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds["x".join(map(str, x.shape))] = time.perf_counter() - t0
        self._seen.add(key)
        return to_float32(out)

    def warmup(self, x: Tensor) -> float:
        """Compile for ``x``'s shape now; returns the seconds it took (0 if already done)."""
        key = (tuple(x.shape), x.dtype)
        if key in self._seen:
            return 0.0
        self(x)
        return self.compile_seconds["x".join(map(str, x.shape))]

    def info(self) -> dict[str, Any]:
        return {"autocast": self.precision != "fp32", "compile_backend": self.compile_backend, "mode": self.mode,
                "cuda_graphs": self.cuda_graphs, "compile_seconds": dict(self.compile_seconds)}

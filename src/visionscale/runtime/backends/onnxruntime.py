"""ONNX Runtime: an exported ``.onnx`` file run through the execution providers asked for.

Providers are never swapped behind the caller's back. ONNX Runtime itself drops a
provider it cannot initialise (a CUDA provider without matching CUDA/cuDNN libraries) and
quietly runs on the CPU; this backend reads the providers back from the session with
``session.get_providers()`` and raises when one that was asked for is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# The torch-free session helpers (aliases, provider checks, captured output) live in
# visionscale.io.ort: the bundle predictors use them too.
from visionscale.io.ort import open_session, provider_names
from visionscale.runtime.errors import BackendUnavailableError, RunnerError
from visionscale.runtime.outputs import OutputSpec

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "backend 'onnxruntime' needs the onnxruntime package, which is not installed: "
            "pip install 'visionscale[onnx]' (CPU) or onnxruntime-gpu (CUDA/TensorRT providers)") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime build offers ([] when it is not installed)."""
    try:
        return list(import_onnxruntime().get_available_providers())
    except BackendUnavailableError:
        return []


def resolve_providers(providers: list[str] | tuple[str, ...] | str | None, device: torch.device) -> list[str]:
    """Provider names (aliases ``cpu``, ``cuda``, ``tensorrt``... or full names), checked as installed.

    ``None`` picks from the device: CUDA for a CUDA device, else the CPU provider.

    Raises:
        BackendUnavailableError: A requested provider is not in this onnxruntime build.
    """
    ort = import_onnxruntime()
    if providers is None:
        return ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    if not any(p.strip() for p in items):
        raise RunnerError("no execution providers given")
    return provider_names(ort, items, BackendUnavailableError)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON written next to an exported file (``model.onnx`` -> ``model.onnx.json``), or {}."""
    side = Path(str(path) + ".json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise RunnerError(f"cannot read export metadata {side}: {exc}") from None


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: str | Path, device: torch.device, providers=None, precision: str | None = None,
                 threads: int | None = None, meta: dict[str, Any] | None = None) -> None:
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise RunnerError(f"ONNX file not found: {self.path}")
        self.meta = meta if meta is not None else read_sidecar(self.path)
        requested = resolve_providers(providers, device)
        opts = ort.SessionOptions()
        # Same thread count as PyTorch, so CPU comparisons are like for like.
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.log_severity_level = 3
        self.session = open_session(ort, self.path, requested, opts, unavailable=BackendUnavailableError,
                                    failed=RunnerError)
        used = list(self.session.get_providers())
        self.requested = requested
        self.providers = used
        # Outputs are handed back on the Runner's device, as the PyTorch backends do (the
        # session itself reads and writes host memory: timings include those copies).
        self.device = device
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise RunnerError(f"{self.path} has {len(inp)} inputs; the Runner feeds one image tensor")
        self.input_name = inp[0].name
        self.input_shape = list(inp[0].shape)
        if inp[0].type not in _ORT_DTYPES:
            raise RunnerError(f"{self.path}: input type {inp[0].type} is not a float tensor")
        self.np_dtype = _ORT_DTYPES[inp[0].type]
        graph_precision = "fp16" if self.np_dtype == np.float16 else "fp32"
        if precision is not None and precision != graph_precision:
            raise RunnerError(f"{self.path} is an {graph_precision} graph, but precision {precision!r} was asked for; "
                              f"export it again with that precision").about("precision")
        self.precision = graph_precision
        names = [o.name for o in self.session.get_outputs()]
        spec = self.meta.get("outputs")
        self.spec = OutputSpec.from_dict(spec) if spec else OutputSpec("tuple" if len(names) > 1 else "tensor", tuple(names))
        if len(self.spec.names) != len(names):
            raise RunnerError(f"{self.path}: metadata lists outputs {list(self.spec.names)}, the graph has {names}")
        self.ranges = self.meta.get("shape_ranges", {})

    def check_input(self, x: Tensor) -> None:
        if x.dim() != len(self.input_shape):
            raise RunnerError(f"{self.path.name} expects a {len(self.input_shape)}-d input {self.input_shape}, "
                              f"got shape {tuple(x.shape)}")
        for axis, (want, got) in enumerate(zip(self.input_shape, x.shape)):
            if axis == 0 and self.splits_batch:
                continue  # run one image at a time, see __call__
            if isinstance(want, int) and want != got:
                raise RunnerError(f"{self.path.name} was exported with a static input {self.input_shape}: axis {axis} "
                                  f"must be {want}, got {got} (export it again at that input size and batch)")
        for axis, key in ((2, "height"), (3, "width")):
            lo, hi = (self.ranges.get(key) or [None, None])
            if (lo is not None and x.shape[axis] < lo) or (hi is not None and x.shape[axis] > hi):
                raise RunnerError(f"{self.path.name}: {key} {x.shape[axis]} is outside the range the export is valid "
                                  f"for, [{lo}, {hi if hi is not None else 'inf'}]")

    @property
    def splits_batch(self) -> bool:
        """A graph exported with a fixed batch of 1 (PatchCore's) runs a larger batch image by image."""
        return isinstance(self.input_shape[0], int) and self.input_shape[0] == 1

    def _run(self, x: Tensor) -> list[Tensor]:
        arr = x.detach().to("cpu").contiguous().numpy().astype(self.np_dtype, copy=False)
        try:
            outs = self.session.run(None, {self.input_name: arr})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunnerError(f"ONNX Runtime failed running {self.path.name} on input {tuple(x.shape)}: {first}") from None
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    def __call__(self, x: Tensor) -> Any:
        self.check_input(x)
        if self.splits_batch and x.shape[0] > 1:
            parts = [self._run(x[i : i + 1]) for i in range(x.shape[0])]
            if any(t.dim() == 0 or t.shape[0] != 1 for t in parts[0]):
                raise RunnerError(f"{self.path.name} was exported with batch 1 and has an output without a batch "
                                  f"axis; give it one image at a time")
            tensors = [torch.cat(ts, dim=0) for ts in zip(*parts)]
        else:
            tensors = self._run(x)
        tensors = [t.float() if t.is_floating_point() else t for t in tensors]
        if self.device.type != "cpu":
            tensors = [t.to(self.device) for t in tensors]
        return self.spec.unflatten(tensors)

    def info(self) -> dict[str, Any]:
        return {"onnx_file": str(self.path), "providers": list(self.providers), "provider": self.providers[0],
                "requested_providers": list(self.requested), "input_shape": self.input_shape,
                "intra_op_threads": self.session.get_session_options().intra_op_num_threads}

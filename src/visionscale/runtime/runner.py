"""One interface to run any model: ``Runner(model, backend=..., precision=...)``.

>>> runner = Runner("efficientad_s", backend="onnxruntime", precision="fp32", device="cpu")
>>> out = runner(images)            # the same dict the eager model returns
>>> runner.info["provider"]         # 'CPUExecutionProvider', read back from the session

Backends: ``eager`` (PyTorch), ``compile`` (``torch.compile``), ``onnxruntime`` (the model
is exported to a temporary ONNX file with a parity check first, or an ``.onnx`` file is
loaded) and ``tensorrt`` (torch-tensorrt, CUDA only). Nothing falls back silently: a
provider, device or precision that cannot run raises :class:`BackendUnavailableError`
with what is installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visionscale.device import resolve_device
from visionscale.runtime.backends import BACKENDS
from visionscale.runtime.errors import BackendUnavailableError, RunnerError
from visionscale.runtime.models import default_image_size, in_channels, resolve_model
from visionscale.runtime.precision import PrecisionError, check_precision, parse_precision

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")


def _is_onnx_file(model: Any) -> bool:
    return isinstance(model, (str, Path)) and str(model).lower().endswith(".onnx")


class Runner:
    """Run a model with one backend and precision; ``runner(x)`` returns what the eager model returns.

    Args:
        model: ``nn.Module``, registry name, ``package.module:attr``, a classifier checkpoint,
            an anomaly run folder, or (backend ``onnxruntime``) an ``.onnx`` file.
        backend: ``eager``, ``compile``, ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32``, ``fp16`` or ``bf16``. Autocast for eager/compile; a cast graph for
            onnxruntime (fp16 only) and tensorrt.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        channels_last: NHWC memory format for model and input (eager, compile).
        cuda_graphs: Replay a captured CUDA graph (eager) or use ``mode="reduce-overhead"``
            (compile). Static input shapes only; CUDA only.
        providers: ONNX Runtime execution providers (``cpu``, ``cuda``, ``tensorrt`` or full
            names); default from ``device``. Each one asked for must be active in the session.
        image_size: Example input size for exporting backends (default: the model's own or 256).
        batch: Example batch for exporting backends.
        model_kwargs: Keyword arguments for a registry factory.
        compile_backend, compile_mode: Passed to ``torch.compile``.
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        backend: str = "eager",
        precision: str = "fp32",
        device: str | torch.device = "auto",
        channels_last: bool = False,
        cuda_graphs: bool = False,
        providers: list[str] | str | None = None,
        *,
        image_size: int | tuple[int, int] | None = None,
        batch: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        threads: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise RunnerError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        try:
            self.precision = parse_precision(precision)
        except PrecisionError as exc:
            raise RunnerError(str(exc)) from None
        if providers is not None and backend != "onnxruntime":
            raise RunnerError(f"providers are ONNX Runtime execution providers; backend {backend!r} takes none")
        self.backend_name = backend
        self._tmpdir: str | None = None
        self.export: dict[str, Any] | None = None
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        notes: list[str] = []

        if backend == "onnxruntime":
            self.device = self._ort_device(device, providers)
        else:
            self.device = resolve_device(device)
        try:
            note = check_precision(self.precision, self.device)
        except PrecisionError as exc:
            raise BackendUnavailableError(str(exc)) from None
        if note and backend in ("eager", "compile"):
            notes.append(note)

        if _is_onnx_file(model):
            if backend != "onnxruntime":
                raise RunnerError(f"{model} is an ONNX file: run it with backend='onnxruntime'")
            from visionscale.runtime.backends.onnxruntime import OnnxRuntimeBackend

            self.name = Path(model).stem
            self.model = None
            self.backend = OnnxRuntimeBackend(model, self.device, providers, self.precision, threads)
        else:
            self.name, net = resolve_model(model, size, model_kwargs)
            self.model = net
            self.backend = self._build(net, backend, size, batch, channels_last, cuda_graphs, providers,
                                       compile_backend, compile_mode, threads)
        if backend in ("onnxruntime", "tensorrt") and (channels_last or cuda_graphs):
            notes.append(f"channels_last/cuda_graphs apply to the PyTorch backends; {backend} plans its own layout")
        self.channels_last = channels_last and backend in ("eager", "compile")
        self.cuda_graphs = cuda_graphs and backend in ("eager", "compile")
        self.notes = notes

    def _ort_device(self, device, providers) -> torch.device:
        from visionscale.runtime.backends.onnxruntime import available_providers, resolve_providers

        if providers is None:
            if device == "auto":
                gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in available_providers()
                return torch.device("cuda" if gpu else "cpu")
            return resolve_device(device)
        wanted = resolve_providers(providers, torch.device("cpu"))  # raises when one is not installed
        return torch.device("cuda") if any(p in _GPU_PROVIDERS for p in wanted) else torch.device("cpu")

    def _build(self, net, backend, size, batch, channels_last, cuda_graphs, providers, compile_backend,
               compile_mode, threads):
        if backend == "eager":
            from visionscale.runtime.backends.eager import EagerBackend

            return EagerBackend(net, self.device, self.precision, channels_last, cuda_graphs)
        if backend == "compile":
            from visionscale.runtime.backends.compile import CompileBackend

            return CompileBackend(net, self.device, self.precision, channels_last, cuda_graphs,
                                  compile_backend=compile_backend, mode=compile_mode)
        if backend == "tensorrt":
            from visionscale.runtime.backends.tensorrt import TensorRTBackend, tensorrt_unavailable_reason

            reason = tensorrt_unavailable_reason()
            if reason:
                raise BackendUnavailableError(reason)
            h, w = size or default_image_size(net)
            example = torch.rand(batch or 1, in_channels(net), h, w)
            return TensorRTBackend(net, self.device, self.precision, example)
        # onnxruntime: export to a temporary file first (with its parity check).
        from visionscale.runtime.backends.onnxruntime import OnnxRuntimeBackend, resolve_providers
        from visionscale.runtime.export import export_onnx

        resolve_providers(providers, self.device)  # fail before the (slow) export
        self._tmpdir = tempfile.mkdtemp(prefix="visionscale-onnx-")
        path = Path(self._tmpdir) / "model.onnx"
        result = export_onnx(net, path, precision=self.precision, image_size=size, batch=batch)
        self.export = result.to_dict()
        if not result.parity_ok:
            worst = [c for c in result.parity if not c.get("ok")]
            raise RunnerError(f"the ONNX export of {self.name!r} failed its parity check against eager FP32: {worst}")
        return OnnxRuntimeBackend(path, self.device, providers, self.precision, threads)

    def __call__(self, x: Tensor) -> Any:
        if not isinstance(x, Tensor):
            raise RunnerError(f"Runner input must be a tensor (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise RunnerError(f"Runner input must be (B, C, H, W), got shape {tuple(x.shape)}")
        return self.backend(x)

    def warmup(self, x: Tensor, runs: int = 1) -> float | None:
        """Run ``runs`` times untimed; for ``compile``, returns the compile seconds for this shape."""
        compile_s = None
        if hasattr(self.backend, "warmup"):
            compile_s = self.backend.warmup(x)
        for _ in range(runs):
            self(x)
        return compile_s

    @property
    def info(self) -> dict[str, Any]:
        """What actually runs: backend, precision, device, provider(s), notes."""
        d: dict[str, Any] = {"model": self.name, "backend": self.backend_name, "precision": self.precision,
                             "device": str(self.device), "channels_last": self.channels_last,
                             "cuda_graphs": self.cuda_graphs, "torch": torch.__version__, "notes": list(self.notes)}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        d.update(self.backend.info())
        if self.export is not None:
            d["export_parity"] = [{k: c.get(k) for k in ("shape", "max_abs", "max_rel", "ok")} for c in self.export["parity"]]
            d["export_seconds"] = self.export["export_seconds"]
        return d

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"Runner({self.name!r}, backend={self.backend_name!r}, precision={self.precision!r}, device='{self.device}')"


def accelerate(model: nn.Module, backend: str = "eager", precision: str = "fp32", device: str | torch.device = "cpu",
               image_size: tuple[int, int] | None = None):
    """``model`` itself for eager fp32, else a :class:`Runner` around it: what the library's
    predict / detect / evaluate calls use for their ``backend`` and ``precision`` arguments.
    The result is called like the model and returns what it returns."""
    if backend == "eager" and parse_precision(precision) == "fp32":
        return model
    return Runner(model, backend=backend, precision=precision, device=device, image_size=image_size)


def runtime_info(forward: Any, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``backend``, ``precision``, ``device`` (and ``provider`` for ONNX Runtime) of what
    :func:`accelerate` returned: a Runner's info, or eager FP32 for the plain module."""
    info = getattr(forward, "info", None)
    if isinstance(info, dict):
        return {k: info[k] for k in ("backend", "precision", "device", "provider") if k in info}
    return {"backend": "eager", "precision": "fp32", "device": str(device)}

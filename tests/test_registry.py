import pytest
import torch

from visionscale import create, list_models
from visionscale.registry import UnknownModelError, register_model


def test_lists_every_family_and_filters_with_fnmatch():
    names = list_models()
    for name in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2", "patchcore", "patchcore_wrn50",
                 "efficientad_s", "efficientad_m", "ddad", "patchcore_tiny", "efficientad_tiny", "ddad_tiny"):
        assert name in names
    assert names == sorted(names)
    assert list_models("efficientad_*") == ["efficientad_m", "efficientad_s", "efficientad_tiny"]
    assert list_models("no-such-*") == []


def test_create_passes_keyword_arguments():
    def bank_rows(model):
        return next(b for n, b in model.named_buffers() if n.endswith("memory_bank")).shape[0]

    with torch.device("meta"):
        small = create("patchcore", image_size=256)
        large = create("patchcore", image_size=512)
        few = create("patchcore", image_size=256, num_train_images=20)
    assert bank_rows(small) == 20480  # 10 % of 200 images x 32 x 32 patches
    assert bank_rows(large) == 4 * bank_rows(small)
    assert bank_rows(few) == bank_rows(small) // 10


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as info:
        create("patchcor")
    assert "unknown model 'patchcor'" in str(info.value) and "patchcore_tiny" in str(info.value)


def test_duplicate_registration_raises():
    @register_model("_test_dummy_model")
    def first():
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="already registered"):

        @register_model("_test_dummy_model")
        def second():
            return torch.nn.Identity()

    assert "_test_dummy_model" in list_models("_test_*")


def test_import_object_loads_dotted_attributes_and_names_what_is_missing():
    import pytest

    from visionscale.registry import ModelImportError, import_object

    assert import_object("visionscale.nn.resnet:resnet_tiny").__name__ == "resnet_tiny"
    assert import_object("visionscale.anomaly.ddad:DDAD.forward").__name__ == "forward"
    with pytest.raises(ModelImportError, match="cannot import 'no_such_pkg_xyz'"):
        import_object("no_such_pkg_xyz:net")
    with pytest.raises(ModelImportError, match="has no attribute 'nope'"):
        import_object("visionscale.nn.resnet:nope")


def test_a_spec_that_is_not_a_model_says_what_it_is():
    from visionscale.errors import VisionscaleError
    from visionscale.registry import NotAModelError, build_model, import_model

    with pytest.raises(NotAModelError, match=r"'os:sep' is a str, not a torch.nn.Module"):
        import_model("os:sep")
    factory = import_model("os:getcwd")  # callable: only calling it tells
    with pytest.raises(NotAModelError, match=r"'os:getcwd' is not a model: calling it returned str") as info:
        build_model(factory, "os:getcwd")
    assert isinstance(info.value, VisionscaleError)
    with pytest.raises(NotAModelError, match="cannot be built with arguments {'image_size': 64}") as info:
        build_model(import_model("visionscale.nn.resnet:ResNetConfig.__init__"), "x", image_size=64)
    assert isinstance(info.value, TypeError)  # as calling the factory would have raised
    assert isinstance(build_model(import_model("visionscale.nn.resnet:resnet_tiny"), "resnet_tiny"), torch.nn.Module)


def test_a_user_module_that_fails_to_import_is_one_error(tmp_path, monkeypatch):
    from visionscale.registry import ModelImportError, import_object

    (tmp_path / "vs_broken_mod.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelImportError, match="cannot import 'vs_broken_mod'.*SyntaxError"):
        import_object("vs_broken_mod:net")

"""ResNet / Wide-ResNet: torchvision-compatible state dicts, features(), weights loading.

torchvision is not installed here, so compatibility is checked against torchvision's
published facts: parameter counts from its ``*_Weights`` metadata (``num_params``) and
its module naming scheme, enumerated independently below.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn

from visionscale import registry
from visionscale.components import run_components
from visionscale.io.weights import StateDictMismatchError, WeightsUnavailableError, save_file_atomic
from visionscale.nn.resnet import (
    RESNET_WEIGHTS,
    ResNet,
    ResNetConfig,
    get_weights_spec,
    resnet18,
    resnet50,
    resnet_tiny,
    wide_resnet50_2,
    wide_resnet101_2,
)

# torchvision's *_Weights meta["num_params"] (torchvision/models/resnet.py).
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}
FACTORIES = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "wide_resnet50_2": wide_resnet50_2,
    "wide_resnet101_2": wide_resnet101_2,
}


def _on_meta(factory, **kw) -> ResNet:
    # Shapes and names only: no memory, no init cost, fast even for WRN-101-2.
    with torch.device("meta"):
        return factory(**kw)


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- architecture vs torchvision ----------------------------------------------------------


@pytest.mark.parametrize("arch", list(TORCHVISION_NUM_PARAMS))
def test_param_count_matches_torchvision(arch):
    net = _on_meta(FACTORIES[arch])
    assert _n_params(net) == TORCHVISION_NUM_PARAMS[arch]
    for spec in RESNET_WEIGHTS[arch].values():
        assert spec.num_params == TORCHVISION_NUM_PARAMS[arch]


def _torchvision_keys(block: str, layers: tuple[int, ...]) -> set[str]:
    """torchvision's ResNet state-dict keys, from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{s}" for s in bn)}
    n_convs = 2 if block == "basic" else 3
    for li, n in enumerate(layers, start=1):
        for b in range(n):
            pre = f"layer{li}.{b}"
            for c in range(1, n_convs + 1):
                keys.add(f"{pre}.conv{c}.weight")
                keys.update(f"{pre}.bn{c}.{s}" for s in bn)
            # Projection shortcut on the first block of every stage, except layer1 of a
            # BasicBlock net (64 -> 64 channels at stride 1 needs none).
            if b == 0 and not (block == "basic" and li == 1):
                keys.add(f"{pre}.downsample.0.weight")
                keys.update(f"{pre}.downsample.1.{s}" for s in bn)
    return keys


@pytest.mark.parametrize(
    "arch, block, layers",
    [
        ("resnet18", "basic", (2, 2, 2, 2)),
        ("resnet50", "bottleneck", (3, 4, 6, 3)),
        ("wide_resnet50_2", "bottleneck", (3, 4, 6, 3)),
        ("wide_resnet101_2", "bottleneck", (3, 4, 23, 3)),
    ],
)
def test_state_dict_keys_are_torchvision_keys(arch, block, layers):
    sd = _on_meta(FACTORIES[arch]).state_dict()
    assert set(sd) == _torchvision_keys(block, layers)


@pytest.mark.parametrize(
    "arch, key, shape",
    [
        ("wide_resnet101_2", "layer3.22.conv2.weight", (512, 512, 3, 3)),  # 2x the 256 of ResNet-101
        ("wide_resnet101_2", "layer1.0.downsample.0.weight", (256, 64, 1, 1)),
        ("wide_resnet101_2", "layer4.2.conv3.weight", (2048, 1024, 1, 1)),
        ("wide_resnet101_2", "fc.weight", (1000, 2048)),
        ("wide_resnet50_2", "layer1.0.conv1.weight", (128, 64, 1, 1)),
        ("wide_resnet50_2", "layer2.0.downsample.0.weight", (512, 256, 1, 1)),
        ("wide_resnet50_2", "layer3.5.bn2.running_var", (512,)),
        ("resnet50", "layer3.5.conv2.weight", (256, 256, 3, 3)),
        ("resnet50", "layer4.0.downsample.1.weight", (2048,)),
        ("resnet18", "conv1.weight", (64, 3, 7, 7)),
        ("resnet18", "layer2.0.downsample.0.weight", (128, 64, 1, 1)),
        ("resnet18", "layer4.1.conv2.weight", (512, 512, 3, 3)),
        ("resnet18", "fc.weight", (1000, 512)),
        ("resnet18", "bn1.num_batches_tracked", ()),
    ],
)
def test_state_dict_shapes(arch, key, shape):
    assert tuple(_on_meta(FACTORIES[arch]).state_dict()[key].shape) == shape


def test_bottleneck_stride_is_on_the_3x3_conv():
    # torchvision's "ResNet v1.5": a checkpoint would load either way, but outputs differ.
    net = _on_meta(resnet50)
    assert net.layer2[0].conv1.stride == (1, 1)
    assert net.layer2[0].conv2.stride == (2, 2)
    assert net.layer2[0].downsample[0].stride == (2, 2)


def test_channels_and_strides():
    assert _on_meta(wide_resnet101_2).channels == {
        "stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048
    }
    assert resnet18().channels == {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert resnet_tiny().channels == {"stem": 8, "layer1": 8, "layer2": 16, "layer3": 32, "layer4": 64}
    assert resnet_tiny().strides == {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def test_torchvision_init():
    torch.manual_seed(0)
    net = resnet50()
    w = net.layer3[0].conv2.weight  # (256, 256, 3, 3): fan_out = 256 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (256 * 9)), rel=0.03)
    assert w.mean().abs().item() < 1e-3
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    z = resnet_tiny(zero_init_residual=True)
    assert torch.all(z.layer2[0].bn2.weight == 0)


def test_wide_nets_fix_their_width():
    with pytest.raises(ValueError, match="width_per_group"):
        _on_meta(wide_resnet50_2, width_per_group=64)
    assert _n_params(_on_meta(wide_resnet50_2, width_per_group=128)) == TORCHVISION_NUM_PARAMS["wide_resnet50_2"]


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        ResNetConfig(num_classes=-1)
    with pytest.raises(ValueError, match="layers"):
        ResNetConfig(layers=(1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="BasicBlock"):
        ResNet(ResNetConfig(block="basic", layers=(1, 1, 1, 1), width_per_group=128))


def test_num_classes_zero_drops_fc():
    net = resnet_tiny(num_classes=0).eval()
    assert not any(k.startswith("fc.") for k in net.state_dict())
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert resnet_tiny(num_classes=7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


# --- features ----------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [resnet_tiny, resnet18])
def test_feature_shapes_at_64(factory):
    net = factory().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net.features(x, layers=("stem", "layer1", "layer2", "layer3", "layer4"))
    assert list(feats) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    for name, f in feats.items():
        s = net.strides[name]
        assert f.shape == (2, net.channels[name], 64 // s, 64 // s), name


def test_feature_default_layers_and_odd_sizes():
    net = resnet_tiny().eval()
    with torch.no_grad():
        feats = net.features(torch.randn(1, 3, 50, 70))
    assert list(feats) == ["layer1", "layer2", "layer3", "layer4"]
    for name, f in feats.items():
        s = net.strides[name]
        assert f.shape[-2:] == (math.ceil(50 / s), math.ceil(70 / s)), name


def test_features_stop_after_deepest_requested_layer():
    net = resnet_tiny().eval()
    ran = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    with torch.no_grad():
        feats = net.features(torch.randn(1, 3, 64, 64), layers=("layer3", "layer2"))
    assert list(feats) == ["layer2", "layer3"]  # execution order, whatever order was asked
    assert ran == ["layer1", "layer2", "layer3"]  # layer4 never ran
    ran.clear()
    net.features(torch.randn(1, 3, 64, 64), layers="stem")
    assert ran == []


def test_features_are_not_modified_by_later_stages():
    # The blocks use in-place adds/ReLUs; a returned map must not change afterwards.
    net = resnet_tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        alone = net.features(x, layers=("layer1",))["layer1"].clone()
        together = net.features(x, layers=("layer1", "layer4"))["layer1"]
    assert torch.equal(alone, together)


def test_features_match_forward_and_components():
    net = resnet_tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = net(x)
        via_features = net.head(net.features(x, layers=("layer4",))["layer4"])
        parts = net.components()
        state = run_components(parts, x)
    assert [p.name for p in parts] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert torch.allclose(logits, via_features)
    assert torch.allclose(logits, state["output"])
    # Component modules own the parameters (the profiler counts their bytes).
    assert sum(_n_params(p.module) for p in parts) == _n_params(net)
    assert set(net.state_dict()) == set(resnet_tiny().state_dict())  # components() added no keys


def test_unknown_feature_layer_is_an_error():
    with pytest.raises(ValueError, match="layer5"):
        resnet_tiny().features(torch.randn(1, 3, 32, 32), layers=("layer5",))
    with pytest.raises(ValueError):
        resnet_tiny().features(torch.randn(1, 3, 32, 32), layers=())


def test_backward_through_features():
    net = resnet_tiny()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    net.features(x, layers=("layer2",))["layer2"].sum().backward()
    assert x.grad is not None and net.layer2[0].conv1.weight.grad is not None
    assert net.layer4[0].conv1.weight.grad is None


# --- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [".safetensors", ".pth"])
def test_weights_file_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    src = resnet_tiny().eval()
    path = tmp_path / f"tiny{fmt}"
    if fmt == ".pth":
        torch.save(src.state_dict(), path)
    else:
        save_file_atomic(src.state_dict(), path)
    torch.manual_seed(1)
    dst = resnet_tiny(weights=path).eval()
    dst_str = resnet_tiny(weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
        assert torch.equal(src(x), dst_str(x))
    assert dst.weights_spec is None


def test_headless_net_ignores_checkpoint_fc(tmp_path):
    src = resnet_tiny().eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    net = resnet_tiny(weights=tmp_path / "w.pth", num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.features(x)["layer4"], src.features(x)["layer4"])


def test_mismatched_file_lists_keys(tmp_path):
    sd = resnet_tiny().state_dict()
    sd.pop("layer4.0.bn2.running_mean")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(StateDictMismatchError) as e:
        resnet_tiny(weights=tmp_path / "w.pth")
    assert "layer4.0.bn2.running_mean" in str(e.value) and "extra.weight" in str(e.value)
    assert "w.pth" in str(e.value)


def test_wrong_width_file_reports_shapes(tmp_path):
    torch.save(resnet_tiny(base_width=16).state_dict(), tmp_path / "w16.pth")
    with pytest.raises(StateDictMismatchError, match=r"shape mismatches.*layer1\.0\.conv1\.weight"):
        resnet_tiny(weights=tmp_path / "w16.pth")


def test_weights_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="no published weights"):
        resnet_tiny(weights="DEFAULT")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resnet18(weights="IMAGENET1K_V9")
    with pytest.raises(TypeError):
        resnet18(weights=True)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resnet_tiny(weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(weights="DEFAULT", num_classes=10)  # checked before any download


def test_published_weights_metadata():
    v1 = get_weights_spec("wide_resnet101_2", "IMAGENET1K_V1")
    assert v1.url == "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth"
    assert v1.sha256_prefix == "32ee1156" and v1.license == "BSD-3-Clause"
    assert v1.mean == (0.485, 0.456, 0.406) and v1.std == (0.229, 0.224, 0.225)
    assert v1.input_size == (224, 224)
    assert get_weights_spec("wide_resnet101_2").name == "IMAGENET1K_V2"  # torchvision's DEFAULT
    assert get_weights_spec("resnet18").name == "IMAGENET1K_V1"  # resnet18 has no V2
    for arch, table in RESNET_WEIGHTS.items():
        for spec in table.values():
            assert spec.filename.startswith(arch + "-") and spec.sha256_prefix in spec.filename


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_default_weights_offline_error(torch_home, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as e:
        _on_meta(wide_resnet50_2, weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg
    assert str(torch_home / "wide_resnet50_2-95faca4d.pth") in msg
    assert "weights=None" in msg


def test_default_weights_found_in_hub_cache(torch_home, monkeypatch):
    # A file dropped into the cache by hand (the offline route) is used without downloading.
    def no_download(*a, **k):
        raise AssertionError("must not download when the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    torch.manual_seed(0)
    src = resnet18().eval()
    torch_home.mkdir(parents=True)
    torch.save(src.state_dict(), torch_home / "resnet18-f37072fd.pth")
    net = resnet18(weights="DEFAULT").eval()
    assert net.weights_spec is not None and net.weights_spec.name == "IMAGENET1K_V1"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), src(x))


# --- registry and purity ---------------------------------------------------------------------


def test_factories_are_registered_and_accept_image_size():
    # Read the registry dict directly: registry.create() also imports the anomaly model
    # modules, which are tested on their own.
    for name in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2", "resnet_tiny"):
        assert name in registry._REGISTRY
    net = registry._REGISTRY["resnet_tiny"](image_size=(96, 128))
    assert isinstance(net, ResNet)


def test_import_pulls_in_no_cli_plotting_or_torchvision():
    code = (
        "import sys, visionscale.nn.resnet; "
        "bad = [m for m in ('typer', 'rich', 'matplotlib', 'torchvision', 'timm') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(src)})
    assert r.returncode == 0, r.stdout + r.stderr

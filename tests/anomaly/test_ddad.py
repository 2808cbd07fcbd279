"""DDAD: U-Net architecture, schedule and trajectory, conditioned step, map, components."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from visionscale.anomaly.ddad import DDAD, STEP_KEY, DDADConfig, ddad, ddad_tiny
from visionscale.components import run_components
from visionscale.nn.unet import AttentionBlock, UNet, UNetConfig
from visionscale.registry import create, list_models

TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attention_ds=(2, 4),
                       num_heads=2, norm_groups=4)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    # Zero-initialised output layers make a fresh U-Net predict exactly 0 and hide its
    # attention; random weights everywhere make the tests see every layer.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _image(b: int = 1, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1  # [-1, 1] like the official loader


# ---------------------------------------------------------------------------------------
# U-Net


def _hand_count_official_unet() -> int:
    """Parameters of UNetModel(256, 64, n_heads=4, in_channels=3), block by block.

    Written out level by level from the official unet.py structure (no loop shared with
    the implementation). Not a published number: the same 32,952,707 came out of the
    official class itself, instantiated locally while writing this model.
    """
    emb = 256

    def conv(ci, co, k):
        return ci * co * k * k + co

    def gn(c):
        return 2 * c

    def res(ci, co):  # GN, conv3, emb Linear, GN, conv3, 1x1 skip if channels change
        skip = conv(ci, co, 1) if ci != co else 0
        return gn(ci) + conv(ci, co, 3) + (emb * co + co) + gn(co) + conv(co, co, 3) + skip

    def attn(c):  # GN, qkv 1x1, out 1x1
        return gn(c) + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = (64 * 256 + 256) + (256 * 256 + 256)  # timestep MLP
    total += conv(3, 64, 3)  # input conv
    # Down: levels at 64, 64, 128, 128, 256, 256 channels; a resampling ResBlock between.
    total += 2 * res(64, 64) + res(64, 64)  # level 0 (ds 1) + down
    total += 2 * res(64, 64) + res(64, 64)  # level 1 (ds 2) + down
    total += res(64, 128) + res(128, 128) + res(128, 128)  # level 2 (ds 4) + down
    total += 2 * (res(128, 128) + attn(128)) + res(128, 128)  # level 3 (ds 8) + down
    total += res(128, 256) + res(256, 256) + 2 * attn(256) + res(256, 256)  # level 4 (ds 16) + down
    total += 2 * (res(256, 256) + attn(256))  # level 5 (ds 32)
    total += 2 * res(256, 256) + attn(256)  # middle
    # Up: 3 blocks per level, each concatenating one skip (popped in reverse order).
    total += 3 * (res(512, 256) + attn(256)) + res(256, 256)  # level 5 + up
    total += 2 * res(512, 256) + res(256 + 128, 256) + 3 * attn(256) + res(256, 256)  # level 4 + up
    total += res(256 + 128, 128) + 2 * res(256, 128) + 3 * attn(128) + res(128, 128)  # level 3 + up
    total += 2 * res(256, 128) + res(128 + 64, 128) + res(128, 128)  # level 2 + up
    total += res(128 + 64, 64) + 2 * res(128, 64) + res(64, 64)  # level 1 + up
    total += 3 * res(128, 64)  # level 0
    total += gn(64) + conv(64, 3, 3)  # output head
    return total


def test_unet_parameter_count_matches_hand_count():
    with torch.device("meta"):
        unet = UNet()
    n = sum(p.numel() for p in unet.parameters())
    assert n == _hand_count_official_unet() == 32_952_707


@pytest.mark.parametrize("size", [(256, 256), (256, 320)])
def test_unet_output_shape_equals_input_shape(size):
    with torch.device("meta"):
        unet = UNet()
        x = torch.empty(2, 3, *size)
        out = unet(x, torch.tensor([225.0, 0.0]))
    assert out.shape == x.shape


def test_validate_input_size():
    unet = UNet(TINY_UNET)
    with torch.device("meta"):
        real = UNet()
    with pytest.raises(ValueError, match="divisible by 32.*250x256"):
        real.validate_input_size(250, 256)
    real.validate_input_size(256, 320)
    real.validate_input_size(32, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        unet.validate_input_size(30, 32)
    with torch.device("meta"):
        model = create("ddad", image_size=250, backbone="resnet_tiny")  # image_size is unused...
        with pytest.raises(ValueError, match="divisible by 32"):
            model.validate_input_size(250, 256)
        with pytest.raises(ValueError, match="divisible by 32"):  # ...the first step checks the input
            model.denoise_step({"image": torch.zeros(1, 3, 250, 256)})
    tiny = ddad_tiny()
    with pytest.raises(ValueError, match="blur"):
        tiny.validate_input_size(16, 32)


def test_attention_blocks_sit_at_factors_8_16_32():
    assert UNetConfig.from_resolutions(256) == (8, 16, 32)  # official "32,16,8" at 256 px
    with torch.device("meta"):
        unet = UNet()
    blocks = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    # Down: 2 per level at ds 8, 16, 32; middle: 1; up: 3 per level at ds 32, 16, 8.
    assert len(blocks) == 6 + 1 + 9
    sizes: list[tuple[int, int]] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:]))) for b in blocks]
    with torch.device("meta"):
        unet(torch.empty(1, 3, 256, 256), torch.zeros(1))
    for h in hooks:
        h.remove()
    # 32x32 maps (ds 8): 2 down + 3 up; 16x16: 2 + 3; 8x8: 2 + middle + 3.
    assert sorted(sizes) == sorted([(32, 32)] * 5 + [(16, 16)] * 5 + [(8, 8)] * 6)


def test_sdpa_attention_matches_math():
    torch.manual_seed(0)
    math_unet = _randomize(UNet(TINY_UNET)).eval()
    sdpa_unet = UNet(UNetConfig(**{**TINY_UNET.__dict__, "attention": "sdpa"})).eval()
    sdpa_unet.load_state_dict(math_unet.state_dict())
    x, t = _image(2, 16), torch.tensor([225.0, 25.0])
    with torch.no_grad():
        a, b = math_unet(x, t), sdpa_unet(x, t)
    assert a.abs().mean() > 0.1  # attention and output layers really contribute
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention"):
        UNet(UNetConfig(**{**TINY_UNET.__dict__, "attention": "flash"}))


def test_timestep_changes_prediction():
    unet = _randomize(UNet(TINY_UNET)).eval()
    x = _image(1, 16)
    with torch.no_grad():
        assert not torch.allclose(unet(x, torch.tensor([225.0])), unet(x, torch.tensor([0.0])))


# ---------------------------------------------------------------------------------------
# Schedule and trajectory


def test_beta_schedule_endpoints_and_cumprod():
    model = ddad_tiny()
    betas = model.betas.double()
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert torch.allclose(betas[1:] - betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    expected = torch.cumprod(1 - betas, dim=0)
    torch.testing.assert_close(model.alphas_cumprod.double(), expected, rtol=1e-5, atol=0)
    assert model.alpha_bar(-1) == 1.0
    assert model.alpha_bar(250) == pytest.approx(expected[250].item(), rel=1e-6)


def test_trajectory_is_225_to_0_and_the_unet_sees_it():
    model = ddad_tiny()
    # Official: seq = range(0, 250, 25) walked backwards, next = previous element or -1.
    assert model.timesteps == tuple((t, t - 25 if t else -1) for t in range(225, -1, -25))
    assert model.num_steps == 10
    seen: list[float] = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].unique().item()))
    with torch.no_grad():
        model(_image(2, 32))
    hook.remove()
    assert seen == [225.0, 200.0, 175.0, 150.0, 125.0, 100.0, 75.0, 50.0, 25.0, 0.0]


def _noise(seed: int, shape, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_noising_at_250_then_ddim_telescopes_when_eps_is_zero():
    # Fresh U-Net: zero output conv -> eps = 0. With w = 0 and eta = 0 each step scales
    # x_t by sqrt(a_next / a_t), so x0 = x_250 / sqrt(a_225): checks both the noising
    # step (250) and the first denoising step (225) of the official loop.
    model = ddad_tiny(w=0.0, eta=0.0, seed=7)
    y = _image(1, 32)
    (n0,) = _noise(7, y.shape, 1)
    a250, a225 = model.alpha_bar(250), model.alpha_bar(225)
    x_250 = math.sqrt(a250) * y + math.sqrt(1 - a250) * n0
    with torch.no_grad():
        rec = model(y)["reconstruction"]
    torch.testing.assert_close(rec, x_250 / math.sqrt(a225), rtol=1e-5, atol=1e-5)


def test_one_conditioned_step_follows_the_paper_equations():
    w, eta = 2.0, 1.0
    model = ddad_tiny(w=w, eta=eta, seed=3)
    y = _image(1, 32)
    n0, z = _noise(3, y.shape, 2)  # step 0 draws the initial noise, then its z
    out = model.denoise_step({"image": y})
    a250, at, an = model.alpha_bar(250), model.alpha_bar(225), model.alpha_bar(200)
    x_t = math.sqrt(a250) * y + math.sqrt(1 - a250) * n0
    eps = torch.zeros_like(y)  # fresh U-Net predicts 0
    y_t = math.sqrt(at) * y + math.sqrt(1 - at) * eps
    eps_hat = eps - w * math.sqrt(1 - at) * (y_t - x_t)
    x0 = (x_t - math.sqrt(1 - at) * eps_hat) / math.sqrt(at)
    c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
    c2 = math.sqrt(1 - an - c1**2)
    expected = math.sqrt(an) * x0 + c1 * z + c2 * eps_hat
    torch.testing.assert_close(out["x_t"], expected, rtol=1e-5, atol=1e-5)
    assert out[STEP_KEY].item() == 1 and out[STEP_KEY].device.type == "cpu"
    assert "reconstruction" not in out


def test_step_counter_drives_the_denoiser_and_stops_after_ten():
    model = ddad_tiny()
    denoiser = model.components()[0]
    state = {"image": _image(1, 32)}
    for k in range(10):
        state.update(denoiser.run(state))
        assert int(state[STEP_KEY]) == k + 1
    assert torch.equal(state["reconstruction"], state["x_t"])
    with pytest.raises(RuntimeError, match="already ran all 10"):
        denoiser.run(state)


# ---------------------------------------------------------------------------------------
# Whole model


def test_tiny_forward_equals_run_components_and_is_deterministic():
    model = ddad_tiny()
    _randomize(model.unet)
    x = _image(2, 32)
    with torch.no_grad():
        out = model(x)
        again = model(x)
        state = run_components(model.components(), x)
        other_seed = DDAD(DDADConfig(**{**model.config.__dict__, "seed": 43})).eval()
        other_seed.load_state_dict(model.state_dict())
        other = other_seed(x)
    assert out["anomaly_map"].shape == (2, 1, 32, 32)
    assert out["pred_score"].shape == (2,)
    assert out["reconstruction"].shape == x.shape
    for k in ("anomaly_map", "pred_score", "reconstruction"):
        assert torch.equal(out[k], state[k])
        assert torch.equal(out[k], again[k])
    assert torch.isfinite(out["anomaly_map"]).all()
    assert not torch.allclose(out["reconstruction"], other["reconstruction"])  # noise is used
    torch.testing.assert_close(out["pred_score"], out["anomaly_map"].amax(dim=(1, 2, 3)))


def test_tiny_non_square_input():
    model = ddad_tiny()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 48) * 2 - 1)
    assert out["anomaly_map"].shape == (1, 1, 32, 48)


def test_anomaly_map_is_zero_for_perfect_reconstruction_and_peaks_at_a_defect():
    # v = 100: the pixel term dominates the (random-backbone) feature term.
    model = ddad_tiny(v=100.0)
    x = _image(1, 64)
    with torch.no_grad():
        same = model.anomaly_map({"image": x, "reconstruction": x.clone()})
        rec = x.clone()
        rec[:, :, 40:48, 8:16] = -x[:, :, 40:48, 8:16]  # a local "defect" in the reconstruction
        diff = model.anomaly_map({"image": x, "reconstruction": rec})
    assert same["anomaly_map"].abs().max() < 1e-5  # cosine of identical vectors: 1 up to rounding
    amap = diff["anomaly_map"][0, 0]
    r, c = divmod(int(amap.argmax()), amap.shape[1])
    assert 36 <= r < 52 and 4 <= c < 20
    assert diff["pred_score"].item() == pytest.approx(amap.max().item())


def test_gaussian_blur_matches_official_kernel_and_keeps_constants():
    model = ddad_tiny()
    blur = model.blur
    assert blur.radius == 16  # kernel_size = 2 * int(4 * 4 + 0.5) + 1 = 33
    k = blur.kernel.double()
    assert k.shape == (33,) and k.sum().item() == pytest.approx(1.0)
    assert k[0].item() / k[16].item() == pytest.approx(math.exp(-(16**2) / (2 * 4.0**2)), rel=1e-5)
    const = torch.full((1, 1, 20, 24), 3.0)
    torch.testing.assert_close(blur(const), const)


def test_components_and_backbone_truncation():
    model = ddad_tiny()
    parts = model.components()
    assert [p.name for p in parts] == ["denoiser", "feature_extractor"]
    assert parts[0].repeats == 10 and parts[0].module is model.unet
    assert parts[1].repeats == 1 and parts[1].module is model.backbone
    assert not hasattr(model.backbone, "layer4")  # unused stages hold no parameters
    keep = ddad_tiny(run_layer4=True)
    assert hasattr(keep.backbone, "layer4")
    with torch.no_grad():
        assert keep(_image(1, 32))["pred_score"].shape == (1,)


def test_registry_and_real_model_on_meta():
    assert {"ddad", "ddad_tiny"} <= set(list_models("ddad*"))
    with torch.device("meta"):
        model = create("ddad", image_size=(256, 320), backbone="wide_resnet50_2", attention="sdpa")
    assert isinstance(model, DDAD) and not model.training
    assert model.unet.config.attention == "sdpa"
    assert model.config.w == 2.0 and model.config.v == 1.0 and model.config.eta == 1.0
    assert model.backbone.channels["layer2"] == 512 and model.backbone.channels["layer3"] == 1024
    with pytest.raises(TypeError):
        ddad(image_size=256, not_a_field=1)


def test_model_modules_import_no_cli_or_plotting():
    code = (
        "import sys; import visionscale.nn.unet, visionscale.anomaly.ddad; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('typer', 'matplotlib', 'rich', 'click') "
        "or m.startswith('visionscale.cli')]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""EfficientAD and PDN: parameter counts, layer counts, shapes, size limits, map combination.

Full-size models are built on the ``meta`` device (shapes only, no memory, no compute).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionscale.anomaly.efficientad import (
    AutoEncoder,
    EfficientAD,
    EfficientADConfig,
    Resize,
    efficientad_m,
    efficientad_s,
    efficientad_tiny,
)
from visionscale.components import run_components
from visionscale.nn.pdn import pdn_medium, pdn_output_size, pdn_small


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conv(cin: int, cout: int, k: int) -> int:
    return k * k * cin * cout + cout  # weights + bias


def meta(factory, **kw) -> EfficientAD:
    with torch.device("meta"):
        return factory(**kw).eval()


def executed_leaves(module: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Leaf modules in the order they run (a module run twice is listed twice)."""
    seen: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: seen.append(mod))
        for m in module.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---------------------------------------------------------------- parameter counts


def test_pdn_s_parameter_counts_match_table_and_seed():
    body = conv(3, 128, 4) + conv(128, 256, 4) + conv(256, 256, 3)
    teacher, student = meta(pdn_small, out_channels=384), meta(pdn_small, out_channels=768)
    assert n_params(teacher) == body + conv(256, 384, 4) == 2_694_144
    # The seed's "student-teacher" count: the S student (it names its model EfficientAD-M).
    assert n_params(student) == body + conv(256, 768, 4) == 4_267_392


def test_pdn_m_parameter_counts_by_hand():
    body = conv(3, 256, 4) + conv(256, 512, 4) + conv(512, 512, 1) + conv(512, 512, 3)
    for out in (384, 768):
        expected = body + conv(512, out, 4) + conv(out, out, 1)
        assert n_params(meta(pdn_medium, out_channels=out)) == expected
    assert n_params(meta(pdn_medium, out_channels=384)) == 8_026_624
    assert n_params(meta(pdn_medium, out_channels=768)) == 11_615_488


def test_autoencoder_parameter_count_matches_seed():
    enc = conv(3, 32, 4) + conv(32, 32, 4) + conv(32, 64, 4) + 2 * conv(64, 64, 4) + conv(64, 64, 8)
    dec = 6 * conv(64, 64, 4) + conv(64, 64, 3) + conv(64, 384, 3)
    with torch.device("meta"):
        ae = AutoEncoder()
    assert n_params(ae) == enc + dec == 1_096_320


def test_model_parts_use_variant():
    s, m = meta(efficientad_s), meta(efficientad_m)
    assert n_params(s.student) == 4_267_392 and n_params(s.autoencoder) == 1_096_320
    assert n_params(m.teacher) == 8_026_624 and n_params(m.student) == 11_615_488
    assert n_params(m.autoencoder) == 1_096_320


# ---------------------------------------------------------------- layer counts


def test_autoencoder_runs_39_layers_at_256():
    # Seed: 39 layers incl. activation, dropout and upsampling layers.
    with torch.device("meta"):
        ae = AutoEncoder().eval()
        layers = executed_leaves(ae, torch.empty(1, 3, 256, 256))
    kinds = [type(m) for m in layers]
    assert len(layers) == 39
    assert kinds.count(nn.Conv2d) == 14
    assert kinds.count(nn.ReLU) == 12
    assert kinds.count(nn.Dropout) == 6
    assert kinds.count(Resize) == 7
    # The encoder ends with the latent conv (no ReLU), then the decoder starts with a resize.
    assert kinds[10] is nn.Conv2d and kinds[11] is Resize
    assert kinds[-1] is nn.Conv2d and kinds[-2] is nn.ReLU


def test_pdn_layer_counts():
    # Seed: student / teacher have "only 9 layers" (PDN-S: 4 conv, 3 ReLU, 2 pool).
    x = torch.empty(1, 3, 256, 256, device="meta")
    small = executed_leaves(meta(pdn_small), x)
    assert len(small) == 9
    assert [type(m) for m in small][-1] is nn.Conv2d  # no ReLU after the last conv
    medium = executed_leaves(meta(pdn_medium), x)
    assert [type(m) for m in medium].count(nn.Conv2d) == 6 and len(medium) == 13


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("factory", [efficientad_s, efficientad_m])
@pytest.mark.parametrize("padding, feat", [(True, (64, 96)), (False, (56, 88))])
def test_shapes_square_and_non_square(factory, padding, feat):
    model = meta(factory, padding=padding)
    for h, w in [(256, 256), (256, 384)]:
        x = torch.empty(2, 3, h, w, device="meta")
        state = run_components(model.components(), x)
        fh, fw = (feat[0], feat[0]) if w == 256 else feat
        assert state["teacher"].shape == (2, 384, fh, fw)
        assert state["student"].shape == (2, 768, fh, fw)
        assert state["autoencoder"].shape == (2, 384, fh, fw)
        assert state["anomaly_map"].shape == (2, 1, h, w)
        assert state["pred_score"].shape == (2,)


def test_unpadded_pdn_gives_56_at_256_padded_gives_64():
    x = torch.empty(1, 3, 256, 256, device="meta")
    assert meta(pdn_small, padding=False)(x).shape[-2:] == (56, 56)
    assert meta(pdn_medium, padding=False)(x).shape[-2:] == (56, 56)
    assert meta(pdn_small, padding=True)(x).shape[-2:] == (64, 64)
    assert pdn_output_size(256, 256, padding=False) == (56, 56)
    assert pdn_output_size(256, 256, padding=True) == (64, 64)


@pytest.mark.parametrize("padding", [True, False])
def test_output_size_arithmetic_matches_real_shapes(padding):
    nets = [meta(pdn_small, padding=padding), meta(pdn_medium, padding=padding)]
    for h, w in [(33, 40), (97, 61), (250, 301), (513, 1024)]:
        for net in nets:
            out = net(torch.empty(1, 3, h, w, device="meta")).shape[-2:]
            assert tuple(out) == net.output_size(h, w) == pdn_output_size(h, w, padding)


def test_decoder_sizes_follow_input_per_axis():
    ae = AutoEncoder(padding=True)
    assert ae.decoder_sizes(256, 256) == [(s, s) for s in (3, 8, 15, 32, 63, 127)] + [(64, 64)]
    assert ae.decoder_sizes(256, 384) == [
        (3, 5), (8, 12), (15, 23), (32, 48), (63, 95), (127, 191), (64, 96)
    ]
    assert AutoEncoder(padding=False).decoder_sizes(256, 256)[-1] == (56, 56)


# ---------------------------------------------------------------- input size limits


def test_minimum_input_sizes():
    assert meta(pdn_small, padding=False).min_input_size() == 33
    assert meta(pdn_medium, padding=False).min_input_size() == 33
    assert meta(pdn_small, padding=True).min_input_size() == 1
    with torch.device("meta"):
        assert AutoEncoder().min_input_size() == 256
    assert efficientad_tiny().autoencoder.min_input_size() == 64


def test_validate_input_size_messages():
    model = meta(efficientad_s)
    model.validate_input_size(256, 256)
    model.validate_input_size(256, 4000)
    with pytest.raises(ValueError, match=r"autoencoder needs height and width >= 256.*128x128"):
        model.validate_input_size(128, 128)
    with pytest.raises(ValueError, match="256x255"):
        model.validate_input_size(256, 255)
    with pytest.raises(ValueError, match="autoencoder"):
        model(torch.empty(1, 3, 128, 128, device="meta"))
    tiny = efficientad_tiny(padding=False)
    with pytest.raises(ValueError, match=r"PDN needs height and width >= 33.*32x64"):
        tiny.validate_input_size(32, 64)


# ---------------------------------------------------------------- forward semantics


def test_forward_equals_run_components_and_is_finite():
    torch.manual_seed(0)
    model = efficientad_tiny().eval()
    assert [c.name for c in model.components()] == ["teacher", "student", "autoencoder"]
    modules = [c.module for c in model.components()]
    assert modules == [model.teacher, model.student, model.autoencoder]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        state = run_components(model.components(), x)
    assert set(out) == {"anomaly_map", "pred_score"}
    assert out["anomaly_map"].shape == (2, 1, 64, 96)
    assert torch.equal(out["anomaly_map"], state["anomaly_map"])
    assert torch.equal(out["pred_score"], state["pred_score"])
    assert torch.isfinite(out["anomaly_map"]).all()
    assert torch.equal(out["pred_score"], out["anomaly_map"].flatten(1).max(dim=1).values)


@pytest.mark.parametrize("padding", [True, False])
def test_map_combination_by_hand(padding):
    torch.manual_seed(1)
    model = efficientad_tiny(padding=padding).eval()
    c = model.config.out_channels
    model.teacher_mean.normal_()
    model.teacher_std.uniform_(0.5, 2.0)
    model.q_st_start.fill_(0.3)
    model.q_st_end.fill_(2.0)
    model.q_ae_start.fill_(0.1)
    model.q_ae_end.fill_(0.7)
    x = torch.randn(1, 3, 80, 72)
    with torch.no_grad():
        t = (model.teacher(x) - model.teacher_mean) / model.teacher_std
        s = model.student(x)
        ae = model.autoencoder(x)
        st = ((t - s[:, :c]) ** 2).mean(1, keepdim=True)
        sae = ((ae - s[:, c:]) ** 2).mean(1, keepdim=True)
        combined = 0.5 * 0.1 * (st - 0.3) / 1.7 + 0.5 * 0.1 * (sae - 0.1) / 0.6
        if not padding:
            combined = F.pad(combined, (4, 4, 4, 4))
        expected = F.interpolate(combined, size=(80, 72), mode="bilinear", align_corners=False)
        out = model(x)
    assert t.shape[-2:] == ae.shape[-2:] == pdn_output_size(80, 72, padding)
    torch.testing.assert_close(out["anomaly_map"], expected)
    torch.testing.assert_close(out["pred_score"], expected.amax(dim=(1, 2, 3)))


def test_buffers_default_to_identity_normalisation():
    model = efficientad_tiny()
    assert torch.equal(model.teacher_mean, torch.zeros(1, 16, 1, 1))
    assert torch.equal(model.teacher_std, torch.ones(1, 16, 1, 1))
    assert (model.q_st_start, model.q_st_end, model.q_ae_start, model.q_ae_end) == (0, 1, 0, 1)
    names = {n for n, _ in model.named_buffers()}
    assert names >= {"teacher_mean", "teacher_std"}
    assert names >= {"q_st_start", "q_st_end", "q_ae_start", "q_ae_end"}


# ---------------------------------------------------------------- factories, registry, imports


def test_factories_registered_and_configurable():
    from visionscale import registry

    for name, fn in [("efficientad_s", efficientad_s), ("efficientad_m", efficientad_m),
                     ("efficientad_tiny", efficientad_tiny)]:
        assert registry._REGISTRY[name] is fn
    model = efficientad_tiny(image_size=(64, 128), padding=False, out_channels=8)
    assert model.config == EfficientADConfig(
        variant="s", out_channels=8, padding=False, pdn_channels=(8, 16),
        ae_base_channels=4, ae_latent_kernel=2, ae_dropout=0.2,
    )
    assert model.student.out_channels == 16 and model.autoencoder.head.out_channels == 8
    assert meta(efficientad_m, image_size=512).config.variant == "m"
    with pytest.raises(ValueError, match="unknown PDN variant"):
        EfficientAD(EfficientADConfig(variant="x"))  # type: ignore[arg-type]


def test_model_module_imports_no_cli_or_plotting():
    code = (
        "import sys, visionscale.anomaly.efficientad, visionscale.nn.pdn\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'typer', 'rich')"
        " or m.startswith('visionscale.cli')]\n"
        "assert not bad, bad\n"
    )
    import os
    from pathlib import Path

    import visionscale

    src = str(Path(visionscale.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

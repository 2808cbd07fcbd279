"""Focal, balanced L1 and EAPM losses: reference formulas, limits, gradients, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from visionscale.detection.losses import (
    BalancedL1Loss,
    EAPMBalancedL1Loss,
    EAPMFocalLoss,
    SigmoidFocalLoss,
    balanced_l1_loss,
    cls_modulating_factor,
    eapm_balanced_l1_loss,
    eapm_focal_loss,
    gap_over_sum,
    reg_modulating_factor,
    sigmoid_focal_loss,
)

MODES = ("paper", "constant", "full")
B = math.exp(1.5 / 0.5) - 1  # balanced L1's b for alpha = 0.5, gamma = 1.5


def grad(fn, x):
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def ref_focal(x, t, alpha, gamma):
    """RetinaNet Eq. 5 written out on probabilities (float64)."""
    p = torch.sigmoid(x)
    p_t = torch.where(t == 1, p, 1 - p)
    a_t = torch.where(t == 1, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    return -a_t * (1 - p_t) ** gamma * torch.log(p_t)


def logits_and_labels(n=64, seed=0, scale=4.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 3, generator=g) * scale).to(dtype)
    t = (torch.rand(n, 3, generator=g) < 0.3).to(dtype)
    return x, t


# ----------------------------------------------------------------------------- focal loss
def test_focal_matches_the_paper_formula():
    x, t = logits_and_labels()
    torch.testing.assert_close(sigmoid_focal_loss(x, t, 0.25, 2.0), ref_focal(x, t, 0.25, 2.0))
    assert sigmoid_focal_loss(x, t, reduction="sum").item() == pytest.approx(ref_focal(x, t, 0.25, 2).sum().item())
    assert sigmoid_focal_loss(x, t, reduction="mean").item() == pytest.approx(ref_focal(x, t, 0.25, 2).mean().item())


def test_focal_hand_computed_values():
    x = torch.zeros(2, dtype=torch.float64)  # p = 0.5
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    # -alpha_t (1 - 0.5)^2 log 0.5
    assert loss.tolist() == pytest.approx([0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)])
    # p = sigmoid(2) for a positive, no alpha
    p = 1 / (1 + math.exp(-2))
    assert sigmoid_focal_loss(torch.tensor([2.0]), torch.tensor([1.0]), alpha=-1, gamma=2).item() == \
        pytest.approx(-(1 - p) ** 2 * math.log(p), rel=1e-6)


def test_focal_with_gamma_0_and_no_alpha_is_bce_including_gradients():
    x, t = logits_and_labels()
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=-1, gamma=0),
                               F.binary_cross_entropy_with_logits(x, t, reduction="none"))
    torch.testing.assert_close(grad(lambda z: sigmoid_focal_loss(z, t, alpha=-1, gamma=0), x),
                               grad(lambda z: F.binary_cross_entropy_with_logits(z, t, reduction="none"), x))


# ----------------------------------------------------------------------------- balanced L1
def test_balanced_l1_hand_computed_values():
    pred = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    zero = torch.zeros_like(pred)
    loss = balanced_l1_loss(pred, zero, alpha=0.5, gamma=1.5, beta=1.0)
    inlier = 0.5 / B * (B * 0.5 + 1) * math.log(B * 0.5 + 1) - 0.5 * 0.5
    assert loss.tolist() == pytest.approx([0.0, inlier, 1.5 + 1.5 / B - 0.5, 3.0 + 1.5 / B - 0.5])
    # Libra R-CNN Eq. 7: gradient alpha ln(b|x| + 1) for inliers, gamma for outliers
    d = torch.tensor([0.25, 0.5, 0.9, 1.5, 3.0], dtype=torch.float64)
    g = grad(lambda p: balanced_l1_loss(p, torch.zeros_like(d)), d)
    assert g.tolist() == pytest.approx([0.5 * math.log(B * d + 1) for d in (0.25, 0.5, 0.9)] + [1.5, 1.5])


@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_balanced_l1_is_continuous_at_beta_and_symmetric(beta):
    d = torch.tensor([beta - 1e-9, beta + 1e-9], dtype=torch.float64)
    v = balanced_l1_loss(d, torch.zeros_like(d), beta=beta)
    assert v[0].item() == pytest.approx(v[1].item(), abs=1e-7)
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    torch.testing.assert_close(balanced_l1_loss(x, torch.zeros_like(x), beta=beta),
                               balanced_l1_loss(-x, torch.zeros_like(x), beta=beta))


def test_identical_boxes_give_zero_loss_and_zero_gradient():
    t = torch.randn(8, 4, dtype=torch.float64)
    for fn in (lambda p: balanced_l1_loss(p, t), *(lambda p, m=m: eapm_balanced_l1_loss(p, t, mf_grad=m) for m in MODES),
               lambda p: eapm_balanced_l1_loss(p, t, xy="gos")):
        assert fn(t.clone()).abs().max().item() == 0
        assert grad(fn, t).abs().max().item() == 0


# ----------------------------------------------------------------------------- EAPM factors
def test_modulating_factor_ranges():
    dif = torch.linspace(0, 1, 101, dtype=torch.float64)
    for mu in (0.5, 1.0, 1.5, 2.0):
        mf = cls_modulating_factor(dif, mu)
        assert mf[0].item() == pytest.approx(1 + math.tanh(mu)) and mf[-1].item() == pytest.approx(1.0)
        assert (mf >= 1).all() and (mf <= 1 + math.tanh(mu)).all()
        assert (mf[1:] < mf[:-1]).all()  # harder examples are modulated less
        torch.testing.assert_close(reg_modulating_factor(dif, mu), mf)
    assert (cls_modulating_factor(dif, 0.0) == 1).all()


def test_gap_over_sum_range_and_values():
    t = torch.randn(1000, dtype=torch.float64) * 3
    s = torch.randn(1000, dtype=torch.float64) * 3
    gos = gap_over_sum(t, s)
    assert ((gos >= 0) & (gos <= 1)).all()
    assert gap_over_sum(torch.tensor([1.0]), torch.tensor([0.5])).item() == pytest.approx(0.5 / 1.5)
    assert gap_over_sum(torch.tensor([1.0]), torch.tensor([-1.0])).item() == pytest.approx(1.0)  # opposite signs
    assert gap_over_sum(torch.zeros(1), torch.zeros(1)).item() == 0.0  # 0/0 -> 0, not NaN


def test_modulated_prediction_stays_a_probability_and_the_error_grows():
    # Loss on p' is at least the loss on p (|p' - p*| = MF Dif >= Dif), and p' never leaves [0, 1]
    x, t = logits_and_labels(scale=3.0)
    for mu in (0.5, 1.5, 3.0):
        assert (eapm_focal_loss(x, t, mu=mu, eps=1e-12) >= sigmoid_focal_loss(x, t) - 1e-12).all()
    p = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for mu in (0.3, 1.0, 2.0, 5.0):
        p_mod = p * cls_modulating_factor(p, mu)  # p* = 0
        assert (p_mod >= 0).all() and (p_mod <= 1 + 1e-12).all()


# ----------------------------------------------------------------------------- EAPM limits
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mu_zero_is_plain_focal_values_and_gradients(mode, dtype):
    x, t = logits_and_labels(scale=3.0, dtype=dtype)  # |x| well inside the eps clamp
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else {}
    for mu in (0.0, 1e-7):
        torch.testing.assert_close(eapm_focal_loss(x, t, mu=mu, mf_grad=mode), sigmoid_focal_loss(x, t), **tol)
        torch.testing.assert_close(grad(lambda z, mu=mu: eapm_focal_loss(z, t, mu=mu, mf_grad=mode), x),
                                   grad(lambda z: sigmoid_focal_loss(z, t), x), **tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("xy", ["plain", "gos"])
def test_theta_zero_is_plain_balanced_l1_values_and_gradients(mode, xy):
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    for theta in (0.0, 1e-9):
        torch.testing.assert_close(eapm_balanced_l1_loss(p, t, theta=theta, mf_grad=mode, xy=xy, beta=0.11),
                                   balanced_l1_loss(p, t, beta=0.11))
        torch.testing.assert_close(grad(lambda z, th=theta: eapm_balanced_l1_loss(z, t, theta=th, mf_grad=mode, xy=xy), p),
                                   grad(lambda z: balanced_l1_loss(z, t), p))


# ----------------------------------------------------------------------------- EAPM values
def test_eapm_focal_hand_computed_value():
    # p = 0.5, p* = 1, mu = 1: Dif = 0.5, MF = 1 + tanh 1 - tanh 0.5, p' = 1 - MF * 0.5
    mf = 1 + math.tanh(1) - math.tanh(0.5)
    p_mod = 1 - mf * 0.5
    want = -((1 - p_mod) ** 2) * math.log(p_mod)
    got = eapm_focal_loss(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), mu=1.0, alpha=-1)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # a negative with p = 0.2, mu = 1.5, alpha = 0.25: p' = MF * 0.2
    mf = 1 + math.tanh(1.5) - math.tanh(1.5 * 0.2)
    p_mod = mf * 0.2
    want = -0.75 * p_mod**2 * math.log(1 - p_mod)
    x = torch.tensor([math.log(0.2 / 0.8)], dtype=torch.float64)
    assert eapm_focal_loss(x, torch.zeros(1, dtype=torch.float64), mu=1.5).item() == pytest.approx(want, rel=1e-9)


def test_eapm_balanced_l1_hand_computed_value():
    pred = torch.tensor([[0.3, -0.2, 1.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[0.1, -0.2, 0.5, 0.0]], dtype=torch.float64)
    mf = 1 + math.tanh(1.0) - math.tanh(0.5 / 1.5)  # GoS of t_w = 0.5 / 1.5
    bl1 = lambda d: 0.5 / B * (B * d + 1) * math.log(B * d + 1) - 0.5 * d  # noqa: E731  (beta = 1, d < 1)
    loss = eapm_balanced_l1_loss(pred, target, theta=1.0, beta=1.0)
    # t_x is not modulated (xy="plain"), t_y and t_h have zero error
    assert loss[0].tolist() == pytest.approx([bl1(0.2), 0.0, bl1(mf * 0.5), 0.0], rel=1e-9)
    mf_x = 1 + math.tanh(1.0) - math.tanh(0.2 / 0.4)
    assert eapm_balanced_l1_loss(pred, target, xy="gos")[0, 0].item() == pytest.approx(bl1(mf_x * 0.2), rel=1e-9)


def test_xy_plain_leaves_centre_offsets_alone():
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
    plain, eapm = balanced_l1_loss(p, t), eapm_balanced_l1_loss(p, t, theta=2.0)
    torch.testing.assert_close(eapm[:, :2], plain[:, :2])
    assert (eapm[:, 2:] >= plain[:, 2:] - 1e-12).all() and (eapm[:, 2:] > plain[:, 2:] + 1e-6).any()
    assert (eapm_balanced_l1_loss(p, t, theta=2.0, xy="gos")[:, :2] > plain[:, :2] + 1e-6).any()


# ----------------------------------------------------------------------------- EAPM gradients
def test_paper_mode_gradient_is_the_plain_gradient_at_the_modulated_point():
    x, t = logits_and_labels(scale=2.0)
    mu = 1.5
    p = torch.sigmoid(x)
    p_mod = t + cls_modulating_factor((p - t).abs(), mu) * (p - t)
    x_mod = torch.log(p_mod / (1 - p_mod))
    torch.testing.assert_close(grad(lambda z: eapm_focal_loss(z, t, mu=mu), x),
                               grad(lambda z: sigmoid_focal_loss(z, t), x_mod))
    # regression: dL/dt = L_b'(t' - t*); with MF detached the chain rule adds the factor MF
    g = torch.Generator().manual_seed(3)
    pr, tg = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
    mf = reg_modulating_factor(gap_over_sum(pr, tg), 1.0)
    mf[:, :2] = 1
    t_mod = tg + mf * (pr - tg)
    plain_at_mod = grad(lambda z: balanced_l1_loss(z, tg), t_mod)
    torch.testing.assert_close(grad(lambda z: eapm_balanced_l1_loss(z, tg, theta=1.0), pr), plain_at_mod)
    torch.testing.assert_close(grad(lambda z: eapm_balanced_l1_loss(z, tg, theta=1.0, mf_grad="constant"), pr),
                               mf * plain_at_mod)
    torch.testing.assert_close(grad(lambda z: eapm_balanced_l1_loss(z, tg, theta=1.0, detach_mf=True), pr),
                               mf * plain_at_mod)
    full = grad(lambda z: eapm_balanced_l1_loss(z, tg, theta=1.0, detach_mf=False), pr)
    assert not torch.allclose(full, mf * plain_at_mod)


def test_fig3_properties_hold_for_the_default_mode():
    from visionscale.detection.plots import focal_gradients

    e = torch.linspace(0.001, 0.999, 999, dtype=torch.float64).numpy()
    curves = focal_gradients(e)
    base = curves["focal"]
    mid = (e > 0.2) & (e < 0.6)
    for mu in ("mu=1", "mu=1.5", "mu=2"):
        g = curves[mu]
        assert (g[mid] > 1.3 * base[mid]).all()  # medium examples are up-weighted
        assert abs(g[e < 0.02] - base[e < 0.02]).max() < 1e-3  # easy: nearly unaffected
        assert (abs(g[e > 0.98] - base[e > 0.98]) / base[e > 0.98]).max() < 0.05  # very hard: nearly unaffected
    # the alternative "MF detached" inflates the very hard examples' gradients, unlike the paper's Fig. 3
    hard = focal_gradients(e, mus=(1.0,), mf_grad="constant")["mu=1"]
    assert (hard[(e > 0.85) & (e < 0.95)] > 1.4 * base[(e > 0.85) & (e < 0.95)]).all()


def test_fig4_properties_hold_for_the_default_mode():
    from visionscale.detection.plots import regression_gradients

    d = torch.linspace(0, 1.5, 301, dtype=torch.float64).numpy()
    curves = regression_gradients(d)
    bl1, sl1 = curves["balanced L1"], curves["smooth L1"]
    inl = (d > 0.01) & (d < 0.95)
    assert (bl1[inl] > sl1[inl]).all()  # balanced L1 raises inlier gradients over smooth L1
    for th in ("theta=1", "theta=1.5", "theta=2"):
        g = curves[th]
        assert (g[inl] > bl1[inl]).all()  # EAPM raises them further
        assert g.max() <= 1.5 + 1e-9  # gamma stays the upper bound of the gradient
        assert abs(g[d >= 1.0] - 1.5).max() < 1e-9  # outliers unchanged
    assert regression_gradients(d, thetas=(1.0,), mf_grad="constant")["theta=1"].max() > 1.6  # breaks the bound


# ----------------------------------------------------------------------------- bad and empty input
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_inputs_backpropagate(reduction):
    for fn, shape in ((sigmoid_focal_loss, (0, 3)), (eapm_focal_loss, (0, 3)), (balanced_l1_loss, (0, 4)),
                      (eapm_balanced_l1_loss, (0, 4))):
        pred = torch.zeros(shape, requires_grad=True)
        loss = fn(pred, torch.zeros(shape), reduction=reduction)
        assert loss.shape == (shape if reduction == "none" else ())
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert pred.grad is not None and pred.grad.shape == shape


def test_no_positives_still_trains_the_negatives():
    x = torch.randn(50, 1, requires_grad=True)
    loss = eapm_focal_loss(x, torch.zeros(50, 1), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_predictions_raise(bad):
    x = torch.zeros(4, 4)
    x[1, 2] = bad
    for fn in (sigmoid_focal_loss, eapm_focal_loss, balanced_l1_loss, eapm_balanced_l1_loss):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(x, torch.zeros(4, 4))


def test_mismatched_shapes_and_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        sigmoid_focal_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        eapm_balanced_l1_loss(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mu"):
        eapm_focal_loss(torch.zeros(2), torch.zeros(2), mu=-1)
    with pytest.raises(ValueError, match="mf_grad"):
        eapm_focal_loss(torch.zeros(2), torch.zeros(2), mf_grad="sometimes")
    with pytest.raises(ValueError, match="reduction"):
        balanced_l1_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        balanced_l1_loss(torch.zeros(2), torch.zeros(2), beta=0)


def test_extreme_logits_stay_finite():
    x = torch.tensor([-60.0, 60.0, -60.0, 60.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0])
    for mode in MODES:
        loss = eapm_focal_loss(x, t, mf_grad=mode)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    # very wrong predictions keep their (saturated) focal gradient in the paper's mode
    (g,) = torch.autograd.grad(eapm_focal_loss(x, t).sum(), x)
    assert g[0].item() == pytest.approx(-0.25, rel=1e-3) and g[1].item() == pytest.approx(0.75, rel=1e-3)


# ----------------------------------------------------------------------------- modules and mmdet plugin
def test_modules_match_functions():
    x, t = logits_and_labels()
    assert SigmoidFocalLoss()(x, t).item() == pytest.approx(sigmoid_focal_loss(x, t, reduction="mean").item())
    assert EAPMFocalLoss(mu=2.0, reduction="sum")(x, t).item() == pytest.approx(
        eapm_focal_loss(x, t, mu=2.0, reduction="sum").item())
    p, q = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert BalancedL1Loss(beta=0.11)(p, q).item() == pytest.approx(balanced_l1_loss(p, q, beta=0.11).mean().item())
    m = EAPMBalancedL1Loss(theta=1.5, detach_mf=True)
    assert m.mf_grad == "constant" and "theta=1.5" in repr(m)
    assert m(p, q).item() == pytest.approx(eapm_balanced_l1_loss(p, q, theta=1.5).mean().item())


def test_mmdet_style_wrappers_without_mmdet():
    from visionscale.integrations.mmdet import EAPMBalancedL1Loss as MMBox
    from visionscale.integrations.mmdet import EAPMFocalLoss as MMFocal

    g = torch.Generator().manual_seed(4)
    pred = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 3, 3, 1, 3])  # 3 = background
    onehot = F.one_hot(labels, 4)[:, :3].double()
    loss = MMFocal(mu=1.5)
    assert loss(pred, labels).item() == pytest.approx(loss(pred, onehot).item())
    assert loss(pred, labels, avg_factor=2.0).item() == pytest.approx(
        eapm_focal_loss(pred, onehot, mu=1.5).sum().item() / 2.0, rel=1e-6)
    w = torch.tensor([1.0, 0, 1, 1, 0, 1], dtype=torch.float64)
    assert loss(pred, labels, weight=w, reduction_override="sum").item() == pytest.approx(
        (eapm_focal_loss(pred, onehot, mu=1.5) * w[:, None]).sum().item())
    assert MMFocal(mu=0.0)(pred, labels, reduction_override="none").shape == (6, 3)
    with pytest.raises(ValueError):
        MMFocal(use_sigmoid=False)
    box = MMBox(theta=1.0, beta=0.11, loss_weight=2.0)
    p, t = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    assert box(p, t).item() == pytest.approx(2 * eapm_balanced_l1_loss(p, t, theta=1.0, beta=0.11).mean().item())
    empty = torch.zeros(0, 4, requires_grad=True)
    out = box(empty, torch.zeros(0, 4))
    out.backward()
    assert out.item() == 0 and empty.grad is not None


def test_mmdet_registry():
    pytest.importorskip("mmdet", reason="mmdetection is not installed; the plugin's registry test needs it")
    from mmdet.registry import MODELS

    import visionscale.integrations.mmdet as plugin

    assert plugin.REGISTERED
    assert MODELS.module_dict["EAPMFocalLoss"] is plugin.EAPMFocalLoss
    assert MODELS.module_dict["EAPMBalancedL1Loss"] is plugin.EAPMBalancedL1Loss
    # building from a config dict imports mmdet.models, which needs mmcv's compiled ops
    pytest.importorskip("mmcv.ops", reason="mmcv without compiled ops (mmcv-lite): cannot build mmdet models")
    focal = MODELS.build(dict(type="EAPMFocalLoss", mu=1.5))
    box = MODELS.build(dict(type="EAPMBalancedL1Loss", theta=1.0, beta=0.11))
    assert isinstance(focal, plugin.EAPMFocalLoss) and isinstance(box, plugin.EAPMBalancedL1Loss)


def test_mmdet_example_config_names_the_plugin():
    from pathlib import Path

    import visionscale.integrations.mmdet as plugin

    path = Path(__file__).resolve().parents[2] / "docs" / "eapm" / "mmdet_example_config.py"
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)  # the config is plain Python literals
    assert ns["custom_imports"]["imports"] == ["visionscale.integrations.mmdet"]
    head = ns["model"]["bbox_head"]
    cls_kw = {k: v for k, v in head["loss_cls"].items() if k not in ("type", "_delete_")}
    box_kw = {k: v for k, v in head["loss_bbox"].items() if k not in ("type", "_delete_")}
    getattr(plugin, head["loss_cls"]["type"])(**cls_kw)  # every key is a real constructor argument
    getattr(plugin, head["loss_bbox"]["type"])(**box_kw)

"""DDAD training: schedule and q_sample, DDPM loss, domain-adaptation loss, resume, errors."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from visionscale.anomaly.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    iter_batches,
    load_dataset,
    to_model_input,
)
from visionscale.anomaly.ddad import DDAD, ddad_tiny
from visionscale.anomaly.ddad_train import (
    CHECKPOINT_NAME,
    DDADTrainConfig,
    DDADTrainError,
    ddpm_loss,
    domain_adaptation_loss,
    fit_ddad,
    q_sample,
    to_signed,
)
from visionscale.anomaly.synthetic import make_category
from visionscale.registry import create

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _normalised(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """n random images in [0, 1], ImageNet-normalised like ``batch.images``."""
    g = torch.Generator().manual_seed(seed)
    x01 = torch.rand(n, 3, size, size, generator=g)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _batches(images: torch.Tensor, chunk: int = 3):
    """``train_batches``: an epoch-seeded order, in chunks unrelated to the trainer's batch."""

    def train_batches(epoch: int):
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), chunk):
            yield images[order[i : i + chunk]]

    return train_batches


def _cfg(**kw) -> DDADTrainConfig:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-3, "da_steps": 3, "da_batch_size": 4, "checkpoint_every": 2,
            "seed": 3}
    return DDADTrainConfig(**{**base, **kw})


def _model(**kw) -> DDAD:
    torch.manual_seed(0)
    return create("ddad_tiny", image_size=SIZE, **kw)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One uninterrupted tiny run: the reference for resume, reuse and the trained model."""
    model = _model()
    initial = _state(model)
    ckpt = tmp_path_factory.mktemp("run_a")
    calls: list[tuple[str, int, int]] = []
    history = fit_ddad(model, _batches(_normalised(10)), _cfg(), ckpt, progress=lambda *a: calls.append(a))
    return {"model": model, "initial": initial, "history": history, "ckpt": ckpt, "calls": calls}


# ---------------------------------------------------------------------------------------
# Config and input conversion


def test_defaults_are_the_official_config():
    c = DDADTrainConfig()
    assert (c.steps, c.epochs, c.batch_size, c.lr, c.weight_decay) == (None, 2000, 32, 3e-4, 0.05)
    assert (c.num_train_steps, c.beta_start, c.beta_end) == (1000, 1e-4, 0.02)
    assert (c.da_steps, c.da_epochs, c.da_batch_size, c.da_lr, c.da_lambda, c.w_da) == (None, 4, 16, 1e-4, 0.1, 3.0)
    assert (c.da_noise_step, c.da_skip, c.eta, c.seed) == (250, 25, 1.0, 42)
    assert c.da_layers == ("layer1", "layer2", "layer3") and c.da_batchnorm_train
    # The model's schedule (inference) is the same one.
    m = ddad_tiny().config
    assert (m.num_train_steps, m.beta_start, m.beta_end) == (c.num_train_steps, c.beta_start, c.beta_end)
    with pytest.raises(ValueError, match="even"):
        DDADTrainConfig(da_batch_size=5)
    with pytest.raises(ValueError, match="lr"):
        DDADTrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="da_layers"):
        DDADTrainConfig(da_layers=("layer9",))


def test_to_signed_inverts_the_data_normalisation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    x = to_model_input(img, SIZE)[None]  # exactly what iter_batches yields, (1, 3, H, W)
    expected = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    torch.testing.assert_close(to_signed(x), expected, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------
# Schedule, q_sample, DDPM loss


def test_schedule_and_q_sample_against_hand_computed_values():
    model = ddad_tiny()
    ac = model.alphas_cumprod.double()
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    assert ac[0].item() == pytest.approx(1 - b0, rel=1e-7)
    assert ac[1].item() == pytest.approx((1 - b0) * (1 - b1), rel=1e-7)
    a_last = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert ac[999].item() == pytest.approx(a_last, rel=1e-5)  # ~4.0e-5: almost pure noise
    x0 = torch.full((3, 1, 2, 2), 0.5)
    noise = torch.full((3, 1, 2, 2), -2.0)
    t = torch.tensor([0, 1, 999])
    out = q_sample(x0, t, noise, model.alphas_cumprod)
    for i, a in enumerate([1 - b0, (1 - b0) * (1 - b1), a_last]):
        assert out[i].flatten()[0].item() == pytest.approx(math.sqrt(a) * 0.5 - 2 * math.sqrt(1 - a), rel=1e-5)


def test_ddpm_loss_is_the_official_sum_over_pixels_mean_over_batch():
    model = ddad_tiny()  # zero-initialised output conv: the U-Net predicts exactly 0
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([5, 700])
    loss = ddpm_loss(model.unet, x0, t, noise, model.alphas_cumprod)
    assert loss.item() == pytest.approx(noise.square().sum().item() / 2, rel=1e-5)
    mse = ddpm_loss(model.unet, x0, t, noise, model.alphas_cumprod, reduction="mean")
    assert mse.item() == pytest.approx(noise.square().mean().item(), rel=1e-5)

    class Echo(torch.nn.Module):  # predicts its input: loss = ||noise - x_t||^2 by hand
        def forward(self, x, t):
            return x

    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    by_hand = (noise - (a.sqrt() * x0 + (1 - a).sqrt() * noise)).square().sum() / 2
    assert ddpm_loss(Echo(), x0, t, noise, model.alphas_cumprod).item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "brick"
    make_category(root, "brick", seed=0, size=SIZE, num_train=8, num_test_good=4, num_test_defect=1)
    return load_dataset(root)


def _eval_loss(model: DDAD, x0: torch.Tensor) -> float:
    # Fixed steps and noise: a deterministic measure of how well the U-Net predicts noise.
    g = torch.Generator().manual_seed(123)
    t = torch.tensor([50, 300, 600, 900] * (x0.shape[0] // 4 + 1))[: x0.shape[0]]
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return ddpm_loss(model.unet, x0, t, noise, model.alphas_cumprod).item()


def test_ddpm_training_lowers_the_loss_on_train_and_held_out_normal_images(demo, tmp_path):
    # Real data path: demo PNGs -> iter_batches (ImageNet-normalised) -> fit_ddad.
    def train_batches(epoch):
        for b in iter_batches(demo.train, SIZE, 3):
            yield b.images

    train = to_signed(torch.cat([b.images for b in iter_batches(demo.train, SIZE, 8)]))
    held_out = to_signed(torch.cat([b.images for b in iter_batches([s for s in demo.test if s.label == 0],
                                                                    SIZE, 8)]))
    model = _model()
    before = (_eval_loss(model, train), _eval_loss(model, held_out))
    hist = fit_ddad(model, train_batches, _cfg(steps=30, lr=2e-3, da_steps=0), tmp_path)
    after = (_eval_loss(model, train), _eval_loss(model, held_out))
    assert len(hist["loss"]) == 30 and hist["da_loss"] == []
    # Measured ratios after/before: 0.46-0.49 over three data seeds; 0.7 leaves room.
    assert after[0] < 0.7 * before[0]
    assert after[1] < 0.7 * before[1]  # learned noise prediction, not memorised images


# ---------------------------------------------------------------------------------------
# Domain adaptation loss


def test_domain_adaptation_loss_hand_values():
    e1 = {"layer1": torch.tensor([[[[1.0]], [[0.0]]]])}  # (1, 2, 1, 1)
    e2 = {"layer1": torch.tensor([[[[0.0]], [[1.0]]]])}
    neg = {"layer1": -e2["layer1"]}
    same = domain_adaptation_loss(e1, e1, e1, e1, lam=0.1)
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-7)
    orth = domain_adaptation_loss(e1, e2, e2, e1, lam=0.1)  # similarity 1, distance 0
    assert (orth["similarity"].item(), orth["distance"].item()) == pytest.approx((1.0, 0.0))
    flip = domain_adaptation_loss(e1, e2, neg, e1, lam=0.1)  # target vs its reference: cos = -1
    assert flip["loss"].item() == pytest.approx(1.0 + 0.1 * 2.0)


def test_domain_adaptation_loss_zero_when_adapted_equals_reference_positive_otherwise():
    model = ddad_tiny()
    adapted = model.backbone.eval()
    reference = copy.deepcopy(adapted).eval()
    x = to_signed(_normalised(2))
    layers = ("layer1", "layer2", "layer3")

    def loss(net):
        with torch.no_grad():
            f = net.features(x, layers)
            r = reference.features(x, layers)
        return domain_adaptation_loss(f, f, r, r, lam=0.1)  # x0 == y: only the distance term can act

    assert loss(adapted)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        adapted.layer2[0].conv1.weight.mul_(-1.5)
    changed = loss(adapted)
    assert changed["distance"].item() > 1e-3 and changed["similarity"].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------
# fit_ddad: trained model, resume, reuse, config checks


def test_fit_trains_both_stages_and_the_model_still_scores(run_a):
    model, h = run_a["model"], run_a["history"]
    assert len(h["loss"]) == 4 and len(h["da_loss"]) == 3 and h["images"] == 10
    assert all(math.isfinite(v) for v in h["loss"] + h["da_loss"]) and h["seconds"] > 0
    stages = [c[0] for c in run_a["calls"]]
    assert stages == ["ddpm"] * 4 + ["domain_adaptation"] * 3
    assert run_a["calls"][-1] == ("domain_adaptation", 3, 3)
    now = model.state_dict()
    changed = {k.split(".")[0] for k in now if not torch.equal(now[k], run_a["initial"][k])}
    assert changed == {"unet", "backbone"}
    assert not torch.equal(now["backbone.bn1.running_mean"], run_a["initial"]["backbone.bn1.running_mean"])
    assert not model.training and all(p.requires_grad for p in model.parameters())  # as before the fit
    x = to_signed(_normalised(2, seed=9))
    with torch.no_grad():
        out = model(x)
    assert out["anomaly_map"].shape == (2, 1, SIZE, SIZE) and out["pred_score"].shape == (2,)
    assert torch.isfinite(out["anomaly_map"]).all()
    assert (run_a["ckpt"] / CHECKPOINT_NAME).is_file()
    # The state dict is the whole trained model: a fresh one loaded with it scores the same.
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        again = fresh.eval()(x)
    assert torch.equal(again["anomaly_map"], out["anomaly_map"])


class _Stop(Exception):
    pass


def _stop_at(stage: str, step: int):
    def progress(s, done, total):
        if s == stage and done == step:
            raise _Stop

    return progress


def test_resume_after_interruption_equals_uninterrupted_run(run_a, tmp_path):
    data = _batches(_normalised(10))
    with pytest.raises(_Stop):  # killed after DDPM step 3 (last checkpoint: step 2)
        fit_ddad(_model(), data, _cfg(), tmp_path, progress=_stop_at("ddpm", 3))
    with pytest.raises(_Stop):  # killed after adaptation step 3 (last checkpoint: step 2)
        fit_ddad(_model(), data, _cfg(), tmp_path, progress=_stop_at("domain_adaptation", 3))
    model = _model()
    logs: list[str] = []
    h = fit_ddad(model, data, _cfg(), tmp_path, log=logs.append)
    assert h["resumed_from"] == {"stage": "da", "step": 2}
    assert any("resuming" in m for m in logs)
    _assert_same_state(_state(model), _state(run_a["model"]))
    assert h["loss"] == run_a["history"]["loss"] and h["da_loss"] == run_a["history"]["da_loss"]


def test_finished_checkpoint_is_loaded_without_training(run_a):
    model = _model()
    calls: list = []
    h = fit_ddad(model, _batches(_normalised(10)), replace(_cfg(), checkpoint_every=7), run_a["ckpt"],
                 progress=lambda *a: calls.append(a))  # checkpoint_every does not change the weights
    assert calls == []
    _assert_same_state(_state(model), _state(run_a["model"]))
    assert h["loss"] == run_a["history"]["loss"]


def test_different_config_refuses_to_resume(run_a):
    data = _batches(_normalised(10))
    with pytest.raises(DDADTrainError, match=r"different configuration.*lr: checkpoint 0.001 vs now 0.002"):
        fit_ddad(_model(), data, _cfg(lr=2e-3), run_a["ckpt"])
    with pytest.raises(DDADTrainError, match=r"model unet: checkpoint .*'dropout': 0.0.* vs now .*'dropout': 0.1"):
        fit_ddad(_model(dropout=0.1), data, _cfg(), run_a["ckpt"])
    # Inference-only settings (w, v, ...) do not change training: the finished run serves them.
    other_w = _model(w=3.0)
    fit_ddad(other_w, data, _cfg(), run_a["ckpt"])
    _assert_same_state(_state(other_w), _state(run_a["model"]))


def test_other_image_size_refuses_to_resume(tmp_path):
    with pytest.raises(_Stop):
        fit_ddad(_model(), _batches(_normalised(8)), _cfg(), tmp_path, progress=_stop_at("ddpm", 3))
    with pytest.raises(DDADTrainError, match="32x32.*40x40"):
        fit_ddad(_model(), _batches(_normalised(8, size=40)), _cfg(), tmp_path)


# ---------------------------------------------------------------------------------------
# Bad input


def test_nan_loss_names_the_step_and_suggests_a_lower_learning_rate(tmp_path):
    with pytest.raises(DDADTrainError, match=r"loss is (nan|inf) at step 2 .*lower the learning rate \(lr=1e\+30"):
        fit_ddad(_model(), _batches(_normalised(8)), _cfg(lr=1e30), tmp_path)


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"30x30 \(WxH\).*divisible by 4"):
        fit_ddad(_model(), _batches(_normalised(8, size=30)), _cfg(), tmp_path)
    mixed = lambda epoch: iter([_normalised(4), _normalised(4, size=36)])
    with pytest.raises(ValueError, match="36x36.*32x32"):
        fit_ddad(_model(), mixed, _cfg(), tmp_path)
    with pytest.raises(ValueError, match=r"gave 3 image\(s\), fewer than one batch of batch_size=4"):
        fit_ddad(_model(), _batches(_normalised(3)), _cfg(), tmp_path)
    with pytest.raises(ValueError, match=r"fewer than one batch of da_batch_size=6"):
        fit_ddad(_model(), _batches(_normalised(5)), _cfg(steps=1, da_batch_size=6), tmp_path / "da")
    with pytest.raises(ValueError, match="no images"):
        fit_ddad(_model(), lambda epoch: iter([]), _cfg(), tmp_path)
    with pytest.raises(TypeError, match="is a list"):
        fit_ddad(_model(), lambda epoch: iter([[1, 2]]), _cfg(), tmp_path)
    with pytest.raises(ValueError, match=r"shape \(4, 32, 32\)"):
        fit_ddad(_model(), lambda epoch: iter([torch.zeros(4, 32, 32)]), _cfg(), tmp_path)
    with pytest.raises(ValueError, match="schedule"):
        fit_ddad(_model(num_train_steps=500), _batches(_normalised(8)), _cfg(), tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # nothing was trained, nothing written


def test_cli_fit_predict_eval_ddad_tiny(tmp_path):
    """`ad fit --model ddad_tiny` trains through fit_ddad, then predict and eval read the run back."""
    import json

    import typer
    from typer.testing import CliRunner

    from visionscale.anomaly.synthetic import make_demo
    from visionscale.cli import ad

    make_demo(tmp_path / "demo", seed=0, size=32, categories=["brick"], num_train=16, num_test_good=2, num_test_defect=1)
    data = tmp_path / "demo" / "brick"
    app = typer.Typer()
    app.add_typer(ad.app, name="ad")
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["ad", "fit", "--model", "ddad_tiny", "--data", str(data), "--out", str(run),
                              "--image-size", "32", "--steps", "3", "--batch-size", "4", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.stderr
    fit = json.loads(res.stdout)
    assert fit["metrics"]["image_auroc"] is not None
    assert (run / "checkpoints" / "ddad_train.safetensors").is_file() and (run / "model.safetensors").is_file()
    folders = sorted(str(d) for d in (data / "test").iterdir())
    res = runner.invoke(app, ["ad", "predict", str(run), *folders, "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    preds = json.loads(res.stdout)
    assert len(preds) >= 3 and all(p["label"] in ("normal", "anomalous") for p in preds)
    res = runner.invoke(app, ["ad", "eval", str(run), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["num_images"] >= 3

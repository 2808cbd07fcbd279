"""EfficientAD training end to end (tiny model, 64 px demo data), its losses by hand, resume, DDAD dispatch."""

from __future__ import annotations

import json
import shutil
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from visionscale.anomaly import efficientad_train as E
from visionscale.anomaly import train as T
from visionscale.anomaly.runs import SignedInput, imagenet_to_signed
from visionscale.anomaly.data import DataError, iter_batches, load_dataset
from visionscale.anomaly.efficientad import efficientad_tiny
from visionscale.anomaly.predict import evaluate, load_run, predict
from ad_cli import ad_cli as _cli
from visionscale.io.weights import load_state_dict
from visionscale.nn.pdn import pdn_small

runner = CliRunner()
SIZE = 64
TINY = dict(model="efficientad_tiny", image_size=SIZE, steps=12, checkpoint_every=5, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")






@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    return T.fit(demo, run, T.FitConfig(**{**TINY, "steps": 20}))


# ----------------------------------------------------------------------------------------
# Losses, statistics, augmentation, map normalisation


def test_hard_feature_loss_keeps_only_the_top_fraction():
    teacher = torch.zeros(1, 10, 10, 10)
    student = torch.arange(1000.0).sqrt().view(1, 10, 10, 10).requires_grad_(True)  # D = 0, 1, ..., 999
    # 0.999-quantile of 0..999 = 998.001 (linear): only D = 999 is kept.
    kept = E.hard_feature_loss(teacher, student, 0.999, reduction="none")
    assert kept.numel() == 1 and kept.item() == pytest.approx(999.0, rel=1e-5)
    # 0.99-quantile = 989.01: the ten largest (990..999) are kept, mean 994.5.
    loss = E.hard_feature_loss(teacher, student, 0.99)
    assert loss.item() == pytest.approx(994.5, rel=1e-5)
    loss.backward()
    assert int((student.grad != 0).sum()) == 10 and student.grad.flatten()[:990].abs().max() == 0
    # On a random (1, 384, 64, 64) map q = 0.999 keeps 0.1 % of the elements.
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(1, 384, 64, 64, generator=g), torch.randn(1, 384, 64, 64, generator=g)
    n = t.numel()
    assert abs(E.hard_feature_loss(t, s, 0.999, reduction="none").numel() - 0.001 * n) <= 2


def test_quantile_matches_torch_and_hand_values():
    assert E.quantile(torch.arange(11.0), 0.95).item() == pytest.approx(9.5)
    assert E.quantile(torch.arange(1000.0), 0.9).item() == pytest.approx(899.1)
    assert E.quantile(torch.arange(1000.0), 0.995).item() == pytest.approx(994.005)
    x = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.1, 0.9, 0.995, 1.0):
        assert E.quantile(x, q).item() == pytest.approx(torch.quantile(x.flatten(), q).item(), abs=1e-6)


def test_teacher_channel_stats_are_mean_and_std_over_all_pixels():
    torch.manual_seed(0)
    pdn = pdn_small(out_channels=6, channels=(4, 8)).eval()
    batches = [torch.randn(2, 3, 40, 48), torch.randn(3, 3, 40, 48)]
    mean, std = E.teacher_channel_stats(pdn, batches)
    with torch.no_grad():
        out = torch.cat([pdn(b) for b in batches])  # (5, 6, h, w)
    flat = out.permute(1, 0, 2, 3).reshape(6, -1)
    torch.testing.assert_close(mean.flatten(), flat.mean(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.flatten(), flat.std(dim=1, unbiased=False), rtol=1e-4, atol=1e-6)


def test_ae_augmentation_is_one_colour_jitter_per_image():
    ds_like = torch.rand(4, 3, 16, 16) * 0.6 + 0.1  # [0.1, 0.7]: x 1.2 stays below 1 (no clipping)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = (ds_like - mean) / std
    a = E.augment_ae(x, torch.Generator().manual_seed(3))
    b = E.augment_ae(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    back = a * std + mean
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    # Factor 1 (no jitter) leaves every image as it was, whichever transform was drawn.
    torch.testing.assert_close(E.augment_ae(x, torch.Generator().manual_seed(3), jitter=0.0), x, atol=1e-5, rtol=0)
    # Brightness: the ratio to the original is one constant per image, in [0.8, 1.2].
    g = torch.Generator().manual_seed(0)
    kinds = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    out = E.augment_ae(x, g) * std + mean
    for i, k in enumerate(kinds):
        if k == 0:
            ratio = out[i] / ds_like[i]
            assert 0.8 <= ratio.mean() <= 1.2 and ratio.std() < 1e-4


def test_map_normalization_sets_the_quantiles_and_the_combined_map(demo):
    torch.manual_seed(0)
    model = efficientad_tiny().eval()
    ds = load_dataset(demo)
    (batch,) = list(iter_batches(ds.train[:4], SIZE, 4))
    with torch.no_grad():
        st, ae = E.raw_maps(model, batch.images)
    q = E.map_normalization(model, [batch.images[:2], batch.images[2:]])
    assert q["q_st_start"] == pytest.approx(torch.quantile(st.flatten(), 0.9).item(), rel=1e-5)
    assert q["q_st_end"] == pytest.approx(torch.quantile(st.flatten(), 0.995).item(), rel=1e-5)
    assert q["q_ae_start"] == pytest.approx(torch.quantile(ae.flatten(), 0.9).item(), rel=1e-5)
    assert q["q_ae_end"] == pytest.approx(torch.quantile(ae.flatten(), 0.995).item(), rel=1e-5)
    assert model.q_st_start.item() == pytest.approx(q["q_st_start"])
    # The inference graph maps q_a -> 0 and q_b -> 0.1 and averages the two maps.
    expect = 0.5 * 0.1 * (st - q["q_st_start"]) / (q["q_st_end"] - q["q_st_start"]) + \
        0.5 * 0.1 * (ae - q["q_ae_start"]) / (q["q_ae_end"] - q["q_ae_start"])
    with torch.no_grad():
        res = model(batch.images)
    up = torch.nn.functional.interpolate(expect, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(res["anomaly_map"], up, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res["pred_score"], up.amax(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6)


def test_learning_rate_decays_after_95_percent_of_the_steps():
    cfg = E.EfficientADTrainConfig(steps=100)
    assert E.lr_at(94, cfg) == pytest.approx(1e-4) and E.lr_at(95, cfg) == pytest.approx(1e-5)
    assert E.EfficientADTrainConfig().steps == 70_000 and E.EfficientADTrainConfig().batch_size == 1


# ----------------------------------------------------------------------------------------
# Fit, predict, eval


def test_fit_writes_a_complete_run_and_predicts(fitted, demo, tmp_path):
    run = fitted.run
    for name in ("config.json", "versions.json", "model.safetensors", "calibration.json", "metrics.json",
                 "state.json"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "efficientad" and cfg["steps"] == 20 and cfg["batch_size"] == 1
    assert cfg["random_weights"] == "teacher" and cfg["data"]["holdout_images"] == 1
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["weight_decay"] == 1e-5 and cfg["train"]["hard_quantile"] == 0.999
    state = fitted.state
    assert state["complete"] and state["stages"]["model"]["steps"] == 20
    saved = load_state_dict(run / "model.safetensors")
    assert not torch.allclose(saved["teacher_std"], torch.ones_like(saved["teacher_std"]))
    assert saved["q_st_end"] > saved["q_st_start"] and saved["q_ae_end"] > saved["q_ae_start"]
    q = state["stages"]["model"]["map_quantiles"]
    assert saved["q_ae_start"].item() == pytest.approx(q["q_ae_start"])
    # Training changed the student, not the teacher (seeded init: rebuild it to compare).
    torch.manual_seed(0)
    init = efficientad_tiny()
    torch.testing.assert_close(saved["teacher.0.weight"], init.teacher[0].weight.detach())
    assert not torch.allclose(saved["student.0.weight"], init.student[0].weight.detach())
    m = fitted.metrics
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= m[key] <= 1.0
    loaded = load_run(run, "cpu")
    images = sorted((demo / "test").rglob("*.png"))
    records, log = predict(loaded, images, tmp_path / "pred")
    assert len(records) == len(images) and not log.bad
    thr = fitted.calibration["image_threshold"]
    for r in records:
        assert r["label"] == ("anomalous" if r["score"] >= thr else "normal")
        assert (tmp_path / "pred" / r["heatmap"].rsplit("/", 1)[-1]).is_file()
    res = evaluate(loaded, demo, out_dir=tmp_path / "eval")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert getattr(res.metrics, key) == pytest.approx(m[key], abs=1e-6)
    again = []
    T.fit(demo, run, T.FitConfig(**{**TINY, "steps": 20}), log=again.append)
    assert any("nothing to do" in a for a in again)


def test_interrupted_training_resumes_to_the_same_weights(demo, tmp_path):
    cfg = T.FitConfig(**TINY)
    full = T.fit(demo, tmp_path / "full", cfg)

    class Stop(Exception):
        pass

    def stop_at_8(stage, done, total):
        if stage == "train" and done == 8:
            raise Stop

    with pytest.raises(Stop):
        T.fit(demo, tmp_path / "cut", cfg, progress=stop_at_8)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "efficientad_train.pt", weights_only=True)
    assert ckpt["step"] == 5 and not (tmp_path / "cut" / "model.safetensors").exists()
    messages = []
    resumed = T.fit(demo, tmp_path / "cut", cfg, log=messages.append)
    assert any("resuming training at step 6 of 12" in m for m in messages)
    a = load_state_dict(tmp_path / "full" / "model.safetensors")
    b = load_state_dict(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.calibration["image_threshold"] == full.calibration["image_threshold"]
    with pytest.raises(T.FitError, match="different steps"):
        T.fit(demo, tmp_path / "cut", T.FitConfig(**{**TINY, "steps": 13}))


def test_non_square_input(demo, tmp_path):
    res = T.fit(demo, tmp_path / "run", T.FitConfig(**{**TINY, "image_size": (64, 96), "steps": 4}))
    run = load_run(res.run, "cpu")
    assert run.image_size == (64, 96)
    (batch,) = list(iter_batches(load_dataset(demo).test[:2], (64, 96), 2))
    with torch.no_grad():
        out = run.model(batch.images)
    assert out["anomaly_map"].shape == (2, 1, 64, 96) and out["pred_score"].shape == (2,)
    records, _ = predict(run, [demo / "test" / "good"], None, overlays=False)
    assert len(records) == 3


def test_too_small_input_is_refused_with_the_minimum(demo, tmp_path):
    with pytest.raises(T.FitError, match=r"48x48 is too small for efficientad_tiny.*>= 64"):
        T.fit(demo, tmp_path / "r", T.FitConfig(**{**TINY, "image_size": 48}))
    assert not (tmp_path / "r").exists()


def test_teacher_file_is_loaded_and_a_mismatched_one_is_refused(demo, tmp_path, fitted):
    torch.manual_seed(7)
    teacher = efficientad_tiny().teacher
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    msgs = []
    res = T.fit(demo, tmp_path / "run", T.FitConfig(**{**TINY, "steps": 2, "teacher": str(tmp_path / "teacher.pth")}),
                log=msgs.append)
    assert not any("RANDOM" in m for m in msgs)
    saved = load_state_dict(res.run / "model.safetensors")
    for k, v in teacher.state_dict().items():
        assert torch.equal(saved[f"teacher.{k}"], v), k
    assert json.loads((res.run / "config.json").read_text())["random_weights"] is None
    # A run's whole model.safetensors works too (keys under "teacher.").
    T.fit(demo, tmp_path / "run2", T.FitConfig(**{**TINY, "steps": 1,
                                                    "teacher": str(fitted.run / "model.safetensors")}))
    # Wrong architecture: a clear error, and no run folder left behind.
    torch.save(pdn_small(out_channels=8, channels=(8, 16)).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(T.FitError, match=r"wrong\.pth does not fit the efficientad_tiny teacher .*shape mismatches"):
        T.fit(demo, tmp_path / "bad", T.FitConfig(**{**TINY, "teacher": str(tmp_path / "wrong.pth")}))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(T.FitError, match="teacher weights file not found"):
        T.fit(demo, tmp_path / "bad", T.FitConfig(**{**TINY, "teacher": str(tmp_path / "none.pth")}))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(T.FitError, match=r"teacher .*junk\.pth"):
        T.fit(demo, tmp_path / "bad", T.FitConfig(**{**TINY, "teacher": str(tmp_path / "junk.pth")}))


def test_distilled_teacher_and_penalty_images(demo, tmp_path):
    generic = tmp_path / "generic"
    shutil.copytree(demo / "test", generic)  # any images will do as "ImageNet"
    cfg = T.FitConfig(**{**TINY, "steps": 3, "distill_teacher": True, "imagenet": str(generic),
                         "distill_steps": 3})
    with pytest.raises(T.FitError, match="no published weights.*allow_random_weights"):
        T.fit(demo, tmp_path / "run", cfg)
    msgs = []
    res = T.fit(demo, tmp_path / "run", T.FitConfig(**{**cfg.__dict__, "allow_random_weights": True}),
                log=msgs.append)
    assert any(m.startswith("running on RANDOM resnet_tiny weights for the teacher distillation") for m in msgs)
    st = res.state["stages"]
    assert st["distill"]["done"] and st["distill"]["steps"] == 3 and st["model"]["penalty"]
    distilled = load_state_dict(res.run / "teacher.safetensors")
    saved = load_state_dict(res.run / "model.safetensors")
    torch.manual_seed(0)
    init = efficientad_tiny().teacher.state_dict()
    for k, v in distilled.items():
        assert torch.equal(saved[f"teacher.{k}"], v)
    assert not torch.equal(distilled["0.weight"], init["0.weight"])  # the teacher was trained
    with pytest.raises(T.FitError, match="distill_teacher needs imagenet"):
        T.FitConfig(**{**TINY, "distill_teacher": True})
    with pytest.raises(DataError, match="imagenet folder not found"):
        T.fit(demo, tmp_path / "x", T.FitConfig(**{**TINY, "imagenet": str(tmp_path / "nope")}))


def test_cli_fit_predict_eval(demo, tmp_path):
    app = _cli()
    run = tmp_path / "run"
    res = runner.invoke(app, ["ad", "fit", "--model", "efficientad_tiny", "--data", str(demo.parent), "--category",
                              "brick", "--out", str(run), "--image-size", str(SIZE), "--steps", "4",
                              "--checkpoint-every", "2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.stderr
    assert "warning: running on a RANDOM EfficientAD teacher" in res.stderr
    out = json.loads(res.stdout)
    assert out["state"]["stages"]["model"]["steps"] == 4 and out["metrics"]["image_auroc"] is not None
    res = runner.invoke(app, ["ad", "predict", str(run), str(demo / "test" / "hole"), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    assert "RANDOM EfficientAD teacher" in res.stderr
    assert len(json.loads(res.stdout)) == 1
    res = runner.invoke(app, ["ad", "eval", str(run), "--data", str(demo), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["num_images"] == 7 and (run / "eval" / "pro.png").is_file()
    res = runner.invoke(app, ["ad", "fit", "--model", "efficientad_tiny", "--data", str(demo), "--out",
                              str(tmp_path / "r2"), "--image-size", "40"])
    assert res.exit_code == 2 and "too small" in res.stderr
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                              str(tmp_path / "r3"), "--teacher", "x.pth"])
    assert res.exit_code == 2 and "only apply to EfficientAD" in res.stderr and "(--teacher, --model)" in res.stderr


# ----------------------------------------------------------------------------------------
# Bad input


def test_bad_training_inputs(demo, tmp_path, monkeypatch):
    data = tmp_path / "cat"
    shutil.copytree(demo, data)
    victim = data / "train" / "good" / "003.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = T.FitConfig(**{**TINY, "steps": 2, "holdout_fraction": 0.2, "seed": 1})
    with pytest.raises(DataError, match=r"003\.png.*skip_bad"):
        T.fit(data, tmp_path / "r1", cfg)
    res = T.fit(data, tmp_path / "r2", T.FitConfig(**{**cfg.__dict__, "skip_bad": True}))
    assert [p for p, _ in res.state["bad_images"]] == [str(victim)]
    assert res.state["stages"]["model"]["train_images"] == 7  # 10 - 2 held out - 1 unreadable
    victim.unlink()

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(E, "hard_feature_loss", oom)
    with pytest.raises(T.FitError, match=r"out of memory during training.*batch_size \(now 1\).*image_size "
                                         r"\(now 64x64\).*steps \(now 2\)"):
        T.fit(data, tmp_path / "r3", cfg)
    monkeypatch.undo()
    shutil.rmtree(data / "train" / "good")
    (data / "train" / "good").mkdir()
    with pytest.raises(DataError, match="training folder is empty"):
        T.fit(data, tmp_path / "r4", cfg)


# ----------------------------------------------------------------------------------------
# DDAD goes through the same run folder via visionscale.anomaly.ddad_train


def test_ddad_without_its_trainer_says_not_implemented(demo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "visionscale.anomaly.ddad_train", None)  # import fails as if absent
    with pytest.raises(T.FitError, match="ddad_tiny is not implemented yet"):
        T.fit(demo, tmp_path / "r", T.FitConfig(model="ddad_tiny", image_size=32, device="cpu"))
    assert not (tmp_path / "r").exists()


def test_ddad_dispatch_writes_a_run_that_predicts(demo, tmp_path, monkeypatch):
    calls = {}

    @dataclass(frozen=True)
    class DDADTrainConfig:
        steps: int = 1000
        batch_size: int = 4
        seed: int = 0

    def fit_ddad(model, train_batches, cfg, checkpoint_dir, progress=None, log=None):
        # Stands in for the real trainer: a few plain steps so the weights change.
        calls["cfg"], calls["dir"] = cfg, checkpoint_dir
        epochs = [list(train_batches(e)) for e in range(2)]
        calls["shapes"] = [tuple(b.shape) for b in epochs[0]]
        calls["orders_differ"] = not all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[1]))
        with torch.no_grad():
            next(model.unet.parameters()).add_(0.5)
        if progress:
            progress("train", cfg.steps, cfg.steps)
        return {"loss": [1.0, 0.5]}

    fake = types.ModuleType("visionscale.anomaly.ddad_train")
    fake.DDADTrainConfig, fake.fit_ddad = DDADTrainConfig, fit_ddad
    monkeypatch.setitem(sys.modules, "visionscale.anomaly.ddad_train", fake)
    res = T.fit(demo, tmp_path / "run", T.FitConfig(model="ddad_tiny", image_size=32, steps=3, device="cpu"))
    assert calls["cfg"] == DDADTrainConfig(steps=3, batch_size=4, seed=0)
    assert calls["dir"] == tmp_path / "run" / "checkpoints"
    assert calls["shapes"] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)] and calls["orders_differ"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == "ddad" and cfg["batch_size"] == 4 and cfg["steps"] == 3
    assert res.metrics["image_auroc"] is not None and res.state["stages"]["model"]["final_loss"] == 0.5
    run = load_run(res.run, "cpu")
    assert isinstance(run.model, SignedInput)
    records, _ = predict(run, [demo / "test" / "hole"], None, overlays=False)
    assert len(records) == 1 and records[0]["label"] in ("anomalous", "normal")
    # The wrapper feeds DDAD [-1, 1] images: ImageNet-normalised mid-gray is 0 there.
    gray = (torch.full((1, 3, 2, 2), 0.5) - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / \
        torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet_to_signed(gray), torch.zeros(1, 3, 2, 2), atol=1e-6, rtol=0)

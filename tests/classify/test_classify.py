"""Classifier: demo data, augmentation, metrics, transfer learning, resume, and the
`visionscale classify` commands on toy-sized data (resnet_tiny, 32 px, 2 epochs)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from visionscale.classify.checkpoint import CheckpointError, load_classifier
from visionscale.classify.data import (
    AugmentConfig,
    DataError,
    affine_theta,
    apply_theta,
    augment_batch,
    scan_image_folder,
    split_samples,
)
from visionscale.classify.demo import DEMO_CLASSES, make_demo
from visionscale.classify.metrics import classification_report, confusion_matrix
from visionscale.classify.model import Classifier, ClassifierConfig
from visionscale.classify.train import TrainConfig, TrainError, train
from visionscale.cli.classify import app as classify_app
from visionscale.components import run_components
from visionscale.errors import OutputExistsError
from visionscale.registry import create

runner = CliRunner()
TOY = ["--backbone", "resnet_tiny", "--image-size", "32", "--batch-size", "8", "--device", "cpu"]


def _app():
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.add_typer(classify_app, name="classify")
    return app


def cli(*args):
    return runner.invoke(_app(), ["classify", *map(str, args)])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "textures"
    info = make_demo(root, train_per_class=6, test_per_class=3, size=32, seed=0)
    assert info["train"] == {c: 6 for c in DEMO_CLASSES}
    return root


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """One CLI training run shared by the predict / eval / inspect tests."""
    out = tmp_path_factory.mktemp("run") / "run"
    res = cli("train", demo / "train", "--out", out, *TOY, "--epochs", "2", "--rotation", "15", "--zoom", "0.1",
              "--shift", "0.1", "--shear", "5", "--hflip")
    assert res.exit_code == 0, res.output
    return out, res


# ---------------------------------------------------------------- demo data and folders


def test_demo_layout_sizes_and_disjoint_regions(demo):
    for split, n in (("train", 6), ("test", 3)):
        for cls in DEMO_CLASSES:
            files = sorted((demo / split / cls).glob("*.png"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.size == (32, 32) and im.mode == "L"
    assert "CC0" in (demo / "README.md").read_text()
    # Same seed, same pictures; a different seed, different ones.
    again = make_demo(demo.parent / "again", train_per_class=6, test_per_class=3, size=32, seed=0)
    a = np.asarray(Image.open(demo / "train" / "brick" / "brick_000.png"))
    b = np.asarray(Image.open(demo.parent / "again" / "train" / "brick" / "brick_000.png"))
    assert again["size"] == 32 and np.array_equal(a, b)
    mine = demo.parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="notes.txt"):  # a folder of the user's is never written into
        make_demo(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_make_demo_cli(tmp_path):
    res = cli("make-demo", tmp_path / "d", "--train-per-class", "3", "--test-per-class", "1", "--size", "24")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "d" / "train").rglob("*.png"))) == 9
    assert len(list((tmp_path / "d" / "test").rglob("*.png"))) == 3
    (tmp_path / "d" / "notes.txt").write_text("x")
    res = cli("make-demo", tmp_path / "d")
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "notes.txt" in res.stderr
    assert not list(tmp_path.glob(".d.*"))  # no temporary folder left behind


def _write(folder, name, size=20, value=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if value is None else np.full((size, size, 3), value, np.uint8)
    Image.fromarray(a).save(folder / name)


def test_scan_and_split(tmp_path):
    for c, n in (("a", 5), ("b", 10)):
        for i in range(n):
            _write(tmp_path / c, f"{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    s = scan_image_folder(tmp_path)
    assert s.classes == ["a", "b"] and s.counts() == {"a": 5, "b": 10}
    tr, va = split_samples(s, 0.2, seed=3)
    assert va.counts() == {"a": 1, "b": 2} and tr.counts() == {"a": 4, "b": 8}
    assert not set(tr.paths) & set(va.paths)
    tr2, va2 = split_samples(s, 0.2, seed=3)
    assert va2.paths == va.paths  # seeded
    assert split_samples(s, 0.2, seed=4)[1].paths != va.paths
    # Evaluating with a model's class list: labels index into it, a subset is fine.
    sub = scan_image_folder(tmp_path, classes=["z", "b", "a"], min_classes=1)
    assert sub.classes == ["z", "b", "a"] and set(sub.labels) == {1, 2}


@pytest.mark.parametrize("layout, message", [
    ({"a": 2, "b": 0}, "class folder .*b has no images"),
    ({"a": 3}, "need at least 2 classes.*found 1"),
    ({}, "no class folders"),
])
def test_bad_layouts(tmp_path, layout, message):
    for c, n in layout.items():
        (tmp_path / c).mkdir()
        for i in range(n):
            _write(tmp_path / c, f"{i}.png")
    with pytest.raises(DataError, match=message):
        scan_image_folder(tmp_path)


def test_split_folder_hint_and_loose_images(tmp_path, demo):
    with pytest.raises(DataError, match="folder of splits"):
        scan_image_folder(demo)  # train/ and test/ look like classes without images
    _write(tmp_path, "loose.png")
    with pytest.raises(DataError, match="1 images lie directly in it"):
        scan_image_folder(tmp_path)
    for i in range(3):
        _write(tmp_path / "a", f"{i}.png")
    _write(tmp_path / "b", "only.png")
    with pytest.raises(DataError, match="class 'b' has 1 image"):
        split_samples(scan_image_folder(tmp_path), 0.3, 0)


# ---------------------------------------------------------------- augmentation


def _theta(h, w, **kw):
    base = dict(rotation=0.0, zoom=1.0, shift_x=0.0, shift_y=0.0, shear=0.0, flip_x=False, flip_y=False)
    base.update(kw)
    return affine_theta(h, w, **{k: torch.tensor([v]) for k, v in base.items()})


def test_affine_identity_flip_rotation_and_shift_are_exact():
    x = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(1, 2, 6, 8)
    torch.testing.assert_close(_theta(6, 8), torch.tensor([[[1.0, 0, 0], [0, 1, 0]]]))
    torch.testing.assert_close(apply_theta(x, _theta(6, 8)), x)
    torch.testing.assert_close(apply_theta(x, _theta(6, 8, flip_x=True)), x.flip(-1))
    torch.testing.assert_close(apply_theta(x, _theta(6, 8, flip_y=True)), x.flip(-2))
    # Shift by a quarter of the width = 2 px to the right; the border repeats.
    shifted = apply_theta(x, _theta(6, 8, shift_x=0.25))
    torch.testing.assert_close(shifted[..., 2:], x[..., :-2])
    torch.testing.assert_close(shifted[..., 0], x[..., 0])
    # 90 degrees counter-clockwise (as displayed): the top-right corner goes to the top-left.
    sq = torch.zeros(1, 1, 4, 4)
    sq[0, 0, 0, 3] = 1.0
    rot = apply_theta(sq, _theta(4, 4, rotation=90.0), fill="zeros")
    assert rot[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5) and rot.sum() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(rot, torch.rot90(sq, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_affine_zoom_and_shear_matrices_by_hand():
    # Zoom 2 (magnify): each output pixel samples half as far from the centre.
    torch.testing.assert_close(_theta(8, 8, zoom=2.0)[0, :, :2], torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    # Horizontal shear by 45 degrees: x_out = x_in + y_in, so x_in = x_out - y_out.
    torch.testing.assert_close(_theta(8, 8, shear=45.0)[0, :, :2], torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    # On a 2:1 image the same shear in normalised coordinates is scaled by h / w.
    torch.testing.assert_close(_theta(4, 8, shear=45.0)[0, :, :2], torch.tensor([[1.0, -0.5], [0.0, 1.0]]))
    # On a linear ramp v = 4 * row + col, bilinear sampling is exact: output pixel i reads
    # input coordinate (i - 1.5) / 2 + 1.5 (about the centre 1.5, half the distance).
    big = apply_theta(torch.arange(16.0).reshape(1, 1, 4, 4), _theta(4, 4, zoom=2.0))
    src = (torch.arange(4.0) - 1.5) / 2 + 1.5
    torch.testing.assert_close(big[0, 0], 4 * src[:, None] + src[None, :])


def test_random_augmentation_is_seeded_and_stays_in_range():
    x = torch.rand(4, 3, 16, 16) * 255
    cfg = AugmentConfig(rotation=30, zoom=0.2, shift=0.1, shear=10, hflip=True, vflip=True)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    # Bilinear sampling with border fill only mixes existing pixels.
    assert a.min() >= x.min() - 1e-3 and a.max() <= x.max() + 1e-3
    off = AugmentConfig()
    assert not off.active and augment_batch(x, off) is x
    with pytest.raises(ValueError, match="rotation"):
        AugmentConfig(rotation=-5)
    with pytest.raises(ValueError, match="fill"):
        AugmentConfig(fill="wrap")


# ---------------------------------------------------------------- metrics


def test_metrics_on_the_seed_confusion_matrix():
    # Seed 004's malaria test set: [[191, 71], [46, 192]] -> accuracy 0.766.
    cm = np.array([[191, 71], [46, 192]])
    y_true = np.repeat([0, 0, 1, 1], cm.ravel())
    y_pred = np.repeat([0, 1, 0, 1], cm.ravel())
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 2), cm)
    r = classification_report(y_true, y_pred, ["yes", "no"])
    assert r["accuracy"] == pytest.approx(0.766)
    assert r["per_class"]["yes"]["precision"] == pytest.approx(191 / 237)
    assert r["per_class"]["yes"]["recall"] == pytest.approx(191 / 262)
    assert r["per_class"]["no"]["recall"] == pytest.approx(192 / 238)
    p, q = 191 / 237, 191 / 262
    assert r["per_class"]["yes"]["f1"] == pytest.approx(2 * p * q / (p + q))
    assert r["per_class"]["no"]["support"] == 238 and r["n"] == 500


def test_metrics_undefined_precision_and_bad_labels():
    r = classification_report([0, 1, 1], [1, 1, 1], ["a", "b", "c"])
    assert r["per_class"]["a"]["precision"] is None and r["per_class"]["a"]["recall"] == 0.0
    assert r["per_class"]["c"]["recall"] is None  # no true images of c
    assert r["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert r["macro_recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels must be in"):
        confusion_matrix([0, 3], [0, 1], 3)


# ---------------------------------------------------------------- model


def test_classifier_components_match_forward_and_channels_are_checked():
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig("resnet_tiny", ("a", "b", "c"), image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(run_components(model.components(), x)["logits"], logits)
    assert [c.name for c in model.components()][-2:] == ["head", "classifier"]
    with pytest.raises(ValueError, match="images have 1 channels but the resnet_tiny backbone expects 3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="cannot be a classifier backbone"):
        Classifier(ClassifierConfig("efficientad_tiny", ("a", "b")))
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassifierConfig("resnet_tiny", ("a",))


def test_freeze_keeps_backbone_and_its_batchnorm_statistics():
    model = Classifier(ClassifierConfig("resnet_tiny", ("a", "b"), image_size=32))
    model.freeze_backbone(True)
    model.train()
    assert not any(m.training for m in model.backbone.modules()) and model.head.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    model.freeze_backbone(False, train_from="layer3")
    model.train()
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert trainable == {"layer3", "layer4"} and model.backbone.layer4.training and not model.backbone.layer1.training
    with pytest.raises(ValueError, match="unknown backbone stage 'layer7'"):
        model.freeze_backbone(False, train_from="layer7")


def test_batches_cover_every_image_once_and_never_one_alone():
    from visionscale.classify.train import _batches

    for n, bs in ((7, 3), (10, 3), (9, 3), (2, 8), (13, 4)):
        chunks = _batches(n, bs, torch.Generator().manual_seed(n))
        assert sorted(torch.cat(chunks).tolist()) == list(range(n)), (n, bs)
        assert all(len(c) > 1 for c in chunks) and all(len(c) <= bs + 1 for c in chunks)


def test_precise_bn_sets_exact_training_set_statistics():
    from visionscale.classify.train import _precise_bn

    torch.manual_seed(0)
    model = Classifier(ClassifierConfig("resnet_tiny", ("a", "b"), image_size=32)).train()
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    _precise_bn(model, images, model.config, torch.device("cpu"), batch_size=3)
    from visionscale.classify.data import normalize

    with torch.no_grad():
        z = model.backbone.conv1(normalize(images, model.config.mean, model.config.std))  # (7, 8, 16, 16)
    bn = model.backbone.bn1
    # Batches of 3, 4 (the last image is folded in): the cumulative average weights batches
    # equally, so compare with the mean of the per-batch means.
    expected = (z[:3].mean((0, 2, 3)) + z[3:].mean((0, 2, 3))) / 2
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_model_module_is_pure():
    code = ("import sys, visionscale.classify.model; "
            "bad = [m for m in sys.modules if m.startswith(('typer', 'matplotlib', 'rich', 'visionscale.cli', "
            "'visionscale.classify.train', 'visionscale.study', 'PIL'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---------------------------------------------------------------- training, prediction, evaluation


def test_cli_train_writes_checkpoints_metrics_and_plots(trained):
    out, res = trained
    for name in ("model.safetensors", "last.safetensors", "config.json", "history.json", "history.csv",
                 "metrics_val.json", "curves.png", "confusion_val.png", "augmentations.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["classes"] == list(DEMO_CLASSES) and cfg["model"]["backbone"] == "resnet_tiny"
    assert cfg["train"]["augment"]["rotation"] == 15 and cfg["result"]["phases"] == ["full"]
    assert cfg["data"]["val_counts"] == {c: 1 for c in DEMO_CLASSES}  # 20% of 6, seeded split
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(math.isfinite(h["val_loss"]) for h in history)
    best = min(history, key=lambda h: h["val_loss"])
    assert cfg["result"]["best_epoch"] == best["epoch"]
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert metrics["n"] == 3 and sum(map(sum, metrics["confusion_matrix"])) == 3
    assert "epoch   2 [full]" in res.stderr  # per-epoch progress goes to stderr
    model = load_classifier(out)
    assert model.config.classes == DEMO_CLASSES and model.config.image_size == 32
    with Image.open(out / "augmentations.png") as im:  # 3 classes x (original + 5 variants) at 64 px
        assert im.size == (6 * 64 + 7 * 2, 3 * 64 + 4 * 2)


def test_cli_eval_and_predict_agree(trained, demo, tmp_path):
    out, _ = trained
    res = cli("eval", out, demo / "test", "--out", tmp_path / "ev", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 9 and report["accuracy"] == pytest.approx(np.trace(cm) / 9)
    assert set(report["per_class"]) == set(DEMO_CLASSES)
    for name in ("metrics.json", "predictions.csv", "confusion.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0
    res = cli("predict", out / "model.safetensors", demo / "test", "--top-k", "2", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)
    assert len(preds) == 9
    for p in preds:
        assert len(p["top"]) == 2 and p["top"][0][1] >= p["top"][1][1] and p["label"] == p["top"][0][0]
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()[1:]
    by_path = {r.split(",")[0]: r.split(",")[2] for r in rows}
    assert {p["path"]: p["label"] for p in preds} == by_path
    predicted = np.array([DEMO_CLASSES.index(p["label"]) for p in preds])
    true = np.array([DEMO_CLASSES.index(p["path"].split("/")[-2]) for p in preds])
    np.testing.assert_array_equal(confusion_matrix(true, predicted, 3), cm)
    res = cli("predict", out, demo / "test" / "brick" / "brick_000.png", "--out", tmp_path / "p.csv")
    assert res.exit_code == 0 and "brick_000.png" in (tmp_path / "p.csv").read_text()


def test_eval_and_bench_task_metric_through_onnxruntime(trained, demo):
    """`classify eval --backend onnxruntime` and `bench CKPT --data`: the accuracy of the exported
    model, with the provider that ran it, equals eager FP32's."""
    from visionscale.cli.main import app as main_app

    out, _ = trained
    res = cli("eval", out, demo / "test", "--device", "cpu", "--json")
    eager = json.loads(res.stdout)
    assert eager["runtime"] == {"backend": "eager", "precision": "fp32", "device": "cpu"}
    res = cli("eval", out, demo / "test", "--device", "cpu", "--backend", "onnxruntime", "--json")
    assert res.exit_code == 0, res.output
    ort = json.loads(res.stdout)
    assert ort["runtime"]["provider"] == "CPUExecutionProvider" and ort["runtime"]["backend"] == "onnxruntime"
    assert ort["confusion_matrix"] == eager["confusion_matrix"] and ort["loss"] == pytest.approx(eager["loss"], abs=1e-4)

    res = runner.invoke(main_app, ["bench", str(out), "--data", str(demo / "test"), "--backend", "eager,onnxruntime",
                                   "--batch", "4", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    task = [t for t in json.loads(res.stdout)["task"] if t.get("kind") == "classification_accuracy"]
    assert [t["backend"] for t in task] == ["eager", "onnxruntime"]
    assert task[0]["value"] == pytest.approx(eager["accuracy"]) and task[1]["delta"] == pytest.approx(0.0)
    res = runner.invoke(main_app, ["bench", str(out), "--data", str(demo / "nowhere"), "--device", "cpu"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_inspect_a_trained_classifier(trained, tmp_path):
    from visionscale.cli.inspect import inspect_cmd

    out, _ = trained
    app = typer.Typer(add_completion=False)
    app.command("inspect")(inspect_cmd)
    app.command("noop")(lambda: None)
    res = runner.invoke(app, ["inspect", str(out), "--out", str(tmp_path / "i"), "--layer", "backbone.layer2", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["input_shape"] == [1, 3, 32, 32] and summary["feature_shape"] == [16, 4, 4]
    assert summary["components"][-1] == "classifier" and summary["filters_layer"] == "backbone.conv1"


def _toy_cfg(**kw):
    base = dict(backbone="resnet_tiny", image_size=32, batch_size=8, epochs=2, device="cpu", seed=0,
                augment=AugmentConfig(rotation=10, hflip=True), dropout=0.2)
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after, min_delta", [(1, 0.0), (2, 1e9)])
def test_resume_reproduces_an_uninterrupted_run(demo, tmp_path, stop_after, min_delta):
    # A frozen "pretrained" backbone for 2 epochs, then 1 epoch of fine-tuning: stopping
    # after epoch 1 resumes mid-phase (optimiser state), after epoch 2 between phases
    # (fine-tuning must start from the best epoch, epoch 1 when min_delta rules out 2).
    pre = tmp_path / "pre.safetensors"
    torch.manual_seed(5)
    save_file(create("resnet_tiny", num_classes=0).state_dict(), str(pre))
    cfg = _toy_cfg(weights=str(pre), finetune_epochs=1, finetune_lr=1e-3, min_delta=min_delta, patience=3)
    full = train(demo / "train", tmp_path / "full", cfg)
    assert [h["phase"] for h in full.history] == ["frozen", "frozen", "finetune"]

    def stop(row):
        if row["epoch"] == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(demo / "train", tmp_path / "cut", cfg, on_epoch=stop)
    resumed = train(demo / "train", tmp_path / "cut", cfg, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_loss"] for h in full.history] == [h["val_loss"] for h in resumed.history]


def test_frozen_backbone_stays_pretrained(demo, tmp_path):
    pre = tmp_path / "pre.safetensors"
    backbone = create("resnet_tiny", num_classes=0).state_dict()
    save_file(backbone, str(pre))
    result = train(demo / "train", tmp_path / "run", _toy_cfg(weights=str(pre), epochs=1, dropout=0.0))
    assert result.history[0]["phase"] == "frozen"
    trained_state = load_classifier(tmp_path / "run").state_dict()
    for k, v in backbone.items():  # weights and BatchNorm running statistics untouched
        assert torch.equal(trained_state[f"backbone.{k}"], v), k
    head = Classifier(ClassifierConfig("resnet_tiny", DEMO_CLASSES, image_size=32))
    assert trained_state["head.weight"].shape == head.head.weight.shape


def test_early_stopping_and_run_protection(demo, tmp_path):
    # min_delta so large that nothing after the first epoch counts as better.
    cfg = _toy_cfg(epochs=10, patience=2, min_delta=1e9, augment=AugmentConfig())
    result = train(demo / "train", tmp_path / "run", cfg)
    assert len(result.history) == 3 and result.best_epoch == 1
    with pytest.raises(TrainError, match="already holds a training run"):
        train(demo / "train", tmp_path / "run", cfg)
    with pytest.raises(TrainError, match="lr: 0.001 \\(saved\\) vs 0.01"):
        train(demo / "train", tmp_path / "run", TrainConfig(**{**cfg.__dict__, "lr": 0.01}), resume=True)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(demo / "train", tmp_path / "other", cfg, resume=True)
    with pytest.raises(TrainError, match="fine-tuning follows a frozen first phase"):
        _toy_cfg(finetune_epochs=2)


def _bad_data(tmp_path, kind):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(3):
            _write(root / c, f"{i}.png")
    if kind == "empty_class":
        (root / "c").mkdir()
    elif kind == "single_class":
        for f in (root / "b").iterdir():
            f.unlink()
        (root / "b").rmdir()
    elif kind == "unreadable":
        (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


@pytest.mark.parametrize("kind, message", [
    ("empty_class", "class folder .*c has no images"),
    ("single_class", "need at least 2 classes to train a classifier, found 1 \\(a\\)"),
    ("unreadable", "cannot read image .*1.png"),
])
def test_cli_train_bad_data_writes_nothing(tmp_path, kind, message):
    import re

    out = tmp_path / "run"
    res = cli("train", _bad_data(tmp_path, kind), "--out", out, *TOY, "--epochs", "1")
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and re.search(message, res.stderr), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--backbone", "nope"], "unknown model 'nope'"),
    (["--backbone", "efficientad_tiny"], "cannot be a classifier backbone"),
    (["--weights", "IMAGENET1K_V1"], "unknown weights"),
    (["--rotation", "400"], "augmentation rotation must be <= 180"),
    (["--epochs", "0"], "epochs must be >= 1"),
])
def test_cli_train_bad_settings(demo, tmp_path, args, message):
    res = cli("train", demo / "train", "--out", tmp_path / "run", *TOY, *args)
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (tmp_path / "run").exists()


def test_cli_eval_and_predict_bad_input(trained, tmp_path):
    out, _ = trained
    data = tmp_path / "data"
    _write(data / "brick", "0.png")
    _write(data / "marble", "0.png")
    res = cli("eval", out, data)
    assert res.exit_code == 2 and "marble" in res.stderr and "not classes of the model" in res.stderr
    res = cli("predict", out, tmp_path / "missing.png")
    assert res.exit_code == 2 and "input not found" in res.stderr
    res = cli("predict", tmp_path / "nowhere", data)
    assert res.exit_code == 2 and "checkpoint not found" in res.stderr
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="not a visionscale classifier checkpoint"):
        load_classifier(plain)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    res = cli("predict", out, bad)
    assert res.exit_code == 2 and "bad.png" in res.stderr


def test_cli_predict_through_onnx_runtime_matches_eager(trained, demo):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out, _ = trained
    base = ["predict", out / "model.safetensors", demo / "test", "--json", "--device", "cpu"]
    eager = json.loads(cli(*base).stdout)
    res = cli(*base, "--backend", "onnxruntime")
    assert res.exit_code == 0, res.output
    ort = json.loads(res.stdout)
    assert [p["label"] for p in ort] == [p["label"] for p in eager]
    assert [p["probability"] for p in ort] == pytest.approx([p["probability"] for p in eager], abs=1e-4)
    res = cli(*base, "--backend", "tflite")
    assert res.exit_code == 2 and "backend must be one of" in res.stderr

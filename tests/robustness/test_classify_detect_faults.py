"""Classifier and detector commands against faults and bad input: folders the user owns, busy run
folders, edited checkpoints, huge images, invalid ground truth, out-of-range numbers, absent devices.

Every failure must be one line ``error: ...`` with exit status 2, and must leave the user's files
as they were. Models are the tiny ones (resnet_tiny, ssd_tiny) on 32-64 px images.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import corpus
from visionscale.cli.main import app
from visionscale.io.outputs import RunLock

runner = CliRunner()
TOY = ["--backbone", "resnet_tiny", "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--epochs", "1"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------- shared tiny data and models


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    from visionscale.classify.demo import make_demo

    root = tmp_path_factory.mktemp("cls") / "textures"
    make_demo(root, train_per_class=3, test_per_class=1, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An untrained 2-class resnet_tiny checkpoint at 32 px (what predict needs, without training)."""
    from visionscale.classify.checkpoint import save_classifier
    from visionscale.classify.model import Classifier, ClassifierConfig

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_classifier(Classifier(ClassifierConfig("resnet_tiny", ("a", "b"), image_size=32)), folder / "model.safetensors")
    corpus.good_png(folder, "img.png", size=40)
    return folder / "model.safetensors", folder / "img.png"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from visionscale.detection.demo import DemoConfig, make_demo

    root = tmp_path_factory.mktemp("det") / "faces"
    make_demo(root, DemoConfig(n_train=4, n_val=2, size=64, min_side=8, seed=1))
    return root


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """An untrained ssd_tiny checkpoint (one class, 64 px) in the format `detect train` writes."""
    from visionscale.detection.train import TrainConfig, build_model, save_checkpoint

    path = tmp_path_factory.mktemp("detckpt") / "model.safetensors"
    cfg = TrainConfig(train_ann="unused.json", image_size=64)
    torch.manual_seed(0)
    save_checkpoint(path, build_model("ssd_tiny", 1), None,
                    {"config": asdict(cfg), "epoch": 1, "class_names": ["face"], "category_ids": [1], "history": {}})
    return path


# ---------------------------------------------------------------- 1. outputs the user owns, busy run folders


def test_classify_train_refuses_a_folder_with_files_it_did_not_write(textures, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    res = cli("classify", "train", textures / "train", "--out", out, *TOY)
    one_line_error(res, str(out), "config.json")
    assert (out / "config.json").read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # not even a lock file left
    res = cli("classify", "train", textures / "train", "--out", out, *TOY, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["format"] == "visionscale.classify.run/1"


class _Interrupt(Exception):
    pass


def test_classify_train_reruns_and_resumes_its_own_run(textures, tmp_path):
    from visionscale.classify.train import TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig(backbone="resnet_tiny", image_size=32, batch_size=8, epochs=2, device="cpu")

    def stop(row):
        raise _Interrupt

    with pytest.raises(_Interrupt):  # interrupted after epoch 1 of 2
        train(textures / "train", out, cfg, on_epoch=stop)
    one_line_error(cli("classify", "train", textures / "train", "--out", out, *TOY), "already holds a training run")
    # Resuming our own interrupted run is allowed; it continues after epoch 1.
    res = cli("classify", "train", textures / "train", "--out", out, *TOY[:-1], "2", "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["epochs_run"] == 2
    # Replacing it needs the overwrite flag; a file the user added beside it survives that.
    (out / "notes.txt").write_text("mine")
    one_line_error(cli("classify", "train", textures / "train", "--out", out, *TOY), "notes.txt")
    res = cli("classify", "train", textures / "train", "--out", out, *TOY, "--overwrite", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["epochs_run"] == 1, res.output
    assert (out / "notes.txt").read_text() == "mine"


def test_classify_train_into_a_folder_in_use(textures, tmp_path):
    out = tmp_path / "run"
    with RunLock(out, what="run folder"):
        res = cli("classify", "train", textures / "train", "--out", out, *TOY)
        one_line_error(res, "in use")
        assert not (out / "model.safetensors").exists()


def test_detect_train_refuses_foreign_files_and_a_folder_in_use(faces, tmp_path):
    args = ["detect", "train", "--data", faces, "--epochs", "1", "--image-size", "64", "--batch-size", "4"]
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("mine")
    one_line_error(cli(*args, "--out", out), "metrics.json")
    assert (out / "metrics.json").read_text() == "mine"
    busy = tmp_path / "busy"
    with RunLock(busy, what="run folder"):
        one_line_error(cli(*args, "--out", busy), "in use")
    assert not (busy / "last.safetensors").exists()
    res = cli(*args, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["epochs_done"] == 1


@pytest.mark.parametrize("family, extra", [
    ("classify", ["--train-per-class", "2", "--test-per-class", "1", "--size", "32"]),
    ("detect", ["--train", "2", "--val", "1", "--size", "64"]),
])
def test_make_demo_refuses_a_folder_with_files_it_did_not_write(tmp_path, family, extra):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(cli(family, "make-demo", out, *extra), "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    res = cli(family, "make-demo", out, *extra, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    res = cli(family, "make-demo", out, *extra, "--seed", "3")  # our own earlier demo is replaced without asking
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        (["README.md", "test", "train"] if family == "classify" else ["images", "train.json", "val.json"])
    assert not list(tmp_path.glob(".data*"))  # no staging folder left behind


def test_detect_plot_eapm_and_compare_refuse_a_folder_with_files_they_did_not_write(faces, tmp_path):
    out = tmp_path / "figs"
    out.mkdir()
    (out / "fig3_eapm_focal_gradient.png").write_text("mine")
    one_line_error(cli("detect", "plot-eapm", "--out", out), "fig3_eapm_focal_gradient.png")
    assert (out / "fig3_eapm_focal_gradient.png").read_text() == "mine"
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    (cmp / "compare.md").write_text("mine")
    one_line_error(cli("detect", "compare", "--data", faces, "--epochs", "1", "--image-size", "64", "--out", cmp),
                   "compare.md")
    assert (cmp / "compare.md").read_text() == "mine"


def test_classify_eval_and_predict_outputs_never_replace_user_files(classifier, tmp_path):
    ckpt, img = classifier
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    corpus.good_png(data / "a", "x.png")
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "metrics.json").write_text("mine")
    one_line_error(cli("classify", "eval", ckpt, data, "--out", ev, "--device", "cpu"), "metrics.json")
    assert (ev / "metrics.json").read_text() == "mine"
    res = cli("classify", "eval", ckpt, data, "--out", ev, "--device", "cpu", "--overwrite")
    assert res.exit_code == 0, res.output
    csv_out = tmp_path / "preds.csv"
    csv_out.write_text("mine")
    one_line_error(cli("classify", "predict", ckpt, img, "--out", csv_out, "--device", "cpu"), "preds.csv")
    assert csv_out.read_text() == "mine"
    one_line_error(cli("classify", "predict", ckpt, img, "--out", img, "--device", "cpu", "--overwrite"), "input")
    res = cli("classify", "predict", ckpt, img, "--out", csv_out, "--device", "cpu", "--overwrite")
    assert res.exit_code == 0 and csv_out.read_text().startswith("path,label"), res.output


# ---------------------------------------------------------------- 2. edited checkpoints


def _edit_header(src, dst, **changes):
    """Copy a classifier checkpoint with fields of the config in its header changed (None: removed)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    meta["config"] = json.dumps(cfg)  # allows NaN, as an edited file may hold it
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("changes, field", [
    ({"std": [0.0, 0.2, 0.2]}, "std"),
    ({"std": [-0.2, 0.2, 0.2]}, "std"),
    ({"std": [0.2, 0.2]}, "std"),
    ({"mean": [float("nan"), 0.5, 0.5]}, "mean"),
    ({"mean": ["0.5", 0.5, 0.5]}, "mean"),
    ({"classes": [1, 2]}, "classes"),
    ({"classes": "ab"}, "classes"),
    ({"classes": ["a"]}, "classes"),
    ({"image_size": 0}, "image_size"),
    ({"image_size": 32.5}, "image_size"),
    ({"image_size": "32"}, "image_size"),
    ({"dropout": float("inf")}, "dropout"),
    ({"backbone": None}, "backbone"),
])
def test_classify_predict_rejects_an_edited_checkpoint(classifier, tmp_path, changes, field):
    ckpt, img = classifier
    bad = _edit_header(ckpt, tmp_path / "model.safetensors", **changes)
    one_line_error(cli("classify", "predict", bad, img, "--device", "cpu"), str(bad), field)


def test_inspect_names_the_field_of_an_edited_checkpoint(classifier, tmp_path):
    """Not "not a classifier checkpoint": the file says it is one, so the damaged field is named."""
    ckpt, _ = classifier
    bad = _edit_header(ckpt, tmp_path / "model.safetensors", std=[0.2, 0.0, 0.2])
    one_line_error(cli("inspect", bad, "--out", tmp_path / "o"), str(bad), "std[1]")
    assert not (tmp_path / "o").exists()


def test_classify_predict_rejects_an_edited_config_json(classifier, tmp_path):
    """A checkpoint whose header has no config is read with the config.json beside it."""
    ckpt, img = classifier
    bad = _edit_header(ckpt, tmp_path / "model.safetensors")
    with safe_open(str(bad), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta.pop("config"))
    save_file(load_file(str(bad)), str(bad), metadata=meta)
    (tmp_path / "config.json").write_text(json.dumps({"model": {**cfg, "std": [0, 0, 0]}}))
    one_line_error(cli("classify", "predict", tmp_path, img, "--device", "cpu"), "config.json", "std")
    (tmp_path / "config.json").write_text("{truncated")
    one_line_error(cli("classify", "predict", tmp_path, img, "--device", "cpu"), "config.json")


def test_detect_eval_rejects_an_edited_checkpoint(detector, faces, tmp_path):
    from visionscale.detection.train import read_checkpoint, save_checkpoint, build_model

    _, meta = read_checkpoint(detector)
    model = build_model("ssd_tiny", 1)
    for edit, field in ((lambda m: m["config"].pop("model"), "model"),
                        (lambda m: m["config"].__setitem__("image_size", -3), "image_size"),
                        (lambda m: m.__setitem__("class_names", "face"), "class_names"),
                        (lambda m: m.__setitem__("class_names", ["face", "cat"]), "class_names")):
        m = json.loads(json.dumps(meta))
        edit(m)
        bad = tmp_path / "edited.safetensors"
        save_checkpoint(bad, model, None, m)
        one_line_error(cli("detect", "eval", bad, "--data", faces), str(bad), field)


# ---------------------------------------------------------------- 3. huge images in bounded memory


def test_classify_predict_reads_a_huge_png_in_bounded_memory(classifier, tmp_path):
    """An 8000 x 8000 PNG of a few hundred KB: decoding it to float RGB at full size needs
    8000^2 x 3 x 4 B = 768 MB (plus the 8-bit copies, ~1.2 GB in all). Resized while still 8-bit
    and single-channel it needs the 64 MB of the decoded grey image. The bound is 400 MB above the
    peak the same process reached predicting a small image: generous, and far below the old 1.2 GB."""
    ckpt, small = classifier
    huge = corpus.huge_png(tmp_path, side=8000)
    code = textwrap.dedent(f"""
        import json, resource, sys
        from visionscale.classify.train import predict
        predict({str(ckpt)!r}, [{str(small)!r}], device="cpu")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        preds = predict({str(ckpt)!r}, [{str(huge)!r}], device="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"before_kb": before, "after_kb": after, "label": preds[0]["label"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    grown_mb = (r["after_kb"] - r["before_kb"]) / 1024  # ru_maxrss is in KiB on Linux
    assert r["label"] in ("a", "b")
    assert grown_mb < 400, f"peak memory grew by {grown_mb:.0f} MB reading an 8000 px image"


# ---------------------------------------------------------------- 4. invalid ground truth in detect eval


def _bad_gt(folder):
    """Two real 64 px images; one good box and one of each kind of invalid entry."""
    (folder / "images").mkdir(parents=True)
    for i in (1, 2):
        corpus.good_png(folder / "images", f"{i}.png", size=64, seed=i)
    doc = {
        "images": [{"id": i, "file_name": f"images/{i}.png", "width": 64, "height": 64} for i in (1, 2)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 10, -5, 20]},  # negative width
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [float("nan"), 10, 5, 5]},
            {"id": 4, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]},  # no such image
            {"id": 5, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5]},  # no such category
        ],
        "categories": [{"id": 1, "name": "face"}],
    }
    (folder / "val.json").write_text(json.dumps(doc))  # NaN written as the bare token NaN
    return folder


def test_detect_eval_reports_invalid_ground_truth(detector, faces, tmp_path):
    data = _bad_gt(tmp_path / "gt")
    res = cli("detect", "eval", detector, "--data", data, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["skipped_annotations"] == 4 and "AP" in result
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 4, res.stderr
    for aid, what in ((2, "size"), (3, "finite"), (4, "image_id 77"), (5, "category_id 9")):
        assert any(f"annotation id {aid}" in w and what in w and "val.json" in w for w in warnings), (aid, warnings)
    one_line_error(cli("detect", "eval", detector, "--data", data, "--strict"), "val.json", "annotation id 2")
    # Clean ground truth: no warning, nothing skipped.
    res = cli("detect", "eval", detector, "--data", faces, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["skipped_annotations"] == 0, res.output
    assert "warning:" not in res.stderr


# ---------------------------------------------------------------- 5. numeric options


@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "lr"),
    (["--lr", "-0.1"], "lr"),
    (["--finetune-lr", "inf"], "finetune_lr"),
    (["--weight-decay", "-1"], "weight_decay"),
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "0"], "batch_size"),
    (["--patience", "-2"], "patience"),
    (["--image-size", "4"], "image_size"),
    (["--image-size", "100000"], "image_size"),
    (["--val-fraction", "1.5"], "val_fraction"),
    (["--val-fraction", "nan"], "val_fraction"),
    (["--dropout", "1"], "dropout"),
    (["--zoom", "nan"], "zoom"),
    (["--seed", "-1"], "seed"),
])
def test_classify_train_numeric_options(textures, tmp_path, args, needle):
    res = cli("classify", "train", textures / "train", "--out", tmp_path / "run", *TOY, *args)
    one_line_error(res, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, args, needle", [
    ("predict", ["--top-k", "0"], "top_k"),
    ("predict", ["--top-k", "-3"], "top_k"),
    ("predict", ["--batch-size", "0"], "batch_size"),
    ("eval", ["--batch-size", "-1"], "batch_size"),
])
def test_classify_predict_and_eval_numeric_options(classifier, tmp_path, command, args, needle):
    ckpt, img = classifier
    target = img if command == "predict" else img.parent
    one_line_error(cli("classify", command, ckpt, target, "--device", "cpu", *args), needle)


@pytest.mark.parametrize("args, needle", [
    (["--train-per-class", "0"], "train_per_class"),
    (["--size", "100000"], "size"),
    (["--seed", "-4"], "seed"),
])
def test_classify_make_demo_numeric_options(tmp_path, args, needle):
    one_line_error(cli("classify", "make-demo", tmp_path / "d", *args), needle)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "lr"),
    (["--lr", "0"], "lr"),
    (["--mu", "inf"], "mu"),
    (["--theta", "nan"], "theta"),
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "-1"], "batch_size"),
    (["--image-size", "16"], "image_size"),
    (["--image-size", "100000"], "image_size"),
    (["--eval-every", "-1"], "eval_every"),
    (["--seed", "-1"], "seed"),
])
def test_detect_train_numeric_options(faces, tmp_path, args, needle):
    res = cli("detect", "train", "--data", faces, "--out", tmp_path / "run", *args)
    one_line_error(res, needle)
    assert not (tmp_path / "run").exists()


def test_detect_train_library_checks_every_number():
    from visionscale.detection.train import TrainConfig
    from visionscale.errors import InvalidValueError

    for name, value in (("focal_alpha", 1.5), ("focal_gamma", float("nan")), ("bl1_beta", 0.0),
                        ("pos_iou", float("inf")), ("weight_decay", -1.0), ("warmup_steps", -1)):
        with pytest.raises(InvalidValueError, match=name):
            TrainConfig(train_ann="x.json", **{name: value})


@pytest.mark.parametrize("args, needle", [
    (["--train", "0"], "n_train"),
    (["--size", "8"], "size"),
    (["--size", "3000"], "size"),  # a demo of 9 Mpx images is a typo (bounded so a regression cannot exhaust RAM)
    (["--seed", "-1"], "seed"),
])
def test_detect_make_demo_numeric_options(tmp_path, args, needle):
    one_line_error(cli("detect", "make-demo", tmp_path / "d", "--train", "1", "--val", "1", *args), needle)
    assert not (tmp_path / "d").exists()


def test_detect_eval_numeric_options(detector, faces):
    one_line_error(cli("detect", "eval", detector, "--data", faces, "--batch-size", "0"), "batch_size")


# ---------------------------------------------------------------- 6. devices this machine does not have


DEVICES = ["tpu", "cuda:99", "gpu0"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])


@pytest.mark.parametrize("device", DEVICES)
def test_every_classify_and_detect_command_rejects_a_missing_device(textures, classifier, detector, faces,
                                                                   tmp_path, device):
    ckpt, img = classifier
    calls = [
        ("classify", "train", textures / "train", "--out", tmp_path / "run", "--backbone", "resnet_tiny",
         "--image-size", "32", "--epochs", "1", "--device", device),
        ("classify", "predict", ckpt, img, "--device", device),
        ("classify", "eval", ckpt, img.parent, "--device", device),
        ("detect", "eval", detector, "--data", faces, "--device", device),
    ]
    for call in calls:
        one_line_error(cli(*call), repr(device))
    assert not (tmp_path / "run").exists()

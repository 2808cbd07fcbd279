"""LFW file formats, verification metrics, the 10-fold protocol, and eval-lfw on a generated tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from visionscale.cli._common import CLIGroup
from visionscale.face.lfw import (
    LFWError,
    Pair,
    evaluate_lfw,
    image_path,
    make_synthetic_lfw,
    parse_pairs,
    parse_people,
    resolve_image_root,
    write_lfw_outputs,
    write_pairs,
)
from visionscale.face.verification import (
    best_threshold,
    equal_error_rate,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    threshold_metrics,
    verification_report,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- formats --------------------------------------------------------------------------------
def test_parse_pairs_view2(tmp_path):
    lines = ["2\t2"]
    for fold in range(2):
        lines += [f"Ann_{fold}\t1\t2", f"Bob_{fold}\t3\t4"]
        lines += [f"Ann_{fold}\t1\tBob_{fold}\t3", f"Cid_{fold}\t2\tDee_{fold}\t10"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pf = parse_pairs(tmp_path / "pairs.txt")
    assert pf.n_folds == 2 and pf.per_fold == 2 and len(pf.pairs) == 8
    assert pf.pairs[0] == Pair("Ann_0", 1, "Ann_0", 2, 0)
    assert pf.pairs[7] == Pair("Cid_1", 2, "Dee_1", 10, 1)
    assert pf.same.tolist() == [True, True, False, False] * 2
    assert pf.folds.tolist() == [0] * 4 + [1] * 4
    # Round trip through the writer, also as a View-1 (dev) file.
    write_pairs(tmp_path / "again.txt", pf.pairs, 2, 2)
    assert parse_pairs(tmp_path / "again.txt").pairs == pf.pairs
    write_pairs(tmp_path / "dev.txt", pf.pairs[:4], 1, 2, dev_header=True)
    assert (tmp_path / "dev.txt").read_text().splitlines()[0] == "2"
    dev = parse_pairs(tmp_path / "dev.txt")
    assert dev.n_folds == 1 and dev.pairs == pf.pairs[:4]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("1 2 3\n", "header must be"),
        ("x\n", "number of pairs 'x' is not an integer"),
        ("1\nAnn 1 2\n", "promises 2 pair lines .* has 1"),
        ("1\nAnn 1 2\nAnn 1 Bob 2\nExtra 1 2\n", "has more at line 4"),
        ("1\nAnn 1 Bob 2\nAnn 1 2\n", r":2: expected a matched pair"),
        ("1\nAnn 1 2\nAnn 1 2\n", r":3: expected a mismatched pair"),
        ("1\nAnn 1 two\nAnn 1 Bob 2\n", r":2: image number 'two'"),
    ],
)
def test_parse_pairs_errors(tmp_path, text, match):
    p = tmp_path / "pairsDevTest.txt"
    p.write_text(text)
    with pytest.raises(LFWError, match=match):
        parse_pairs(p)


def test_parse_pairs_missing_file(tmp_path):
    with pytest.raises(LFWError, match="not found"):
        parse_pairs(tmp_path / "pairs.txt")


def test_parse_people(tmp_path):
    (tmp_path / "people.txt").write_text("2\n2\nAnn\t3\nBob\t1\n1\nCid\t7\n")
    assert parse_people(tmp_path / "people.txt") == [[("Ann", 3), ("Bob", 1)], [("Cid", 7)]]
    (tmp_path / "peopleDevTrain.txt").write_text("3\nAnn\t3\nBob\t1\nCid\t2\n")
    assert parse_people(tmp_path / "peopleDevTrain.txt") == [[("Ann", 3), ("Bob", 1), ("Cid", 2)]]
    (tmp_path / "bad.txt").write_text("2\nAnn\t3\n")
    with pytest.raises(LFWError, match="ends"):
        parse_people(tmp_path / "bad.txt")
    (tmp_path / "bad2.txt").write_text("1\nAnn\t3\nBob\t4\n")
    with pytest.raises(LFWError, match=r":3: unexpected extra line"):
        parse_people(tmp_path / "bad2.txt")
    (tmp_path / "bad3.txt").write_text("1\nAnn 3 4\n")
    with pytest.raises(LFWError, match=r":2: expected 'name count'"):
        parse_people(tmp_path / "bad3.txt")


def test_image_paths_and_roots(tmp_path):
    assert image_path(tmp_path, "George_W_Bush", 10) == tmp_path / "George_W_Bush" / "George_W_Bush_0010.jpg"
    (tmp_path / "lfw-deepfunneled" / "Ann").mkdir(parents=True)
    assert resolve_image_root(tmp_path, ["Ann"]) == tmp_path / "lfw-deepfunneled"
    assert resolve_image_root(tmp_path / "lfw-deepfunneled", ["Ann"]) == tmp_path / "lfw-deepfunneled"
    with pytest.raises(LFWError, match="no person folders"):
        resolve_image_root(tmp_path, ["Zed"])
    with pytest.raises(LFWError, match="not found"):
        resolve_image_root(tmp_path / "nope", ["Ann"])
    # Without names (identity-folder training): an extracted lfw*/ child wins.
    assert resolve_image_root(tmp_path) == tmp_path / "lfw-deepfunneled"
    assert resolve_image_root(tmp_path / "lfw-deepfunneled") == tmp_path / "lfw-deepfunneled"


# -- metrics --------------------------------------------------------------------------------
def test_roc_auc_and_ties_by_hand():
    # same pairs at 0.1, 0.4; different at 0.4, 0.9. P(same closer) = (1 + 1 + 0.5 + 1) / 4 = 0.875.
    d = [0.1, 0.4, 0.4, 0.9]
    y = [1, 1, 0, 0]
    assert roc_auc(d, y) == pytest.approx(0.875)
    fpr, tpr, thr = roc_curve(d, y)
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]
    assert thr[1:].tolist() == [0.1, 0.4, 0.9]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="both"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan")], [1, 0])


def test_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    d = np.where(y, rng.normal(0.6, 0.2, 400), rng.normal(1.0, 0.2, 400)).round(2)  # rounding makes ties
    assert roc_auc(d, y) == pytest.approx(skm.roc_auc_score(y, -d), abs=1e-12)
    m = threshold_metrics(d, y, 0.8)
    pred = d < 0.8
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    # Seed 003's "ROC AUC" is roc_auc_score on the hard predictions.
    assert m["roc_auc_hard"] == pytest.approx(skm.roc_auc_score(y, pred))


def test_eer_tar_and_best_threshold():
    # 4 same at 0.1..0.4, 4 different at 0.3..0.6: crossing where FAR = FRR = 0.25.
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.45, 0.5, 0.6])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    eer, t = equal_error_rate(d, y)
    assert eer == pytest.approx(0.25) and 0.35 <= t <= 0.4
    tar, far, thr = tar_at_far(d, y, far=0.0)
    assert (tar, far, thr) == (0.75, 0.0, 0.3)  # accept up to 0.3: 3 of 4 same pairs, no false accept
    assert tar_at_far(d, y, far=0.25)[0] == 1.0
    t, acc = best_threshold(d, y)
    assert acc == pytest.approx(7 / 8) and 0.3 < t <= 0.35  # midpoint between 0.3 and 0.35
    assert best_threshold([0.5, 0.5], [0, 0]) == (0.5, 1.0)  # accept nothing


def test_kfold_protocol_by_hand():
    # Fold 0 alone is separated best at 0.5 (between 0.4 and 0.6), fold 1 alone at 0.825
    # (between 0.45 and 1.2). Fold 0 is scored with fold 1's threshold 0.825, which accepts its
    # different pair at 0.6 -> 3/4; fold 1 with fold 0's threshold 0.5 -> 4/4.
    d = np.array([0.2, 0.4, 0.6, 1.6, 0.3, 0.45, 1.2, 1.4])
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    f = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    kf = kfold_accuracy(d, y, f)
    assert kf["thresholds"] == pytest.approx([0.825, 0.5])
    assert kf["accuracies"] == [0.75, 1.0]
    assert kf["mean"] == pytest.approx(0.875) and kf["std"] == pytest.approx(0.125)
    assert kf["sem"] == pytest.approx(np.std([0.75, 1.0], ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy(d, y, np.zeros(8))


# -- evaluation on a generated tree ----------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("lfw")
    info = make_synthetic_lfw(d, n_people=16, images_per_person=3, size=40, n_sets=10, per_set=6, dev_pairs=10)
    return d, info


def _chroma(images):
    """Oracle for the synthetic identities: the image's mean colour minus its grey level."""
    m = np.stack([im.reshape(-1, 3).astype(np.float64).mean(0) for im in images])
    m -= m.mean(1, keepdims=True)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_generated_tree_files(tree):
    d, info = tree
    for name in ("pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt", "people.txt", "peopleDevTrain.txt", "peopleDevTest.txt"):
        assert (d / name).is_file(), name
    assert (d / "pairs.txt").read_text().splitlines()[0] == "10\t6"
    assert len(parse_people(d / "people.txt")) == 10
    assert sum(c for s in parse_people(d / "people.txt") for _, c in s) == info["n_images"]
    assert (info["root"] / info["names"][0] / f"{info['names'][0]}_0003.jpg").is_file()


def test_evaluate_known_answer(tree, tmp_path):
    d, info = tree
    seen = []

    def oracle(imgs):
        seen.extend(id(i) for i in imgs)
        assert len(imgs) <= 16
        return _chroma(imgs)

    res = evaluate_lfw(d, d / "pairs.txt", oracle, batch_size=16)
    rep = res.report
    pf = parse_pairs(d / "pairs.txt")
    distinct = {(p.name1, p.n1) for p in pf.pairs} | {(p.name2, p.n2) for p in pf.pairs}
    assert len(seen) == len(distinct) == rep["n_images_embedded"]  # each image embedded once
    assert rep["n_pairs"] == 120 and rep["n_folds"] == 10
    assert rep["kfold"]["mean"] == 1.0 and len(rep["kfold"]["accuracies"]) == 10
    assert rep["roc_auc"] == 1.0 and rep["eer"] == 0.0 and rep["tar_at_far"] == 1.0
    # A constant embedding cannot tell anyone apart.
    flat = evaluate_lfw(d, d / "pairs.txt", lambda imgs: np.ones((len(imgs), 4)))
    assert flat.report["roc_auc"] == 0.5 and flat.report["kfold"]["mean"] == 0.5
    files = write_lfw_outputs(res, tmp_path / "out")
    assert {f.name for f in files} == {"report.json", "pairs.csv", "roc.png"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["roc_auc"] == 1.0
    assert len((tmp_path / "out" / "pairs.csv").read_text().splitlines()) == 121
    # One set (View 1): no k-fold block, the rest is there.
    dev = evaluate_lfw(d / "lfw", d / "pairsDevTest.txt", _chroma).report
    assert "kfold" not in dev and dev["n_pairs"] == 20 and dev["roc_auc"] == 1.0


def test_evaluate_lists_missing_images(tree, tmp_path):
    d, info = tree
    name = info["names"][0]
    bad = tmp_path / "pairs.txt"
    bad.write_text(f"1\n{name}\t1\t7\n{name}\t1\tNobody_Here\t2\n")
    (d / "lfw" / "Nobody_Here").mkdir(exist_ok=True)
    with pytest.raises(LFWError) as exc:
        evaluate_lfw(d, bad, _chroma)
    msg = str(exc.value)
    assert "2 image(s)" in msg and f"{name}_0007.jpg" in msg and "Nobody_Here_0002.jpg" in msg


def test_verification_report_fixed_thresholds():
    d = np.array([0.2, 0.45, 0.55, 0.7])
    y = np.array([1, 1, 0, 0])
    rep = verification_report(d, y, thresholds=(0.5, 0.6))
    a, b = rep["fixed_thresholds"]
    assert (a["accuracy"], a["precision"], a["recall"]) == (1.0, 1.0, 1.0)
    assert (b["accuracy"], b["precision"], b["recall"]) == (0.75, pytest.approx(2 / 3), 1.0)
    assert (b["tp"], b["fp"], b["tn"], b["fn"]) == (2, 1, 1, 0)
    assert b["f1"] == pytest.approx(0.8)


def test_cli_eval_lfw(tree, tmp_path):
    from visionscale.cli.face_recognition import register

    d, _ = tree
    app = typer.Typer(cls=CLIGroup)  # as the `face` app: its boundary prints library errors
    register(app)
    r = CliRunner().invoke(app, ["eval-lfw", "--root", str(d), "--pairs", str(d / "pairs.txt"), "-m", "face_embedder_tiny",
                                 "--out", str(tmp_path / "ev"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n_pairs"] == 120 and 0.0 <= rep["roc_auc"] <= 1.0 and len(rep["kfold"]["accuracies"]) == 10
    assert rep["model"].startswith("face_embedder_tiny/32d/")
    assert (tmp_path / "ev" / "roc.png").is_file()
    r = CliRunner().invoke(app, ["eval-lfw", "--root", str(d), "--pairs", str(d / "pairs.txt"), "-m", "face_embedder_tiny"])
    assert r.exit_code == 0 and "10-fold accuracy" in r.stdout and "threshold 0.5" in r.stdout
    bad = tmp_path / "pairs.txt"
    bad.write_text("1\nPerson_A00\t1\t9\nPerson_A00\t1\tPerson_B00\t1\n")
    r = CliRunner().invoke(app, ["eval-lfw", "--root", str(d), "--pairs", str(bad), "-m", "face_embedder_tiny"])
    assert r.exit_code == 2 and "Person_A00_0009.jpg" in r.output
    r = CliRunner().invoke(app, ["make-lfw-demo", str(tmp_path / "demo"), "--people", "4", "--images-per-person", "2",
                                 "--size", "24"])
    assert r.exit_code == 0 and (tmp_path / "demo" / "pairs.txt").is_file()


def test_training_beats_random_on_generated_lfw(tree, tmp_path):
    """End to end: a few epochs of Siamese training separate the synthetic identities better
    than the same network with random weights (10-fold accuracy on pairs.txt)."""
    from visionscale.face.embedder import load_embedder
    from visionscale.face.train import TrainConfig, train
    from visionscale.registry import create

    d, info = tree
    cfg = TrainConfig(model="face_embedder_tiny", image_size=32, epochs=4, batch_size=16, pairs_per_epoch=128,
                      val_pairs=48, device="cpu", seed=0)
    train(info["root"], tmp_path / "run", cfg, plots=False)
    trained = evaluate_lfw(d, d / "pairs.txt", load_embedder(tmp_path / "run").embed).report
    torch.manual_seed(0)
    random = evaluate_lfw(d, d / "pairs.txt", create("face_embedder_tiny", image_size=32).embed).report
    assert trained["roc_auc"] > random["roc_auc"]
    assert trained["kfold"]["mean"] > 0.6

    # `visionscale bench CKPT --data LFW`: the trained checkpoint's 10-fold accuracy per backend.
    from visionscale.deploy.bench import BenchConfig, bench

    res = bench(BenchConfig(model=str(tmp_path / "run"), data=str(d), backends=("eager", "onnxruntime"), batches=(4,),
                            device="cpu", warmup=0, repeats=1))
    assert res.config["model"] == "run" and res.config["image_size"] == [32, 32]
    task = [t for t in res.task if t.get("kind") == "verification_accuracy"]
    assert [t["backend"] for t in task] == ["eager", "onnxruntime"]
    assert task[0]["value"] == pytest.approx(trained["kfold"]["mean"])
    assert task[1]["value"] == pytest.approx(trained["kfold"]["mean"], abs=1 / 120)  # at most one pair flips

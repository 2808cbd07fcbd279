"""PatchCore end to end: coreset selection, fit/predict/eval on tiny demo data, resume, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from visionscale.anomaly import coreset as C
from visionscale.anomaly import patchcore_fit
from visionscale.anomaly import train as T
from visionscale.anomaly.data import DataError
from visionscale.anomaly.predict import RunError, evaluate, load_run, predict
from ad_cli import ad_cli as _cli
from visionscale.errors import OutputExistsError
from visionscale.io.weights import load_state_dict

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
TINY = dict(model="patchcore_tiny", image_size=SIZE, batch_size=4, device="cpu")






@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    return T.fit_patchcore(demo, run, T.FitConfig(**TINY))


# ----------------------------------------------------------------------------------------
# Coreset


def _greedy_reference(x: torch.Tensor, k: int, starts: list[int] | None = None, first: int | None = None) -> list[int]:
    """Greedy k-center with the full distance matrix (the official code's semantics)."""
    d = torch.cdist(x.double(), x.double())
    if starts:
        picks, cur = [], d[:, starts].mean(dim=1)  # approximate start: mean distance to random points
    else:
        picks, cur = [first], d[:, first].clone()
    while len(picks) < k:
        j = int(torch.argmax(cur))
        picks.append(j)
        cur = torch.minimum(cur, d[:, j])
    return picks


def test_coreset_picks_the_expected_points_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # Start values = mean distance to all four points: 3.25, 2.75, 2.75, 6.75 -> 10 first.
    # Then min(start, distance to 10): 3.25, 2.75, 2.75 -> 0; then 1 vs 2 (2.75 vs min(2.75, 2)) -> 2.
    assert C.greedy_kcenter(x, 3, num_starting_points=4).tolist() == [3, 0, 2]
    # Classic Gonzalez from a random first point: on a line the next picks are the far end,
    # then the middle of the largest gap.
    line = torch.arange(11.0).view(-1, 1)
    picks = C.greedy_kcenter(line, 5, num_starting_points=0, seed=0).tolist()
    assert picks == _greedy_reference(line, 5, first=picks[0])
    assert picks[1] == (0 if picks[0] > 5 else 10)


def test_coreset_equals_full_distance_matrix_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    starts = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:10].tolist()
    ours = C.greedy_kcenter(x, 40, num_starting_points=10, seed=7).tolist()
    assert ours == _greedy_reference(x, 40, starts)


def test_pruned_coreset_makes_the_same_picks_from_fewer_distances():
    g = torch.Generator().manual_seed(2)
    # Structured like patch features: points near a few low-dimensional manifolds.
    basis = torch.randn(8, 2, 128, generator=g)
    coef = torch.randn(6000, 2, generator=g)
    x = torch.einsum("nk,nkd->nd", coef, basis[torch.randint(0, 8, (6000,), generator=g)])
    x += 0.05 * torch.randn(6000, 128, generator=g)
    for starts in (10, 0):
        full, pruned = {}, {}
        a = C.greedy_kcenter(x, 600, starts, seed=1, prune=False, stats=full)
        b = C.greedy_kcenter(x, 600, starts, seed=1, prune=True, stats=pruned)
        assert torch.equal(a, b)
        assert full["candidate_fraction"] == 1.0 and pruned["candidate_fraction"] < 0.4


def test_coreset_float32_follows_float64_on_offset_features():
    """Points with a large common offset, like projected WRN features (||x||^2 ~ 700) around
    low-dimensional structure: the float32 selection equals the float64 one for all 500
    picks, pruned or not. Before distances were taken relative to the points' mean, the
    two parted after 230 picks on these very points (measured)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(64, generator=g, dtype=torch.float64) + 0.3
    mu *= (700 / mu.square().sum()).sqrt()
    basis = torch.randn(16, 3, 64, generator=g, dtype=torch.float64)
    coef = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    x = mu + 0.3 * torch.einsum("nk,nkd->nd", coef, basis[torch.randint(0, 16, (2000,), generator=g)])
    x = (x + 0.05 * torch.randn(2000, 64, generator=g, dtype=torch.float64)).float()
    assert 650 < float(x.square().sum(1).mean()) < 800
    for prune in (True, False):
        f32 = C.greedy_kcenter(x, 500, 10, seed=1, prune=prune)
        f64 = C.greedy_kcenter(x.double(), 500, 10, seed=1, prune=prune)  # same points, float64 arithmetic
        assert torch.equal(f32, f64)


def test_coreset_covers_better_than_random():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(20, 256, generator=g) * 4
    x = centres[torch.randint(0, 20, (3000,), generator=g)] + torch.randn(3000, 256, generator=g)
    idx = C.coreset_indices(x, ratio=0.02, seed=0)  # 256-d -> 128-d JL projection, 60 points
    assert idx.numel() == 60 and idx.unique().numel() == 60

    def radius(sel):  # coverage in the original space: max over points of the distance to the set
        return torch.cdist(x, x[sel]).min(dim=1).values.max().item()

    greedy = radius(idx)
    randoms = [radius(torch.randperm(3000, generator=g)[:60]) for _ in range(5)]
    assert greedy < min(randoms)


def test_coreset_is_deterministic_and_handles_edge_cases():
    x = torch.randn(500, 200)
    a = C.coreset_indices(x, 0.1, seed=3)
    assert torch.equal(a, C.coreset_indices(x, 0.1, seed=3))
    assert not torch.equal(a, C.coreset_indices(x, 0.1, seed=4))
    assert C.coreset_size(1000, 0.01) == 10 and C.coreset_size(10, 0.01) == 1 and C.coreset_size(5, 1.0) == 5
    assert C.greedy_kcenter(x[:5], 5).tolist() == [0, 1, 2, 3, 4]
    dup = torch.zeros(50, 3)
    dup[0] = 1.0  # two distinct points only: the repeats argmax would make are dropped
    picks = C.greedy_kcenter(dup, 10).tolist()
    assert len(picks) == 2 and 0 in picks
    # Duplicates away from the origin: their distance comes out as rounding, not an exact 0,
    # and must still count as 0 (before the fix: all 20 picks, copies of 4 points).
    g = torch.Generator().manual_seed(0)
    four = (torch.randn(4, 64, generator=g) + 3.0)[torch.randint(0, 4, (400,), generator=g)]
    for starts in (10, 0):
        for prune in (True, False):
            picks = C.greedy_kcenter(four, 20, starts, prune=prune)
            assert picks.numel() == 4 and four[picks].unique(dim=0).shape[0] == 4
    assert C.random_projection(64, 128) is None
    with pytest.raises(ValueError, match="ratio"):
        C.coreset_size(10, 0.0)


# ----------------------------------------------------------------------------------------
# Fit, predict, eval


def test_fit_writes_a_self_describing_run(fitted, demo):
    run = fitted.run
    for name in ("config.json", "versions.json", "model.safetensors", "calibration.json", "metrics.json",
                 "state.json"):
        assert (run / name).is_file(), name
    assert not (run / "cache").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "patchcore_tiny" and cfg["image_size"] == [SIZE, SIZE] and cfg["coreset_ratio"] == 0.1
    assert cfg["data"]["train_images"] == 10 and cfg["data"]["test_anomalous"] == 4
    assert "torch" in json.loads((run / "versions.json").read_text())
    state = fitted.state
    rows = 10 * (SIZE // 8) ** 2
    assert state["complete"] and state["stages"]["features"]["patch_rows"] == rows
    assert state["stages"]["coreset"]["bank_rows"] == round(0.1 * rows)
    assert state["peak_rss_bytes"] >= state["rss_after_model_bytes"] > 0
    bank = load_state_dict(run / "model.safetensors")["nn_search.memory_bank"]
    assert bank.shape == (round(0.1 * rows), 32)
    cal = fitted.calibration
    assert cal["image_min"] <= cal["image_threshold"] <= cal["image_max"]
    assert "F1-optimal on the labelled test set" in cal["image_threshold_source"]
    m = fitted.metrics
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"):
        assert 0.0 <= m[key] <= 1.0, key
    # The synthetic defects (holes, stains...) are visible even to a random tiny backbone.
    assert m["pixel_auroc"] > 0.6


def test_bank_rows_are_real_training_features(fitted, demo):
    run = load_run(fitted.run, "cpu")
    from visionscale.anomaly.data import load_dataset, iter_batches

    ds = load_dataset(demo)
    (batch,) = list(iter_batches(ds.train, SIZE, 16))
    with torch.no_grad():
        emb = run.model.feature_extractor(batch.images)
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    bank = run.model.nn_search.memory_bank
    d = (bank[:, None, :] - rows[None, :, :]).abs().amax(dim=2).min(dim=1).values  # (k,) L-inf to nearest row
    assert d.max() < 1e-4  # every bank vector is one of the training patches


def test_predict_and_eval_agree_with_fit(fitted, demo, tmp_path):
    run = load_run(fitted.run, "cpu")
    images = sorted((demo / "test").rglob("*.png"))
    records, log = predict(run, images, tmp_path / "pred")
    assert len(records) == len(images) and not log.bad
    thr = fitted.calibration["image_threshold"]
    for r in records:
        assert r["label"] == ("anomalous" if r["score"] >= thr else "normal")
        assert (r["normalized_score"] >= 0.5) == (r["label"] == "anomalous")
        assert (tmp_path / "pred" / r["heatmap"].rsplit("/", 1)[-1]).is_file()
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == records
    res = evaluate(run, demo, out_dir=tmp_path / "eval")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert getattr(res.metrics, key) == pytest.approx(fitted.metrics[key], abs=1e-6)
    assert {p.name for p in res.files} >= {"metrics.json", "scores.csv", "roc.png", "pro.png"}


def test_cli_fit_predict_eval(demo, tmp_path):
    app = _cli()
    run = tmp_path / "run"
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo.parent), "--category",
                              "brick", "--out", str(run), "--image-size", str(SIZE), "--coreset-ratio", "0.05",
                              "--batch-size", "4", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.stderr
    assert "running on RANDOM backbone weights: set weights to a file" in res.stderr
    assert "meaningful anomaly scores (--weights)" in res.stderr  # the CLI names its flag
    out = json.loads(res.stdout)
    assert out["state"]["stages"]["coreset"]["bank_rows"] == round(0.05 * 10 * 64)
    imgs = [str(demo / "test" / "hole" / "000.png"), str(demo / "test" / "good")]
    res = runner.invoke(app, ["ad", "predict", str(run), *imgs, "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    assert "RANDOM backbone weights" in res.stderr  # the run remembers how it was fitted
    recs = json.loads(res.stdout)
    assert len(recs) == 4 and {r["label"] for r in recs} <= {"anomalous", "normal"}
    assert (run / "predictions" / "000_heatmap.png").is_file()
    res = runner.invoke(app, ["ad", "predict", str(run), imgs[0], "--csv", "--no-heatmaps"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0] == ("path,score,normalized_score,label,heatmap,mask,regions,regions_file,"
                                                          "map_file")
    res = runner.invoke(app, ["ad", "eval", str(run), "--data", str(demo), "--json"])
    assert res.exit_code == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["num_images"] == 7 and metrics["aupro"] is not None
    assert (run / "eval" / "roc.png").stat().st_size > 1000 and (run / "eval" / "pro.png").is_file()
    res = runner.invoke(app, ["ad", "eval", str(run), "--data", str(demo)])
    assert res.exit_code == 0 and "AUPRO@0.3" in res.stdout


def test_cli_bad_arguments(demo, tmp_path):
    app = _cli()
    # Options of the trained methods are refused for PatchCore (EfficientAD / DDAD: test_ad_efficientad_fit.py).
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                              str(tmp_path / "st"), "--steps", "5"])
    assert res.exit_code == 2 and "steps does not apply to PatchCore" in res.stderr and "(--steps)" in res.stderr
    assert not (tmp_path / "st").exists()
    res = runner.invoke(app, ["ad", "fit", "--model", "resnet18", "--data", str(demo), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown model" in res.stderr
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(tmp_path / "none"),
                              "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "data folder not found" in res.stderr
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                              str(tmp_path / "w"), "--weights", str(tmp_path / "missing.pth")])
    assert res.exit_code == 2 and "missing.pth" in res.stderr
    # The failed start left no run behind that the corrected command would refuse.
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                              str(tmp_path / "w"), "--image-size", "48", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["ad", "predict", str(tmp_path / "norun"), str(demo / "test" / "good")])
    assert res.exit_code == 2 and "run folder not found" in res.stderr
    res = runner.invoke(app, ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                              str(tmp_path / "s"), "--image-size", "big"])
    assert res.exit_code == 2 and "--image-size" in res.stderr


def test_cli_interrupt_says_how_to_resume(demo, tmp_path, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "fit_patchcore", interrupted)
    res = runner.invoke(_cli(), ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                                 str(tmp_path / "r")])
    assert res.exit_code == 130 and "run the same command again to resume" in res.stderr


def test_weights_file_is_used_and_not_called_random(demo, tmp_path):
    from safetensors.torch import save_file

    from visionscale.nn.resnet import resnet_tiny

    torch.manual_seed(5)
    save_file(resnet_tiny(num_classes=0).state_dict(), str(tmp_path / "tiny.safetensors"))
    res = runner.invoke(_cli(), ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo), "--out",
                                 str(tmp_path / "run"), "--image-size", "48", "--weights",
                                 str(tmp_path / "tiny.safetensors"), "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    assert "RANDOM" not in res.stderr
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["weights"].endswith("tiny.safetensors")
    saved = load_state_dict(tmp_path / "run" / "model.safetensors")
    src = load_state_dict(tmp_path / "tiny.safetensors")
    torch.testing.assert_close(saved["feature_extractor.backbone.conv1.weight"], src["conv1.weight"])


def test_interrupted_fit_resumes_and_gives_the_same_bank(demo, tmp_path):
    cfg = T.FitConfig(**{**TINY, "batch_size": 3})
    full = T.fit_patchcore(demo, tmp_path / "full", cfg)

    class Stop(Exception):
        pass

    calls = []

    def stop_after_first_batch(stage, done, total):
        if stage == "features" and done > 0:
            calls.append(done)
            raise Stop

    with pytest.raises(Stop):
        T.fit_patchcore(demo, tmp_path / "cut", cfg, progress=stop_after_first_batch)
    prog = json.loads((tmp_path / "cut" / "cache" / "progress.json").read_text())
    assert prog["images_done"] == 3 and prog["rows"] == 3 * (SIZE // 8) ** 2  # one batch streamed to disk
    messages = []
    # A smaller batch size is allowed when resuming (the knob an out-of-memory error names).
    resumed = T.fit_patchcore(demo, tmp_path / "cut", T.FitConfig(**{**TINY, "batch_size": 2}), log=messages.append)
    assert any("resuming feature extraction at image 4 of 10" in m for m in messages)
    a = load_state_dict(tmp_path / "full" / "model.safetensors")["nn_search.memory_bank"]
    b = load_state_dict(tmp_path / "cut" / "model.safetensors")["nn_search.memory_bank"]
    torch.testing.assert_close(a, b)
    assert resumed.calibration["image_threshold"] == pytest.approx(full.calibration["image_threshold"])
    # A finished run is not refitted; a different configuration is refused.
    again = []
    T.fit_patchcore(demo, tmp_path / "cut", cfg, log=again.append)
    assert any("nothing to do" in m for m in again)
    with pytest.raises(T.FitError, match="different coreset_ratio"):
        T.fit_patchcore(demo, tmp_path / "cut", T.FitConfig(**{**TINY, "coreset_ratio": 0.2}))


def test_unlabelled_data_thresholds_on_held_out_normals(tmp_path, demo):
    root = tmp_path / "plain"
    shutil.copytree(demo / "train" / "good", root / "normal")
    res = T.fit_patchcore(root, tmp_path / "run", T.FitConfig(**TINY))
    assert res.metrics is None and not (tmp_path / "run" / "metrics.json").exists()
    cal = res.calibration
    assert "held out of the memory bank" in cal["image_threshold_source"] and cal["calibration_images"] == 2
    assert res.state["stages"]["coreset"]["patch_rows"] == 8 * (SIZE // 8) ** 2
    run = load_run(tmp_path / "run", "cpu")
    records, _ = predict(run, [root / "normal"], None, overlays=False)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    held = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["holdout_images"]
    assert held == 2
    top = max(r["score"] for r in records)
    # threshold = 1.1 x the highest held-out score: every normal image of this set is below it
    assert cal["image_threshold"] == pytest.approx(1.1 * cal["image_max"], rel=1e-6)
    assert cal["image_threshold"] > top and all(r["label"] == "normal" for r in by_name.values())
    assert all(0 <= r["normalized_score"] < 0.5 for r in records)
    # Fewer than 10 images: nothing held out, scored in-sample, with a warning note.
    small = tmp_path / "small"
    shutil.copytree(demo / "train" / "good", small / "normal")
    for p in sorted((small / "normal").iterdir())[:4]:
        p.unlink()
    res = T.fit_patchcore(small, tmp_path / "run_small", T.FitConfig(**TINY))
    assert "training images themselves" in res.calibration["image_threshold_source"]
    assert any("expect false alarms" in n for n in res.notes)


def test_out_of_memory_names_the_knobs(demo, tmp_path, monkeypatch):
    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(patchcore_fit, "greedy_kcenter", oom)
    with pytest.raises(T.FitError, match=r"out of memory during coreset.*coreset_ratio \(now 0.1\).*image_size"):
        T.fit_patchcore(demo, tmp_path / "a", T.FitConfig(**TINY))
    monkeypatch.undo()

    def cpu_oom(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    from visionscale.anomaly.patchcore import PatchFeatureExtractor

    monkeypatch.setattr(PatchFeatureExtractor, "forward", cpu_oom)
    with pytest.raises(T.FitError, match=r"out of memory during features.*batch_size \(now 4.*resumes"):
        T.fit_patchcore(demo, tmp_path / "b", T.FitConfig(**TINY))


def test_bad_inputs_during_fit(demo, tmp_path):
    data = tmp_path / "cat"
    shutil.copytree(demo, data)
    victim = data / "train" / "good" / "004.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"004\.png.*skip_bad"):
        T.fit_patchcore(data, tmp_path / "r1", T.FitConfig(**TINY))
    res = T.fit_patchcore(data, tmp_path / "r2", T.FitConfig(**TINY, skip_bad=True))
    assert [p for p, _ in res.state["bad_images"]] == [str(victim)]
    assert res.state["stages"]["features"]["images"] == 9
    # Missing masks: metrics still come, pixel ones skipped with a note.
    shutil.rmtree(data / "ground_truth" / "hole")
    victim.unlink()
    res = T.fit_patchcore(data, tmp_path / "r3", T.FitConfig(**TINY))
    assert res.metrics["image_auroc"] is not None and res.metrics["pixel_auroc"] is None
    assert any("have no ground-truth mask" in n for n in res.metrics["notes"])
    # Mixed sizes: a larger training image is resized, and the note says so.
    from PIL import Image

    Image.new("RGB", (80, 100), (120, 60, 50)).save(data / "train" / "good" / "big.png")
    res = T.fit_patchcore(data, tmp_path / "r4", T.FitConfig(**TINY))
    assert any("2 sizes" in n and "resized to 64x64" in n for n in res.notes)
    # A non-empty folder that is not a run is refused.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(OutputExistsError, match=r"not a run folder \(it holds x\.txt\)"):
        T.fit_patchcore(data, tmp_path / "junk", T.FitConfig(**TINY))
    assert sorted(p.name for p in (tmp_path / "junk").iterdir()) == ["x.txt"]


def test_predict_bad_images_and_broken_runs(fitted, tmp_path):
    run = load_run(fitted.run, "cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png"):
        predict(run, [bad], None)
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict(run, [tmp_path / "nope.png"], None)
    broken = tmp_path / "broken"
    shutil.copytree(fitted.run, broken)
    (broken / "calibration.json").unlink()
    with pytest.raises(RunError, match="calibration.json is missing"):
        load_run(broken)


def test_fit_memory_estimate_grows_linearly():
    a = patchcore_fit.fit_memory_estimate(100, (256, 256), 1024, 0.1)
    b = patchcore_fit.fit_memory_estimate(200, (256, 256), 1024, 0.1)
    assert a["patch_rows"] == 100 * 32 * 32
    assert b["coreset_ram_bytes"] == 2 * a["coreset_ram_bytes"] == 2 * 100 * 1024 * 131 * 4
    assert a["features_on_disk_bytes"] == 100 * 1024 * (1024 + 128) * 4
    assert patchcore_fit.fit_memory_estimate(100, (512, 512), 1024, 0.1)["patch_rows"] == 4 * a["patch_rows"]


def test_predict_through_onnx_runtime_and_bf16_matches_eager(fitted, demo, tmp_path):
    """`ad predict --backend onnxruntime` runs the exported graph (batch 1 graph, batches split
    image by image) with the same scores; bf16 autocast stays close; unknown backends are refused."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    images = [demo / "test" / "good", demo / "test" / "hole"]
    eager, _ = predict(load_run(fitted.run, "cpu"), images, batch_size=3, overlays=False)
    ort_run = load_run(fitted.run, "cpu", backend="onnxruntime")
    assert ort_run.model.info["provider"] == "CPUExecutionProvider"
    ort, _ = predict(ort_run, images, batch_size=3, overlays=False)
    assert [r["path"] for r in ort] == [r["path"] for r in eager]
    assert [r["label"] for r in ort] == [r["label"] for r in eager]
    for a, b in zip(ort, eager):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-5)
    bf16, _ = predict(load_run(fitted.run, "cpu", precision="bf16"), images, batch_size=3, overlays=False)
    for a, b in zip(bf16, eager):
        assert a["score"] == pytest.approx(b["score"], rel=0.05, abs=0.05)
    with pytest.raises(RunError, match="backend"):
        load_run(fitted.run, "cpu", backend="tensorflow")


def test_moved_names_still_resolve_from_train_with_a_warning():
    from visionscale.anomaly import runs

    with pytest.warns(DeprecationWarning, match="moved to visionscale.anomaly.runs.build_run_model"):
        assert T.build_run_model is runs.build_run_model
    with pytest.raises(AttributeError):
        T.no_such_name  # noqa: B018


def test_predict_does_not_import_fitting():
    import subprocess
    import sys

    code = ("import sys, visionscale.anomaly.predict; "
            "print(sorted(m for m in sys.modules if m.endswith(('.train', '_fit', '.run', '.calibration'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "anomaly" not in out, out

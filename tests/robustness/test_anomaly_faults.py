"""Anomaly detection under faults and bad input: huge and odd images, edited run folders, outputs
that must not clobber what the user owns, concurrent fits, damaged checkpoints, bad numbers.

One tiny PatchCore run (``patchcore_tiny`` at 32 px on conftest's 64 px brick demo) is fitted
once per module and copied where a test edits it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import corpus
from visionscale.anomaly import train as T
from visionscale.cli.main import app
from visionscale.errors import InvalidFileError, InvalidValueError, OutputExistsError
from visionscale.io.outputs import RunLock

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SIZE = 32
TINY = ["--model", "patchcore_tiny", "--image-size", str(SIZE), "--batch-size", "4", "--device", "cpu"]


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res) -> str:
    """The command failed with exit 2 and one line ``error: ...`` on stderr (besides notes and
    warnings printed before it); no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert all(line.startswith(("warning: ", "note: ")) for line in lines[:-1]), res.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def run_dir(brick_demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("ad") / "run"
    T.fit(brick_demo, run, T.FitConfig(model="patchcore_tiny", image_size=SIZE, batch_size=4, device="cpu"))
    return run


@pytest.fixture
def good(brick_demo):
    return brick_demo / "test" / "good" / "000.png"


# ----------------------------------------------------------------------------------------
# 1. Huge images: reading and every output bounded.

PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from typer.testing import CliRunner
    from visionscale.cli.main import app

    run, small, huge, out = sys.argv[1:5]
    r = CliRunner()
    # Warm-up on a small image: imports, the model and matplotlib are in the baseline.
    a = r.invoke(app, ["ad", "predict", run, small, "--out", out + "0", "--device", "cpu"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b = r.invoke(app, ["ad", "predict", run, huge, "--out", out + "1", "--device", "cpu", "--json"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rc": [a.exit_code, b.exit_code], "stderr": b.stderr, "stdout": b.stdout,
                      "growth_mib": (after - before) / 1024}))  # Linux: KiB
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_huge_png_is_predicted_in_bounded_memory_with_a_bounded_heatmap(run_dir, good, tmp_path):
    from PIL import Image

    side = 8000  # a 60 KB file of 64 Mpx
    huge = corpus.huge_png(tmp_path, side=side)
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(run_dir), str(good), str(huge), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == [0, 0], res["stderr"]
    # Before: the image became a full-size RGB array, a full-size float tensor and a full-size
    # float64 overlay (6.6 GiB growth at this side; 0.9 GiB with --no-heatmaps). Now the 8-bit
    # decode (64 MiB) is the largest thing held; 400 MiB leaves room for allocator noise.
    assert res["growth_mib"] < 400, res
    assert "8000x8000" in res["stderr"]  # the note still reports the file's own size
    (rec,) = json.loads(res["stdout"])
    from visionscale.anomaly.predict import HEATMAP_MAX_SIDE

    with Image.open(rec["heatmap"]) as im:
        assert max(im.size) == HEATMAP_MAX_SIDE and im.size == (HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE)


def test_heatmap_of_a_wide_image_keeps_its_aspect_ratio(run_dir, tmp_path):
    from PIL import Image

    from visionscale.anomaly.predict import HEATMAP_MAX_SIDE, load_run, predict

    wide = tmp_path / "wide.png"
    Image.new("RGB", (3000, 600), (90, 60, 40)).save(wide)
    records, log = predict(load_run(run_dir, "cpu"), [wide], tmp_path / "out")
    with Image.open(records[0]["heatmap"]) as im:
        assert im.size == (HEATMAP_MAX_SIDE, round(600 * HEATMAP_MAX_SIDE / 3000))
    assert log.sizes == {(600, 3000): 1}


def test_large_images_score_close_to_a_full_size_read(run_dir, brick_demo, tmp_path):
    """Reading shrinks by whole factors first; the final antialiased resize still decides the
    input, so the score of an enlarged image stays near the score of reading it in full."""
    from PIL import Image

    from visionscale.anomaly.data import to_model_input
    from visionscale.anomaly.predict import load_run, predict
    from visionscale.io.images import read_image

    big = tmp_path / "big.png"
    Image.open(brick_demo / "test" / "hole" / "000.png").resize((640, 640), Image.Resampling.NEAREST).save(big)
    run = load_run(run_dir, "cpu")
    (rec,), _ = predict(run, [big], None)
    full = to_model_input(read_image(big), SIZE)[None]  # the old path: full-size float, then resize
    with torch.inference_mode():
        ref = float(run.model(full)["pred_score"][0])
    # A box pre-average changes pixels by rounding only; relative to the score's scale.
    assert abs(rec["score"] - ref) <= 0.05 * max(abs(ref), 1e-6)


# ----------------------------------------------------------------------------------------
# 2. Edited run folders.


def _edit(run_dir: Path, tmp_path: Path, name: str, change) -> Path:
    run = tmp_path / "edited"
    shutil.copytree(run_dir, run)
    path = run / name
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    return run


def _set(key, value):
    return lambda d: {**d, key: value}


EDITS = {
    "config-is-a-list": ("config.json", lambda d: [1, 2], ["config.json", "JSON object"]),
    "config-not-json": ("config.json", lambda d: '{"model": "patchcore_tiny", ', ["config.json", "not valid JSON"]),
    "config-image-size": ("config.json", _set("image_size", "big"), ["config.json", "image_size"]),
    "config-model": ("config.json", _set("model", 3), ["config.json", "model"]),
    "config-coreset-ratio-missing": ("config.json", lambda d: {k: v for k, v in d.items() if k != "coreset_ratio"},
                                     ["config.json", "coreset_ratio"]),
    "threshold-null": ("calibration.json", _set("image_threshold", None), ["calibration.json", "image_threshold"]),
    "threshold-string": ("calibration.json", _set("image_threshold", "high"), ["calibration.json", "image_threshold"]),
    "threshold-missing": ("calibration.json", lambda d: {k: v for k, v in d.items() if k != "image_threshold"},
                          ["calibration.json", "image_threshold", "missing"]),
    "span-zero": ("calibration.json", _set("image_span", 0), ["calibration.json", "image_span"]),
    "pixel-threshold-inf": ("calibration.json", _set("pixel_threshold", math.inf), ["calibration.json",
                                                                                    "pixel_threshold"]),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_run_files_are_named_with_their_field(case, run_dir, good, tmp_path):
    name, change, words = EDITS[case]
    run = _edit(run_dir, tmp_path, name, change)
    line = one_error_line(cli("ad", "predict", run, good, "--device", "cpu"))
    for w in words:
        assert w in line, line


def test_nan_threshold_no_longer_calls_everything_normal(run_dir, good, tmp_path):
    run = _edit(run_dir, tmp_path, "calibration.json", lambda d: json.dumps({**d, "image_threshold": math.nan}))
    assert "NaN" in (run / "calibration.json").read_text()  # what Python's json writes and reads back
    line = one_error_line(cli("ad", "predict", run, good, "--device", "cpu", "--json"))
    assert "calibration.json" in line and "image_threshold" in line and "finite" in line
    with pytest.raises(InvalidFileError, match="calibration.json.*image_threshold"):
        from visionscale.anomaly.predict import load_run

        load_run(run, "cpu")


# ----------------------------------------------------------------------------------------
# 3. Prediction outputs.


def test_out_with_brackets_is_printed_literally(run_dir, good, tmp_path):
    out = tmp_path / "out" / "a[/]b"
    res = cli("ad", "predict", run_dir, good, "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert (out / "predictions.json").is_file() and (out / "000_heatmap.png").is_file()
    assert "a[/]b" in res.stdout.replace("\n", "")


def test_predict_replaces_its_earlier_files_and_refuses_foreign_ones(run_dir, brick_demo, tmp_path):
    out = tmp_path / "pred"
    a, b = brick_demo / "test" / "good" / "000.png", brick_demo / "test" / "hole" / "000.png"
    shutil.copy(b, tmp_path / "other.png")
    assert cli("ad", "predict", run_dir, a, "--out", out, "--device", "cpu").exit_code == 0
    res = cli("ad", "predict", run_dir, tmp_path / "other.png", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    # No stale 000_* files of the first prediction; each image has its heatmap, mask and regions.
    assert files == ["other_heatmap.png", "other_mask.png", "other_regions.json", "predictions.csv",
                     "predictions.json"]
    assert [r["path"] for r in json.loads((out / "predictions.json").read_text())] == [str(tmp_path / "other.png")]
    # A folder with the user's own files is refused before any work, and left alone ...
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = one_error_line(cli("ad", "predict", run_dir, a, "--out", mine, "--device", "cpu"))
    assert "notes.txt" in line and sorted(os.listdir(mine)) == ["notes.txt"]
    # ... unless --overwrite: then only same-named files are replaced.
    res = cli("ad", "predict", run_dir, a, "--out", mine, "--device", "cpu", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "predictions.json").is_file()


def test_failed_predict_leaves_no_folder_and_keeps_an_earlier_one(run_dir, good, tmp_path, monkeypatch):
    bad = corpus.truncated_png(tmp_path)
    out = tmp_path / "new" / "pred"
    one_error_line(cli("ad", "predict", run_dir, good, bad, "--out", out, "--device", "cpu"))
    assert not (tmp_path / "new").exists()
    # A failure while the files are written leaves the previous prediction exactly as it was.
    from visionscale.anomaly import predict as P

    done = tmp_path / "done"
    assert cli("ad", "predict", run_dir, good, "--out", done, "--device", "cpu").exit_code == 0
    before = {p.name: p.read_bytes() for p in done.iterdir()}

    def broken(*args, **kw):
        raise OSError(28, "No space left on device", str(done / "x.png"))

    monkeypatch.setattr(P, "_write_overlay", broken)
    one_error_line(cli("ad", "predict", run_dir, good, "--out", done, "--device", "cpu"))
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ----------------------------------------------------------------------------------------
# 4. Fitting into a folder: lock, foreign files, failures.


def test_fit_into_a_locked_run_folder_stops_at_once(brick_demo, tmp_path):
    run = tmp_path / "run"
    with RunLock(run, what="run folder"):
        t0 = time.perf_counter()
        line = one_error_line(cli("ad", "fit", "--data", brick_demo, "--out", run, *TINY))
        assert "in use" in line and str(run) in line
        assert time.perf_counter() - t0 < 30
    assert sorted(os.listdir(run)) == [".lock"]  # nothing written beside the holder's lock


@pytest.mark.parametrize("foreign", ["notes.txt", "config.json"])
def test_fit_refuses_a_folder_it_did_not_write(foreign, brick_demo, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    text = "my notes" if foreign == "notes.txt" else json.dumps({"learning_rate": 0.1, "name": "my own settings"})
    (run / foreign).write_text(text)
    line = one_error_line(cli("ad", "fit", "--data", brick_demo, "--out", run, *TINY))
    assert foreign in line and "not a run folder" in line
    assert sorted(os.listdir(run)) == [foreign] and (run / foreign).read_text() == text
    with pytest.raises(OutputExistsError, match=foreign):  # the library refuses, not only the CLI
        T.fit(brick_demo, run, T.FitConfig(model="patchcore_tiny", image_size=SIZE, device="cpu"))
    if foreign == "notes.txt":  # --overwrite fits beside the user's file
        res = cli("ad", "fit", "--data", brick_demo, "--out", run, *TINY, "--overwrite")
        assert res.exit_code == 0, res.stderr
        assert (run / "notes.txt").read_text() == text and (run / "model.safetensors").is_file()


def test_resuming_our_own_run_still_works(run_dir, brick_demo, tmp_path):
    run = tmp_path / "again"
    shutil.copytree(run_dir, run)
    (run / "notes.txt").write_text("the user's notes in a run of ours")
    res = cli("ad", "fit", "--data", brick_demo, "--out", run, *TINY)
    assert res.exit_code == 0, res.stderr
    assert "nothing to do" in res.stderr and (run / "notes.txt").is_file()


def test_fit_that_fails_before_saving_leaves_no_folder(brick_demo, tmp_path):
    data = tmp_path / "brick"
    shutil.copytree(brick_demo, data)
    for p in (data / "train" / "good").iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "new" / "deeper" / "run"
    line = one_error_line(cli("ad", "fit", "--data", data, "--out", out, *TINY))
    assert "--skip-bad" in line
    assert not (tmp_path / "new").exists()  # neither the run nor the parents it made
    # An existing empty folder stays, empty.
    (tmp_path / "empty").mkdir()
    one_error_line(cli("ad", "fit", "--data", data, "--out", tmp_path / "empty", *TINY))
    assert os.listdir(tmp_path / "empty") == []
    # Bad data found before anything else: the same.
    one_error_line(cli("ad", "fit", "--data", tmp_path / "nodata", "--out", tmp_path / "r", *TINY))
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------
# 5. A damaged EfficientAD checkpoint is reported, not replaced.


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-dict", "wrong-shapes"])
def test_damaged_efficientad_checkpoint_is_an_error_naming_it(damage, tmp_path):
    from visionscale import registry
    from visionscale.anomaly import efficientad_train as E

    torch.manual_seed(0)
    model = registry.create("efficientad_tiny")
    cfg = E.EfficientADTrainConfig(steps=2, checkpoint_every=1)
    ckpt_dir = tmp_path / "checkpoints"
    batch = lambda step: torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(step))  # noqa: E731
    E.train_efficientad(model, batch, E.EfficientADTrainConfig(steps=1, checkpoint_every=1), ckpt_dir)
    path = ckpt_dir / E.TRAIN_CHECKPOINT
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not-a-dict":
        torch.save([1, 2, 3], path)
    else:
        ckpt = torch.load(path, weights_only=True)
        ckpt["identity"] = {**cfg.training_identity(), "penalty": False}
        ckpt["model"] = {k: v[..., :1] if v.ndim else v for k, v in ckpt["model"].items()}
        torch.save(ckpt, path)
    damaged = path.read_bytes()
    with pytest.raises(InvalidFileError, match=r"efficientad_train\.pt.*[Dd]elete it to start this training over"):
        E.train_efficientad(model, batch, cfg, ckpt_dir)
    assert path.read_bytes() == damaged  # not silently replaced by a fresh start


# ----------------------------------------------------------------------------------------
# 7. Numbers out of range: one line, exit 2, in the library too.

FIT_NUMBERS = {
    "coreset-nan": (["--coreset-ratio", "nan"], "coreset_ratio"),
    "coreset-zero": (["--coreset-ratio", "0"], "coreset_ratio"),
    "coreset-inf": (["--coreset-ratio", "inf"], "coreset_ratio"),
    "batch-zero": (["--batch-size", "0"], "batch_size"),
    "image-size-zero": (["--image-size", "0"], "image-size"),
    "image-size-huge": (["--image-size", "100000"], "at most"),
    "seed-negative": (["--seed", "-1"], "seed"),
    "checkpoint-every-zero": (["--checkpoint-every", "0"], "checkpoint_every"),
    "distill-steps-zero": (["--distill-steps", "0"], "distill_steps"),
}


@pytest.mark.parametrize("case", sorted(FIT_NUMBERS))
def test_fit_numbers_out_of_range(case, brick_demo, tmp_path):
    args, word = FIT_NUMBERS[case]
    out = tmp_path / "run"
    line = one_error_line(cli("ad", "fit", "--data", brick_demo, "--out", out, *TINY, *args))
    assert word in line, line
    assert not out.exists()


@pytest.mark.parametrize("args,word", [(["--threshold", "nan"], "threshold"), (["--threshold", "-inf"], "threshold"),
                                       (["--batch-size", "0"], "batch_size")])
def test_predict_numbers_out_of_range(args, word, run_dir, good, tmp_path):
    line = one_error_line(cli("ad", "predict", run_dir, good, "--out", tmp_path / "p", "--device", "cpu", *args))
    assert word in line and not (tmp_path / "p").exists()


def test_eval_batch_size_and_explicit_threshold(run_dir, brick_demo, good, tmp_path):
    line = one_error_line(cli("ad", "eval", run_dir, "--data", brick_demo, "--out", tmp_path / "e", "--batch-size",
                              "0", "--device", "cpu"))
    assert "batch_size" in line and not (tmp_path / "e").exists()
    # A finite --threshold is used instead of the saved one: everything at or above it is anomalous.
    res = cli("ad", "predict", run_dir, good, "--no-heatmaps", "--json", "--threshold", "-1e9",
              "--out", tmp_path / "p", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert [r["label"] for r in json.loads(res.stdout)] == ["anomalous"]


def test_library_config_checks_numbers_too(run_dir, good):
    from visionscale.anomaly.predict import load_run, predict

    for bad in ({"coreset_ratio": math.nan}, {"threshold_margin": math.nan}, {"holdout_fraction": math.inf},
                {"batch_size": 0}, {"seed": 1.5}, {"image_size": (32, 0)}):
        with pytest.raises((InvalidValueError, ValueError)):
            T.FitConfig(model="patchcore_tiny", **{"image_size": SIZE, **bad})
    with pytest.raises(InvalidValueError, match="threshold"):
        predict(load_run(run_dir, "cpu"), [good], None, threshold=math.nan)


# ----------------------------------------------------------------------------------------
# 6 and 8. Named pipes and the bad/odd image corpus through `ad predict`.


def test_fifo_image_is_refused_without_blocking(run_dir, good, tmp_path):
    pipe = corpus.fifo(tmp_path)

    def unblock():  # should the check ever be missing, release a blocked reader instead of hanging
        deadline = time.time() + 60
        while time.time() < deadline and not stop.is_set():
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.05)

    stop = threading.Event()
    guard = threading.Timer(5.0, unblock)
    guard.start()
    try:
        t0 = time.perf_counter()
        line = one_error_line(cli("ad", "predict", run_dir, good, pipe, "--out", tmp_path / "p", "--device", "cpu"))
        assert time.perf_counter() - t0 < 5.0
    finally:
        stop.set()
        guard.cancel()
    assert str(pipe) in line and "not a regular file" in line


@pytest.mark.parametrize("kind", sorted(corpus.BAD_IMAGES))
def test_bad_images_stop_or_are_skipped(kind, run_dir, good, tmp_path):
    bad = corpus.BAD_IMAGES[kind](tmp_path)
    line = one_error_line(cli("ad", "predict", run_dir, good, bad, "--out", tmp_path / "p", "--device", "cpu"))
    assert str(bad) in line and "--skip-bad" in line
    res = cli("ad", "predict", run_dir, good, bad, "--skip-bad", "--json", "--no-heatmaps", "--out", tmp_path / "q",
              "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert [r["path"] for r in json.loads(res.stdout)] == [str(good)]
    assert "skipped 1 unreadable image(s)" in res.stderr and str(bad) in res.stderr


@pytest.mark.parametrize("kind", sorted(corpus.ODD_IMAGES))
def test_odd_images_are_scored(kind, run_dir, tmp_path):
    odd = corpus.ODD_IMAGES[kind](tmp_path)
    res = cli("ad", "predict", run_dir, odd, "--json", "--out", tmp_path / "p", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    (rec,) = json.loads(res.stdout)
    assert rec["path"] == str(odd) and math.isfinite(rec["score"]) and rec["label"] in ("normal", "anomalous")
    assert Path(rec["heatmap"]).is_file()

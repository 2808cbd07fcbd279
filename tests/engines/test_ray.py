"""The Ray engine on a real local Ray instance: equal to the local engine, resumes, survives a dead worker.

One Ray instance for the module (``ray.init(num_cpus=2)``); each job starts its own actor pool
(a Python process per worker that imports torch and loads the run: most of this file's time).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from visionscale.anomaly import train as T  # noqa: E402
from visionscale.anomaly.runs import load_run  # noqa: E402
from visionscale.engines import anomaly as engine_anomaly  # noqa: E402
from visionscale.engines.anomaly import AnomalyWorker, predict  # noqa: E402
from visionscale.engines.ray_engine import EngineError, RayOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the workers run one thread each too: same sums


@pytest.fixture(scope="module")
def ray_instance():
    import sys
    import tempfile

    import ray.cloudpickle

    # The worker classes below travel to the workers by value (the workers cannot import this file).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    temp = tempfile.mkdtemp(prefix="vs-ray-test-")  # short: Ray's socket paths must stay under 107 chars
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_run(brick_demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    T.fit_patchcore(brick_demo, run, T.FitConfig(model="patchcore_tiny", image_size=64, batch_size=4, device="cpu"))
    return run


@pytest.fixture(scope="module")
def images(brick_demo, tmp_path_factory):
    """The demo's 7 test images and one truncated PNG (read with skip_bad)."""
    folder = tmp_path_factory.mktemp("imgs")
    for p in sorted((brick_demo / "test").glob("*/*.png")):
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    data = (folder / "good_000.png").read_bytes()
    (folder / "zz_truncated.png").write_bytes(data[: len(data) // 3])
    return folder


def _ad_cli():
    import typer

    from visionscale.cli import ad

    root = typer.Typer()
    root.add_typer(ad.app, name="ad")
    return root


def _same_folder(a, b, rename: tuple[str, str]):
    """Same file names, every file equal byte for byte (``rename`` maps a's folder name in the
    predictions files to b's: records name the output folder)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        x, y = (a / n).read_bytes(), (b / n).read_bytes()
        if n.startswith("predictions."):
            x = x.replace(rename[0].encode(), rename[1].encode())
        assert x == y, n


def test_ad_predict_ray_equals_local(ray_instance, tiny_run, images, tmp_path):
    """Scores, labels and every file (heatmaps, masks, regions, raw maps, predictions.json/csv)
    equal the local engine's to the bit: a worker runs the same forward passes (the same images
    batched together, one thread) and calls the same writers."""
    outs = {}
    for engine in ("local", "ray"):
        dest = tmp_path / f"out_{engine}"
        r = CliRunner().invoke(_ad_cli(), ["ad", "predict", str(tiny_run), str(images), "--out", str(dest), "--json",
                                           "--raw-maps", "--skip-bad", "--batch-size", "3", "--device", "cpu",
                                           "--engine", engine] + (["--workers", "2"] if engine == "ray" else []))
        assert r.exit_code == 0, r.output
        outs[engine] = json.loads(r.stdout[r.stdout.index("["):])
        assert "zz_truncated.png" in r.output  # listed as skipped
    local, remote = outs["local"], outs["ray"]
    assert len(local) == 7 and [r["path"] for r in remote] == [r["path"] for r in local]
    assert [r["label"] for r in remote] == [r["label"] for r in local]
    assert [r["score"] for r in remote] == [r["score"] for r in local]
    _same_folder(tmp_path / "out_local", tmp_path / "out_ray", ("out_local", "out_ray"))
    # Nothing left beside the output: the resume folder goes once the job is published.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_local", "out_ray"]


class CountingWorker(AnomalyWorker):
    """Logs every image it scores (to count redone work); dies (``os._exit``) in its first call
    while ``DIE_ONCE`` names a flag file that does not exist yet."""

    LOG = ""
    DIE_ONCE = ""

    def __call__(self, batch):
        if self.DIE_ONCE and not os.path.exists(self.DIE_ONCE):
            open(self.DIE_ONCE, "w").close()
            os._exit(1)  # a worker process killed mid-job (OOM killer, lost node)
        with open(self.LOG, "a") as fh:
            for row in batch["path"]:
                fh.writelines(f"{p}\n" for p in row)
        return super().__call__(batch)


def test_interrupted_job_resumes_without_redoing_finished_images(ray_instance, tiny_run, images, tmp_path,
                                                                 monkeypatch):
    run = load_run(tiny_run, "cpu")
    files = sorted(p for p in images.iterdir() if p.name != "zz_truncated.png")
    ref, _ = predict(run, files, tmp_path / "ref", engine="local", batch_size=2)
    monkeypatch.setattr(engine_anomaly, "AnomalyWorker", CountingWorker)
    monkeypatch.setattr(CountingWorker, "LOG", str(tmp_path / "scored.log"))
    dest = tmp_path / "out"

    class Interrupted(Exception):
        pass

    def stop_after_3(stage, done, total):  # Ctrl-C on the driver once 3 images are written
        if done >= 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        predict(run, files, dest, engine="ray", ray=RayOptions(workers=1), device="cpu", batch_size=2,
                progress=stop_after_3)
    assert not dest.exists()  # nothing published
    state = tmp_path / ".out.ad-predict.resume"
    done_before = {int(p.stem) for p in (state / "done").glob("*.json")}
    assert len(done_before) >= 3
    (tmp_path / "scored.log").unlink()

    # The rerun's first worker dies at once: Ray restarts it and retries its batch.
    monkeypatch.setattr(CountingWorker, "DIE_ONCE", str(tmp_path / "died"))
    info = {}
    records, _ = predict(run, files, dest, engine="ray", ray=RayOptions(workers=1), device="cpu", batch_size=2,
                         on_start=info.update)
    assert (tmp_path / "died").exists()
    assert info["resumed"] == len(done_before)
    scored = (tmp_path / "scored.log").read_text().split()
    assert sorted(scored) == sorted(str(files[i]) for i in range(len(files)) if i not in done_before)
    # Complete and correct all the same. Scores: images batched differently than in the
    # reference (the rerun pairs the images left), so equal up to float32 rounding of the
    # features (PatchCore distances of order 0.5 here; 1e-5 is ~100 float32 steps).
    assert [r["label"] for r in records] == [r["label"] for r in ref]
    np.testing.assert_allclose([r["score"] for r in records], [r["score"] for r in ref], rtol=1e-5, atol=0)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert not state.exists()


class FailingWorker(AnomalyWorker):
    """Raises on every image named ``*_boom.png``, as a bug in a worker would."""

    def __call__(self, batch):
        if any(str(p).endswith("_boom.png") for row in batch["path"] for p in row):
            raise RuntimeError("scorer bug")
        return super().__call__(batch)


def test_worker_error_stops_the_job_with_a_clear_error_and_keeps_finished_images(ray_instance, tiny_run, images,
                                                                                  tmp_path, monkeypatch):
    run = load_run(tiny_run, "cpu")
    files = sorted(p for p in images.iterdir() if p.name != "zz_truncated.png")[:4]
    boom = tmp_path / "z_boom.png"
    shutil.copy(files[0], boom)
    monkeypatch.setattr(engine_anomaly, "AnomalyWorker", FailingWorker)
    with pytest.raises(EngineError, match="resume"):
        predict(run, files + [boom], tmp_path / "out", engine="ray", ray=RayOptions(workers=1), device="cpu",
                batch_size=1)
    assert not (tmp_path / "out").exists()
    done = list((tmp_path / ".out.ad-predict.resume" / "done").glob("*.json"))
    assert len(done) <= 4 and all(json.loads(p.read_text())["record"]["path"] != str(boom) for p in done)


def test_face_detect_ray_equals_local(ray_instance, tmp_path):
    from PIL import Image

    from visionscale.cli.face import app
    from visionscale.face.blazeface import VARIANTS, BlazeFace
    from visionscale.io.weights import save_file_atomic

    torch.manual_seed(0)
    weights = save_file_atomic(BlazeFace(VARIANTS["tiny"]).state_dict(), tmp_path / "tiny.safetensors")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(60, 80), (90, 50), (40, 40), (70, 70), (64, 96)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    got = {}
    for engine in ("local", "ray"):
        r = CliRunner().invoke(app, ["detect", str(folder), "--model", "tiny", "--weights", str(weights),
                                     "--min-score", "0", "--json", "--batch-size", "2", "--device", "cpu",
                                     "--out", str(tmp_path / engine), "--engine", engine])
        assert r.exit_code == 0, r.output
        got[engine] = json.loads(r.stdout)
    assert got["ray"] == got["local"] and sum(len(d["faces"]) for d in got["local"]) > 0
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "local", tmp_path / "ray", names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == 6  # 5 annotated copies and the manifest

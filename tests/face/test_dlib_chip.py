"""dlib's get_face_chip reproduced: parity with dlib 20.0.1's chips, and the traps that break it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionscale.errors import InvalidValueError, VisionscaleError
from visionscale.face import dlib_chip
from visionscale.face.dlib_chip import face_chip, face_chip_details, pyramid_down2

DATA = Path(__file__).parent / "data" / "dlib"
INDEX = json.loads((DATA / "astronaut_landmarks5.json").read_text())["images"]


def _load(name: str):
    entry = INDEX[name]
    img = np.asarray(Image.open(DATA / entry["image"]).convert("RGB"))
    return img, np.asarray(entry["landmarks5"], dtype=np.float64), np.load(DATA / entry["chip"])


@pytest.mark.parametrize("name", sorted(INDEX))
def test_chip_matches_dlib(name):
    img, lm, ref = _load(name)
    chip = face_chip(img, lm, size=150, padding=0.25)
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    diff = np.abs(chip.astype(np.int16) - ref.astype(np.int16))
    # Issue 14's bound: at most one grey level (float rounding of the transform may move a truncation by one).
    # Measured with dlib 20.0.1's chips: 0 everywhere for all four images.
    assert diff.max() <= 1, f"{name}: max diff {diff.max()}, {np.mean(diff > 0):.4%} of values differ"
    assert np.mean(diff > 0) <= 0.01


def test_rounding_instead_of_truncation_would_break_parity(monkeypatch):
    # The comparison above can fail: the same sampling with rounding instead of truncation moves many values
    # by one grey level (about half of the values, since fractions are spread evenly).
    img, lm, ref = _load("astronaut_rot15")
    orig = dlib_chip._bilinear_truncate

    def rounding(src, x, y):
        shifted = src.astype(np.float64)
        out = orig(src, x, y).astype(np.int16)
        h, w = src.shape[:2]
        left, top = np.floor(x).astype(int), np.floor(y).astype(int)
        ok = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
        lc, tc = np.where(ok, left, 0), np.where(ok, top, 0)
        fx, fy = (x - left)[..., None], (y - top)[..., None]
        v = ((1 - fy) * ((1 - fx) * shifted[tc, lc] + fx * shifted[tc, lc + 1])
             + fy * ((1 - fx) * shifted[tc + 1, lc] + fx * shifted[tc + 1, lc + 1]))
        return np.where(ok[..., None], np.rint(v), out).astype(np.uint8)

    monkeypatch.setattr(dlib_chip, "_bilinear_truncate", rounding)
    diff = np.abs(face_chip(img, lm).astype(np.int16) - ref.astype(np.int16))
    assert np.mean(diff > 0) > 0.2


def test_box_geometry_is_dlibs():
    # dlib's chip box spans size*scale - 1 between its inclusive corners, centred on the image of (size/2, size/2).
    _, lm, _ = _load("astronaut")
    rect, angle = face_chip_details(lm, 150, 0.25)
    width = rect[2] - rect[0] + 1
    assert rect[3] - rect[1] + 1 == pytest.approx(width, rel=1e-12)  # square box (float noise only)
    # the eyes are about 60 px apart in the image and 0.74/1.5*150 = 74 px in the chip: scale about 0.81
    assert width / 150 == pytest.approx(0.806, abs=0.01)
    # the astronaut's head is tilted by under 5 degrees
    assert abs(np.degrees(angle)) < 5


def test_pyramid_down2_values():
    # Constant images stay constant: the [1 4 6 4 1]^2 weights sum to 256 exactly.
    const = np.full((20, 30, 3), 201, np.uint8)
    out = pyramid_down2(const)
    assert out.shape == ((20 - 3) // 2, (30 - 3) // 2, 3)
    assert (out == 201).all()
    # One bright pixel at (2, 2) contributes 6*6*255/256 = 35.86 -> truncated to 35 at output (0, 0).
    img = np.zeros((12, 12, 3), np.uint8)
    img[2, 2] = 255
    down = pyramid_down2(img)
    assert down[0, 0, 0] == 35
    # its neighbour (2, 3) is weighted 6*4 at (0, 0) and 6*4 at (0, 1): 255*24/256 = 23.9 -> 23
    img2 = np.zeros((12, 12, 3), np.uint8)
    img2[2, 3] = 255
    down2 = pyramid_down2(img2)
    assert down2[0, 0, 0] == 23 and down2[0, 1, 0] == 23
    assert pyramid_down2(np.zeros((8, 40, 3), np.uint8)).size == 0


def test_large_face_uses_the_pyramid():
    # A 4x nearest-neighbour enlargement makes the face box about 480 px for a 150 px chip, so two pyramid
    # levels are used; the chip must still look like the original's (the pyramid's blur differs from plain
    # sampling, so only closeness on average is asserted: mean difference under 6 grey levels of 255).
    img, lm, ref = _load("astronaut")
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
    lm_big = lm * 4 + 1.5  # centre of the 4x4 block a pixel became
    rect, _ = face_chip_details(lm_big)
    assert rect[2] - rect[0] + 1 > 4 * 150 * 0.75
    chip = face_chip(big, lm_big)
    assert np.abs(chip.astype(float) - ref.astype(float)).mean() < 6


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.zeros((5, 3)), np.zeros(10), np.zeros((68, 2))])
def test_wrong_landmark_shape_raises(bad):
    img = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(InvalidValueError) as e:
        face_chip(img, bad)
    assert isinstance(e.value, VisionscaleError)


def test_bad_image_and_values_raise():
    lm = np.array(INDEX["astronaut"]["landmarks5"], dtype=np.float64)
    with pytest.raises(InvalidValueError):
        face_chip(np.zeros((100, 100), np.uint8), lm)
    with pytest.raises(InvalidValueError):
        face_chip(np.zeros((100, 100, 3), np.float32), lm)
    with pytest.raises(InvalidValueError):
        face_chip(np.zeros((100, 100, 3), np.uint8), lm * np.nan)
    with pytest.raises(InvalidValueError):
        face_chip(np.zeros((100, 100, 3), np.uint8), lm, size=0)


UPSCALED = json.loads((DATA / "astronaut_upscaled.json").read_text())


@pytest.mark.parametrize("name", sorted(UPSCALED))
def test_large_faces_take_dlibs_pyramid_path_exactly(name):
    # Faces of 270 and 360 px: the chip is cut after dlib's pyramid_down<2>; given dlib's
    # landmarks our chip equals dlib 20.0.1's pixel for pixel (measured: 0 grey levels apart).
    entry = UPSCALED[name]
    k = entry["repeat"]
    a = np.asarray(Image.open(DATA / "astronaut.png").convert("RGB"))
    big = np.ascontiguousarray(a.repeat(k, 0).repeat(k, 1))
    chip = face_chip(big, np.asarray(entry["landmarks5"], dtype=np.float64))
    np.testing.assert_array_equal(chip, np.load(DATA / f"{name}.chip.npy"))

"""dlib's HOG frontal face detector ported to numpy (visionscale.face.dlib_hog) against dlib
20.0.1's own outputs, made once offline (tools/make_dlib_hog_reference.py; dlib is not needed
here): the astronaut variants of tests/hog_variants.py (crops, scales 0.4-2x, rotations, a flip,
grey, faces cut by the border, two faces, upsample 0/1/2, lowered thresholds) and images with
no face. Also the windowed scan the face pipeline uses, the box snap (hog_rect) and the pieces
(overlap test, pyramid sizes, fHOG layout, input checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hog_variants as hv
from visionscale.errors import InvalidFileError, InvalidValueError
from visionscale.face import dlib_hog
from visionscale.face.dlib_align import DlibAligner, dlib_rect, hog_rect
from visionscale.face.dlib_hog import (
    HogFaceDetector,
    box_overlap,
    default_hog_detector,
    extract_fhog_features,
    pyramid_down6,
    pyramid_up,
)

DATA = Path(__file__).parent / "data" / "dlib"
REF = json.loads((DATA / "hog_boxes.json").read_text())
INDEX = json.loads((DATA / "astronaut_landmarks5.json").read_text())["images"]
RUNS = [(name, i) for name, v in REF["variants"].items() for i in range(len(v["runs"]))]

# Scores: ours are dlib's to float32 rounding. Both sum the same float32 terms in the same
# order (measured: identical on all 16 runs here and 200 other photos), but dlib's separable
# filters come from its own SVD and ours from LAPACK's, whose float32 terms may differ by an
# ulp: 1e-5 is ~100 ulps of a score of order 1, far below the gaps that decide anything.
SCORE_TOL = 1e-5


@pytest.fixture(scope="module")
def det():
    return default_hog_detector()


@pytest.mark.parametrize("name,run", RUNS, ids=[f"{n}-{i}" for n, i in RUNS])
def test_boxes_equal_dlibs(det, name, run):
    img = hv.make(name)
    assert list(img.shape) == REF["variants"][name]["shape"]
    r = REF["variants"][name]["runs"][run]
    got = det(img, r["upsample"], r["adjust_threshold"])
    want = r["dets"]
    assert [list(d.rect) for d in got] == [w[:4] for w in want]   # same count, same boxes, same order
    assert [d.filter for d in got] == [w[5] for w in want]
    for d, w in zip(got, want):
        assert abs(d.score - w[4]) <= SCORE_TOL
        assert d.score >= r["adjust_threshold"]


def test_reference_covers_the_cases():
    # The parity cases include: no face, several faces, boxes suppressed at a lowered threshold,
    # a face cut by the border, and grey input.
    counts = {n: [len(r["dets"]) for r in v["runs"]] for n, v in REF["variants"].items()}
    assert counts["blank"] == [0] and counts["noise"][0] == 0
    assert counts["two_faces"][0] == 2 and max(counts["crop"]) >= 2
    assert counts["border_left"][0] == 1
    assert REF["variants"]["crop_grey"]["shape"] == [260, 260]


def test_windowed_scan_finds_what_the_full_scan_finds(det):
    # The pipeline scans a few levels in a window; every raw detection there must be the full
    # scan's, bit for bit, including near the image border and the scalar filter columns.
    img = hv.make("crop")
    full = det.scan(img, 1, -1.2)
    assert len(full) > 20
    index = {(r, f, lev): s for s, r, f, lev in full}
    rng = np.random.default_rng(0)
    for s, r, f, lev in [full[i] for i in rng.choice(len(full), 8, replace=False)]:
        cx, cy = ((r[0] + r[2]) / 2 / 2 - 1.25, (r[1] + r[3]) / 2 / 2 - 0.75)   # upsampled -> input
        part = det.scan(img, 1, -1.2, levels=[lev - 1, lev, lev + 1], roi=(cx - 3, cy - 3, cx + 3, cy + 3))
        assert (s, r, f, lev) in part
        for p in part:
            assert index[(p[1], p[2], p[3])] == p[0]


def test_restricted_levels_only_report_those_levels(det):
    img = hv.make("crop")
    all_levels = {d[3] for d in det.scan(img, 1, -1.0)}
    some = sorted(all_levels)[:2]
    assert {d[3] for d in det.scan(img, 1, -1.0, levels=some)} <= set(some)
    assert det.scan(img, 1, 0.0, levels=[99]) == []


@pytest.mark.parametrize("name", sorted(INDEX))
def test_hog_rect_snaps_to_dlibs_box(name):
    # Keypoints like BlazeFace's (eye centres, nose, mouth) derived from dlib's landmarks: the
    # calibrated box is off dlib's by a few px, the snapped one is dlib's exactly.
    from PIL import Image

    img = np.asarray(Image.open(DATA / INDEX[name]["image"]).convert("RGB"))
    lm = np.asarray(INDEX[name]["landmarks5"], np.float64)
    e1, e2, nose = lm[0:2].mean(0), lm[2:4].mean(0), lm[4]
    mouth = nose + 0.9 * (nose - (e1 + e2) / 2)
    kp = np.stack([e2, e1, nose, mouth])
    assert list(dlib_rect(kp)) != INDEX[name]["rect_ltrb"]
    assert list(hog_rect(img, kp)) == INDEX[name]["rect_ltrb"]


def test_no_hog_face_falls_back_to_the_calibrated_box():
    grey = np.full((200, 200, 3), 128, np.uint8)
    kp = np.array([[80.0, 90.0], [120.0, 90.0], [100.0, 110.0], [100.0, 130.0]])
    assert hog_rect(grey, kp) is None
    aligner = DlibAligner(predictor=object())                   # face_rect needs no landmark model
    assert aligner.hog is True and aligner.upsample == 1
    rect, source = aligner.face_rect(grey, kp)
    assert source == "calibrated" and list(rect) == list(dlib_rect(kp))
    aligner.hog = False
    assert aligner.face_rect(hv.make("crop"), kp)[1] == "calibrated"
    # float images are not what dlib's detector takes: calibrated box, no error
    aligner.hog = True
    assert aligner.face_rect(grey.astype(np.float32), kp)[1] == "calibrated"


def test_box_overlap_by_hand():
    iou, cov = 0.33, 0.79
    a = (0, 0, 9, 9)                                            # 100 px
    assert not box_overlap(a, (10, 0, 19, 9), iou, cov)        # touching, no intersection
    # 5x10 = 50 inside a bounding box of 15x10 = 150: 1/3 > 0.33
    assert box_overlap(a, (5, 0, 14, 9), iou, cov)
    # 4x10 = 40 over 16x10 = 160: 0.25; covered 0.4 of each
    assert not box_overlap(a, (6, 0, 15, 9), iou, cov)
    # a small box inside a big one: covered 100 % of the small one
    assert box_overlap((0, 0, 99, 99), (10, 10, 19, 19), iou, cov)
    # dlib divides by the bounding box of both, not the union: two 10x10 boxes offset
    # diagonally by 3 intersect 7x7 = 49; the union is 151 (IoU 0.32), the bounding box 169 (0.29)
    assert not box_overlap(a, (3, 3, 12, 12), 0.30, 1.0)


def test_pyramid_sizes():
    img = np.zeros((7, 10, 3), np.uint8)
    assert pyramid_up(img).shape == (15, 22, 3)                # 2n+1 rows, 2m+2 columns
    assert pyramid_down6(np.zeros((60, 61), np.uint8)).shape == (50, 50)
    assert pyramid_up(np.zeros((0, 5, 3), np.uint8)).shape[:2] == (0, 0)
    # a constant image stays constant (weights sum to one; dlib truncates, so 200 may become 199)
    up = pyramid_up(np.full((9, 9, 3), 200, np.uint8))
    assert up.min() >= 199 and up.max() == 200


def test_num_levels(det):
    # levels while the 5/6-shrunk rectangle is still >= 64 px both ways: 80 -> 66 -> 55
    assert det.num_levels(80, 80) == 2
    assert det.num_levels(64, 500) == 1


def test_fhog_layout():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    f = extract_fhog_features(img)
    assert f.shape == (31, 4, 7)                               # round(50/8)-2, round(70/8)-2
    padded = extract_fhog_features(img, 8, 10, 10)
    assert padded.shape == (31, 4 + 9, 7 + 9)
    np.testing.assert_array_equal(padded[:, 4:8, 4:11], f)     # (10-1)//2 zero rows/cols before
    assert not padded[:, :4].any() and not padded[:, 8:].any()
    # each of the 4 normalisations is clipped at 0.2 and halved: at most 4 x 0.1 per orientation
    assert (f >= 0).all() and 0.1 < f[:27].max() <= 0.4 + 1e-6
    assert extract_fhog_features(np.zeros((12, 40, 3), np.uint8)).shape == (31, 0, 0)
    # grey input works the same way; a flat image has no gradient, hence no features
    assert not extract_fhog_features(np.full((40, 40), 7, np.uint8)).any()


def test_input_checks(det):
    with pytest.raises(InvalidValueError):
        det(np.zeros((50, 50, 3), np.float32))
    with pytest.raises(InvalidValueError):
        det(np.zeros((50, 50, 4), np.uint8))
    with pytest.raises(InvalidValueError):
        det(np.zeros((50, 50, 3), np.uint8), upsample=-1)
    with pytest.raises(InvalidValueError):
        extract_fhog_features(np.zeros((50, 50, 3), np.uint8), cell_size=1)
    assert det(np.zeros((0, 0, 3), np.uint8)) == []
    assert det(np.zeros((5, 5, 3), np.uint8), upsample=0) == []


def test_weights_file(tmp_path):
    d = HogFaceDetector()
    assert len(d.filters) == 5 and (d.fhog_height, d.fhog_width) == (10, 10)
    assert d.meta["dlib_version"].startswith("20.0.1") and 0.3 < d.iou_thresh < 0.35
    assert (dlib_hog.WEIGHTS_PATH.with_name("dlib_hog_frontal.LICENSE.txt")).read_text().count("Boost Software License")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InvalidFileError):
        HogFaceDetector(bad)
    with np.load(dlib_hog.WEIGHTS_PATH) as z:
        np.savez(tmp_path / "short.npz", weights=z["weights"][:, :100], meta=z["meta"])
    with pytest.raises(InvalidFileError):
        HogFaceDetector(tmp_path / "short.npz")

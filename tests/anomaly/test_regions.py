"""Per-image outputs (visionscale.anomaly.regions): regions and masks in image pixels, files, FPR threshold."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionscale.anomaly import regions as R
from visionscale.errors import InvalidValueError


def _torch_resample(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference resampling: what predict.py's heatmap overlays use."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _two_blobs() -> np.ndarray:
    """A 16 x 24 map with blob A (0.9) on rows 2..4, cols 3..6 and blob B (1.0) on rows 10..12, cols 15..19."""
    amap = np.zeros((16, 24), dtype=np.float32)
    amap[2:5, 3:7] = 0.9
    amap[10:13, 15:20] = 1.0
    return amap


# ----------------------------------------------------------------------------------------
# Regions


def test_two_blobs_map_at_quarter_size_boxes_in_image_pixels():
    # Image 64 x 96 = 4x the map. Bilinear (half-pixel centres) samples a step edge between map
    # columns c-1 and c at fractions 0.125, 0.375 (image columns 4c-2, 4c-1), then 0.625, 0.875
    # (4c, 4c+1). With threshold / value = 0.5 (A) and 0.45 (B), both strictly between 0.375 and
    # 0.625, the first anomalous column is 4c: each box is the blob's footprint, x 4x and y 4x.
    # In each corner, the 2 x 2 pixels have products of fractions 0.625^2 = 0.39 (below both
    # ratios), 0.55, 0.55, 0.77: one pixel per corner is lost, 4 per blob.
    regions = R.defect_regions(_two_blobs(), 0.45, image_size=(64, 96))
    assert [r["box"] for r in regions] == [[60, 40, 80, 52], [12, 8, 28, 20]]  # B (max 1.0) first
    assert [r["box_xywh"] for r in regions] == [[60, 40, 20, 12], [12, 8, 16, 12]]
    assert [r["area_px"] for r in regions] == [20 * 12 - 4, 16 * 12 - 4]
    # The shapes are symmetric, so the centroid is the box's centre (pixel indices).
    assert regions[0]["centroid"] == pytest.approx([(60 + 79) / 2, (40 + 51) / 2], abs=1e-9)
    assert regions[1]["centroid"] == pytest.approx([(12 + 27) / 2, (8 + 19) / 2], abs=1e-9)
    # Interior pixels interpolate between equal values: the value itself, up to float32
    # rounding of w * v + (1 - w) * v (a few ulp, 1e-6 relative).
    assert regions[0]["max_score"] == pytest.approx(1.0, rel=1e-6)
    assert regions[1]["max_score"] == pytest.approx(0.9, rel=1e-6)
    # The mean over the region's pixels of the resampled map, recomputed with torch's
    # interpolation: float32 rounding only (1e-5 relative).
    full = _torch_resample(_two_blobs(), (64, 96))
    for r in regions:
        x0, y0, x1, y1 = r["box"]
        crop = full[y0:y1, x0:x1]
        assert r["mean_score"] == pytest.approx(float(crop[crop >= 0.45].mean()), rel=1e-5)


def test_two_blobs_map_at_full_size():
    amap = np.zeros((64, 96), dtype=np.float32)
    amap[8:20, 12:28] = 0.9
    amap[40:52, 60:80] = 1.0
    regions = R.defect_regions(amap, 0.45, image_size=(64, 96))
    assert [r["box"] for r in regions] == [[60, 40, 80, 52], [12, 8, 28, 20]]
    assert [r["area_px"] for r in regions] == [240, 192]
    # No resampling: the scores are the map's own float32 values, exactly.
    assert [r["max_score"] for r in regions] == [1.0, float(np.float32(0.9))]
    assert [r["mean_score"] for r in regions] == [1.0, float(np.float32(0.9))]
    # Without image_size the map's size is the image's: the same answer.
    assert R.defect_regions(amap, 0.45) == regions


def test_image_size_none_gives_map_pixels_and_ties_sort_by_area():
    regions = R.defect_regions((_two_blobs() > 0).astype(np.float32), 0.5)  # both blobs score 1
    assert [r["box"] for r in regions] == [[15, 10, 20, 13], [3, 2, 7, 5]]  # equal max: larger first
    assert [r["area_px"] for r in regions] == [15, 12]


def test_min_area_drops_small_regions_and_empty_map_has_none():
    amap = np.zeros((20, 20), dtype=np.float32)
    amap[2, 2] = 5.0  # 1 pixel
    amap[10:13, 10:13] = 1.0  # 9 pixels
    assert [r["area_px"] for r in R.defect_regions(amap, 0.5)] == [1, 9]
    assert [r["area_px"] for r in R.defect_regions(amap, 0.5, min_area=2)] == [9]
    assert [r["area_px"] for r in R.defect_regions(amap, 0.5, min_area=9)] == [9]
    assert R.defect_regions(amap, 0.5, min_area=10) == []
    assert R.defect_regions(amap, 6.0) == []
    # At 3x, samples fall at map offsets 0, +-1/3, +-2/3 around each map pixel. The peak (5.0,
    # threshold 0.5) keeps 5 * fx * fy >= 0.5 out to offset 2/3 each way (5 * 1/3 * 1/3 = 0.56):
    # 5 x 5 image pixels. The 3 x 3 block of 1.0 keeps fractions >= 2/3 on each side: 9 x 9,
    # less the 4 corners where 2/3 * 2/3 = 0.44 < 0.5.
    up = R.defect_regions(amap, 0.5, image_size=(60, 60))
    assert [(r["box"], r["area_px"], r["max_score"]) for r in up] == [
        ([5, 5, 10, 10], 25, 5.0), ([30, 30, 39, 39], 77, 1.0)]
    # min_area counts image pixels, not map pixels.
    assert [r["area_px"] for r in R.defect_regions(amap, 0.5, image_size=(60, 60), min_area=26)] == [77]


def _regionprops_reference(mask: np.ndarray, values: np.ndarray, connectivity: int) -> list[dict]:
    measure = pytest.importorskip("skimage.measure")
    labels = measure.label(mask, connectivity=1 if connectivity == 4 else 2)
    out = []
    for p in measure.regionprops(labels, intensity_image=values):
        r0, c0, r1, c1 = p.bbox
        out.append({"box": [c0, r0, c1, r1], "area_px": int(p.area), "max_score": float(p.intensity_max),
                    "mean_score": float(p.intensity_mean), "centroid": [p.centroid[1], p.centroid[0]]})
    return sorted(out, key=lambda r: (r["box"][1], r["box"][0]))


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("band_pixels", [1, 97, 1 << 20])
def test_regions_equal_regionprops_of_the_mask_whatever_the_bands(monkeypatch, connectivity, band_pixels):
    # A random map at a non-integer scale (13 x 17 -> 50 x 61) gives many irregular regions,
    # several of which cross band boundaries (band_pixels=1: one row per band; 97: one or two).
    monkeypatch.setattr(R, "BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(3)
    amap = rng.random((13, 17)).astype(np.float32)
    size = (50, 61)
    mask = R.predicted_mask(amap, 0.6, size) > 0
    ref = _regionprops_reference(mask, _torch_resample(amap, size), connectivity)
    got = sorted(R.defect_regions(amap, 0.6, image_size=size, connectivity=connectivity),
                 key=lambda r: (r["box"][1], r["box"][0]))
    assert len(ref) > 5  # a real test of joining regions
    assert [r["box"] for r in got] == [r["box"] for r in ref]
    assert [r["area_px"] for r in got] == [r["area_px"] for r in ref]
    for g, r in zip(got, ref):
        # Scores: our resampling vs torch's, float32 rounding of values in [0, 1] (1e-6 absolute).
        assert g["max_score"] == pytest.approx(r["max_score"], abs=1e-6)
        assert g["mean_score"] == pytest.approx(r["mean_score"], abs=1e-6)
        # Centroids: means of integer indices, float64 sums of at most ~3000 terms.
        assert g["centroid"] == pytest.approx(r["centroid"], abs=1e-9)


def test_connectivity_decides_diagonal_contact_across_a_band_boundary(monkeypatch):
    monkeypatch.setattr(R, "BAND_PIXELS", 1)  # one row per band: the two pixels are in two bands
    amap = np.zeros((4, 4), dtype=np.float32)
    amap[1, 1] = amap[2, 2] = 1.0
    assert [r["box"] for r in R.defect_regions(amap, 0.5)] == [[1, 1, 3, 3]]
    assert sorted(r["box"] for r in R.defect_regions(amap, 0.5, connectivity=4)) == [[1, 1, 2, 2], [2, 2, 3, 3]]


def test_a_u_shape_joined_over_many_bands(monkeypatch):
    # The two arms are separate regions in every band but the last: union-find must join them.
    monkeypatch.setattr(R, "BAND_PIXELS", 8)  # one row per band (width 8)
    amap = np.zeros((6, 8), dtype=np.float32)
    amap[0:5, 1] = amap[0:5, 6] = 1.0
    amap[5, 1:7] = 2.0
    regions = R.defect_regions(amap, 0.5)
    assert len(regions) == 1
    assert regions[0]["box"] == [1, 0, 7, 6]
    assert regions[0]["area_px"] == 5 + 5 + 6
    assert regions[0]["max_score"] == 2.0
    assert regions[0]["mean_score"] == pytest.approx((10 * 1.0 + 6 * 2.0) / 16, rel=1e-12)


def test_without_scipy_8_connectivity_falls_back_and_4_is_refused(monkeypatch):
    rng = np.random.default_rng(0)
    amap = rng.random((20, 30)).astype(np.float32)
    with_scipy = R.defect_regions(amap, 0.7, image_size=(41, 47))
    monkeypatch.setattr(R, "_scipy_label", lambda: None)
    assert R.defect_regions(amap, 0.7, image_size=(41, 47)) == with_scipy
    with pytest.raises(InvalidValueError, match="scipy") as e:
        R.defect_regions(amap, 0.7, connectivity=4)
    assert e.value.fields == ("connectivity",)


# ----------------------------------------------------------------------------------------
# Mask


def test_predicted_mask_is_torch_bilinear_then_threshold():
    rng = np.random.default_rng(1)
    amap = rng.random((16, 16)).astype(np.float32)
    for size in [(64, 64), (50, 77), (9, 11)]:  # up, non-integer, down
        mask = R.predicted_mask(amap, 0.5, size)
        assert mask.shape == size and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        ref = _torch_resample(amap, size)
        # Compare away from the threshold: rounding may differ by a few float32 ulp (values
        # in [0, 1], so 1e-6 absolute is ~8 ulp).
        clear = np.abs(ref - 0.5) > 1e-6
        np.testing.assert_array_equal(mask[clear], np.where(ref[clear] >= 0.5, 255, 0))
        assert clear.mean() > 0.99


def test_predicted_mask_at_full_size_is_the_map_thresholded(monkeypatch):
    monkeypatch.setattr(R, "BAND_PIXELS", 50)  # several bands
    rng = np.random.default_rng(2)
    amap = rng.random((33, 21)).astype(np.float32)
    t = float(amap[5, 5])  # a threshold equal to a pixel: that pixel is anomalous (>=)
    mask = R.predicted_mask(amap, t, (33, 21))
    np.testing.assert_array_equal(mask, np.where(amap >= t, 255, 0))
    assert mask[5, 5] == 255


def test_predicted_mask_compares_in_float64():
    # 0.1 is not a float32: the float32 map value 0.1f is above the float64 0.1, so it is
    # anomalous at 0.1 but not at the float64 just above 0.1f.
    amap = np.full((2, 2), 0.1, dtype=np.float32)
    assert R.predicted_mask(amap, 0.1, (2, 2)).all()
    above = float(np.nextafter(np.float64(np.float32(0.1)), np.inf))
    assert not R.predicted_mask(amap, above, (2, 2)).any()


@pytest.mark.parametrize("bad, field", [
    (dict(amap=np.zeros((2, 2, 2))), "amap"),
    (dict(amap=np.zeros((0, 3))), "amap"),
    (dict(amap=np.array([[0.0, np.nan]])), "amap"),
    (dict(amap=np.array([["a", "b"]])), "amap"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(image_size=(0, 5)), "image_size"),
    (dict(image_size=(5,)), "image_size"),
    (dict(image_size=(5.5, 5)), "image_size"),
    (dict(min_area=-1), "min_area"),
    (dict(connectivity=6), "connectivity"),
])
def test_invalid_arguments_name_their_field(bad, field):
    kw = dict(amap=np.zeros((4, 4), dtype=np.float32), threshold=0.5, image_size=(8, 8), min_area=0, connectivity=8)
    kw.update(bad)
    with pytest.raises(InvalidValueError) as e:
        R.defect_regions(kw.pop("amap"), kw.pop("threshold"), **kw)
    assert e.value.fields == (field,)


# ----------------------------------------------------------------------------------------
# Files


def test_write_region_outputs_files_and_contents(tmp_path):
    from PIL import Image

    amap = _two_blobs()
    out = R.write_region_outputs("part", amap, 0.45, (64, 96), tmp_path / "new", raw=True)
    folder = tmp_path / "new"
    assert sorted(p.name for p in folder.iterdir()) == ["part_map.npy", "part_mask.png", "part_regions.json"]
    assert out["mask"] == folder / "part_mask.png" and out["json"] == folder / "part_regions.json"
    assert out["map"] == folder / "part_map.npy"
    with Image.open(out["mask"]) as im:
        assert im.mode == "L" and im.size == (96, 64)  # PIL: (width, height)
        png = np.asarray(im)
    np.testing.assert_array_equal(png, R.predicted_mask(amap, 0.45, (64, 96)))
    doc = json.loads(out["json"].read_text())
    assert doc["image_size"] == {"width": 96, "height": 64}
    assert doc["map_size"] == {"width": 24, "height": 16}
    assert doc["map_scale"] == {"x": 4.0, "y": 4.0}
    assert doc["threshold"] == 0.45 and doc["map_file"] == "part_map.npy"
    assert doc["regions"] == out["regions"] == R.defect_regions(amap, 0.45, image_size=(64, 96))
    # Boxes, mask and areas agree pixel for pixel.
    for r in doc["regions"]:
        x0, y0, x1, y1 = r["box"]
        assert int((png[y0:y1, x0:x1] == 255).sum()) == r["area_px"]
    assert sum(r["area_px"] for r in doc["regions"]) == int((png == 255).sum())
    raw = np.load(out["map"], allow_pickle=False)
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, amap)


def test_write_region_outputs_only_what_is_asked(tmp_path):
    amap = _two_blobs()
    out = R.write_region_outputs("a", amap, 0.45, (64, 96), tmp_path, mask=False)
    assert set(out) == {"json", "regions"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_regions.json"]
    out = R.write_region_outputs("b", amap, 0.45, (64, 96), tmp_path, boxes=False)
    assert set(out) == {"mask"}
    out = R.write_region_outputs("c", amap, 0.45, (64, 96), tmp_path, mask=False, boxes=False, raw=True)
    assert set(out) == {"map", "json"}
    doc = json.loads(out["json"].read_text())
    assert "regions" not in doc and doc["map_file"] == "c_map.npy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_regions.json", "b_mask.png", "c_map.npy",
                                                           "c_regions.json"]


def test_write_region_outputs_is_atomic(tmp_path, monkeypatch):
    amap = _two_blobs()
    R.write_region_outputs("part", amap, 0.45, (64, 96), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = pathlib.Path.write_bytes

    def half_then_fail(self, data):
        real(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        R.write_region_outputs("part", amap, 0.9, (64, 96), tmp_path)
    # The earlier files are intact and no temporary file is left.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("stem", ["", "a/b", "..", 3])
def test_write_region_outputs_refuses_stems_with_folders(tmp_path, stem):
    with pytest.raises(InvalidValueError) as e:
        R.write_region_outputs(stem, _two_blobs(), 0.5, (16, 24), tmp_path)
    assert e.value.fields == ("stem",)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# Threshold at a false positive rate


def test_threshold_at_fpr_exact():
    scores = np.arange(1.0, 11.0)  # 1..10
    t = R.threshold_at_fpr(scores, 0.2)
    assert t == np.nextafter(8.0, np.inf)  # flags 9 and 10: 2/10 = 0.2
    assert R.threshold_at_fpr(scores, 0.25) == t  # 2.5 scores: still 2
    assert R.threshold_at_fpr(scores, 0.3) == np.nextafter(7.0, np.inf)
    assert R.threshold_at_fpr(scores, 0.9) == np.nextafter(1.0, np.inf)  # all but the lowest
    assert R.threshold_at_fpr(list(scores[::-1]), 0.2) == t  # order and container do not matter


def test_threshold_at_fpr_with_ties_stays_under_the_target():
    # 0.5 of 6 scores allows 3; but 3 is tied three times, so only 4 and 5 can be flagged.
    r = R.fpr_threshold([1, 2, 3, 3, 3, 5, 4][1:], 0.5)  # [2, 3, 3, 3, 5, 4]
    assert r.threshold == np.nextafter(3.0, np.inf)
    assert r.achieved_fpr == 2 / 6 and r.num_scores == 6 and r.resolved


def test_threshold_at_fpr_floor_of_a_rounded_product():
    # 0.29 * 100 is 28.999999999999996 in float64; 29 of 100 scores is still <= 0.29.
    r = R.fpr_threshold(np.arange(100.0), 0.29)
    assert r.threshold == np.nextafter(70.0, np.inf) and r.achieved_fpr == 0.29


def test_threshold_at_fpr_too_few_scores(caplog):
    scores = [0.3, 0.1, 0.7, 0.2, 0.5, 0.4, 0.6, 0.05, 0.15, 0.25]
    with caplog.at_level(logging.WARNING, logger="visionscale.anomaly.regions"):
        r = R.fpr_threshold(scores, 0.01)
    assert r.threshold == np.nextafter(0.7, np.inf)  # just above the highest normal score
    assert (r.resolved, r.achieved_fpr, r.num_scores) == (False, 0.0, 10)
    assert "10 normal scores cannot resolve an FPR of 0.01" in caplog.text
    # Exactly one score resolves 0.1 of 10: resolved, and the threshold flags the highest.
    r = R.fpr_threshold(scores, 0.1)
    assert r.resolved and r.threshold == np.nextafter(0.6, np.inf) and r.achieved_fpr == 0.1


def test_threshold_at_fpr_steps_in_float32_for_float32_scores():
    scores = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    t = R.threshold_at_fpr(scores, 0.5)  # allows 1 of 3: above the 2nd highest, 0.2f
    assert t == float(np.nextafter(np.float32(0.2), np.float32(np.inf)))
    # Compared in float32 (as maps are), the threshold still leaves 0.2f normal.
    assert (scores >= np.float32(t)).tolist() == [False, False, True]


@pytest.mark.parametrize("scores, fpr, field", [
    ([1.0, 2.0], 0.0, "target_fpr"),
    ([1.0, 2.0], 1.0, "target_fpr"),
    ([1.0, 2.0], -0.1, "target_fpr"),
    ([1.0, 2.0], float("nan"), "target_fpr"),
    ([], 0.1, "normal_scores"),
    ([1.0, float("nan")], 0.1, "normal_scores"),
    ([1.0, float("inf")], 0.1, "normal_scores"),
    (["a", "b"], 0.1, "normal_scores"),
])
def test_threshold_at_fpr_invalid(scores, fpr, field):
    with pytest.raises(InvalidValueError) as e:
        R.threshold_at_fpr(scores, fpr)
    assert e.value.fields == (field,)

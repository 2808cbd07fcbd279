"""Streaming pixel metrics: against the exact path, their stated error bounds, order independence, errors."""

from __future__ import annotations

import numpy as np
import pytest

from visionscale.anomaly import metrics as M
from visionscale.anomaly import streaming_metrics as S
from visionscale.anomaly.streaming_metrics import PixelMetricAccumulator, evaluate_streaming
from visionscale.errors import InvalidValueError


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` pixels (in Fourier space), unit variance."""
    f = np.fft.rfft2(rng.normal(size=(size, size)))
    ky, kx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    f *= np.exp(-2 * (np.pi * sigma) ** 2 * (kx**2 + ky**2))
    x = np.fft.irfft2(f, s=(size, size))
    return (x - x.mean()) / x.std()


def make_maps(seed: int = 0, n: int = 20, size: int = 128, outliers: float = 0.0):
    """``n`` float32 maps (smooth field + noise) and bool masks; 2 images in 3 get 1-3 disc defects
    whose scores are raised by a random amount, so normal and anomalous scores overlap (pixel
    AUROC about 0.8). With ``outliers``, every map but the first gets 5 pixels at 0.5-1x that
    value anywhere (normal or not): the range must grow after the first update."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps, masks = [], []
    for i in range(n):
        amap = _smooth_field(rng, size, 4.0) + 0.3 * rng.normal(size=(size, size))
        mask = np.zeros((size, size), dtype=bool)
        if i % 3:
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.integers(10, size - 10, 2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(3, 12) ** 2
                mask |= disc
                amap += 1.5 * rng.uniform(0.5, 1.5) * disc
        if outliers and i:
            amap.flat[rng.integers(0, size * size, 5)] = outliers * rng.uniform(0.5, 1.0, 5)
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return maps, masks


def accumulate(maps, masks, **kw) -> PixelMetricAccumulator:
    acc = PixelMetricAccumulator(**kw)
    for amap, mask in zip(maps, masks):
        acc.update(amap, mask if mask.any() else None)
    return acc


def exact(maps, masks) -> M.ImageMetrics:
    return M.evaluate_scores([0, 1], [0.0, 1.0], np.stack(maps), np.stack(masks))


@pytest.fixture(scope="module")
def smooth():
    maps, masks = make_maps(seed=0)
    return maps, masks, exact(maps, masks)


@pytest.fixture(scope="module")
def heavy():
    # Outliers up to 300x the unit spread of the scores, about 30x beyond their range [-4.5, 6]:
    # the cells end up 64 times wider than after the first map.
    maps, masks = make_maps(seed=1, outliers=300.0)
    return maps, masks, exact(maps, masks)


def _check_against_exact(r: S.PixelMetrics, ex: M.ImageMetrics) -> None:
    # The bounds are proved in the module docstring; 1e-12 absorbs the float sums' rounding
    # (values of order 1, a few thousand terms).
    assert abs(r.pixel_auroc - ex.pixel_auroc) <= r.auroc_error_bound + 1e-12
    assert abs(r.aupro - ex.aupro) <= r.aupro_error_bound + 1e-12
    # The binned F1 is the exact F1 of one threshold, so never above the exact optimum.
    assert ex.pixel_f1 - r.f1_error_bound - 1e-12 <= r.pixel_f1 <= ex.pixel_f1 + 1e-12
    # The target of issue 13: within 1e-3 of the exact values (metrics are in [0, 1]).
    assert abs(r.pixel_auroc - ex.pixel_auroc) <= 1e-3
    assert abs(r.aupro - ex.aupro) <= 1e-3
    assert abs(r.pixel_f1 - ex.pixel_f1) <= 1e-3


def test_matches_exact_path_on_smooth_maps(smooth):
    maps, masks, ex = smooth
    r = accumulate(maps, masks).result()
    _check_against_exact(r, ex)
    # On smooth maps 2**16 cells leave the bounds themselves well under the target.
    assert max(r.auroc_error_bound, r.aupro_error_bound, r.f1_error_bound) <= 1e-3
    assert 0.6 < ex.pixel_auroc < 0.95  # the data are neither trivial nor chance
    assert r.notes == ()
    assert r.num_pixels == 20 * 128 * 128
    assert r.num_anomalous_pixels == int(np.stack(masks).sum())
    assert r.num_regions == sum(M.connected_components(m)[1] for m in masks)


def test_range_grows_for_outliers_and_stays_within_target(heavy):
    maps, masks, ex = heavy
    acc = PixelMetricAccumulator()
    acc.update(maps[0], masks[0] if masks[0].any() else None)
    first_width = acc.bin_width
    for amap, mask in zip(maps[1:], masks[1:]):
        acc.update(amap, mask if mask.any() else None)
    assert acc.bin_width >= 16 * first_width  # the range did grow (by powers of two)
    r = acc.result()
    _check_against_exact(r, ex)
    assert r.roc_thresholds[1] >= 150.0  # the outliers kept their own cells at the top


def test_value_range_puts_outliers_in_an_overflow_cell(heavy):
    maps, masks, ex = heavy
    auto = accumulate(maps, masks).result()
    fixed = accumulate(maps, masks, value_range=(-5.0, 10.0)).result()
    _check_against_exact(fixed, ex)
    # Fixed fine cells over the normal range beat cells stretched to the outliers.
    assert fixed.bin_width < auto.bin_width
    assert fixed.aupro_error_bound < auto.aupro_error_bound
    # A range narrower than the scores still gives exact points; the underflow cell's point is
    # "every pixel", at the smallest score.
    narrow = accumulate(maps, masks, value_range=(-1.0, 3.0)).result()
    _check_against_exact(narrow, ex)
    assert narrow.roc_thresholds[-1] == pytest.approx(min(float(m.min()) for m in maps), rel=0, abs=0)


def test_every_curve_point_is_a_point_of_the_exact_curve(heavy):
    maps, masks, _ = heavy
    r = accumulate(maps, masks, bins=256).result(max_curve_points=50)  # coarse cells: a real test
    scores = np.stack(maps).astype(np.float64)
    gts = np.stack(masks)
    neg, pos = scores[~gts], scores[gts]
    regions = [(i, lab == k) for i, m in enumerate(masks) for lab, n in [M.connected_components(m)]
               for k in range(1, n + 1)]
    assert len(r.roc_fpr) <= 52
    for t, fpr, tpr in zip(r.roc_thresholds[1:], r.roc_fpr[1:], r.roc_tpr[1:]):
        # Counts are integers: the rates are equal up to the one division's rounding.
        assert fpr == pytest.approx(np.mean(neg >= t), rel=1e-12, abs=0)
        assert tpr == pytest.approx(np.mean(pos >= t), rel=1e-12, abs=0)
    for t, fpr, pro in zip(r.pro_thresholds[1:], r.pro_fpr[1:], r.pro_overlap[1:]):
        overlap = np.mean([np.mean(scores[i][reg] >= t) for i, reg in regions])
        assert fpr == pytest.approx(np.mean(neg >= t), rel=1e-12, abs=0)
        # A sum of up to ~50 region fractions in another order: 1e-12 covers the rounding.
        assert pro == pytest.approx(overlap, rel=0, abs=1e-12)
    # The reported threshold gives the reported F1 under the rule score >= t.
    tp = np.sum(pos >= r.pixel_threshold)
    fp = np.sum(neg >= r.pixel_threshold)
    assert r.pixel_f1 == pytest.approx(2 * tp / (tp + fp + pos.size), rel=1e-12, abs=0)


def test_error_bounds_hold_and_are_reached_on_worst_case_cells():
    # Cells of width 1 over [0, 60]; in every cell the anomalous score (k + 0.9) beats the normal
    # one (k + 0.1), so inside each cell the exact curve goes straight up, then right: the
    # trapezoid misses half of each rectangle, which is what the bounds allow.
    n = 60
    amap = np.stack([np.arange(n) + 0.1, np.arange(n) + 0.9])  # row 0 normal, row 1 one defect
    mask = np.zeros(amap.shape, dtype=bool)
    mask[1] = True
    acc = PixelMetricAccumulator(bins=64, value_range=(0.0, float(n)))
    acc.update(amap, mask)
    assert acc.bin_width == 1.0
    limit = 0.305  # cuts the 19th cell of FPR width 1/60: the bound's "whole rectangle" term
    r = acc.result(fpr_limit=limit)
    ex = M.evaluate_scores([0, 1], [0.0, 1.0], amap[None], mask[None], fpr_limit=limit)
    auroc_err, aupro_err = abs(r.pixel_auroc - ex.pixel_auroc), abs(r.aupro - ex.aupro)
    # Exact: AUROC = P(k >= j) = (n + 1) / (2n); binned: the ties in each cell count 1/2.
    assert ex.pixel_auroc == pytest.approx((n + 1) / (2 * n), rel=1e-12)
    assert r.pixel_auroc == pytest.approx(0.5, rel=1e-12)
    # The bounds hold, and are nearly reached (so none of their terms can be dropped); the
    # margins are the values' float rounding (1e-12) and, for AUPRO, the cut cell, whose error is
    # 85% of its term (the curve is interpolated at the limit): 0.5% of the whole bound here.
    assert auroc_err <= r.auroc_error_bound + 1e-12 and auroc_err >= r.auroc_error_bound - 1e-12
    assert r.aupro_error_bound - 0.01 * r.aupro_error_bound <= aupro_err <= r.aupro_error_bound + 1e-12
    assert ex.pixel_f1 - r.pixel_f1 <= r.f1_error_bound + 1e-12


def test_quantised_maps_give_the_exact_results():
    # Scores on a grid of 1/8: every distinct score has a cell of its own, so nothing is binned.
    maps, masks = make_maps(seed=2, n=8, size=48)
    maps = [np.round(m * 8) / 8 for m in maps]
    ex = exact(maps, masks)
    r = accumulate(maps, masks).result()
    assert r.cells_used == np.unique(np.stack(maps)).size
    # Same points, same trapezoids, summed in the same order up to cumsum vs sorted cumsum.
    assert r.pixel_auroc == pytest.approx(ex.pixel_auroc, rel=1e-12, abs=0)
    assert r.aupro == pytest.approx(ex.aupro, rel=1e-12, abs=0)
    assert r.pixel_f1 == pytest.approx(ex.pixel_f1, rel=1e-12, abs=0)
    assert r.pixel_threshold == ex.pixel_threshold


def test_order_merge_and_split_do_not_change_the_result(heavy):
    maps, masks, _ = heavy
    ref = accumulate(maps, masks)
    order = np.random.default_rng(3).permutation(len(maps))
    shuffled = accumulate([maps[i] for i in order], [masks[i] for i in order])
    halves = [accumulate(maps[k::2], masks[k::2]) for k in (0, 1)]
    halves[1].merge(halves[0])
    # Normal images cut in two (a defect's region must stay whole: PRO is per region).
    split = PixelMetricAccumulator()
    for amap, mask in zip(maps, masks):
        if mask.any():
            split.update(amap, mask)
        else:
            split.update(amap[:50], None)
            split.update(amap[50:], None)
    r0 = ref.result()
    for other in (shuffled, halves[1], split):
        r = other.result()
        assert other.bin_width == ref.bin_width
        # Counts are integers and the cells canonical: bit-identical ROC figures.
        assert r.pixel_auroc == r0.pixel_auroc
        assert (r.pixel_f1, r.pixel_threshold) == (r0.pixel_f1, r0.pixel_threshold)
        np.testing.assert_array_equal(r.roc_tpr, r0.roc_tpr)
        # PRO sums float weights (1 / region size) in another order: rounding only.
        assert r.aupro == pytest.approx(r0.aupro, rel=1e-12, abs=0)


def test_blocks_inside_a_large_map_do_not_change_the_counts(monkeypatch, smooth):
    maps, masks, _ = smooth
    ref = accumulate(maps[:4], masks[:4]).result()
    monkeypatch.setattr(S, "_BLOCK", 1000)  # 128 x 128 maps now go through 17 blocks each
    r = accumulate(maps[:4], masks[:4]).result()
    assert (r.pixel_auroc, r.pixel_f1, r.cells_used) == (ref.pixel_auroc, ref.pixel_f1, ref.cells_used)
    assert r.aupro == pytest.approx(ref.aupro, rel=1e-12, abs=0)  # float sums regrouped


def test_state_size_does_not_grow_with_images_or_range():
    acc = PixelMetricAccumulator(bins=1024)
    before = acc.nbytes
    rng = np.random.default_rng(4)
    for i in range(30):
        acc.update(rng.normal(scale=10.0**(i % 7), size=(16, 16)), None)
    assert acc.nbytes == before == 3 * 8 * 1024


def test_all_normal_masks_skip_pixel_metrics_like_the_exact_path(smooth):
    maps, _, _ = smooth
    acc = PixelMetricAccumulator()
    for amap in maps[:3]:
        acc.update(amap, None)
    acc.update(maps[3], np.zeros(maps[3].shape, dtype=np.uint8))  # an all-zero mask is a good image
    r = acc.result()
    assert (r.pixel_auroc, r.pixel_f1, r.pixel_threshold, r.aupro) == (None, None, None, None)
    ex = M.evaluate_scores([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], np.stack(maps[:4]), np.zeros((4, 128, 128)))
    got = evaluate_streaming([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], acc)
    assert got.notes == ex.notes == (M.ONE_PIXEL_CLASS_NOTE,)
    assert PixelMetricAccumulator().result().notes == (M.ONE_PIXEL_CLASS_NOTE,)


def test_evaluate_streaming_matches_evaluate_scores(smooth):
    maps, masks, _ = smooth
    labels = np.array([int(m.any()) for m in masks])
    scores = np.array([float(a.max()) for a in maps])
    ex = M.evaluate_scores(labels, scores, np.stack(maps), np.stack(masks))
    got = evaluate_streaming(labels, scores, accumulate(maps, masks))
    # Image metrics come from the same exact functions: equal, not close.
    assert (got.image_auroc, got.image_f1, got.image_threshold) == (ex.image_auroc, ex.image_f1, ex.image_threshold)
    assert (got.num_images, got.num_anomalous, got.fpr_limit, got.notes) == (
        ex.num_images, ex.num_anomalous, ex.fpr_limit, ex.notes)
    for name in ("pixel_auroc", "aupro", "pixel_f1"):
        assert getattr(got, name) == pytest.approx(getattr(ex, name), rel=0, abs=1e-3)  # the target
    assert set(got.as_dict()) == set(ex.as_dict())
    no_masks = evaluate_streaming(labels, scores, None)
    assert no_masks.notes == M.evaluate_scores(labels, scores).notes == (M.NO_MASKS_NOTE,)
    with pytest.raises(InvalidValueError, match="19 images but image_labels has 20") as e:
        evaluate_streaming(labels, scores, accumulate(maps[1:], masks[1:]))
    assert e.value.fields == ("pixels",)


def test_nan_names_the_image_and_leaves_the_state_unchanged(smooth):
    maps, masks, _ = smooth
    acc = accumulate(maps[:2], masks[:2])
    before = acc.result()
    bad = maps[2].copy()
    bad[5, 7] = np.nan
    bad[9, 9] = np.inf
    with pytest.raises(InvalidValueError, match=r"anomaly_map of image 2 .* 2 NaN or infinite") as e:
        acc.update(bad, masks[2])
    assert e.value.fields == ("anomaly_map",)
    assert acc.num_images == 2 and acc.result().pixel_auroc == before.pixel_auroc


def test_shape_and_argument_errors(smooth):
    maps, masks, _ = smooth
    acc = PixelMetricAccumulator()
    with pytest.raises(InvalidValueError, match=r"mask of image 0 has shape \(64, 128\) but its anomaly_map") as e:
        acc.update(maps[1], masks[1][:64])
    assert e.value.fields == ("mask",)
    with pytest.raises(InvalidValueError, match="must be \\(H, W\\)"):
        acc.update(np.stack(maps[:2]), None)
    with pytest.raises(InvalidValueError, match="empty"):
        acc.update(np.zeros((0, 5)), None)
    with pytest.raises(InvalidValueError, match="lo < hi"):
        PixelMetricAccumulator(value_range=(1.0, 1.0))
    with pytest.raises(InvalidValueError):
        PixelMetricAccumulator(bins=8)
    with pytest.raises(InvalidValueError, match="fpr_limit"):
        accumulate(maps[:2], masks[:2]).result(fpr_limit=0.0)
    with pytest.raises(InvalidValueError, match="different cells"):
        PixelMetricAccumulator(bins=1024).merge(PixelMetricAccumulator(bins=2048))


def test_torch_tensors_and_leading_axes_are_accepted(smooth):
    torch = pytest.importorskip("torch")
    maps, masks, _ = smooth
    ref = accumulate(maps[:3], masks[:3]).result()
    acc = PixelMetricAccumulator()
    for amap, mask in zip(maps[:3], masks[:3]):
        acc.update(torch.from_numpy(amap)[None, None], torch.from_numpy(mask) if mask.any() else None)
    r = acc.result()
    assert (r.pixel_auroc, r.pixel_f1, r.aupro) == (ref.pixel_auroc, ref.pixel_f1, ref.aupro)
    acc.update(torch.from_numpy(maps[3]).to(torch.bfloat16), None)  # numpy has no bfloat16
    assert acc.num_images == 4

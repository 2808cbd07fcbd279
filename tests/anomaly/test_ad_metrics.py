"""Anomaly metrics: AUROC against scikit-learn and by hand, AUPRO on hand-built masks, F1 threshold."""

from __future__ import annotations

import numpy as np
import pytest

from visionscale.anomaly import metrics as M


def _maybe_sklearn():
    return pytest.importorskip("sklearn.metrics")


# ----------------------------------------------------------------------------------------
# AUROC / ROC


def test_auroc_hand_computed():
    # Pairs (anomalous, normal): (0.35 vs 0.1) win, (0.35 vs 0.4) loss, (0.8 vs both) win -> 3/4.
    assert M.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A tie between classes counts one half: pairs (0.5 vs 0.5) = 0.5, (0.9 vs 0.5) = 1 -> 0.75.
    assert M.auroc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert M.auroc([0, 0, 1, 1], [1, 1, 1, 1]) == pytest.approx(0.5)
    assert M.auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert M.auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


def _mann_whitney(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_auroc_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        s = rng.integers(0, 8, 60).astype(float)  # many ties
        assert M.auroc(y, s) == pytest.approx(_mann_whitney(y, s), abs=1e-12)


def test_auroc_and_roc_curve_equal_sklearn():
    skm = _maybe_sklearn()
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.normal(size=n) if trial % 2 else rng.integers(0, 10, n).astype(float)
        assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        fpr, tpr, thr = M.roc_curve(y, s)
        fpr2, tpr2, thr2 = skm.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, fpr2)
        np.testing.assert_allclose(tpr, tpr2)
        np.testing.assert_allclose(thr[1:], thr2[1:])


def test_pixel_auroc_is_auroc_of_flattened_pixels():
    skm = _maybe_sklearn()
    rng = np.random.default_rng(2)
    masks = rng.random((3, 16, 16)) < 0.1
    maps = rng.random((3, 16, 16)) + masks
    assert M.auroc(masks, maps) == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))


def test_auroc_rejects_one_class_and_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        M.auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        M.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="length"):
        M.auroc([0, 1, 1], [0.1, 0.2])


# ----------------------------------------------------------------------------------------
# F1-optimal threshold


def test_f1_optimal_threshold_hand_case():
    y = [0, 0, 0, 1, 1, 0, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9]
    # t=0.9: P=1 R=1/3 F1=.5 ; t=0.6: TP1 FP1 -> .4 ; t=0.5: TP2 FP1 -> 2*2/(3+3)=.667 ;
    # t=0.4: TP3 FP1 -> 6/7=.857 ; t=0.3: TP3 FP2 -> 6/8=.75
    thr, f1 = M.f1_optimal_threshold(y, s)
    assert thr == 0.4
    assert f1 == pytest.approx(6 / 7)


def test_f1_optimal_threshold_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        y[0] = 1
        s = rng.integers(0, 12, 50).astype(float)
        thr, f1 = M.f1_optimal_threshold(y, s)
        best = 0.0
        for t in np.unique(s):
            pred = s >= t
            tp = (pred & (y == 1)).sum()
            best = max(best, 2 * tp / (pred.sum() + y.sum()))
        assert f1 == pytest.approx(best)
        pred = s >= thr
        assert 2 * (pred & (y == 1)).sum() / (pred.sum() + y.sum()) == pytest.approx(best)


# ----------------------------------------------------------------------------------------
# Connected components


def test_connected_components_8_connectivity_by_hand():
    m = np.array([
        [1, 0, 0, 0, 1],
        [0, 1, 0, 0, 1],
        [0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0],
    ], dtype=bool)
    for fn in (M.connected_components, M._label_runs):
        labels, n = fn(m)
        assert n == 4  # the diagonal pair is one region (it would be two with 4-connectivity)
        assert labels[0, 0] == labels[1, 1] == 1
        assert labels[0, 4] == labels[1, 4] == 2
        assert labels[3, 0] == labels[3, 1] == 3
        assert labels[3, 3] == 4
        assert (labels[~m] == 0).all()


def test_fallback_labelling_equals_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(4)
    for trial in range(60):
        m = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.uniform(0.05, 0.8)
        ours, n = M._label_runs(m)
        ref, n_ref = ndimage.label(m, structure=np.ones((3, 3)))
        assert n == n_ref
        np.testing.assert_array_equal(ours, ref)  # same numbering (raster order), not just same partition
    assert M._label_runs(np.zeros((3, 4), bool))[1] == 0


def test_connected_components_without_scipy(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    m = np.eye(4, dtype=bool)
    m[0, 3] = True
    labels, n = M.connected_components(m)
    assert n == 2 and labels[3, 3] == 1 and labels[0, 3] == 2


# ----------------------------------------------------------------------------------------
# PRO / AUPRO


def _hand_case():
    """Two 4x4 images; ten normal pixels scored 0.9..0.0, one FPR step (1/28) each.

    Image 0: region A = two diagonal pixels (one region by 8-connectivity), both 1.0.
    Image 1: region B = two adjacent pixels scored 0.95 and 0.75.
    Remaining pixels: 10 normal pixels with 0.9, 0.8, ..., 0.0; the other 18 are normal
    pixels scored -1 (far below everything) -> 28 normal pixels in total.
    """
    amap = np.full((2, 4, 4), -1.0)
    gt = np.zeros((2, 4, 4), bool)
    gt[0, 0, 0] = gt[0, 1, 1] = True
    amap[0, 0, 0] = amap[0, 1, 1] = 1.0
    gt[1, 2, 2] = gt[1, 2, 3] = True
    amap[1, 2, 2], amap[1, 2, 3] = 0.95, 0.75
    normal_slots = [(0, 3, c) for c in range(4)] + [(1, 0, c) for c in range(4)] + [(1, 3, 0), (1, 3, 1)]
    for (i, r, c), v in zip(normal_slots, np.linspace(0.9, 0.0, 10)):
        amap[i, r, c] = v
    return amap, gt


def test_pro_curve_hand_built_known_answer():
    amap, gt = _hand_case()
    fpr, pro, thr = M.pro_curve(amap, gt)
    n_ok = 28
    # t=1.0: A full (1), B none (0) -> PRO .5, FPR 0. t=.95: B half -> .75. t=.9,.8: FPR 1/28, 2/28.
    # t=.75: B full -> PRO 1 at FPR 2/28.
    assert thr[1] == 1.0 and pro[1] == pytest.approx(0.5) and fpr[1] == 0
    assert pro[2] == pytest.approx(0.75) and fpr[2] == 0
    i = int(np.flatnonzero(thr == 0.75)[0])
    assert fpr[i] == pytest.approx(2 / n_ok) and pro[i] == pytest.approx(1.0)
    assert fpr[-1] == 1.0 and pro[-1] == 1.0
    # Area up to FPR 0.3: 0.75 on [0, 2/28], 1.0 on [2/28, 0.3] -> normalised by 0.3.
    expected = (0.75 * 2 / n_ok + 1.0 * (0.3 - 2 / n_ok)) / 0.3
    assert M.aupro(amap, gt, 0.3) == pytest.approx(expected)
    # With the limit between two FPR points the curve is interpolated there: limit 1.5/28.
    lim = 1.5 / n_ok
    assert M.aupro(amap, gt, lim) == pytest.approx(0.75)


def test_aupro_perfect_and_inverted_maps():
    rng = np.random.default_rng(5)
    gt = np.zeros((3, 20, 20), bool)
    gt[0, 2:6, 3:9] = True
    gt[0, 12:15, 12:18] = True
    gt[2, 5:10, 5:7] = True
    noise = rng.random(gt.shape) * 0.5
    assert M.aupro(gt + noise, gt) == pytest.approx(1.0)
    assert M.aupro(-(gt + noise), gt) == pytest.approx(0.0)


def test_aupro_weights_regions_equally_not_pixels():
    # A big region found and a tiny region missed: pixel recall is high, PRO is 1/2.
    gt = np.zeros((1, 30, 30), bool)
    gt[0, 0:20, 0:20] = True  # 400 px, detected
    gt[0, 25, 25] = True  # 1 px, scored below every normal pixel
    amap = np.where(gt, 2.0, np.linspace(0, 1, 900).reshape(1, 30, 30))
    amap[0, 25, 25] = -1.0
    assert M.aupro(amap, gt, 0.3) == pytest.approx(0.5)


def _pro_brute_force(amap, gt, limit):
    regions = []
    for i in range(gt.shape[0]):
        labels, n = M.connected_components(gt[i])
        regions += [(i, labels == k + 1) for k in range(n)]
    normal = ~gt
    pts = [(0.0, 0.0)]
    for t in np.unique(amap)[::-1]:
        pred = amap >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    return M.trapezoid(x, y, limit) / limit


def test_aupro_equals_threshold_sweep():
    rng = np.random.default_rng(6)
    for _ in range(8):
        gt = rng.random((2, 12, 12)) < 0.15
        amap = np.round(rng.random(gt.shape) + 0.6 * gt, 2)
        for limit in (0.05, 0.3, 1.0):
            assert M.aupro(amap, gt, limit) == pytest.approx(_pro_brute_force(amap, gt, limit), abs=1e-12)


def test_pro_rejects_masks_without_regions_and_shape_mismatch():
    with pytest.raises(ValueError, match="anomalous region"):
        M.pro_curve(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        M.pro_curve(np.zeros((1, 4, 4)), np.ones((1, 4, 5)))


def test_trapezoid_limit_interpolates():
    x, y = np.array([0.0, 0.2, 0.4]), np.array([0.0, 1.0, 1.0])
    assert M.trapezoid(x, y) == pytest.approx(0.1 + 0.2)
    assert M.trapezoid(x, y, 0.1) == pytest.approx(0.5 * 0.1 * 0.5)
    assert M.trapezoid(x, y, 0.3) == pytest.approx(0.1 + 0.1)


# ----------------------------------------------------------------------------------------
# evaluate_scores


def test_evaluate_scores_all_metrics_and_skips():
    amap, gt = _hand_case()
    labels = [1, 1]
    m = M.evaluate_scores(labels + [0], [0.9, 0.8, 0.1], np.concatenate([amap, np.zeros((1, 4, 4))]),
                          np.concatenate([gt, np.zeros((1, 4, 4), bool)]))
    assert m.image_auroc == 1.0 and m.image_f1 == 1.0 and m.image_threshold == 0.8
    assert 0 < m.pixel_auroc <= 1 and m.aupro is not None and m.notes == ()
    no_masks = M.evaluate_scores([0, 1], [0.2, 0.3])
    assert no_masks.pixel_auroc is None and no_masks.aupro is None
    assert any("no ground-truth masks" in n for n in no_masks.notes)
    one_class = M.evaluate_scores([0, 0], [0.2, 0.3])
    assert one_class.image_auroc is None and any("need both" in n for n in one_class.notes)
    d = m.as_dict()
    assert d["num_images"] == 3 and d["num_anomalous"] == 2 and isinstance(d["notes"], list)

"""Anomaly-detection metrics: image/pixel AUROC, AUPRO up to an FPR limit, F1-optimal threshold.

Conventions follow the references the field reports against:

* ROC/AUROC as scikit-learn's ``roc_curve(drop_intermediate=False)`` / ``roc_auc_score``:
  one point per distinct score (ties move together), trapezoidal area. Equal to the
  Mann-Whitney U statistic with ties counted 1/2.
* PRO as the official MVTec AD evaluation code (Bergmann et al., IJCV 2021,
  "The MVTec Anomaly Detection Dataset"; ``pro_curve_util.py`` of its evaluation scripts):
  connected components of each ground-truth mask with 8-connectivity (3x3 structuring
  element), per-pixel PRO increments ``1 / (#regions * region size)``, one curve point per
  distinct score, and the area up to ``fpr_limit`` (0.3) with the curve interpolated at the
  limit, divided by the limit so a perfect map scores 1.
* F1-optimal threshold as anomalib's ``F1AdaptiveThreshold``: the score ``t`` maximising F1
  of the rule ``score >= t``.

No plotting here (see :mod:`visionscale.anomaly.plots`); numpy only, scipy optional.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "roc_curve",
    "auroc",
    "precision_recall_curve",
    "f1_optimal_threshold",
    "connected_components",
    "pro_curve",
    "aupro",
    "trapezoid",
    "ImageMetrics",
    "image_metrics",
    "evaluate_scores",
]


def _binary(labels, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype != bool:
        uniq = np.unique(y)
        if not np.isin(uniq, (0, 1)).all():
            raise ValueError(f"{name} must be 0/1 or bool, got values {uniq[:5].tolist()}")
        y = y.astype(bool)
    return y.ravel()


def _sorted_counts(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct score, highest score first.

    Returns ``(tps, fps, thresholds)``: counts of positives/negatives with ``score >= t``.
    """
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # Last index of each run of equal scores: ties cross the threshold together.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score, starting at (0, 0).

    Returns:
        ``(fpr, tpr, thresholds)``; ``thresholds[0]`` is ``inf`` (nothing predicted
        anomalous), then the distinct scores in decreasing order.

    Raises:
        ValueError: If only one class is present (the curve is undefined).
    """
    tps, fps, thr = _sorted_counts(labels, scores)
    pos, neg = tps[-1], fps[-1]
    if pos == 0 or neg == 0:
        raise ValueError(f"ROC needs both classes, got {pos} anomalous and {neg} normal samples")
    fpr = np.r_[0.0, fps / neg]
    tpr = np.r_[0.0, tps / pos]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(labels, scores) -> float:
    """Area under the ROC curve (trapezoidal over distinct scores, as scikit-learn)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return _trapz(fpr, tpr)


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of ``score >= t`` for each distinct score ``t`` (decreasing)."""
    tps, fps, thr = _sorted_counts(labels, scores)
    pos = tps[-1]
    if pos == 0:
        raise ValueError("precision/recall need at least one anomalous sample")
    precision = tps / (tps + fps)
    recall = tps / pos
    return precision, recall, thr


def f1_optimal_threshold(labels, scores) -> tuple[float, float]:
    """Threshold ``t`` maximising F1 of ``score >= t``; the first (highest) on ties.

    Returns:
        ``(threshold, f1)``.
    """
    tps, fps, thr = _sorted_counts(labels, scores)
    pos = tps[-1]
    if pos == 0:
        raise ValueError("an F1-optimal threshold needs at least one anomalous sample")
    f1 = 2 * tps / (tps + fps + pos)  # 2 TP / (2 TP + FP + FN), FN = pos - TP
    best = int(np.argmax(f1))
    return float(thr[best]), float(f1[best])


# ----------------------------------------------------------------------------------------
# Connected components (8-connectivity).


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected regions of a 2-D boolean mask.

    Uses ``scipy.ndimage.label`` with a 3x3 structuring element when scipy is importable,
    otherwise :func:`_label_runs` (same labels, numbered in raster order of each region's
    first pixel, as scipy does).

    Returns:
        ``(labels, n)``: int32 array, 0 = background, regions 1..n.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    try:
        from scipy import ndimage
    except ImportError:
        return _label_runs(m)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
    return labels.astype(np.int32, copy=False), int(n)


def _label_runs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Pure-numpy 8-connected labelling: union-find over horizontal runs of each row.

    Cost is linear in the number of runs (a few per row for real defect masks), so no
    per-pixel Python loop runs. Two runs in neighbouring rows touch (8-connectivity) when
    their column spans overlap after widening one of them by a pixel on each side.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)  # (h, w + 1): +1 where a run starts, -1 one past its end
    rows, starts = np.nonzero(step == 1)  # row-major order, so starts and ends pair up
    _, ends = np.nonzero(step == -1)
    n_runs = rows.size
    out = np.zeros(h * w, dtype=np.int32)
    if n_runs == 0:
        return out.reshape(h, w), 0
    parent = np.arange(n_runs)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row r: first[r]:first[r+1]
    for r in range(1, h):
        i, i_end = first[r - 1], first[r]
        j, j_end = first[r], first[r + 1]
        while i < i_end and j < j_end:
            # spans [s, e) with e exclusive; diagonal contact allowed: s_a <= e_b and s_b <= e_a
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # keep the earliest run as root
            if ends[i] <= ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n_runs)])
    # Number regions in order of their first run (= raster order of first pixel).
    uniq, first_seen = np.unique(roots, return_index=True)
    rank = np.empty(n_runs, dtype=np.int32)
    rank[uniq[np.argsort(first_seen)]] = np.arange(1, uniq.size + 1, dtype=np.int32)
    run_label = rank[roots]
    # Paint runs with a +label at the start / -label at the end and a cumulative sum.
    flat_start = rows * w + starts
    flat_end = rows * w + ends
    paint = np.zeros(h * w + 1, dtype=np.int64)
    np.add.at(paint, flat_start, run_label)
    np.add.at(paint, flat_end, -run_label)
    out[:] = np.cumsum(paint[:-1])
    return out.reshape(h, w), int(uniq.size)


# ----------------------------------------------------------------------------------------
# PRO curve and AUPRO.


def _stack_maps(maps, name: str) -> np.ndarray:
    if isinstance(maps, np.ndarray):
        arr = maps
    else:
        arr = np.stack([np.asarray(m) for m in maps]) if len(maps) else np.zeros((0, 0, 0))
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]  # (N, 1, H, W) -> (N, H, W)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {arr.shape}")
    return arr


def pro_curve(anomaly_maps, masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against the false positive rate on normal pixels.

    At threshold ``t`` every pixel with ``score >= t`` is predicted anomalous; PRO is the
    mean, over all ground-truth regions of all images, of the fraction of the region
    predicted anomalous; FPR is the fraction of normal pixels predicted anomalous.

    Args:
        anomaly_maps: (N, H, W) scores (or a list of (H, W)).
        masks: (N, H, W) ground truth, nonzero = anomalous; images without defects may
            be all zero.

    Returns:
        ``(fpr, pro, thresholds)``, starting at (0, 0) with ``thresholds[0] = inf``.

    Raises:
        ValueError: Shapes differ, or there is no anomalous region or no normal pixel.
    """
    amaps = _stack_maps(anomaly_maps, "anomaly_maps").astype(np.float64, copy=False)
    gts = _stack_maps(masks, "masks")
    if amaps.shape != gts.shape:
        raise ValueError(f"anomaly maps {amaps.shape} and masks {gts.shape} differ in shape")
    fp_change = np.zeros(amaps.shape, dtype=np.float64)  # 1 on normal pixels
    pro_change = np.zeros(amaps.shape, dtype=np.float64)  # 1 / region size on region pixels
    n_regions = 0
    for i in range(gts.shape[0]):
        labels, n = connected_components(gts[i] > 0)
        fp_change[i][labels == 0] = 1.0
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
            inv = np.zeros(n + 1)
            inv[1:] = 1.0 / sizes[1:]
            pro_change[i] = inv[labels]
        n_regions += n
    n_ok = fp_change.sum()
    if n_regions == 0:
        raise ValueError("PRO needs at least one anomalous region in the masks")
    if n_ok == 0:
        raise ValueError("PRO needs at least one normal pixel in the masks")
    s = amaps.ravel()
    if not np.isfinite(s).all():
        raise ValueError("anomaly maps contain NaN or infinity")
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / n_ok
    pro = np.cumsum(pro_change.ravel()[order]) / n_regions
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # ties cross together
    fpr = np.clip(fpr[last], 0.0, 1.0)
    pro = np.clip(pro[last], 0.0, 1.0)
    return np.r_[0.0, fpr], np.r_[0.0, pro], np.r_[np.inf, s[last]]


def _trapz(x: np.ndarray, y: np.ndarray) -> float:
    # np.trapezoid is numpy >= 2 only; the rule itself is one line.
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x))) if x.size > 1 else 0.0


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Trapezoidal area under ``y(x)`` (x ascending), up to ``x_max`` if given.

    When ``x_max`` falls between two points, ``y`` is interpolated linearly there.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x_max is None:
        return _trapz(x, y)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs.size < x.size and (xs.size == 0 or xs[-1] < x_max):
        i = xs.size  # first point beyond the limit
        if i == 0:
            return 0.0
        t = (x_max - x[i - 1]) / (x[i] - x[i - 1])
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y[i - 1] + t * (y[i] - y[i - 1])]
    return _trapz(xs, ys)


def aupro(anomaly_maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, ``fpr_limit``], divided by ``fpr_limit``."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(anomaly_maps, masks)
    return trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------------------
# One call for a whole test set.


@dataclass
class ImageMetrics:
    """What :func:`evaluate_scores` computed; ``None`` where the data did not allow it.

    ``notes`` says why a metric is missing (one class only, no masks...).
    """

    image_auroc: float | None = None
    image_f1: float | None = None
    image_threshold: float | None = None
    pixel_auroc: float | None = None
    pixel_f1: float | None = None
    pixel_threshold: float | None = None
    aupro: float | None = None
    fpr_limit: float = 0.3
    num_images: int = 0
    num_anomalous: int = 0
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


NO_MASKS_NOTE = "pixel metrics skipped: no ground-truth masks"
ONE_PIXEL_CLASS_NOTE = "pixel metrics skipped: the masks are all normal or all anomalous"


def image_metrics(
    image_labels: Sequence[int] | np.ndarray,
    image_scores: Sequence[float] | np.ndarray,
    fpr_limit: float = 0.3,
) -> ImageMetrics:
    """The image-level half of :func:`evaluate_scores`: image AUROC and F1-optimal threshold.

    Pixel fields stay ``None`` and no note about them is added; :func:`evaluate_scores` and
    :func:`visionscale.anomaly.streaming_metrics.evaluate_streaming` fill them.
    """
    y = _binary(image_labels, "image_labels")
    s = np.asarray(image_scores, dtype=np.float64).ravel()
    m = ImageMetrics(num_images=int(y.size), num_anomalous=int(y.sum()), fpr_limit=fpr_limit)
    if 0 < y.sum() < y.size:
        m.image_auroc = auroc(y, s)
        m.image_threshold, m.image_f1 = f1_optimal_threshold(y, s)
    else:
        m.notes = (
            f"image metrics skipped: the test set has {int(y.sum())} anomalous and {int((~y).sum())} "
            f"normal images; AUROC and an F1 threshold need both",
        )
    return m


def evaluate_scores(
    image_labels: Sequence[int] | np.ndarray,
    image_scores: Sequence[float] | np.ndarray,
    anomaly_maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    fpr_limit: float = 0.3,
) -> ImageMetrics:
    """Image AUROC and F1-optimal threshold; pixel AUROC, pixel F1 and AUPRO when masks are given.

    Exact: every pixel of every map is sorted at once, so memory grows with the number of
    images times their size. :mod:`visionscale.anomaly.streaming_metrics` gives the same pixel
    metrics in bounded memory, one map at a time.

    Args:
        image_labels: (N,) 0 normal, 1 anomalous.
        image_scores: (N,) higher = more anomalous.
        anomaly_maps: (N, H, W) or None.
        masks: (N, H, W) ground truth (all zero for normal images) or None: pixel
            metrics are then skipped with a note.
    """
    m = image_metrics(image_labels, image_scores, fpr_limit)
    notes = list(m.notes)
    if anomaly_maps is None or masks is None:
        notes.append(NO_MASKS_NOTE)
    else:
        amaps = _stack_maps(anomaly_maps, "anomaly_maps")
        gts = _stack_maps(masks, "masks") > 0
        if amaps.shape != gts.shape:
            raise ValueError(f"anomaly maps {amaps.shape} and masks {gts.shape} differ in shape")
        if not gts.any() or gts.all():
            notes.append(ONE_PIXEL_CLASS_NOTE)
        else:
            m.pixel_auroc = auroc(gts, amaps)
            m.pixel_threshold, m.pixel_f1 = f1_optimal_threshold(gts, amaps)
            m.aupro = aupro(amaps, gts, fpr_limit)
    m.notes = tuple(notes)
    return m

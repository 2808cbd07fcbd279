"""Face-verification metrics on pair distances (numpy only).

Every function takes ``distances`` (smaller = more alike) and ``same`` (1 = the pair shows
one person). The decision rule is seed 003's: **same person when distance < threshold**.

* ROC curve and ROC AUC over all thresholds (ties handled exactly: the AUC equals the
  Mann-Whitney probability that a same pair is closer than a different pair, ties 1/2).
* EER: the error rate where the false-accept rate (FAR = FPR) equals the false-reject rate
  (FRR = 1 - TPR), linearly interpolated between ROC points.
* TAR @ FAR: the highest true-accept rate whose false-accept rate is at most ``far``; with
  ``N`` different-person pairs FAR moves in steps of ``1/N`` (LFW's 3000 give 1/3000 ~ 3.3e-4,
  so FAR = 1e-3 allows at most 3 false accepts).
* The LFW protocol (README, "View 2"): 10 folds; for each fold the threshold is chosen on
  the other nine (highest accuracy) and accuracy is measured on the held-out fold; report
  the mean, the standard deviation over folds and the standard error of the mean.
* Fixed-threshold accuracy, precision, recall, F1 and seed 003's "ROC AUC", which the seed
  computes with scikit-learn's ``roc_auc_score`` on the hard 0/1 predictions; on hard
  predictions that equals balanced accuracy ``(TPR + TNR) / 2``, not the ranking AUC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionscale.errors import InvalidValueError

__all__ = [
    "roc_curve",
    "roc_auc",
    "equal_error_rate",
    "tar_at_far",
    "best_threshold",
    "threshold_metrics",
    "kfold_accuracy",
    "verification_report",
]


def _check(distances, same) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    y = np.asarray(same).reshape(-1)
    if d.shape != y.shape:
        raise InvalidValueError(f"distances ({d.size}) and same ({y.size}) must have the same length").about(
            "distances", "same")
    if d.size == 0:
        raise InvalidValueError("no pairs to evaluate").about("distances")
    if not np.all(np.isfinite(d)):
        raise InvalidValueError(f"{int((~np.isfinite(d)).sum())} distances are NaN or infinite").about("distances")
    if not np.all((y == 0) | (y == 1)):
        raise InvalidValueError("same must hold only 0/1 (or False/True)").about("same")
    return d, y.astype(bool)


def _need_both(y: np.ndarray, what: str) -> None:
    if y.all() or not y.any():
        raise InvalidValueError(f"{what} needs both same-person and different-person pairs "
                                f"(got {int(y.sum())} same, {int((~y).sum())} different)").about("same")


def roc_curve(distances, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: point ``k`` accepts pairs with ``distance <= thresholds[k]``.

    Points follow the distinct distances in increasing order, starting at ``(0, 0)`` with
    threshold ``-inf`` and ending at ``(1, 1)``.
    """
    d, y = _check(distances, same)
    _need_both(y, "a ROC curve")
    order = np.argsort(d, kind="mergesort")
    ds, ys = d[order], y[order]
    ends = np.r_[np.nonzero(np.diff(ds))[0], ds.size - 1]  # last index of each distinct value
    tps = np.cumsum(ys)[ends]
    fps = ends + 1 - tps
    tpr = np.r_[0.0, tps / ys.sum()]
    fpr = np.r_[0.0, fps / (~ys).sum()]
    return fpr, tpr, np.r_[-np.inf, ds[ends]]


def roc_auc(distances, same) -> float:
    """Area under the ROC curve (1 = every same pair closer than every different pair)."""
    d, y = _check(distances, same)
    _need_both(y, "ROC AUC")
    order = np.argsort(d, kind="mergesort")
    ds, ys = d[order], y[order]
    ends = np.r_[np.nonzero(np.diff(ds))[0], ds.size - 1]
    tps = np.r_[0, np.cumsum(ys)[ends]].astype(np.float64)
    fps = np.r_[0, ends + 1] - tps
    # Trapezoids on integer counts, divided once: exact (1.0 means 1.0) up to 2**53 pairs.
    return float(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / (2.0 * ys.sum() * (~ys).sum()))


def equal_error_rate(distances, same) -> tuple[float, float]:
    """``(eer, threshold)`` where FAR = FRR, interpolated linearly between ROC points."""
    fpr, tpr, thr = roc_curve(distances, same)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # rises from -1 to +1 along the curve
    k = int(np.argmax(diff >= 0))
    if k == 0 or diff[k] == 0:
        t = thr[k] if np.isfinite(thr[k]) else thr[1]
        return float(fpr[k]), float(t)
    # Between points k-1 and k the two rates cross.
    w = -diff[k - 1] / (diff[k] - diff[k - 1])
    eer = fpr[k - 1] + w * (fpr[k] - fpr[k - 1])
    lo = thr[k - 1] if np.isfinite(thr[k - 1]) else thr[k]
    return float(eer), float(lo + w * (thr[k] - lo))


def tar_at_far(distances, same, far: float = 1e-3) -> tuple[float, float, float]:
    """``(tar, achieved_far, threshold)``: best true-accept rate with FAR <= ``far``.

    The threshold is the largest distance accepted (rule ``distance <= threshold``);
    ``-inf`` when even the closest different pair is closer than every same pair.
    """
    if not 0.0 <= far <= 1.0:
        raise InvalidValueError(f"far must be in [0, 1], got {far}").about("far")
    fpr, tpr, thr = roc_curve(distances, same)
    ok = np.nonzero(fpr <= far + 1e-15)[0]
    k = ok[np.argmax(tpr[ok])]
    return float(tpr[k]), float(fpr[k]), float(thr[k])


def best_threshold(distances, same) -> tuple[float, float]:
    """``(threshold, accuracy)`` maximising accuracy of the rule ``distance < threshold``.

    Candidates are the midpoints between consecutive distinct distances (and points just
    outside the range), so the threshold never sits on a sample. Ties go to the smallest.
    """
    d, y = _check(distances, same)
    order = np.argsort(d, kind="mergesort")
    ds, ys = d[order], y[order]
    ends = np.r_[np.nonzero(np.diff(ds))[0], ds.size - 1]
    tps = np.r_[0, np.cumsum(ys)[ends]]  # accepted same pairs when accepting up to value k
    fps = np.r_[0, ends + 1] - tps
    n_neg = int((~ys).sum())
    acc = (tps + (n_neg - fps)) / ds.size
    k = int(np.argmax(acc))
    vals = ds[ends]
    if k == 0:
        t = vals[0]  # accept nothing: d < min(d) is never true
    elif k == len(vals):
        t = float(np.nextafter(vals[-1], np.inf))  # accept everything
    else:
        t = 0.5 * (vals[k - 1] + vals[k])
    return float(t), float(acc[k])


def threshold_metrics(distances, same, threshold: float) -> dict:
    """Seed 003's numbers at one threshold: accuracy, precision, recall, F1, hard-label "ROC AUC".

    Precision (and F1) are 0 when nothing is accepted, as scikit-learn reports with
    ``zero_division=0``.
    """
    d, y = _check(distances, same)
    pred = d < threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    return {
        "threshold": float(threshold),
        "accuracy": (tp + tn) / d.size,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        # roc_auc_score(y_true, hard_predictions) as seed 003 calls it = balanced accuracy.
        "roc_auc_hard": 0.5 * (recall + tnr) if (tp + fn) and (tn + fp) else float("nan"),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def kfold_accuracy(distances, same, folds) -> dict:
    """LFW protocol: per fold, threshold from the other folds, accuracy on this one.

    Args:
        folds: ``(N,)`` fold index of each pair (LFW pairs.txt: 10 folds of 600).

    Returns:
        ``{"mean", "std", "sem", "accuracies", "thresholds", "folds"}``; ``std`` is over folds
        (ddof=0, as most published LFW code reports), ``sem`` = sample std / sqrt(k) (LFW README).
    """
    d, y = _check(distances, same)
    f = np.asarray(folds).reshape(-1)
    if f.shape != d.shape:
        raise InvalidValueError(f"folds ({f.size}) and distances ({d.size}) must have the same length").about("folds")
    ids = sorted(set(f.tolist()))
    if len(ids) < 2:
        raise InvalidValueError(f"k-fold evaluation needs at least 2 folds, got {len(ids)}").about("folds")
    accs, thrs = [], []
    for k in ids:
        test = f == k
        t, _ = best_threshold(d[~test], y[~test])
        accs.append(float(np.mean((d[test] < t) == y[test])))
        thrs.append(t)
    a = np.asarray(accs)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "sem": float(a.std(ddof=1) / np.sqrt(a.size)),
        "accuracies": accs,
        "thresholds": thrs,
        "folds": [int(k) if isinstance(k, (int, np.integer)) else k for k in ids],
    }


def verification_report(distances, same, folds=None, thresholds: Sequence[float] = (0.5,), far: float = 1e-3) -> dict:
    """Everything the docs report for one set of pairs, as a JSON-friendly dict."""
    d, y = _check(distances, same)
    _need_both(y, "verification metrics")
    eer, eer_t = equal_error_rate(d, y)
    tar, far_got, far_t = tar_at_far(d, y, far)
    best_t, best_acc = best_threshold(d, y)
    rep = {
        "n_pairs": int(d.size),
        "n_same": int(y.sum()),
        "n_different": int((~y).sum()),
        "roc_auc": roc_auc(d, y),
        "eer": eer,
        "eer_threshold": eer_t,
        "far_target": far,
        "tar_at_far": tar,
        "far_achieved": far_got,
        "far_threshold": far_t,
        "best_threshold_all_pairs": best_t,
        "best_accuracy_all_pairs": best_acc,
        "mean_distance_same": float(d[y].mean()),
        "mean_distance_different": float(d[~y].mean()),
        "fixed_thresholds": [threshold_metrics(d, y, t) for t in thresholds],
    }
    if folds is not None:
        rep["kfold"] = kfold_accuracy(d, y, folds)
    return rep

"""Classification metrics: accuracy, per-class precision / recall / F1, confusion matrix.

Conventions (scikit-learn's): rows of the confusion matrix are true classes, columns
predicted ones. A class that is never predicted has undefined precision; it is reported
as ``None`` (JSON ``null``) rather than silently as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["confusion_matrix", "classification_report"]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts: ``cm[t, p]`` = images of class t predicted as p."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {min(t.min(), p.min())}..{max(t.max(), p.max())}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix.

    Returns:
        ``{"accuracy", "n", "classes", "per_class": {name: {...}}, "macro_recall",
        "confusion_matrix": [[...]]}``; precision is None for a class never predicted,
        recall None for a class absent from ``y_true``.
    """
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    per_class = {}
    recalls = []
    for i, name in enumerate(classes):
        precision = _ratio(tp[i], predicted[i])
        recall = _ratio(tp[i], support[i])
        f1 = None
        if precision is not None and recall is not None:
            f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        if recall is not None:
            recalls.append(recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[i]),
                           "predicted": int(predicted[i])}
    n = int(cm.sum())
    return {
        "accuracy": _ratio(tp.sum(), n),
        "n": n,
        "classes": list(classes),
        "per_class": per_class,
        "macro_recall": float(np.mean(recalls)) if recalls else None,
        "confusion_matrix": cm.tolist(),
    }

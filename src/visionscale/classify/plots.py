"""PNG figures for classification: training curves and a confusion matrix (matplotlib, Agg).

Figures are built with ``matplotlib.figure.Figure`` directly, so the global pyplot state
and backend are left alone; each function returns PNG bytes for an atomic write.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionscale.io.figures import figure_png

__all__ = ["curves_png", "confusion_png"]




def curves_png(history: Sequence[dict]) -> bytes:
    """Loss and accuracy per epoch (train and validation); dashed lines where a phase starts."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "loss (cross-entropy)"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", ms=3, label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for prev, cur in zip(history, history[1:]):
        if cur["phase"] != prev["phase"]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(cur["epoch"] - 0.5, color="gray", ls="--", lw=1)
            ax_loss.annotate(cur["phase"], (cur["epoch"] - 0.5, 1.0), xycoords=("data", "axes fraction"),
                             fontsize=8, color="gray", ha="left", va="top")
    best = min(history, key=lambda h: h["val_loss"]) if history else None
    if best is not None:
        ax_loss.plot([best["epoch"]], [best["val_loss"]], "k*", ms=10, label="best (kept)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylim(-0.02, 1.02)
    ax_loss.legend(fontsize=8)
    return figure_png(fig, dpi=100)


def confusion_png(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str = "confusion matrix") -> bytes:
    """Counts with row-normalised colour (rows = true class, columns = predicted)."""
    from matplotlib.figure import Figure

    m = np.asarray(cm, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(classes)
    side = max(3.2, 0.55 * k + 1.8)
    fig = Figure(figsize=(side + 0.8, side))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    return figure_png(fig, dpi=100)

"""PNG figures for face recognition: training curves and ROC (matplotlib Figure, Agg).

No pyplot: the global backend and state stay untouched; functions return PNG bytes for an
atomic write.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionscale.io.figures import figure_png

__all__ = ["annotate_faces", "curves_png", "roc_png"]



_KEYPOINT_COLOURS = [(0, 255, 0), (0, 200, 255), (255, 0, 255), (255, 255, 0), (255, 128, 0), (128, 128, 255)]


def annotate_faces(image: np.ndarray, faces, fmt: str = "PNG") -> bytes:
    """``image`` (H, W, 3 uint8) with each face's box, score and keypoints drawn, encoded as ``fmt``
    (``PNG`` or ``JPEG``): what ``face detect --out`` writes."""
    import io

    from PIL import Image, ImageDraw

    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    line = max(1, round(min(img.size) / 200))
    r = max(2, line * 2)
    for f in faces:
        draw.rectangle([f.box[0], f.box[1], f.box[2], f.box[3]], outline=(255, 0, 0), width=line)
        draw.text((f.box[0] + line, max(f.box[1] - 12, 0)), f"{f.score:.2f}", fill=(255, 0, 0))
        for (x, y), colour in zip(f.keypoints, _KEYPOINT_COLOURS):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def curves_png(history: Sequence[dict]) -> bytes:
    """Train / validation loss per epoch, and validation accuracy (best threshold) and ROC AUC."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.6))
    ax_l, ax_m = fig.subplots(1, 2)
    ax_l.plot(ep, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    ax_l.plot(ep, [h["val_loss"] for h in history], "o-", ms=3, label="validation")
    if history:
        best = min(history, key=lambda h: h["val_loss"])
        ax_l.plot([best["epoch"]], [best["val_loss"]], "k*", ms=10, label="best (kept)")
    ax_l.set_title("loss")
    ax_m.plot(ep, [h["val_acc"] for h in history], "o-", ms=3, label="val accuracy (best threshold)")
    ax_m.plot(ep, [h["val_auc"] for h in history], "o-", ms=3, label="val ROC AUC")
    ax_m.set_ylim(0.0, 1.02)
    ax_m.set_title("validation pairs")
    for ax in (ax_l, ax_m):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure_png(fig, dpi=100)


def roc_png(fpr: np.ndarray, tpr: np.ndarray, auc: float, eer: float | None = None, title: str = "ROC") -> bytes:
    """ROC on a linear axis and on a log FAR axis (where TAR @ FAR = 1e-3 is read)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8))
    ax_lin, ax_log = fig.subplots(1, 2)
    label = f"AUC {auc:.4f}" + (f", EER {eer:.4f}" if eer is not None else "")
    ax_lin.plot(fpr, tpr, lw=1.5, label=label)
    ax_lin.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax_lin.set_xlabel("false accept rate (FPR)")
    ax_lin.set_ylabel("true accept rate (TPR)")
    ax_lin.set_title(title)
    ax_lin.legend(fontsize=8, loc="lower right")
    pos = fpr > 0
    ax_log.step(fpr[pos], tpr[pos], where="post", lw=1.5)
    ax_log.set_xscale("log")
    ax_log.axvline(1e-3, color="gray", ls="--", lw=1)
    ax_log.set_xlabel("false accept rate (log)")
    ax_log.set_title("low-FAR region")
    for ax in (ax_lin, ax_log):
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    return figure_png(fig, dpi=100)

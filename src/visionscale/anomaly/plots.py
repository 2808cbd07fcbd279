"""PNG outputs of anomaly detection: ROC and PRO curves, heatmap overlays.

Matplotlib (Agg backend, no display needed) is imported only here, so the metrics and the
models stay free of plotting. Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from visionscale.io.atomic import write_atomic

__all__ = ["plot_roc", "plot_pro", "heatmap_overlay", "save_png"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _figure()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return path


def _thin(x: np.ndarray, y: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    # Pixel curves have a point per distinct score (millions); a few thousand draw the same line.
    if x.size <= n:
        return x, y
    idx = np.unique(np.r_[np.linspace(0, x.size - 1, n).astype(int), x.size - 1])
    return x[idx], y[idx]


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves: ``{"image": (fpr, tpr, auroc), "pixel": (...)}`` -> one PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for name, (fpr, tpr, auc) in curves.items():
        fpr, tpr = _thin(np.asarray(fpr), np.asarray(tpr))
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} AUROC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_pro(fpr: np.ndarray, pro: np.ndarray, aupro: float, path: str | Path, fpr_limit: float = 0.3,
             title: str = "PRO curve") -> Path:
    """PRO against FPR, the integration limit shaded."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    fpr, pro = _thin(np.asarray(fpr), np.asarray(pro))
    ax.plot(fpr, pro, lw=1.8, label=f"AUPRO@{fpr_limit:g} {aupro:.3f}")
    keep = fpr <= fpr_limit
    ax.fill_between(fpr[keep], pro[keep], alpha=0.2)
    ax.axvline(fpr_limit, ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", xlim=(0, 1), ylim=(0, 1.02),
           title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, threshold: float | None = None,
                    alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an RGB image; outline the region above ``threshold``.

    Args:
        image: (H, W, 3) uint8.
        amap: (H, W) float at the image's size.
        vmin, vmax: Map values shown as the coldest/hottest colour (fixed per model so
            overlays of different images compare).
        threshold: Pixels with ``amap >= threshold`` get a white outline; None for none.

    Returns:
        (H, W, 3) uint8.
    """
    import matplotlib

    if amap.shape != image.shape[:2]:
        raise ValueError(f"map {amap.shape} and image {image.shape[:2]} differ in size")
    span = max(vmax - vmin, 1e-12)
    norm = np.clip((amap - vmin) / span, 0, 1)
    colour = matplotlib.colormaps["jet"](norm)[..., :3] * 255  # (H, W, 3)
    out = (1 - alpha) * image.astype(np.float64) + alpha * colour
    if threshold is not None:
        region = amap >= threshold
        inner = region.copy()
        inner[1:, :] &= region[:-1, :]
        inner[:-1, :] &= region[1:, :]
        inner[:, 1:] &= region[:, :-1]
        inner[:, :-1] &= region[:, 1:]
        out[region & ~inner] = 255
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return path

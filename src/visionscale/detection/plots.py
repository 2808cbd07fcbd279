"""Figures: the EAPM paper's gradient plots (Figs. 3 and 4), the backward-mode comparison,
and training loss curves. Every gradient is taken by autograd through the loss functions
of :mod:`visionscale.detection.losses`, not from hand-derived formulas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionscale.detection.losses import (
    balanced_l1_loss,
    eapm_balanced_l1_loss,
    eapm_focal_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
)
from visionscale.io.figures import figure_png

__all__ = ["focal_gradients", "regression_gradients", "plot_eapm", "plot_loss_curves"]

FIG3, FIG4, MODES = "fig3_eapm_focal_gradient.png", "fig4_eapm_balanced_l1_gradient.png", "eapm_backward_modes.png"


def focal_gradients(errors: np.ndarray, mus=(1.0, 1.5, 2.0), gamma: float = 2.0, mf_grad: str = "paper") -> dict[str, np.ndarray]:
    """|dL/dx| over the prediction error |p - p*| for focal loss and EAPM (paper Fig. 3).

    The example is a positive (p* = 1) with logit x, p = sigmoid(x) = 1 - error; Eq. (1) of
    the paper has no alpha, so alpha is off. Returns ``{"focal": g, "mu=1": g, ...}``.
    """
    err = torch.as_tensor(errors, dtype=torch.float64)
    x = torch.log((1 - err) / err).requires_grad_()  # logit of p = 1 - error
    t = torch.ones_like(x)
    out = {}
    (g,) = torch.autograd.grad(sigmoid_focal_loss(x, t, alpha=-1, gamma=gamma, reduction="sum"), x)
    out["focal"] = g.abs().numpy()
    for mu in mus:
        loss = eapm_focal_loss(x, t, mu=mu, alpha=-1, gamma=gamma, reduction="sum", mf_grad=mf_grad, eps=1e-12)
        (g,) = torch.autograd.grad(loss, x)
        out[f"mu={mu:g}"] = g.abs().numpy()
    return out


def regression_gradients(errors: np.ndarray, thetas=(1.0, 1.5, 2.0), total: float = 1.5, alpha: float = 0.5,
                         gamma: float = 1.5, mf_grad: str = "paper") -> dict[str, np.ndarray]:
    """|dL/dt| over |t - t*| for smooth L1, balanced L1 and EAPM, with |t| + |t*| = ``total`` (Fig. 4).

    t and t* are a width delta: t* = (total - d) / 2, t = (total + d) / 2, so the error is d
    and GoS = d / total. beta = 1 for both L1 losses, as in Libra R-CNN's figure.
    """
    d = torch.as_tensor(errors, dtype=torch.float64)
    pred = torch.zeros(len(d), 4, dtype=torch.float64)
    target = torch.zeros_like(pred)
    pred[:, 2], target[:, 2] = (total + d) / 2, (total - d) / 2
    pred.requires_grad_()
    out = {}
    for name, fn in (("smooth L1", lambda p: smooth_l1_loss(p, target, beta=1.0, reduction="sum")),
                     ("balanced L1", lambda p: balanced_l1_loss(p, target, alpha, gamma, 1.0, reduction="sum"))):
        (g,) = torch.autograd.grad(fn(pred), pred)
        out[name] = g[:, 2].abs().numpy()
    for theta in thetas:
        loss = eapm_balanced_l1_loss(pred, target, theta=theta, alpha=alpha, gamma=gamma, beta=1.0, reduction="sum",
                                     mf_grad=mf_grad)
        (g,) = torch.autograd.grad(loss, pred)
        out[f"theta={theta:g}"] = g[:, 2].abs().numpy()
    return out


def _png(fig) -> bytes:
    return figure_png(fig, dpi=130)


_STYLE = {"focal": ("black", "-"), "smooth L1": ("grey", "--"), "balanced L1": ("black", "-")}
_COLOURS = ("tab:blue", "tab:orange", "tab:green")


def _draw(ax, x, curves, xlabel, ylabel, title):
    k = 0
    for name, y in curves.items():
        colour, ls = _STYLE.get(name, (None, "-"))
        if colour is None:
            colour, k = _COLOURS[k % 3], k + 1
            label = name.replace("mu=", "EAPM, μ = ").replace("theta=", "EAPM, θ = ")
        else:
            label = name + (" (γ = 2)" if name == "focal" else "")
        ax.plot(x, y, color=colour, ls=ls, lw=1.8, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_eapm(out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write Fig. 3, Fig. 4 and the backward-mode comparison as PNGs; return their paths.

    The files appear together (:class:`~visionscale.io.outputs.OutputDir`); a folder holding
    files this command did not write is refused unless ``overwrite`` (those files then stay).
    """
    from visionscale.io.outputs import OutputDir

    target = OutputDir(Path(out_dir), kind="eapm-figures", overwrite=overwrite)
    pngs = _eapm_pngs()
    with target as tmp:
        for name, data in pngs.items():
            (tmp / name).write_bytes(data)
    return [Path(out_dir) / name for name in pngs]


def _eapm_pngs() -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = np.linspace(0.001, 0.999, 999)
    d = np.linspace(0.0, 1.5, 751)
    pngs = {}

    fig, ax = plt.subplots(figsize=(5, 3.8))
    _draw(ax, e, focal_gradients(e), "prediction error |p − p*|", "|∂L/∂x|",
          "Fig. 3: gradient of EAPM with focal loss")
    pngs[FIG3] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.8))
    _draw(ax, d, regression_gradients(d), "regression error |t − t*|   (|t| + |t*| = 1.5)", "|∂L/∂t|",
          "Fig. 4: gradient of EAPM with balanced L1 loss (α = 0.5, γ = 1.5)")
    pngs[FIG4] = _png(fig)
    plt.close(fig)

    # Why mf_grad="paper" is the default: the three ways of backpropagating through MF.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    cls = {"focal": focal_gradients(e, mus=())["focal"]}
    reg = {"balanced L1": regression_gradients(d, thetas=())["balanced L1"]}
    for mode in ("paper", "constant", "full"):
        cls[mode] = focal_gradients(e, mus=(1.5,), mf_grad=mode)["mu=1.5"]
        reg[mode] = regression_gradients(d, thetas=(1.0,), mf_grad=mode)["theta=1"]
    for ax, curves, xl, yl, title in (
        (axes[0], cls, "prediction error |p − p*|", "|∂L/∂x|", "EAPM focal, μ = 1.5"),
        (axes[1], reg, "|t − t*|   (|t| + |t*| = 1.5)", "|∂L/∂t|", "EAPM balanced L1, θ = 1"),
    ):
        for (name, y), colour in zip(curves.items(), ("black", *_COLOURS)):
            label = {"paper": 'mf_grad="paper" (dL/dx at x\')', "constant": 'mf_grad="constant" (MF detached)',
                     "full": 'mf_grad="full" (autograd through MF)'}.get(name, name)
            ax.plot(e if ax is axes[0] else d, y, color=colour, lw=1.8, label=label)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    pngs[MODES] = _png(fig)
    plt.close(fig)
    return pngs


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < n or n <= 1:
        return y
    k = np.ones(n) / n
    return np.convolve(y, k, mode="valid")


def plot_loss_curves(history: dict, path: str | Path, title: str = "") -> Path:
    """Loss per step (raw and moving average) and validation AP per epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionscale.io.atomic import write_atomic

    steps = np.asarray(history["step"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    n = max(1, len(steps) // 50)
    for key, colour in (("loss", "black"), ("cls", "tab:blue"), ("reg", "tab:orange")):
        y = np.asarray(history[key])
        ax.plot(steps, y, color=colour, alpha=0.15, lw=0.8)
        ys = _smooth(y, n)
        ax.plot(steps[len(steps) - len(ys):], ys, color=colour, lw=1.6, label={"loss": "total", "cls": "classification",
                                                                             "reg": "box regression"}[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per positive)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "training loss", fontsize=10)
    ax = axes[1]
    ev = history.get("eval") or []
    if ev:
        ep = [r["epoch"] for r in ev]
        for m in ("AP", "AP50", "AP75"):
            ax.plot(ep, [np.nan if r.get(m) is None else r[m] for r in ev], marker="o", label=m)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP (%)")
    ax.set_title("validation", fontsize=10)
    ax.grid(alpha=0.3)
    write_atomic(Path(path), _png(fig))
    plt.close(fig)
    return Path(path)

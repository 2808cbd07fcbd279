"""Detection losses: sigmoid focal loss, balanced L1 loss, and EAPM on top of both.

* Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; same definition
  as torchvision's ``ops.sigmoid_focal_loss`` and mmdetection's ``FocalLoss`` (sigmoid).
* Balanced L1: Pang et al., "Libra R-CNN: Towards Balanced Learning for Object Detection",
  CVPR 2019, in mmdetection's beta-scaled form (``mmdet/models/losses/balanced_l1_loss.py``).
* EAPM: Wu et al., "Deep Object Detection with Example Attribute Based Prediction
  Modulation", ICASSP 2022 (no official code). The prediction is moved before the loss:
  ``p' = p* + MF (p - p*)``, ``t' = t* + MF (t - t*)``, and the plain loss is taken on it.

Every function takes ``reduction`` ("none" | "mean" | "sum"). "mean" of an empty input is
0 and stays connected to the graph, so a batch with no positives still backpropagates.
NaN or infinite predictions raise ``InvalidValueError`` (a ``ValueError``) instead of silently
poisoning training.

How the gradient flows through the modulation (``mf_grad``); see docs/eapm.md:

* ``"paper"`` (default): Sec. 2.1 of the paper defines the EAPM gradient as the plain loss's
  gradient evaluated at the modulated point, dL/dx|_{x'} and dL/dt|_{t'}. That is a
  straight-through modulation: the forward value is the loss at p' (t'), the backward
  passes dL/dx' (dL/dt') to x (t) unchanged. It is the only mode whose curves keep the
  properties the paper states for Fig. 3 and Fig. 4 (very hard examples unchanged, the
  balanced-L1 gradient bound gamma kept).
* ``"constant"``: MF is a constant in backprop (``detach_mf=True``): the chain rule adds the
  factor MF (and, for classification, the sigmoid slope ratio).
* ``"full"``: plain autograd through MF as well (``detach_mf=False``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.errors import InvalidValueError

Reduction = Literal["none", "mean", "sum"]
MFGrad = Literal["paper", "constant", "full"]
XYMode = Literal["plain", "gos"]

__all__ = [
    "sigmoid_focal_loss",
    "balanced_l1_loss",
    "smooth_l1_loss",
    "cls_modulating_factor",
    "reg_modulating_factor",
    "gap_over_sum",
    "eapm_focal_loss",
    "eapm_balanced_l1_loss",
    "SigmoidFocalLoss",
    "BalancedL1Loss",
    "EAPMFocalLoss",
    "EAPMBalancedL1Loss",
]

_MF_GRADS = ("paper", "constant", "full")


# ----------------------------------------------------------------------------- helpers
def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        # sum() of an empty tensor is 0 with a grad_fn: no NaN from 0/0, backward still works.
        return loss.mean() if loss.numel() else loss.sum()
    raise InvalidValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}").about("reduction")


def _check(name: str, pred: Tensor, target: Tensor) -> Tensor:
    """Validate shapes and values; return the target as pred's dtype."""
    if not torch.is_tensor(pred) or not torch.is_tensor(target):
        raise TypeError(f"{name}: predictions and targets must be tensors")
    if not pred.is_floating_point():
        raise TypeError(f"{name}: predictions must be floating point, got {pred.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    if pred.numel():
        bad = ~torch.isfinite(pred)
        if bool(bad.any()):
            raise InvalidValueError(
                f"{name}: predictions contain NaN or inf ({int(bad.sum())} of {pred.numel()} values); "
                "the model has diverged or its input was not finite"
            )
        target = target.to(pred.dtype)
        if not bool(torch.isfinite(target).all()):
            raise InvalidValueError(f"{name}: targets contain NaN or inf")
    return target.to(pred.dtype)


def _resolve_mf_grad(mf_grad: str, detach_mf: bool | None) -> str:
    if detach_mf is not None:  # the boolean switch the issue asked for, mapped onto the modes
        return "constant" if detach_mf else "full"
    if mf_grad not in _MF_GRADS:
        raise InvalidValueError(f"mf_grad must be one of {_MF_GRADS}, got {mf_grad!r}").about("mf_grad")
    return mf_grad


def _check_param(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value}").about(name)


# ----------------------------------------------------------------------------- plain losses
def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: Reduction = "none"
) -> Tensor:
    """Sigmoid focal loss, FL = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al. 2017, Eq. 5).

    Args:
        inputs: Logits x, any shape; p = sigmoid(x).
        targets: Same shape, 1 for the positive class and 0 for the negative (soft labels work).
        alpha: Weight of positives in (0, 1); a negative value disables the weighting.
        gamma: Focusing exponent; gamma = 0 and alpha < 0 is binary cross-entropy.
        reduction: "none", "mean" or "sum".
    """
    targets = _check("sigmoid_focal_loss", inputs, targets)
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")  # -log(p_t), stable
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma if gamma else ce
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: Reduction = "none",
) -> Tensor:
    """Balanced L1 loss (Libra R-CNN Eq. 8) in mmdetection's beta-scaled form.

    With d = |pred - target| and b = e^(gamma/alpha) - 1::

        L = alpha/b (b d + 1) ln(b d/beta + 1) - alpha d     if d < beta
            gamma d + gamma/b - alpha beta                   otherwise

    For beta = 1 this is the paper's Eq. 8, with gradient alpha ln(b d + 1) for inliers and
    the bound gamma for outliers.
    """
    target = _check("balanced_l1_loss", pred, target)
    if beta <= 0:
        raise InvalidValueError(f"beta must be > 0, got {beta}").about("beta")
    if alpha <= 0:
        raise InvalidValueError(f"alpha must be > 0, got {alpha}").about("alpha")
    diff = torch.abs(pred - target)
    b = math.exp(gamma / alpha) - 1
    inlier = alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff
    outlier = gamma * diff + gamma / b - alpha * beta
    # Both branches are finite everywhere, so torch.where leaks no NaN into the gradient.
    return _reduce(torch.where(diff < beta, inlier, outlier), reduction)


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0, reduction: Reduction = "none") -> Tensor:
    """Smooth L1 (Fast R-CNN); here for the comparison in Fig. 4."""
    target = _check("smooth_l1_loss", pred, target)
    return _reduce(F.smooth_l1_loss(pred, target, beta=beta, reduction="none"), reduction)


# ----------------------------------------------------------------------------- EAPM pieces
def cls_modulating_factor(dif: Tensor, mu: float) -> Tensor:
    """MF_cls = 1 + tanh(mu) - tanh(mu Dif); in [1, 1 + tanh(mu)] for Dif in [0, 1]."""
    return 1 + math.tanh(mu) - torch.tanh(mu * dif)


def reg_modulating_factor(gos: Tensor, theta: float) -> Tensor:
    """MF_reg = 1 + tanh(theta) - tanh(theta GoS); in [1, 1 + tanh(theta)] for GoS in [0, 1]."""
    return 1 + math.tanh(theta) - torch.tanh(theta * gos)


def gap_over_sum(t: Tensor, t_star: Tensor) -> Tensor:
    """GoS = |t - t*| / (|t| + |t*|), in [0, 1]; 0 where t = t* = 0."""
    den = (t.abs() + t_star.abs()).clamp_min(torch.finfo(t.dtype).tiny)
    return ((t - t_star).abs() / den).clamp(max=1.0)


def eapm_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    mu: float = 1.5,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
    mf_grad: MFGrad = "paper",
    eps: float = 1e-6,
    detach_mf: bool | None = None,
) -> Tensor:
    """EAPM with focal loss (paper Sec. 2.2): focal loss on p' = p* + MF_cls (p - p*).

    Dif = |p - p*|, MF_cls = 1 + tanh(mu) - tanh(mu Dif), p' is clamped into [eps, 1 - eps].
    mu = 0 gives the plain focal loss (values and gradients).

    Args:
        inputs: Logits x, any shape.
        targets: Same shape, labels in {0, 1} (soft labels are accepted).
        mu: Modulation strength (paper: 1.0, 1.5, 2.0; 1.5 best on COCO).
        alpha, gamma: Focal loss parameters.
        reduction: "none", "mean" or "sum".
        mf_grad: "paper" (straight-through, the paper's dL/dx at x'), "constant" or "full".
        eps: Clamp of p' away from 0 and 1.
        detach_mf: If given, overrides ``mf_grad``: True -> "constant", False -> "full".
    """
    targets = _check("eapm_focal_loss", inputs, targets)
    _check_param("mu", mu)
    mode = _resolve_mf_grad(mf_grad, detach_mf)
    with torch.set_grad_enabled(torch.is_grad_enabled() and mode != "paper"):
        p = torch.sigmoid(inputs)
        q = torch.sigmoid(-inputs)  # 1 - p without cancellation
        # d = p - p*, exact when p* = 1 (p - 1 would lose the small error of an easy positive).
        d = torch.where(targets >= 1, -q, p - targets)
        mf1 = math.tanh(mu) - torch.tanh(mu * d.abs())  # MF - 1, in [0, tanh(mu)]
        if mode == "constant":
            mf1 = mf1.detach()
        # p' and 1 - p' written so that the side that is small stays exact.
        pos = p + mf1 * d  # p'
        neg = q - mf1 * d  # 1 - p'
        x_mod = torch.log(pos.clamp_min(eps)) - torch.log(neg.clamp_min(eps))  # logit(p'), |.| <= log(1/eps)
    if mode == "paper":
        # Value at x', gradient dL/dx' handed to x unchanged (x' - x is a constant).
        x_mod = inputs + (x_mod - inputs).detach()
    return sigmoid_focal_loss(x_mod, targets, alpha=alpha, gamma=gamma, reduction=reduction)


def eapm_balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    theta: float = 1.0,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: Reduction = "none",
    mf_grad: MFGrad = "paper",
    xy: XYMode = "plain",
    detach_mf: bool | None = None,
) -> Tensor:
    """EAPM with balanced L1 loss (paper Sec. 2.3): balanced L1 on t' = t* + MF_reg (t - t*).

    ``pred`` and ``target`` are box deltas ``(..., 4)`` in the order (t_x, t_y, t_w, t_h) of
    Faster R-CNN's parameterisation. GoS = |t_j - t*_j| / (|t_j| + |t*_j|) and
    MF_reg = 1 + tanh(theta) - tanh(theta GoS) are taken per coordinate for j in {w, h}.
    theta = 0 gives the plain balanced L1 loss (values and gradients).

    Args:
        theta: Modulation strength (paper: 1.0, 1.5, 2.0; 1.0 best on COCO).
        alpha, gamma, beta: Balanced L1 parameters (Libra RetinaNet: 0.5, 1.5, 0.11).
        mf_grad: "paper" (straight-through, dL/dt at t'), "constant" or "full".
        xy: "plain" (default): t_x, t_y are not modulated (MF = 1), because the paper defines
            GoS for w and h only and motivates it by shape variation, which t_x, t_y do not
            measure. "gos": modulate them with their own GoS like w and h.
        detach_mf: If given, overrides ``mf_grad``: True -> "constant", False -> "full".
    """
    target = _check("eapm_balanced_l1_loss", pred, target)
    _check_param("theta", theta)
    mode = _resolve_mf_grad(mf_grad, detach_mf)
    if pred.ndim == 0 or pred.shape[-1] != 4:
        raise ValueError(f"eapm_balanced_l1_loss: expected box deltas of shape (..., 4), got {tuple(pred.shape)}")
    if xy not in ("plain", "gos"):
        raise InvalidValueError(f"xy must be 'plain' or 'gos', got {xy!r}").about("xy")
    with torch.set_grad_enabled(torch.is_grad_enabled() and mode != "paper"):
        d = pred - target
        mf1 = math.tanh(theta) - torch.tanh(theta * gap_over_sum(pred, target))  # MF - 1
        if xy == "plain":
            keep = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=pred.dtype, device=pred.device)
            mf1 = mf1 * keep  # (..., 4): MF = 1 for t_x, t_y
        if mode == "constant":
            mf1 = mf1.detach()
        shift = mf1 * d  # t' - t
    t_mod = pred + (shift.detach() if mode == "paper" else shift)
    return balanced_l1_loss(t_mod, target, alpha=alpha, gamma=gamma, beta=beta, reduction=reduction)


# ----------------------------------------------------------------------------- modules
class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss`."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class BalancedL1Loss(nn.Module):
    """Module form of :func:`balanced_l1_loss`."""

    def __init__(self, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.alpha, self.gamma, self.beta, self.reduction = alpha, gamma, beta, reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return balanced_l1_loss(pred, target, self.alpha, self.gamma, self.beta, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, reduction={self.reduction!r}"


class EAPMFocalLoss(nn.Module):
    """Module form of :func:`eapm_focal_loss`."""

    def __init__(
        self,
        mu: float = 1.5,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: Reduction = "mean",
        mf_grad: MFGrad = "paper",
        eps: float = 1e-6,
        detach_mf: bool | None = None,
    ) -> None:
        super().__init__()
        _check_param("mu", mu)
        self.mu, self.alpha, self.gamma, self.reduction, self.eps = mu, alpha, gamma, reduction, eps
        self.mf_grad = _resolve_mf_grad(mf_grad, detach_mf)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return eapm_focal_loss(inputs, targets, self.mu, self.alpha, self.gamma, self.reduction, self.mf_grad, self.eps)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, alpha={self.alpha}, gamma={self.gamma}, mf_grad={self.mf_grad!r}, reduction={self.reduction!r}"


class EAPMBalancedL1Loss(nn.Module):
    """Module form of :func:`eapm_balanced_l1_loss`."""

    def __init__(
        self,
        theta: float = 1.0,
        alpha: float = 0.5,
        gamma: float = 1.5,
        beta: float = 1.0,
        reduction: Reduction = "mean",
        mf_grad: MFGrad = "paper",
        xy: XYMode = "plain",
        detach_mf: bool | None = None,
    ) -> None:
        super().__init__()
        _check_param("theta", theta)
        self.theta, self.alpha, self.gamma, self.beta, self.reduction, self.xy = theta, alpha, gamma, beta, reduction, xy
        self.mf_grad = _resolve_mf_grad(mf_grad, detach_mf)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return eapm_balanced_l1_loss(
            pred, target, self.theta, self.alpha, self.gamma, self.beta, self.reduction, self.mf_grad, self.xy
        )

    def extra_repr(self) -> str:
        return (f"theta={self.theta}, alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, "
                f"mf_grad={self.mf_grad!r}, xy={self.xy!r}, reduction={self.reduction!r}")

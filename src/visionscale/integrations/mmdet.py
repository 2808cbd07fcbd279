"""EAPM losses for mmdetection configs.

Importing this module registers ``EAPMFocalLoss`` and ``EAPMBalancedL1Loss`` in
mmdetection's loss registry (``mmdet.registry.MODELS`` in 3.x, ``LOSSES`` in 2.x) when
mmdetection is importable; without it the classes are still ordinary ``nn.Module`` s.
In a config::

    custom_imports = dict(imports=["visionscale.integrations.mmdet"], allow_failed_imports=False)
    model = dict(bbox_head=dict(
        loss_cls=dict(type="EAPMFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, mu=1.5, loss_weight=1.0),
        loss_bbox=dict(type="EAPMBalancedL1Loss", alpha=0.5, gamma=1.5, beta=0.11, theta=1.0, loss_weight=1.0)))

(full example: ``docs/eapm/mmdet_example_config.py``). The call signatures follow
mmdetection's ``FocalLoss`` / ``BalancedL1Loss``: ``forward(pred, target, weight=None,
avg_factor=None, reduction_override=None)``; the focal loss accepts class indices (with
``num_classes`` as background) or one-hot targets. The regression loss expects box
*deltas* (the default ``reg_decoded_bbox=False``); GoS is scale-free, so the coder's
``target_stds`` do not change it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.detection.losses import eapm_balanced_l1_loss, eapm_focal_loss

__all__ = ["EAPMFocalLoss", "EAPMBalancedL1Loss", "register", "REGISTERED"]

_EPS = torch.finfo(torch.float32).eps  # mmdetection's weight_reduce_loss adds this to avg_factor


def _weight_reduce(loss: Tensor, weight: Tensor | None, reduction: str, avg_factor: float | Tensor | None) -> Tensor:
    """mmdetection's ``weight_reduce_loss`` semantics."""
    if weight is not None:
        if weight.shape != loss.shape and weight.dim() == 1 and loss.dim() == 2 and weight.numel() == loss.shape[0]:
            weight = weight.view(-1, 1)  # per-prior weight on a (priors, classes) loss
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean() if loss.numel() else loss.sum()
        return loss.sum() if reduction == "sum" else loss
    if reduction == "mean":
        return loss.sum() / (avg_factor + _EPS)
    if reduction == "none":
        return loss
    raise ValueError('avg_factor can not be used with reduction="sum"')


def _reduction(default: str, override: str | None) -> str:
    if override not in (None, "none", "mean", "sum"):
        raise ValueError(f"reduction_override must be None, 'none', 'mean' or 'sum', got {override!r}")
    return override or default


class EAPMFocalLoss(nn.Module):
    """EAPM with sigmoid focal loss (Wu et al., ICASSP 2022, Sec. 2.2) as an mmdetection loss.

    Args:
        use_sigmoid: Must be True (the paper's loss is the sigmoid focal loss).
        gamma, alpha: Focal loss parameters.
        mu: EAPM strength; 0 is mmdetection's FocalLoss.
        reduction, loss_weight: As in mmdetection.
        mf_grad: "paper" (default), "constant" or "full"; see visionscale.detection.losses.
        eps: Clamp of the modulated probability.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25, mu: float = 1.5,
                 reduction: str = "mean", loss_weight: float = 1.0, mf_grad: str = "paper", eps: float = 1e-6) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ValueError("EAPMFocalLoss supports only the sigmoid focal loss (use_sigmoid=True)")
        self.use_sigmoid, self.gamma, self.alpha, self.mu = use_sigmoid, gamma, alpha, mu
        self.reduction, self.loss_weight, self.mf_grad, self.eps = reduction, loss_weight, mf_grad, eps

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor=None,
                reduction_override: str | None = None) -> Tensor:
        """pred (N, C) logits; target (N,) labels in [0, C] (C = background) or (N, C) one-hot."""
        reduction = _reduction(self.reduction, reduction_override)
        if target.dim() == pred.dim() - 1:
            num_classes = pred.shape[-1]
            target = F.one_hot(target.long(), num_classes + 1)[..., :num_classes]
        loss = eapm_focal_loss(pred, target.to(pred.dtype), mu=self.mu, alpha=self.alpha, gamma=self.gamma,
                               reduction="none", mf_grad=self.mf_grad, eps=self.eps)
        return self.loss_weight * _weight_reduce(loss, weight, reduction, avg_factor)


class EAPMBalancedL1Loss(nn.Module):
    """EAPM with balanced L1 loss (Wu et al., ICASSP 2022, Sec. 2.3) as an mmdetection loss.

    Args:
        alpha, gamma, beta: Balanced L1 parameters (Libra RetinaNet: 0.5, 1.5, 0.11).
        theta: EAPM strength; 0 is mmdetection's BalancedL1Loss.
        reduction, loss_weight: As in mmdetection.
        mf_grad: "paper" (default), "constant" or "full".
        xy: "plain" (t_x, t_y not modulated; default) or "gos".
    """

    def __init__(self, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, theta: float = 1.0,
                 reduction: str = "mean", loss_weight: float = 1.0, mf_grad: str = "paper", xy: str = "plain") -> None:
        super().__init__()
        self.alpha, self.gamma, self.beta, self.theta = alpha, gamma, beta, theta
        self.reduction, self.loss_weight, self.mf_grad, self.xy = reduction, loss_weight, mf_grad, xy

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor=None,
                reduction_override: str | None = None, **kwargs) -> Tensor:
        """pred, target (N, 4) deltas (t_x, t_y, t_w, t_h); weight (N, 4) or (N,)."""
        reduction = _reduction(self.reduction, reduction_override)
        if target.numel() == 0:
            return pred.sum() * 0  # no positives: zero, still in the graph (mmdetection does the same)
        loss = eapm_balanced_l1_loss(pred, target, theta=self.theta, alpha=self.alpha, gamma=self.gamma,
                                     beta=self.beta, reduction="none", mf_grad=self.mf_grad, xy=self.xy)
        return self.loss_weight * _weight_reduce(loss, weight, reduction, avg_factor)


def register() -> bool:
    """Register both losses with mmdetection if it is importable; True when registered."""
    try:
        from mmdet.registry import MODELS as registry  # mmdetection 3.x
    except ImportError:
        try:
            from mmdet.models.builder import LOSSES as registry  # mmdetection 2.x
        except ImportError:
            return False
    for cls in (EAPMFocalLoss, EAPMBalancedL1Loss):
        registry.register_module(module=cls, force=True)  # force: re-importing must not fail
    return True


REGISTERED = register()

"""Metric-learning losses for face embeddings: contrastive (Siamese pairs) and triplet.

Contrastive loss: Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant
Mapping", CVPR 2006, Eq. 4. With ``D = ||G(x1) - G(x2)||_2`` and the paper's label ``Y``
(``Y = 0`` for a similar pair, ``Y = 1`` for a dissimilar one):

    L = (1 - Y) * 1/2 * D^2  +  Y * 1/2 * max(0, m - D)^2

Seed 003 implements it with the opposite label convention (``label = 1`` means "same") and
without the two factors 1/2:

    L_seed = label * D^2  +  (1 - label) * max(0, m - D)^2      (= 2 * L_hadsell)

Where the seed and the paper differ we follow the paper by default (``form="hadsell"``);
``form="seed"`` gives the seed's exact values (twice the paper's, same minimiser, so with
Adam it trains alike but reported loss values are doubled). Both take ``same`` = 1 for a
same-person pair, which is unambiguous whichever form is used.

Triplet loss: Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015, Eq. 1 on squared
distances, ``max(0, ||a - p||^2 - ||a - n||^2 + alpha)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visionscale.errors import InvalidValueError

__all__ = ["contrastive_loss", "triplet_loss", "ContrastiveLoss", "TripletLoss", "CONTRASTIVE_FORMS"]

CONTRASTIVE_FORMS = ("hadsell", "seed")
# Under the square root only: keeps the margin term's gradient finite at D = 0.
_EPS = 1e-12


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()  # an empty batch gives 0, not NaN
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise InvalidValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}").about("reduction")


def contrastive_loss(x1: Tensor, x2: Tensor, same: Tensor, margin: float = 1.0, form: str = "hadsell",
                     reduction: str = "mean") -> Tensor:
    """Contrastive loss of embedding pairs.

    Args:
        x1, x2: Embeddings ``(B, D)``.
        same: ``(B,)`` 1 for a same-identity pair, 0 otherwise (bool, int or float).
        margin: ``m``: dissimilar pairs further apart than this cost nothing.
        form: ``"hadsell"`` (paper, with the 1/2 factors) or ``"seed"`` (seed 003, without).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per pair, ``(B,)``).
    """
    if form not in CONTRASTIVE_FORMS:
        raise InvalidValueError(f"form must be one of {CONTRASTIVE_FORMS}, got {form!r}").about("form")
    if margin <= 0:
        raise InvalidValueError(f"margin must be positive, got {margin}").about("margin")
    if x1.shape != x2.shape or x1.dim() != 2:
        raise ValueError(f"x1 and x2 must both be (B, D), got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if same.shape != x1.shape[:1]:
        raise ValueError(f"same must be (B,) = {tuple(x1.shape[:1])}, got {tuple(same.shape)}")
    y = same.to(x1.dtype)
    d2 = (x1 - x2).pow(2).sum(1)  # (B,) squared Euclidean distance
    d = torch.sqrt(d2 + _EPS)
    loss = y * d2 + (1.0 - y) * torch.clamp(margin - d, min=0.0).pow(2)  # (B,)
    if form == "hadsell":
        loss = 0.5 * loss
    return _reduce(loss, reduction)


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 0.2,
                 reduction: str = "mean") -> Tensor:
    """FaceNet triplet loss on squared Euclidean distances, ``(B, D)`` each."""
    if not (anchor.shape == positive.shape == negative.shape) or anchor.dim() != 2:
        raise ValueError(f"anchor, positive, negative must all be (B, D), got {tuple(anchor.shape)}, "
                         f"{tuple(positive.shape)}, {tuple(negative.shape)}")
    if margin < 0:
        raise InvalidValueError(f"margin must be >= 0, got {margin}").about("margin")
    dp = (anchor - positive).pow(2).sum(1)
    dn = (anchor - negative).pow(2).sum(1)
    return _reduce(torch.clamp(dp - dn + margin, min=0.0), reduction)


class ContrastiveLoss(nn.Module):
    """Module wrapper of :func:`contrastive_loss`; ``forward(x1, x2, same)``."""

    def __init__(self, margin: float = 1.0, form: str = "hadsell", reduction: str = "mean") -> None:
        super().__init__()
        if form not in CONTRASTIVE_FORMS:
            raise InvalidValueError(f"form must be one of {CONTRASTIVE_FORMS}, got {form!r}").about("form")
        self.margin, self.form, self.reduction = margin, form, reduction

    def forward(self, x1: Tensor, x2: Tensor, same: Tensor) -> Tensor:
        return contrastive_loss(x1, x2, same, self.margin, self.form, self.reduction)


class TripletLoss(nn.Module):
    """Module wrapper of :func:`triplet_loss`; ``forward(anchor, positive, negative)``."""

    def __init__(self, margin: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        self.margin, self.reduction = margin, reduction

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return triplet_loss(anchor, positive, negative, self.margin, self.reduction)

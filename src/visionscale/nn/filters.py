"""Separable Gaussian smoothing of anomaly maps, with the border mode of each reference.

PatchCore's official code blurs with ``scipy.ndimage.gaussian_filter`` (border mode
``reflect``: the edge pixel is repeated, ``d c b a | a b c d``); DDAD's with kornia's
``gaussian_blur2d`` (torch's ``reflect``: the edge is not repeated, ``d c b | a b c d``).
Both use ``2 * int(4 * sigma + 0.5) + 1`` taps.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Border = Literal["symmetric", "reflect"]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian with radius ``int(truncate * sigma + 0.5)`` (33 taps at sigma 4)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.get_default_dtype())


def _symmetric_pad(x: Tensor, pad: int, dim: int) -> Tensor:
    # scipy's "reflect" (edge repeated); torch's "reflect" is scipy's "mirror".
    n = x.shape[dim]
    left = x.narrow(dim, 0, pad).flip(dim)
    right = x.narrow(dim, n - pad, pad).flip(dim)
    return torch.cat([left, x, right], dim=dim)


def gaussian_blur(x: Tensor, kernel: Tensor, border: Border = "symmetric") -> Tensor:
    """Blur (B, C, H, W) maps channel by channel with a 1-D ``kernel`` along W, then H.

    ``border="symmetric"`` repeats the edge (scipy), ``"reflect"`` does not (torch, kornia);
    maps must be at least ``K // 2`` (symmetric) or ``K // 2 + 1`` (reflect) px on each side.
    """
    size = kernel.numel()
    pad = size // 2
    need = pad if border == "symmetric" else pad + 1
    if min(x.shape[-2:]) < need:
        got = tuple(x.shape[-2:])
        raise ValueError(f"gaussian blur with {size} taps needs maps of at least {need}x{need}, got {got}")
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    k = kernel.to(dtype=x.dtype, device=x.device)
    if border == "symmetric":
        x = F.conv2d(_symmetric_pad(x, pad, 3), k.view(1, 1, 1, size))  # along W
        x = F.conv2d(_symmetric_pad(x, pad, 2), k.view(1, 1, size, 1))  # along H
    elif border == "reflect":
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, size)), k.view(1, 1, size, 1))
    else:
        raise ValueError(f"border must be 'symmetric' or 'reflect', got {border!r}")
    return x.reshape(b, c, h, w)

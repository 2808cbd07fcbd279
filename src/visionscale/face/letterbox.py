"""Letterboxing: fit an image into the square network input keeping its aspect ratio, and map
detections back to the original pixels.

MediaPipe's ``ImageToTensorCalculator`` (``keep_aspect_ratio: true``, ``BORDER_ZERO``) grows
the region of interest (the whole image, centred at ``(W/2, H/2)``) to a square of side
``L = max(W, H)`` and warps it onto the ``S x S`` tensor with bilinear sampling (OpenCV
``warpPerspective``, ``INTER_LINEAR``): output pixel ``j`` samples source position
``j * L / S - pad`` in pixel-index coordinates, ``pad = (L - W) / 2`` (or ``(L - H) / 2``),
outside the image is black. We sample at exactly those positions, so our network sees the
same tensor (up to OpenCV's fixed-point weights and its uint8 rounding, which we also apply).

A point at normalised tensor coordinate ``u`` in [0, 1] is at image pixel ``u * L - pad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Letterbox", "letterbox_tensor"]


@dataclass(frozen=True)
class Letterbox:
    """The mapping between one image of ``width x height`` pixels and its square tensor."""

    width: int
    height: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def pad_x(self) -> float:
        return (self.side - self.width) / 2.0

    @property
    def pad_y(self) -> float:
        return (self.side - self.height) / 2.0

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Normalised tensor coordinates ``(..., 2)`` -> image pixels."""
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([xy[..., 0] * self.side - self.pad_x, xy[..., 1] * self.side - self.pad_y], axis=-1)

    def to_tensor(self, xy: np.ndarray) -> np.ndarray:
        """Image pixels ``(..., 2)`` -> normalised tensor coordinates (inverse of :meth:`to_image`)."""
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([(xy[..., 0] + self.pad_x) / self.side, (xy[..., 1] + self.pad_y) / self.side], axis=-1)


def _axis_weights(n_out: int, n_in: int, side: int, pad: float) -> tuple[np.ndarray, ...]:
    """Source indices (clamped) and bilinear weights (0 outside the image) along one axis."""
    pos = np.arange(n_out, dtype=np.float64) * (side / n_out) - pad
    i0 = np.floor(pos)
    f = pos - i0
    i0 = i0.astype(np.int64)
    i1 = i0 + 1
    w0 = (1 - f) * ((i0 >= 0) & (i0 < n_in))
    w1 = f * ((i1 >= 0) & (i1 < n_in))
    return np.clip(i0, 0, n_in - 1), np.clip(i1, 0, n_in - 1), w0.astype(np.float32), w1.astype(np.float32)


def letterbox_tensor(image: np.ndarray, size: int) -> Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, size, size)`` float32 in [-1, 1], letterboxed.

    Only ``size`` rows and ``size x size`` samples are read, so the cost barely grows with the image.
    """
    h, w = image.shape[:2]
    box = Letterbox(w, h)
    y0, y1, wy0, wy1 = _axis_weights(size, h, box.side, box.pad_y)
    x0, x1, wx0, wx1 = _axis_weights(size, w, box.side, box.pad_x)
    rows = image[y0].astype(np.float32) * wy0[:, None, None] + image[y1].astype(np.float32) * wy1[:, None, None]  # (S, W, 3)
    out = rows[:, x0] * wx0[None, :, None] + rows[:, x1] * wx1[None, :, None]  # (S, S, 3)
    out = np.clip(np.rint(out), 0, 255)  # OpenCV warps a uint8 image into uint8
    return torch.from_numpy((out * np.float32(2.0 / 255.0) - 1.0).transpose(2, 0, 1).astype(np.float32))

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

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["Letterbox", "letterbox_into", "letterbox_tensor"]


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


@functools.lru_cache(maxsize=256)
def _axis_weights(n_out: int, n_in: int, side: int, pad: float) -> tuple[np.ndarray, ...]:
    """Source indices (clamped) and bilinear weights (0 outside the image) along one axis.

    Cached: a batch of same-sized images (video frames, a camera) reuses them. The arrays are
    shared, so they are made read-only.
    """
    pos = np.arange(n_out, dtype=np.float64) * (side / n_out) - pad
    i0 = np.floor(pos)
    f = pos - i0
    i0 = i0.astype(np.int64)
    i1 = i0 + 1
    w0 = (1 - f) * ((i0 >= 0) & (i0 < n_in))
    w1 = f * ((i1 >= 0) & (i1 < n_in))
    out = np.clip(i0, 0, n_in - 1), np.clip(i1, 0, n_in - 1), w0.astype(np.float32), w1.astype(np.float32)
    for a in out:
        a.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _plan(h: int, w: int, size: int) -> tuple:
    """For an ``h x w`` RGB image: flat byte indices ``(3, S, S)`` of the bilinear corners (rows
    y0/y1 times columns x0/x1, channel-first) and the weights shaped to broadcast over them.

    A second row (column) whose weights are all zero is left out (``None``): then every sample
    falls on a whole source row (column), as when the longer side is a multiple of ``S`` and the
    padding a whole number of pixels (512 -> 128, 640x480, 1280x720), and its term would add
    exact zeros. Cached for a few image sizes (up to 1.5 MB each at 128 px), so a batch of
    same-sized images (a camera, a video) computes them once.
    """
    box = Letterbox(w, h)
    y0, y1, wy0, wy1 = _axis_weights(size, h, box.side, box.pad_y)
    x0, x1, wx0, wx1 = _axis_weights(size, w, box.side, box.pad_x)
    channel = np.arange(3)[:, None, None]

    def corner(ys, xs):
        if ys is None or xs is None:
            return None
        idx = ((ys * w)[None, :, None] + xs[None, None, :]) * 3 + channel
        idx.flags.writeable = False
        return idx

    y1 = y1 if wy1.any() else None
    x1 = x1 if wx1.any() else None
    return (corner(y0, x0), corner(y0, x1), corner(y1, x0), corner(y1, x1),
            wy0[None, :, None], wy1[None, :, None], wx0[None, None, :], wx1[None, None, :])


def letterbox_into(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Letterbox ``(H, W, 3)`` uint8 RGB into ``out``, a float32 ``(3, S, S)`` array, in [-1, 1].

    Reads only the source bytes the bilinear samples need: each corner is one gather of bytes
    straight into channel-first order, blended in float32 in place, so the cost does not grow
    with the image and nothing image-sized is allocated. The arithmetic (vertical blend, then
    horizontal, then OpenCV's rounding to uint8) is the one of a row-then-column resize, so the
    values equal those of the plain formulation (kept for strided images) bit for bit; a
    corner whose weights are all zero (see :func:`_plan`) would only add exact zeros and is skipped.
    """
    size = out.shape[-1]
    h, w = image.shape[:2]
    if not image.flags.c_contiguous:
        return _letterbox_rows_then_columns(image, out)
    i00, i01, i10, i11, wy0, wy1, wx0, wx1 = _plan(h, w, size)
    flat = image.reshape(-1)

    def column(top: np.ndarray | None, bottom: np.ndarray | None) -> np.ndarray | None:
        """Vertical blend at one set of columns: ``top * wy0 + bottom * wy1``, ``(3, S, S)``."""
        if top is None:
            return None
        acc = np.take(flat, top).astype(np.float32)
        np.multiply(acc, wy0, out=acc)
        if bottom is not None:
            tmp = np.take(flat, bottom).astype(np.float32)
            np.multiply(tmp, wy1, out=tmp)
            np.add(acc, tmp, out=acc)
        return acc

    left, right = column(i00, i10), column(i01, i11)  # at columns x0, x1
    np.multiply(left, wx0, out=left)
    if right is not None:
        np.multiply(right, wx1, out=right)
        np.add(left, right, out=left)
    # OpenCV warps a uint8 image into uint8. Non-negative weights summing to at most 1 keep the
    # samples within [0, 255] (up to float32 rounding, far from 255.5), so no clipping is needed.
    np.rint(left, out=left)
    np.multiply(left, np.float32(2.0 / 255.0), out=left)
    return np.subtract(left, np.float32(1.0), out=out)


def _letterbox_rows_then_columns(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The plain formulation (any strides): blend whole rows, then gather columns."""
    size = out.shape[-1]
    h, w = image.shape[:2]
    box = Letterbox(w, h)
    y0, y1, wy0, wy1 = _axis_weights(size, h, box.side, box.pad_y)
    x0, x1, wx0, wx1 = _axis_weights(size, w, box.side, box.pad_x)
    rows = image[y0].astype(np.float32) * wy0[:, None, None] + image[y1].astype(np.float32) * wy1[:, None, None]  # (S, W, 3)
    samples = rows[:, x0] * wx0[None, :, None] + rows[:, x1] * wx1[None, :, None]  # (S, S, 3)
    samples = np.clip(np.rint(samples), 0, 255)
    out[:] = (samples * np.float32(2.0 / 255.0) - np.float32(1.0)).transpose(2, 0, 1)
    return out


def letterbox_tensor(image: np.ndarray, size: int) -> Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, size, size)`` float32 in [-1, 1], letterboxed.

    Only ``size x size x 4`` samples are read, so the cost barely grows with the image.
    """
    import torch  # this module is numpy otherwise (a deployment bundle letterboxes without torch)

    return torch.from_numpy(letterbox_into(image, np.empty((3, size, size), np.float32)))

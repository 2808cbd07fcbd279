"""A bundle's pre-processing in numpy: the same pixels ``ad predict`` gives its model, without torch.

:func:`to_model_input` is :func:`visionscale.anomaly.data.to_model_input` (uint8 / 255, an
antialiased bilinear resize, ImageNet normalisation) with torch's resize re-implemented:
``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` is a separable filter
whose weights, per output index ``i`` on an axis of ``n_in -> n_out`` px, are (torch's
``_compute_indices_min_size_weights_aa``, itself Pillow's)::

    scale = n_in / n_out; support = scale if scale >= 1 else 1; inv = 1 / scale if scale >= 1 else 1
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0); xmax = min(int(center + support + 0.5), n_in)
    w_j = max(0, 1 - |(j - center + 0.5) * inv|) for j in [xmin, xmax), then divided by their sum

(``int`` truncates towards zero, as C++'s cast). The weights are computed in float32 as torch
does (``n_in / n_out`` is not exact in float32, so this matters at 1e-6); the sums are two
matrix products in float64 rounded to float32 once, where torch accumulates in float32, width
first: values differ from torch's by float32 rounding only (about 1e-7 of the value;
tests/bundle checks 2e-6 on normalised inputs). Normalisation is float32 as in torch.
"""

from __future__ import annotations

import functools

import numpy as np

from visionscale.errors import InvalidValueError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "aa_weights", "resize_aa", "to_model_input", "pre_resize"]

# visionscale.modelinfo's constants (that module imports torch); a test checks they agree.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=64)
def aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's antialiased bilinear resize along one axis, float64 holding
    the float32 weights torch computes (scale, centres and weights in float32, as its kernel)."""
    if n_in < 1 or n_out < 1:
        raise InvalidValueError(f"sizes must be >= 1 px, got {n_in} -> {n_out}")
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1 else f32(1)  # interp_size (2) * 0.5 * scale
    inv = f32(1) / scale if scale >= 1 else f32(1)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * f32(i + 0.5)
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), n_in)
        w = []
        total = f32(0)
        for j in range(hi - lo):
            v = f32(max(f32(0), f32(1) - abs((f32(j + lo) - center + f32(0.5)) * inv)))
            w.append(v)
            total = f32(total + v)
        if total != 0:
            w = [f32(v / total) for v in w]
        m[i, lo:hi] = w
    m.setflags(write=False)
    return m


def resize_aa(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float -> (h, w, C) float32, torch's antialiased bilinear (see the module doc)."""
    h, w = size
    H, W = x.shape[:2]
    if (H, W) == (h, w):
        return np.asarray(x, dtype=np.float32)
    a = np.asarray(x, dtype=np.float64)
    if W != w:
        a = np.einsum("hwc,vw->hvc", a, aa_weights(W, w), optimize=True)
    if H != h:
        a = np.einsum("hwc,vh->vwc", a, aa_weights(H, h), optimize=True)
    return np.ascontiguousarray(a, dtype=np.float32)


def _unit_float(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidValueError(f"image must be (H, W, 3), got shape {image.shape}").about("image")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)  # torch: .float().div_(255), bit for bit
    if np.issubdtype(image.dtype, np.floating):
        return np.asarray(image, dtype=np.float32)
    raise InvalidValueError(f"image must be uint8 or float in [0, 1], got {image.dtype}").about("image")


def to_model_input(image: np.ndarray, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(H, W, 3) uint8 or float [0, 1] RGB -> (3, h, w) float32, resized and normalised."""
    x = _unit_float(image)
    if x.shape[:2] != tuple(size):
        x = resize_aa(x, size)
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((x - m) / s).transpose(2, 0, 1))


def pre_resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A tiled run's ``pre_resize`` of the whole image (as :mod:`visionscale.anomaly.tiles`):
    Pillow bilinear for uint8, the antialiased resize above for float."""
    if arr.shape[:2] == tuple(size):
        return arr
    if arr.dtype == np.uint8:
        from PIL import Image

        return np.array(Image.fromarray(arr).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return resize_aa(arr, size)

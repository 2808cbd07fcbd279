"""Face alignment from the eye keypoints: rotate so the eyes are level, scale from their distance.

The crop is a similarity transform (rotation, uniform scale, translation) that puts the eyes'
midpoint at ``(size / 2, eye_y * size)`` and the eyes ``eye_distance * size`` pixels apart on
a horizontal line; the image's right eye (keypoint 0, the person's right) lands on the left.
Pixels are sampled bilinearly; outside the image is black.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from visionscale.errors import InvalidValueError

__all__ = ["align_face", "alignment_matrix"]


def alignment_matrix(keypoints: np.ndarray, size: int = 112, eye_distance: float = 0.32, eye_y: float = 0.42) -> np.ndarray:
    """The 2x3 matrix mapping image pixels ``(x, y, 1)`` to crop pixels.

    Args:
        keypoints: ``(K >= 2, 2)`` pixels; rows 0 and 1 are the right and left eye (MediaPipe order).
        size: Crop side in pixels.
        eye_distance: Distance between the eyes in the crop, as a fraction of ``size``.
        eye_y: Height of the eyes in the crop, as a fraction of ``size``.

    Raises:
        InvalidValueError: Fewer than two keypoints, non-finite values, or the eyes coincide.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[0] < 2 or kp.shape[1] != 2:
        raise InvalidValueError(f"keypoints must be (K >= 2, 2) with the eyes first, got shape {kp.shape}").about(
            "keypoints")
    if not np.isfinite(kp[:2]).all():
        raise InvalidValueError("eye keypoints are not finite").about("keypoints")
    right, left = kp[0], kp[1]
    d = left - right
    dist = math.hypot(d[0], d[1])
    if dist < 1e-6:
        raise InvalidValueError("the two eye keypoints coincide: cannot align").about("keypoints")
    angle = math.atan2(d[1], d[0])  # image-space angle of the eye line
    scale = eye_distance * size / dist
    c, s = math.cos(-angle) * scale, math.sin(-angle) * scale
    mid = (right + left) / 2
    rot = np.array([[c, -s], [s, c]])
    t = np.array([size / 2.0, eye_y * size]) - rot @ mid
    return np.hstack([rot, t[:, None]])


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112, eye_distance: float = 0.32,
               eye_y: float = 0.42) -> np.ndarray:
    """Crop an aligned ``(size, size, 3)`` uint8 face (see :func:`alignment_matrix` for the arguments)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}").about("image")
    if size < 1:
        raise InvalidValueError(f"size must be positive, got {size}").about("size")
    m = alignment_matrix(keypoints, size, eye_distance, eye_y)
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]  # crop pixels -> image pixels
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    h, w = image.shape[:2]
    # grid_sample with align_corners=True: -1 / +1 are the centres of the first / last pixel.
    grid = torch.from_numpy(np.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], -1)).float()[None]
    src = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

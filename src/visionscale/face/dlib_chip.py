"""dlib's face alignment (``dlib.get_face_chip``) reimplemented in numpy, for the dlib ResNet descriptor.

The descriptor was trained on chips cut exactly this way, so its accuracy depends on reproducing it:

1. The five landmarks of dlib's 5-point model (outer/inner corner of the image-left... in dlib's order:
   right eye outer, right eye inner, left eye outer, left eye inner, nose base) are matched to a fixed
   template (padded by ``padding`` on each side and scaled to ``size``) with a least-squares similarity
   transform (Umeyama), mapping chip coordinates to image coordinates.
2. That transform becomes a rotated rectangle in the image: its angle, and a box of side
   ``size * scale`` centred on the image of the chip centre, with dlib's inclusive-corner convention
   (a box of width ``w`` runs from ``x0`` to ``x0 + w - 1``).
3. While the box, mapped down one more pyramid level, still has more pixels than the chip, the image
   (cropped to the box's neighbourhood) is reduced with dlib's ``pyramid_down<2>``: a separable
   ``[1 4 6 4 1]`` filter on integers, truncating division by 256, every other row and column.
4. Each chip pixel is sampled bilinearly from the chosen level, truncated to uint8; samples whose 2x2
   neighbourhood leaves the image are black.

Written from dlib's documented geometry and behaviour (interpolation.h, image_pyramid.h,
point_transforms.h, drectangle.h); matches dlib 20.0.1's chips to within one grey level.
"""

from __future__ import annotations

import math

import numpy as np

from visionscale.errors import InvalidValueError

__all__ = ["face_chip", "face_chip_details", "pyramid_down2", "DLIB_5POINT_TEMPLATE"]

#: Where dlib's 5-point landmarks sit in an unpadded unit chip (x, y), in landmark order.
DLIB_5POINT_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ m @ src + t`` (Umeyama 1991, with the reflection fix)."""
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    n = len(src)
    var_s = (s0 ** 2).sum() / n
    cov = d0.T @ s0 / n
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    det = np.linalg.det(cov)
    if det < 0 or (det == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        if d[1] < d[0]:
            s[1, 1] = -1
        else:
            s[0, 0] = -1
    r = u @ s @ vt
    c = 1.0 if var_s == 0 else float(np.trace(np.diag(d) @ s)) / var_s
    return c * r, md - c * r @ ms


def face_chip_details(landmarks5: np.ndarray, size: int = 150, padding: float = 0.25) -> tuple[np.ndarray, float]:
    """dlib's chip location: ``(rect, angle)`` with ``rect = [left, top, right, bottom]`` (inclusive, float)."""
    lm = np.asarray(landmarks5, dtype=np.float64)
    if lm.shape != (5, 2):
        raise InvalidValueError(f"landmarks5 must be (5, 2) [x, y] in dlib's order, got shape {lm.shape}").about(
            "landmarks5")
    if not np.isfinite(lm).all():
        raise InvalidValueError("landmarks5 are not finite").about("landmarks5")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InvalidValueError(f"size must be a positive integer, got {size!r}").about("size")
    padding = float(padding)
    if not math.isfinite(padding) or padding < 0:
        raise InvalidValueError(f"padding must be finite and >= 0, got {padding}").about("padding")
    chip_pts = (padding + DLIB_5POINT_TEMPLATE) / (2 * padding + 1) * size
    m, t = _similarity(chip_pts, lm)
    p = m @ np.array([1.0, 0.0])
    angle = math.atan2(p[1], p[0])
    scale = math.hypot(p[0], p[1])
    centre = m @ np.array([size / 2.0, size / 2.0]) + t
    half = (size * scale - 1) / 2  # centered_drect: a box "width" w spans w - 1 between its corners
    rect = np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])
    return rect, angle


def _area(rect: np.ndarray) -> float:
    w, h = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
    if rect[0] > rect[2] or rect[1] > rect[3]:
        return 0.0
    return w * h


def _rect_down(rect: np.ndarray) -> np.ndarray:
    """pyramid_down<2>'s mapping of a rectangle to the next level: ``p / 2 - (1.25, 0.75)``."""
    return rect / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])


def pyramid_down2(image: np.ndarray) -> np.ndarray:
    """One level of dlib's ``pyramid_down<2>`` on an (H, W, C) uint8 image (integer 5x5 Gaussian, stride 2).

    Output pixel ``(r, c)`` is the ``[1 4 6 4 1]^2 / 256`` weighted sum (truncated) of rows ``2r..2r+4`` and
    columns ``2c..2c+4``; the output is ``((H - 3) // 2, (W - 3) // 2)`` and empty for images of 8 pixels or
    fewer on a side.
    """
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0) + image.shape[2:], dtype=np.uint8)
    x = image.astype(np.int64)
    nc, nr = (w - 3) // 2, (h - 3) // 2
    k = (1, 4, 6, 4, 1)
    rows = sum(k[i] * x[:, i:i + 2 * nc:2] for i in range(5))  # (h, nc)
    out = sum(k[i] * rows[i:i + 2 * nr:2] for i in range(5))  # (nr, nc)
    return (out // 256).astype(np.uint8)


def _rotate(centre: np.ndarray, pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return (pts - centre) @ rot.T + centre


def _corners(rect: np.ndarray) -> np.ndarray:
    l, t, r, b = rect
    return np.array([[l, t], [r, t], [l, b], [r, b]])


def _bilinear_truncate(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib's interpolate_bilinear: black outside, the double result truncated to uint8."""
    h, w = img.shape[:2]
    left = np.floor(x).astype(np.int64)
    top = np.floor(y).astype(np.int64)
    ok = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    lc, tc = np.where(ok, left, 0), np.where(ok, top, 0)
    fx = (x - left)[..., None]
    fy = (y - top)[..., None]
    f = img.astype(np.float64)
    tl, tr = f[tc, lc], f[tc, lc + 1]
    bl, br = f[tc + 1, lc], f[tc + 1, lc + 1]
    v = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    out = np.clip(v, 0, 255).astype(np.uint8)  # astype truncates toward zero, like dlib's cast
    out[~ok] = 0
    return out


def face_chip(image: np.ndarray, landmarks5: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """``dlib.get_face_chip(image, shape, size, padding)`` for a 5-point shape: a (size, size, 3) uint8 chip.

    Args:
        image: (H, W, 3) uint8 RGB image.
        landmarks5: (5, 2) pixel ``[x, y]`` from dlib's 5-point model, in its order.
        size: Chip side in pixels (dlib's default for the descriptor: 150).
        padding: Border around the template as a fraction of it (dlib's default: 0.25).

    Raises:
        InvalidValueError: A wrongly shaped or typed image, landmarks or size/padding.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InvalidValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}").about("image")
    rect, angle = face_chip_details(landmarks5, size, padding)
    h, w = img.shape[:2]
    n_pix = float(size) * float(size)

    # Depth of the pyramid and the crop it is built on (the rotated box, grown by the filters' reach).
    depth, grow = 0, 2.0
    r = _rect_down(rect)
    while _area(r) > n_pix:
        r = _rect_down(r)
        depth += 1
        grow = grow * 2 + 2
    cen = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
    rc = _rotate(cen, _corners(rect), angle)
    box = np.array([rc[:, 0].min() - grow, rc[:, 1].min() - grow, rc[:, 0].max() + grow, rc[:, 1].max() + grow])
    box = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w - 1), min(box[3], h - 1)])
    # drectangle -> rectangle rounds each side half away from zero (std::lround)
    bl, bt, br, bb = (int(math.copysign(math.floor(abs(v) + 0.5), v)) for v in box)
    if bl > br or bt > bb:
        return np.zeros((size, size, 3), dtype=np.uint8)
    src = img[bt:bb + 1, bl:br + 1]
    levels = []
    for _ in range(depth):
        src_level = pyramid_down2(levels[-1] if levels else src)
        levels.append(src_level)

    level = -1
    r = rect - np.array([bl, bt, bl, bt], dtype=np.float64)
    while _area(_rect_down(r)) > n_pix:
        level += 1
        r = _rect_down(r)
    source = src if level == -1 else levels[level]

    # Affine map from chip pixels to the source: chip corners (0,0), (size-1,0), (0,size-1) go to the
    # rotated box's top-left, top-right and bottom-left corners.
    rcen = np.array([(r[0] + r[2]) / 2, (r[1] + r[3]) / 2])
    to = _rotate(rcen, _corners(r)[[0, 1, 2]], angle)
    last = size - 1
    a = np.empty((2, 2))
    a[:, 0] = (to[1] - to[0]) / last if last else 0.0
    a[:, 1] = (to[2] - to[0]) / last if last else 0.0
    cols, rows = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    x = a[0, 0] * cols + a[0, 1] * rows + to[0, 0]
    y = a[1, 0] * cols + a[1, 1] * rows + to[0, 1]
    if source.shape[0] == 0 or source.shape[1] == 0:
        return np.zeros((size, size, 3), dtype=np.uint8)
    return _bilinear_truncate(source, x, y)

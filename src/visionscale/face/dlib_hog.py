"""dlib's HOG frontal face detector (``dlib.get_frontal_face_detector()``) in numpy.

dlib's detector is ``object_detector<scan_fhog_pyramid<pyramid_down<6>>>`` with five linear
filters over Felzenszwalb's HOG ("fHOG", Felzenszwalb et al., *Object Detection with
Discriminatively Trained Part Based Models*, PAMI 2010): front, left, right, and front turned
left / right. Its boxes are what dlib's 5-point landmark model was trained on, so the face
pipeline (:mod:`~visionscale.face.dlib_align`) uses them to reproduce dlib's descriptors.

As the Python binding runs it (``detector(img, upsample)``):

1. the image (uint8 RGB or grey) is enlarged ``upsample`` times with ``pyramid_up``
   (bilinear, to ``2n+1`` rows and ``2n+2`` columns);
2. a pyramid of levels each 5/6 the size of the previous (bilinear) is built while the
   level stays at least 64x64;
3. on each level, fHOG features (8 px cells, 31 planes: 18 signed + 9 unsigned orientations +
   4 texture; zero padded for the 10x10-cell window) are correlated with each filter (dlib
   applies a separable approximation of every 10x10 filter plane: the SVD terms whose singular
   value is at least ``max(1e-4, 0.001 * largest)``);
4. every window scoring at least the filter's threshold is a detection, its box mapped from
   the feature grid back to the image; all filters' detections, best first, pass dlib's
   non-maximum suppression (a box is dropped when it overlaps a kept one by more than
   ``iou_thresh`` of their bounding union, or covers more than ``percent_covered_thresh`` of
   either box).

Everything is computed in dlib's arithmetic (float32 where dlib uses floats, its order of
additions, its SIMD and scalar code paths, which round differently, and its truncations), so
boxes equal dlib 20.0.1's (tests/face/test_dlib_hog.py) and scores agree to float rounding.
Written from dlib's source (``fhog.h``, ``scan_fhog_pyramid.h``, ``image_pyramid.h``,
``interpolation.h``, ``spatial_filtering.h``, ``object_detector.h``, ``box_overlap_testing.h``).

The filters (``dlib_hog_frontal.npz``, 120 KB) are dlib's, Boost Software License 1.0
(``dlib_hog_frontal.LICENSE.txt``); ``tools/dump_dlib_hog.py`` extracted them (needs dlib, offline).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from visionscale.errors import InvalidFileError, InvalidValueError

__all__ = ["HogDetection", "HogFaceDetector", "default_hog_detector", "extract_fhog_features",
           "pyramid_up", "pyramid_down6", "box_overlap", "WEIGHTS_PATH"]

#: dlib's frontal face detector, dumped by tools/dump_dlib_hog.py (dlib 20.0.1, BSL-1.0).
WEIGHTS_PATH = Path(__file__).with_name("dlib_hog_frontal.npz")

F32 = np.float32

# fhog.h: the 9 unit vectors an image gradient is snapped to (and their negatives).
_DIRECTIONS = np.array([
    [1.0000, 0.0000], [0.9397, 0.3420], [0.7660, 0.6428], [0.500, 0.8660], [0.1736, 0.9848],
    [-0.1736, 0.9848], [-0.5000, 0.8660], [-0.7660, 0.6428], [-0.9397, 0.3420],
], dtype=F32)


def _lround(x: float) -> int:
    """C's ``std::lround``: to nearest, halves away from zero (how dlib turns a drectangle
    into a rectangle)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


# ---------------------------------------------------------------------------------------------
# Resampling (interpolation.h: resize_image with interpolate_bilinear, uint8 grey or RGB)
# ---------------------------------------------------------------------------------------------

def _bilinear_columns(n_in: int, n_out: int):
    """Where each output column samples, split as dlib's resize does: the first ``cs`` columns
    come from its 4-wide SIMD loop (float32 positions, accumulated in float32, truncated), the
    rest from its scalar tail (float64 positions)."""
    xs = (n_in - 1) / max(n_out - 1, 1)
    x0 = -4 * xs
    nblocks = n_out // 4 + 2
    steps = np.empty((nblocks + 1, 4), F32)
    steps[0] = np.array([x0, x0 + xs, x0 + 2 * xs, x0 + 3 * xs], dtype=np.float64).astype(F32)
    steps[1:] = F32(4 * xs)
    pos = np.cumsum(steps, axis=0, dtype=F32)[1:]           # (blocks, 4): lane positions
    left = pos.astype(np.int64)                             # truncation (cvttps)
    stop = np.nonzero(left[:, 3] + 1 >= n_in)[0]
    b = int(stop[0]) if len(stop) else nblocks
    b = min(b, n_out // 4)
    cs = 4 * b
    s_left = left[:b].reshape(-1)
    s_lr = (pos[:b].reshape(-1) - s_left.astype(F32)).astype(F32)
    # Scalar tail: x = -xs + cs*xs, then x += xs per column (float64, accumulated).
    nt = n_out - cs
    t = np.empty(nt + 1)
    t[0] = -xs + cs * xs
    t[1:] = xs
    tx = np.cumsum(t)[1:]
    t_left = np.floor(tx).astype(np.int64)
    t_right = np.minimum(t_left + 1, n_in - 1)
    t_lr = tx - t_left
    return cs, s_left, s_lr, t_left, t_right, t_lr


def _bilinear_rows(n_in: int, n_out: int):
    ys = (n_in - 1) / max(n_out - 1, 1)
    t = np.empty(n_out + 1)
    t[0] = -ys
    t[1:] = ys
    y = np.cumsum(t)[1:]
    top = np.floor(y).astype(np.int64)
    bottom = np.minimum(top + 1, n_in - 1)
    return top, bottom, y - top


def resize_bilinear(img: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """dlib's ``resize_image(in, out)`` (bilinear) for uint8 ``(H, W)`` or ``(H, W, 3)``."""
    if n_rows <= 0 or n_cols <= 0 or img.shape[0] == 0 or img.shape[1] == 0:
        return np.zeros((max(n_rows, 0), max(n_cols, 0)) + img.shape[2:], np.uint8)
    rgb = img.ndim == 3
    top, bottom, tb = _bilinear_rows(img.shape[0], n_rows)
    cs, s_left, s_lr, t_left, t_right, t_lr = _bilinear_columns(img.shape[1], n_cols)
    out = np.empty((n_rows, n_cols) + img.shape[2:], np.uint8)
    rows_t, rows_b = img[top], img[bottom]
    ex = (slice(None), slice(None), None) if rgb else (slice(None), slice(None))
    if cs:
        # SIMD part: float32 weights, ((tl*tlf + tr*trf) + bl*blf) + br*brf in float32.
        tbf = tb.astype(F32)[:, None]
        itbf = (1 - tb).astype(F32)[:, None]
        lr = s_lr[None, :]
        ilr = F32(1) - lr
        tlf, trf, blf, brf = itbf * ilr, itbf * lr, tbf * ilr, tbf * lr
        sr = s_left + 1
        v = (tlf[ex] * rows_t[:, s_left].astype(F32) + trf[ex] * rows_t[:, sr].astype(F32)
             + blf[ex] * rows_b[:, s_left].astype(F32) + brf[ex] * rows_b[:, sr].astype(F32))
        if rgb:
            out[:, :cs] = v.astype(np.int32).astype(np.uint8)          # truncation
        else:
            out[:, :cs] = (v.astype(np.float64) + 0.5).astype(np.int32).astype(np.uint8)
    if cs < n_cols:
        tbd = tb[:, None]
        if rgb:
            lr = t_lr[None, :, None]
            a = (1 - lr) * rows_t[:, t_left].astype(np.float64) + lr * rows_t[:, t_right]
            b = (1 - lr) * rows_b[:, t_left].astype(np.float64) + lr * rows_b[:, t_right]
            v = (1 - tbd[:, :, None]) * a + tbd[:, :, None] * b
            out[:, cs:] = v.astype(np.int32).astype(np.uint8)
        else:
            lr = t_lr.astype(F32)[None, :]
            a = ((F32(1) - lr) * rows_t[:, t_left].astype(F32) + lr * rows_t[:, t_right].astype(F32))
            b = ((F32(1) - lr) * rows_b[:, t_left].astype(F32) + lr * rows_b[:, t_right].astype(F32))
            v = ((1 - tbd) * a.astype(np.float64) + tbd * b.astype(np.float64)).astype(F32)
            out[:, cs:] = np.clip(v, 0, 255).astype(np.int32).astype(np.uint8)
    return out


def pyramid_up(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_up(img, out, pyramid_down<2>)``: the image rectangle mapped up one
    ``pyramid_down<2>`` level (``(p + (1.25, 0.75)) * 2``, rounded), then a bilinear resize:
    ``n`` rows become ``2n + 1``, ``m`` columns ``2m + 2``."""
    nr, nc = img.shape[:2]
    if nr == 0 or nc == 0:
        return np.zeros((0, 0) + img.shape[2:], np.uint8)
    bottom = _lround((nr - 1 + 0.75) * 2)
    right = _lround((nc - 1 + 1.25) * 2)
    return resize_bilinear(img, bottom + 1, right + 1)


def pyramid_down6(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_down<6>`` on an image: 5/6 of the rows and columns (rounded down),
    bilinear."""
    nr, nc = img.shape[:2]
    return resize_bilinear(img, (5 * nr) // 6, (5 * nc) // 6)


# ---------------------------------------------------------------------------------------------
# fHOG (fhog.h: extract_fhog_features into 31 planes)
# ---------------------------------------------------------------------------------------------

def _gradients(img: np.ndarray, y1: int, x1: int, simd_end: int):
    """Per-pixel gradient of rows ``1..y1-1``, columns ``1..x1-1``: the channel with the
    largest squared magnitude (dlib's SIMD columns, ``< simd_end``, break ties towards the later
    channel, its scalar columns towards the earlier one). Returns int32 gx, gy, squared length."""
    rows = slice(1, y1)
    cols = slice(1, x1)
    if img.ndim == 2:
        im = img.astype(np.int32)
        gx = im[rows, 2:x1 + 1] - im[rows, 0:x1 - 1]
        gy = im[2:y1 + 1, cols] - im[0:y1 - 1, cols]
        return gx, gy, gx * gx + gy * gy
    im = img.astype(np.int32)
    gxs = im[rows, 2:x1 + 1] - im[rows, 0:x1 - 1]           # (h, w, 3)
    gys = im[2:y1 + 1, cols] - im[0:y1 - 1, cols]
    lens = gxs * gxs + gys * gys
    r, g, b = lens[..., 0], lens[..., 1], lens[..., 2]
    # SIMD: (r > g ? r : g), then (that > b ? that : b).
    s_first = np.where(r > g, 0, 1)
    s_len = np.maximum(r, g)
    s_pick = np.where(s_len > b, s_first, 2)
    # scalar: start with r; take g if g > len; then b if b > len.
    c_first = np.where(g > r, 1, 0)
    c_len = np.maximum(r, g)
    c_pick = np.where(b > c_len, 2, c_first)
    ncols = x1 - 1
    is_simd = (np.arange(1, 1 + ncols) < simd_end)[None, :]
    pick = np.where(is_simd, s_pick, c_pick)[..., None]
    gx = np.take_along_axis(gxs, pick, 2)[..., 0]
    gy = np.take_along_axis(gys, pick, 2)[..., 0]
    ln = np.take_along_axis(lens, pick, 2)[..., 0]
    return gx, gy, ln


def _orientations(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The best of 18 signed orientations by the float32 dot product (first maximum wins;
    a zero gradient gets 0)."""
    fx, fy = gx.astype(F32), gy.astype(F32)
    best = np.zeros(fx.shape, F32)
    best_o = np.zeros(fx.shape, np.int64)
    for o in range(9):
        dot = fx * _DIRECTIONS[o, 0] + fy * _DIRECTIONS[o, 1]
        up = dot > best
        best = np.where(up, dot, best)
        best_o = np.where(up, o, best_o)
        neg = -dot
        up = neg > best
        best = np.where(up, neg, best)
        best_o = np.where(up, o + 9, best_o)
    return best_o


def extract_fhog_features(img: np.ndarray, cell_size: int = 8, filter_rows_padding: int = 1,
                          filter_cols_padding: int = 1) -> np.ndarray:
    """dlib's ``extract_fhog_features`` into planar ``(31, rows, cols)`` float32.

    ``img`` is uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grey. The cell grid has
    ``round(H / cell_size) - 2`` rows (likewise columns); the planes carry a zero border of
    ``(filter_rows_padding - 1) // 2`` rows on top and ``filter_rows_padding // 2`` below
    (likewise columns) so a filter of that size can be correlated with every window. An image
    too small for one cell gives planes of size 0.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise InvalidValueError(f"image must be uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}"
                                ).about("image")
    if cell_size < 2:
        raise InvalidValueError(f"cell_size must be >= 2 (dlib's cell size 1 is another algorithm), "
                                f"got {cell_size}").about("cell_size")
    nr, nc = img.shape[:2]
    cells_nr = int(nr / cell_size + 0.5)
    cells_nc = int(nc / cell_size + 0.5)
    hog_nr, hog_nc = max(cells_nr - 2, 0), max(cells_nc - 2, 0)
    if hog_nr == 0 or hog_nc == 0:
        return np.zeros((31, 0, 0), F32)
    vis_nr = min(cells_nr * cell_size, nr) - 1
    vis_nc = min(cells_nc * cell_size, nc) - 1
    hist = np.zeros((cells_nr + 2, cells_nc + 2, 18), F32)
    if vis_nr > 1 and vis_nc > 1:
        # dlib runs 8 pixels at a time from x = 1 while x < vis_nc - 7, then one at a time.
        simd_end = 1 + 8 * max(0, (vis_nc - 8 + 7) // 8)
        gx, gy, ln = _gradients(img, vis_nr, vis_nc, simd_end)
        o = _orientations(gx, gy)
        v = np.sqrt(ln.astype(F32))
        ys = np.arange(1, vis_nr)
        xs = np.arange(1, vis_nc)
        yp = ((ys + 0.5) / cell_size - 0.5).astype(F32)
        iyp = np.floor(yp).astype(np.int64)
        vy0 = (yp - iyp.astype(F32)).astype(F32)
        vy1 = (1.0 - vy0.astype(np.float64)).astype(F32)
        xp = ((xs + 0.5) / cell_size - 0.5).astype(F32)
        ixp = np.floor(xp).astype(np.int64)
        vx0 = (xp - ixp.astype(F32)).astype(F32)
        vx1 = (1.0 - vx0.astype(np.float64)).astype(F32)
        simd = (xs < simd_end)[None, :]
        vy0c, vy1c = vy0[:, None], vy1[:, None]
        vx0r, vx1r = vx0[None, :], vx1[None, :]
        # SIMD: vy * (vx * v); scalar: (vy * vx) * v -- they round differently.
        a1, a0 = vx1r * v, vx0r * v
        w11 = np.where(simd, vy1c * a1, (vy1c * vx1r) * v)
        w01 = np.where(simd, vy0c * a1, (vy0c * vx1r) * v)
        w10 = np.where(simd, vy1c * a0, (vy1c * vx0r) * v)
        w00 = np.where(simd, vy0c * a0, (vy0c * vx0r) * v)
        r0 = np.broadcast_to((iyp + 1)[:, None], o.shape)
        c0 = np.broadcast_to((ixp + 1)[None, :], o.shape)
        # Each bin takes its votes in raster order of the pixels, as dlib adds them; np.add.at
        # adds sequentially in index order, so the float32 sums are dlib's.
        rr = np.stack([r0, r0 + 1, r0, r0 + 1], -1).reshape(-1)
        cc = np.stack([c0, c0, c0 + 1, c0 + 1], -1).reshape(-1)
        oo = np.repeat(o.reshape(-1), 4)
        ww = np.stack([w11, w01, w10, w00], -1).reshape(-1)
        np.add.at(hist, (rr, cc, oo), ww)

    # Block energies: norm[r, c] = sum_o (h[o] + h[o+9])^2 over the cell's 9 unsigned bins,
    # added in order.
    inner = hist[1:cells_nr + 1, 1:cells_nc + 1]
    norm = np.zeros((cells_nr, cells_nc), F32)
    for k in range(9):
        s = inner[..., k] + inner[..., k + 9]
        norm = norm + s * s

    # Four 2x2-cell block norms around each cell (dlib's 4 SIMD lanes).
    n = norm
    ny, nx = hog_nr, hog_nc

    def sl(dy, dx):
        return n[dy:dy + ny, dx:dx + nx]

    z = []
    for lane in range(4):
        # lane 0: blocks at (y+1, x+1), lane 1: (y, x+1), lane 2: (y+1, x), lane 3: (y, x)
        by, bx = [(1, 1), (0, 1), (1, 0), (0, 0)][lane]
        s = sl(by, bx) + sl(by, bx + 1)
        s = s + sl(by + 1, bx)
        s = s + sl(by + 1, bx + 1)
        z.append(s)
    z = np.stack(z)                                           # (4, ny, nx)
    nn = F32(0.2) * np.sqrt(z + F32(0.0001))
    nrm = F32(0.1) / nn
    h = hist[2:2 + ny, 2:2 + nx]                              # (ny, nx, 18)
    rp, cp = (filter_rows_padding - 1) // 2, (filter_cols_padding - 1) // 2
    out = np.zeros((31, ny + filter_rows_padding - 1, nx + filter_cols_padding - 1), F32)
    view = out[:, rp:rp + ny, cp:cp + nx]

    def lanesum(t):
        # _mm_dp_ps with ones: (l0 + l1) + (l2 + l3)
        return (t[0] + t[1]) + (t[2] + t[3])

    t = np.zeros((4, ny, nx), F32)
    for o3 in range(0, 18, 3):
        hs = [np.minimum(h[..., o3 + k][None], nn) * nrm for k in range(3)]
        for k in range(3):
            view[o3 + k] = lanesum(hs[k])
        t = t + ((hs[0] + hs[1]) + hs[2])
    t = t * F32(2 * 0.2357)
    for o in range(9):
        s = h[..., o] + h[..., o + 9]
        view[18 + o] = lanesum(np.minimum(s[None], nn) * nrm)
    view[27:31] = t
    return out


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HogDetection:
    """One face found by dlib's HOG detector.

    Attributes:
        rect: dlib's inclusive ``(left, top, right, bottom)`` integer box in the input image.
        score: ``detection_confidence``: the window's filter response minus the filter's
            threshold (>= ``adjust_threshold``).
        filter: Which of the five filters fired (0 front, 1 left, 2 right, 3/4 front turned).
        level: Pyramid level (0 = the (upsampled) image itself, each next one 5/6 the size).
    """

    rect: tuple[int, int, int, int]
    score: float
    filter: int
    level: int

    @property
    def width(self) -> int:
        return self.rect[2] - self.rect[0] + 1


def _rect_area(r) -> int:
    w, h = r[2] - r[0] + 1, r[3] - r[1] + 1
    return w * h if w > 0 and h > 0 else 0


def box_overlap(a, b, iou_thresh: float, percent_covered_thresh: float) -> bool:
    """dlib's ``test_box_overlap``: the intersection over the *bounding box* of both
    (dlib's ``(a + b).area()``) above ``iou_thresh``, or over either box's area above
    ``percent_covered_thresh``. Boxes are inclusive ``(l, t, r, b)``."""
    inner = _rect_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    if inner == 0:
        return False
    outer = _rect_area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    return (inner / outer > iou_thresh or inner / _rect_area(a) > percent_covered_thresh
            or inner / _rect_area(b) > percent_covered_thresh)


class _SeparableFilter:
    """One detector's filter bank as dlib applies it: per fHOG plane, the rank-k terms of its
    SVD (column filter ``u*sqrt(s)``, row filter ``v*sqrt(s)``, float32)."""

    def __init__(self, w: np.ndarray, height: int, width: int, planes: int = 31):
        size = height * width
        self.threshold = float(w[planes * size])
        planes_idx, rows, cols = [], [], []
        for i in range(planes):
            f = w[i * size:(i + 1) * size].reshape(height, width)
            u, s, vt = np.linalg.svd(f)
            keep = s >= max(1e-4, float(s.max()) * 0.001)
            for j in np.nonzero(keep)[0]:
                sq = math.sqrt(float(s[j]))
                planes_idx.append(i)
                cols.append((u[:, j] * sq).astype(F32))
                rows.append((vt[j, :] * sq).astype(F32))
        if len(rows) > planes * min(height, width) / 3.0:
            # dlib would switch to the full (non-separable) filters; not needed for its face
            # detector, whose filters are low-rank (54-66 terms).
            raise InvalidFileError(f"filter needs {len(rows)} separable terms: dlib would apply it "
                                   "unseparated, which this port does not implement")
        self.planes = np.asarray(planes_idx, np.int64)
        self.row = np.stack(rows)                             # (k, width)
        self.col = np.stack(cols)                             # (k, height)


def _correlate_1d(x: np.ndarray, taps: np.ndarray, axis: int, first: int, last: int,
                  simd_cols: np.ndarray) -> np.ndarray:
    """dlib's float_spatially_filter_image_separable, one pass, for k images at once.

    ``x`` is ``(k, R, C)``; ``taps`` ``(k, L)``; output positions ``first..last-1`` along
    ``axis`` (1 rows, 2 columns). Columns flagged in ``simd_cols`` are summed like dlib's 8-wide
    loop (three interleaved partial sums), the others sequentially."""
    L = taps.shape[1]
    n_out = last - first

    def tap(n):
        sl = [slice(None)] * 3
        sl[axis] = slice(n, n + n_out)
        return x[tuple(sl)] * taps[:, n][:, None, None]

    # sequential
    seq = tap(0)
    for n in range(1, L):
        seq = seq + tap(n)
    if not simd_cols.any():
        return seq
    acc = [None, None, None]
    n = 0
    while n < L - 2:
        for k in range(3):
            term = tap(n + k)
            acc[k] = term if acc[k] is None else acc[k] + term
        n += 3
    while n < L:
        term = tap(n)
        acc[0] = term if acc[0] is None else acc[0] + term
        n += 1
    if acc[1] is None:
        simd = acc[0]
    else:
        simd = acc[0] + (acc[1] + acc[2])
    return np.where(simd_cols, simd, seq)


class HogFaceDetector:
    """dlib's ``get_frontal_face_detector()``: ``detector(image, upsample)`` -> detections.

    Args:
        path: The ``.npz`` written by ``tools/dump_dlib_hog.py`` (default: the packaged one).
    """

    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path is not None else WEIGHTS_PATH
        try:
            with np.load(path, allow_pickle=False) as z:
                weights = np.asarray(z["weights"], np.float64)
                meta = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidFileError(f"cannot read dlib HOG detector {path}: {exc}").about("path") from exc
        self.meta = meta
        self.cell_size = int(meta["cell_size"])
        self.padding = int(meta["padding"])
        self.iou_thresh = float(meta["iou_thresh"])
        self.percent_covered_thresh = float(meta["percent_covered_thresh"])
        self.min_level_width = int(meta["min_pyramid_layer_width"])
        self.min_level_height = int(meta["min_pyramid_layer_height"])
        self.max_levels = int(meta["max_pyramid_levels"])
        # scan_fhog_pyramid::compute_fhog_window_size: the window mapped to fHOG cells, grown by
        # the padding (80x80 px, 8 px cells, padding 0 -> 10x10 cells).
        self.fhog_width = self._fhog_extent(int(meta["window_width"])) + 2 * self.padding
        self.fhog_height = self._fhog_extent(int(meta["window_height"])) + 2 * self.padding
        dims = 31 * self.fhog_width * self.fhog_height
        if weights.ndim != 2 or weights.shape[1] != dims + 1:
            raise InvalidFileError(f"{path}: weights {weights.shape} do not fit a "
                                   f"{self.fhog_height}x{self.fhog_width}x31 window").about("path")
        self.filters = [_SeparableFilter(w, self.fhog_height, self.fhog_width) for w in weights]

    def _fhog_extent(self, size: int) -> int:
        # centered_rect(point(0,0), size) mapped by image_to_fhog (C integer division).
        lo, hi = -(size // 2), -(size // 2) + size - 1

        def to_fhog(p):
            q = p - 1
            d = abs(q) // self.cell_size * (1 if q >= 0 else -1)
            return d - 1
        return to_fhog(hi) - to_fhog(lo) + 1

    # -- pyramid ---------------------------------------------------------------------------------
    def num_levels(self, rows: int, cols: int) -> int:
        """How many pyramid levels dlib scans for an image of ``rows x cols``."""
        rect = (0, 0, cols - 1, rows - 1)
        levels = 0
        while True:
            rect = tuple(_lround((p - 0.3) * (5 / 6.0)) for p in rect)
            levels += 1
            w, h = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
            if not (w >= self.min_level_width and h >= self.min_level_height and levels < self.max_levels):
                return levels

    def _filter_level(self, feats: np.ndarray, filt: _SeparableFilter):
        """Saliency of one filter on one level's planar features (float32), and its valid area
        ``(top, left, bottom, right)`` (inclusive), as dlib's separable filtering computes it."""
        _, nr, nc = feats.shape
        if nr == 0 or nc == 0:
            return None, None
        L_r, L_c = filt.row.shape[1], filt.col.shape[1]
        first_col, last_col = L_r // 2, nc - (L_r - 1) // 2
        first_row, last_row = L_c // 2, nr - (L_c - 1) // 2
        if last_col <= first_col or last_row <= first_row:
            return None, None
        cols = np.arange(first_col, last_col)
        nsimd = 0
        c = first_col
        while c < last_col - 7:
            c += 8
            nsimd += 8
        simd_cols = (cols < first_col + nsimd)[None, None, :]
        x = feats[filt.planes]                                  # (k, nr, nc)
        scratch = _correlate_1d(x, filt.row, 2, first_col, last_col, simd_cols)   # (k, nr, ncols)
        res = _correlate_1d(scratch, filt.col, 1, first_row, last_row, simd_cols)  # (k, nrows, ncols)
        sal = np.cumsum(res, axis=0, dtype=F32)[-1]             # added term by term, in order
        return sal, (first_row, first_col)

    def _window_rect(self, r: int, c: int, level: int):
        """A saliency peak at (row r, col c) of ``level`` -> the image box (dlib's
        fhog_to_image of the window, then pyramid_down<6>.rect_up ``level`` times)."""
        w, h = self.fhog_width - 2 * self.padding, self.fhog_height - 2 * self.padding
        left, top = c - w // 2, r - h // 2
        right, bottom = left + w - 1, top + h - 1
        cs = self.cell_size
        rp, cp = (self.fhog_height - 1) // 2, (self.fhog_width - 1) // 2

        def to_img(p, pad):
            q = (p + 1 - pad) * cs + 1
            return q + (cs // 2 if q >= 0 else -(cs // 2))
        box = [float(to_img(left, cp)), float(to_img(top, rp)), float(to_img(right, cp)), float(to_img(bottom, rp))]
        for _ in range(level):
            box = [p * (6 / 5.0) + 0.3 for p in box]
        return [_lround(p) for p in box]

    def scan(self, image: np.ndarray, levels=None, adjust_threshold: float = 0.0):
        """Raw detections of every filter on ``image`` (already upsampled), before suppression:
        ``[(score, (l, t, r, b), filter, level), ...]`` in the image's coordinates.

        ``levels`` (an iterable of ints) limits the scan to those pyramid levels; the pyramid
        images are still built in full, each from the previous one, as dlib builds them."""
        nlev = self.num_levels(image.shape[0], image.shape[1])
        wanted = set(range(nlev)) if levels is None else {int(l) for l in levels if 0 <= int(l) < nlev}
        out = []
        cur = image
        for lev in range(nlev):
            if lev > 0:
                if lev > max(wanted, default=-1):
                    break
                cur = pyramid_down6(cur)
            if lev not in wanted:
                continue
            feats = extract_fhog_features(cur, self.cell_size, self.fhog_height, self.fhog_width)
            for fi, filt in enumerate(self.filters):
                sal, origin = self._filter_level(feats, filt)
                if sal is None:
                    continue
                thresh = filt.threshold + adjust_threshold
                rr, cc = np.nonzero(sal.astype(np.float64) >= thresh)
                for r, c in zip(rr.tolist(), cc.tolist()):
                    score = float(sal[r, c])
                    out.append((score - filt.threshold, tuple(self._window_rect(r + origin[0], c + origin[1], lev)),
                                fi, lev))
        return out

    def suppress(self, dets):
        """dlib's non-maximum suppression over raw detections, best first."""
        order = sorted(range(len(dets)), key=lambda i: -dets[i][0])
        kept = []
        for i in order:
            rect = dets[i][1]
            if any(box_overlap(k[1], rect, self.iou_thresh, self.percent_covered_thresh) for k in kept):
                continue
            kept.append(dets[i])
        return kept

    def __call__(self, image: np.ndarray, upsample: int = 1, adjust_threshold: float = 0.0,
                 levels=None) -> list[HogDetection]:
        """Faces in ``image`` (uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grey), as
        ``dlib.get_frontal_face_detector()`` finds them with ``run(image, upsample,
        adjust_threshold)``: boxes in input pixels, best first.

        ``levels`` restricts the scan to those pyramid levels (of the upsampled image); the
        detections there are dlib's, but suppression then only sees those levels."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise InvalidValueError(f"image must be uint8 (H, W) grey or (H, W, 3) RGB, got {image.dtype} "
                                    f"{image.shape}").about("image")
        if int(upsample) != upsample or upsample < 0:
            raise InvalidValueError(f"upsample must be an integer >= 0, got {upsample}").about("upsample")
        img = image
        for _ in range(int(upsample)):
            img = pyramid_up(img)
        dets = self.suppress(self.scan(np.ascontiguousarray(img), levels, adjust_threshold))
        res = []
        for score, rect, fi, lev in dets:
            box = [float(p) for p in rect]
            for _ in range(int(upsample)):
                box = [box[0] / 2.0 - 1.25, box[1] / 2.0 - 0.75, box[2] / 2.0 - 1.25, box[3] / 2.0 - 0.75]
            res.append(HogDetection(tuple(_lround(p) for p in box), score, fi, lev))
        return res


@lru_cache(maxsize=1)
def default_hog_detector() -> HogFaceDetector:
    """The packaged detector, loaded once."""
    return HogFaceDetector()

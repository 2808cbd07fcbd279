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


class _Resize:
    """dlib's bilinear ``resize_image`` from ``in_shape`` to ``out_shape`` (rows, cols), able to
    compute any window of the output from a window of the input (the sample positions depend
    on the whole sizes only, so a window is bit-identical to the same part of the full resize)."""

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape[:2]), tuple(out_shape[:2])
        self.top, self.bottom, self.tb = _bilinear_rows(self.in_shape[0], self.out_shape[0])
        (self.cs, self.s_left, self.s_lr, self.t_left, self.t_right,
         self.t_lr) = _bilinear_columns(self.in_shape[1], self.out_shape[1])

    def _cols(self, c0: int, c1: int):
        """(simd columns, tail columns) of output columns c0..c1-1 as index ranges."""
        a0, a1 = min(c0, self.cs), min(c1, self.cs)
        b0, b1 = max(c0, self.cs), max(c1, self.cs)
        return (a0, a1), (b0 - self.cs, b1 - self.cs)

    def needed(self, rows, cols):
        """The input window ``((r0, r1), (c0, c1))`` the output window ``rows x cols`` reads."""
        r0, r1 = rows
        (a0, a1), (b0, b1) = self._cols(*cols)
        lo, hi = [], []
        if a1 > a0:
            lo.append(int(self.s_left[a0]))
            hi.append(int(self.s_left[a1 - 1]) + 1)
        if b1 > b0:
            lo.append(int(self.t_left[b0:b1].min()))
            hi.append(int(self.t_right[b0:b1].max()))
        return ((int(self.top[r0]), int(self.bottom[r1 - 1]) + 1), (min(lo), max(hi) + 1))

    def __call__(self, src: np.ndarray, src_origin=(0, 0), rows=None, cols=None) -> np.ndarray:
        """Output window ``rows x cols`` (default: all) from ``src``, the input window whose
        top-left pixel is ``src_origin``."""
        rows = rows or (0, self.out_shape[0])
        cols = cols or (0, self.out_shape[1])
        n_rows, n_cols = rows[1] - rows[0], cols[1] - cols[0]
        out = np.empty((n_rows, n_cols) + src.shape[2:], np.uint8)
        if n_rows <= 0 or n_cols <= 0:
            return out
        rgb = src.ndim == 3
        oy, ox = src_origin
        top = self.top[rows[0]:rows[1]] - oy
        bottom = self.bottom[rows[0]:rows[1]] - oy
        tb = self.tb[rows[0]:rows[1]]
        (a0, a1), (b0, b1) = self._cols(*cols)
        if a1 > a0:
            # dlib's 4-wide loop: float32 weights, ((tl*tlf + tr*trf) + bl*blf) + br*brf.
            s_left = self.s_left[a0:a1] - ox
            sf = src[:, s_left[0]:s_left[-1] + 2].astype(F32)   # the source columns read
            cl = np.take(sf, s_left - s_left[0], axis=1)
            cr = np.take(sf, s_left - s_left[0] + 1, axis=1)
            tbf = tb.astype(F32)[:, None]
            itbf = (1 - tb).astype(F32)[:, None]
            lr = self.s_lr[a0:a1][None, :]
            ilr = F32(1) - lr
            v = None
            for wgt, part, rr in ((itbf * ilr, cl, top), (itbf * lr, cr, top),
                                  (tbf * ilr, cl, bottom), (tbf * lr, cr, bottom)):
                t = np.take(part, rr, axis=0)
                t *= wgt[:, :, None] if rgb else wgt
                if v is None:
                    v = t
                else:
                    v += t
            if rgb:
                out[:, :a1 - a0] = v.astype(np.uint8)             # truncation
            else:
                out[:, :a1 - a0] = (v.astype(np.float64) + 0.5).astype(np.uint8)
        if b1 > b0:
            # dlib's scalar tail: float64 (RGB) or mixed float32/float64 (grey) arithmetic.
            rows_t, rows_b = src[top], src[bottom]
            t_left, t_right = self.t_left[b0:b1] - ox, self.t_right[b0:b1] - ox
            tbd = tb[:, None]
            k = a1 - a0
            if rgb:
                lr = self.t_lr[b0:b1][None, :, None]
                a = (1 - lr) * rows_t[:, t_left].astype(np.float64) + lr * rows_t[:, t_right]
                b = (1 - lr) * rows_b[:, t_left].astype(np.float64) + lr * rows_b[:, t_right]
                v = (1 - tbd[:, :, None]) * a + tbd[:, :, None] * b
                out[:, k:] = v.astype(np.int32).astype(np.uint8)
            else:
                lr = self.t_lr[b0:b1].astype(F32)[None, :]
                a = (F32(1) - lr) * rows_t[:, t_left].astype(F32) + lr * rows_t[:, t_right].astype(F32)
                b = (F32(1) - lr) * rows_b[:, t_left].astype(F32) + lr * rows_b[:, t_right].astype(F32)
                v = ((1 - tbd) * a.astype(np.float64) + tbd * b.astype(np.float64)).astype(F32)
                out[:, k:] = np.clip(v, 0, 255).astype(np.int32).astype(np.uint8)
        return out


def resize_bilinear(img: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """dlib's ``resize_image(in, out)`` (bilinear) for uint8 ``(H, W)`` or ``(H, W, 3)``."""
    if n_rows <= 0 or n_cols <= 0 or img.shape[0] == 0 or img.shape[1] == 0:
        return np.zeros((max(n_rows, 0), max(n_cols, 0)) + img.shape[2:], np.uint8)
    return _Resize(img.shape, (n_rows, n_cols))(img)


def _up_shape(shape):
    nr, nc = shape[:2]
    if nr == 0 or nc == 0:
        return (0, 0)
    return (_lround((nr - 1 + 0.75) * 2) + 1, _lround((nc - 1 + 1.25) * 2) + 1)


def _down6_shape(shape):
    return ((5 * shape[0]) // 6, (5 * shape[1]) // 6)


def pyramid_up(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_up(img, out, pyramid_down<2>)``: the image rectangle mapped up one
    ``pyramid_down<2>`` level (``(p + (1.25, 0.75)) * 2``, rounded), then a bilinear resize:
    ``n`` rows become ``2n + 1``, ``m`` columns ``2m + 2``."""
    return resize_bilinear(img, *_up_shape(img.shape))


def pyramid_down6(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_down<6>`` on an image: 5/6 of the rows and columns (rounded down),
    bilinear."""
    return resize_bilinear(img, *_down6_shape(img.shape))


# ---------------------------------------------------------------------------------------------
# fHOG (fhog.h: extract_fhog_features into 31 planes)
# ---------------------------------------------------------------------------------------------

def _gradients(img: np.ndarray, ys, xs, simd: np.ndarray):
    """Per-pixel gradient at local rows ``ys[0]..ys[1]-1`` and columns ``xs[0]..xs[1]-1`` of
    ``img``: of the channel with the largest squared magnitude (dlib's SIMD columns, flagged
    in ``simd``, break ties towards the later channel, its scalar columns towards the earlier
    one). Returns int32 gx, gy, squared length."""
    (y0, y1), (x0, x1) = ys, xs
    im = img.astype(np.int32)
    gx = im[y0:y1, x0 + 1:x1 + 1] - im[y0:y1, x0 - 1:x1 - 1]
    gy = im[y0 + 1:y1 + 1, x0:x1] - im[y0 - 1:y1 - 1, x0:x1]
    if img.ndim == 2:
        return gx, gy, gx * gx + gy * gy
    lens = gx * gx + gy * gy                                  # (h, w, 3)
    r, g, b = lens[..., 0], lens[..., 1], lens[..., 2]
    # SIMD: (r > g ? r : g), then (that > b ? that : b).
    s_pick = np.where(np.maximum(r, g) > b, np.where(r > g, 0, 1), 2)
    # scalar: start with r; take g if g > len; then b if b > len.
    c_pick = np.where(b > np.maximum(r, g), 2, np.where(g > r, 1, 0))
    pick = np.where(simd[None, :], s_pick, c_pick)[..., None]
    return (np.take_along_axis(gx, pick, 2)[..., 0], np.take_along_axis(gy, pick, 2)[..., 0],
            np.take_along_axis(lens, pick, 2)[..., 0])


def _orientations(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The best of 18 signed orientations by the float32 dot product with dlib's 9 directions.

    dlib walks o = 0..8, taking ``dot`` (bin o) or ``-dot`` (bin o + 9) when strictly larger
    than the best so far (which starts at 0): the first direction of largest ``|dot|`` wins, a
    zero gradient gets bin 0."""
    fx, fy = gx.astype(F32), gy.astype(F32)
    dots = fx[None] * _DIRECTIONS[:, 0, None, None] + fy[None] * _DIRECTIONS[:, 1, None, None]
    mag = np.abs(dots)
    k = np.argmax(mag, axis=0)                                 # first maximum
    d = np.take_along_axis(dots, k[None], 0)[0]
    return np.where(d > 0, k, np.where(d < 0, k + 9, 0))


class _FhogGrid:
    """dlib's fHOG cell layout for an image of ``shape`` (rows, cols)."""

    def __init__(self, shape, cell_size: int = 8):
        nr, nc = shape[:2]
        self.shape, self.cs = (nr, nc), cell_size
        self.cells_nr = int(nr / cell_size + 0.5)
        self.cells_nc = int(nc / cell_size + 0.5)
        self.hog_nr, self.hog_nc = max(self.cells_nr - 2, 0), max(self.cells_nc - 2, 0)
        # Pixels 1..vis-1 vote (dlib's loops stop a pixel short of the last full cell or edge).
        self.vis_nr = min(self.cells_nr * cell_size, nr) - 1
        self.vis_nc = min(self.cells_nc * cell_size, nc) - 1
        # dlib runs 8 pixels at a time from x = 1 while x < vis_nc - 7, then one at a time.
        self.simd_end = 1 + 8 * max(0, (self.vis_nc - 8 + 7) // 8)

    @property
    def empty(self) -> bool:
        return self.hog_nr == 0 or self.hog_nc == 0

    def voters(self, k0: int, k1: int):
        """Pixel range (inclusive) that votes into histogram rows (or columns) ``k0..k1-1``:
        pixel y votes into rows ``floor((y + 0.5) / cs - 0.5) + {1, 2}``."""
        cs = self.cs
        return math.ceil(cs * (k0 - 1.5) - 0.5), math.ceil(cs * (k1 - 1 + 0.5) - 0.5) - 1

    def crop_for_cells(self, cells_y, cells_x):
        """The pixel window ``((y0, y1), (x0, x1))`` (starting on a cell boundary) whose pixels
        determine the features of cells ``cells_y x cells_x``."""
        out = []
        for (c0, c1), n in ((cells_y, self.shape[0]), (cells_x, self.shape[1])):
            lo, hi = self.voters(c0 + 1, c1 + 3)              # a cell reads histogram cells c+1..c+3
            lo = max(0, (max(lo - 1, 0) // self.cs) * self.cs)
            out.append((lo, min(n, hi + 2)))
        return tuple(out)


def _fhog_cells(img: np.ndarray, origin, grid: _FhogGrid, cells_y, cells_x) -> np.ndarray:
    """fHOG features ``(31, ny, nx)`` of cells ``cells_y[0]..cells_y[1]-1`` (likewise x) of an
    image laid out as ``grid``, computed from ``img``, its window starting at pixel ``origin``
    (a cell boundary) and covering ``grid.crop_for_cells(cells_y, cells_x)``."""
    cs = grid.cs
    oy, ox = origin
    h, w = img.shape[:2]
    (cy0, cy1), (cx0, cx1) = cells_y, cells_x
    ny, nx = cy1 - cy0, cx1 - cx0
    # Histogram cells hr0..hr1-1 (dlib's hist has a 1-cell border: cell c is hist c + 1), plus
    # one more each side so every vote of a used pixel has a place.
    hr0, hr1, hc0, hc1 = cy0 + 1, cy1 + 3, cx0 + 1, cx1 + 3
    # Voting pixels (image coordinates): those dlib processes, that vote into those cells.
    vy0, vy1 = grid.voters(hr0, hr1)
    vx0, vx1 = grid.voters(hc0, hc1)
    py0, py1 = max(1, vy0, oy + 1), min(grid.vis_nr - 1, vy1)
    px0, px1 = max(1, vx0, ox + 1), min(grid.vis_nc - 1, vx1)
    if (py1 >= py0 and (py0 > max(1, vy0) or py1 + 1 > oy + h - 1)) or \
            (px1 >= px0 and (px0 > max(1, vx0) or px1 + 1 > ox + w - 1)):
        raise AssertionError("fHOG window does not cover the cells asked for")
    hist = np.zeros((hr1 - hr0 + 2, hc1 - hc0 + 2, 18), F32)   # local hist row i = hr0 - 1 + i
    if py1 >= py0 and px1 >= px0:
        ys = np.arange(py0, py1 + 1)
        xs = np.arange(px0, px1 + 1)
        simd = xs < grid.simd_end
        gx, gy, ln = _gradients(img, (py0 - oy, py1 + 1 - oy), (px0 - ox, px1 + 1 - ox), simd)
        o = _orientations(gx, gy)
        v = np.sqrt(ln.astype(F32))
        yp = ((ys + 0.5) / cs - 0.5).astype(F32)
        iyp = np.floor(yp).astype(np.int64)
        wy0 = (yp - iyp.astype(F32)).astype(F32)
        wy1 = (1.0 - wy0.astype(np.float64)).astype(F32)
        xp = ((xs + 0.5) / cs - 0.5).astype(F32)
        ixp = np.floor(xp).astype(np.int64)
        wx0 = (xp - ixp.astype(F32)).astype(F32)
        wx1 = (1.0 - wx0.astype(np.float64)).astype(F32)
        simd = simd[None, :]
        wy0c, wy1c = wy0[:, None], wy1[:, None]
        wx0r, wx1r = wx0[None, :], wx1[None, :]
        # SIMD: wy * (wx * v); scalar: (wy * wx) * v -- they round differently.
        a1, a0 = wx1r * v, wx0r * v
        w11 = np.where(simd, wy1c * a1, (wy1c * wx1r) * v)
        w01 = np.where(simd, wy0c * a1, (wy0c * wx1r) * v)
        w10 = np.where(simd, wy1c * a0, (wy1c * wx0r) * v)
        w00 = np.where(simd, wy0c * a0, (wy0c * wx0r) * v)
        # Each bin takes its votes in raster order of the pixels, as dlib adds them; np.add.at
        # adds sequentially in index order, so the float32 sums are dlib's.
        stride = hist.shape[1] * 18
        base = ((iyp + 1 - (hr0 - 1)) * stride)[:, None] + ((ixp + 1 - (hc0 - 1)) * 18)[None, :] + o
        idx = base[..., None] + np.array([0, stride, 18, stride + 18])
        ww = np.stack([w11, w01, w10, w00], -1)
        np.add.at(hist.reshape(-1), idx.reshape(-1), ww.reshape(-1))

    # Cell energies: norm = sum_o (h[o] + h[o+9])^2 over the 9 unsigned bins, in order; norm
    # row j is hist row j + 1, and cell c reads norm rows c..c+2.
    inner = hist[1:-1, 1:-1]                                   # hist rows hr0..hr1-1 = norm cy0..cy1+1
    norm = np.zeros(inner.shape[:2], F32)
    for k in range(9):
        t = inner[..., k] + inner[..., k + 9]
        norm = norm + t * t

    def sl(dy, dx):
        return norm[dy:dy + ny, dx:dx + nx]

    # The four 2x2-cell block energies around each cell (dlib's 4 SIMD lanes), summed in its order.
    z = []
    for by, bx in ((1, 1), (0, 1), (1, 0), (0, 0)):
        z.append(((sl(by, bx) + sl(by, bx + 1)) + sl(by + 1, bx)) + sl(by + 1, bx + 1))
    z = np.stack(z)                                            # (4, ny, nx)
    nn = F32(0.2) * np.sqrt(z + F32(0.0001))
    nrm = F32(0.1) / nn
    hh = inner[1:1 + ny, 1:1 + nx]                             # the cells' own histograms
    out = np.empty((31, ny, nx), F32)

    def lanesum(t):
        # _mm_dp_ps with ones: (l0 + l1) + (l2 + l3)
        return (t[0] + t[1]) + (t[2] + t[3])

    t = np.zeros((4, ny, nx), F32)
    for o3 in range(0, 18, 3):
        hs = [np.minimum(hh[..., o3 + k][None], nn) * nrm for k in range(3)]
        for k in range(3):
            out[o3 + k] = lanesum(hs[k])
        t = t + ((hs[0] + hs[1]) + hs[2])
    for o in range(9):
        s = hh[..., o] + hh[..., o + 9]
        out[18 + o] = lanesum(np.minimum(s[None], nn) * nrm)
    out[27:31] = t * F32(2 * 0.2357)
    return out


def extract_fhog_features(img: np.ndarray, cell_size: int = 8, filter_rows_padding: int = 1,
                          filter_cols_padding: int = 1) -> np.ndarray:
    """dlib's ``extract_fhog_features`` into planar ``(31, rows, cols)`` float32.

    ``img`` is uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grey. The cell grid has
    ``round(H / cell_size) - 2`` rows (likewise columns); the planes carry a zero border of
    ``(filter_rows_padding - 1) // 2`` rows on top and ``filter_rows_padding // 2`` below
    (likewise columns) so a filter of that size can be correlated with every window. An image
    too small for one cell gives planes of size 0.
    """
    img = _check_image(img)
    if int(cell_size) != cell_size or cell_size < 2:
        raise InvalidValueError(f"cell_size must be an integer >= 2 (dlib's cell size 1 is another "
                                f"algorithm), got {cell_size}").about("cell_size")
    if min(filter_rows_padding, filter_cols_padding) < 1:
        raise InvalidValueError("filter paddings must be >= 1").about("filter_rows_padding")
    grid = _FhogGrid(img.shape, int(cell_size))
    if grid.empty:
        return np.zeros((31, 0, 0), F32)
    feats = _fhog_cells(img, (0, 0), grid, (0, grid.hog_nr), (0, grid.hog_nc))
    rp, cp = (filter_rows_padding - 1) // 2, (filter_cols_padding - 1) // 2
    out = np.zeros((31, grid.hog_nr + filter_rows_padding - 1, grid.hog_nc + filter_cols_padding - 1), F32)
    out[:, rp:rp + grid.hog_nr, cp:cp + grid.hog_nc] = feats
    return out


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise InvalidValueError(f"image must be uint8 (H, W) grey or (H, W, 3) RGB, got {image.dtype} "
                                f"{image.shape}").about("image")
    return np.ascontiguousarray(image)


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


def _correlate_1d(x: np.ndarray, taps: np.ndarray, axis: int, nsimd: int) -> np.ndarray:
    """One pass of dlib's ``float_spatially_filter_image_separable`` for k images at once.

    ``x`` is ``(k, R, C)``, ``taps`` ``(k, L)``. Along columns (``axis=2``):
    ``out[:, i, j] = sum_n x[:, i, j + n] * taps[:, n]``, shape ``(k, R, C - L + 1)``; along rows
    (``axis=1``) likewise with ``x[:, i + n, j]``. The first ``nsimd`` output columns are summed
    as dlib's 8-wide loop sums them (taps n = 0, 3, 6.. | 1, 4, 7.. | 2, 5, 8.. in three
    partial sums, then ``a + (b + c)``), the rest one tap after another as its scalar loop does."""
    L = taps.shape[1]
    n_rows = x.shape[1] - L + 1 if axis == 1 else x.shape[1]
    n_cols = x.shape[2] - L + 1 if axis == 2 else x.shape[2]

    def tap(n, c0, c1):
        v = x[:, :, n + c0:n + c1] if axis == 2 else x[:, n:n + n_rows, c0:c1]
        return v * taps[:, n][:, None, None]

    parts = []
    if nsimd > 0:
        acc = [None, None, None]
        n = 0
        while n < L - 2:
            for k in range(3):
                term = tap(n + k, 0, nsimd)
                acc[k] = term if acc[k] is None else acc[k] + term
            n += 3
        while n < L:
            term = tap(n, 0, nsimd)
            acc[0] = term if acc[0] is None else acc[0] + term
            n += 1
        parts.append(acc[0] if acc[1] is None else acc[0] + (acc[1] + acc[2]))
    if nsimd < n_cols:
        seq = tap(0, max(nsimd, 0), n_cols)
        for n in range(1, L):
            seq = seq + tap(n, max(nsimd, 0), n_cols)
        parts.append(seq)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def _span(a, b):
    """Bounding range of two ``(lo, hi)`` ranges (either may be None)."""
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))


@dataclass
class _LevelJob:
    """What to scan on one pyramid level: saliency rows/cols ``sal`` (dlib's padded feature
    coordinates), the fHOG cells they read, and the pixel window those need."""

    level: int
    shape: tuple
    grid: _FhogGrid
    sal: tuple
    cells: tuple
    window: tuple


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

    def _job(self, level: int, shape, rows=None, cols=None):
        """The scan of level ``level`` (image ``shape``) restricted to saliency rows/cols
        (default: all of dlib's valid area), or None if nothing is left to scan."""
        grid = _FhogGrid(shape, self.cell_size)
        if grid.empty:
            return None
        fh, fw = self.fhog_height, self.fhog_width
        nr_p, nc_p = grid.hog_nr + fh - 1, grid.hog_nc + fw - 1
        r0, r1 = fh // 2, nr_p - (fh - 1) // 2                 # dlib's valid filter area
        c0, c1 = fw // 2, nc_p - (fw - 1) // 2
        if rows is not None:
            r0, r1 = max(r0, rows[0]), min(r1, rows[1])
        if cols is not None:
            c0, c1 = max(c0, cols[0]), min(c1, cols[1])
        if r1 <= r0 or c1 <= c0:
            return None
        rp, cp = (fh - 1) // 2, (fw - 1) // 2
        # padded rows r - fh//2 .. r + (fh-1)//2 hold cells (padded - rp), zero outside the image
        cy = (max(r0 - fh // 2 - rp, 0), min(r1 + (fh - 1) // 2 - rp, grid.hog_nr))
        cx = (max(c0 - fw // 2 - cp, 0), min(c1 + (fw - 1) // 2 - cp, grid.hog_nc))
        if cy[1] <= cy[0] or cx[1] <= cx[0]:
            return None
        return _LevelJob(level, tuple(shape[:2]), grid, ((r0, r1), (c0, c1)), (cy, cx),
                         grid.crop_for_cells(cy, cx))

    def _scan_level(self, job: _LevelJob, img: np.ndarray, origin, adjust_threshold: float, out: list):
        """Correlate every filter with one level's features inside ``job`` (dlib's arithmetic)
        and append its detections ``(score, rect, filter, level)`` to ``out``."""
        fh, fw = self.fhog_height, self.fhog_width
        rp, cp = (fh - 1) // 2, (fw - 1) // 2
        (r0, r1), (c0, c1) = job.sal
        (cy0, cy1), (cx0, cx1) = job.cells
        p0, q0 = r0 - fh // 2, c0 - fw // 2                      # first padded row/col read
        sub = np.zeros((31, r1 - r0 + fh - 1, c1 - c0 + fw - 1), F32)
        sub[:, cy0 + rp - p0:cy1 + rp - p0, cx0 + cp - q0:cx1 + cp - q0] = \
            _fhog_cells(img, origin, job.grid, job.cells[0], job.cells[1])
        # dlib's 8-wide filter loops cover columns first_col, +8, .. while c < last_col - 7.
        nc_p = job.grid.hog_nc + fw - 1
        first_col, last_col = fw // 2, nc_p - (fw - 1) // 2
        simd_end = first_col + 8 * max(0, -(-(last_col - 7 - first_col) // 8))
        nsimd = int(np.clip(simd_end - c0, 0, c1 - c0))
        for fi, filt in enumerate(self.filters):
            x = sub[filt.planes]                                 # (terms, rows, cols)
            scratch = _correlate_1d(x, filt.row, 2, nsimd)
            res = _correlate_1d(scratch, filt.col, 1, nsimd)
            sal = np.cumsum(res, axis=0, dtype=F32)[-1]          # added term by term, in order
            rr, cc = np.nonzero(sal.astype(np.float64) >= filt.threshold + adjust_threshold)
            for r, c in zip(rr.tolist(), cc.tolist()):
                out.append((float(sal[r, c]) - filt.threshold,
                            tuple(self._window_rect(r + r0, c + c0, job.level)), fi, job.level))

    def _sal_range(self, lo: float, hi: float, axis: int):
        """Saliency indices (along ``axis``: 0 rows, 1 cols) whose window centre lies in
        [lo, hi] (level pixels)."""
        box = self._window_rect(0, 0, 0)
        centre0 = (box[axis + 1 if axis == 0 else 0] + box[axis + 3 if axis == 0 else 2]) / 2
        cs = self.cell_size
        return (math.floor((lo - centre0) / cs), math.ceil((hi - centre0) / cs) + 1)

    def scan(self, image: np.ndarray, upsample: int = 1, adjust_threshold: float = 0.0,
             levels=None, roi=None):
        """Raw detections of every filter before suppression, in the upsampled image's pixels:
        ``[(score, (l, t, r, b), filter, level), ...]``.

        ``levels`` (ints) limits the scan to those pyramid levels; ``roi`` (``(l, t, r, b)`` in
        input pixels) to windows centred inside it. Only the pixels those windows depend on
        are resampled and described, with dlib's arithmetic, so what is found equals what a
        full scan finds there."""
        shapes_up = [tuple(image.shape[:2])]
        for _ in range(upsample):
            shapes_up.append(_up_shape(shapes_up[-1]))
        base = shapes_up[-1]
        if base[0] == 0 or base[1] == 0:
            return []
        nlev = self.num_levels(*base)
        wanted = sorted(set(range(nlev)) if levels is None else {int(v) for v in levels if 0 <= int(v) < nlev})
        if not wanted:
            return []
        shapes = [base]
        for _ in range(1, wanted[-1] + 1):
            shapes.append(_down6_shape(shapes[-1]))
        jobs = {}
        for lev in wanted:
            rows = cols = None
            if roi is not None:
                box = [float(v) for v in roi]
                for _ in range(upsample):
                    box = [(box[0] + 1.25) * 2, (box[1] + 0.75) * 2, (box[2] + 1.25) * 2, (box[3] + 0.75) * 2]
                for _ in range(lev):
                    box = [(v - 0.3) * (5 / 6.0) for v in box]
                rows, cols = self._sal_range(box[1], box[3], 0), self._sal_range(box[0], box[2], 1)
            job = self._job(lev, shapes[lev], rows, cols)
            if job is not None:
                jobs[lev] = job
        if not jobs:
            return []
        # Which window of every image in the chain is needed (from the top level down).
        top = max(jobs)
        need = [None] * (top + 1)
        resizes = [None] + [_Resize(shapes[i - 1], shapes[i]) for i in range(1, top + 1)]
        for lev in range(top, -1, -1):
            w = jobs[lev].window if lev in jobs else None
            if lev < top and need[lev + 1] is not None:
                src = resizes[lev + 1].needed(*need[lev + 1])
                w = src if w is None else (_span(w[0], src[0]), _span(w[1], src[1]))
            need[lev] = w
        up_resizes = [_Resize(shapes_up[i - 1], shapes_up[i]) for i in range(1, len(shapes_up))]
        need_up = [None] * len(shapes_up)
        need_up[-1] = need[0]
        for i in range(len(shapes_up) - 1, 0, -1):
            need_up[i - 1] = up_resizes[i - 1].needed(*need_up[i])
        (y0, y1), (x0, x1) = need_up[0]
        cur, origin = image[y0:y1, x0:x1], (y0, x0)
        for i in range(1, len(shapes_up)):
            rows, cols = need_up[i]
            cur, origin = up_resizes[i - 1](cur, origin, rows, cols), (rows[0], cols[0])
        out = []
        for lev in range(top + 1):
            if lev > 0:
                rows, cols = need[lev]
                cur, origin = resizes[lev](cur, origin, rows, cols), (rows[0], cols[0])
            if lev in jobs:
                (wy0, wy1), (wx0, wx1) = jobs[lev].window
                win = cur[wy0 - origin[0]:wy1 - origin[0], wx0 - origin[1]:wx1 - origin[1]]
                self._scan_level(jobs[lev], win, (wy0, wx0), adjust_threshold, out)
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
                 levels=None, roi=None) -> list[HogDetection]:
        """Faces in ``image`` (uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grey) as
        ``dlib.get_frontal_face_detector().run(image, upsample, adjust_threshold)`` finds them:
        boxes in input pixels, best first.

        ``levels`` / ``roi`` restrict the scan (see :meth:`scan`); suppression then only sees
        what was scanned, so a restricted result equals the full one when nothing outside the
        restriction would have suppressed it."""
        image = _check_image(image)
        if int(upsample) != upsample or not 0 <= upsample <= 4:
            raise InvalidValueError(f"upsample must be an integer 0..4, got {upsample}").about("upsample")
        upsample = int(upsample)
        dets = self.suppress(self.scan(image, upsample, adjust_threshold, levels, roi))
        res = []
        for score, rect, fi, lev in dets:
            box = [float(p) for p in rect]
            for _ in range(upsample):
                box = [box[0] / 2.0 - 1.25, box[1] / 2.0 - 0.75, box[2] / 2.0 - 1.25, box[3] / 2.0 - 0.75]
            res.append(HogDetection(tuple(_lround(p) for p in box), score, fi, lev))
        return res

    def level_for_width(self, width: float, upsample: int = 1) -> float:
        """The (fractional) pyramid level at which a face whose dlib box is ``width`` input
        pixels wide fills the detection window."""
        win = self._window_rect(0, 0, 0)
        return math.log(max(width, 1.0) * 2 ** upsample / (win[2] - win[0] + 1)) / math.log(1.2)


@lru_cache(maxsize=1)
def default_hog_detector() -> HogFaceDetector:
    """The packaged detector, loaded once."""
    return HogFaceDetector()

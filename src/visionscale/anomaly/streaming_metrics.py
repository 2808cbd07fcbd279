"""Pixel AUROC, pixel F1 and AUPRO in bounded memory: anomaly maps are added one at a time.

:func:`visionscale.anomaly.metrics.evaluate_scores` sorts every pixel of every map at once, so
its memory grows with images x pixels (about 94 bytes per pixel on top of the maps: 590 MiB for
100 maps of 256 px, see docs/benchmarks.md) and maps of 4096 x 4096 are out of reach. Here each map updates three histograms over score cells and is then dropped::

    acc = PixelMetricAccumulator()
    for amap, mask in test_maps:          # (H, W) scores; (H, W) mask or None for a good image
        acc.update(amap, mask)
    pixels = acc.result(fpr_limit=0.3)    # PixelMetrics: values, error bounds, thinned curves
    metrics = evaluate_streaming(image_labels, image_scores, acc)   # an ImageMetrics

API:

* ``PixelMetricAccumulator(bins=2**16, value_range=None)``
  - ``update(anomaly_map, mask=None)``: one image; ``anomaly_map`` (H, W) float numpy array or
    torch tensor (leading size-1 axes are dropped), ``mask`` (H, W), nonzero = anomalous, or
    ``None`` for an image without defects.
  - ``result(fpr_limit=0.3, max_curve_points=2000) -> PixelMetrics``.
  - ``merge(other)``: add another accumulator's images (e.g. from another worker).
  - ``num_images``, ``num_regions``, ``bin_width``, ``nbytes``.
* ``PixelMetrics``: ``pixel_auroc``, ``pixel_f1``, ``pixel_threshold``, ``aupro`` (``None``, with
  a note, when the masks are all normal or all anomalous, as in the exact path), the error bounds
  ``auroc_error_bound``, ``aupro_error_bound``, ``f1_error_bound``, and the curves for plotting
  ``roc_fpr``, ``roc_tpr``, ``roc_thresholds``, ``pro_fpr``, ``pro_overlap``, ``pro_thresholds``
  (at most ``max_curve_points + 2`` points each, all of them points of the exact curve).
* ``evaluate_streaming(image_labels, image_scores, pixels, fpr_limit=0.3) -> ImageMetrics``: the
  image metrics exact (:func:`~visionscale.anomaly.metrics.image_metrics`), the pixel metrics
  from the accumulator; fields and notes mean what :func:`evaluate_scores` gives them.

Definitions are those of :mod:`visionscale.anomaly.metrics`: a pixel is predicted anomalous when
``score >= t``; PRO is the mean over the ground-truth regions (8-connected components of each
mask, :func:`~visionscale.anomaly.metrics.connected_components`) of the fraction of the region
predicted anomalous, against the FPR on normal pixels, integrated to ``fpr_limit`` / ``fpr_limit``.
For PRO each update adds, per region, the histogram of the region's scores weighted by
1 / (region size), and counts the regions: exact up to the binning.

Binning. Scores are not known in advance, so the cells are dyadic and canonical: cell ``k`` at
level ``e`` is ``[k * 2**e, (k + 1) * 2**e)``. The level is the smallest at which every score
seen so far fits in ``bins`` consecutive cells (and at which cell numbers stay below 2**60, which
only binds for near-constant data). When a map reaches outside, the level rises and cells merge
pairwise (``2k, 2k + 1 -> k``): no count is lost, the resolution halves per level, and the
scores' range always spans at least ``bins / 2`` cells. Because the cells depend only on the
level, and the level only on the smallest and largest score, the histograms (integer counts)
after any sequence of updates depend only on the pixels, not on their order or on how images
are merged. With ``value_range=(lo, hi)`` the level is fixed by that range instead, with
``bins - 2`` cells across it, and scores outside fall into one underflow / overflow cell; use it
when a few outliers would otherwise coarsen the cells where normal and anomalous scores meet
(e.g. the calibration's normal range, widened).

Error against the exact path. A cell's lower edge ``k * 2**e`` is exactly representable and
``score >= edge`` holds exactly for the pixels of that cell and above, so every point of the
binned ROC and PRO curves is a point of the exact curve at threshold ``edge``. Between two
neighbouring points the exact curve is monotone, so its area there differs from the trapezoid
by at most half the rectangle ``dx * dy`` (the whole rectangle for the segment cut at
``fpr_limit``). Summed, these are ``auroc_error_bound`` and ``aupro_error_bound``, computed from
the data of each call. ``pixel_f1`` is the exact F1 of ``score >= pixel_threshold`` on these
pixels, at most ``f1_error_bound`` below the exact optimum. When no cell holds two distinct
scores (quantised maps) the results equal the exact path's; the bounds cannot see inside a cell
and stay positive.

Why ``bins = 2**16``: the state is 24 bytes per cell (1.5 MiB), and with the range spanning at
least 2**15 cells the AUROC bound is about ``h/2 * integral(f_normal * f_anomalous)`` for cell
width ``h``: tiny for smooth maps, still under 1e-3 when outliers stretch the range about 50x.
Measured on the data of ``tests/anomaly/test_streaming_metrics.py`` (20 maps of 128 px, smooth
random fields with disc defects, pixel AUROC about 0.82):

* without outliers: |error| 6e-7 (AUROC), 8e-7 (AUPRO), 1.7e-5 (F1); bounds at most 4e-5;
* with outliers up to 300 (the other scores lie in [-4.5, 6]; the cells end 64x wider than
  after the first map): |error| 8e-6, 1.4e-5, 4.3e-4; bounds 6.7e-4, 1.2e-3, 1.7e-3. With
  ``value_range=(-5, 10)`` the outliers go to the overflow cell and the bounds fall to 2e-5,
  4e-5, 2e-5.

Memory: the state (``nbytes``) is three arrays of ``bins`` cells, whatever the number and size
of the maps. An update works through the map in blocks of 2**20 pixels (about 25 MiB of
temporaries); an image with defects also needs its region labels as int32 (4 bytes per pixel,
plus 1 for the mask as bool if it is not bool already): 90 MiB above the map for a 4096 x 4096
map with defects (``benchmarks/pixel_metrics.py``). The map passed in is never copied whole
unless it is not contiguous (or is a torch tensor on another device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from visionscale.anomaly.metrics import (
    NO_MASKS_NOTE,
    ONE_PIXEL_CLASS_NOTE,
    ImageMetrics,
    connected_components,
    image_metrics,
    trapezoid,
)
from visionscale.errors import InvalidValueError, check_finite, check_int

__all__ = ["DEFAULT_BINS", "PixelMetricAccumulator", "PixelMetrics", "evaluate_streaming", "PixelStats"]

DEFAULT_BINS = 2**16
_BLOCK = 1 << 20  # pixels per block inside update(): bounds its temporaries for any map size
_MAX_CELL_BITS = 60  # |cell number| < 2**60: exact in int64 and in the float64 scaling


@dataclass(frozen=True)
class PixelMetrics:
    """What :meth:`PixelMetricAccumulator.result` computed; ``None`` where the data did not allow it.

    The curves are points of the exact curves (see the module docstring), thinned to at most
    ``max_curve_points + 2``; ``*_thresholds[0]`` is ``inf`` (the point (0, 0)) and the others
    are the ``t`` of ``score >= t``, decreasing.
    """

    pixel_auroc: float | None = None
    pixel_f1: float | None = None
    pixel_threshold: float | None = None
    aupro: float | None = None
    fpr_limit: float = 0.3
    auroc_error_bound: float | None = None
    aupro_error_bound: float | None = None
    f1_error_bound: float | None = None
    roc_fpr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    roc_tpr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    roc_thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pro_fpr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pro_overlap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pro_thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    num_images: int = 0
    num_pixels: int = 0
    num_anomalous_pixels: int = 0
    num_regions: int = 0
    bin_width: float | None = None
    cells_used: int = 0
    notes: tuple[str, ...] = ()

    def as_dict(self, curves: bool = False) -> dict:
        """Plain values for JSON; the curve arrays only with ``curves=True`` (as lists)."""
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, np.ndarray):
                if curves:
                    out[k] = v.tolist()
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


class PixelMetricAccumulator:
    """Histograms of pixel scores (normal, anomalous, PRO-weighted) over dyadic cells.

    Args:
        bins: Number of cells (64 to 2**24); the state takes 24 bytes per cell.
        value_range: ``(lo, hi)`` to fix the cells instead of following the data; scores
            outside fall into an underflow / overflow cell.
    """

    def __init__(self, bins: int = DEFAULT_BINS, value_range: tuple[float, float] | None = None):
        self.bins = check_int("bins", bins, minimum=64, maximum=2**24)
        self._neg = np.zeros(self.bins, dtype=np.int64)  # normal pixels per cell
        self._pos = np.zeros(self.bins, dtype=np.int64)  # anomalous pixels per cell
        self._pro = np.zeros(self.bins, dtype=np.float64)  # sum of 1 / region size per cell
        self._level: int | None = None  # cells are [k 2**level, (k + 1) 2**level)
        self._k0 = 0  # cell number held at index 0 of the arrays
        self._kmin: int | None = None  # lowest and highest occupied cell numbers
        self._kmax: int | None = None
        self._clip: tuple[int, int] | None = None  # underflow / overflow cells with value_range
        self._min = math.inf
        self.num_images = 0
        self.num_regions = 0
        self.value_range: tuple[float, float] | None = None
        if value_range is not None:
            lo, hi = (check_finite("value_range", v) for v in value_range)
            if not lo < hi:
                raise InvalidValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range!r}").about(
                    "value_range")
            self.value_range = (lo, hi)
            base, klo, khi = _cells_of(lo, hi)
            level = self._fit_level(base, [(base, klo, khi)], self.bins - 2)
            klo, khi = klo >> (level - base), khi >> (level - base)
            self._level, self._k0 = level, klo - 1
            self._clip = (klo - 1, khi + 1)

    # ------------------------------------------------------------------------------------
    # State.

    @property
    def bin_width(self) -> float | None:
        """Width of a cell, ``2**level`` (``None`` before the first update)."""
        return None if self._level is None else math.ldexp(1.0, self._level)

    @property
    def nbytes(self) -> int:
        """Bytes held by the histograms: fixed at construction."""
        return self._neg.nbytes + self._pos.nbytes + self._pro.nbytes

    def _fit_level(self, start: int, ranges: list[tuple[int, int, int]], cells: int) -> int:
        """Smallest level >= ``start`` at which the cell ranges ``(level, kmin, kmax)`` fit in ``cells``."""
        level = start
        while True:
            lo = min(kmin >> (level - lv) for lv, kmin, _ in ranges)
            hi = max(kmax >> (level - lv) for lv, _, kmax in ranges)
            if hi - lo + 1 <= cells:
                return level
            level += 1

    def _occupied(self) -> list[tuple[int, int, int]]:
        return [] if self._kmin is None else [(self._level, self._kmin, self._kmax)]

    def _relevel(self, level: int, k0: int) -> None:
        """Move to ``level`` (>= the current one) with the window starting at cell ``k0``."""
        if self._kmin is None:
            self._level, self._k0 = level, k0
            return
        shift = level - self._level
        a, b = self._kmin - self._k0, self._kmax - self._k0 + 1
        cells = np.arange(self._kmin, self._kmax + 1, dtype=np.int64) >> shift
        starts = np.flatnonzero(np.r_[True, np.diff(cells) != 0])
        at = cells[starts] - k0
        parts = [np.add.reduceat(h[a:b], starts) for h in (self._neg, self._pos, self._pro)]
        for h, part in zip((self._neg, self._pos, self._pro), parts):
            h[:] = 0
            h[at] = part
        self._level, self._k0 = level, k0
        self._kmin, self._kmax = self._kmin >> shift, self._kmax >> shift

    def _cover(self, lo: float, hi: float) -> tuple[int, int]:
        """Make room for scores in [lo, hi]; return their first and last cell numbers."""
        if self._clip is not None:
            c0, c1 = self._clip
            return (min(max(math.floor(math.ldexp(lo, -self._level)), c0), c1),
                    min(max(math.floor(math.ldexp(hi, -self._level)), c0), c1))
        base, klo, khi = _cells_of(lo, hi)
        if self._level is not None and base <= self._level:
            c0, c1 = klo >> (self._level - base), khi >> (self._level - base)
            if self._k0 <= c0 and c1 < self._k0 + self.bins:
                return c0, c1  # the usual case: the current cells already hold this map
        ranges = [(base, klo, khi)] + self._occupied()
        # Start near the answer: the new scores alone need about span / bins per cell.
        span = math.ldexp(hi, -1) - math.ldexp(lo, -1)
        guess = math.frexp(span / self.bins)[1] - 1 if span > 0 else base
        level = self._fit_level(max(base, guess, self._level if self._level is not None else base), ranges,
                                self.bins)
        k0 = min(kmin >> (level - lv) for lv, kmin, _ in ranges)
        self._relevel(level, k0)
        return klo >> (level - base), khi >> (level - base)

    # ------------------------------------------------------------------------------------
    # Adding data.

    def update(self, anomaly_map, mask=None) -> None:
        """Add one image: its (H, W) scores and its mask (nonzero = anomalous) or ``None``.

        Raises:
            InvalidValueError: The map is empty, not 2-D, holds NaN or infinity, or its mask has
                another shape (the message names the image by its 0-based update order).
        """
        i = self.num_images
        amap = _as_2d(anomaly_map, "anomaly_map", i)
        if amap.size == 0:
            raise InvalidValueError(f"anomaly_map of image {i} is empty (shape {amap.shape})").about("anomaly_map")
        if amap.dtype.kind not in "fiu":
            raise InvalidValueError(f"anomaly_map of image {i} must hold real numbers, got dtype {amap.dtype}").about(
                "anomaly_map")
        lo, hi = float(amap.min()), float(amap.max())  # NaN propagates; +-inf shows up here too
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(amap)))
            raise InvalidValueError(f"anomaly_map of image {i} (0-based, in update order) has {bad} NaN or "
                                    f"infinite values").about("anomaly_map")
        labels = None
        if mask is not None:
            m = _as_2d(mask, "mask", i)
            if m.shape != amap.shape:
                raise InvalidValueError(f"mask of image {i} has shape {m.shape} but its anomaly_map has shape "
                                        f"{amap.shape}").about("mask")
            m = m if m.dtype == bool else m > 0
            if m.any():
                labels, n = connected_components(m)
                del m
                # Region sizes block by block: bincount would otherwise copy all labels to int64.
                lab_flat = labels.reshape(-1)
                sizes = np.zeros(n + 1, dtype=np.int64)
                for s in range(0, lab_flat.size, _BLOCK):
                    sizes += np.bincount(lab_flat[s:s + _BLOCK], minlength=n + 1)
                inv = np.zeros(n + 1)
                inv[1:] = 1.0 / sizes[1:]
        klo, khi = self._cover(lo, hi)
        a, width = klo - self._k0, khi - klo + 1  # this map's cells are a .. a + width - 1
        neg, pos, pro = (h[a:a + width] for h in (self._neg, self._pos, self._pro))
        flat = amap.reshape(-1)
        lab_flat = labels.reshape(-1) if labels is not None else None
        for s in range(0, flat.size, _BLOCK):
            idx = self._cell_index(flat[s:s + _BLOCK], klo)  # (block,) in 0 .. width - 1
            if lab_flat is None:
                neg += np.bincount(idx, minlength=width)
                continue
            lab = lab_flat[s:s + _BLOCK]
            sel = lab > 0
            both = np.bincount(2 * idx + sel, minlength=2 * width).reshape(width, 2)
            neg += both[:, 0]
            pos += both[:, 1]
            pro += np.bincount(idx[sel], weights=inv[lab[sel]], minlength=width)
        if labels is not None:
            self.num_regions += n
        self._kmin = klo if self._kmin is None else min(self._kmin, klo)
        self._kmax = khi if self._kmax is None else max(self._kmax, khi)
        self._min = min(self._min, lo)
        self.num_images += 1

    def _cell_index(self, x: np.ndarray, klo: int) -> np.ndarray:
        """Cell numbers of ``x`` minus ``klo``, as int64 (exact: scaling by 2**-level is exact)."""
        q = np.ldexp(x.astype(np.float64), -self._level)
        np.floor(q, out=q)  # an integer, exact in float64
        if self._clip is not None:  # outliers may be far beyond int64: clip to 2**62 first
            np.clip(q, -(2.0**62), 2.0**62, out=q)
            idx = np.clip(q.astype(np.int64), self._clip[0], self._clip[1])
        else:
            idx = q.astype(np.int64)  # |cell| < 2**61 by the choice of level
        idx -= klo
        return idx

    def merge(self, other: PixelMetricAccumulator) -> None:
        """Add ``other``'s images to this accumulator (same result as updating with them here).

        Raises:
            InvalidValueError: ``bins`` or ``value_range`` differ.
        """
        if other.bins != self.bins or other.value_range != self.value_range:
            raise InvalidValueError(
                f"cannot merge accumulators with different cells: bins {self.bins} vs {other.bins}, value_range "
                f"{self.value_range} vs {other.value_range}").about("bins", "value_range")
        if other._kmin is not None:
            if self._clip is None:
                ranges = self._occupied() + other._occupied()
                start = max(lv for lv, _, _ in ranges)
                level = self._fit_level(start, ranges, self.bins)
                k0 = min(kmin >> (level - lv) for lv, kmin, _ in ranges)
                self._relevel(level, k0)
            shift = self._level - other._level
            cells = np.arange(other._kmin, other._kmax + 1, dtype=np.int64) >> shift
            starts = np.flatnonzero(np.r_[True, np.diff(cells) != 0])
            at = cells[starts] - self._k0
            a, b = other._kmin - other._k0, other._kmax - other._k0 + 1
            for mine, theirs in zip((self._neg, self._pos, self._pro), (other._neg, other._pos, other._pro)):
                mine[at] += np.add.reduceat(theirs[a:b], starts)
            kmin, kmax = other._kmin >> shift, other._kmax >> shift
            self._kmin = kmin if self._kmin is None else min(self._kmin, kmin)
            self._kmax = kmax if self._kmax is None else max(self._kmax, kmax)
            self._min = min(self._min, other._min)
        self.num_images += other.num_images
        self.num_regions += other.num_regions

    # ------------------------------------------------------------------------------------
    # Metrics.

    def result(self, fpr_limit: float = 0.3, max_curve_points: int = 2000) -> PixelMetrics:
        """Pixel AUROC, F1-optimal threshold, AUPRO up to ``fpr_limit``, their error bounds and curves.

        Costs a few passes over the ``bins`` cells (milliseconds); the accumulator is unchanged,
        so it can be called again, e.g. with another ``fpr_limit``.
        """
        fpr_limit = check_finite("fpr_limit", fpr_limit, minimum=0, maximum=1, min_inclusive=False)
        check_int("max_curve_points", max_curve_points, minimum=2)
        base = dict(fpr_limit=fpr_limit, num_images=self.num_images, num_regions=self.num_regions,
                    bin_width=self.bin_width)
        if self._kmin is None:
            return PixelMetrics(**base, notes=(ONE_PIXEL_CLASS_NOTE,))
        sl = slice(self._kmin - self._k0, self._kmax - self._k0 + 1)
        # Highest cell first: cumulative sums are the counts with score >= the cell's lower edge.
        neg, pos, pro = (h[sl][::-1] for h in (self._neg, self._pos, self._pro))
        keep = (neg + pos) > 0
        neg, pos, pro = neg[keep], pos[keep], pro[keep]
        edges = np.ldexp(np.arange(self._kmax, self._kmin - 1, -1, dtype=np.int64)[keep].astype(np.float64),
                         self._level)
        edges[-1] = self._min  # the last point is every pixel (with value_range: the underflow cell)
        fps, tps, cover = np.cumsum(neg), np.cumsum(pos), np.cumsum(pro)
        n_neg, n_pos = int(fps[-1]), int(tps[-1])
        base.update(num_pixels=n_neg + n_pos, num_anomalous_pixels=n_pos, cells_used=int(keep.sum()))
        if n_neg == 0 or n_pos == 0:
            return PixelMetrics(**base, notes=(ONE_PIXEL_CLASS_NOTE,))
        thr = np.r_[np.inf, edges]
        fpr = np.r_[0.0, fps / n_neg]
        tpr = np.r_[0.0, tps / n_pos]
        overlap = np.clip(np.r_[0.0, cover / self.num_regions], 0.0, 1.0)
        auroc = trapezoid(fpr, tpr)
        auroc_bound = 0.5 * float(np.sum(np.diff(fpr) * np.diff(tpr)))
        aupro = trapezoid(fpr, overlap, x_max=fpr_limit) / fpr_limit
        aupro_bound = _area_bound(fpr, overlap, fpr_limit) / fpr_limit
        f1 = 2 * tps / (tps + fps + n_pos)  # 2 TP / (2 TP + FP + FN)
        best = int(np.argmax(f1))  # the first, i.e. highest, threshold on ties
        # Inside a cell TP <= its upper count and FP >= the count above it; F1 rises with TP, falls with FP.
        f1_upper = float(np.max(2 * tps / (tps + np.r_[0, fps[:-1]] + n_pos)))
        roc_i = _thin(fpr, tpr, max_curve_points)
        pro_i = _thin(fpr, overlap, max_curve_points)
        return PixelMetrics(
            **base,
            pixel_auroc=auroc,
            pixel_f1=float(f1[best]),
            pixel_threshold=float(edges[best]),
            aupro=aupro,
            auroc_error_bound=auroc_bound,
            aupro_error_bound=aupro_bound,
            f1_error_bound=max(f1_upper - float(f1[best]), 0.0),
            roc_fpr=fpr[roc_i], roc_tpr=tpr[roc_i], roc_thresholds=thr[roc_i],
            pro_fpr=fpr[pro_i], pro_overlap=overlap[pro_i], pro_thresholds=thr[pro_i],
        )


def evaluate_streaming(
    image_labels: Sequence[int] | np.ndarray,
    image_scores: Sequence[float] | np.ndarray,
    pixels: PixelMetricAccumulator | None,
    fpr_limit: float = 0.3,
) -> ImageMetrics:
    """:func:`~visionscale.anomaly.metrics.evaluate_scores` with the pixel metrics from an accumulator.

    Image AUROC and F1 are exact (image scores are few). ``pixels`` must hold one update per
    image, in any order; ``None`` means no ground-truth masks (pixel metrics skipped, same note).

    Raises:
        InvalidValueError: ``pixels`` holds another number of images than ``image_labels``.
    """
    m = image_metrics(image_labels, image_scores, fpr_limit)
    notes = list(m.notes)
    if pixels is None:
        notes.append(NO_MASKS_NOTE)
    else:
        if pixels.num_images != m.num_images:
            raise InvalidValueError(f"pixels holds {pixels.num_images} images but image_labels has "
                                    f"{m.num_images}; update it once per image").about("pixels")
        r = pixels.result(fpr_limit)
        m.pixel_auroc, m.pixel_f1, m.pixel_threshold, m.aupro = r.pixel_auroc, r.pixel_f1, r.pixel_threshold, r.aupro
        notes.extend(r.notes)
    m.notes = tuple(notes)
    return m


class PixelStats:
    """Extremes of the maps (all, and of normal images) as they come and, with masks, the pixel
    metrics in bounded memory (:class:`PixelMetricAccumulator`:
    binned, within 1e-3 of the exact path; no map is kept)."""

    def __init__(self, with_masks: bool):
        self.with_masks = with_masks
        self.min = self.normal_min = float("inf")
        self.max = self.normal_max = -float("inf")
        self.acc = PixelMetricAccumulator() if with_masks else None
        self._result = None

    def update(self, amap: np.ndarray, normal: bool, mask: np.ndarray | None) -> None:
        lo, hi = float(amap.min()), float(amap.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if normal:
            self.normal_min, self.normal_max = min(self.normal_min, lo), max(self.normal_max, hi)
        if self.acc is not None:
            self.acc.update(amap, mask)
            self._result = None

    def _curves(self):
        if self._result is None:
            self._result = self.acc.result()
        return self._result

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        r = self._curves()
        return r.roc_fpr, r.roc_tpr

    def pro(self) -> tuple[np.ndarray, np.ndarray]:
        r = self._curves()
        return r.pro_fpr, r.pro_overlap

    def metrics(self, labels: np.ndarray, scores: np.ndarray):
        return evaluate_streaming(labels, scores, self.acc)


# ----------------------------------------------------------------------------------------
# Helpers.


def _cells_of(lo: float, hi: float) -> tuple[int, int, int]:
    """The finest allowed level for scores in [lo, hi] and their cell numbers there."""
    level = math.frexp(max(abs(lo), abs(hi)))[1] - _MAX_CELL_BITS  # |x| < 2**frexp exponent
    return level, math.floor(math.ldexp(lo, -level)), math.floor(math.ldexp(hi, -level))


def _as_2d(x, name: str, i: int) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        t = x.detach()
        try:
            x = t.cpu().numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            x = t.float().cpu().numpy()
    a = np.asarray(x)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise InvalidValueError(f"{name} of image {i} must be (H, W), got shape {np.shape(x)}").about(name)
    return a


def _area_bound(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Largest difference between the trapezoid over (x, y) up to ``x_max`` and any monotone curve
    through the same points: half of each segment's rectangle, the whole rectangle up to ``x_max``
    for the segment it cuts."""
    dx, dy = np.diff(x), np.diff(y)
    inside = x[1:] <= x_max
    bound = 0.5 * float(np.sum(dx[inside] * dy[inside]))
    cut = np.flatnonzero((x[:-1] < x_max) & (x[1:] > x_max))
    if cut.size:
        j = int(cut[0])
        bound += (x_max - x[j]) * dy[j]
    return bound


def _thin(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Indices of at most ``n + 2`` points, evenly spaced along the curve's length (|dx| + |dy|)."""
    if x.size <= n + 2:
        return np.arange(x.size)
    length = np.r_[0.0, np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))]
    idx = np.searchsorted(length, np.linspace(0.0, length[-1], n))
    return np.unique(np.r_[0, np.minimum(idx, x.size - 1), x.size - 1])

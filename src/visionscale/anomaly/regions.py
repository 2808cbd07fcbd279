"""Per-image outputs of an anomaly map: defect regions, a binary mask, the raw map, an FPR threshold.

The API:

* :func:`predicted_mask` ``(amap, threshold, image_size) -> (H, W) uint8``: 255 where the map,
  resampled to the image, is ``>= threshold``, else 0.
* :func:`defect_regions` ``(amap, threshold, *, image_size=None, min_area=0, connectivity=8)
  -> list[dict]``: the connected regions of that mask, with boxes, areas and scores.
* :func:`write_region_outputs` ``(stem, amap, threshold, image_size, out_dir, *, mask=True,
  boxes=True, raw=False, min_area=0, connectivity=8) -> dict``: writes ``<stem>_mask.png``,
  ``<stem>_regions.json`` and ``<stem>_map.npy``, each atomically.
* :func:`threshold_at_fpr` ``(normal_scores, target_fpr) -> float``: the smallest threshold whose
  false positive rate on the given normal scores is at most ``target_fpr``;
  :func:`fpr_threshold` returns it with how it was reached (:class:`FprThreshold`).

**Geometry.** ``amap`` has shape ``(h, w)``, usually the model's input size, and covers the
whole image of ``image_size = (H, W)`` (numpy order, like ``amap.shape``). Map pixel ``(i, j)``
covers image columns ``[j * W / w, (j + 1) * W / w)`` and rows ``[i * H / h, (i + 1) * H / h)``.
When the sizes differ the map is resampled bilinearly with half-pixel centres, the rule of
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (which the heatmap
overlays of :mod:`visionscale.anomaly.predict` use), and then thresholded. This gives smoother
masks than repeating each map pixel. Float rounding may differ from torch's in the last bit, so a
pixel whose value equals the threshold to about 1e-7 may come out either way. A map that is
already at the image size is thresholded as it is. A pixel is anomalous when its value is ``>=
threshold``; the comparison is in float64, as in :mod:`visionscale.anomaly.metrics`.

**Regions** are the connected components of exactly that mask, found at the image's
resolution (8-connectivity by default, as in the MVTec AD evaluation), so boxes, areas and
the PNG mask agree pixel for pixel. Each region is a dict:

* ``"box"``: ``[x0, y0, x1, y1]`` in image pixels, **half-open**: the region spans columns
  ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``, so ``mask[y0:y1, x0:x1]`` crops it and
  ``x1 - x0`` is its width;
* ``"box_xywh"``: the same box as COCO writes it, ``[x0, y0, x1 - x0, y1 - y0]``;
* ``"area_px"``: the number of mask pixels in the region (exact, at the image's resolution);
* ``"max_score"``, ``"mean_score"``: the largest and the mean value of the resampled map over
  the region's pixels. A bilinear resampling never exceeds the map's own values, so
  ``max_score`` can be a little below the highest map pixel in the region;
* ``"centroid"``: ``[x, y]``, the mean column and row index of its pixels (a one-pixel region
  at column 3, row 4 has centroid ``[3.0, 4.0]``).

Regions are sorted by ``max_score`` (highest first), then by area (largest first), then by
position (``y0``, ``x0``). Without ``image_size`` everything is in map pixels.

**Memory.** The resampled map is never held at the image's size: it is produced in bands of
about :data:`BAND_PIXELS` pixels, each thresholded and labelled before the next. Regions that
continue across bands are joined by union-find over the labels of the rows where bands meet.
Beyond the map itself, :func:`defect_regions` keeps a few band-sized temporaries and nine
numbers per label of each band (about 15 MiB at its peak for a 20 MP image from a 256 x 256 map,
``benchmarks/bench_regions.py``). :func:`predicted_mask` adds the (H, W) uint8 result: 19 MiB
at 20 MP.

**Files** written by :func:`write_region_outputs`, for a ``stem`` such as ``part_017``:

* ``part_017_mask.png``: 8-bit grayscale, 0 (normal) or 255 (anomalous), ``W x H`` pixels;
* ``part_017_regions.json``::

      {"image_size": {"width": W, "height": H}, "threshold": t, "rule": "score >= threshold",
       "connectivity": 8, "min_area": 0, "interpolation": "bilinear",
       "box_format": "[x0, y0, x1, y1], image pixels, x1 and y1 exclusive",
       "map_size": {"width": w, "height": h}, "map_scale": {"x": W / w, "y": H / h},
       "map_file": "part_017_map.npy" or null, "regions": [...]}

  The JSON gives sizes as named fields, not as a list. A run's ``config.json`` writes
  ``image_size`` as [height, width], while PIL and box coordinates put x first; with names
  there is no order to get wrong. ``map_scale`` is in image pixels per map pixel.
  ``"regions"`` is present only when ``boxes`` is True;
* ``part_017_map.npy`` (with ``raw``): the map exactly as passed (dtype and shape kept), read
  back with ``np.load``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionscale.anomaly.metrics import connected_components
from visionscale.errors import InvalidValueError, check_finite, check_int
from visionscale.io.atomic import write_atomic

__all__ = [
    "BAND_PIXELS",
    "FprThreshold",
    "defect_regions",
    "fpr_threshold",
    "predicted_mask",
    "resample_map",
    "threshold_at_fpr",
    "write_region_outputs",
]

log = logging.getLogger(__name__)

BAND_PIXELS = 1 << 19
"""Image pixels resampled, thresholded and labelled at a time (at least one row): 512 Ki pixels,
2 MiB per float32 temporary."""

BOX_FORMAT = "[x0, y0, x1, y1], image pixels, x1 and y1 exclusive"


# ----------------------------------------------------------------------------------------
# Checking the arguments.


def _check_map(amap) -> np.ndarray:
    a = np.asarray(amap)
    if a.ndim != 2 or a.size == 0:
        raise InvalidValueError(f"amap must be a non-empty 2-D array (h, w), got shape {a.shape}").about("amap")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InvalidValueError(f"amap must hold real numbers, got dtype {a.dtype}").about("amap")
    if not np.isfinite(a).all():
        raise InvalidValueError("amap contains NaN or infinity").about("amap")
    return a


def _check_size(image_size, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    try:
        h, w = (operator.index(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidValueError(
            f"image_size must be (height, width) in pixels, got {image_size!r}").about("image_size") from None
    if h < 1 or w < 1:
        raise InvalidValueError(f"image_size must be positive, got {(h, w)}").about("image_size")
    return h, w


def _check_connectivity(connectivity) -> int:
    if connectivity not in (4, 8) or isinstance(connectivity, bool):
        raise InvalidValueError(f"connectivity must be 4 or 8, got {connectivity!r}").about("connectivity")
    if connectivity == 4 and _scipy_label() is None:
        raise InvalidValueError(
            "connectivity 4 needs scipy (installed with scikit-image); 8 works without it").about("connectivity")
    return int(connectivity)


def _scipy_label():
    try:
        from scipy.ndimage import label
    except ImportError:
        return None
    return label


# ----------------------------------------------------------------------------------------
# Bilinear resampling in bands.


def _source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices and the weight of the second.

    Half-pixel centres as torch's ``align_corners=False``: source ``(d + 0.5) * n_in / n_out - 0.5``,
    clamped at 0 (and the upper neighbour at ``n_in - 1``).
    """
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _bands(a: np.ndarray, size: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, values)``: rows ``y0 : y0 + len(values)`` of the map resampled to ``size``.

    ``values`` is (rows, W) float32, or a view of ``a`` when no resampling is needed.
    """
    (h, w), (H, W) = a.shape, size
    rows = max(1, BAND_PIXELS // W)
    if (h, w) == (H, W):
        for y0 in range(0, H, rows):
            yield y0, a[y0:y0 + rows]
        return
    cols = _source_index(w, W) if w != W else None
    iy0, iy1, wy = _source_index(h, H)
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        need = np.union1d(iy0[y0:y1], iy1[y0:y1])  # the map rows this band reads, at most 2 per row
        src = a[need].astype(np.float32, copy=False)  # (n, w)
        if cols is not None:  # in place: a * (1 - w) + b * w with two temporaries, not four
            ix0, ix1, wx = cols
            left, right = src[:, ix0], src[:, ix1]  # (n, W) copies
            left *= 1 - wx
            right *= wx
            left += right
            src = left
        top = src[np.searchsorted(need, iy0[y0:y1])]  # (y1 - y0, W) copies
        bottom = src[np.searchsorted(need, iy1[y0:y1])]
        wb = wy[y0:y1, None]
        top *= 1 - wb
        bottom *= wb
        top += bottom
        yield y0, top


def resample_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The whole map resampled to ``size`` = (H, W) as float32, by the rule of the module doc
    (torch's bilinear ``align_corners=False``, equal to it up to float rounding)."""
    a = _check_map(amap)
    size = _check_size(size, a.shape)
    out = np.empty(size, dtype=np.float32)
    for y0, rows in _bands(a, size):
        out[y0:y0 + len(rows)] = rows
    return out


# ----------------------------------------------------------------------------------------
# Connected regions, band by band.


class _RegionScan:
    """Label band after band and keep a few statistics per label.

    Labels are numbered globally: band ``k``'s local labels ``1..n`` become ``offset+1..offset+n``.
    Where a band's first row touches the previous band's last row (by the connectivity), the two
    labels are recorded as one region; :meth:`regions` joins them with union-find.
    """

    def __init__(self, width: int, connectivity: int):
        self.width = width
        self.connectivity = connectivity
        self.n = 0
        self.last_row: np.ndarray | None = None  # global labels of the previous band's last row
        self.pairs: list[np.ndarray] = []  # (k, 2) global labels that touch across bands
        # Per label: area, sum of values, sum of x, sum of y, max value, x min/max, y min/max.
        self.stats: list[tuple[np.ndarray, ...]] = []

    def _label(self, mask: np.ndarray) -> tuple[np.ndarray, int]:
        label = _scipy_label()
        if label is None:  # 8-connectivity only; _check_connectivity refuses 4 without scipy
            return connected_components(mask)
        structure = np.ones((3, 3), dtype=bool) if self.connectivity == 8 else None  # None: the cross
        labels, n = label(mask, structure=structure)
        return labels, int(n)

    def add(self, y0: int, values: np.ndarray, mask: np.ndarray) -> None:
        labels, n = self._label(mask)
        if n == 0:
            self.last_row = None
            return
        b, w = mask.shape
        # Statistics per horizontal run of the mask (far fewer runs than pixels), then per label.
        # A zero column on each side of every row keeps runs from wrapping onto the next row.
        edge = np.zeros((b, w + 2), dtype=np.int8)
        edge[:, 1:-1] = mask
        step = np.diff(edge, axis=1)  # (b, w + 1): +1 at a run's first column, -1 one past its last
        r, c = np.nonzero(step)  # row-major: start, end, start, end... in each row
        rows, x0, x1 = r[0::2], c[0::2], c[1::2]
        lab = labels[rows, x0]  # a run lies in one label
        # Sum and max of each run's values: reduceat over [start, end) of a flat copy padded by a
        # column, so that every end is a valid index (odd outputs, the gaps between runs, are unused).
        exact32 = values.dtype == np.float32 or values.dtype.itemsize <= 2  # float32 holds these exactly
        padded = np.zeros((b, w + 1), dtype=np.float32 if exact32 else np.float64)
        padded[:, :w] = values
        bounds = np.empty(2 * rows.size, dtype=np.intp)
        bounds[0::2] = rows * (w + 1) + x0
        bounds[1::2] = rows * (w + 1) + x1
        flat = padded.ravel()
        run_sum = np.add.reduceat(flat, bounds, dtype=np.float64)[0::2]
        run_max = np.maximum.reduceat(flat, bounds)[0::2].astype(np.float64)
        length = x1 - x0
        order = np.argsort(lab, kind="stable")  # group runs by label, top to bottom within each
        lab, rows, x0, x1, length, run_sum, run_max = (
            a[order] for a in (lab, rows, x0, x1, length, run_sum, run_max))
        starts = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]  # labels are 1..n, none empty
        ends = np.r_[starts[1:], lab.size]
        self.stats.append((
            np.add.reduceat(length, starts),
            np.add.reduceat(run_sum, starts),
            np.add.reduceat(length * (x0 + x1 - 1) / 2, starts),  # sum of x over each run
            np.add.reduceat(length * (rows + y0).astype(np.float64), starts),
            np.maximum.reduceat(run_max, starts),
            np.minimum.reduceat(x0, starts),
            np.maximum.reduceat(x1 - 1, starts),
            rows[starts] + y0,  # runs of a label are sorted by row: the first is on its top row
            rows[ends - 1] + y0,
        ))
        first = np.where(labels[0] > 0, labels[0].astype(np.int64) + self.n, 0)
        if self.last_row is not None:
            self._touch(self.last_row, first)
        self.last_row = np.where(labels[-1] > 0, labels[-1].astype(np.int64) + self.n, 0)
        self.n += n

    def _touch(self, above: np.ndarray, below: np.ndarray) -> None:
        shifts = (-1, 0, 1) if self.connectivity == 8 else (0,)
        w = above.size
        for dx in shifts:  # pixel (x) above touches pixel (x + dx) below
            a = above[max(0, -dx): w - max(0, dx)]
            b = below[max(0, dx): w - max(0, -dx)]
            both = (a > 0) & (b > 0)
            if both.any():
                keys = np.unique((a[both] << 32) | b[both])  # one int64 per pair; labels < 2**31
                self.pairs.append(np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1))

    def regions(self, min_area: int) -> list[dict]:
        if self.n == 0:
            return []
        area, s_v, s_x, s_y, v_max, x_min, x_max, y_min, y_max = (np.concatenate(c) for c in zip(*self.stats))
        parent = np.arange(self.n + 1)

        def find(i: int) -> int:
            root = i
            while parent[root] != root:
                root = parent[root]
            while parent[i] != root:
                parent[i], i = root, parent[i]
            return root

        for pairs in self.pairs:
            for a, b in pairs.tolist():
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
        while True:  # every label straight to its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        roots, group = np.unique(parent[1:], return_inverse=True)
        k = roots.size

        def total(x):
            return np.bincount(group, weights=x, minlength=k)

        def extreme(ufunc, x, start):
            out = np.full(k, start, dtype=x.dtype)
            ufunc.at(out, group, x)
            return out

        g_area = np.bincount(group, weights=area, minlength=k).astype(np.int64)
        g_sv, g_sx, g_sy = total(s_v), total(s_x), total(s_y)
        g_max = extreme(np.maximum, v_max, -np.inf)
        g_x0 = extreme(np.minimum, x_min, np.iinfo(np.int64).max)
        g_x1 = extreme(np.maximum, x_max, -1)
        g_y0 = extreme(np.minimum, y_min, np.iinfo(np.int64).max)
        g_y1 = extreme(np.maximum, y_max, -1)
        out = []
        for i in np.flatnonzero(g_area >= min_area).tolist():
            x0, y0, x1, y1 = int(g_x0[i]), int(g_y0[i]), int(g_x1[i]) + 1, int(g_y1[i]) + 1
            n = int(g_area[i])
            out.append({
                "box": [x0, y0, x1, y1],
                "box_xywh": [x0, y0, x1 - x0, y1 - y0],
                "area_px": n,
                "max_score": float(g_max[i]),
                "mean_score": float(g_sv[i] / n),
                "centroid": [float(g_sx[i] / n), float(g_sy[i] / n)],
            })
        out.sort(key=lambda r: (-r["max_score"], -r["area_px"], r["box"][1], r["box"][0]))
        return out


def _scan(a: np.ndarray, threshold: float, size: tuple[int, int], *, mask: bool, scan: _RegionScan | None
          ) -> np.ndarray | None:
    """One pass over the bands: fill the uint8 mask (if asked) and feed ``scan`` (if given)."""
    t = np.float64(threshold)  # a float64 scalar, so a float32 band is compared in float64
    out = np.zeros(size, dtype=np.uint8) if mask else None
    for y0, values in _bands(a, size):
        hit = values >= t
        if out is not None:
            out[y0:y0 + hit.shape[0]] = hit  # True -> 1, scaled to 255 below
        if scan is not None:
            scan.add(y0, values, hit)
    if out is not None:
        out *= 255
    return out


# ----------------------------------------------------------------------------------------
# The public functions.


def predicted_mask(amap: np.ndarray, threshold: float, image_size: tuple[int, int]) -> np.ndarray:
    """The binary mask ``resampled map >= threshold`` at the image's size.

    Args:
        amap: (h, w) anomaly map covering the whole image.
        threshold: Pixel threshold; a pixel is anomalous when its value is ``>= threshold``.
        image_size: (H, W) of the original image.

    Returns:
        (H, W) uint8, 255 = anomalous, 0 = normal. The map is resampled bilinearly (half-pixel
        centres) in bands when its size differs (see the module docstring).

    Raises:
        InvalidValueError: ``amap`` not 2-D, empty or not finite; ``threshold`` not finite;
            ``image_size`` not two positive integers.
    """
    a = _check_map(amap)
    t = check_finite("threshold", threshold)
    size = _check_size(image_size, a.shape)
    return _scan(a, t, size, mask=True, scan=None)


def defect_regions(
    amap: np.ndarray,
    threshold: float,
    *,
    image_size: tuple[int, int] | None = None,
    min_area: int = 0,
    connectivity: int = 8,
) -> list[dict]:
    """Connected regions of :func:`predicted_mask`, with boxes in image pixels, areas and scores.

    Args:
        amap: (h, w) anomaly map covering the whole image.
        threshold: Pixel threshold (``>=`` is anomalous).
        image_size: (H, W) of the original image; None: the map's own size (map pixels).
        min_area: Regions with fewer pixels than this (image pixels) are dropped.
        connectivity: 8 (diagonal neighbours join, the MVTec AD convention) or 4.

    Returns:
        One dict per region (``box``, ``box_xywh``, ``area_px``, ``max_score``, ``mean_score``,
        ``centroid``; formats in the module docstring), highest ``max_score`` first.

    Raises:
        InvalidValueError: As :func:`predicted_mask`; ``min_area`` not an integer >= 0;
            ``connectivity`` not 4 or 8.
    """
    a = _check_map(amap)
    t = check_finite("threshold", threshold)
    size = _check_size(image_size, a.shape)
    check_int("min_area", min_area, minimum=0)
    scan = _RegionScan(size[1], _check_connectivity(connectivity))
    _scan(a, t, size, mask=False, scan=scan)
    return scan.regions(min_area)


def _check_stem(stem) -> str:
    if not isinstance(stem, str) or stem in ("", ".", "..") or "/" in stem or os.sep in stem or "\0" in stem:
        raise InvalidValueError(f"stem must be a plain file name without folders, got {stem!r}").about("stem")
    return stem


def write_region_outputs(
    stem: str,
    amap: np.ndarray,
    threshold: float,
    image_size: tuple[int, int],
    out_dir: str | os.PathLike,
    *,
    mask: bool = True,
    boxes: bool = True,
    raw: bool = False,
    min_area: int = 0,
    connectivity: int = 8,
) -> dict[str, Path | list]:
    """Write an image's mask PNG, regions JSON and (with ``raw``) the map as ``.npy``.

    One pass over the map produces both the mask and the regions. Each file is written
    atomically (``visionscale.io.atomic.write_atomic``): a failure leaves no partial or
    temporary file. ``out_dir`` is created if missing.

    Args:
        stem: File name prefix, e.g. the image's stem (no folders).
        amap, threshold, image_size, min_area, connectivity: As :func:`defect_regions`;
            ``image_size`` is required here.
        out_dir: Folder to write into.
        mask: Write ``<stem>_mask.png`` (8-bit, 0/255, ``W x H``).
        boxes: Compute the regions and put them in ``<stem>_regions.json``.
        raw: Write ``<stem>_map.npy``. The JSON is written when ``boxes`` or ``raw`` is set; it
            records the map's size and scale.

    Returns:
        ``{"mask": Path, "json": Path, "map": Path, "regions": list}``, with only the keys of
        what was written or computed (``"regions"`` when ``boxes``).

    Raises:
        InvalidValueError: As :func:`defect_regions`; ``stem`` holds a folder or is empty.
        OSError: The folder or a file cannot be written.
    """
    stem = _check_stem(stem)
    a = _check_map(amap)
    t = check_finite("threshold", threshold)
    if image_size is None:
        raise InvalidValueError("image_size is required to write outputs").about("image_size")
    size = _check_size(image_size, a.shape)
    check_int("min_area", min_area, minimum=0)
    scan = _RegionScan(size[1], _check_connectivity(connectivity)) if boxes else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path | list] = {}
    if mask or scan is not None:
        png = _scan(a, t, size, mask=mask, scan=scan)
        if png is not None:
            result["mask"] = _write_png(png, out / f"{stem}_mask.png")
            del png
    if raw:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        write_atomic(out / f"{stem}_map.npy", buf.getvalue())
        result["map"] = out / f"{stem}_map.npy"
    if boxes or raw:
        (H, W), (h, w) = size, a.shape
        doc = {
            "image_size": {"width": W, "height": H},
            "threshold": t,
            "rule": "score >= threshold",
            "connectivity": connectivity,
            "min_area": min_area,
            "interpolation": "bilinear" if (h, w) != (H, W) else "none",
            "box_format": BOX_FORMAT,
            "map_size": {"width": w, "height": h},
            "map_scale": {"x": W / w, "y": H / h},
            "map_file": f"{stem}_map.npy" if raw else None,
        }
        if scan is not None:
            result["regions"] = doc["regions"] = scan.regions(min_area)
        path = out / f"{stem}_regions.json"
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
        result["json"] = path
    return result


def _write_png(mask: np.ndarray, path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------
# Threshold at a target false positive rate.


@dataclass(frozen=True)
class FprThreshold:
    """A threshold chosen for a false positive rate on normal scores, and how it was reached.

    Attributes:
        threshold: The smallest threshold ``t`` with (normal scores ``>= t``) / n ``<= target_fpr``.
        target_fpr: The rate asked for.
        achieved_fpr: The fraction of the normal scores ``>= threshold`` (``<= target_fpr``;
            lower when ties or too few scores forbid hitting it).
        num_scores: How many normal scores were used (n).
        resolved: False when ``n * target_fpr < 1``: no normal score may be flagged, so the
            threshold sits just above the highest one and ``achieved_fpr`` is 0; the rate on
            new normal images is then not measured, only bounded by the data's resolution 1 / n.
    """

    threshold: float
    target_fpr: float
    achieved_fpr: float
    num_scores: int
    resolved: bool


def fpr_threshold(normal_scores: Sequence[float] | np.ndarray, target_fpr: float) -> FprThreshold:
    """The threshold of :func:`threshold_at_fpr`, with the rate achieved and the number of scores.

    With ``k`` the largest integer such that ``k / n <= target_fpr`` and ``s`` the ``(k + 1)``-th
    highest score, every ``t > s`` flags at most ``k`` normal scores and every ``t <= s`` flags
    more. The smallest such threshold is therefore the next floating-point number above ``s``
    (``np.nextafter``). The step is taken in float32 when the scores are a float32 array, so
    comparing float32 scores or maps with the threshold keeps it above ``s``; otherwise it is
    taken in float64.

    When ``n * target_fpr < 1`` (e.g. 10 scores and a rate of 0.01), ``k`` is 0 and the threshold
    is just above the highest normal score. ``resolved`` is then False and a warning is logged.

    Raises:
        InvalidValueError: ``target_fpr`` not in (0, 1); ``normal_scores`` empty, non-numeric
            or holding NaN or infinity.
    """
    fpr = check_finite("target_fpr", target_fpr, minimum=0.0, maximum=1.0, min_inclusive=False,
                       max_inclusive=False)
    try:
        s = np.asarray(normal_scores)
        if s.dtype != np.float32:
            s = s.astype(np.float64)
    except (TypeError, ValueError):
        raise InvalidValueError("normal_scores must be numbers").about("normal_scores") from None
    s = s.ravel()
    n = s.size
    if n == 0:
        raise InvalidValueError("normal_scores is empty: a threshold at an FPR needs normal scores"
                                ).about("normal_scores")
    if not np.isfinite(s).all():
        raise InvalidValueError("normal_scores contains NaN or infinity").about("normal_scores")
    k = min(n - 1, math.floor(fpr * n))  # fpr < 1, so k <= n - 1
    while k + 1 <= n - 1 and (k + 1) / n <= fpr:  # floor of a rounded product may be one off
        k += 1
    while k > 0 and k / n > fpr:
        k -= 1
    s_k1 = np.partition(s, n - 1 - k)[n - 1 - k]  # (k + 1)-th highest
    t = np.nextafter(s_k1, s.dtype.type(np.inf))
    achieved = int(np.count_nonzero(s >= t)) / n
    if k == 0:
        log.warning("%d normal scores cannot resolve an FPR of %g (the smallest nonzero rate they measure is "
                    "1/%d = %.3g); the threshold is set just above the highest normal score", n, fpr, n, 1 / n)
    return FprThreshold(float(t), fpr, achieved, n, k > 0)


def choose_image_threshold(calibration: dict, threshold: float | None = None, target_fpr: float | None = None,
                           no_normal_scores: Exception | None = None) -> float:
    """The image threshold: ``threshold`` if given, else one set at ``target_fpr`` on the
    calibration's normal scores, else the calibration's saved ``image_threshold``.

    ``no_normal_scores`` is raised when ``target_fpr`` is asked for and the calibration has no
    normal scores (runs fitted by older versions); the caller says what to do about it."""
    if threshold is not None and target_fpr is not None:
        raise InvalidValueError("threshold and target_fpr exclude each other").about("threshold", "target_fpr")
    if threshold is not None:
        return check_finite("threshold", threshold)
    if target_fpr is not None:
        normal = calibration.get("normal_scores")
        if not normal:
            raise no_normal_scores or InvalidValueError("the calibration has no normal scores").about("target_fpr")
        return threshold_at_fpr(normal, target_fpr)
    return float(calibration["image_threshold"])


def threshold_at_fpr(normal_scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """The smallest threshold ``t`` such that at most ``target_fpr`` of the normal scores are ``>= t``.

    The rule is ``score >= t`` means anomalous. For example, ten scores ``1..10`` and
    ``target_fpr=0.2`` give the float just above 8, which flags 9 and 10 (2/10). With too few
    scores to resolve the rate (``n * target_fpr < 1``), the threshold is just above the highest
    normal score. :func:`fpr_threshold` says whether that happened and how many scores were used.

    Raises:
        InvalidValueError: As :func:`fpr_threshold`.
    """
    return fpr_threshold(normal_scores, target_fpr).threshold

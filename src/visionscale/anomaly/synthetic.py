"""Demo data: MVTec-layout categories from scikit-image's textures with synthetic defects.

Good parts are cut from the 512x512 textures scikit-image ships with its package
(``skimage.data.brick()``, ``grass()``, ``gravel()``; no download), tinted per category:

* up to 512 px (``size`` <= 512): a random 256 px crop, randomly mirrored, resized to
  ``size`` (bilinear), as in every earlier version: the same arguments give the same files;
* above 512 px (up to 8192): the texture is mirrored into a seamless 1024 px tile and a
  random ``size / 2`` px window of its periodic extension (randomly mirrored) is enlarged 2x,
  the scale of a 512 px part. A larger part shows a larger field of the texture, not a
  blurrier one (an 8x enlargement of a 256 px crop would have no detail left at 2048 px).

Defective parts are further parts with one defect painted in:

* ``scratch``: a thin curved line, darker or lighter than the surface;
* ``stain``: a rotated elliptical blot blended towards a brown;
* ``hole``: a dark disc with a lighter rim shading;
* ``color``: a patch whose colour is shifted by +-60 in one channel.

By default a defect covers about 0.4-5 % of the part (its size scales with the part). With
``small_defects`` each covers :data:`SMALL_DEFECT_AREA` = 0.05-0.2 % of the image area,
anywhere in its central 80 %: at 2048 px about 2,100-8,400 px (blobs 50-100 px across,
scratches 6-13 px wide), at 256 px 33-131 px; the kind of defect that shrinking a high-
resolution image to the model size loses.

The mask is exactly the set of pixels a defect changed (every painted pixel differs from
the good part by construction), saved as ``ground_truth/<defect>/<id>_mask.png`` (0/255).
Everything is drawn from ``numpy.random.default_rng([seed, category index])``, so the
same arguments give byte-identical PNGs. Parts above 512 px are written with a fast PNG
encoder (the "Up" filter, zlib level 1: 2,048 px in about 0.3 s on one core, against about
1 s for Pillow's), so a demo at 2048 px takes seconds per category.

API: ``make_demo(out, *, seed=0, size=256, categories=..., num_train=40, num_test_good=10,
num_test_defect=5, defects=DEFECTS, small_defects=False, overwrite=False) -> list[Path]``
and ``make_category(folder, texture, ...)`` for one category.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from visionscale.errors import InvalidValueError, OutputExistsError, check_int
from visionscale.io.atomic import publish, write_atomic
from visionscale.io.prefetch import ordered_map


class DemoExistsError(OutputExistsError, FileExistsError):
    """A demo category folder exists already (and may not be replaced)."""


__all__ = ["TEXTURES", "DEFECTS", "MAX_SIZE", "SMALL_DEFECT_AREA", "DemoExistsError", "make_demo", "make_category"]

# Category -> (scikit-image function, RGB tint applied to the grey texture).
TEXTURES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.0, 0.62, 0.5)),
    "grass": ("grass", (0.55, 0.95, 0.45)),
    "gravel": ("gravel", (0.95, 0.9, 0.8)),
}
DEFECTS = ("scratch", "stain", "hole", "color")
_CROP = 256  # px of the 512 px texture per part up to _LEGACY_MAX (then resized to ``size``)
_LEGACY_MAX = 512  # parts up to this size are made as in every earlier version (same files)
MAX_SIZE = 8192  # largest part: 192 MiB of RGB per image in memory, ~100 MB per PNG
# Share of the image area one defect covers with small_defects (0.05 % to 0.2 %).
SMALL_DEFECT_AREA = (0.0005, 0.002)


def _texture(name: str) -> np.ndarray:
    import skimage.data

    fn, tint = TEXTURES[name]
    grey = getattr(skimage.data, fn)().astype(np.float64)  # (512, 512) uint8 -> float
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    rgb = grey[..., None] * np.asarray(tint)[None, None, :]
    return np.clip(rgb, 0, 255)  # (512, 512, 3) float


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == size and img.shape[1] == size:
        return img
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float64)


def _good(tex: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = tex.shape[:2]
    y = int(rng.integers(0, h - _CROP + 1))
    x = int(rng.integers(0, w - _CROP + 1))
    crop = tex[y : y + _CROP, x : x + _CROP]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.rint(_resize(crop, size)).clip(0, 255)  # integer-valued float (size, size, 3)


def _mirror_tile(tex: np.ndarray) -> np.ndarray:
    """(2048, 2048, 3) uint8: the texture and its mirror images (seamless when repeated),
    enlarged 2x, the scale of a 512 px part. Made once per category; parts are windows of it."""
    from PIL import Image

    t = np.clip(np.rint(tex), 0, 255).astype(np.uint8)
    top = np.concatenate([t, t[:, ::-1]], axis=1)
    tile = np.concatenate([top, top[::-1]], axis=0)  # (1024, 1024, 3), period 1024
    # Enlarge with 4 px of wrap-around on each side, so the bilinear filter sees the periodic
    # neighbours at the borders and the enlarged tile is seamless too.
    pad = 4
    wrapped = np.pad(tile, ((pad, pad), (pad, pad), (0, 0)), mode="wrap")
    big = np.asarray(Image.fromarray(wrapped).resize((2 * wrapped.shape[1], 2 * wrapped.shape[0]), Image.BILINEAR))
    return np.ascontiguousarray(big[2 * pad: -2 * pad, 2 * pad: -2 * pad])


def _good_large(tile: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A part above _LEGACY_MAX: a random size x size window of the periodic enlarged tile; uint8."""
    period = tile.shape[0]
    y, x = (int(v) for v in rng.integers(0, period, size=2))
    part = np.take(np.take(tile, (y + np.arange(size)) % period, axis=0), (x + np.arange(size)) % period, axis=1)
    if rng.random() < 0.5:
        part = np.ascontiguousarray(part[:, ::-1])
    return part


# A defect: unique pixel coordinates (row-major) and their new colours, (k,), (k,), (k, 3) float.
# Only the defect's pixels are ever converted to float, so an 8192 px part costs its uint8
# pixels, not a float copy of them.
Defect = tuple[np.ndarray, np.ndarray, np.ndarray]


def _unique(rr: np.ndarray, cc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    flat = np.unique(rr.astype(np.int64) * n + cc)
    return flat // n, flat % n


def _ellipse_axes(rng: np.random.Generator, area: tuple[float, float], n: int) -> tuple[float, float]:
    """Semi-axes of an ellipse covering a random share in ``area`` of an n x n image."""
    pixels = rng.uniform(*area) * n * n
    ratio = rng.uniform(0.5, 1.0)
    a = np.sqrt(pixels / (np.pi * ratio))
    return max(a, 1.0), max(a * ratio, 1.0)


def _scratch(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] | None = None) -> Defect:
    from skimage.draw import disk

    n = img.shape[0]
    if area is None:
        p0, p2 = rng.uniform(0.15 * n, 0.85 * n, size=(2, 2))
        length = np.linalg.norm(p2 - p0)
        if length < 0.3 * n:  # keep scratches long enough to see
            p2 = p0 + (p2 - p0) / max(length, 1e-6) * 0.3 * n
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.08 * n, size=2)  # quadratic Bezier control point
        radius = max(0.6, n / 128 * rng.uniform(0.8, 1.6))
    else:
        pixels = rng.uniform(*area) * n * n
        radius = max(1.0, n / 512 * rng.uniform(0.8, 1.6))
        # A stroke of length L and radius r covers about 2 r L + pi r^2 pixels.
        length = float(np.clip((pixels - np.pi * radius**2) / (2 * radius), 2 * radius, 0.6 * n))
        angle = rng.uniform(0, 2 * np.pi)
        centre = rng.uniform(0.1 * n + length / 2, 0.9 * n - length / 2, size=2)
        half = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
        p0, p2 = centre - half, centre + half
        p1 = centre + rng.normal(0, 0.08 * length, size=2)
    if n <= _LEGACY_MAX:
        steps = int(3 * n)
    else:  # disks at most a quarter radius apart along the curve (its length <= the control polygon's)
        polygon = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
        steps = int(np.ceil(4 * polygon / radius)) + 2
    mask = np.zeros(img.shape[:2], dtype=bool)
    for t in np.linspace(0, 1, steps):
        p = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        rr, cc = disk((p[0], p[1]), radius, shape=mask.shape)
        mask[rr, cc] = True
    dark = rng.random() < 0.5
    target = np.full(3, 20.0) if dark else np.full(3, 235.0)
    rr, cc = np.nonzero(mask)
    return _paint(img, rr, cc, target, 0.75)


def _ellipse_pixels(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] | None,
                    axes: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a random rotated ellipse: semi-axes in ``axes`` x the side, or of an ``area``
    share of the image (small defects, placed anywhere but the outer tenth)."""
    from skimage.draw import ellipse

    n = img.shape[0]
    if area is None:
        r, c = rng.uniform(0.25 * n, 0.75 * n, size=2)
        a, b = rng.uniform(axes[0] * n, axes[1] * n, size=2)
    else:
        r, c = rng.uniform(0.1 * n, 0.9 * n, size=2)
        a, b = _ellipse_axes(rng, area, n)
    rr, cc = ellipse(r, c, a, b, shape=img.shape[:2], rotation=rng.uniform(0, np.pi))
    return _unique(rr, cc, n)


def _stain(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] | None = None) -> Defect:
    rr, cc = _ellipse_pixels(img, rng, area, (0.05, 0.13))
    return _paint(img, rr, cc, np.array([90.0, 55.0, 25.0]), rng.uniform(0.55, 0.75))


def _hole(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] | None = None) -> Defect:
    from skimage.draw import disk

    n = img.shape[0]
    if area is None:
        r, c = rng.uniform(0.25 * n, 0.75 * n, size=2)
        radius = rng.uniform(0.04 * n, 0.09 * n)
    else:
        r, c = rng.uniform(0.1 * n, 0.9 * n, size=2)
        radius = max(1.0, np.sqrt(rng.uniform(*area) * n * n / np.pi))
    rr, cc = disk((r, c), radius, shape=img.shape[:2])
    rr, cc = _unique(rr, cc, n)
    before = img[rr, cc].astype(np.float64)
    dist = np.hypot(rr - r, cc - c) / radius  # 0 centre .. 1 rim
    shade = (8 + 40 * dist**4)[:, None]  # dark inside, a little lighter at the rim
    after = np.rint(np.broadcast_to(shade, (rr.size, 3)))
    return rr, cc, _ensure_changed(before, after)


def _color(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] | None = None) -> Defect:
    rr, cc = _ellipse_pixels(img, rng, area, (0.07, 0.15))
    before = img[rr, cc].astype(np.float64)
    after = before.copy()
    ch = int(rng.integers(0, 3))
    v = after[:, ch]
    after[:, ch] = np.where(v < 128, v + 60, v - 60)  # always moves by 60, never clips
    return rr, cc, _ensure_changed(before, after)


def _paint(img: np.ndarray, rr: np.ndarray, cc: np.ndarray, target: np.ndarray, alpha: float) -> Defect:
    before = img[rr, cc].astype(np.float64)
    after = np.rint((1 - alpha) * before + alpha * target)
    return rr, cc, _ensure_changed(before, after)


def _ensure_changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    # "Exact masks": a painted pixel that happens to keep its colour is nudged by 1-2 levels
    # so that mask == (pixels that differ from the good part) holds for every defect.
    same = np.abs(after - before).max(axis=1) < 1
    if same.any():
        after[same] = np.where(before[same] < 128, before[same] + 2, before[same] - 2)
    return after


def _apply(good: np.ndarray, defect: Defect) -> tuple[np.ndarray, np.ndarray]:
    """The defective part (a copy of ``good``, same dtype) and its (H, W) bool mask."""
    rr, cc, values = defect
    bad = good.copy()
    bad[rr, cc] = values  # integers in [0, 255]: exact in uint8 and float64 alike
    mask = np.zeros(good.shape[:2], dtype=bool)
    mask[rr, cc] = True
    return bad, mask


# Each draws one defect on an (n, n, 3) part: area None for the default sizes, (lo, hi) for a
# share of the image area (small_defects).
_DEFECTS: dict[str, Callable[..., Defect]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "color": _color,
}


def _painter(name: str) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def paint(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] | None = None) -> np.ndarray:
        return _apply(img, _DEFECTS[name](img, rng, area))[0]

    return paint


# name -> (part, rng[, area]) -> the defective part: the whole-image form of _DEFECTS.
_PAINTERS: dict[str, Callable[..., np.ndarray]] = {name: _painter(name) for name in _DEFECTS}


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _png_fast(array: np.ndarray) -> bytes:
    """8-bit gray or RGB PNG with every row "Up"-filtered, deflated at level 1 (run-length strategy).

    Pillow tries all five filters on every row; for these textures one fixed filter gives
    files no larger than Pillow's at level 1 in about a third of the time (a 2048 px brick
    part on the 2-core Xeon of docs/benchmarks.md: 0.27 s and 2.6 MB, against 0.91 s and
    2.7 MB). Any PNG reader decodes it (the filter is per row, in the standard).
    """
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    rows = np.ascontiguousarray(array, dtype=np.uint8).reshape(h, w * channels)
    raw = np.empty((h, w * channels + 1), dtype=np.uint8)  # one filter byte, then the row
    raw[:, 0] = 2  # Up: each byte minus the one above it (mod 256); the first row has a zero row above
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour_type = {1: 0, 3: 2}[channels]
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)  # RLE: a little faster and smaller here
    data = deflate.compress(raw) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def make_category(
    folder: str | os.PathLike,
    texture: str,
    *,
    seed: int = 0,
    size: int = 256,
    num_train: int = 40,
    num_test_good: int = 10,
    num_test_defect: int = 5,
    defects: Sequence[str] = DEFECTS,
    small_defects: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write one MVTec-layout category to ``folder`` (which must not exist yet).

    ``size`` up to :data:`MAX_SIZE`; ``small_defects``: each defect covers
    :data:`SMALL_DEFECT_AREA` of the image (see the module docstring); ``progress(n)`` is
    called after each file with the number of files written so far.

    Returns:
        Counts per split, for the manifest.
    """
    if texture not in TEXTURES:
        raise InvalidValueError(f"unknown texture {texture!r}; choose from {', '.join(TEXTURES)}")
    unknown = [d for d in defects if d not in _DEFECTS]
    if unknown:
        raise InvalidValueError(f"unknown defect types {unknown}; choose from {', '.join(DEFECTS)}")
    if size < 32:
        raise InvalidValueError(f"size must be >= 32 px (smaller parts cannot show a defect), got {size}")
    check_int("size", size, maximum=MAX_SIZE)
    if num_train < 1:
        raise InvalidValueError(f"need at least one training image, got {num_train}")
    idx = list(TEXTURES).index(texture)
    rng = np.random.default_rng([seed, idx])
    tex = _texture(texture)
    root = Path(folder)
    area = SMALL_DEFECT_AREA if small_defects else None
    if size <= _LEGACY_MAX:
        def good() -> np.ndarray:  # integer-valued float64, as it always was
            return _good(tex, rng, size)
        encode = _png
    else:
        tile = _mirror_tile(tex)

        def good() -> np.ndarray:  # uint8
            return _good_large(tile, rng, size)
        encode = _png_fast

    def parts():  # (relative path, array), drawn in order from the one rng: the same files whatever writes them
        for i in range(num_train):
            yield f"train/good/{i:03d}.png", good()
        for i in range(num_test_good):
            yield f"test/good/{i:03d}.png", good()
        for d in defects:
            for i in range(num_test_defect):
                part = good()
                bad, mask = _apply(part, _DEFECTS[d](part, rng, area))  # mask: exactly the changed pixels
                del part
                yield f"test/{d}/{i:03d}.png", bad
                del bad
                yield f"ground_truth/{d}/{i:03d}_mask.png", mask.view(np.uint8) * np.uint8(255)

    def write(item: tuple[str, np.ndarray]) -> None:
        rel, array = item
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode(array.astype(np.uint8, copy=False)))

    # Large parts are encoded in threads (zlib releases the GIL) while the next one is drawn;
    # at most workers + 1 parts exist at once, and fewer workers for larger parts (~1 GB).
    workers = 0 if size <= _LEGACY_MAX else max(1, min(4, os.cpu_count() or 1, int(1e9 // (9 * size * size))))
    for n, _ in enumerate(ordered_map(write, parts(), workers, lookahead=workers + 1), start=1):
        if progress is not None:
            progress(n)
    return {"train": num_train, "test_good": num_test_good, "test_defect": num_test_defect * len(defects)}


def make_demo(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    size: int = 256,
    categories: Sequence[str] = tuple(TEXTURES),
    num_train: int = 40,
    num_test_good: int = 10,
    num_test_defect: int = 5,
    defects: Sequence[str] = DEFECTS,
    small_defects: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Build demo categories under ``out`` (MVTec layout) and a ``demo.json`` manifest.

    ``size``: side of the square parts, 32 to :data:`MAX_SIZE` (8192) px. ``small_defects``:
    each defect covers 0.05-0.2 % of the image (:data:`SMALL_DEFECT_AREA`) instead of a
    few percent. How parts and defects are made: the module docstring. ``progress(done,
    total)`` is called after each file written (images and masks, all categories).

    Each category is written to a temporary folder inside ``out`` and renamed into place
    when complete, so an interrupted run never leaves a half-written category.

    Raises:
        FileExistsError: A category folder exists and ``overwrite`` is False.
        ValueError: Unknown category or defect, size outside 32..8192, no training images.
    """
    out = Path(out).expanduser()
    # Bounds before any work: a negative count used to write a demo silently, a huge size to
    # run for minutes and fill the disk (an 8192 px part is ~100 MB of PNG).
    check_int("size", size, minimum=32, maximum=MAX_SIZE)
    check_int("num_train", num_train, minimum=1)
    check_int("num_test_good", num_test_good, minimum=0)
    check_int("num_test_defect", num_test_defect, minimum=0)
    cats = list(dict.fromkeys(categories))
    if not cats:
        raise InvalidValueError("no categories given")
    unknown = [c for c in cats if c not in TEXTURES]
    if unknown:
        raise InvalidValueError(f"unknown categories {unknown}; choose from {', '.join(TEXTURES)}")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if not overwrite:
        existing = [str(out / c) for c in cats if (out / c).exists()]
        if existing:
            raise DemoExistsError(f"{', '.join(existing)} already exist(s); overwrite is not set")
    out.mkdir(parents=True, exist_ok=True)
    written, counts = [], {}
    per_category = num_train + num_test_good + 2 * num_test_defect * len(defects)  # defects come with masks
    total = per_category * len(cats)
    for k, cat in enumerate(cats):
        done_before = k * per_category

        def tick(n: int, done_before: int = done_before) -> None:
            if progress is not None:
                progress(done_before + n, total)

        tmp = Path(tempfile.mkdtemp(prefix=f".{cat}-", dir=out))
        try:
            counts[cat] = make_category(tmp, cat, seed=seed, size=size, num_train=num_train,
                                        num_test_good=num_test_good, num_test_defect=num_test_defect,
                                        defects=defects, small_defects=small_defects, progress=tick)
            final = out / cat
            if final.exists():
                shutil.rmtree(final)
            publish(tmp)  # mkdtemp makes it private; the data set is not
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written.append(final)
    manifest = {
        "generator": "visionscale.anomaly.synthetic.make_demo",
        "seed": seed, "size": size, "defects": list(defects), "small_defects": small_defects,
        "categories": counts,
        "source": ("scikit-image textures (skimage.data.brick/grass/gravel), random 256 px crops" if size <= _LEGACY_MAX
                   else "scikit-image textures (skimage.data.brick/grass/gravel), mirrored, random windows enlarged 2x"),
    }

    write_atomic(out / "demo.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return written

"""Demo data: MVTec-layout categories from scikit-image's textures with synthetic defects.

Good parts are random crops of the 512x512 textures scikit-image ships with its package
(``skimage.data.brick()``, ``grass()``, ``gravel()``; no download), tinted per category and
resized to ``size``. Defective parts are further crops with one defect painted in:

* ``scratch``: a thin curved line, darker or lighter than the surface;
* ``stain``: a rotated elliptical blot blended towards a brown;
* ``hole``: a dark disc with a lighter rim shading;
* ``color``: a patch whose colour is shifted by +-60 in one channel.

The mask is exactly the set of pixels a defect changed (every painted pixel differs from
the good crop by construction), saved as ``ground_truth/<defect>/<id>_mask.png`` (0/255).
Everything is drawn from ``numpy.random.default_rng([seed, category index])``, so the
same arguments give byte-identical PNGs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from visionscale.errors import InvalidValueError, OutputExistsError, check_int
from visionscale.io.atomic import publish, write_atomic


class DemoExistsError(OutputExistsError, FileExistsError):
    """A demo category folder exists already (and may not be replaced)."""


__all__ = ["TEXTURES", "DEFECTS", "DemoExistsError", "make_demo", "make_category"]

# Category -> (scikit-image function, RGB tint applied to the grey texture).
TEXTURES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.0, 0.62, 0.5)),
    "grass": ("grass", (0.55, 0.95, 0.45)),
    "gravel": ("gravel", (0.95, 0.9, 0.8)),
}
DEFECTS = ("scratch", "stain", "hole", "color")
_CROP = 256  # px of the 512 px texture per part (then resized to ``size``)


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


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import disk

    n = img.shape[0]
    mask = np.zeros(img.shape[:2], dtype=bool)
    p0, p2 = rng.uniform(0.15 * n, 0.85 * n, size=(2, 2))
    length = np.linalg.norm(p2 - p0)
    if length < 0.3 * n:  # keep scratches long enough to see
        p2 = p0 + (p2 - p0) / max(length, 1e-6) * 0.3 * n
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.08 * n, size=2)  # quadratic Bezier control point
    radius = max(0.6, n / 128 * rng.uniform(0.8, 1.6))
    for t in np.linspace(0, 1, int(3 * n)):
        p = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        rr, cc = disk((p[0], p[1]), radius, shape=mask.shape)
        mask[rr, cc] = True
    dark = rng.random() < 0.5
    target = np.full(3, 20.0) if dark else np.full(3, 235.0)
    return _paint(img, mask, target, 0.75)


def _stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import ellipse

    n = img.shape[0]
    r, c = rng.uniform(0.25 * n, 0.75 * n, size=2)
    a, b = rng.uniform(0.05 * n, 0.13 * n, size=2)
    rr, cc = ellipse(r, c, a, b, shape=img.shape[:2], rotation=rng.uniform(0, np.pi))
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[rr, cc] = True
    return _paint(img, mask, np.array([90.0, 55.0, 25.0]), rng.uniform(0.55, 0.75))


def _hole(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import disk

    n = img.shape[0]
    r, c = rng.uniform(0.25 * n, 0.75 * n, size=2)
    radius = rng.uniform(0.04 * n, 0.09 * n)
    rr, cc = disk((r, c), radius, shape=img.shape[:2])
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[rr, cc] = True
    out = img.copy()
    dist = np.hypot(rr - r, cc - c) / radius  # 0 centre .. 1 rim
    shade = (8 + 40 * dist**4)[:, None]  # dark inside, a little lighter at the rim
    out[rr, cc] = np.rint(np.broadcast_to(shade, (rr.size, 3)))
    return _ensure_changed(img, out, mask)


def _color(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import ellipse

    n = img.shape[0]
    r, c = rng.uniform(0.25 * n, 0.75 * n, size=2)
    a, b = rng.uniform(0.07 * n, 0.15 * n, size=2)
    rr, cc = ellipse(r, c, a, b, shape=img.shape[:2], rotation=rng.uniform(0, np.pi))
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[rr, cc] = True
    out = img.copy()
    ch = int(rng.integers(0, 3))
    v = out[rr, cc, ch]
    out[rr, cc, ch] = np.where(v < 128, v + 60, v - 60)  # always moves by 60, never clips
    return _ensure_changed(img, out, mask)


def _paint(img: np.ndarray, mask: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    out = img.copy()
    out[mask] = np.rint((1 - alpha) * img[mask] + alpha * target)
    return _ensure_changed(img, out, mask)


def _ensure_changed(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # "Exact masks": a masked pixel that happens to keep its colour is nudged by 1-2 levels
    # so that mask == (pixels that differ from the good part) holds for every defect.
    same = mask & (np.abs(after - before).max(axis=2) < 1)
    if same.any():
        after[same] = np.where(before[same] < 128, before[same] + 2, before[same] - 2)
    return after


_PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "color": _color,
}


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


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
) -> dict:
    """Write one MVTec-layout category to ``folder`` (which must not exist yet).

    Returns:
        Counts per split, for the manifest.
    """
    if texture not in TEXTURES:
        raise InvalidValueError(f"unknown texture {texture!r}; choose from {', '.join(TEXTURES)}")
    unknown = [d for d in defects if d not in _PAINTERS]
    if unknown:
        raise InvalidValueError(f"unknown defect types {unknown}; choose from {', '.join(DEFECTS)}")
    if size < 32:
        raise InvalidValueError(f"size must be >= 32 px (smaller parts cannot show a defect), got {size}")
    if num_train < 1:
        raise InvalidValueError(f"need at least one training image, got {num_train}")
    idx = list(TEXTURES).index(texture)
    rng = np.random.default_rng([seed, idx])
    tex = _texture(texture)
    root = Path(folder)

    def write(rel: str, array: np.ndarray) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_png(array))

    for i in range(num_train):
        write(f"train/good/{i:03d}.png", _good(tex, rng, size).astype(np.uint8))
    for i in range(num_test_good):
        write(f"test/good/{i:03d}.png", _good(tex, rng, size).astype(np.uint8))
    for d in defects:
        for i in range(num_test_defect):
            good = _good(tex, rng, size)
            bad = _PAINTERS[d](good, rng)
            mask = np.abs(bad - good).max(axis=2) >= 1  # exactly the changed pixels
            write(f"test/{d}/{i:03d}.png", bad.astype(np.uint8))
            write(f"ground_truth/{d}/{i:03d}_mask.png", (mask * 255).astype(np.uint8))
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
    overwrite: bool = False,
) -> list[Path]:
    """Build demo categories under ``out`` (MVTec layout) and a ``demo.json`` manifest.

    Each category is written to a temporary folder inside ``out`` and renamed into place
    when complete, so an interrupted run never leaves a half-written category.

    Raises:
        FileExistsError: A category folder exists and ``overwrite`` is False.
        ValueError: Unknown category or defect, size < 32, no training images.
    """
    out = Path(out).expanduser()
    # Bounds before any work: a negative count used to write a demo silently, a huge size to
    # run for minutes (the textures are 512 px; 4096 px is already an 8x upscale).
    check_int("size", size, minimum=32, maximum=4096)
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
    for cat in cats:
        tmp = Path(tempfile.mkdtemp(prefix=f".{cat}-", dir=out))
        try:
            counts[cat] = make_category(tmp, cat, seed=seed, size=size, num_train=num_train,
                                        num_test_good=num_test_good, num_test_defect=num_test_defect,
                                        defects=defects)
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
        "seed": seed, "size": size, "defects": list(defects), "categories": counts,
        "source": "scikit-image textures (skimage.data.brick/grass/gravel), random 256 px crops",
    }

    write_atomic(out / "demo.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return written

"""Test images for the HOG detector parity tests: variants of scikit-image's public-domain
astronaut photo (NASA; ``tests/face/data/dlib/astronaut.png``), made with numpy only (float64
arithmetic, so every platform makes the same pixels), plus images with no face.

``tools/make_dlib_hog_reference.py`` ran dlib 20.0.1 on exactly these arrays to write
``tests/face/data/dlib/hog_boxes.json``; ``tests/face/test_dlib_hog.py`` rebuilds them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ASTRONAUT = Path(__file__).parent / "face" / "data" / "dlib" / "astronaut.png"


def astronaut() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ASTRONAUT).convert("RGB"))


def _sample(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples at float positions ``ys``, ``xs`` (same shape); black outside."""
    h, w = img.shape[:2]
    f = img.astype(np.float64)
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = ys - y0, xs - x0
    out = np.zeros(ys.shape + img.shape[2:])
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        v = np.zeros(ys.shape + img.shape[2:])
        v[ok] = f[yy[ok], xx[ok]]
        out += (wt[..., None] if img.ndim == 3 else wt) * v
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def scale(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    ys, xs = np.meshgrid((np.arange(nh) + 0.5) / factor - 0.5, (np.arange(nw) + 0.5) / factor - 0.5, indexing="ij")
    return _sample(img, np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotated about the centre (counter-clockwise on screen), same size, black corners."""
    h, w = img.shape[:2]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = np.deg2rad(degrees)
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    xs = np.cos(a) * xx - np.sin(a) * yy + cx
    ys = np.sin(a) * xx + np.cos(a) * yy + cy
    return _sample(img, ys, xs)


def grey(img: np.ndarray) -> np.ndarray:
    """(H, W) uint8 from integer weights (ITU-R 601, /256)."""
    i = img.astype(np.int32)
    return ((77 * i[..., 0] + 150 * i[..., 1] + 29 * i[..., 2] + 128) >> 8).astype(np.uint8)


def make(name: str) -> np.ndarray:
    """One test image by name (see :data:`VARIANTS`)."""
    a = astronaut()
    crop = a[40:300, 110:370]                                  # 260 x 260, face ~91 px
    small = a[60:220, 150:310]                                 # 160 x 160, the face only
    if name == "crop":
        out = crop
    elif name == "crop_grey":
        out = grey(crop)
    elif name == "crop_flipped":
        out = crop[:, ::-1]
    elif name == "scale0.4":
        out = scale(a, 0.4)
    elif name == "scale0.6":
        out = scale(a[:360, 60:420], 0.6)
    elif name == "scale1.3":
        out = scale(small, 1.3)
    elif name == "scale2":
        out = scale(a[70:200, 160:290], 2.0)
    elif name == "rot8":
        out = rotate(crop, 8)
    elif name == "rot-12":
        out = rotate(crop, -12)
    elif name == "border_left":
        out = a[50:250, 215:460]
    elif name == "border_top":
        out = a[105:330, 130:330]
    elif name == "full":
        out = a
    elif name == "tiny_up2":
        out = scale(small, 0.45)
    elif name == "two_faces":
        out = np.concatenate([small, np.pad(scale(small, 0.8)[:, ::-1], ((16, 16), (0, 0), (0, 0)))], axis=1)
    elif name == "blank":
        out = np.zeros((120, 160, 3), np.uint8)
    elif name == "noise":
        out = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    else:
        raise KeyError(name)
    return np.ascontiguousarray(out)


#: name -> the (upsample, adjust_threshold) runs compared with dlib.
VARIANTS = {
    "crop": [(1, 0.0), (1, -1.0), (0, 0.0)],
    "crop_grey": [(1, 0.0)],
    "crop_flipped": [(1, 0.0)],
    "scale0.4": [(1, 0.0)],
    "scale0.6": [(1, 0.0), (1, -0.6)],
    "scale1.3": [(1, 0.0)],
    "scale2": [(1, 0.0)],
    "rot8": [(1, 0.0)],
    "rot-12": [(1, 0.0)],
    "border_left": [(1, 0.0)],
    "border_top": [(1, 0.0)],
    "full": [(0, 0.0), (0, -0.6)],
    "tiny_up2": [(2, 0.0)],
    "two_faces": [(1, 0.0)],
    "blank": [(1, 0.0)],
    "noise": [(1, 0.0), (1, -1.0)],
}


def heldout() -> dict[str, np.ndarray]:
    """The held-out set of benchmarks/bench_dlib_hog.py (never used by the tests or to choose
    the pipeline's settings): the whole astronaut at 4 scales x 5 rotations x 2 flips."""
    a = astronaut()
    out = {}
    for s in (0.45, 0.7, 1.0, 1.4):
        for r in (-10, -4, 0, 5, 11):
            for f in (0, 1):
                img = a[:, ::-1] if f else a
                img = scale(img, s) if s != 1.0 else img
                img = rotate(img, r) if r else img
                out[f"astronaut_s{s}_r{r}_f{f}"] = np.ascontiguousarray(img)
    return out

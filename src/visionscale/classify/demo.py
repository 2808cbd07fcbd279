"""A small texture-classification data set cut from the images scikit-image ships.

Classes: ``brick``, ``grass`` and ``gravel`` (``skimage.data``: 512x512 grayscale
textures, all CC0-licensed, see their docstrings). Nothing is downloaded. Each image is
a random square crop (80-128 px of the source, so the scale varies), randomly mirrored,
resized to ``size`` px and saved as PNG. Training crops come from the top three quarters
of each source image and test crops from the bottom quarter, so no test pixel was ever
seen in training. Layout::

    OUT/train/<class>/<class>_000.png ...
    OUT/test/<class>/<class>_000.png ...
    OUT/README.md
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from visionscale.io.atomic import publish

__all__ = ["DEMO_CLASSES", "make_demo"]

DEMO_CLASSES = ("brick", "grass", "gravel")
_TRAIN_ROWS = (0, 384)  # source rows used for training crops
_TEST_ROWS = (384, 512)


def _source(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, name)(), dtype=np.uint8)  # (512, 512) uint8


def _crops(src: np.ndarray, rows: tuple[int, int], n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    lo, hi = rows
    out = []
    for _ in range(n):
        side = int(rng.integers(80, min(128, hi - lo) + 1))
        top = int(rng.integers(lo, hi - side + 1))
        left = int(rng.integers(0, src.shape[1] - side + 1))
        patch = src[top : top + side, left : left + side]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.Resampling.LANCZOS)
        out.append(np.asarray(img))
    return out


def make_demo(out_dir: str | os.PathLike, train_per_class: int = 40, test_per_class: int = 15, size: int = 96,
              seed: int = 0) -> dict:
    """Write the demo data set to ``out_dir`` (which must not exist or be empty).

    The folder appears complete or not at all: it is built in a temporary folder beside
    it and renamed into place.

    Returns:
        ``{"train": {class: count}, "test": {class: count}, "size": size, "path": out_dir}``.

    Raises:
        ValueError: Bad counts or size, or ``out_dir`` is a file or a non-empty folder.
    """
    from PIL import Image

    out = Path(out_dir).expanduser()
    if train_per_class < 2 or test_per_class < 1:
        raise ValueError(f"need at least 2 training and 1 test image per class, got {train_per_class} and {test_per_class}")
    if not 16 <= size <= 512:
        raise ValueError(f"demo image size must be between 16 and 512 px, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    try:
        for cls in DEMO_CLASSES:
            src = _source(cls)
            for split, rows, n in (("train", _TRAIN_ROWS, train_per_class), ("test", _TEST_ROWS, test_per_class)):
                folder = tmp / split / cls
                folder.mkdir(parents=True)
                for i, crop in enumerate(_crops(src, rows, n, size, rng)):
                    Image.fromarray(crop).save(folder / f"{cls}_{i:03d}.png")
                counts[split][cls] = n
        (tmp / "README.md").write_text(
            "# visionscale demo: texture classification\n\n"
            f"Made by `visionscale classify make-demo` (seed {seed}). Classes: {', '.join(DEMO_CLASSES)}, cut from "
            "scikit-image's `skimage.data.brick/grass/gravel` (CC0). Train crops come from the top 3/4 of each source "
            f"image, test crops from the bottom 1/4. Images: {size}x{size} px grayscale PNG.\n\n"
            f"    visionscale classify train {out}/train --backbone resnet18 --image-size {size} --out run\n"
            f"    visionscale classify eval run {out}/test\n"
        )
        publish(tmp)  # mkdtemp makes it private; the data set is not
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**counts, "size": size, "path": str(out)}

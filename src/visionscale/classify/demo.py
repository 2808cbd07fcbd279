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
from pathlib import Path

import numpy as np

from visionscale.errors import check_int
from visionscale.io.outputs import OutputDir

__all__ = ["DEMO_CLASSES", "DEMO_KIND", "make_demo"]

DEMO_CLASSES = ("brick", "grass", "gravel")
DEMO_KIND = "classify-demo"  # manifest kind of the folder
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
              seed: int = 0, overwrite: bool = False) -> dict:
    """Write the demo data set to ``out_dir``.

    The folder appears complete or not at all (:class:`~visionscale.io.outputs.OutputDir`): a
    new or empty folder, or an earlier demo (which is replaced), is fine; a folder holding
    files the demo did not write is refused unless ``overwrite`` (those files then stay).

    Returns:
        ``{"train": {class: count}, "test": {class: count}, "size": size, "path": out_dir}``.

    Raises:
        InvalidValueError: Bad counts, size or seed.
        OutputError: ``out_dir`` is a file, not writable, or holds files the demo did not write.
    """
    from PIL import Image

    check_int("train_per_class", train_per_class, minimum=2)
    check_int("test_per_class", test_per_class, minimum=1)
    check_int("size", size, minimum=16, maximum=512)
    check_int("seed", seed, minimum=0)
    out = Path(out_dir).expanduser()
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    with OutputDir(out, kind=DEMO_KIND, overwrite=overwrite) as tmp:
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
    return {**counts, "size": size, "path": str(out)}

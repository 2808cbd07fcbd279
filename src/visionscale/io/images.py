"""Robust image reading: any file PIL can decode becomes an ``(H, W, 3)`` uint8 RGB array.

What real folders contain, and what happens to it:

* grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB;
* transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent colour) -> composited
  over ``background`` (white by default, what an image viewer shows), because the colour
  stored under a fully transparent pixel is arbitrary;
* 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) -> scaled to 8 bits by the
  type's full range (a 16-bit value ``v`` becomes ``round(v / 257)``), floats (``F``) in
  ``[0, 1]`` are scaled by 255, other floats are clipped to ``[0, 255]``;
* EXIF orientation (phones store portrait shots as rotated landscape pixels) is applied;
* multi-frame files (GIF, TIFF stacks) give their first frame;
* missing, truncated or undecodable files raise :class:`ImageReadError` naming the path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "collect_images", "read_image", "list_images"]

# Lower-case suffixes that list_images() picks up (all decodable by a stock Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


class ImageReadError(ValueError):
    """An image file is missing, truncated or not decodable; the message names the path."""


def read_image(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: Any format Pillow decodes.
        background: RGB colour that transparent pixels are composited over.

    Returns:
        ``(H, W, 3)`` uint8 array, C-contiguous, EXIF orientation applied.

    Raises:
        ImageReadError: The file does not exist, is a folder, is truncated or is not an image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.exists():
        raise ImageReadError(f"image not found: {p}")
    if p.is_dir():
        raise ImageReadError(f"expected an image file, got a folder: {p}")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not an error for a local file we were asked to read.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.seek(0)
                # load() decodes every byte now, so a truncated file fails here (Pillow
                # would otherwise defer the error to the first pixel access).
                img.load()
                img = ImageOps.exif_transpose(img)  # returns a new, loaded image
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {p}: not an image format Pillow recognises") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # Pillow reports truncation as OSError("image file is truncated ...") and some
        # corrupt headers as SyntaxError or ValueError.
        reason = str(exc).strip() or type(exc).__name__
        raise ImageReadError(f"cannot read image {p}: {reason} (truncated or corrupt file?)") from None
    try:
        return _to_rgb(img, background)
    except ValueError as exc:
        raise ImageReadError(f"cannot read image {p}: {exc}") from None


def _to_rgb(img, background: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img)
        # 16-bit files (PIL may hand them over as "I;16*" or as 32-bit "I") use the full
        # 0..65535 range; a genuine 32-bit file uses 0..2**32-1.
        full = 65535.0 if (mode != "I" or a.max(initial=0) <= 65535) else 4294967295.0
        gray = np.clip(np.rint(a.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")  # a palette may carry a transparent index
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(base, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, composited RGBA
    a = np.array(img)  # a writable copy, not a view of PIL's buffer
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"unsupported pixel layout (mode {img.mode}, array {a.shape} {a.dtype})")
    return np.ascontiguousarray(a)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` by suffix (:data:`IMAGE_SUFFIXES`, any case), sorted.

    Hidden files (``.name``) are skipped. Nothing is decoded: a listed file may still
    fail in :func:`read_image`.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {root}")
    walk = root.rglob("*") if recursive else root.iterdir()
    found = []
    for p in walk:
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            found.append(p)
    return sorted(found)


def collect_images(items: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """The image files named by command-line style arguments: a file stays, a folder becomes
    its images (sorted; with ``recursive``, those of its subfolders too).

    Raises:
        FileNotFoundError: a path does not exist ("input not found"), a folder holds no
            images, or nothing was given.
    """
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = list_images(p, recursive=recursive)
            if not found:
                raise FileNotFoundError(f"no images in folder {p}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not files:
        raise FileNotFoundError("no input images given")
    return files

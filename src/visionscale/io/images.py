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
* missing, truncated or undecodable files, folders and anything that is not a regular file
  (a named pipe would block forever) raise :class:`ImageReadError` naming the path;
* files above Pillow's decompression-bomb limit (``2 x PIL.Image.MAX_IMAGE_PIXELS``, about
  179 Mpx) are refused with :class:`ImageReadError`; below it they are read.

Memory: callers that resize anyway pass ``min_size`` (or ``max_side``) and the image is
shrunk by a whole factor while still 8-bit and in its own mode (a JPEG is even decoded at
1/2, 1/4 or 1/8 scale), so a 12000 x 12000 file costs its decoded 8-bit pixels once, not a
full-size RGB copy and a float copy on top.
"""

from __future__ import annotations

from visionscale.errors import VisionscaleError

import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "collect_images", "read_image", "read_image_and_size",
           "list_images"]

# Lower-case suffixes that list_images() picks up (all decodable by a stock Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


class ImageReadError(VisionscaleError, ValueError):
    """An image file is missing, truncated or not decodable; the message names the path."""


class InputNotFoundError(VisionscaleError, FileNotFoundError):
    """An input image or folder does not exist, or a folder holds no images."""


class NotAFolderError(VisionscaleError, NotADirectoryError):
    """A folder of images was expected and a file was given."""


def read_image(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255), *,
               min_size: tuple[int, int] | None = None, max_side: int | None = None) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: Any format Pillow decodes.
        background: RGB colour that transparent pixels are composited over.
        min_size: ``(h, w)``: shrink the image by the largest whole factor that keeps it at
            least ``h`` x ``w`` (JPEG decodes at 1/2, 1/4 or 1/8 scale, other formats are
            box-averaged by ``Image.reduce``), in 8 bits, before the conversion to RGB. For
            callers that resize to a fixed size anyway: a 12000 px photo never becomes a
            full-size RGB or float array. Smaller images are returned unchanged.
        max_side: Resize (never enlarge) so the longer side is at most this many pixels,
            keeping the aspect ratio: the same whole-factor reduction, then a bilinear resize.

    Returns:
        ``(H, W, 3)`` uint8 array, C-contiguous, EXIF orientation applied.

    Raises:
        ImageReadError: The file does not exist, is a folder or not a regular file (a named
            pipe, a device), is truncated, is not an image, or has more pixels than
            Pillow's decompression-bomb limit (``2 x PIL.Image.MAX_IMAGE_PIXELS``).
    """
    return read_image_and_size(path, background, min_size=min_size, max_side=max_side)[0]


def read_image_and_size(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255), *,
                        min_size: tuple[int, int] | None = None,
                        max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_image`, and the ``(H, W)`` of the file itself (after EXIF orientation),
    which differs from the array's when ``min_size`` or ``max_side`` shrank it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    _check_regular_file(p)
    if min_size is not None and (len(min_size) != 2 or min(min_size) < 1):
        raise ValueError(f"min_size must be (h, w) with h, w >= 1, got {min_size!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side!r}")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not an error for a local file we were asked to
            # read; above twice the limit Pillow raises DecompressionBombError, kept below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Plug-ins warn about damaged metadata (TIFF/EXIF tags); the pixels decide: an
            # array or an ImageReadError, not a warning printed in the middle of a command.
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(p) as img:
                img.seek(0)
                if img.format != "JPEG":
                    # load() decodes every byte now, so a truncated file fails here (Pillow
                    # would otherwise defer the error to the first pixel access, and a PNG's
                    # getexif() would load it and swallow the error).
                    img.load()
                orientation = _orientation(img)
                w, h = img.size
                size = (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # (H, W) as viewed
                need = _needed(size, min_size, max_side)  # (h, w) to keep, viewed
                if need is not None:
                    raw_need = (need[1], need[0]) if orientation in (5, 6, 7, 8) else need
                    # JPEG, not loaded yet: decode at 1/2, 1/4 or 1/8 scale (never below raw_need).
                    img.draft(img.mode, (raw_need[1], raw_need[0]))
                img.load()
                if need is not None:
                    img = _reduce(img, raw_need)
                if orientation != 1:
                    img = img.transpose(_transpose_method(orientation))
                rgb = _to_rgb(img, background)
                if max_side is not None and max(rgb.shape[:2]) > max_side:
                    th, tw = _fit_side(size, max_side)
                    rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.Resampling.BILINEAR))
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {p}: not an image format Pillow recognises") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot read image {p}: {exc}") from None
    except _UnsupportedLayout as exc:
        raise ImageReadError(f"cannot read image {p}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders fail on corrupt files in many ways
        # Truncation is OSError("image file is truncated ..."); corrupt headers give
        # SyntaxError, ValueError, struct.error, IndexError, ... depending on the plug-in.
        reason = str(exc).strip() or type(exc).__name__
        raise ImageReadError(f"cannot read image {p}: {reason} (truncated or corrupt file?)") from None
    return np.ascontiguousarray(rgb), size


def _check_regular_file(p: Path) -> None:
    """Refuse before opening: a named pipe would block ``open`` forever, a device read forever."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {p}") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read image {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"expected an image file, got a folder: {p}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"cannot read image {p}: not a regular file (a named pipe, device or socket)")


class _UnsupportedLayout(ValueError):
    pass


def _orientation(img) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as image viewers do
        return 1
    return value if 1 <= value <= 8 else 1


def _transpose_method(orientation: int):
    """The transposition that shows an image stored with EXIF ``orientation`` (2..8) upright."""
    from PIL import Image

    T = Image.Transpose
    return {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
            7: T.TRANSVERSE, 8: T.ROTATE_90}[orientation]


def _fit_side(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) of ``size`` scaled so the longer side is ``max_side`` (each side >= 1)."""
    h, w = size
    scale = max_side / max(h, w)
    return max(1, min(max_side, round(h * scale))), max(1, min(max_side, round(w * scale)))


def _needed(size: tuple[int, int], min_size, max_side) -> tuple[int, int] | None:
    """The (h, w) a whole-factor reduction must keep, or None when nothing may be dropped."""
    need = None
    if min_size is not None:
        need = (int(min_size[0]), int(min_size[1]))
    if max_side is not None and max(size) > max_side:
        fit = _fit_side(size, max_side)
        need = fit if need is None else (max(need[0], fit[0]), max(need[1], fit[1]))
    if need is None or (size[0] // need[0] < 2 or size[1] // need[1] < 2):
        return None
    return need


# Modes whose pixels Image.reduce may average as they are.
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I", "F"}


def _reduce(img, need: tuple[int, int]):
    """Shrink by the largest whole factor that keeps ``img`` at least ``need`` (h, w), raw axes."""
    w, h = img.size
    factor = min(h // need[0], w // need[1])
    if factor < 2:
        return img
    if img.mode not in _REDUCIBLE:
        if img.mode in ("P", "PA"):  # averaging palette indices would mix unrelated colours
            img = img.convert("RGBA" if (img.mode == "PA" or "transparency" in img.info) else "RGB")
        elif img.mode.startswith("I;16"):
            img = img.convert("I")
        elif img.mode == "1":
            img = img.convert("L")
        elif img.mode in ("La", "RGBa"):
            img = img.convert("LA" if img.mode == "La" else "RGBA")
        else:  # HSV and other exotic layouts: average in RGB
            img = img.convert("RGB")
    return img.reduce(factor)


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
        raise _UnsupportedLayout(f"unsupported pixel layout (mode {img.mode}, array {a.shape} {a.dtype})")
    return np.ascontiguousarray(a)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` by suffix (:data:`IMAGE_SUFFIXES`, any case), sorted.

    Hidden files (``.name``) are skipped. Nothing is decoded: a listed file may still
    fail in :func:`read_image`.

    Raises:
        InputNotFoundError: ``folder`` does not exist (a ``FileNotFoundError``).
        NotAFolderError: ``folder`` is a file (a ``NotADirectoryError``).
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise InputNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotAFolderError(f"expected a folder of images, got a file: {root}")
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
        InputNotFoundError: (a ``FileNotFoundError``) a path does not exist ("input not found"), a folder holds no
            images, or nothing was given.
    """
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = list_images(p, recursive=recursive)
            if not found:
                raise InputNotFoundError(f"no images in folder {p}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise InputNotFoundError(f"input not found: {p}")
    if not files:
        raise InputNotFoundError("no input images given")
    return files

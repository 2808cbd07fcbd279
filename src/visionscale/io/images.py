"""Robust image reading: any file Pillow decodes becomes an ``(H, W, 3)`` RGB array, either
uint8 (:func:`read_image`, what most callers want) or float32 in ``[0, 1]`` that keeps the
precision of 16-bit files (:func:`read_image_float`).

What real folders contain, and what happens to it:

* grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB;
* transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent colour) -> composited
  over ``background`` (white by default, what an image viewer shows), because the colour
  stored under a fully transparent pixel is arbitrary;
* EXIF orientation (phones store portrait shots as rotated landscape pixels) is applied;
* multi-frame files (GIF, TIFF stacks) give their first frame;
* missing, truncated or undecodable files, folders and anything that is not a regular file
  (a named pipe would block forever) raise :class:`ImageReadError` naming the path;
* files above Pillow's decompression-bomb limit (``2 x PIL.Image.MAX_IMAGE_PIXELS``, about
  179 Mpx) are refused with :class:`ImageReadError`; below it they are read.

uint8 (``read_image``, ``read_image_and_size(dtype=np.uint8)``), as it always was:

* 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) are scaled to 8 bits by the type's
  full range (a 16-bit value ``v`` becomes ``round(v / 257)``); floats (``F``) in ``[0, 1]``
  are scaled by 255, other floats are clipped to ``[0, 255]``;
* 16-bit colour PNG, TIFF and PPM files come as Pillow decodes them: their 8 high bits;
* TIFF files Pillow cannot open (float or 16-bit layouts it lacks) are read as below and
  rounded to 8 bits.

float32 in ``[0, 1]`` (``read_image_float``, ``read_image_and_size(dtype=np.float32)``):

* files with at most 8 bits per sample (``L``, ``RGB``, ``P``, ``1``, JPEG...) give exactly
  the uint8 array above divided by 255 (in float32, so ``torch.from_numpy(u8).float() / 255``
  is bit-identical);
* 16-bit integers (``I;16``, ``I;16B``, ``I;16L``; 16-bit PNG, TIFF, PGM, and ``I`` files
  whose values fit 16 bits) -> ``v / 65535``; 32-bit integers -> ``v / (2**32 - 1)``
  (float32 keeps 24 of their bits); signed integers by their positive range, negatives -> 0;
* floats (``F``, float TIFFs) are taken as already normalised: clipped to ``[0, 1]``, NaN ->
  0 (a float file holding 0..255 therefore reads almost white: scale it first);
* 16-bit colour: TIFF through ``tifffile`` (installed with scikit-image: RGB, RGBA, planar,
  uncompressed, deflate or packbits; LZW and JPEG-in-TIFF need the ``imagecodecs`` package),
  PNG through OpenCV (``cv2``) when it is installed, binary PPM by reading its samples;
  without OpenCV a 16-bit colour PNG gives Pillow's 8 high bits and a
  :class:`PrecisionLossWarning` naming the file (Pillow itself drops the low byte silently);
* sensors of 10, 12 or 14 bits usually store their values in 16-bit files unscaled: a 12-bit
  image (values <= 4095) then reads dark (<= 4095 / 65535, about 0.06) but consistently, the
  same for every image of that camera. ``white_level=4095`` maps such a file to the full
  ``[0, 1]`` (values above it clip to 1); it applies to integer files of more than 8 bits
  only, and alpha channels always use their type's full range;
* TIFF ``WhiteIsZero`` (photometric 0) grayscale is inverted so that 1 is white;
* one channel is replicated to three. A model normalised with the ImageNet mean and std then
  sees ``(v - mean_c) / std_c`` in each channel, exactly as for an 8-bit grayscale file (MVTec's
  grid, screw and zipper are stored that way), so no model needs to know the file had one
  channel.

Memory: callers that resize anyway pass ``min_size`` (or ``max_side``) and the image is
shrunk by a whole factor before the conversion to RGB: 8-bit files while still 8-bit and in
their own mode (a JPEG is even decoded at 1/2, 1/4 or 1/8 scale), 16-bit files in their
16-bit (``I``) mode or, on the ``tifffile``/OpenCV paths, as integer sums (box averages,
never through 8 bits). A 12000 x 12000 8-bit file costs its decoded pixels once, not a
full-size RGB copy and a float copy on top; a 16-bit file on the ``tifffile``/OpenCV paths
is decoded whole (2 bytes per sample) before it is shrunk.
"""

from __future__ import annotations

from visionscale.errors import InvalidValueError, VisionscaleError, check_finite

import os
import stat
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "PrecisionLossWarning", "collect_images", "read_image",
           "read_image_and_size", "read_image_float", "list_images"]

# Lower-case suffixes that list_images() picks up (all decodable by a stock Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


class ImageReadError(VisionscaleError, ValueError):
    """An image file is missing, truncated or not decodable; the message names the path."""


class PrecisionLossWarning(UserWarning):
    """A file holds more than 8 bits per sample but could only be read with 8 (the message names
    the file and what would read it fully)."""


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


def read_image_float(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255), *,
                     min_size: tuple[int, int] | None = None, max_side: int | None = None,
                     white_level: float | None = None) -> np.ndarray:
    """Read an image file as RGB float32 in ``[0, 1]``, keeping the precision of 16-bit files.

    How each kind of file is normalised is listed in the module docstring: 8-bit files give
    :func:`read_image`'s array / 255, 16-bit ones ``v / 65535``, floats are clipped.

    Args:
        path: Any format Pillow decodes, and TIFF layouts that ``tifffile`` decodes.
        background: RGB colour (0..255) that transparent pixels are composited over.
        min_size: As in :func:`read_image`; 16-bit files are shrunk in 16 bits or as integer
            box sums, never through 8 bits.
        max_side: As in :func:`read_image` (the final bilinear resize is done in float).
        white_level: The value that reads as 1.0 in integer files of more than 8 bits
            (4095 for 12-bit sensor data in 16-bit files); larger values clip to 1. None:
            the type's full range (65535 for 16 bits).

    Returns:
        ``(H, W, 3)`` float32 array, C-contiguous, values in ``[0, 1]``.

    Raises:
        ImageReadError: As :func:`read_image`, and for TIFF compressions ``tifffile`` cannot
            decode without ``imagecodecs`` (the message says so).
        InvalidValueError: ``white_level`` is not a positive number.
    """
    return read_image_and_size(path, background, min_size=min_size, max_side=max_side, dtype=np.float32,
                               white_level=white_level)[0]


def read_image_and_size(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255), *,
                        min_size: tuple[int, int] | None = None, max_side: int | None = None,
                        dtype: type | np.dtype | None = np.uint8,
                        white_level: float | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_image` or :func:`read_image_float`, and the ``(H, W)`` of the file itself
    (after EXIF orientation), which differs from the array's when ``min_size`` or ``max_side``
    shrank it.

    Args:
        dtype: ``np.uint8`` (:func:`read_image`), ``np.float32`` (:func:`read_image_float`), or
            None: the smallest array that loses nothing, uint8 for files with at most 8 bits
            per sample and float32 in ``[0, 1]`` for deeper ones (what a pipeline that accepts
            both wants: 8-bit images stay 4x smaller); uint8 too for a deeper file that can only
            be read with 8 bits (a 16-bit colour PNG without OpenCV, with its warning).
        white_level: See :func:`read_image_float`; ignored for uint8 output.
        path, background, min_size, max_side: As in :func:`read_image`.

    Raises:
        ImageReadError: See :func:`read_image_float`.
        InvalidValueError: ``dtype`` is none of the three, ``white_level`` is not positive.
    """
    from PIL import Image, UnidentifiedImageError

    kind = _kind(dtype)
    p = Path(path).expanduser()
    _check_regular_file(p)
    if min_size is not None and (len(min_size) != 2 or min(min_size) < 1):
        raise ValueError(f"min_size must be (h, w) with h, w >= 1, got {min_size!r}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side!r}")
    if white_level is not None:
        check_finite("white_level", white_level, minimum=0.0, min_inclusive=False)
    opts = _Options(min_size, max_side, tuple(background), None if kind == "uint8" else white_level, kind)
    lossy = None  # (format, Pillow's mode, how to read it fully) when 8 bits of a deeper file were read
    lossy_fix = None
    try:
        with _quiet_pillow():
            try:
                opened = Image.open(p)
            except UnidentifiedImageError:
                if not _is_tiff(p):
                    raise
                out, size = _read_tifffile(p, opts, None)  # float or 16-bit layouts Pillow lacks
            else:
                with opened as img:
                    img.seek(0)
                    route = _route(img, kind)
                    if route == "tifffile":
                        try:
                            out, size = _read_tifffile(p, opts, _orientation_no_load(img))
                        except _NeedsCodec as exc:  # compressed as Pillow (libtiff) but not tifffile decodes
                            route = "pillow16" if img.mode in _DEEP_MODES else "lossy"
                            lossy_fix = f"install imagecodecs ({exc})"
                    if route == "cv2":
                        out, size = _read_cv2_png(p, opts, _orientation_no_load(img))
                    elif route == "ppm16":
                        out, size = _read_ppm16(p, img, opts)
                    elif route == "pillow16":
                        out, size = _read_pillow_deep(img, opts)
                    elif route in ("legacy", "lossy"):
                        if route == "lossy":
                            lossy = (img.format, img.mode, lossy_fix)
                        out, size = _read_pillow_8bit(img, opts)
                        if kind == "float32":
                            out = _u8_to_float(out)
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {p}: not an image format Pillow recognises") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot read image {p}: {exc}") from None
    except (_UnsupportedLayout, _Truncated) as exc:
        raise ImageReadError(f"cannot read image {p}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - decoders fail on corrupt files in many ways
        # Truncation is OSError("image file is truncated ..."); corrupt headers give
        # SyntaxError, ValueError, struct.error, IndexError, ... depending on the plug-in.
        reason = str(exc).strip() or type(exc).__name__
        raise ImageReadError(f"cannot read image {p}: {reason} (truncated or corrupt file?)") from None
    if lossy is not None:
        fmt, mode, how = lossy
        if how is None:
            how = "install opencv-python-headless, or save it as 16-bit TIFF" if fmt == "PNG" else "save it as 16-bit TIFF"
        warnings.warn(f"{p}: 16-bit colour {fmt} read with 8 bits per sample (Pillow decodes it as {mode}); "
                      f"to keep its precision, {how}", PrecisionLossWarning, stacklevel=2)
    return np.ascontiguousarray(out), size


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: list | None = None


@contextmanager
def _quiet_pillow():
    """Silence Pillow's warnings while a file is read, safely when threads read at once.

    A decompression-bomb warning is not an error for a local file we were asked to read
    (above twice the limit Pillow raises DecompressionBombError, which we keep), and
    plug-ins warn about damaged metadata (TIFF/EXIF tags): the pixels decide, an array or an
    ImageReadError, not a warning printed in the middle of a command. ``warnings.catch_warnings``
    saves and restores the global filter list, so overlapping uses from several threads
    (``io.prefetch``) could leave the filters of one of them installed for good; here the
    first reader installs the filters, the last one restores the list, and only warnings
    issued by Pillow's own modules are ignored (a :class:`PrecisionLossWarning` from another
    thread still shows).
    """
    global _quiet_depth, _quiet_saved
    from PIL import Image

    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = list(warnings.filters)
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                warnings.filters[:] = _quiet_saved
                # What catch_warnings does on exit: invalidate the cached filter decisions
                # (a private function, so only where this Python has it).
                mutated = getattr(warnings, "_filters_mutated", None)
                if mutated is not None:
                    mutated()
                _quiet_saved = None


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


class _Truncated(ValueError):
    pass


class _NeedsCodec(_UnsupportedLayout):
    """tifffile lacks the codec (``imagecodecs`` is not installed)."""


class _Options:
    """What the caller asked for, passed down to whichever decoder reads the file."""

    __slots__ = ("min_size", "max_side", "background", "white_level", "kind")

    def __init__(self, min_size, max_side, background, white_level, kind):
        self.min_size, self.max_side, self.background = min_size, max_side, background
        self.white_level, self.kind = white_level, kind


def _kind(dtype) -> str:
    if dtype is None:
        return "native"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt == np.uint8:
        return "uint8"
    if dt == np.float32:
        return "float32"
    raise InvalidValueError(f"dtype must be numpy.uint8, numpy.float32 or None, got {dtype!r}").about("dtype")


# ----------------------------------------------------------------------------------------
# Which decoder reads a file.

# Pillow modes that hold more than 8 bits per sample, decoded exactly by Pillow.
_DEEP_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _rawmode(img) -> str:
    """The raw mode of the first tile (how the file stores its samples), before load() drops it."""
    try:
        args = img.tile[0].args if hasattr(img.tile[0], "args") else img.tile[0][3]
    except (IndexError, TypeError, AttributeError):
        return ""
    return str(args[0] if isinstance(args, tuple) else args)


def _route(img, kind: str) -> str:
    """``legacy`` (8-bit Pillow), ``lossy`` (8-bit Pillow of a deeper file: warn), ``pillow16``,
    ``tifffile``, ``cv2`` or ``ppm16``."""
    if kind == "uint8":
        return "legacy"
    if img.format == "TIFF":
        # Pillow reads 16-bit grayscale (I;16*) and 32-bit float (F) TIFFs exactly; it unpacks
        # 16-bit RGB(A) to the high bytes, planar 16-bit RGB as if it had 8 bits (garbage), and
        # unsigned 32-bit as signed ("I;32N": values >= 2**31 turn negative). tifffile gives
        # the stored type.
        bits = _tiff_tag(img, 258)
        deep = max(bits if isinstance(bits, tuple) else (bits or 8,)) > 8
        if deep and img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "F"):
            return "tifffile"
    raw = _rawmode(img)
    # Pillow has no 16-bit colour modes: it unpacks "RGB;16B", "RGBA;16L", "LA;16B" to 8 bits
    # (the high byte). 16-bit grayscale gets an "I;16*" mode and is exact.
    colour16 = ";16" in raw and not img.mode.startswith("I")
    if img.format == "PNG" and colour16:
        return "cv2" if _cv2() is not None else "lossy"
    if img.format == "PPM" and img.mode == "RGB" and _ppm_maxval(img) > 255:
        return "ppm16"
    if colour16:
        return "lossy"
    if img.mode in _DEEP_MODES:
        return "pillow16"
    return "legacy"


def _cv2():
    try:
        import cv2
    except Exception:  # noqa: BLE001 - not installed, or a broken install (missing libGL): not used
        return None
    return cv2


def _is_tiff(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# ----------------------------------------------------------------------------------------
# 8-bit Pillow path (read_image).


def _read_pillow_8bit(img, opts: _Options) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    if img.format != "JPEG":
        # load() decodes every byte now, so a truncated file fails here (Pillow would
        # otherwise defer the error to the first pixel access, and a PNG's getexif() would
        # load it and swallow the error).
        img.load()
    orientation = _orientation(img)
    size, need, raw_need = _sizes(img.size, orientation, opts)
    if need is not None:
        # JPEG, not loaded yet: decode at 1/2, 1/4 or 1/8 scale (never below raw_need).
        img.draft(img.mode, (raw_need[1], raw_need[0]))
    img.load()
    if need is not None:
        img = _reduce(img, raw_need)
    if orientation != 1:
        img = img.transpose(_transpose_method(orientation))
    rgb = _to_rgb(img, opts.background)
    if opts.max_side is not None and max(rgb.shape[:2]) > opts.max_side:
        th, tw = _fit_side(size, opts.max_side)
        rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.Resampling.BILINEAR))
    return rgb, size


def _u8_to_float(a: np.ndarray) -> np.ndarray:
    # A single correctly rounded float32 division per value: what torch's uint8.float() / 255
    # computes, so tensors built from either are bit-identical.
    x = a.astype(np.float32)
    np.divide(x, np.float32(255), out=x)
    return x


def _sizes(raw_wh: tuple[int, int], orientation: int, opts: _Options):
    """(H, W) as viewed, the (h, w) a reduction must keep (viewed), and the same in raw axes."""
    w, h = raw_wh
    swap = orientation in (5, 6, 7, 8)
    size = (w, h) if swap else (h, w)
    need = _needed(size, opts.min_size, opts.max_side)
    raw_need = None if need is None else ((need[1], need[0]) if swap else need)
    return size, need, raw_need


# ----------------------------------------------------------------------------------------
# Deep paths (float32 output).


def _read_pillow_deep(img, opts: _Options) -> tuple[np.ndarray, tuple[int, int]]:
    """16-bit / 32-bit integer and float grayscale that Pillow decodes exactly (I;16*, I, F)."""
    img.load()
    orientation = _orientation(img)
    size, need, raw_need = _sizes(img.size, orientation, opts)
    invert = img.format == "TIFF" and _tiff_tag(img, 262) == 0  # WhiteIsZero; Pillow keeps I;16 raw
    if need is not None:
        img = _reduce(img, raw_need)  # I;16 -> I first: averaged in 32-bit integers, not 8 bits
    if orientation != 1:
        img = img.transpose(_transpose_method(orientation))
    a = np.asarray(img)
    if img.mode == "F":
        full = None
    elif img.mode == "I":
        # Pillow hands 16-bit files over as "I;16*" or (older versions, PGM, after reduce) as
        # 32-bit "I": values that fit 16 bits use 0..65535, a genuine 32-bit file 0..2**32-1.
        full = 65535.0 if a.max(initial=0) <= 65535 else 4294967295.0
    else:
        full = 65535.0
    return _finish(a, full=full, alpha=None, invert=invert, orientation=1, opts=opts, size=size), size


def _tiff_tag(img, tag: int):
    try:
        return img.tag_v2.get(tag)
    except Exception:  # noqa: BLE001 - a broken tag is treated as absent
        return None


def _read_tifffile(p: Path, opts: _Options, orientation: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """TIFF layouts Pillow drops to 8 bits or cannot open: 16-bit RGB(A), unsigned 32-bit, float RGB."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        h, w = int(page.imagelength), int(page.imagewidth)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and h * w > 2 * limit:
            raise _UnsupportedLayout(f"{h * w} pixels exceed the decompression-bomb limit of {2 * limit} "
                                     f"(2 x PIL.Image.MAX_IMAGE_PIXELS)")
        # tifffile reports a short read of uncompressed data, but the check costs nothing and
        # names the cause for every compression.
        end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c), default=0)
        have = p.stat().st_size
        if end > have:
            raise _Truncated(f"file is truncated: its pixel data end at byte {end}, the file has {have} bytes")
        photometric = int(page.photometric)
        if photometric not in (0, 1, 2):  # WhiteIsZero, BlackIsZero, RGB
            raise _UnsupportedLayout(f"unsupported TIFF photometric interpretation {photometric} "
                                     f"(grayscale and RGB are read)")
        if orientation is None:
            tag = page.tags.get(274)
            value = int(tag.value) if tag is not None else 1
            orientation = value if 1 <= value <= 8 else 1
        try:
            a = page.asarray()
        except KeyError as exc:  # "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"
            raise _NeedsCodec(str(exc.args[0] if exc.args else exc)) from None
        axes = page.axes
        extrasamples = tuple(int(e) for e in (page.extrasamples or ()))
    if axes == "SYX":  # planar configuration 2: one plane per sample
        a = np.moveaxis(a, 0, -1)
    elif axes not in ("YX", "YXS"):
        raise _UnsupportedLayout(f"unsupported TIFF layout (axes {axes}, shape {a.shape})")
    base = 3 if photometric == 2 else 1
    channels = a.shape[2] if a.ndim == 3 else 1
    if channels < base:
        raise _UnsupportedLayout(f"unsupported TIFF layout ({channels} samples for photometric {photometric})")
    alpha = None
    if channels > base:
        # ExtraSamples: 1 associated (premultiplied) alpha, 2 unassociated alpha, 0 unspecified
        # data (dropped, as Pillow does).
        alpha = {1: "premultiplied", 2: "straight"}.get(extrasamples[0] if extrasamples else 0)
        a = a[..., : base + (alpha is not None)]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    full = _type_range(a.dtype)
    size, need, raw_need = _sizes((w, h), orientation, opts)
    if need is not None:
        a = _box_reduce(a, min(h // raw_need[0], w // raw_need[1]))
    out = _finish(a, full=full, alpha=alpha, invert=photometric == 0, orientation=orientation, opts=opts,
                  size=size, eight_bit=full == 255.0)
    return out, size


def _read_cv2_png(p: Path, opts: _Options, orientation: int) -> tuple[np.ndarray, tuple[int, int]]:
    """16-bit colour PNG (RGB, RGBA, gray + alpha), which Pillow unpacks to its 8 high bits."""
    cv2 = _cv2()
    a = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise _Truncated("OpenCV could not decode it (truncated or corrupt file?)")
    if a.ndim == 3:
        a = a[..., [2, 1, 0, 3][: a.shape[2]]] if a.shape[2] in (3, 4) else a  # BGR(A) -> RGB(A)
    channels = a.shape[2] if a.ndim == 3 else 1
    alpha = "straight" if channels in (2, 4) else None
    h, w = a.shape[:2]
    size, need, raw_need = _sizes((w, h), orientation, opts)
    full = _type_range(a.dtype)
    if need is not None:
        a = _box_reduce(a, min(h // raw_need[0], w // raw_need[1]))
    out = _finish(a, full=full, alpha=alpha, invert=False, orientation=orientation, opts=opts, size=size,
                  eight_bit=full == 255.0)
    return out, size


def _ppm_maxval(img) -> int:
    try:
        return int(img.tile[0].args[1])
    except (IndexError, TypeError, AttributeError, ValueError):
        return 255


def _read_ppm16(p: Path, img, opts: _Options) -> tuple[np.ndarray, tuple[int, int]]:
    """Binary PPM (P6) with maxval > 255: big-endian 16-bit samples after the header, scaled by maxval."""
    tile = img.tile[0]
    maxval, offset = _ppm_maxval(img), int(tile.offset if hasattr(tile, "offset") else tile[2])
    w, h = img.size
    count = h * w * 3
    a = np.fromfile(p, dtype=">u2", count=count, offset=offset)
    if a.size < count:
        raise _Truncated(f"file is truncated: {a.size} of {count} samples")
    a = a.reshape(h, w, 3)
    size, need, raw_need = _sizes((w, h), 1, opts)
    if need is not None:
        a = _box_reduce(a, min(h // raw_need[0], w // raw_need[1]))
    return _finish(a, full=float(maxval), alpha=None, invert=False, orientation=1, opts=opts, size=size), size


def _type_range(dtype: np.dtype) -> float | None:
    """The value that means white for an integer type (its largest), None for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return None
    if dtype.kind in "ui":
        return float(np.iinfo(dtype).max)
    if dtype.kind == "b":
        return 1.0
    raise _UnsupportedLayout(f"unsupported sample type {dtype}")


def _box_reduce(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` boxes (edge boxes partial, like ``Image.reduce``), as
    float64; integers are summed as 64-bit integers, so no precision is lost on the way."""
    if factor < 2:
        return a
    acc = np.float64 if a.dtype.kind == "f" else (np.uint64 if a.dtype.kind in "ub" else np.int64)
    h, w = a.shape[:2]
    ys, xs = np.arange(0, h, factor), np.arange(0, w, factor)
    s = np.add.reduceat(a, ys, axis=0, dtype=acc)
    s = np.add.reduceat(s, xs, axis=1, dtype=acc)
    count = np.minimum(factor, h - ys)[:, None] * np.minimum(factor, w - xs)[None, :]
    if a.ndim == 3:
        count = count[..., None]
    return s / count


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """numpy's version of :func:`_transpose_method`: show an array stored with EXIF ``orientation`` upright."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(a, 1)
    return a


def _finish(a: np.ndarray, *, full: float | None, alpha: str | None, invert: bool, orientation: int,
            opts: _Options, size: tuple[int, int], eight_bit: bool = False) -> np.ndarray:
    """(H, W[, C]) samples in raw units -> (H, W, 3) in ``[0, 1]`` (or uint8 when asked).

    ``full``: the value meaning white (None: floats, clipped); ``alpha``: the last channel is
    alpha, ``"straight"`` or ``"premultiplied"``; ``invert``: WhiteIsZero; ``eight_bit``: the
    file had 8-bit samples (``dtype=None`` then returns uint8).
    """
    if orientation != 1:
        a = _orient(a, orientation)
    if alpha is not None:
        colour, al = a[..., :-1], a[..., -1]
        if colour.ndim == 3 and colour.shape[2] == 1:
            colour = colour[..., 0]
    else:
        colour, al = a, None
    level = full
    if full is not None and full > 255 and opts.white_level is not None:
        level = float(opts.white_level)
    x = _unit(colour, level)
    if invert:
        np.subtract(np.float32(1), x, out=x)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if al is not None:
        al = _unit(al, full)[..., None]
        bg = np.asarray(opts.background, dtype=np.float32) / np.float32(255)
        if alpha == "straight":
            x *= al
        x += bg * (np.float32(1) - al)
        np.clip(x, 0, 1, out=x)
    if opts.max_side is not None and max(x.shape[:2]) > opts.max_side:
        x = _resize_float(x, _fit_side(size, opts.max_side))
    if opts.kind == "uint8" or (opts.kind == "native" and eight_bit):
        return np.clip(np.rint(x * np.float32(255)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x, dtype=np.float32)


def _unit(a: np.ndarray, level: float | None) -> np.ndarray:
    """Samples / level as a new float32 array clipped to [0, 1]; floats (level None) clipped, NaN -> 0."""
    if level is None:
        x = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    else:
        # float32(v) / float32(level): one correctly rounded division (v < 2**24 converts exactly).
        x = np.divide(a, np.float32(level), dtype=np.float32)
    return np.clip(x, 0, 1, out=x)


def _resize_float(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W, 3) float32, per channel in Pillow's float mode (as the 8-bit path)."""
    from PIL import Image

    th, tw = hw
    out = np.empty((th, tw, x.shape[2]), dtype=np.float32)
    for c in range(x.shape[2]):
        ch = Image.fromarray(np.ascontiguousarray(x[..., c], dtype=np.float32))
        out[..., c] = np.asarray(ch.resize((tw, th), Image.Resampling.BILINEAR))
    return np.clip(out, 0, 1, out=out)


# ----------------------------------------------------------------------------------------
# Shared helpers.


def _orientation(img) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as image viewers do
        return 1
    return value if 1 <= value <= 8 else 1


def _orientation_no_load(img) -> int:
    """EXIF orientation without decoding the pixels with Pillow (its PNG getexif() loads the
    image when the EXIF chunk is not before the pixel data): what the header already holds."""
    from PIL import Image

    if img.format == "TIFF":
        value = _tiff_tag(img, 0x0112)
    else:
        data = img.info.get("exif")
        if not data:
            return 1
        try:
            exif = Image.Exif()
            exif.load(data)
            value = exif.get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as image viewers do
            return 1
    try:
        value = int(value if value is not None else 1)
    except (TypeError, ValueError):
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
                below = [] if recursive else list_images(p, recursive=True)
                hint = (f", but its subfolders hold {len(below)} (the first: {below[0]}): give the subfolders "
                        f"instead") if below else ""
                raise InputNotFoundError(f"no images in folder {p}{hint}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise InputNotFoundError(f"input not found: {p}")
    if not files:
        raise InputNotFoundError("no input images given")
    return files

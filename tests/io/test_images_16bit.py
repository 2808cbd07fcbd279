"""visionscale.io.images.read_image_float: 16-bit and single-channel files without silent loss."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from visionscale.errors import InvalidValueError
from visionscale.io import images as I
from visionscale.io.images import (
    ImageReadError,
    PrecisionLossWarning,
    read_image,
    read_image_and_size,
    read_image_float,
)

# A 16-bit value v must come back as v / 65535 to within float32 rounding: float32 has a 24-bit
# significand, so |x - v/65535| <= 2**-24 (relative), far below one 16-bit step (1/65535 ~ 2**-16).
# Recovering v with rint(x * 65535) is therefore exact, which is what the tests check.
STEP16 = 1 / 65535


def _u16(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


def _png16(path, a: np.ndarray):
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit colour): IHDR, one IDAT, IEND."""
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _as16(x: np.ndarray) -> np.ndarray:
    return np.rint(x.astype(np.float64) * 65535).astype(np.int64)


def test_sixteen_bit_gray_png_keeps_every_value(tmp_path):
    a = _u16((9, 11))
    a[0, :4] = [0, 1, 65534, 65535]  # the ends of the range and one step from them
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    x = read_image_float(path)
    assert x.dtype == np.float32 and x.shape == (9, 11, 3) and x.flags.c_contiguous
    np.testing.assert_array_equal(_as16(x[..., 0]), a)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # one channel replicated to three
    assert x.min() == 0.0 and x.max() == 1.0
    # The 8-bit reader is unchanged: round(v / 257).
    np.testing.assert_array_equal(read_image(path)[..., 0], np.rint(a / 257.0).astype(np.uint8))


def test_sixteen_bit_gray_tiff_and_white_is_zero(tmp_path):
    a = _u16((7, 5), seed=1)
    tifffile.imwrite(tmp_path / "g.tif", a)
    np.testing.assert_array_equal(_as16(read_image_float(tmp_path / "g.tif")[..., 1]), a)
    tifffile.imwrite(tmp_path / "w.tif", a, photometric="miniswhite")
    np.testing.assert_array_equal(_as16(read_image_float(tmp_path / "w.tif")[..., 1]), 65535 - a.astype(np.int64))


@pytest.mark.parametrize("planar", [False, True])
def test_sixteen_bit_rgb_tiff(tmp_path, planar):
    a = _u16((6, 8, 3), seed=2)
    path = tmp_path / "rgb.tif"
    if planar:
        tifffile.imwrite(path, np.moveaxis(a, 2, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(path, a, photometric="rgb", compression="zlib")
    x, size = read_image_and_size(path, dtype=np.float32)
    assert size == (6, 8)
    np.testing.assert_array_equal(_as16(x), a)


def test_sixteen_bit_rgba_tiff_is_composited_in_float(tmp_path):
    rgb = _u16((4, 4, 3), seed=3)
    alpha = np.full((4, 4), 65535, np.uint16)
    alpha[0, 0], alpha[0, 1] = 0, 32768
    tifffile.imwrite(tmp_path / "a.tif", np.dstack([rgb, alpha]), photometric="rgb", extrasamples=["unassalpha"])
    x = read_image_float(tmp_path / "a.tif", background=(0, 0, 255))
    np.testing.assert_array_equal(_as16(x[1:]), rgb[1:])  # opaque: exact
    np.testing.assert_allclose(x[0, 0], [0, 0, 1], atol=1e-7)  # transparent: the background
    a = 32768 / 65535
    expected = rgb[0, 1] / 65535 * a + np.array([0, 0, 1]) * (1 - a)
    # float32 arithmetic on values <= 1: a few ulps of 1.0 (1.2e-7 each)
    np.testing.assert_allclose(x[0, 1], expected, atol=1e-6)


def test_sixteen_bit_rgb_png(tmp_path):
    a = _u16((5, 7, 3), seed=4)
    path = _png16(tmp_path / "rgb16.png", a)
    with Image.open(path) as im:
        assert im.mode == "RGB"  # Pillow itself only has 8-bit RGB: it would drop the low byte
    pytest.importorskip("cv2")
    x = read_image_float(path)
    np.testing.assert_array_equal(_as16(x), a)
    rgba = np.dstack([a, np.full((5, 7), 65535, np.uint16)])
    np.testing.assert_array_equal(_as16(read_image_float(_png16(tmp_path / "rgba16.png", rgba))), a)


def test_sixteen_bit_rgb_png_without_opencv_warns(tmp_path, monkeypatch):
    a = _u16((3, 4, 3), seed=5)
    path = _png16(tmp_path / "rgb16.png", a)
    monkeypatch.setattr(I, "_cv2", lambda: None)
    with pytest.warns(PrecisionLossWarning, match="rgb16.png"):
        x = read_image_float(path)
    # Pillow's 8 high bits, / 255: off by less than 1/255 (one 8-bit step) of v / 65535.
    assert np.abs(x - a / 65535.0).max() < 1 / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(path)  # the 8-bit reader promises 8 bits: no warning


def test_sixteen_bit_ppm(tmp_path):
    a = (_u16((3, 4, 3), seed=6) >> 4).astype(np.uint16)  # a 12-bit camera: maxval 4095
    path = tmp_path / "c.ppm"
    path.write_bytes(b"P6\n4 3\n4095\n" + a.astype(">u2").tobytes())
    x = read_image_float(path)
    np.testing.assert_array_equal(np.rint(x.astype(np.float64) * 4095).astype(np.int64), a)


def test_white_level_for_twelve_bit_data_in_sixteen_bit_files(tmp_path):
    a = np.array([[0, 1000, 4095, 5000]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "t.tif", a)
    dark = read_image_float(tmp_path / "t.tif")[0, :, 0]
    assert dark.max() == pytest.approx(5000 / 65535, rel=1e-6)  # read dark, but consistently
    x = read_image_float(tmp_path / "t.tif", white_level=4095)[0, :, 0]
    np.testing.assert_allclose(x, [0, 1000 / 4095, 1, 1], rtol=1e-6)  # float32: 6e-8 relative
    # 8-bit files ignore it: their range is always 0..255.
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "e.png")
    np.testing.assert_array_equal(read_image_float(tmp_path / "e.png", white_level=4095)[0, :, 0], [0, 1])
    with pytest.raises(InvalidValueError, match="white_level"):
        read_image_float(tmp_path / "t.tif", white_level=0)


def test_eight_bit_files_read_as_u8_over_255_exactly(tmp_path):
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rgb[0, :3, 0] = [0, 1, 255]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    for name in ("c.png", "g.png"):
        u8 = read_image(tmp_path / name)
        x = read_image_float(tmp_path / name)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, u8.astype(np.float32) / np.float32(255))
        native, _ = read_image_and_size(tmp_path / name, dtype=None)
        assert native.dtype == np.uint8  # 8-bit files stay 8-bit (4x less memory) when the caller allows
        np.testing.assert_array_equal(native, u8)
    np.testing.assert_array_equal(read_image_float(tmp_path / "g.png")[..., 1], gray / np.float32(255))


def test_float_tiff_is_clipped_and_float_rgb_tiff_is_read(tmp_path):
    f = np.array([[-0.5, 0.0, 0.25], [1.0, 2.0, np.nan]], dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image_float(tmp_path / "f.tif")[..., 0], [[0, 0, 0.25], [1, 1, 0]])
    rgb = np.random.default_rng(8).random((3, 4, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")  # Pillow cannot open this one
    np.testing.assert_array_equal(read_image_float(tmp_path / "rgb.tif"), rgb)
    # The 8-bit reader now reads it too, rounded to 8 bits.
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), np.rint(rgb * 255).astype(np.uint8))


def test_thirty_two_bit_unsigned_tiff_uses_its_full_range(tmp_path):
    a = np.array([[0, 2**31 + 5, 2**32 - 1]], dtype=np.uint32)  # Pillow would read 2**31 + 5 as negative
    tifffile.imwrite(tmp_path / "u32.tif", a)
    x = read_image_float(tmp_path / "u32.tif")[0, :, 0]
    np.testing.assert_allclose(x, a[0] / (2**32 - 1), rtol=1e-7)  # float32: 24 bits kept, 6e-8 relative


def test_min_size_shrinks_sixteen_bit_files_without_going_through_8_bits(tmp_path):
    # Values that differ only in the low byte: an 8-bit detour would flatten them.
    base = 40000 + np.arange(64 * 48, dtype=np.int64).reshape(64, 48) % 200
    a = base.astype(np.uint16)
    expected = a.reshape(16, 4, 12, 4).mean(axis=(1, 3)) / 65535  # 4 x 4 box means
    Image.fromarray(a).save(tmp_path / "g.png")  # Pillow path (I;16 -> I, Image.reduce)
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([a, a, a]), photometric="rgb")  # tifffile path
    for name in ("g.png", "rgb.tif"):
        x, size = read_image_and_size(tmp_path / name, min_size=(16, 12), dtype=np.float32)
        assert size == (64, 48) and x.shape == (16, 12, 3)
        # Image.reduce rounds each mean to an integer (half a 16-bit step); the box sums don't.
        np.testing.assert_allclose(x[..., 0], expected, atol=0.5 * STEP16 + 1e-7)
        # 40000..40199 spans less than one 8-bit step (257): an 8-bit detour leaves <= 2 levels.
        assert len(np.unique(x[..., 0])) > 2


def test_max_side_and_exif_orientation_on_the_tifffile_path(tmp_path):
    a = _u16((6, 10, 3), seed=9)
    tifffile.imwrite(tmp_path / "o.tif", a, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    x, size = read_image_and_size(tmp_path / "o.tif", dtype=np.float32)
    assert size == (10, 6)
    np.testing.assert_array_equal(_as16(x), np.rot90(a, -1))  # orientation 6: rotate 90 clockwise
    small = read_image_float(tmp_path / "o.tif", max_side=5)
    assert max(small.shape[:2]) == 5 and 0 <= small.min() and small.max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pillow(orientation):
    a = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5)
    img = Image.fromarray(a)
    if orientation != 1:
        img = img.transpose(I._transpose_method(orientation))
    np.testing.assert_array_equal(I._orient(a, orientation), np.asarray(img))


@pytest.mark.parametrize("kind", ["png", "tif", "rgbtif", "rgbpng"])
def test_truncated_sixteen_bit_files_raise_image_read_error(tmp_path, kind):
    if kind == "rgbpng":
        pytest.importorskip("cv2")
    a = _u16((40, 30, 3), seed=10)
    path = tmp_path / f"x.{kind[-3:]}"
    if kind == "png":
        Image.fromarray(a[..., 0]).save(path)
    elif kind == "tif":
        tifffile.imwrite(path, a[..., 0])
    elif kind == "rgbtif":
        tifffile.imwrite(path, a, photometric="rgb")
    else:
        _png16(path, a)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="x\\."):
        read_image_float(path)


def test_bad_dtype_is_refused(tmp_path):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "z.png")
    with pytest.raises(InvalidValueError, match="dtype"):
        read_image_and_size(tmp_path / "z.png", dtype=np.float64)


def test_reading_in_threads_leaves_the_warning_filters_as_they_were(tmp_path):
    from visionscale.io.prefetch import ordered_map

    paths = []
    for i in range(24):
        path = tmp_path / f"{i}.tif"
        tifffile.imwrite(path, _u16((16, 16, 3), seed=i), photometric="rgb")
        paths.append(path)
    before = list(warnings.filters)
    for _ in range(3):
        out = list(ordered_map(read_image_float, paths, 4, lookahead=8))
    assert len(out) == 24 and all(x.shape == (16, 16, 3) for x in out)
    assert warnings.filters == before


def test_precision_warning_is_not_swallowed_while_other_threads_read(tmp_path, monkeypatch):
    from visionscale.io.prefetch import ordered_map

    monkeypatch.setattr(I, "_cv2", lambda: None)
    paths = [_png16(tmp_path / f"{i}.png", _u16((8, 8, 3), seed=i)) for i in range(12)]
    with pytest.warns(PrecisionLossWarning) as record:
        list(ordered_map(read_image_float, paths, 4))
    assert len({str(w.message) for w in record if w.category is PrecisionLossWarning}) == 12

"""visionscale.io.images: every file becomes (H, W, 3) uint8 RGB, or a clear error naming it."""

import io

import numpy as np
import pytest
from PIL import Image

from visionscale.io.images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    collect_images,
    list_images,
    read_image,
    read_image_and_size,
)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_rgb_png_round_trip_is_exact_and_writable(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = read_image(_save(Image.fromarray(a), tmp_path / "x.png"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, a)
    assert out.flags.writeable and out.flags.c_contiguous
    out[0, 0, 0] = 1  # a copy, not PIL's read-only buffer


def test_grayscale_and_one_bit_become_three_equal_channels(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_save(Image.fromarray(g, mode="L"), tmp_path / "g.png"))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    out = read_image(_save(bits, tmp_path / "b.png"))
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [255, 0]])


def test_sixteen_bit_grayscale_is_scaled_by_full_range(tmp_path):
    a = np.array([[0, 257 * 10, 65535], [32768, 1000, 65535 // 2]], dtype=np.uint16)
    path = _save(Image.fromarray(a), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really read back as 16-bit, not 8-bit
    out = read_image(path)
    expected = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[0, 1, 0] == 10 and out[0, 2, 0] == 255 and out[1, 0, 0] == 128
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    a = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = read_image(_save(Image.fromarray(a, mode="F"), tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 64]])


def test_rgba_is_composited_over_the_background(tmp_path):
    a = np.zeros((1, 3, 4), dtype=np.uint8)
    a[0, 0] = (10, 20, 30, 255)  # opaque: kept
    a[0, 1] = (200, 0, 0, 0)  # transparent: colour underneath is ignored
    a[0, 2] = (0, 0, 0, 128)  # half black over white
    path = _save(Image.fromarray(a, mode="RGBA"), tmp_path / "a.png")
    out = read_image(path)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])
    black = read_image(path, background=(0, 0, 0))
    assert tuple(black[0, 1]) == (0, 0, 0)
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA")
    out = read_image(_save(la, tmp_path / "la.png"))
    assert tuple(out[0, 0]) == (50, 50, 50) and tuple(out[0, 1]) == (255, 255, 255)


def test_palette_with_transparent_index(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    p.save(path, transparency=1)
    out = read_image(path)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)  # transparent index -> background


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    img = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    out = read_image(_save(img, tmp_path / "c.jpg", quality=95))
    assert out.shape == (6, 8, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_exif_orientation_is_applied(tmp_path):
    # 4 wide x 2 high, left half red, right half blue; orientation 6 = "rotate 90 CW to view".
    a = np.zeros((2, 4, 3), dtype=np.uint8)
    a[:, :2] = (255, 0, 0)
    a[:, 2:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "o.png"
    img.save(path, exif=exif)
    out = read_image(path)
    assert out.shape == (4, 2, 3)  # now portrait
    # Rotating 90 degrees clockwise puts the left (red) half on top.
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 1]) == (0, 0, 255)


def test_truncated_file_names_the_path(tmp_path):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="cut.png") as exc:
        read_image(path)
    assert "truncated" in str(exc.value)
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpg.getvalue()[:300])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(cut)


def test_unreadable_missing_and_folder_paths(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png.*not an image format"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="not found.*nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg"):
        read_image(empty)


def test_list_images_filters_sorts_and_recurses(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.JpEg", "notes.txt", ".hidden.png", "d.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.bmp").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "f.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.tif"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.JpEg", "d.tif", "e.bmp"]
    assert ".png" in IMAGE_SUFFIXES and ".txt" not in IMAGE_SUFFIXES
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "a.jpg")


def test_collect_images_expands_folders_keeps_files_and_names_what_is_missing(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ("a/2.png", "a/1.jpg", "a/sub/3.png", "b.png"):
        Image.fromarray(img).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("x")
    got = collect_images([tmp_path / "b.png", tmp_path / "a"])
    assert [p.name for p in got] == ["b.png", "1.jpg", "2.png"]
    assert [p.name for p in collect_images([tmp_path / "a"], recursive=True)] == ["1.jpg", "2.png", "3.png"]
    with pytest.raises(FileNotFoundError, match="input not found: .*missing.png"):
        collect_images([tmp_path / "b.png", tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images in folder .*empty$"):
        collect_images([tmp_path / "empty"])
    # An MVTec-style test folder (images only in its subfolders): the message points at them.
    (tmp_path / "empty" / "good").mkdir()
    Image.fromarray(img).save(tmp_path / "empty" / "good" / "000.png")
    with pytest.raises(FileNotFoundError, match=r"no images in folder .*empty, but its subfolders hold 1 \(the "
                                                r"first: .*good.000\.png\): give the subfolders instead"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no input images"):
        collect_images([])


def test_min_size_is_a_whole_factor_box_reduction_before_rgb(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = _save(Image.fromarray(a), tmp_path / "big.png")
    # Largest whole factor keeping >= 9 x 9: min(40 // 9, 60 // 9) = 4 -> 10 x 15, PIL's box average.
    out = read_image(path, min_size=(9, 9))
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(a).reduce(4)))
    np.testing.assert_array_equal(read_image(path, min_size=(21, 1)), a)  # 40 // 21 = 1: untouched
    g = a[..., 0]
    out = read_image(_save(Image.fromarray(g, mode="L"), tmp_path / "g.png"), min_size=(9, 9))
    np.testing.assert_array_equal(out[..., 2], np.asarray(Image.fromarray(g, mode="L").reduce(4)))


def test_min_size_on_palette_one_bit_and_sixteen_bit_images(tmp_path):
    p = Image.new("P", (8, 8))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))  # left half index 1 (blue), right half index 0 (red)
    out = read_image(_save(p, tmp_path / "p.png"), min_size=(2, 2))
    # Colours are averaged, never palette indices: 4 x 4 blocks stay pure blue / pure red.
    assert out.shape == (2, 2, 3) and tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (255, 0, 0)
    bits = Image.fromarray(np.kron(np.array([[0, 255]], np.uint8), np.ones((4, 4), np.uint8))).convert("1")
    out = read_image(_save(bits, tmp_path / "b.png"), min_size=(1, 1))
    assert out.shape == (1, 2, 3) and out[0, 0, 0] == 0 and out[0, 1, 0] == 255
    a = np.full((8, 8), 65535, np.uint16)
    a[:, :4] = 0
    out = read_image(_save(Image.fromarray(a), tmp_path / "g16.png"), min_size=(2, 2))
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == 0 and out[0, 1, 0] == 255


def test_min_size_uses_jpeg_draft_and_follows_exif_orientation(tmp_path):
    a = np.zeros((64, 128, 3), dtype=np.uint8)  # 128 wide x 64 high; left half red
    a[:, :64] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 64 wide x 128 high, red on top
    path = _save(Image.fromarray(a), tmp_path / "o.jpg", exif=exif, quality=95)
    out, size = read_image_and_size(path, min_size=(30, 15))  # (h, w) as viewed
    assert size == (128, 64)
    # Viewed 128 x 64 at >= 30 x 15: factor min(128 // 30, 64 // 15) = 4 -> 32 x 16.
    assert out.shape == (32, 16, 3)
    assert out[2, 8, 0] > 200 and out[29, 8, 2] < 60 and out[29, 8, 0] < 60
    full = read_image(path)
    assert full.shape == (128, 64, 3)


def test_max_side_bounds_the_longer_side_and_never_enlarges(tmp_path):
    path = _save(Image.new("RGB", (300, 120), (10, 200, 30)), tmp_path / "w.png")
    out = read_image(path, max_side=100)
    assert out.shape == (40, 100, 3) and tuple(out[20, 50]) == (10, 200, 30)
    assert read_image(path, max_side=1000).shape == (120, 300, 3)
    with pytest.raises(ValueError, match="max_side"):
        read_image(path, max_side=0)

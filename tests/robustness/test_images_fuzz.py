"""visionscale.io.images under arbitrary input: every file gives a correct RGB array or an
ImageReadError naming it, never another exception; pipes and bombs are refused up front."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import corpus
from visionscale.io.images import ImageReadError, read_image, read_image_and_size

# (format, mode) pairs Pillow can write.
WRITABLE = [("PNG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "I;16"),
            ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"),
            ("TIFF", "L"), ("TIFF", "RGB"), ("TIFF", "RGBA"), ("TIFF", "I;16"), ("TIFF", "CMYK")]
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}
CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}


def _encode(fmt: str, mode: str, h: int, w: int, seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        img = Image.frombytes("I;16", (w, h), a.astype("<u2").tobytes())
    else:
        a = rng.integers(0, 256, (h, w, CHANNELS[mode]), dtype=np.uint8)
        img = Image.frombytes(mode, (w, h), a.tobytes())
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue(), a


def _check_array(out: np.ndarray) -> None:
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8  # uint8: 0..255 by type
    assert out.ndim == 3 and out.shape[2] == 3 and min(out.shape[:2]) >= 1
    assert out.flags.c_contiguous


@given(data=st.data(), case=st.sampled_from(WRITABLE), h=st.integers(1, 40), w=st.integers(1, 40),
       seed=st.integers(0, 2**16), truncate=st.booleans())
def test_generated_files_read_correctly_or_fail_naming_the_file(tmp_path_factory, data, case, h, w, seed, truncate):
    fmt, mode = case
    blob, a = _encode(fmt, mode, h, w, seed)
    if truncate:
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="offset")]
    path = tmp_path_factory.mktemp("fuzz") / f"img{SUFFIX[fmt]}"
    path.write_bytes(blob)
    options = data.draw(st.sampled_from(["plain", "min_size", "max_side"]), label="options")
    try:
        if options == "plain":
            out, size = read_image_and_size(path)
        elif options == "min_size":
            ms = (data.draw(st.integers(1, 12), label="min h"), data.draw(st.integers(1, 12), label="min w"))
            out, size = read_image_and_size(path, min_size=ms)
        else:
            side = data.draw(st.integers(1, 30), label="max side")
            out, size = read_image_and_size(path, max_side=side)
    except ImageReadError as exc:
        assert truncate, f"an intact {fmt} {mode} file failed: {exc}"
        assert str(path) in str(exc)
        return
    _check_array(out)
    assert size == (h, w)
    H, W = out.shape[:2]
    if options == "plain":
        assert (H, W) == (h, w)
        if not truncate and fmt != "JPEG":  # lossless: the exact pixels (16-bit scaled to 8)
            if mode == "RGB":
                np.testing.assert_array_equal(out, a)
            elif mode == "L":
                np.testing.assert_array_equal(out, np.repeat(a, 3, axis=2))
            elif mode == "I;16":
                np.testing.assert_array_equal(out[..., 0], np.rint(a / 257.0).astype(np.uint8))
    elif options == "min_size":
        assert min(h, ms[0]) <= H <= h and min(w, ms[1]) <= W <= w
    else:
        assert max(H, W) == min(max(h, w), side) and H <= h and W <= w


# Real signatures, so the bytes after them reach the decoders rather than the format sniffing.
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"GIF89a", b"BM",
         b"RIFF\x00\x00\x00\x00WEBP", b"P6\n", b"P5\n4 4\n255\n"]


@given(head=st.sampled_from(MAGIC), body=st.binary(max_size=600),
       suffix=st.sampled_from([".png", ".jpg", ".tif", ".gif", ".bmp", ".webp", ".ppm", ".pgm"]))
def test_arbitrary_bytes_never_raise_anything_but_image_read_error(tmp_path_factory, head, body, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"x{suffix}"
    path.write_bytes(head + body)
    for kw in ({}, {"min_size": (2, 2)}, {"max_side": 3}):
        try:
            out = read_image(path, **kw)
        except ImageReadError as exc:
            assert str(path) in str(exc)
        else:
            _check_array(out)


def test_fifo_is_refused_before_it_is_opened(tmp_path):
    pipe = corpus.fifo(tmp_path)
    stop = threading.Event()

    def unblock():  # should the check ever be missing, release a blocked reader instead of hanging
        while not stop.is_set():
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.05)

    guard = threading.Timer(5.0, unblock)
    guard.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ImageReadError, match=r"pipe\.png.*not a regular file"):
            read_image(pipe)
        assert time.perf_counter() - t0 < 5.0
    finally:
        stop.set()
        guard.cancel()


def test_decompression_bombs_are_still_refused(tmp_path, monkeypatch):
    path = corpus.good_png(tmp_path, size=64)  # 4096 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x the limit: Pillow's error
    with pytest.raises(ImageReadError, match=r"good\.png.*exceeds limit.*decompression bomb"):
        read_image(path, min_size=(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: only a warning, read
    assert read_image(path).shape == (64, 64, 3)


def test_huge_png_is_decoded_small(tmp_path):
    path = corpus.huge_png(tmp_path, side=4000)
    out, size = read_image_and_size(path, min_size=(64, 64))
    # Shrunk by 4000 // 64 = 62 in PIL: ceil(4000 / 62) = 65 px, not a 4000 px RGB copy.
    assert size == (4000, 4000) and out.shape == (65, 65, 3) and not out.any()
    assert read_image(path, max_side=100).shape == (100, 100, 3)

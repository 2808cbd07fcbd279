"""A corpus of bad and odd inputs, generated on the fly (nothing downloaded, no photos of people).

Each function writes one file into ``folder`` and returns its path. Shared by the robustness
tests of every family.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _rgb(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def good_png(folder: Path, name: str = "good.png", size: int = 32, seed: int = 0) -> Path:
    p = Path(folder) / name
    Image.fromarray(_rgb(size, seed)).save(p)
    return p


def truncated_png(folder: Path, name: str = "truncated.png") -> Path:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64)).save(buf, format="PNG")
    p = Path(folder) / name
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return p


def not_an_image(folder: Path, name: str = "notes.png") -> Path:
    p = Path(folder) / name
    p.write_text("this is text with an image suffix\n")
    return p


def empty_file(folder: Path, name: str = "empty.png") -> Path:
    p = Path(folder) / name
    p.write_bytes(b"")
    return p


def grayscale_png(folder: Path, name: str = "gray.png", size: int = 32) -> Path:
    p = Path(folder) / name
    Image.fromarray(_rgb(size)[..., 0], mode="L").save(p)
    return p


def rgba_png(folder: Path, name: str = "rgba.png", size: int = 32) -> Path:
    a = np.concatenate([_rgb(size), np.full((size, size, 1), 128, np.uint8)], axis=2)
    p = Path(folder) / name
    Image.fromarray(a, mode="RGBA").save(p)
    return p


def gray16_png(folder: Path, name: str = "gray16.png", size: int = 32) -> Path:
    a = (np.arange(size * size, dtype=np.uint32).reshape(size, size) * 61 % 65536).astype(np.uint16)
    p = Path(folder) / name
    Image.fromarray(a).save(p)  # mode I;16
    return p


def cmyk_jpeg(folder: Path, name: str = "cmyk.jpg", size: int = 32) -> Path:
    p = Path(folder) / name
    Image.fromarray(_rgb(size)).convert("CMYK").save(p, format="JPEG")
    return p


def huge_png(folder: Path, name: str = "huge.png", side: int = 12000) -> Path:
    """A small file (a few hundred KB) that decodes to ``side`` x ``side`` pixels of one grey."""
    p = Path(folder) / name
    Image.new("L", (side, side), 0).save(p, optimize=False, compress_level=9)
    return p


def fifo(folder: Path, name: str = "pipe.png") -> Path:
    """A named pipe with an image suffix: reading it would block forever."""
    p = Path(folder) / name
    os.mkfifo(p)
    return p


BAD_IMAGES = {"truncated": truncated_png, "not_an_image": not_an_image, "empty": empty_file}
ODD_IMAGES = {"grayscale": grayscale_png, "rgba": rgba_png, "gray16": gray16_png, "cmyk": cmyk_jpeg}

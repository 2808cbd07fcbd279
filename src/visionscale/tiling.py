"""Tile geometry: where the tiles of a large image go, and how their maps are blended back.

Pure geometry and one accumulator, shared by the study (how many tiles a 12 MP image needs,
so how long it takes) and by anomaly detection (tiled fit, predict and eval). No model code.

Placement along one axis of length ``L`` with tile ``T`` and overlap ``O``: tiles start at
``0, S, 2S, ...`` with stride ``S = T - O`` rounded down to a multiple of ``align`` (the
model's total stride, so every tile's feature grid lines up with the whole image's), and the
last tile ends exactly at ``L`` (it starts at ``L - T``, which overlaps its neighbour by more
than ``O`` when ``L - T`` is not a multiple of ``S``). A tile larger than the image shrinks to
the image.

Blending. A fully convolutional model's output at a pixel depends only on the pixels within
its receptive field; closer than ``margin`` px to a tile edge that lies *inside* the image,
the tile sees zero padding where the whole image has real pixels, so those outputs differ.
Each tile's map is weighted per axis by

    w(d) = 0                                     for d <  margin
    w(d) = min(1, (d - margin + 1) / (ramp + 1))  otherwise,  ramp = O - 2 * margin

where ``d`` is the distance in px to the nearest interior edge (edges on the image border
get no falloff), and the stitched map is ``sum(w * map) / sum(w)``. With ``O >= 2 * margin``
every pixel has a tile with ``w > 0`` and every contributing value lies ``>= margin`` px from
any interior edge, so a model whose outputs are exact beyond ``margin`` gives the whole-image
map exactly; for ``O > 2 * margin`` the extra overlap becomes a linear cross-fade, which
hides the seams of models whose receptive field is larger than the margin (PatchCore's
backbone, DDAD's U-Net).

numpy only (no torch): a deployment bundle (:mod:`visionscale.bundle`) stitches with the same
code as ``ad predict``. Weights and sums are float32, as they were in torch, so the stitched map
is the same bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from visionscale.errors import InvalidValueError

__all__ = ["Tiling", "TileGrid", "parse_tile", "tile_starts", "tile_grid", "tile_count", "axis_weights", "Stitcher",
           "default_overlap"]


def parse_tile(text: str | int | tuple[int, int] | list[int], name: str = "tile") -> tuple[int, int]:
    """``"512"`` or 512 -> (512, 512); ``"640x480"`` (width x height) -> (480, 640); a tuple is (H, W)."""
    if isinstance(text, (tuple, list)):
        vals = list(text)
    elif isinstance(text, int) and not isinstance(text, bool):
        vals = [text, text]
    else:
        parts = str(text).lower().replace(" ", "").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise InvalidValueError(f"{name} must be N or WIDTHxHEIGHT in pixels, got {text!r}").about(name) from None
        vals = vals * 2 if len(vals) == 1 else vals[::-1]  # written W x H, kept as (H, W)
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise InvalidValueError(f"{name} must be N or WIDTHxHEIGHT with positive integers, got {text!r}").about(name)
    return int(vals[0]), int(vals[1])


@dataclass(frozen=True)
class Tiling:
    """How a run tiles its images. Sizes are (H, W) in px of the (optionally pre-resized) image.

    Attributes:
        tile: Model input per tile.
        overlap: Overlap between neighbouring tiles; must be < tile on both axes.
        margin: Outputs this close to an interior tile edge get weight 0 (see module doc).
        align: Tile starts are multiples of this (the model's stride).
        resize: Resize the whole image to this (H, W) before tiling; None: native resolution.
    """

    tile: tuple[int, int]
    overlap: tuple[int, int] = (0, 0)
    margin: int = 0
    align: int = 1
    resize: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for (t, o) in zip(self.tile, self.overlap):
            if t < 1:
                raise InvalidValueError(f"tile must be >= 1 px, got {self.tile}").about("tile")
            if o < 0 or o >= t:
                raise InvalidValueError(f"tile_overlap must be >= 0 and smaller than the tile ({t} px), got {o}"
                                        ).about("tile_overlap")
        if self.margin < 0 or self.align < 1:
            raise InvalidValueError(f"margin must be >= 0 and align >= 1, got {self.margin}, {self.align}")

    def grid(self, height: int, width: int) -> TileGrid:
        return tile_grid(height, width, self.tile, self.overlap, self.align)

    def as_dict(self) -> dict:
        return {"tile": list(self.tile), "overlap": list(self.overlap), "margin": self.margin, "align": self.align,
                "resize": list(self.resize) if self.resize is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> Tiling:
        resize = d.get("resize")
        return cls(tuple(int(v) for v in d["tile"]), tuple(int(v) for v in d.get("overlap", (0, 0))),
                   int(d.get("margin", 0)), int(d.get("align", 1)),
                   tuple(int(v) for v in resize) if resize is not None else None)


def tile_starts(length: int, tile: int, overlap: int = 0, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``[0, length)``; see the module doc."""
    if length < 1:
        raise InvalidValueError(f"image length must be >= 1 px, got {length}")
    tile = min(tile, length)
    if tile == length:
        return [0]
    overlap = min(overlap, tile - 1)
    stride = max(align, (tile - overlap) // align * align)
    if stride > tile:  # align larger than the tile: keep tiles touching
        stride = tile
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one image: ``boxes`` are (y0, x0, y1, x1), row-major."""

    height: int
    width: int
    tile: tuple[int, int]  # after shrinking to the image
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        th, tw = self.tile
        return [(y, x, y + th, x + tw) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def as_dict(self) -> dict:
        """What ``config.json`` records of a fixed grid (per-position banks): sizes as [H, W]."""
        return {"image_size": [self.height, self.width], "tile": list(self.tile), "ys": list(self.ys),
                "xs": list(self.xs), "positions": len(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TileGrid:
        h, w = (int(v) for v in d["image_size"])
        grid = cls(h, w, tuple(int(v) for v in d["tile"]), tuple(int(v) for v in d["ys"]),
                   tuple(int(v) for v in d["xs"]))
        if not grid.ys or not grid.xs or "positions" in d and int(d["positions"]) != len(grid):
            raise ValueError(f"a tile grid needs starts on both axes and positions = len(ys) x len(xs), got {d!r}")
        return grid

    @property
    def shrunk(self) -> bool:
        """The tile was larger than the image on some axis (the image is used whole there)."""
        return self.tile[0] >= self.height or self.tile[1] >= self.width


def tile_grid(height: int, width: int, tile: tuple[int, int], overlap: tuple[int, int] = (0, 0),
              align: int = 1) -> TileGrid:
    ys = tile_starts(height, tile[0], overlap[0], align)
    xs = tile_starts(width, tile[1], overlap[1], align)
    return TileGrid(height, width, (min(tile[0], height), min(tile[1], width)), tuple(ys), tuple(xs))


def tile_count(height: int, width: int, tile: tuple[int, int], overlap: tuple[int, int] = (0, 0),
               align: int = 1) -> int:
    """How many tiles cover a ``height x width`` image."""
    return len(tile_grid(height, width, tile, overlap, align))


def axis_weights(start: int, size: int, length: int, margin: int, overlap: int) -> np.ndarray:
    """(size,) float32 blending weights of a tile at ``start`` on an axis of ``length`` px."""
    i = np.arange(size, dtype=np.float32)
    big = np.float32(length + size)
    d_lo = i if start > 0 else np.full_like(i, big)
    d_hi = (np.float32(size - 1) - i) if start + size < length else np.full_like(i, big)
    d = np.minimum(d_lo, d_hi)
    ramp = max(overlap - 2 * margin, 0)
    w = (d - np.float32(margin) + np.float32(1)) / np.float32(ramp + 1)
    return np.clip(w, np.float32(0), np.float32(1))


class Stitcher:
    """Accumulates tile maps into one ``(H, W)`` float32 map (weighted mean, see module doc)."""

    def __init__(self, height: int, width: int, margin: int = 0, overlap: tuple[int, int] = (0, 0)):
        self.height, self.width = height, width
        self.margin, self.overlap = margin, overlap
        self.sum = np.zeros((height, width), dtype=np.float32)
        self.weight = np.zeros((height, width), dtype=np.float32)

    def add(self, tile_map, box: tuple[int, int, int, int]) -> None:
        """Add one tile's ``(y1 - y0, x1 - x0)`` map (a numpy array, or a CPU tensor)."""
        y0, x0, y1, x1 = box
        wy = axis_weights(y0, y1 - y0, self.height, self.margin, self.overlap[0])
        wx = axis_weights(x0, x1 - x0, self.width, self.margin, self.overlap[1])
        w = wy[:, None] * wx[None, :]
        self.sum[y0:y1, x0:x1] += np.asarray(tile_map, dtype=np.float32) * w
        self.weight[y0:y1, x0:x1] += w

    def result(self) -> np.ndarray:
        """The stitched (H, W) float32 map; refused when some pixel has no trusted tile value."""
        if bool((self.weight <= 0).any()):
            raise InvalidValueError(
                f"tile_overlap {self.overlap} leaves pixels without a trusted tile value: it must be at least "
                f"2 x the model's margin ({2 * self.margin} px)").about("tile_overlap")
        return self.sum / self.weight


def default_overlap(tile: int, margin: int, align: int = 1) -> int:
    """The overlap the code chooses: ``2 * margin`` plus a cross-fade of an eighth of the tile,
    rounded up to ``align``, and below the tile."""
    want = 2 * margin + tile // 8
    want = int(math.ceil(want / align) * align)
    return max(0, min(want, tile - align if tile > align else tile - 1))

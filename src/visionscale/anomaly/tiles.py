"""Tiled anomaly detection: fit on tiles, score a whole image tile by tile, stitch one map.

A run fitted with a :class:`~visionscale.tiling.Tiling` (``ad fit --tile``) never resizes an
image to the model: the image is used at its native resolution (or after the optional
``pre_resize``), cut into ``tile``-sized pieces that overlap by ``overlap`` px, and

* **fitting** treats every tile of every training image as one training image
  (:func:`expand_tiles` turns image samples into :class:`TileSample` s, which every stage of
  every method reads through :func:`read_sample`): PatchCore's memory bank holds the patches
  of all tiles (one bank for all positions: a scratch looks the same wherever it lies, and
  the bank does not need aligned parts; ``tile_bank="per-position"`` instead builds one bank
  per position of one fixed grid, for a fixed camera and aligned parts), EfficientAD and
  DDAD train on tiles;
* **scoring** (:func:`score_images`: calibration, ``ad predict``, ``ad eval``) runs each tile
  through the model, in batches of tiles, and blends the tile maps into one map of the
  image's size with :class:`~visionscale.tiling.Stitcher`: outputs within the model's
  ``tile_margin`` of an interior tile edge get weight 0, the rest of the overlap cross-fades.
  A model with per-position banks (:func:`position_grid`) searches tile j of the grid in
  bank j only, and refuses an image whose grid is not the fitted one (another size, or a
  ``tile_overlap`` that moves the tiles).
  The image score is the maximum of the stitched map for models whose score is their map's
  maximum (EfficientAD, DDAD), and the largest tile score for PatchCore, whose score is its
  own (Eq. 7's reweighting of the most anomalous patch).

Whole-image runs (no tiling) are scored exactly as before: images resized to the model size,
in batches of images. Both paths yield one :class:`ImageScore` per image, so callers
(calibration, predict, eval) write and accumulate per image and never hold all maps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionscale.anomaly.data import (
    SKIP_HINT,
    Batch,
    DataError,
    ReadLog,
    Sample,
    _short_reason,
    image_size_of,
    iter_batches,
    load_mask,
    pair,
    read_for_size,
    to_model_input,
)
from visionscale.errors import InvalidValueError, VisionscaleError, check_int
from visionscale.io.images import ImageReadError, read_image_and_size
from visionscale.io.prefetch import ordered_map
from visionscale.modelinfo import model_info
from visionscale.tiling import Stitcher, TileGrid, Tiling, default_overlap, parse_tile, tile_grid

__all__ = ["TileSample", "ImageScore", "fit_tiling", "tiling_fields", "expand_tiles", "read_sample", "iter_sample_batches", "score_images",
           "make_tiling", "tile_facts", "position_grid",
           "shuffled", "MemoryBudgetError", "image_overhead_bytes", "retile", "plan_batch",
           "choose_fit_tile", "image_scores_from_tiles"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TileSample(Sample):
    """One tile of an image: ``box`` = (y0, x0, y1, x1) in the (pre-resized) image."""

    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    resize: tuple[int, int] | None = None


@dataclass
class ImageScore:
    """One scored image: its score, its map (at the model size, or the image's when tiled)."""

    sample: Sample
    score: float
    amap: np.ndarray | None  # (h, w) float32
    mask: np.ndarray | None  # (h, w) bool, same size as amap, when asked for
    image_size: tuple[int, int]  # (H, W) of the file
    tiles: int = 1


def tile_facts(model: torch.nn.Module) -> tuple[int, int]:
    """(align, margin) the model declares for tiling (:class:`~visionscale.modelinfo.ModelInfo`)."""
    info = model_info(model)
    return info.tile_align, info.tile_margin


def make_tiling(model: torch.nn.Module, tile: str | int | tuple[int, int], overlap: int | tuple[int, int] | None = None,
                pre_resize: tuple[int, int] | None = None) -> Tiling:
    """A :class:`Tiling` for ``model``: its stride as ``align``, its margin, the default overlap
    (``2 * margin`` plus an eighth of the tile, see :func:`visionscale.tiling.default_overlap`)."""
    th, tw = parse_tile(tile)
    align, margin = tile_facts(model)
    if overlap is None:
        ov = (default_overlap(th, margin, align), default_overlap(tw, margin, align))
    else:
        ov = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
        for o, t in zip(ov, (th, tw)):
            check_int("tile_overlap", o, minimum=0)
            if o >= t:
                raise InvalidValueError(f"tile_overlap ({o} px) must be smaller than the tile ({t} px)"
                                        ).about("tile_overlap", "tile")
        if min(ov) < 2 * margin:
            log.warning("tile_overlap %s px is below 2 x the model's margin (%d px): tile borders will show in the "
                        "maps", ov, 2 * margin, extra={"fields": ("tile_overlap",)})
    return Tiling((th, tw), (int(ov[0]), int(ov[1])), margin=margin if min(ov) >= 2 * margin else min(ov) // 2,
                  align=align, resize=pre_resize)


def fit_tiling(model: torch.nn.Module, cfg) -> Tiling | None:
    """The tiling of a fit (:class:`~visionscale.anomaly.config.FitConfig`), for ``model``; None if whole images."""
    if cfg.tile is None:
        return None
    return make_tiling(model, cfg.tile, cfg.tile_overlap, cfg.pre_resize)


def tiling_fields(tiling: Tiling | None) -> dict:
    """What ``config.json`` records of a tiling (nothing for whole-image runs)."""
    return {} if tiling is None else {"tiling": tiling.as_dict()}


def expand_tiles(samples: Sequence[Sample], tiling: Tiling, grid: TileGrid | None = None) -> list[TileSample]:
    """Every tile of every sample, image by image, row-major. Sizes come from the file headers;
    a file whose header cannot be read gives one tile, whose reading then fails by name.
    With ``grid`` (per-position banks: every image has its size) every sample gets its tiles."""
    out: list[TileSample] = []
    for s in samples:
        size = tiling.resize or image_size_of(s.path)
        if grid is not None:
            boxes = grid.boxes
        else:
            boxes = tiling.grid(*size).boxes if size is not None else [(0, 0, *tiling.tile)]
        out.extend(TileSample(s.path, s.label, s.defect, s.mask, box=b, resize=tiling.resize) for b in boxes)
    return out


@functools.lru_cache(maxsize=2)
def _decoded(path: str, resize: tuple[int, int] | None, mtime_ns: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The whole image (tiles of one image are read one after another: decode it once)."""
    arr, size = read_image_and_size(path, dtype=None)  # uint8, or float32 for 16-bit files
    if resize is not None and arr.shape[:2] != tuple(resize):
        arr = _resize(arr, resize)
    return arr, size


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pre_resize`` of a whole image: Pillow bilinear for 8 bits, torch (antialiased) for float."""
    if arr.dtype == np.uint8:
        from PIL import Image

        return np.array(Image.fromarray(arr).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).contiguous().numpy()


def read_sample(s: Sample, size: int | tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """(h, w, 3) pixels of a sample and the file's own (H, W): a tile's crop, or the whole image
    shrunk towards ``size`` (:func:`~visionscale.anomaly.data.read_for_size`)."""
    if not isinstance(s, TileSample):
        return read_for_size(s.path, size)
    p = Path(s.path)
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        mtime = 0  # missing: read_image_and_size names it
    arr, file_size = _decoded(str(p), s.resize, mtime)
    y0, x0, y1, x1 = s.box
    crop = arr[y0:y1, x0:x1]
    if crop.shape[:2] != (y1 - y0, x1 - x0):
        raise ImageReadError(f"cannot read image {p}: it is {arr.shape[1]}x{arr.shape[0]} px, smaller than its "
                             f"tile {x1}x{y1} (did the file change during the fit?)")
    return crop, file_size


def iter_sample_batches(samples: Sequence[Sample], size: int | tuple[int, int], batch_size: int, *,
                        skip_bad: bool = False, log: ReadLog | None = None, workers: int = 0) -> Iterator[Batch]:
    """:func:`~visionscale.anomaly.data.iter_batches` for image or tile samples (training).
    ``workers`` decode whole images in parallel; tiles of one image share one decode."""
    if not any(isinstance(s, TileSample) for s in samples):
        yield from iter_batches(samples, size, batch_size, skip_bad=skip_bad, log=log, workers=workers)
        return
    check_int("batch_size", batch_size, minimum=1)
    hw = pair(size)
    log = log if log is not None else ReadLog()
    bad_paths: set = set()
    imgs: list[Tensor] = []
    kept: list[Sample] = []
    for s in samples:
        if s.path in bad_paths:
            continue
        try:
            arr, file_size = read_sample(s, hw)
        except ImageReadError as exc:
            if not skip_bad:
                raise DataError(f"{exc}; {SKIP_HINT}").about("skip_bad") from None
            bad_paths.add(s.path)
            log.bad.append((s.path, _short_reason(exc)))
            continue
        if isinstance(s, TileSample) and s.box[:2] == (0, 0):
            log.sizes[file_size] += 1
        imgs.append(to_model_input(arr, hw))  # a tile of an image smaller than it is resized up
        kept.append(s)
        if len(kept) == batch_size:
            yield Batch(torch.stack(imgs), kept)
            imgs, kept = [], []
    if kept:
        yield Batch(torch.stack(imgs), kept)


def shuffled(samples: Sequence[Sample], generator: torch.Generator) -> list[Sample]:
    """A seeded random order. Tiles stay grouped by image (images in random order, tiles of
    each in random order), so each image is decoded once per epoch, not once per tile."""
    if not any(isinstance(s, TileSample) for s in samples):
        return [samples[i] for i in torch.randperm(len(samples), generator=generator).tolist()]
    groups: dict = {}
    for s in samples:
        groups.setdefault(s.path, []).append(s)
    keys = list(groups)
    out: list[Sample] = []
    for k in torch.randperm(len(keys), generator=generator).tolist():
        g = groups[keys[k]]
        out.extend(g[i] for i in torch.randperm(len(g), generator=generator).tolist())
    return out


def _attr(model, name: str, default=None):
    """An attribute of the model, or of the model a runner or input wrapper holds."""
    for m in (model, getattr(model, "model", None), getattr(getattr(model, "model", None), "model", None)):
        if m is not None and hasattr(m, name):
            return getattr(m, name)
    return default


def position_grid(model) -> TileGrid | None:
    """The fixed tile grid of a model with per-position memory banks (PatchCore fitted with
    ``tile_bank="per-position"``), whose row-major tiles are its positions; None otherwise."""
    search = _attr(model, "nn_search")
    if search is None or getattr(search, "bank_offsets", None) is None:
        return None
    grid = _attr(model, "tile_grid")
    if grid is None or len(grid) != search.num_positions:
        raise InvalidValueError(
            f"this PatchCore has {search.num_positions} per-position memory banks but "
            f"{'no tile grid' if grid is None else f'a tile grid of {len(grid)} positions'}: set model.tile_grid to "
            f"the grid they were fitted on (load_run does)").about("tile_bank")
    return grid


@contextlib.contextmanager
def _at_positions(model, positions: Sequence[int]) -> Iterator[None]:
    """The next forward passes score inputs at these tile positions (per-position banks)."""
    search = _attr(model, "nn_search")
    search.positions = list(positions)
    try:
        yield
    finally:
        search.positions = None


def _check_grid(s: Sample, grid: TileGrid, fitted: TileGrid, tiling: Tiling) -> None:
    """Refuse an image whose tiles are not the positions the per-position banks were fitted on."""
    h, w = grid.height, grid.width
    if (h, w) != (fitted.height, fitted.width):
        after = " after pre_resize" if tiling.resize is not None else ""
        raise DataError(
            f"{s.path} is {w}x{h} px{after}, but this run's per-position memory banks were fitted on "
            f"{fitted.width}x{fitted.height} px images: each of its {len(fitted)} tile positions has its own bank, "
            f"so every image must have that size; resize the images to {fitted.width}x{fitted.height} px, or fit "
            f"with tile_bank shared (one bank, any size)").about("tile_bank")
    if grid.boxes != fitted.boxes:
        raise InvalidValueError(
            f"tile_overlap {tiling.overlap[1]}x{tiling.overlap[0]} px places the tiles of {w}x{h} px images elsewhere "
            f"than the fit did (x starts {list(fitted.xs)}, y starts {list(fitted.ys)}): this run's per-position "
            f"memory banks belong to the fitted tile positions; score with the run's own tile_overlap"
        ).about("tile_overlap")


def image_scores_from_tiles(model) -> bool:
    """Whether the image score is the largest tile score (PatchCore) rather than the map's maximum."""
    return _attr(model, "tile_score", "map_max") == "tile_max"


@torch.inference_mode()
def score_images(model, samples: Sequence[Sample], device: torch.device, *, image_size: tuple[int, int],
                 tiling: Tiling | None = None, batch_size: int = 8, skip_bad: bool = False,
                 log: ReadLog | None = None, with_masks: bool = False, keep_maps: bool = True,
                 progress: Progress | None = None, stage: str = "scoring",
                 budget_bytes: int | None = None, workers: int = 0) -> Iterator[ImageScore]:
    """Score images one by one (see the module doc); unreadable ones go to ``log.bad`` with ``skip_bad``.

    Args:
        image_size: The model size (whole-image runs resize to it; tiled runs ignore it).
        tiling: The run's tiling, or None for whole images.
        batch_size: Images (whole) or tiles (tiled) per forward pass.
        with_masks: Also yield the ground-truth mask (all False without a mask file) at the
            map's size.
        keep_maps: Yield the maps (False: scores only, cheaper).
        budget_bytes: Tiled: refuse (:class:`MemoryBudgetError`) an image whose own buffers
            (:func:`image_overhead_bytes`) exceed this, before decoding it.
        workers: Threads decoding the next images while the model runs (0: none). Tiled, at
            most ``workers`` decoded images wait at a time, each costing its own buffers.
    """
    check_int("batch_size", batch_size, minimum=1)
    log = log if log is not None else ReadLog()
    total = len(samples)
    done = 0
    fitted_grid = position_grid(model)
    if fitted_grid is not None and tiling is None:
        raise InvalidValueError("this PatchCore has per-position memory banks, which score tiles: give score_images "
                                "the run's tiling").about("tiling")
    if tiling is None:
        for batch in iter_batches(samples, image_size, batch_size, skip_bad=skip_bad, log=log, with_masks=with_masks,
                                  workers=workers):
            res = model(batch.images.to(device))
            scores = res["pred_score"].float().cpu().tolist()
            maps = res["anomaly_map"][:, 0].float().cpu().numpy() if keep_maps else [None] * len(scores)
            masks = batch.masks.numpy() if batch.masks is not None else [None] * len(scores)
            for s, sc, m, k in zip(batch.samples, scores, maps, masks):
                yield ImageScore(s, float(sc), m, k, image_size_of(s.path) or (0, 0))
            done += len(batch.samples)
            if progress is not None:
                progress(stage, done, total)
        return
    by_tile = image_scores_from_tiles(model)
    shrunk_said = False

    def decode(s: Sample):
        size = tiling.resize or image_size_of(s.path)  # from the header: refuse before decoding
        need = image_overhead_bytes(*size, _deep(s.path)) if budget_bytes is not None and size is not None else 0
        if budget_bytes is not None and need > budget_bytes:
            h, w = size
            raise MemoryBudgetError(
                f"{s.path} is {w}x{h} px: holding it and its stitched map takes "
                f"{need / 2**20:,.0f} MiB, more than the memory budget of "
                f"{budget_bytes / 2**20:,.0f} MiB; raise memory_budget or set pre_resize").about("memory_budget",
                                                                                                  "pre_resize")
        arr, file_size = read_image_and_size(s.path, dtype=None)  # uint8, or float32 for 16-bit files
        if tiling.resize is not None and arr.shape[:2] != tuple(tiling.resize):
            arr = _resize(arr, tiling.resize)
        h, w = arr.shape[:2]
        mask = None
        if with_masks:
            mask = load_mask(s.mask, (h, w)).numpy() if s.mask is not None else np.zeros((h, w), dtype=bool)
        return arr, file_size, mask

    for s, got in zip(samples, ordered_map(decode, samples, workers, lookahead=max(1, workers),
                                           return_exceptions=True)):
        if isinstance(got, ImageReadError):
            if not skip_bad:
                raise DataError(f"{got}; {SKIP_HINT}").about("skip_bad") from None
            log.bad.append((s.path, _short_reason(got)))
            done += 1
            continue
        if isinstance(got, Exception):
            raise got
        arr, file_size, mask = got
        h, w = arr.shape[:2]
        log.sizes[file_size] += 1
        grid = tile_grid(h, w, tiling.tile, tiling.overlap, tiling.align)
        if fitted_grid is not None:
            _check_grid(s, grid, fitted_grid, tiling)
        if grid.shrunk and not shrunk_said:
            log_note(f"{s.path} is {w}x{h} px, not larger than the tile ({tiling.tile[1]}x{tiling.tile[0]}): "
                     f"such images are used whole on that side")
            shrunk_said = True
        stitch = Stitcher(h, w, tiling.margin, tiling.overlap)
        tile_best = -float("inf")
        boxes = grid.boxes
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            # Normalised tile by tile: no float copy of the whole image.
            tiles = torch.stack([to_model_input(arr[y0:y1, x0:x1], (y1 - y0, x1 - x0))
                                 for y0, x0, y1, x1 in chunk]).to(device)
            if fitted_grid is None:
                res = model(tiles)
            else:  # tile j of the grid is position j: each is searched in its own bank
                with _at_positions(model, range(i, i + len(chunk))):
                    res = model(tiles)
            tmaps = res["anomaly_map"][:, 0].float().cpu().numpy()
            for tmap, box in zip(tmaps, chunk):
                stitch.add(tmap, box)
            tile_best = max(tile_best, float(res["pred_score"].float().max()))
        del arr
        amap = stitch.result()
        score = tile_best if by_tile else float(amap.max())
        yield ImageScore(s, score, amap if keep_maps else None, mask, file_size, len(boxes))
        done += 1
        if progress is not None:
            progress(stage, done, total)


class MemoryBudgetError(VisionscaleError, ValueError):
    """An image, or the smallest useful tile, does not fit the memory budget."""


# Bytes per pixel a tiled image holds while scored: the decoded RGB (3 x uint8, or 3 x float32
# for files of more than 8 bits per sample), the stitcher's weighted sum and weight (2 x
# float32) and the stitched map (float32).
IMAGE_BYTES_PER_PIXEL = 3 + 2 * 4 + 4
DEEP_IMAGE_BYTES_PER_PIXEL = 12 + 2 * 4 + 4


def image_overhead_bytes(height: int, width: int, deep: bool = False) -> int:
    """Bytes a ``height x width`` image costs outside the model when scored tile by tile
    (``deep``: a 16-bit or float file, decoded to float32 to keep its precision)."""
    return height * width * (DEEP_IMAGE_BYTES_PER_PIXEL if deep else IMAGE_BYTES_PER_PIXEL)


def _deep(path) -> bool:
    """Whether the file stores more than 8 bits per sample (from its header)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode.startswith(("I", "F")) or "16" in img.mode
    except Exception:  # noqa: BLE001 - unreadable: the decode names the file
        return False


def retile(model, tiling: Tiling, overlap: int) -> Tiling:
    """The run's tiling with another overlap (the model and its tile stay)."""
    t = make_tiling(_attr(model, "model", model) if not hasattr(model, "model_info") else model, tiling.tile, overlap,
                    tiling.resize)
    return Tiling(tiling.tile, t.overlap, t.margin, tiling.align, tiling.resize)


def _meta_copy(model) -> torch.nn.Module:
    """The model (or the one a runner holds) for the analytic memory pass."""
    inner = model
    while not isinstance(inner, torch.nn.Module) and hasattr(inner, "model"):
        inner = inner.model
    return inner


def plan_batch(model, tile: tuple[int, int], budget_bytes: int, batch_size: int,
               image_size: tuple[int, int] | None = None) -> int:
    """The largest batch of ``tile``-sized inputs (at most ``batch_size``) whose analytic memory
    (:func:`visionscale.study.tiles.plan_tiles`, with its safety margin) fits ``budget_bytes``
    next to one image's own buffers (:func:`image_overhead_bytes` of ``image_size``).

    Raises:
        BudgetTooSmallError: Not even one tile fits; the message names the minimum budget.
    """
    from visionscale.study.tiles import plan_tiles

    overhead = image_overhead_bytes(*image_size) if image_size is not None else 0
    plan = plan_tiles(_meta_copy(model), budget_bytes, tile=tuple(tile), batch=None, max_batch=batch_size,
                      overhead_bytes=overhead)
    return plan.batch


def choose_fit_tile(cfg, largest_image: tuple[int, int] | None):
    """A :class:`~visionscale.anomaly.config.FitConfig` with ``tile`` chosen from ``memory_budget``:
    the largest square tile whose forward pass of ``batch_size`` tiles fits (the study's
    analytic memory with its safety margin), for the model being fitted."""
    import dataclasses

    from visionscale import registry
    from visionscale.study.tiles import plan_tiles

    def model_at(side):
        hw = side if isinstance(side, tuple) else (side, side)
        with torch.device("meta"):
            return registry.create(cfg.model, image_size=hw) if cfg.method != "efficientad" else registry.create(
                cfg.model)

    overhead = image_overhead_bytes(*largest_image) if largest_image is not None else 0
    plan = plan_tiles(model_at, cfg.memory_budget, batch=cfg.batch_size or 1, overhead_bytes=overhead,
                      image_size=largest_image, min_tile=_min_tile(model_at), name=cfg.model)
    log.info("memory budget %.2f GiB: tile %dx%d px, %d per forward pass (analytic need %.0f MiB)",
             cfg.memory_budget / 2**30, plan.tile[1], plan.tile[0], plan.batch, plan.need_bytes / 2**20)
    return dataclasses.replace(cfg, tile=tuple(plan.tile))


def _min_tile(model_at) -> int:
    """Smallest tile side the model accepts (its own validation), at least 64 px."""
    m = model_at(64)
    for side in range(64, 1025, 32):
        try:
            m.validate_input_size(side, side) if hasattr(m, "validate_input_size") else None
            return side
        except ValueError:
            continue
    return 1024


def log_note(message: str) -> None:
    log.info(message)


def upsample_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map at the model size brought to ``size`` (bilinear), for outputs in image pixels."""
    if amap.shape == tuple(size):
        return amap
    t = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()

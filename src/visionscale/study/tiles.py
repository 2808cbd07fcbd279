"""Tiled inference under a memory budget: which tile and batch fit, and how many tiles an image needs.

The planner answers "this device has B bytes for the model: how large may each tile be, and how
many tiles may run at once?" with the study's analytic pass (shapes on the ``meta`` device,
:mod:`visionscale.study.memory`): nothing is allocated, so a 4096 px tile costs a fraction of a
second to evaluate, on any machine. Tile geometry (placement, overlap, stitching) is
:mod:`visionscale.tiling`'s.

API
---
``tile_need_bytes(model, tile, batch=1, dtype=torch.float32) -> int``
    Analytic peak bytes of one forward of ``batch`` tiles of ``tile = (H, W)`` px: parameters and
    buffers once, plus the worst component's inputs and live activations (the study's
    ``total_peak_bytes``).
``plan_tiles(model, budget_bytes, *, tile=None, batch=None, ...) -> TilePlan``
    The largest square tile that fits the budget at batch 1, then the largest batch at that tile.
``parse_budget("2GiB") -> int``
    A budget as text (``"2GiB"``, ``"512MiB"``, ``"4GB"``) in bytes.
``BudgetTooSmallError``
    Not even the smallest useful tile fits; the message and ``min_budget_bytes`` give the budget
    that would.
``square_tiles(side, tile_limit, margin=0, align=1) -> (tile, overlap, count)``
    The study's tiling of a square image with tiles of at most ``tile_limit`` px.

``model`` is an ``nn.Module`` (copied to ``meta`` once; the module itself is not touched, and its
buffers, a PatchCore memory bank, are not duplicated in host memory) or a callable that builds the
model for a tile size on ``meta``: called as ``model(side)`` for a square tile and ``model((H, W))``
otherwise, inside ``with torch.device("meta")``.

The budget
----------
``budget_bytes`` is what the model's tensors may occupy on the device (on a GPU: what
``torch.cuda.max_memory_allocated`` would report). A plan fits when::

    need_bytes <= usable_bytes = floor(budget_bytes * (1 - safety)) - overhead_bytes

``overhead_bytes`` is the caller's memory outside the model's forward: the decoded image, the
stitched map, and, when the budget is a GPU's whole memory, the CUDA context (about 512 MiB,
:data:`visionscale.study.gpus.CUDA_CONTEXT_BYTES`).

``safety`` (default 0.25, :data:`SAFETY`) is the fraction of the budget kept free for what the
analytic pass cannot see: the caching allocator's rounding and fragmentation, and library
workspaces. Measured on an H100 (docs/scale.md), cuDNN's convolution workspace added 22-35 % to
the analytic activation peak of EfficientAD's PDNs and 9 % to DDAD's Wide-ResNet; a quarter of the
budget covers the worst of these with room for fragmentation. Lower it only after checking
``torch.cuda.max_memory_reserved`` on your model.

The search
----------
Tile sides are multiples of ``step`` (default: the least common multiple of the model's
``ModelInfo.tile_align`` and 32, so tiles line up with the model's stride and suit models that
need multiples of 32) from ``min_tile`` to ``max_tile``. ``min_tile`` is raised, if need be, to
the smallest side whose default overlap covers twice the model's ``tile_margin`` (below it
stitching has no trusted pixels), then to the smallest side the model accepts (EfficientAD's
autoencoder needs 256 px); that side is the *smallest useful tile*. Memory grows with the side,
so the largest side that fits is found by bisection (about ten analytic passes). With ``image_size`` no side beyond the image is tried, and each
candidate is evaluated at the tile that really runs, ``(min(side, H), min(side, W))``; sizes the
model rejects (``validate_input_size``) count as not fitting.

The tile comes first: the largest tile at batch 1, then the largest batch (up to ``max_batch``)
that still fits at that tile. Larger tiles mean fewer tile borders, where the model sees zero
padding instead of image, and less overlap computed twice (``2 * margin + tile / 8`` per border,
see :func:`visionscale.tiling.default_overlap`); a larger batch only buys throughput, and only
on a device with parallelism to spare.

>>> plan = plan_tiles(model, parse_budget("2GiB"), image_size=(3000, 4000))
>>> plan.tile, plan.batch, plan.tiling().grid(3000, 4000)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from visionscale.errors import InvalidValueError, VisionscaleError, check_finite, check_int
from visionscale.modelinfo import input_size_problem, model_info
from visionscale.study.gpus import MiB, parse_size
from visionscale.study.memory import peak_bytes, to_meta
from visionscale.tiling import Tiling, default_overlap, parse_tile, tile_count

__all__ = ["BudgetTooSmallError", "TilePlan", "tile_need_bytes", "plan_tiles", "parse_budget", "square_tiles",
           "default_tiling", "SAFETY", "MIN_TILE", "MAX_TILE", "MAX_BATCH"]

ModelAt = nn.Module | Callable[[int | tuple[int, int]], nn.Module]

SAFETY = 0.25  # fraction of the budget kept free (see the module doc for why a quarter)
MIN_TILE = 64  # smaller tiles are mostly border: overlap and the model's margin dominate
MAX_TILE = 8192  # a 67 MP tile: past this the question is no longer how to tile
MAX_BATCH = 16
STEP_MULTIPLE = 32  # tile sides are multiples of lcm(tile_align, 32)


class BudgetTooSmallError(VisionscaleError, ValueError):
    """Not even the smallest useful tile fits the memory budget.

    Attributes:
        min_budget_bytes: The smallest budget with which that tile would fit (safety and
            overhead included).
    """

    def __init__(self, message: str, min_budget_bytes: int):
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes


@dataclass(frozen=True)
class TilePlan:
    """What :func:`plan_tiles` chose.

    Attributes:
        tile: ``(H, W)`` px of each tile as it runs: a square side, shrunk to the image on an axis
            where the image is smaller.
        batch: The most tiles per forward that fit; a caller with fewer tiles runs fewer.
        need_bytes: Analytic peak of one forward of ``batch`` tiles of ``tile``.
        budget_bytes: The budget as given.
        usable_bytes: ``floor(budget * (1 - safety)) - overhead``: what ``need_bytes`` is held to.
        overhead_bytes: The caller's bytes outside the model, as given.
        safety: Fraction of the budget kept free, as given.
        align: The model's ``tile_align``: tile starts are multiples of it.
        margin: The model's ``tile_margin``: outputs this close to an inner tile edge get weight 0.
    """

    tile: tuple[int, int]
    batch: int
    need_bytes: int
    budget_bytes: int
    usable_bytes: int
    overhead_bytes: int
    safety: float
    align: int = 1
    margin: int = 0

    def tiling(self, overlap: tuple[int, int] | None = None, resize: tuple[int, int] | None = None) -> Tiling:
        """The :class:`~visionscale.tiling.Tiling` of this plan; ``overlap`` defaults to
        :func:`~visionscale.tiling.default_overlap` on each axis."""
        if overlap is None:
            return default_tiling(self.tile, self.margin, self.align, resize)
        return Tiling(self.tile, tuple(overlap), self.margin, self.align, resize)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile)
        return d


def default_tiling(tile: tuple[int, int], margin: int = 0, align: int = 1,
                   resize: tuple[int, int] | None = None) -> Tiling:
    """A :class:`~visionscale.tiling.Tiling` with the code's default overlap on each axis:
    ``2 * margin + tile / 8`` rounded up to ``align`` (:func:`~visionscale.tiling.default_overlap`)."""
    overlap = (default_overlap(tile[0], margin, align), default_overlap(tile[1], margin, align))
    return Tiling(tuple(tile), overlap, margin, align, resize)


def square_tiles(side: int, tile_limit: int, margin: int = 0, align: int = 1) -> tuple[int, int, int]:
    """``(tile, overlap, count)`` for a ``side x side`` image and square tiles of at most ``tile_limit`` px.

    A whole image that fits is one tile with no overlap. Otherwise the tile is ``tile_limit``,
    the overlap :func:`~visionscale.tiling.default_overlap`, and the count
    :func:`~visionscale.tiling.tile_count` (tile starts on multiples of ``align``, the last tile
    flush with the border).
    """
    check_int("side", side, minimum=1)
    check_int("tile_limit", tile_limit, minimum=1)
    if tile_limit >= side:
        return side, 0, 1
    overlap = default_overlap(tile_limit, margin, align)
    return tile_limit, overlap, tile_count(side, side, (tile_limit, tile_limit), (overlap, overlap), align)


def parse_budget(text: str | int) -> int:
    """A memory budget in bytes: ``"2GiB"``, ``"512MiB"``, ``"4GB"`` (powers of 1000 without
    the ``i``), or a number of bytes. Raises :class:`InvalidValueError` about ``memory_budget``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        try:
            value = parse_size(str(text))
        except ValueError:
            raise InvalidValueError(f"memory_budget must be a size such as 2GiB, 512MiB or 4GB, got {text!r}"
                                    ).about("memory_budget") from None
    if value <= 0:
        raise InvalidValueError(f"memory_budget must be more than 0 bytes, got {text!r}").about("memory_budget")
    return value


class _MetaModel:
    """The model on ``meta`` at a tile size: one copy of a module, or the callable's model per size."""

    def __init__(self, model: ModelAt, dtype: torch.dtype):
        self.dtype = dtype
        self.fixed: nn.Module | None = None
        self.build: Callable | None = None
        if isinstance(model, nn.Module):
            self.fixed = to_meta(model, dtype)
            self.name = type(model).__name__
        elif callable(model):
            self.build = model
            self.name = getattr(model, "__name__", type(model).__name__)
        else:
            raise InvalidValueError(f"model must be an nn.Module or a callable returning one, got "
                                    f"{type(model).__name__}").about("model")
        self.built: dict[tuple[int, int], nn.Module] = {}

    def at(self, tile: tuple[int, int]) -> nn.Module:
        if self.fixed is not None:
            return self.fixed
        if tile not in self.built:
            h, w = tile
            try:
                with torch.device("meta"):
                    m = self.build(h if h == w else (h, w))
            except ValueError as exc:  # a factory that refuses the size itself
                raise InvalidValueError(f"{self.name} cannot be built for a {h}x{w} tile: {exc}").about("tile") from exc
            if not isinstance(m, nn.Module):
                raise InvalidValueError(f"model({h if h == w else (h, w)}) returned {type(m).__name__}, "
                                        "not an nn.Module").about("model")
            # Only the last one is kept (a factory's model may grow with the size: PatchCore's bank).
            self.built = {tile: m.to(device="meta", dtype=self.dtype).eval()}
        return self.built[tile]

    def problem(self, tile: tuple[int, int]) -> str | None:
        """Why the model cannot run on ``tile`` (its ``validate_input_size``, or a factory that
        refuses the size), or None; no forward pass."""
        try:
            return input_size_problem(self.at(tile), *tile)
        except InvalidValueError as exc:
            return str(exc)

    def need(self, tile: tuple[int, int], batch: int) -> int:
        model = self.at(tile)
        problem = input_size_problem(model, *tile)
        if problem is not None:
            raise InvalidValueError(f"{self.name} cannot run on a {tile[0]}x{tile[1]} tile: {problem}").about("tile")
        x = torch.empty(batch, model_info(model).channels, *tile, device="meta", dtype=self.dtype)
        return peak_bytes(model, x)


def tile_need_bytes(model: ModelAt, tile: int | tuple[int, int], batch: int = 1,
                    dtype: torch.dtype = torch.float32) -> int:
    """Analytic peak bytes of one forward of ``batch`` tiles of ``tile`` (``(H, W)`` or a side) px.

    Parameters and buffers count once, plus the worst component's inputs and live activations
    (:func:`visionscale.study.memory.peak_bytes`), with parameters, buffers and activations in
    ``dtype``. Input channels come from the model's :class:`~visionscale.modelinfo.ModelInfo`.

    Raises:
        InvalidValueError: About ``tile`` when the model rejects that size, or about ``batch``.
    """
    tile = parse_tile(tile, "tile")
    check_int("batch", batch, minimum=1)
    return _MetaModel(model, dtype).need(tile, batch)


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest ``k`` in ``[lo, hi]`` with ``fits(k)``, given ``fits(lo)`` and that ``fits`` is
    true up to some ``k`` and false above it."""
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _first_built(meta: _MetaModel, min_tile: int, max_tile: int) -> nn.Module:
    """A factory's model at the smallest size it builds (min_tile, doubling up to max_tile): the
    one whose ModelInfo (stride, margin) the plan uses."""
    side = min_tile
    while True:
        try:
            return meta.at((side, side))
        except InvalidValueError:
            if side * 2 > max(max_tile, min_tile):
                raise
            side *= 2


def _mib_up(b: int) -> str:
    """MiB rounded *up* at the printed precision, so a stated minimum is really enough."""
    digits = 1 if b < 100 * MiB else 0
    scale = 10**digits
    return f"{math.ceil(b / MiB * scale) / scale:,.{digits}f}"


def _mib(b: int) -> str:
    return f"{b / MiB:,.1f}" if b < 100 * MiB else f"{b / MiB:,.0f}"


def _size(b: int) -> str:
    return f"{b:,} bytes" if b < 100 * 1024 else f"{_mib(b)} MiB"


def plan_tiles(
    model: ModelAt,
    budget_bytes: int,
    *,
    tile: int | tuple[int, int] | None = None,
    batch: int | None = None,
    min_tile: int = MIN_TILE,
    max_tile: int = MAX_TILE,
    step: int | None = None,
    max_batch: int = MAX_BATCH,
    safety: float = SAFETY,
    overhead_bytes: int = 0,
    image_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> TilePlan:
    """The largest tile, then the largest batch, whose analytic peak fits ``budget_bytes``.

    See the module doc for the budget, the safety fraction and the search.

    Args:
        model: An ``nn.Module`` or a callable building it for a tile size (module doc).
        budget_bytes: Bytes the model's tensors may occupy on the device.
        tile: A fixed tile (side or ``(H, W)``); None chooses the largest square side.
        batch: A fixed batch; None chooses the largest ``<= max_batch`` at the chosen tile.
        min_tile: Smallest side worth trying (rounded up to ``step``).
        max_tile: Largest side tried (rounded down to ``step``).
        step: Tile sides are multiples of this; None: ``lcm(tile_align, 32)``.
        max_batch: Largest batch tried when ``batch`` is None.
        safety: Fraction of the budget kept free, in ``[0, 1)``.
        overhead_bytes: The caller's bytes outside the model's forward.
        image_size: ``(H, W)`` of the images: no side beyond the image is tried, and tiles are
            evaluated as they run on it.
        dtype: Dtype of parameters and activations.
        name: The model's name in messages (default: its class or function name).

    Raises:
        BudgetTooSmallError: About ``memory_budget``: the smallest useful tile (or the given
            ``tile``) does not fit at batch 1 (or the given ``batch``).
        InvalidValueError: About the argument that is out of range, or ``min_tile`` when the
            model rejects the smallest tile.
    """
    check_int("memory_budget", budget_bytes, minimum=1)
    check_int("min_tile", min_tile, minimum=1)
    check_int("max_tile", max_tile, minimum=1)
    check_int("max_batch", max_batch, minimum=1)
    check_int("overhead_bytes", overhead_bytes, minimum=0)
    safety = check_finite("safety", safety, minimum=0.0, maximum=1.0, max_inclusive=False)
    if batch is not None:
        check_int("batch", batch, minimum=1)
    if image_size is not None:
        image_size = parse_tile(tuple(image_size), "image_size")
    fixed_tile = parse_tile(tile, "tile") if tile is not None else None

    meta = _MetaModel(model, dtype)
    label = name or meta.name
    info = model_info(meta.fixed if meta.fixed is not None else _first_built(meta, min_tile, max_tile))
    align, margin = info.tile_align, info.tile_margin
    if step is None:
        step = math.lcm(align, STEP_MULTIPLE)
    check_int("step", step, minimum=1)
    usable = int(budget_bytes * (1.0 - safety)) - overhead_bytes

    def effective(side_or_tile: int | tuple[int, int]) -> tuple[int, int]:
        h, w = (side_or_tile, side_or_tile) if isinstance(side_or_tile, int) else side_or_tile
        if image_size is not None:
            h, w = min(h, image_size[0]), min(w, image_size[1])
        return h, w

    needs: dict[tuple[tuple[int, int], int], int | None] = {}

    def need(t: tuple[int, int], b: int) -> int | None:
        if (t, b) not in needs:
            try:
                needs[(t, b)] = meta.need(t, b)
            except InvalidValueError:
                needs[(t, b)] = None  # a size the model rejects does not fit
        return needs[(t, b)]

    def fits(t: tuple[int, int], b: int) -> bool:
        n = need(t, b)
        return n is not None and n <= usable

    def minimum_budget(n: int) -> int:
        # Smallest budget with int(budget * (1 - safety)) - overhead >= n (float-safe).
        if safety >= 1.0:
            return 0
        b = math.ceil((n + overhead_bytes) / (1.0 - safety))
        while int(b * (1.0 - safety)) - overhead_bytes < n:
            b += 1
        return b

    def too_small(t: tuple[int, int], b: int, what: str, smallest: tuple[int, int] | None = None) -> BudgetTooSmallError:
        n = need(t, b)
        low = minimum_budget(n)
        extra = f" and {_size(overhead_bytes)} of overhead" if overhead_bytes else ""
        at_batch = f" at batch {b}" if b > 1 else ""
        msg = (f"a memory budget of {_mib(budget_bytes)} MiB is too small for {label} ({str(dtype).replace('torch.', '')})"
               f": {what} ({t[0]}x{t[1]}){at_batch} needs at least {_mib_up(low)} MiB "
               f"(incl. {safety * 100:g}% safety{extra})")
        if smallest is not None and smallest != t and need(smallest, 1) is not None:
            msg += f"; the smallest useful tile ({smallest[0]}x{smallest[1]}) needs {_mib_up(minimum_budget(need(smallest, 1)))} MiB"
        return BudgetTooSmallError(msg, low).about("memory_budget")

    # The sides worth trying: multiples of step from the smallest useful one to max_tile or the image.
    k_lo = max(1, -(-min_tile // step))
    while default_overlap(k_lo * step, margin, align) < 2 * margin:
        k_lo += 1  # the overlap cannot cover both margins: stitching would have no trusted pixels
    k_hi = max_tile // step
    if image_size is not None:
        k_hi = min(k_hi, -(-max(image_size) // step))
    k_hi = max(k_hi, k_lo) if image_size is not None else k_hi
    if k_hi < k_lo:
        raise InvalidValueError(f"max_tile ({max_tile} px) is below the smallest useful tile ({k_lo * step} px, "
                                f"a multiple of the step {step} px)").about("max_tile")
    # A model with a minimum size (EfficientAD's autoencoder needs 256 px) starts where it runs:
    # the sizes are only validated here, no pass is made.
    while k_lo < k_hi and meta.problem(effective(k_lo * step)) is not None:
        k_lo += 1
    smallest = effective(k_lo * step)

    if fixed_tile is not None:
        chosen = effective(fixed_tile)
        if need(chosen, 1) is None:
            meta.need(chosen, 1)  # raises the model's reason, about tile
        if not fits(chosen, batch or 1):
            raise too_small(chosen, batch or 1, "a tile", smallest)
    else:
        if need(smallest, batch or 1) is None:
            try:
                meta.need(smallest, batch or 1)
            except InvalidValueError as exc:
                raise InvalidValueError(f"{exc}; no tile side from min_tile to max_tile in multiples of step "
                                        f"({step} px) suits it").about("min_tile", "step") from None
        if not fits(smallest, batch or 1):
            raise too_small(smallest, batch or 1, "the smallest useful tile")
        k = _largest(lambda k: fits(effective(k * step), batch or 1), k_lo, k_hi)
        chosen = effective(k * step)
    if batch is None:
        batch = _largest(lambda b: fits(chosen, b), 1, max_batch)
    return TilePlan(tile=chosen, batch=batch, need_bytes=int(need(chosen, batch)), budget_bytes=budget_bytes,
                    usable_bytes=usable, overhead_bytes=overhead_bytes, safety=safety, align=align, margin=margin)

"""What ``ad fit`` fits: the model names per method, :class:`FitConfig`, and the result and error types.

Shared by every method's fitting (:mod:`~visionscale.anomaly.patchcore_fit`,
:mod:`~visionscale.anomaly.efficientad_fit`, :mod:`~visionscale.anomaly.ddad_fit`) and by
loading a fitted run (:mod:`~visionscale.anomaly.runs`); imports no fitting code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from visionscale.anomaly.coreset import DEFAULT_PROJECTION_DIM, DEFAULT_STARTING_POINTS
from visionscale.anomaly.data import pair
from visionscale.errors import VisionscaleError, check_finite, check_int
from visionscale.tiling import parse_tile

__all__ = ["TILE_BANKS", "PATCHCORE_MODELS", "EFFICIENTAD_MODELS", "DDAD_MODELS", "FIT_MODELS", "method_of",
           "FitConfig",
           "FitError", "FitResult", "Progress", "Log"]

PATCHCORE_MODELS = ("patchcore", "patchcore_wrn50", "patchcore_tiny")
EFFICIENTAD_MODELS = ("efficientad_s", "efficientad_m", "efficientad_tiny")
DDAD_MODELS = ("ddad", "ddad_tiny")
FIT_MODELS = PATCHCORE_MODELS + EFFICIENTAD_MODELS + DDAD_MODELS
RANDOM_WEIGHTS_WARNING = (
    "running on RANDOM backbone weights: set weights to a file (an ImageNet state dict of the backbone, "
    ".pth or .safetensors) or to DEFAULT (downloads torchvision's) for meaningful anomaly scores"
)
RANDOM_TEACHER_WARNING = (
    "running on a RANDOM EfficientAD teacher: set teacher to a file (a pretrained PDN state dict, .pth or "
    ".safetensors, e.g. teacher_small.pth), or distill_teacher with imagenet set to a folder of generic "
    "images (distils one from Wide-ResNet-101-2 features), for meaningful anomaly scores"
)

# PatchCore's memory banks of a tiled fit: one over all tiles, or one per tile position.
TILE_BANKS = ("shared", "per-position")

MAX_IMAGE_SIDE = 16384  # px: a larger model input is a typo, not a plan

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class FitError(VisionscaleError, RuntimeError):
    """Fitting cannot go on; the message says what to change."""


def method_of(model: str) -> str:
    """``"patchcore"``, ``"efficientad"`` or ``"ddad"`` for a fittable model name.

    Raises:
        FitError: Not a model ``ad fit`` can train.
    """
    for method, names in (("patchcore", PATCHCORE_MODELS), ("efficientad", EFFICIENTAD_MODELS),
                          ("ddad", DDAD_MODELS)):
        if model in names:
            return method
    raise FitError(f"unknown model {model!r}; choose one of {', '.join(FIT_MODELS)}")


@dataclass(frozen=True)
class FitConfig:
    """What to fit. Fields that decide the result (:meth:`identity`) must match to resume.

    Attributes:
        model: PatchCore (``patchcore`` = WRN-101-2, ``patchcore_wrn50``, ``patchcore_tiny``),
            EfficientAD (``efficientad_s``, ``efficientad_m``, ``efficientad_tiny``) or DDAD
            (``ddad``, ``ddad_tiny``).
        image_size: (H, W) every image is resized to.
        coreset_ratio: PatchCore: share of patch features kept in the memory bank.
        batch_size: Images per step. None: PatchCore 8 (forward passes), EfficientAD 1 (the
            paper's training batch), DDAD the trainer's default.
        weights: Backbone weights (PatchCore, DDAD; EfficientAD: the WRN-101-2 distilled from
            with ``distill_teacher``): None (random), ``"DEFAULT"`` or a file path.
        seed: Seeds random weights, projections, data order, augmentation and hold-outs.
        projection_dim: PatchCore: JL dimension of the coreset search (official: 128).
        num_starting_points: PatchCore: random starts of the approximate greedy (10).
        threshold_margin: Margin of the no-labels threshold (see :mod:`visionscale.anomaly.calibration`).
        holdout_fraction: Training images held out: PatchCore / DDAD for the unlabelled
            threshold (10 or more images only); EfficientAD always, for the map
            normalisation (paper: the validation part of the training images).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        skip_bad: Leave unreadable images out (and list them) instead of stopping.
        steps: EfficientAD / DDAD training steps (None: 70,000 / the DDAD trainer's default).
        teacher: EfficientAD: pretrained teacher PDN weights file.
        distill_teacher: EfficientAD: distil the teacher from WRN-101-2 on ``imagenet`` images.
        imagenet: EfficientAD: folder of generic images for the penalty (and distillation).
        distill_steps: EfficientAD teacher distillation steps (paper: 60,000).
        allow_random_weights: Distillation may use a random WRN when pretrained weights
            cannot be had (offline); a loud warning says so.
        checkpoint_every: EfficientAD / DDAD: steps between checkpoints.
        tile: (H, W) of the tiles a tiled fit cuts every image into (the model input, so it
            replaces ``image_size``); None: whole images resized to ``image_size``. See
            :mod:`visionscale.anomaly.tiles`.
        tile_overlap: px shared by neighbouring tiles; None: the model's default (twice its
            tile margin plus an eighth of the tile).
        pre_resize: (H, W) every image is resized to before tiling; None: native resolution.
        memory_budget: Bytes one forward pass may use; with ``tile`` None it picks the
            largest tile that fits (the study's analytic memory, see
            :func:`visionscale.study.tiles.plan_tiles`), and the batch of tiles.
        workers: Threads decoding images in parallel (0: in the main thread).
        tile_bank: PatchCore with tiles: ``"shared"`` (one memory bank over the patches of
            all tiles, wherever they lie) or ``"per-position"`` (one bank per tile position of
            a fixed grid, for a fixed camera and aligned parts; every image must have the same
            size). See :data:`TILE_BANKS`.
    """

    model: str = "patchcore"
    image_size: tuple[int, int] = (256, 256)
    coreset_ratio: float = 0.1
    batch_size: int | None = None
    weights: str | None = None
    seed: int = 0
    projection_dim: int = DEFAULT_PROJECTION_DIM
    num_starting_points: int = DEFAULT_STARTING_POINTS
    threshold_margin: float = 0.1
    holdout_fraction: float = 0.1
    device: str = "auto"
    skip_bad: bool = False
    steps: int | None = None
    teacher: str | None = None
    distill_teacher: bool = False
    imagenet: str | None = None
    distill_steps: int = 60_000
    allow_random_weights: bool = False
    checkpoint_every: int = 1000
    tile: tuple[int, int] | None = None
    tile_overlap: int | None = None
    pre_resize: tuple[int, int] | None = None
    memory_budget: int | None = None
    workers: int = 0
    tile_bank: str = "shared"

    def __post_init__(self) -> None:
        if self.tile is not None:
            object.__setattr__(self, "tile", parse_tile(self.tile))
            object.__setattr__(self, "image_size", self.tile)  # the model sees tiles
        if self.pre_resize is not None:
            object.__setattr__(self, "pre_resize", parse_tile(self.pre_resize, "pre_resize"))
        if self.tile_overlap is not None:
            check_int("tile_overlap", self.tile_overlap, minimum=0)
            if self.tile is not None and self.tile_overlap >= min(self.tile):
                raise FitError(f"tile_overlap ({self.tile_overlap} px) must be smaller than the tile "
                               f"({self.tile[1]}x{self.tile[0]})").about("tile_overlap", "tile")
        if self.memory_budget is not None:
            check_int("memory_budget", self.memory_budget, minimum=1)
        check_int("workers", self.workers, minimum=0, maximum=256)
        if self.pre_resize is not None and self.tile is None and self.memory_budget is None:
            raise FitError("pre_resize applies to tiled fits: set tile (or memory_budget), or use image_size to "
                           "resize whole images").about("pre_resize", "tile")
        # Every number is checked here, not only in the CLI: NaN passes most comparisons.
        if not isinstance(self.image_size, int):
            for v in self.image_size:
                check_int("image_size", v)
        else:
            check_int("image_size", self.image_size)
        object.__setattr__(self, "image_size", pair(self.image_size))
        method = method_of(self.model)
        if self.batch_size is None and method != "ddad":
            object.__setattr__(self, "batch_size", 8 if method == "patchcore" else 1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        if min(self.image_size) < 32:
            raise FitError(f"image_size must be at least 32 px per side, got "
                           f"{self.image_size[1]}x{self.image_size[0]}").about("image_size")
        if max(self.image_size) > MAX_IMAGE_SIDE:
            raise FitError(f"image_size must be at most {MAX_IMAGE_SIDE} px per side, "
                           f"got {self.image_size[1]}x{self.image_size[0]}").about("image_size")
        check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        check_finite("coreset_ratio", self.coreset_ratio)
        check_finite("holdout_fraction", self.holdout_fraction, minimum=0.0, maximum=1.0, max_inclusive=False)
        check_finite("threshold_margin", self.threshold_margin, minimum=0.0)
        if self.steps is not None:
            check_int("steps", self.steps, minimum=1)
        check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        check_int("distill_steps", self.distill_steps, minimum=1)
        check_int("projection_dim", self.projection_dim, minimum=1)
        check_int("num_starting_points", self.num_starting_points, minimum=0)
        ead_only = [name for name, on in (("teacher", self.teacher is not None),
                                          ("distill_teacher", self.distill_teacher),
                                          ("imagenet", self.imagenet is not None)) if on]
        if method != "efficientad" and ead_only:
            raise FitError(f"{', '.join(ead_only)} only apply to EfficientAD (model "
                           f"{'|'.join(EFFICIENTAD_MODELS)}), not to {self.model}").about(*ead_only, "model")
        if method != "patchcore" and self.steps is None and method == "efficientad":
            object.__setattr__(self, "steps", 70_000)
        if method == "patchcore":
            if self.steps is not None:
                raise FitError("steps does not apply to PatchCore (it has no training loop)").about("steps")
            check_finite("coreset_ratio", self.coreset_ratio, minimum=0.0, maximum=1.0, min_inclusive=False)
        if self.tile_bank not in TILE_BANKS:
            raise FitError(f"tile_bank must be one of {', '.join(TILE_BANKS)}, got {self.tile_bank!r}"
                           ).about("tile_bank")
        if self.tile_bank == "per-position" and (method != "patchcore" or not self.tiled):
            raise FitError(f"tile_bank per-position builds one PatchCore memory bank per tile position: it needs "
                           f"a PatchCore model and a tiled fit (tile or memory_budget), got model {self.model} "
                           f"{'with' if self.tiled else 'without'} tiles").about("tile_bank", "tile", "model")
        if method == "efficientad":
            if self.teacher is not None and self.distill_teacher:
                raise FitError("teacher and distill_teacher exclude each other: load a teacher or distil "
                               "one").about("teacher", "distill_teacher")
            if self.distill_teacher and self.imagenet is None:
                raise FitError("distill_teacher needs imagenet: a folder of generic images to distil "
                               "on").about("distill_teacher", "imagenet")
            if self.weights is not None and not self.distill_teacher:
                raise FitError("weights is the backbone of PatchCore and DDAD; for EfficientAD set teacher to "
                               "a file (or weights with distill_teacher for the WRN-101-2 to distil "
                               "from)").about("weights", "teacher", "distill_teacher")
            if self.holdout_fraction <= 0:
                raise FitError("EfficientAD needs holdout_fraction > 0: a held-out part of the training images "
                               "sets its map normalisation").about("holdout_fraction")

    @property
    def method(self) -> str:
        return method_of(self.model)

    def identity(self) -> dict:
        """Fields that decide the result (a resumed fit must match them)."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        common = ["model", "image_size", "seed", "threshold_margin", "holdout_fraction"]
        if self.method == "patchcore":  # the keys PatchCore runs have always recorded
            keep = common + ["coreset_ratio", "weights", "projection_dim", "num_starting_points"]
        elif self.method == "efficientad":
            keep = common + ["steps", "batch_size", "teacher", "distill_teacher", "imagenet"]
            if self.distill_teacher:
                keep += ["weights", "distill_steps", "allow_random_weights"]
        else:
            keep = common + ["steps", "batch_size", "weights"]
        if self.tiled:  # only tiled fits record it: earlier runs keep their identity
            keep += ["tile", "tile_overlap", "pre_resize"]
            d["tile"] = list(self.tile) if self.tile is not None else "auto"
            d["pre_resize"] = list(self.pre_resize) if self.pre_resize is not None else None
        if self.tile_bank != "shared":  # only then: shared-bank runs keep their identity
            keep.append("tile_bank")
        return {k: d[k] for k in keep}

    @property
    def tiled(self) -> bool:
        """The fit cuts images into tiles (a tile size, or a budget that picks one)."""
        return self.tile is not None or self.memory_budget is not None


@dataclass
class FitResult:
    """A finished fit: its run folder and what it wrote there."""

    run: Path
    calibration: dict
    metrics: dict | None
    state: dict
    notes: list[str] = field(default_factory=list)

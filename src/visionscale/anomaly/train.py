"""Fit PatchCore from a folder of images, in bounded memory, into a self-describing run folder.

Stages (each is skipped when a rerun finds it finished):

1. ``features``: training images are read in batches, passed through the backbone and
   aggregated to patch features (B, D, h, w); each batch's rows go straight to two
   files in ``RUN/cache/``: the full D-dim features and their 128-dim JL projection.
   Only one batch is in memory at a time; after each batch the files are flushed and
   ``cache/progress.json`` records how far it got, so an interrupted fit resumes at the
   next batch (the batch size may change between attempts).
2. ``coreset``: the projected features (rows x 128 float32) are loaded, greedy k-center
   picks ``round(ratio * rows)`` of them, and just those rows are read back from the full
   features file into the memory bank. ``model.safetensors`` is written; the cache goes.
3. ``calibration``: images are scored to set the thresholds and score normalisation
   (``calibration.json``) and, on a labelled test set, the metrics (``metrics.json``).

Thresholds. With a test set holding both normal and anomalous images, the image threshold
is the F1-optimal one on it (and the pixel threshold the F1-optimal one on its masks, if
every anomalous image has one; else ``(1 + margin)`` x the highest map value of the normal
test images). Without labels, a seeded ``holdout_fraction`` (10%, at least two images) of
the training images is kept out of the memory bank and scored; the threshold is
``(1 + margin)`` x their highest score (margin 0.1; PatchCore scores are distances, >= 0,
and a relative margin does not shrink when few images are held out), and the pixel
threshold the same rule on their maps. With fewer than 10 training images nothing is held
out and the training images themselves are scored (their scores are biased low; the
notes say so). Normalised scores map the lowest normal calibration score to 0 and the
threshold to 0.5 (see :mod:`visionscale.anomaly.predict`).

Memory (see docs/anomaly.md for measurements). With ``rows = images * ceil(H/8) * ceil(W/8)``
patch rows, D the feature width (1024 for WRN) and d = 128, the peak of the process is about
``model + one batch's activations + rows * (d + 3) * 4 bytes (coreset) + k * D * 4 (bank)``;
the full features (``rows * D * 4`` bytes) live on disk, never in memory.

Run folder::

    config.json          model, sizes, ratio, seed, data (root, category, counts)
    versions.json        python, torch, numpy, visionscale, platform, device
    model.safetensors    backbone up to layer3 + memory bank (``nn_search.memory_bank``)
    calibration.json     image/pixel thresholds and normalisation range, and their source
    metrics.json         test-set metrics (labelled test set only)
    state.json           finished stages, seconds, peak memory, skipped files, notes
"""

from __future__ import annotations

from visionscale.errors import InvalidFileError, OutputExistsError, VisionscaleError, check_finite, check_int

import hashlib
import json
import logging
import os
import platform
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclasses_fields
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import torch

from visionscale.anomaly.coreset import (
    DEFAULT_PROJECTION_DIM,
    DEFAULT_STARTING_POINTS,
    coreset_size,
    greedy_kcenter,
    project,
    random_projection,
)
from visionscale.anomaly.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SKIP_HINT,
    ADDataset,
    DataError,
    ReadLog,
    Sample,
    iter_batches,
    load_dataset,
    pair,
)
from visionscale.anomaly.metrics import evaluate_scores, f1_optimal_threshold
from visionscale.anomaly.predict import Scored, resolve_device, score_batches
from visionscale.io.atomic import write_atomic
from visionscale.io.outputs import RunLock
from visionscale.io.weights import WeightsUnavailableError, save_file_atomic

__all__ = [
    "PATCHCORE_MODELS",
    "EFFICIENTAD_MODELS",
    "DDAD_MODELS",
    "FIT_MODELS",
    "method_of",
    "FitConfig",
    "FitError",
    "FitResult",
    "build_model",
    "build_run_model",
    "fit",
    "fit_patchcore",
    "peak_rss_bytes",
    "fit_memory_estimate",
]

PATCHCORE_MODELS = ("patchcore", "patchcore_wrn50", "patchcore_tiny")
EFFICIENTAD_MODELS = ("efficientad_s", "efficientad_m", "efficientad_tiny")
DDAD_MODELS = ("ddad", "ddad_tiny")
FIT_MODELS = PATCHCORE_MODELS + EFFICIENTAD_MODELS + DDAD_MODELS
RANDOM_WEIGHTS_WARNING = (
    "running on RANDOM backbone weights: pass --weights FILE (an ImageNet state dict of the backbone, "
    ".pth or .safetensors) or --weights DEFAULT (downloads torchvision's) for meaningful anomaly scores"
)
RANDOM_TEACHER_WARNING = (
    "running on a RANDOM EfficientAD teacher: pass --teacher FILE (a pretrained PDN state dict, .pth or "
    ".safetensors, e.g. teacher_small.pth) or --distill-teacher --imagenet DIR (distils one from "
    "Wide-ResNet-101-2 features) for meaningful anomaly scores"
)

MAX_IMAGE_SIDE = 16384  # px: a larger model input is a typo, not a plan

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

_logger = logging.getLogger(__name__)


def _say(log: Log | None) -> Log:
    """Where one-line messages go: the caller's ``log`` callback, else this module's logger at INFO."""
    return log or _logger.info


def _warn(say: Log, message: str) -> None:
    """A warning: logged at WARNING, unless the caller collects every message through its own ``log``."""
    if say == _logger.info:
        _logger.warning(message)
    else:
        say(message)


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
        threshold_margin: Margin of the no-labels threshold (see :func:`_calibrate`).
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

    def __post_init__(self) -> None:
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
            raise FitError(f"image size must be at least 32 px per side, got {self.image_size[1]}x{self.image_size[0]}")
        if max(self.image_size) > MAX_IMAGE_SIDE:
            raise FitError(f"image size must be at most {MAX_IMAGE_SIDE} px per side, "
                           f"got {self.image_size[1]}x{self.image_size[0]}")
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
        ead_only = [name for name, on in (("--teacher", self.teacher is not None),
                                          ("--distill-teacher", self.distill_teacher),
                                          ("--imagenet", self.imagenet is not None)) if on]
        if method != "efficientad" and ead_only:
            raise FitError(f"{', '.join(ead_only)} only apply to EfficientAD (--model {'|'.join(EFFICIENTAD_MODELS)})")
        if method != "patchcore" and self.steps is None and method == "efficientad":
            object.__setattr__(self, "steps", 70_000)
        if method == "patchcore":
            if self.steps is not None:
                raise FitError("--steps does not apply to PatchCore (it has no training loop)")
            check_finite("coreset_ratio", self.coreset_ratio, minimum=0.0, maximum=1.0, min_inclusive=False)
        if method == "efficientad":
            if self.teacher is not None and self.distill_teacher:
                raise FitError("--teacher and --distill-teacher exclude each other: load a teacher or distil one")
            if self.distill_teacher and self.imagenet is None:
                raise FitError("--distill-teacher needs --imagenet DIR: a folder of generic images to distil on")
            if self.weights is not None and not self.distill_teacher:
                raise FitError("--weights is the backbone of PatchCore and DDAD; for EfficientAD pass the teacher "
                               "with --teacher FILE (or --weights with --distill-teacher for the WRN-101-2 to distil)")
            if self.holdout_fraction <= 0:
                raise FitError("EfficientAD needs holdout_fraction > 0: a held-out part of the training images "
                               "sets its map normalisation")

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
        return {k: d[k] for k in keep}


@dataclass
class FitResult:
    run: Path
    calibration: dict
    metrics: dict | None
    state: dict
    notes: list[str] = field(default_factory=list)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``getrusage``; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def fit_memory_estimate(num_images: int, image_size: tuple[int, int], embed_dim: int, coreset_ratio: float,
                        projection_dim: int = DEFAULT_PROJECTION_DIM) -> dict:
    """Bytes the fit holds that grow with the data (model and one batch come on top)."""
    h, w = pair(image_size)
    rows = num_images * -(-h // 8) * -(-w // 8)
    d = min(projection_dim, embed_dim)
    k = coreset_size(rows, coreset_ratio) if rows else 0
    return {
        "patch_rows": rows,
        "coreset_ram_bytes": rows * (d + 3) * 4,  # projected rows + three (rows,) vectors
        "bank_bytes": k * embed_dim * 4,
        "features_on_disk_bytes": rows * (embed_dim + (d if embed_dim > projection_dim else 0)) * 4,
    }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def build_model(name: str, image_size: tuple[int, int], coreset_ratio: float, weights: str | None, seed: int = 0):
    """PatchCore from the registry with a placeholder bank (replaced by the fitted one).

    Random weights are drawn from ``seed`` so a resumed fit sees the same backbone.
    """
    from visionscale import registry

    try:
        import faiss  # noqa: F401  (exact IndexFlatL2 search when installed)

        use_faiss = True
    except ImportError:
        use_faiss = False
    torch.manual_seed(seed)
    try:
        # num_train_images=1: the placeholder bank is one image's coreset, not the data's.
        return registry.create(name, image_size=image_size, coreset_ratio=coreset_ratio, num_train_images=1,
                               backbone_weights=weights, use_faiss=use_faiss)
    except WeightsUnavailableError as exc:
        raise FitError(str(exc)) from None
    except FileNotFoundError as exc:
        raise FitError(f"--weights: {exc}") from None
    except (ValueError, RuntimeError) as exc:  # unreadable file, keys that do not fit the backbone
        raise FitError(f"--weights {weights}: {exc}") from None


def _versions(device: torch.device) -> dict:
    import visionscale

    info = {
        "visionscale": visionscale.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info



def _finish(run: Path, calibration: dict, metrics: dict | None, cal_notes: list[str], notes: list[str], say: Log,
            state: dict, save_state: Callable[[], None], t0: float) -> FitResult:
    """The last step of every method's fit: report the calibration notes, write
    calibration.json (and metrics.json), mark the run complete."""
    for n in cal_notes:
        notes.append(n)
        say(n)
    _write_json(run / "calibration.json", calibration)
    if metrics is not None:
        _write_json(run / "metrics.json", metrics)
    state["stages"]["calibration"] = {"done": True, "seconds": time.perf_counter() - t0}
    state["complete"] = True
    save_state()
    return FitResult(run, calibration, metrics, state, notes)

def _write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _data_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        try:
            size = s.path.stat().st_size
        except OSError:
            size = -1
        h.update(f"{s.path.name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _param_checksum(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def _oom_error(stage: str, cfg: FitConfig, device: torch.device, extra: str = "") -> FitError:
    h, w = cfg.image_size
    knobs = {
        "features": (f"lower --batch-size (now {cfg.batch_size}; finished batches are kept, so rerunning the same "
                     f"command with a smaller batch size resumes) or --image-size (now {w}x{h})"),
        "coreset": (f"lower --coreset-ratio (now {cfg.coreset_ratio}), --image-size (now {w}x{h}) or the number "
                    f"of training images: the coreset search holds every patch's {cfg.projection_dim}-d projection"),
        "calibration": f"lower --batch-size (now {cfg.batch_size}) or --image-size (now {w}x{h})",
    }[stage]
    return FitError(f"out of memory during {stage} on {device}: {knobs}{extra}")


RUN_FILES = ("config.json", "versions.json", "model.safetensors", "teacher.safetensors", "calibration.json",
             "metrics.json", "state.json")
RUN_FOLDERS = ("cache", "checkpoints")


def _run_config(path: Path) -> dict | None:
    """The ``config.json`` of a run visionscale fitted, or None (missing, unreadable, someone else's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("model") in FIT_MODELS and isinstance(data.get("image_size"), list):
        return data
    return None


def _read_run_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidFileError(f"invalid run file {path}: not valid JSON ({exc}); the file was edited or is "
                               f"corrupt: delete the run folder {path.parent} to fit again") from None
    if not isinstance(data, dict):
        raise InvalidFileError(f"invalid run file {path}: expected a JSON object, got {type(data).__name__}; "
                               f"delete the run folder {path.parent} to fit again")
    return data


def _has_progress(run: Path) -> bool:
    """Whether ``run`` holds anything a rerun would resume from (weights, checkpoints, features)."""
    if any((run / name).is_file() for name in ("model.safetensors", "teacher.safetensors")):
        return True
    if (run / "checkpoints").is_dir() and any(p.is_file() for p in (run / "checkpoints").rglob("*")):
        return True
    try:
        return json.loads((run / "cache" / "progress.json").read_text()).get("rows", 0) > 0
    except (OSError, ValueError, AttributeError):
        return False


def _claims_run_folder(fit_fn):
    """Run ``fit_fn(data, out, ...)`` holding the lock on its run folder ``out``.

    Before the lock is taken (taking it creates the folder and its ``.lock``): a folder with
    anything in it but a run of ours is refused unless ``overwrite``. A failure before anything
    resumable was saved removes what this fit created: the folder (and missing parents) if it
    was new, else the entries it added.
    """
    import functools

    @functools.wraps(fit_fn)
    def wrapper(data, out, config=None, **kw):
        run = Path(out).expanduser()
        if run.exists() and not run.is_dir():
            raise FitError(f"run folder {run} exists and is not a folder")
        top = run  # the outermost folder this call creates
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        before = set(os.listdir(run)) if run.is_dir() else None
        others = sorted((before or set()) - {".lock"})
        if others and _run_config(run / "config.json") is None and not kw.get("overwrite", False):
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise OutputExistsError(f"run folder {run} is not empty and is not a run folder (it holds {shown}); "
                                    f"choose a new or empty folder, or allow overwriting (a run's file names "
                                    f"there are then replaced)")
        # Not cleaned up when this fails: another process may have just made the folder and hold it.
        lock = RunLock(run, what="run folder").acquire()
        try:
            return fit_fn(data, out, config, **kw)
        except BaseException:
            if not _has_progress(run):
                if before is None:
                    shutil.rmtree(top, ignore_errors=True)
                else:
                    _remove_new_entries(run, before)
            raise
        finally:
            lock.release()

    return wrapper


def _remove_new_entries(run: Path, before: set[str]) -> None:
    try:
        added = set(os.listdir(run)) - before
    except OSError:
        return
    for name in added:
        target = run / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _clear_run(run: Path) -> None:
    """Remove the files a run consists of (``overwrite``), nothing else."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run / name, ignore_errors=True)


def _open_run(run: Path, record: dict, say: Log, overwrite: bool = False) -> dict:
    """Create the run folder, or check that it holds the same fit and return its state."""
    if run.exists() and not run.is_dir():
        raise FitError(f"run folder {run} exists and is not a folder")
    cfg_path = run / "config.json"
    old = _run_config(cfg_path)
    if old is not None:
        old_fit = {k: old.get(k) for k in record["fit"]}
        diff = [k for k in record["fit"] if old_fit[k] != record["fit"][k]]
        old_data = old.get("data")
        if not isinstance(old_data, dict) or old_data.get("fingerprint") != record["data"]["fingerprint"]:
            diff.append("training images")
        if diff and not overwrite:
            raise FitError(f"{run} already holds a fit with a different {', '.join(diff)}; "
                           f"choose another run folder, delete it, or allow overwriting it")
        if not diff:
            state_path = run / "state.json"
            state = _read_run_json(state_path) if state_path.is_file() else {}
            if not state.get("complete"):
                say(f"resuming the unfinished fit in {run}")
            return state
        say(f"{run} held a fit with a different {', '.join(diff)}: starting over (overwrite)")
        _clear_run(run)
    elif run.is_dir() and any(p.name != ".lock" for p in run.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"run folder {run} is not empty and is not a run folder; choose a new or "
                                    f"empty folder, or allow overwriting")
        _clear_run(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FitError(f"cannot write to run folder {run}: {exc.strerror or exc}") from None
    return {}


@_claims_run_folder
def fit_patchcore(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FitConfig | None = None,
    *,
    category: str | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    keep_cache: bool = False,
    overwrite: bool = False,
) -> FitResult:
    """Fit PatchCore on the normal training images under ``data`` and write a run folder to ``out``.

    Args:
        data: MVTec AD root/category or plain folder layout (see :mod:`visionscale.anomaly.data`).
        out: Run folder; created, or resumed if it holds an unfinished fit of the same config
            (see :func:`fit` for the lock, foreign files and ``overwrite``).
        config: What to fit.
        category: MVTec category when ``data`` holds several.
        progress: ``progress(stage, done, total)``.
        log: Receives one-line messages for the user (random weights, notes, skipped files).
        keep_cache: Keep ``RUN/cache/`` (the streamed features) after the bank is built.

    Raises:
        FitError: Bad configuration, weights that cannot be loaded, out of memory (naming
            the knobs), a run folder that holds a different fit.
        DataError: Missing/empty training folder, unreadable image (without ``skip_bad``),
            mask/image size mismatch.
    """
    cfg = config or FitConfig()
    if cfg.method != "patchcore":
        raise FitError(f"fit_patchcore fits PatchCore, not {cfg.model}: call visionscale.anomaly.train.fit")
    say = _say(log)
    tick = progress or (lambda stage, done, total: None)
    run = Path(out).expanduser()
    ds = load_dataset(data, category, seed=cfg.seed)
    notes = list(ds.notes)
    for n in notes:
        say(n)

    # Which images build the bank, and which set the threshold.
    labelled = ds.test_has_labels
    bank_samples, holdout = list(ds.train), []
    if not labelled and len(ds.train) >= 10 and cfg.holdout_fraction > 0:
        n_hold = max(2, round(cfg.holdout_fraction * len(ds.train)))
        picked = set(random.Random(cfg.seed).sample(range(len(ds.train)), n_hold))
        holdout = [s for i, s in enumerate(ds.train) if i in picked]
        bank_samples = [s for i, s in enumerate(ds.train) if i not in picked]
        notes.append(f"the test set has no labels: {n_hold} of {len(ds.train)} training images are held out of "
                     f"the memory bank to set the threshold")
        say(notes[-1])

    device = resolve_device(cfg.device)
    record = {
        "fit": cfg.identity(),
        "data": {
            "root": str(ds.root), "category": ds.category, "layout": ds.layout,
            "train_images": len(bank_samples), "holdout_images": len(holdout), "test_images": len(ds.test),
            "test_anomalous": sum(s.label == 1 for s in ds.test), "fingerprint": _data_fingerprint(ds.train),
        },
    }
    state = _open_run(run, record, say, overwrite)
    if state.get("complete"):
        return _finished(run, state, say)
    if cfg.weights is None:
        _warn(say, RANDOM_WEIGHTS_WARNING)
    # Built before config.json is written: weights that fail to load leave no run behind
    # that a corrected command would then refuse as "a different fit".
    model = build_model(cfg.model, cfg.image_size, cfg.coreset_ratio, cfg.weights, cfg.seed).eval()
    model.to(device)
    _write_json(run / "config.json", {**record["fit"], "method": "patchcore", "batch_size": cfg.batch_size,
                                      "random_weights": "backbone" if cfg.weights is None else None,
                                      "data": record["data"]})
    _write_json(run / "versions.json", _versions(device))
    state.setdefault("stages", {})
    state["weights"] = cfg.weights or "random"
    state["rss_after_model_bytes"] = peak_rss_bytes()
    est = fit_memory_estimate(len(bank_samples), cfg.image_size, model.embed_dim, cfg.coreset_ratio,
                              cfg.projection_dim)
    state["memory_estimate"] = est

    def save_state() -> None:
        state["peak_rss_bytes"] = peak_rss_bytes()
        state["notes"] = notes
        _write_json(run / "state.json", state)

    # 1-2. Features and coreset -> model.safetensors.
    if not state["stages"].get("coreset", {}).get("done"):
        try:
            rows, emb_path, proj_path, read_log = _extract_features(model, bank_samples, cfg, device, run, state,
                                                                    tick, say)
        except BaseException as exc:
            if _is_oom(exc):
                raise _oom_error("features", cfg, device) from None
            raise
        for n in (read_log.size_note(cfg.image_size), read_log.bad_note()):
            if n:
                notes.append(n)
                say(n)
        state["bad_images"] = [[str(p), why] for p, why in read_log.bad]
        save_state()
        t0 = time.perf_counter()
        try:
            bank, k, frac = _select_bank(rows, emb_path, proj_path, model.embed_dim, cfg, device, tick)
        except BaseException as exc:
            if _is_oom(exc):
                raise _oom_error("coreset", cfg, device, f" ({rows} patch rows)") from None
            raise
        model.set_memory_bank(bank)
        save_file_atomic({k: v.cpu() for k, v in model.state_dict().items()}, run / "model.safetensors",
                         metadata={"model": cfg.model, "format": "visionscale.patchcore"})
        state["stages"]["coreset"] = {"done": True, "seconds": time.perf_counter() - t0, "patch_rows": rows,
                                      "bank_rows": int(bank.shape[0]), "k": k, "candidate_fraction": frac}
        state["rss_after_coreset_bytes"] = peak_rss_bytes()
        save_state()
        if not keep_cache:
            shutil.rmtree(run / "cache", ignore_errors=True)
        del bank
    else:
        from visionscale.io.weights import load_state_dict

        saved = load_state_dict(run / "model.safetensors")
        model.set_memory_bank(saved["nn_search.memory_bank"])
        model.load_state_dict(saved)
        model.to(device)
        say("features and memory bank already done: resuming at calibration")

    # 3. Calibration (thresholds, normalisation) and metrics.
    t0 = time.perf_counter()
    try:
        calibration, metrics, cal_notes = _calibrate(model, ds, holdout or bank_samples, labelled, bool(holdout),
                                                     cfg, device, tick)
    except BaseException as exc:
        if _is_oom(exc):
            raise _oom_error("calibration", cfg, device) from None
        raise
    return _finish(run, calibration, metrics, cal_notes, notes, say, state, save_state, t0)


def _extract_features(model, samples: list[Sample], cfg: FitConfig, device: torch.device, run: Path, state: dict,
                      tick: Progress, say: Log) -> tuple[int, Path, Path | None, ReadLog]:
    """Stream patch features of ``samples`` to ``RUN/cache``; resume from its progress file.

    Rows are appended with plain file writes, not a memory map: written pages stay in the
    OS page cache (reclaimable) instead of counting as this process's resident memory.
    """
    cache = run / "cache"
    cache.mkdir(exist_ok=True)
    h, w = model.feature_size(cfg.image_size)
    dim = model.embed_dim
    max_rows = len(samples) * h * w
    proj = random_projection(dim, cfg.projection_dim, cfg.seed, device)
    pdim = proj.shape[1] if proj is not None else 0
    emb_path = cache / "embeddings.f32"
    proj_path = cache / "projected.f32" if proj is not None else None
    prog_path = cache / "progress.json"
    checksum = _param_checksum(model.feature_extractor)
    read_log = ReadLog()
    prog = None
    if prog_path.is_file():
        try:
            prog = json.loads(prog_path.read_text())
        except ValueError:
            prog = None
        if prog is not None:
            rows = prog.get("rows", -1)
            files_ok = emb_path.is_file() and emb_path.stat().st_size >= rows * dim * 4 and (
                proj_path is None or (proj_path.is_file() and proj_path.stat().st_size >= rows * pdim * 4))
            if (prog.get("max_rows") != max_rows or not files_ok
                    or not np.isclose(prog.get("checksum", -1.0), checksum, rtol=1e-9)):
                say("cached features do not match these weights, images or files: extracting again")
                prog = None
    if prog is None:
        need = max_rows * (dim + pdim) * 4
        free = shutil.disk_usage(cache).free
        if need > free:
            raise FitError(f"the features of {len(samples)} images at {cfg.image_size[1]}x{cfg.image_size[0]} "
                           f"need {need / 2**30:.1f} GiB in {cache}, {free / 2**30:.1f} GiB are free: lower "
                           f"--image-size, use fewer images, or put --out on a larger disk")
        prog = {"images_done": 0, "rows": 0, "bad": [], "max_rows": max_rows, "checksum": checksum}
    else:
        read_log.bad = [(Path(p), why) for p, why in prog["bad"]]
        if prog["images_done"] < len(samples):
            say(f"resuming feature extraction at image {prog['images_done'] + 1} of {len(samples)}")
    done, rows = prog["images_done"], prog["rows"]
    files = [(open(emb_path, "r+b" if rows else "wb"), dim)]
    if proj_path is not None:
        files.append((open(proj_path, "r+b" if rows else "wb"), pdim))
    for f, width in files:  # drop whatever a crash left after the last recorded batch
        f.truncate(rows * width * 4)
        f.seek(rows * width * 4)
    t0 = time.perf_counter()
    position = {s.path: i for i, s in enumerate(samples)}
    tick("features", done, len(samples))
    try:
        with torch.inference_mode():
            for batch in iter_batches(samples[done:], cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad,
                                      log=read_log):
                emb = model.feature_extractor(batch.images.to(device))  # (B, D, h, w)
                flat = emb.permute(0, 2, 3, 1).reshape(-1, dim).float()  # (B*h*w, D): patch rows, image-major
                flat.cpu().numpy().tofile(files[0][0])
                if proj is not None:
                    project(flat, proj).cpu().numpy().tofile(files[1][0])  # (B*h*w, d)
                for f, _ in files:
                    f.flush()
                rows += flat.shape[0]
                done = position[batch.samples[-1].path] + 1
                prog.update(images_done=done, rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
                _write_json(prog_path, prog)  # after the rows are written: a resume never trusts missing rows
                tick("features", done, len(samples))
    finally:
        for f, _ in files:
            f.close()
    prog.update(images_done=len(samples), rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
    _write_json(prog_path, prog)  # trailing unreadable files were logged by the loop
    if rows == 0:
        raise DataError(f"none of the {len(samples)} training images could be read: " + (read_log.bad_note() or ""))
    secs = time.perf_counter() - t0 + state.get("stages", {}).get("features", {}).get("seconds", 0.0)
    state["stages"]["features"] = {"done": True, "seconds": secs, "images": len(samples) - len(read_log.bad),
                                   "patch_rows": rows, "feature_dim": dim, "feature_grid": [h, w]}
    state["rss_after_features_bytes"] = peak_rss_bytes()
    return rows, emb_path, proj_path, read_log


def _select_bank(rows: int, emb_path: Path, proj_path: Path | None, dim: int, cfg: FitConfig,
                 device: torch.device, tick: Progress) -> tuple[torch.Tensor, int, float]:
    """Greedy coreset on the projected rows; read only the chosen full rows back."""
    k = coreset_size(rows, cfg.coreset_ratio)
    if k == rows:
        return torch.from_numpy(np.fromfile(emb_path, dtype=np.float32, count=rows * dim).reshape(rows, dim)), k, 0.0
    src, width = (proj_path, min(cfg.projection_dim, dim)) if proj_path is not None else (emb_path, dim)
    # (rows, d) in memory: the coreset's working set, the one part of fitting that grows with the data.
    points = torch.from_numpy(np.fromfile(src, dtype=np.float32, count=rows * width).reshape(rows, width))
    stats: dict = {}
    idx = greedy_kcenter(points.to(device), k, cfg.num_starting_points, cfg.seed,
                         progress=lambda done, total: tick("coreset", done, total), stats=stats)
    del points
    chosen = np.sort(idx.cpu().numpy())
    # (k, D): only these rows are read, straight into the bank (a memory map would keep the
    # pages it touched resident, and fancy indexing would copy once more).
    bank = np.empty((chosen.size, dim), dtype=np.float32)
    with open(emb_path, "rb") as f:
        for i, r in enumerate(chosen.tolist()):
            f.seek(r * dim * 4)
            f.readinto(bank[i])
    return torch.from_numpy(bank), k, stats["candidate_fraction"]


def _calibrate(model, ds: ADDataset, fallback: list[Sample], labelled: bool, held_out: bool, cfg: FitConfig,
               device: torch.device, tick: Progress, *, batch_size: int | None = None,
               held_out_what: str = "normal images held out of the memory bank",
               signed_scores: bool = False) -> tuple[dict, dict | None, list[str]]:
    """Thresholds + normalisation from the labelled test set, else from normal images.

    Shared by every method. Without labels the image threshold is ``(1 + margin) x`` the
    highest normal score for scores that are distances (>= 0: PatchCore, DDAD); for scores
    that can be negative (``signed_scores``: EfficientAD's quantile-normalised maps, where
    0 is the 0.9-quantile of normal pixels) it is ``max + margin x (max - min)`` of the
    normal scores, likewise for pixels.
    """
    notes: list[str] = []
    with_masks = labelled and ds.test_has_masks
    samples = ds.test if labelled else fallback
    read_log = ReadLog()
    batches = iter_batches(samples, cfg.image_size, batch_size or cfg.batch_size or 8, skip_bad=cfg.skip_bad,
                           log=read_log, with_masks=with_masks)
    scored: Scored = score_batches(model, batches, device, len(samples), tick, "calibration")
    if read_log.bad:
        notes.append("calibration: " + read_log.bad_note())
    if not scored.samples:
        raise DataError("no calibration image could be read: " + (read_log.bad_note() or ""))
    scores = np.asarray(scored.scores, dtype=np.float64)
    maps = np.stack(scored.maps)  # (N, h, w)
    labels = np.array([s.label for s in scored.samples])
    margin = cfg.threshold_margin
    normal = labels == 0 if labelled else np.ones(labels.size, dtype=bool)
    cal: dict = {"image_max": float(scores.max()), "pixel_max": float(maps.max())}
    metrics = None
    if labelled and 0 < labels.sum() < labels.size:
        thr, f1 = f1_optimal_threshold(labels, scores)
        cal.update(image_threshold=thr, image_threshold_source=(
            f"F1-optimal on the labelled test set ({labels.size} images, {int(labels.sum())} anomalous; F1 {f1:.3f})"))
        masks = np.stack(scored.masks) if with_masks else None
        m = evaluate_scores(labels, scores, maps if with_masks else None, masks)
        note = ds.mask_note()
        if note:
            m.notes = (note,) + tuple(n for n in m.notes if not n.startswith("pixel metrics skipped"))
            notes.append(note)
        metrics = {**m.as_dict(), "threshold_note": "image_f1 / pixel_f1 are at thresholds chosen on this same "
                   "test set, so they are optimistic; AUROC and AUPRO do not depend on a threshold"}
        if with_masks:
            cal.update(pixel_threshold=m.pixel_threshold, pixel_threshold_source="F1-optimal on the test masks")
        else:
            thr, rule = _above_max(maps[normal], margin, signed_scores)
            cal.update(pixel_threshold=thr,
                       pixel_threshold_source=f"{rule} the highest map value of the normal test images (no masks)")
    else:
        where = (held_out_what if held_out else
                 "the training images themselves (fewer than 10, none held out: scores are biased low)")
        # Distances (>= 0): a relative margin does not depend on how many normal images were
        # scored, unlike one proportional to their spread.
        thr, rule = _above_max(scores, margin, signed_scores)
        pthr, prule = _above_max(maps, margin, signed_scores)
        cal.update(image_threshold=thr, image_threshold_source=f"{rule} the highest score of {where}",
                   pixel_threshold=pthr, pixel_threshold_source=f"{prule} the highest map value of {where}")
        if not held_out:
            notes.append("threshold set on the training images themselves (too few to hold some out); "
                         "expect false alarms: add a labelled test set or more training images")
    # Normalisation: the lowest normal score -> 0, the threshold -> 0.5, as far again above -> 1.
    cal["image_min"] = float(scores[normal].min())
    cal["pixel_min"] = float(maps[normal].min())
    cal["image_span"] = _span(cal["image_threshold"], cal["image_min"], scores)
    cal["pixel_span"] = _span(cal["pixel_threshold"], cal["pixel_min"], maps)
    cal["normalization"] = ("normalized = clip((score - threshold) / span + 0.5, 0, 1) with span = 2 x (threshold - "
                            "lowest normal calibration score): 0 = that lowest normal score, 0.5 = the threshold; "
                            "heatmaps use the same scale with the pixel values")
    cal["calibration_images"] = len(scored.samples)
    return cal, metrics, notes


def _above_max(values: np.ndarray, margin: float, signed: bool) -> tuple[float, str]:
    """Threshold a margin above the highest normal value, and the rule's wording."""
    hi, lo = float(np.max(values)), float(np.min(values))
    if not signed:
        return (1 + margin) * hi, f"(1 + {margin}) x"
    return hi + margin * (hi - lo), f"{margin} x (max - min) above"


def _span(threshold: float, lowest_normal: float, values: np.ndarray) -> float:
    """2 x (threshold - lowest normal value); max - min of all values (or 1) if that is not positive."""
    span = 2.0 * (threshold - lowest_normal)
    if span > 0:
        return span
    lo, hi = float(np.min(values)), float(np.max(values))
    return (hi - lo) if hi > lo else 1.0


# ----------------------------------------------------------------------------------------
# Every method: dispatch, and rebuilding a run's model.


def fit(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FitConfig | None = None,
    *,
    category: str | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    keep_cache: bool = False,
    overwrite: bool = False,
) -> FitResult:
    """Fit ``config.model`` on the normal training images under ``data`` into the run folder ``out``.

    Dispatches to :func:`fit_patchcore`, :func:`fit_efficientad` or :func:`fit_ddad_run`; every
    method writes the same run folder (``config.json``, ``versions.json``,
    ``model.safetensors``, ``calibration.json``, ``metrics.json``, ``state.json``) that
    :func:`visionscale.anomaly.predict.load_run` reads back.

    The run folder is locked for the whole fit (:class:`~visionscale.io.outputs.RunLock`: a
    second fit into it fails at once). A folder that holds anything but a run is refused
    unless ``overwrite`` (then a run's file names there are replaced; with ``overwrite`` a
    different fit there is started over). A fit that fails before it saved anything it could
    resume from leaves no new folder behind.
    """
    cfg = config or FitConfig()
    if cfg.method == "patchcore":
        return fit_patchcore(data, out, cfg, category=category, progress=progress, log=log, keep_cache=keep_cache,
                             overwrite=overwrite)
    if cfg.method == "efficientad":
        return fit_efficientad(data, out, cfg, category=category, progress=progress, log=log, overwrite=overwrite)
    return fit_ddad_run(data, out, cfg, category=category, progress=progress, log=log, overwrite=overwrite)


class SignedInput(torch.nn.Module):
    """Feeds a model that expects [-1, 1] images (DDAD) with ImageNet-normalised batches.

    The data layer normalises every batch with the ImageNet mean and std; DDAD's U-Net works
    on ``2 x [0, 1] - 1`` (official ``Dataset_maker``). No parameters: the wrapped model's
    state dict is the run's.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(2 * (x * self.std + self.mean) - 1)


def imagenet_to_signed(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> [-1, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return 2 * (x * std + mean) - 1


def build_run_model(config: dict, state: dict[str, torch.Tensor], source: str = "model.safetensors"):
    """Rebuild a fitted model from a run's ``config.json`` and ``model.safetensors`` state dict.

    Returns a module whose ``forward`` takes ImageNet-normalised batches and returns
    ``pred_score`` and ``anomaly_map``, for every method.

    Raises:
        ValueError: The state dict does not fit the model the config names.
    """
    from visionscale import registry
    from visionscale.io.weights import load_into

    name = config["model"]
    method = config.get("method") or method_of(name)
    if method == "patchcore":
        model = build_model(name, tuple(config["image_size"]), float(config["coreset_ratio"]), None,
                            seed=int(config.get("seed", 0)))
        bank = state.get("nn_search.memory_bank")
        if bank is None:
            raise ValueError(f"{source} has no memory bank (nn_search.memory_bank)")
        model.set_memory_bank(bank)  # its size differs from the placeholder's
        load_into(model, state, source=source)
        return model
    if method == "efficientad":
        model = registry.create(name, padding=bool(config.get("pdn_padding", True)))
        load_into(model, state, source=source)
        return model
    model = registry.create(name)
    load_into(model, state, source=source)
    return SignedInput(model)


def _nontrivial_oom(stage: str, cfg: FitConfig, device: torch.device) -> FitError:
    h, w = cfg.image_size
    return FitError(f"out of memory during {stage} on {device}: lower --batch-size (now {cfg.batch_size}) or "
                    f"--image-size (now {w}x{h}); --steps (now {cfg.steps}) sets how long training runs, not its "
                    f"memory, but fewer steps finish sooner. A different batch size or image size is a new fit: "
                    f"give it a new --out")


def _split_holdout(samples: list[Sample], fraction: float, seed: int, minimum: int) -> tuple[list[Sample], list[Sample]]:
    n_hold = max(minimum, round(fraction * len(samples)))
    picked = set(random.Random(seed).sample(range(len(samples)), n_hold))
    return ([s for i, s in enumerate(samples) if i not in picked], [s for i, s in enumerate(samples) if i in picked])


def _epoch_indices(n: int, batch_size: int, seed: int, step: int, stream: int) -> list[int]:
    """Indices of step ``step``'s batch: epochs are permutations seeded by ``(seed, epoch)``."""
    from visionscale.anomaly.efficientad_train import step_seed

    per_epoch = -(-n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, stream))).tolist()
    return perm[pos * batch_size:(pos + 1) * batch_size]


class _ImageStore:
    """Images by index at one size, ImageNet-normalised; kept in memory when they fit ``budget`` bytes."""

    def __init__(self, paths: list[Path], size: tuple[int, int], budget: int = 512 * 2**20):
        self.paths, self.size = paths, size
        h, w = size
        self.cache: dict[int, torch.Tensor] | None = {} if len(paths) * 3 * h * w * 4 <= budget else None

    def get(self, i: int) -> torch.Tensor:
        from visionscale.anomaly.data import read_for_size, to_model_input

        t = self.cache.get(i) if self.cache is not None else None
        if t is None:
            t = to_model_input(read_for_size(self.paths[i], self.size)[0], self.size)  # (3, H, W)
            if self.cache is not None:
                self.cache[i] = t
        return t


class _GenericImages:
    """A folder of generic (ImageNet-like) images for EfficientAD's penalty and teacher distillation."""

    def __init__(self, folder: str, size: tuple[int, int], seed: int, skip_bad: bool):
        from visionscale.io.images import list_images

        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataError(f"--imagenet folder not found: {root} (a folder of generic images, e.g. ImageNet's train/)")
        self.paths = list_images(root, recursive=True)
        if not self.paths:
            raise DataError(f"--imagenet folder {root} holds no images")
        self.size, self.seed, self.skip_bad = size, seed, skip_bad
        self.bad: dict[Path, str] = {}

    def _read(self, i: int):
        from visionscale.anomaly.data import read_for_size
        from visionscale.io.images import ImageReadError

        h, w = self.size
        n = len(self.paths)
        for k in range(n):  # an unreadable file (with skip_bad) is replaced by the next one
            p = self.paths[(i + k) % n]
            if p in self.bad:
                continue
            try:
                return read_for_size(p, (2 * h, 2 * w))[0]  # used at 2H x 2W and H x W
            except ImageReadError as exc:
                if not self.skip_bad:
                    raise DataError(f"{exc} (in --imagenet); {SKIP_HINT}") from None
                self.bad[p] = str(exc)
        raise DataError(f"none of the {n} --imagenet images could be read")

    def penalty_batch(self, step: int, batch_size: int, grayscale: float) -> torch.Tensor:
        """Ref. penalty transform: resize to 2H x 2W, random grayscale, centre crop H x W."""
        from visionscale.anomaly.data import to_model_input
        from visionscale.anomaly.efficientad_train import step_seed, to_grayscale

        h, w = self.size
        idx = _epoch_indices(len(self.paths), batch_size, self.seed, step, 3)
        x = torch.stack([to_model_input(self._read(i), (2 * h, 2 * w)) for i in idx])  # (B, 3, 2H, 2W)
        x = x[:, :, h // 2:h // 2 + h, w // 2:w // 2 + w]  # centre crop (B, 3, H, W)
        return to_grayscale(x, grayscale, torch.Generator().manual_seed(step_seed(self.seed, step, 4)))

    def distill_batch(self, step: int, batch_size: int, grayscale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(extractor input at 2H x 2W, PDN input at H x W) of the same images, same grayscale draw."""
        from visionscale.anomaly.data import to_model_input
        from visionscale.anomaly.efficientad_train import step_seed, to_grayscale

        h, w = self.size
        stream = 5 if step >= 0 else 6
        idx = _epoch_indices(len(self.paths), batch_size, self.seed, abs(step), stream)
        arrs = [self._read(i) for i in idx]
        big = torch.stack([to_model_input(a, (2 * h, 2 * w)) for a in arrs])
        small = torch.stack([to_model_input(a, (h, w)) for a in arrs])
        gseed = step_seed(self.seed, step, 7)
        return (to_grayscale(big, grayscale, torch.Generator().manual_seed(gseed)),
                to_grayscale(small, grayscale, torch.Generator().manual_seed(gseed)))


def _load_teacher(model, path: str, name: str) -> None:
    """Load ``--teacher FILE`` into ``model.teacher``: a bare PDN state dict, or one under
    ``teacher.`` (a visionscale run's model.safetensors) or ``model.teacher.`` (anomalib)."""
    from visionscale.io.weights import (
        StateDictMismatchError,
        load_into,
        load_state_dict,
    )

    try:
        state = load_state_dict(path)
    except FileNotFoundError:
        raise FitError(f"--teacher: teacher weights file not found: {path}") from None
    except ValueError as exc:
        raise FitError(f"--teacher {path}: {exc}") from None
    own = set(model.teacher.state_dict())
    sub = state
    for prefix in ("teacher.", "model.teacher."):
        cand = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(cand) == own:
            sub = cand
            break
    cfg = model.config
    try:
        load_into(model.teacher, sub, source=str(path))
    except StateDictMismatchError as exc:
        raise FitError(f"--teacher {path} does not fit the {name} teacher (PDN-{cfg.variant.upper()}, "
                       f"{cfg.out_channels} output channels): {exc}") from None


def _distill_extractor(cfg: FitConfig, out_channels: int, say: Log):
    """WRN-101-2 layer2 + layer3 patch features pooled to the teacher's channels (resnet_tiny for the tiny model)."""
    from visionscale.anomaly.patchcore import PatchFeatureExtractor
    from visionscale.nn import resnet

    tiny = cfg.model == "efficientad_tiny"
    arch = "resnet_tiny" if tiny else "wide_resnet101_2"
    weights = cfg.weights if cfg.weights is not None else (None if tiny else "DEFAULT")
    random_note = (f"running on RANDOM {arch} weights for the teacher distillation (--allow-random-weights): the "
                   f"distilled teacher imitates random features and its anomaly scores mean little; pass --weights "
                   f"FILE (torchvision's ImageNet {arch} state dict) for a real teacher")
    try:
        if weights is None:
            if not cfg.allow_random_weights:
                raise FitError(f"{cfg.model} distils from {arch}, which has no published weights: pass --weights FILE "
                               f"or --allow-random-weights")
            _warn(say, random_note)
        backbone = getattr(resnet, arch)(weights=weights, progress=False, num_classes=0)
    except WeightsUnavailableError as exc:
        if not cfg.allow_random_weights:
            raise FitError(f"teacher distillation needs ImageNet {arch} weights: {exc}\nor pass "
                           f"--allow-random-weights to distil from a RANDOM {arch} (meaningless teacher)") from None
        _warn(say, random_note)
        backbone = getattr(resnet, arch)(weights=None, num_classes=0)
    except FileNotFoundError as exc:
        raise FitError(f"--weights: {exc}") from None
    except (ValueError, RuntimeError) as exc:
        raise FitError(f"--weights {weights}: {exc}") from None
    for stage in ("layer4",):
        if hasattr(backbone, stage):
            delattr(backbone, stage)  # never runs
    return PatchFeatureExtractor(backbone, ("layer2", "layer3"), 3, 32 if tiny else 1024, out_channels)


def _run_record(cfg: FitConfig, ds: ADDataset, train: list[Sample], holdout: list[Sample]) -> dict:
    return {
        "fit": cfg.identity(),
        "data": {
            "root": str(ds.root), "category": ds.category, "layout": ds.layout,
            "train_images": len(train), "holdout_images": len(holdout), "test_images": len(ds.test),
            "test_anomalous": sum(s.label == 1 for s in ds.test), "fingerprint": _data_fingerprint(ds.train),
        },
    }


def _finished(run: Path, state: dict, say: Log) -> FitResult:
    say(f"{run} already holds this fit, complete; nothing to do")
    metrics = _read_run_json(run / "metrics.json") if (run / "metrics.json").exists() else None
    return FitResult(run, _read_run_json(run / "calibration.json"), metrics, state, state.get("notes", []))


@_claims_run_folder
def fit_efficientad(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FitConfig,
    *,
    category: str | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Train EfficientAD (paper Algorithm 1) on the training images under ``data``; write a run folder.

    Stages: ``teacher`` (load ``--teacher``, distil, or random), ``teacher statistics``
    (channel mean / std over the training part), ``train`` (checkpointed every
    ``checkpoint_every`` steps in ``RUN/checkpoints/``; rerunning resumes), ``map
    normalisation`` (quantiles on the held-out part of the training images), then the
    shared calibration. A seeded ``holdout_fraction`` (10 %, at least one image) of the
    training images is always held out: the paper's validation set.

    Raises:
        FitError: Bad configuration or teacher file, input too small for the networks, out
            of memory (naming the knobs), a run folder that holds a different fit.
        DataError: Missing/empty training folder, unreadable image (without ``skip_bad``).
    """
    from visionscale import registry
    from visionscale.anomaly import efficientad_train as E

    cfg = config
    say = _say(log)
    tick = progress or (lambda stage, done, total: None)
    run = Path(out).expanduser()
    ds = load_dataset(data, category, seed=cfg.seed)
    notes = list(ds.notes)
    for n in notes:
        say(n)
    if len(ds.train) < 2:
        raise DataError(f"EfficientAD needs at least 2 training images (a held-out part sets its map "
                        f"normalisation); {ds.root} has {len(ds.train)}")
    train_samples, val_samples = _split_holdout(ds.train, cfg.holdout_fraction, cfg.seed, 1)
    notes.append(f"{len(val_samples)} of {len(ds.train)} training images (seeded) are held out of training: they "
                 f"set the map normalisation (paper: validation part of the training images)"
                 + ("" if ds.test_has_labels else " and the threshold"))
    say(notes[-1])
    labelled = ds.test_has_labels
    # Sizes first: a bad --image-size leaves no run folder behind.
    torch.manual_seed(cfg.seed)  # random teacher / student / autoencoder init, identical on resume
    model = registry.create(cfg.model)
    try:
        model.validate_input_size(*cfg.image_size)
    except ValueError as exc:
        raise FitError(f"--image-size {cfg.image_size[1]}x{cfg.image_size[0]} is too small for {cfg.model}: {exc}. "
                       f"Every size at or above the minimum works, also non-square ones") from None
    tcfg = E.EfficientADTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                    checkpoint_every=cfg.checkpoint_every, distill_steps=cfg.distill_steps)
    generic = _GenericImages(cfg.imagenet, cfg.image_size, cfg.seed, cfg.skip_bad) if cfg.imagenet else None
    if cfg.teacher is not None:
        _load_teacher(model, cfg.teacher, cfg.model)  # before the run folder: a bad file leaves none behind
    extractor = _distill_extractor(cfg, model.config.out_channels, say) if cfg.distill_teacher else None

    device = resolve_device(cfg.device)
    record = _run_record(cfg, ds, train_samples, val_samples)
    state = _open_run(run, record, say, overwrite)
    if state.get("complete"):
        return _finished(run, state, say)
    random_teacher = cfg.teacher is None and not cfg.distill_teacher
    if random_teacher:
        _warn(say, RANDOM_TEACHER_WARNING)
    _write_json(run / "config.json", {**record["fit"], "method": "efficientad", "pdn_padding": model.config.padding,
                                      "random_weights": "teacher" if random_teacher else None,
                                      "train": asdict(tcfg), "data": record["data"]})
    _write_json(run / "versions.json", _versions(device))
    state.setdefault("stages", {})
    state["weights"] = cfg.teacher or ("distilled" if cfg.distill_teacher else "random")
    ckpt_dir = run / "checkpoints"

    def save_state() -> None:
        state["peak_rss_bytes"] = peak_rss_bytes()
        state["notes"] = notes
        _write_json(run / "state.json", state)

    model.to(device)
    stage = "teacher"
    try:
        if not state["stages"].get("model", {}).get("done"):
            # 1. Teacher.
            if cfg.distill_teacher:
                teacher_file = run / "teacher.safetensors"
                if state["stages"].get("distill", {}).get("done") and teacher_file.is_file():
                    _load_teacher(model, str(teacher_file), cfg.model)
                else:
                    stage = "teacher distillation"
                    extractor.to(device)
                    hist = E.distill_teacher(
                        model.teacher, extractor,
                        lambda step: generic.distill_batch(step, tcfg.distill_batch_size, tcfg.distill_grayscale),
                        tcfg, ckpt_dir, progress=tick, log=say, device=device,
                        # one pass over a folder smaller than the reference's 10,000 images
                        norm_batches=-(-min(tcfg.distill_norm_images, len(generic.paths)) // tcfg.distill_batch_size))
                    save_file_atomic({k: v.cpu() for k, v in model.teacher.state_dict().items()}, teacher_file,
                                     metadata={"model": cfg.model, "format": "visionscale.efficientad.teacher"})
                    state["stages"]["distill"] = {"done": True, "seconds": hist["seconds"], "steps": tcfg.distill_steps,
                                                  "final_loss": hist["loss"][-1] if hist["loss"] else None,
                                                  "teacher_file": str(teacher_file)}
                    save_state()
                del extractor
            # 2. Teacher channel statistics over the training part (also finds unreadable files).
            stage = "teacher statistics"
            read_log = ReadLog()
            n_done = [0]

            def stat_batches():
                for b in iter_batches(train_samples, cfg.image_size, 8, skip_bad=cfg.skip_bad, log=read_log):
                    yield b.images
                    n_done[0] += len(b.samples)
                    tick("teacher stats", n_done[0], len(train_samples))

            model.eval()
            with torch.no_grad():
                mean, std = E.teacher_channel_stats(model.teacher, stat_batches(), device)
            model.teacher_mean.copy_(mean)
            model.teacher_std.copy_(std)
            for n in (read_log.size_note(cfg.image_size), read_log.bad_note()):
                if n:
                    notes.append(n)
                    say(n)
            bad = {p for p, _ in read_log.bad}
            state["bad_images"] = [[str(p), why] for p, why in read_log.bad]
            usable = [s for s in train_samples if s.path not in bad]
            if not usable:
                raise DataError(f"none of the {len(train_samples)} training images could be read: "
                                + (read_log.bad_note() or ""))
            # 3. Student + autoencoder.
            stage = "training"
            store = _ImageStore([s.path for s in usable], cfg.image_size)

            def train_batch(step: int) -> torch.Tensor:
                idx = _epoch_indices(len(usable), tcfg.batch_size, cfg.seed, step, 0)
                return torch.stack([store.get(i) for i in idx])  # (B, 3, H, W)

            penalty = None
            if generic is not None:
                def penalty(step: int) -> torch.Tensor:
                    return generic.penalty_batch(step, tcfg.batch_size, tcfg.penalty_grayscale)

            save_state()
            hist = E.train_efficientad(model, train_batch, tcfg, ckpt_dir, penalty_batch=penalty, progress=tick,
                                       log=say, device=device)
            # 4. Map normalisation on the held-out training images.
            stage = "map normalisation"
            val_log = ReadLog()
            q = E.map_normalization(model, (b.images for b in iter_batches(val_samples, cfg.image_size, 8,
                                                                           skip_bad=cfg.skip_bad, log=val_log)),
                                    tcfg.map_q_start, tcfg.map_q_end, device)
            if val_log.bad:
                notes.append("map normalisation: " + (val_log.bad_note() or ""))
            save_file_atomic({k: v.cpu() for k, v in model.state_dict().items()}, run / "model.safetensors",
                             metadata={"model": cfg.model, "format": "visionscale.efficientad"})
            if generic is not None and generic.bad:
                notes.append(f"skipped {len(generic.bad)} unreadable --imagenet image(s): "
                             + "; ".join(str(p) for p in list(generic.bad)[:10]))
            tail = max(1, len(hist["loss"]) // 20)
            state["stages"]["model"] = {
                "done": True, "seconds": hist["seconds"], "steps": tcfg.steps, "resumed_from": hist["resumed_from"],
                "final_loss": float(np.mean(hist["loss"][-tail:])) if hist["loss"] else None,
                "loss_start": hist["loss"][0] if hist["loss"] and hist["resumed_from"] == 0 else None,
                "train_images": len(usable), "map_quantiles": q, "penalty": generic is not None}
            save_state()
        else:
            from visionscale.io.weights import load_into, load_state_dict

            load_into(model, load_state_dict(run / "model.safetensors"), source=str(run / "model.safetensors"))
            say("training already done: resuming at calibration")
        model.eval()
        stage = "calibration"
        t0 = time.perf_counter()
        calibration, metrics, cal_notes = _calibrate(
            model, ds, val_samples, labelled, True, cfg, device, tick, batch_size=8,
            held_out_what="training images held out of training (the map-normalisation set)", signed_scores=True)
    except BaseException as exc:
        if _is_oom(exc):
            raise _nontrivial_oom(stage, cfg, device) from None
        raise
    return _finish(run, calibration, metrics, cal_notes, notes, say, state, save_state, t0)


@_claims_run_folder
def fit_ddad_run(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FitConfig,
    *,
    category: str | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Train DDAD through :mod:`visionscale.anomaly.ddad_train` and write a run folder.

    The trainer (``DDADTrainConfig``, ``fit_ddad``) owns the DDPM training of the U-Net and
    the feature extractor's domain adaptation; this function owns data, run folder,
    thresholds and metrics, as for the other methods. Scoring wraps the model in
    :class:`SignedInput` (DDAD works on [-1, 1] images).
    """
    import importlib

    from visionscale import registry

    try:
        D = importlib.import_module("visionscale.anomaly.ddad_train")
    except ModuleNotFoundError as exc:
        if exc.name != "visionscale.anomaly.ddad_train":
            raise
        raise FitError(f"--model {config.model} is not implemented yet: its trainer "
                       f"(visionscale.anomaly.ddad_train) is not installed; available now: "
                       f"{', '.join(PATCHCORE_MODELS + EFFICIENTAD_MODELS)}") from None
    say = _say(log)
    tick = progress or (lambda stage, done, total: None)
    defaults = D.DDADTrainConfig()
    overrides = {"seed": config.seed}
    if config.steps is not None:
        overrides["steps"] = config.steps
    if config.batch_size is not None:
        overrides["batch_size"] = config.batch_size
    names = {f.name for f in dataclasses_fields(defaults)}
    if "checkpoint_every" in names:
        overrides["checkpoint_every"] = config.checkpoint_every
    dcfg = dataclasses_replace(defaults, **{k: v for k, v in overrides.items() if k in names})
    cfg = dataclasses_replace(config, steps=getattr(dcfg, "steps", config.steps),
                              batch_size=getattr(dcfg, "batch_size", config.batch_size or 1))
    run = Path(out).expanduser()
    ds = load_dataset(data, category, seed=cfg.seed)
    notes = list(ds.notes)
    for n in notes:
        say(n)
    labelled = ds.test_has_labels
    train_samples, holdout = list(ds.train), []
    if not labelled and len(ds.train) >= 10 and cfg.holdout_fraction > 0:
        train_samples, holdout = _split_holdout(ds.train, cfg.holdout_fraction, cfg.seed, 2)
        notes.append(f"the test set has no labels: {len(holdout)} of {len(ds.train)} training images are held out "
                     f"of training to set the threshold")
        say(notes[-1])
    torch.manual_seed(cfg.seed)
    try:
        model = registry.create(cfg.model, backbone_weights=cfg.weights)
    except WeightsUnavailableError as exc:
        raise FitError(str(exc)) from None
    except FileNotFoundError as exc:
        raise FitError(f"--weights: {exc}") from None
    except (ValueError, RuntimeError) as exc:
        raise FitError(f"--weights {cfg.weights}: {exc}") from None
    try:
        model.validate_input_size(*cfg.image_size)
    except ValueError as exc:
        raise FitError(f"--image-size {cfg.image_size[1]}x{cfg.image_size[0]} does not fit {cfg.model}: {exc}") from None
    device = resolve_device(cfg.device)
    record = _run_record(cfg, ds, train_samples, holdout)
    state = _open_run(run, record, say, overwrite)
    if state.get("complete"):
        return _finished(run, state, say)
    if cfg.weights is None:
        _warn(say, RANDOM_WEIGHTS_WARNING)
    _write_json(run / "config.json", {**record["fit"], "method": "ddad",
                                      "random_weights": "backbone" if cfg.weights is None else None,
                                      "train": asdict(dcfg) if hasattr(dcfg, "__dataclass_fields__") else {},
                                      "data": record["data"]})
    _write_json(run / "versions.json", _versions(device))
    state.setdefault("stages", {})
    state["weights"] = cfg.weights or "random"

    def save_state() -> None:
        state["peak_rss_bytes"] = peak_rss_bytes()
        state["notes"] = notes
        _write_json(run / "state.json", state)

    model.to(device)
    stage = "training"
    read_log = ReadLog()
    try:
        if not state["stages"].get("model", {}).get("done"):
            def train_batches(epoch: int):
                from visionscale.anomaly.efficientad_train import step_seed

                g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, 8))
                order = [train_samples[i] for i in torch.randperm(len(train_samples), generator=g).tolist()]
                for b in iter_batches(order, cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad, log=read_log):
                    yield b.images

            save_state()
            t0 = time.perf_counter()
            history = D.fit_ddad(model, train_batches, dcfg, run / "checkpoints", progress=tick, log=say)
            bad = sorted({(str(p), why) for p, why in read_log.bad})
            state["bad_images"] = [list(b) for b in bad]
            if bad:
                notes.append(f"skipped {len(bad)} unreadable image(s): " + "; ".join(p for p, _ in bad[:10]))
                say(notes[-1])
            model.eval()
            save_file_atomic({k: v.cpu() for k, v in model.state_dict().items()}, run / "model.safetensors",
                             metadata={"model": cfg.model, "format": "visionscale.ddad"})
            losses = history.get("loss", []) if isinstance(history, dict) else []
            state["stages"]["model"] = {"done": True, "seconds": time.perf_counter() - t0,
                                        "steps": getattr(dcfg, "steps", None),
                                        "final_loss": float(losses[-1]) if losses else None}
            save_state()
        else:
            from visionscale.io.weights import load_into, load_state_dict

            load_into(model, load_state_dict(run / "model.safetensors"), source=str(run / "model.safetensors"))
            say("training already done: resuming at calibration")
        model.eval()
        stage = "calibration"
        t0 = time.perf_counter()
        calibration, metrics, cal_notes = _calibrate(
            SignedInput(model).to(device), ds, holdout or train_samples, labelled, bool(holdout), cfg, device, tick,
            batch_size=cfg.batch_size, held_out_what="normal images held out of training")
    except BaseException as exc:
        if _is_oom(exc):
            raise _nontrivial_oom(stage, cfg, device) from None
        raise
    return _finish(run, calibration, metrics, cal_notes, notes, say, state, save_state, t0)

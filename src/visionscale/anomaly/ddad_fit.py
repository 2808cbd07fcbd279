"""Fit DDAD into a run folder: the stages around its trainer.

:mod:`visionscale.anomaly.ddad_train` (``DDADTrainConfig``, ``fit_ddad``) owns the DDPM
training of the U-Net and the feature extractor's domain adaptation; this module owns data,
run folder, thresholds and metrics, as for the other methods. It imports the trainer when a
fit starts, so a missing trainer is a clear "not implemented" error. Scoring wraps the model
in :class:`~visionscale.anomaly.runs.SignedInput` (DDAD works on [-1, 1] images).
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import asdict
from dataclasses import fields as dataclasses_fields
from dataclasses import replace as dataclasses_replace

import torch

from visionscale.anomaly.calibration import calibrate
from visionscale.anomaly.config import (
    EFFICIENTAD_MODELS,
    PATCHCORE_MODELS,
    RANDOM_WEIGHTS_WARNING,
    FitConfig,
    FitError,
    FitResult,
    Log,
    Progress,
)
from visionscale.anomaly.data import ReadLog, Sample
from visionscale.anomaly.tiles import expand_tiles, fit_tiling, iter_sample_batches, shuffled, tiling_fields
from visionscale.anomaly.run import FitRun, out_of_memory_as, training_oom_error
from visionscale.anomaly.runs import SignedInput
from visionscale.device import resolve_device
from visionscale.io.weights import WeightsUnavailableError

__all__ = ["fit_ddad_run"]


def fit_ddad_run(data: str | os.PathLike, out: str | os.PathLike, config: FitConfig, *, category: str | None = None,
                 progress: Progress | None = None, log: Log | None = None, overwrite: bool = False) -> FitResult:
    """Train DDAD through :mod:`visionscale.anomaly.ddad_train` and write a run folder.

    (Named ``fit_ddad_run``: ``ddad_train.fit_ddad`` is the trainer this calls.)
    """
    trainer = _trainer(config)
    dcfg = _train_config(trainer, config)
    cfg = dataclasses_replace(config, steps=getattr(dcfg, "steps", config.steps),
                              batch_size=getattr(dcfg, "batch_size", config.batch_size or 1))
    with FitRun.claim(out, overwrite=overwrite, log=log, progress=progress) as run:
        ds = run.load_data(data, category, cfg.seed)
        train_samples, holdout = run.threshold_holdout(ds, cfg, "training")
        model = _model(cfg)
        device = resolve_device(cfg.device)
        if run.open(cfg, ds, train_samples, holdout):
            return run.finished()
        if cfg.weights is None:
            run.warn(RANDOM_WEIGHTS_WARNING, "weights")
        tiling = fit_tiling(model, cfg)
        run.write_config(device, cfg.weights or "random", method="ddad",
                         random_weights="backbone" if cfg.weights is None else None,
                         train=asdict(dcfg) if hasattr(dcfg, "__dataclass_fields__") else {}, **tiling_fields(tiling))
        model.to(device)
        if run.done("model"):
            run.restore_weights(model)
            run.say("training already done: resuming at calibration")
        else:
            with out_of_memory_as(lambda: training_oom_error("training", cfg, device)):
                _train(trainer, model, expand_tiles(train_samples, tiling) if tiling else train_samples, dcfg, cfg, run)
        model.eval()
        t0 = time.perf_counter()
        with out_of_memory_as(lambda: training_oom_error("calibration", cfg, device)):
            calibration = calibrate(SignedInput(model).to(device), ds, holdout or train_samples, cfg, device,
                                    run.tick, batch_size=cfg.batch_size, tiling=tiling,
                                    held_out_what="normal images held out of training" if holdout else None)
        return run.finish(calibration, time.perf_counter() - t0)


def _trainer(config: FitConfig):
    try:
        return importlib.import_module("visionscale.anomaly.ddad_train")
    except ModuleNotFoundError as exc:
        if exc.name != "visionscale.anomaly.ddad_train":
            raise
        raise FitError(f"model {config.model} is not implemented yet: its trainer "
                       f"(visionscale.anomaly.ddad_train) is not installed; available now: "
                       f"{', '.join(PATCHCORE_MODELS + EFFICIENTAD_MODELS)}").about("model") from None


def _train_config(trainer, config: FitConfig):
    """The trainer's config: its defaults, with what ``config`` sets (and the trainer knows)."""
    defaults = trainer.DDADTrainConfig()
    overrides = {"seed": config.seed}
    if config.steps is not None:
        overrides["steps"] = config.steps
    if config.batch_size is not None:
        overrides["batch_size"] = config.batch_size
    names = {f.name for f in dataclasses_fields(defaults)}
    if "checkpoint_every" in names:
        overrides["checkpoint_every"] = config.checkpoint_every
    return dataclasses_replace(defaults, **{k: v for k, v in overrides.items() if k in names})


def _model(cfg: FitConfig):
    """DDAD from the registry, checked against the image size before the run folder is written."""
    from visionscale import registry

    torch.manual_seed(cfg.seed)
    try:
        model = registry.create(cfg.model, backbone_weights=cfg.weights)
    except WeightsUnavailableError as exc:
        raise FitError(str(exc)).about("weights") from None
    except FileNotFoundError as exc:
        raise FitError(f"weights: {exc}").about("weights") from None
    except (ValueError, RuntimeError) as exc:
        raise FitError(f"weights {cfg.weights}: {exc}").about("weights") from None
    try:
        model.validate_input_size(*cfg.image_size)
    except ValueError as exc:
        raise FitError(f"image_size {cfg.image_size[1]}x{cfg.image_size[0]} does not fit {cfg.model}: "
                       f"{exc}").about("image_size") from None
    return model


def _train(trainer, model, samples: list[Sample], dcfg, cfg: FitConfig, run: FitRun) -> None:
    """Stage ``model``: the trainer over seeded epochs of the training images -> ``model.safetensors``."""
    from visionscale.anomaly.efficientad_train import step_seed

    read_log = ReadLog()

    def train_batches(epoch: int):
        g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, 8))
        order = shuffled(samples, g)
        for b in iter_sample_batches(order, cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad, log=read_log,
                                     workers=cfg.workers):
            yield b.images

    run.save_state()
    t0 = time.perf_counter()
    history = trainer.fit_ddad(model, train_batches, dcfg, run.path / "checkpoints", progress=run.tick, log=run.say)
    bad = sorted({(str(p), why) for p, why in read_log.bad})
    run.state["bad_images"] = [list(b) for b in bad]
    if bad:
        run.note(f"skipped {len(bad)} unreadable image(s): " + "; ".join(p for p, _ in bad[:10]))
    model.eval()
    run.save_weights(model, "visionscale.ddad")
    losses = history.get("loss", []) if isinstance(history, dict) else []
    run.mark("model", seconds=time.perf_counter() - t0, steps=getattr(dcfg, "steps", None),
             final_loss=float(losses[-1]) if losses else None)

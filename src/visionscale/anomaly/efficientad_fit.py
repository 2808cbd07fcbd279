"""Fit EfficientAD (paper Algorithm 1) into a run folder: the stages around its trainer.

:mod:`visionscale.anomaly.efficientad_train` holds the training itself (losses, teacher
distillation and statistics, checkpoints); this module owns what a run needs around it: the
held-out validation images, the generic images for the penalty and distillation, the teacher
file, and the run folder's stages over a :class:`~visionscale.anomaly.run.FitRun`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from visionscale.anomaly import efficientad_train as E
from visionscale.anomaly.calibration import calibrate
from visionscale.anomaly.config import RANDOM_TEACHER_WARNING, FitConfig, FitError, FitResult, Log, Progress
from visionscale.anomaly.data import SKIP_HINT, ADDataset, DataError, ReadLog, Sample
from visionscale.anomaly.tiles import expand_tiles, fit_tiling, iter_sample_batches, read_sample, tiling_fields
from visionscale.anomaly.run import FitRun, out_of_memory_as, split_holdout, training_oom_error
from visionscale.device import resolve_device
from visionscale.io.weights import WeightsUnavailableError

__all__ = ["fit_efficientad"]


def fit_efficientad(data: str | os.PathLike, out: str | os.PathLike, config: FitConfig, *, category: str | None = None,
                    progress: Progress | None = None, log: Log | None = None, overwrite: bool = False) -> FitResult:
    """Train EfficientAD (paper Algorithm 1) on the training images under ``data``; write a run folder.

    Stages: ``teacher`` (load the ``teacher`` file, distil, or random), ``teacher statistics``
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

    cfg = config
    with FitRun.claim(out, overwrite=overwrite, log=log, progress=progress) as run:
        ds = run.load_data(data, category, cfg.seed)
        train_samples, val_samples = _validation_split(ds, cfg, run)
        # Sizes and files first: a bad image_size or teacher file leaves no run folder behind.
        torch.manual_seed(cfg.seed)  # random teacher / student / autoencoder init, identical on resume
        model = registry.create(cfg.model)
        try:
            model.validate_input_size(*cfg.image_size)
        except ValueError as exc:
            raise FitError(f"image_size {cfg.image_size[1]}x{cfg.image_size[0]} is too small for {cfg.model}: "
                           f"{exc}. Every size at or above the minimum works, also non-square "
                           f"ones").about("image_size") from None
        tcfg = E.EfficientADTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                        checkpoint_every=cfg.checkpoint_every, distill_steps=cfg.distill_steps)
        generic = _GenericImages(cfg.imagenet, cfg.image_size, cfg.seed, cfg.skip_bad) if cfg.imagenet else None
        if cfg.teacher is not None:
            _load_teacher(model, cfg.teacher, cfg.model)
        extractor = (_distill_extractor(cfg, model.config.out_channels, lambda m: run.warn(m, "weights"))
                     if cfg.distill_teacher else None)

        device = resolve_device(cfg.device)
        if run.open(cfg, ds, train_samples, val_samples):
            return run.finished()
        random_teacher = cfg.teacher is None and not cfg.distill_teacher
        if random_teacher:
            run.warn(RANDOM_TEACHER_WARNING, "teacher", "distill_teacher", "imagenet")
        tiling = fit_tiling(model, cfg)
        run.write_config(device, cfg.teacher or ("distilled" if cfg.distill_teacher else "random"),
                         method="efficientad", pdn_padding=model.config.padding,
                         random_weights="teacher" if random_teacher else None, train=asdict(tcfg),
                         **tiling_fields(tiling))
        if tiling is not None:  # every stage before calibration trains on (or normalises over) tiles
            train_items, val_items = expand_tiles(train_samples, tiling), expand_tiles(val_samples, tiling)
        else:
            train_items, val_items = train_samples, val_samples
        model.to(device)

        def oom(stage: str):
            return lambda: training_oom_error(stage, cfg, device)

        if run.done("model"):
            run.restore_weights(model)
            run.say("training already done: resuming at calibration")
        else:
            if extractor is not None:
                _distilled_teacher(model, extractor, generic, tcfg, cfg, device, run)
                del extractor
            with out_of_memory_as(oom("teacher statistics")):
                usable = _teacher_statistics(model, train_items, cfg, device, run)
            run.save_state()
            with out_of_memory_as(oom("training")):
                hist = _train(model, usable, generic, tcfg, device, run)
            with out_of_memory_as(oom("map normalisation")):
                quantiles = _map_normalisation(model, val_items, tcfg, cfg, device, run)
            run.save_weights(model, "visionscale.efficientad")
            if generic is not None and generic.bad:
                run.notes.append(f"skipped {len(generic.bad)} unreadable imagenet image(s): "
                                 + "; ".join(str(p) for p in list(generic.bad)[:10]))
            tail = max(1, len(hist["loss"]) // 20)
            run.mark("model", seconds=hist["seconds"], steps=tcfg.steps, resumed_from=hist["resumed_from"],
                     final_loss=float(np.mean(hist["loss"][-tail:])) if hist["loss"] else None,
                     loss_start=hist["loss"][0] if hist["loss"] and hist["resumed_from"] == 0 else None,
                     train_images=len(usable), map_quantiles=quantiles, penalty=generic is not None)
        model.eval()
        t0 = time.perf_counter()
        with out_of_memory_as(oom("calibration")):
            calibration = calibrate(model, ds, val_samples, cfg, device, run.tick, batch_size=8, signed_scores=True,
                                    tiling=tiling,
                                    held_out_what="training images held out of training (the map-normalisation set)")
        return run.finish(calibration, time.perf_counter() - t0)


def _validation_split(ds: ADDataset, cfg: FitConfig, run: FitRun) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): the paper's validation part of the training images, always held out."""
    if len(ds.train) < 2:
        raise DataError(f"EfficientAD needs at least 2 training images (a held-out part sets its map "
                        f"normalisation); {ds.root} has {len(ds.train)}")
    train, val = split_holdout(ds.train, cfg.holdout_fraction, cfg.seed, 1)
    run.note(f"{len(val)} of {len(ds.train)} training images (seeded) are held out of training: they set the map "
             f"normalisation (paper: validation part of the training images)"
             + ("" if ds.test_has_labels else " and the threshold"))
    return train, val


def _distilled_teacher(model, extractor, generic: _GenericImages, tcfg, cfg: FitConfig, device: torch.device,
                       run: FitRun) -> None:
    """Stage ``distill``: the teacher distilled from WRN-101-2 features (or the one a rerun saved)."""
    teacher_file = run.path / "teacher.safetensors"
    if run.done("distill") and teacher_file.is_file():
        _load_teacher(model, str(teacher_file), cfg.model)
        return
    with out_of_memory_as(lambda: training_oom_error("teacher distillation", cfg, device)):
        extractor.to(device)
        hist = E.distill_teacher(
            model.teacher, extractor,
            lambda step: generic.distill_batch(step, tcfg.distill_batch_size, tcfg.distill_grayscale),
            tcfg, run.path / "checkpoints", progress=run.tick, log=run.say, device=device,
            # one pass over a folder smaller than the reference's 10,000 images
            norm_batches=-(-min(tcfg.distill_norm_images, len(generic.paths)) // tcfg.distill_batch_size))
    run.save_weights(model.teacher, "visionscale.efficientad.teacher", name="teacher.safetensors")
    run.mark("distill", seconds=hist["seconds"], steps=tcfg.distill_steps,
             final_loss=hist["loss"][-1] if hist["loss"] else None, teacher_file=str(teacher_file))


def _teacher_statistics(model, samples: list[Sample], cfg: FitConfig, device: torch.device,
                        run: FitRun) -> list[Sample]:
    """Teacher channel mean / std over the training part; returns the readable training images."""
    read_log = ReadLog()
    n_done = [0]

    def stat_batches():
        for b in iter_sample_batches(samples, cfg.image_size, 8, skip_bad=cfg.skip_bad, log=read_log,
                                     workers=cfg.workers):
            yield b.images
            n_done[0] += len(b.samples)
            run.tick("teacher stats", n_done[0], len(samples))

    model.eval()
    with torch.no_grad():
        mean, std = E.teacher_channel_stats(model.teacher, stat_batches(), device)
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    run.note(read_log.size_note(cfg.image_size))
    run.note(read_log.bad_note())
    bad = {p for p, _ in read_log.bad}
    run.state["bad_images"] = [[str(p), why] for p, why in read_log.bad]
    usable = [s for s in samples if s.path not in bad]
    if not usable:
        raise DataError(f"none of the {len(samples)} training images could be read: " + (read_log.bad_note() or ""))
    return usable


def _train(model, usable: list[Sample], generic: _GenericImages | None, tcfg, device: torch.device,
           run: FitRun) -> dict:
    """Stage ``train``: student + autoencoder, checkpointed in ``RUN/checkpoints``."""
    store = _ImageStore(usable, run.cfg.image_size)
    seed = run.cfg.seed

    def train_batch(step: int) -> torch.Tensor:
        idx = _epoch_indices(len(usable), tcfg.batch_size, seed, step, 0)
        return torch.stack([store.get(i) for i in idx])  # (B, 3, H, W)

    def penalty(step: int) -> torch.Tensor:
        return generic.penalty_batch(step, tcfg.batch_size, tcfg.penalty_grayscale)

    return E.train_efficientad(model, train_batch, tcfg, run.path / "checkpoints",
                               penalty_batch=penalty if generic is not None else None, progress=run.tick, log=run.say,
                               device=device)


def _map_normalisation(model, val_samples: list[Sample], tcfg, cfg: FitConfig, device: torch.device,
                       run: FitRun):
    """Quantiles of the maps on the held-out training images."""
    val_log = ReadLog()
    q = E.map_normalization(model, (b.images for b in iter_sample_batches(val_samples, cfg.image_size, 8,
                                                                   skip_bad=cfg.skip_bad, log=val_log)),
                            tcfg.map_q_start, tcfg.map_q_end, device)
    if val_log.bad:
        run.notes.append("map normalisation: " + (val_log.bad_note() or ""))
    return q


def _epoch_indices(n: int, batch_size: int, seed: int, step: int, stream: int) -> list[int]:
    """Indices of step ``step``'s batch: epochs are permutations seeded by ``(seed, epoch)``."""
    per_epoch = -(-n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(E.step_seed(seed, epoch, stream))).tolist()
    return perm[pos * batch_size:(pos + 1) * batch_size]


class _ImageStore:
    """Images by index at one size, ImageNet-normalised; kept in memory when they fit ``budget`` bytes."""

    def __init__(self, samples: list[Sample], size: tuple[int, int], budget: int = 512 * 2**20):
        self.samples, self.size = samples, size
        h, w = size
        self.cache: dict[int, torch.Tensor] | None = {} if len(samples) * 3 * h * w * 4 <= budget else None

    def get(self, i: int) -> torch.Tensor:
        from visionscale.anomaly.data import to_model_input

        t = self.cache.get(i) if self.cache is not None else None
        if t is None:
            t = to_model_input(read_sample(self.samples[i], self.size)[0], self.size)  # (3, H, W), image or tile
            if self.cache is not None:
                self.cache[i] = t
        return t


class _GenericImages:
    """A folder of generic (ImageNet-like) images for EfficientAD's penalty and teacher distillation."""

    def __init__(self, folder: str, size: tuple[int, int], seed: int, skip_bad: bool):
        from visionscale.io.images import list_images

        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataError(f"imagenet folder not found: {root} (a folder of generic images, e.g. ImageNet's "
                            f"train/)").about("imagenet")
        self.paths = list_images(root, recursive=True)
        if not self.paths:
            raise DataError(f"imagenet folder {root} holds no images").about("imagenet")
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
                    raise DataError(f"{exc} (in the imagenet folder); {SKIP_HINT}").about("imagenet",
                                                                                      "skip_bad") from None
                self.bad[p] = str(exc)
        raise DataError(f"none of the {n} imagenet images could be read").about("imagenet")

    def penalty_batch(self, step: int, batch_size: int, grayscale: float) -> torch.Tensor:
        """Ref. penalty transform: resize to 2H x 2W, random grayscale, centre crop H x W."""
        from visionscale.anomaly.data import to_model_input

        h, w = self.size
        idx = _epoch_indices(len(self.paths), batch_size, self.seed, step, 3)
        x = torch.stack([to_model_input(self._read(i), (2 * h, 2 * w)) for i in idx])  # (B, 3, 2H, 2W)
        x = x[:, :, h // 2:h // 2 + h, w // 2:w // 2 + w]  # centre crop (B, 3, H, W)
        return E.to_grayscale(x, grayscale, torch.Generator().manual_seed(E.step_seed(self.seed, step, 4)))

    def distill_batch(self, step: int, batch_size: int, grayscale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(extractor input at 2H x 2W, PDN input at H x W) of the same images, same grayscale draw."""
        from visionscale.anomaly.data import to_model_input

        h, w = self.size
        stream = 5 if step >= 0 else 6
        idx = _epoch_indices(len(self.paths), batch_size, self.seed, abs(step), stream)
        arrs = [self._read(i) for i in idx]
        big = torch.stack([to_model_input(a, (2 * h, 2 * w)) for a in arrs])
        small = torch.stack([to_model_input(a, (h, w)) for a in arrs])
        gseed = E.step_seed(self.seed, step, 7)
        return (E.to_grayscale(big, grayscale, torch.Generator().manual_seed(gseed)),
                E.to_grayscale(small, grayscale, torch.Generator().manual_seed(gseed)))


def _load_teacher(model, path: str, name: str) -> None:
    """Load the ``teacher`` weights file into ``model.teacher``: a bare PDN state dict, or one under
    ``teacher.`` (a visionscale run's model.safetensors) or ``model.teacher.`` (anomalib)."""
    from visionscale.io.weights import (
        StateDictMismatchError,
        load_into,
        load_state_dict,
    )

    try:
        state = load_state_dict(path)
    except FileNotFoundError:
        raise FitError(f"teacher weights file not found: {path}").about("teacher") from None
    except ValueError as exc:
        raise FitError(f"teacher {path}: {exc}").about("teacher") from None
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
        raise FitError(f"teacher {path} does not fit the {name} teacher (PDN-{cfg.variant.upper()}, "
                       f"{cfg.out_channels} output channels): {exc}").about("teacher") from None


def _distill_extractor(cfg: FitConfig, out_channels: int, warn: Log):
    """WRN-101-2 layer2 + layer3 patch features pooled to the teacher's channels (resnet_tiny for the tiny model)."""
    from visionscale.anomaly.patchcore import PatchFeatureExtractor
    from visionscale.nn import resnet

    tiny = cfg.model == "efficientad_tiny"
    arch = "resnet_tiny" if tiny else "wide_resnet101_2"
    weights = cfg.weights if cfg.weights is not None else (None if tiny else "DEFAULT")
    random_note = (f"running on RANDOM {arch} weights for the teacher distillation (allow_random_weights): the "
                   f"distilled teacher imitates random features and its anomaly scores mean little; set weights "
                   f"to a file (torchvision's ImageNet {arch} state dict) for a real teacher")
    try:
        if weights is None:
            if not cfg.allow_random_weights:
                raise FitError(f"{cfg.model} distils from {arch}, which has no published weights: set weights "
                               f"to a file or allow_random_weights").about("weights", "allow_random_weights")
            warn(random_note)
        backbone = getattr(resnet, arch)(weights=weights, progress=False, num_classes=0)
    except WeightsUnavailableError as exc:
        if not cfg.allow_random_weights:
            raise FitError(f"teacher distillation needs ImageNet {arch} weights: {exc}\nor set "
                           f"allow_random_weights to distil from a RANDOM {arch} (meaningless "
                           f"teacher)").about("weights", "allow_random_weights") from None
        warn(random_note)
        backbone = getattr(resnet, arch)(weights=None, num_classes=0)
    except FileNotFoundError as exc:
        raise FitError(f"weights: {exc}").about("weights") from None
    except (ValueError, RuntimeError) as exc:
        raise FitError(f"weights {weights}: {exc}").about("weights") from None
    for stage in ("layer4",):
        if hasattr(backbone, stage):
            delattr(backbone, stage)  # never runs
    return PatchFeatureExtractor(backbone, ("layer2", "layer3"), 3, 32 if tiny else 1024, out_channels)


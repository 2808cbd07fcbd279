"""Train, evaluate and apply an image classifier on an image-folder data set.

Training (seed 004's transfer-learning recipe):

1. with pretrained ``weights`` the backbone is frozen (its BatchNorm statistics too) and
   only the new linear head learns (phase ``"frozen"``); without weights every layer
   learns from scratch (phase ``"full"``);
2. optionally (``finetune_epochs > 0``) the backbone is unfrozen, from ``unfreeze_from``
   on, and everything trains on at the lower ``finetune_lr`` (phase ``"finetune"``).

Each phase stops early once the validation loss has not improved for ``patience``
epochs; the weights with the lowest validation loss so far are what ``model.safetensors``
holds and what the run ends with. After every epoch ``last.safetensors`` records
weights, optimiser state and progress, so ``resume=True`` continues an interrupted run;
shuffling, augmentation and dropout are seeded per epoch, so a resumed run ends with
the same weights as one that was never interrupted (on the same device).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.classify.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    load_classifier,
    read_metadata,
    save_classifier,
)
from visionscale.classify.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    DataError,
    ImageFolderSamples,
    augment_batch,
    load_images,
    normalize,
    scan_image_folder,
    split_samples,
)
from visionscale.classify.metrics import classification_report
from visionscale.classify.model import MAX_IMAGE_SIZE, Classifier, ClassifierConfig, count_parameters
from visionscale.device import resolve_device
from visionscale.errors import (
    InvalidFileError,
    VisionscaleError,
    check_finite,
    check_int,
)
from visionscale.io.images import collect_images
from visionscale.io.weights import (
    config_differences,
    load_into,
    load_state_dict,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_file_atomic,
)
from visionscale.io.atomic import write_atomic
from visionscale.io.outputs import OutputDir, RunLock, record_files, refuse_foreign
from visionscale.io.outputs import ensure_output_dir as check_output_dir

__all__ = [
    "TrainConfig", "TrainResult", "TrainError", "train", "evaluate", "evaluate_model", "predict", "write_eval_outputs",
    "check_eval_outputs", "augmentation_preview", "resolve_device",
]

LAST_FILE = "last.safetensors"
RUN_KIND = "classify-run"  # manifest kind of a training folder
EVAL_KIND = "classify-eval"  # manifest kind of an evaluation folder
RUN_FILES = (MODEL_FILE, LAST_FILE, CONFIG_FILE, "history.json", "history.csv", "metrics_val.json", "curves.png",
             "confusion_val.png", "augmentations.png")
Progress = Callable[[str], None]


class TrainError(VisionscaleError, ValueError):
    """Settings or output folder that make a run impossible (nothing is written then)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in ``config.json``).

    Attributes:
        backbone: Registry name (``resnet18``, ``resnet50``, ``resnet_tiny``...).
        weights: Pretrained backbone weights: None trains from scratch; ``"DEFAULT"``,
            a weights name or a ``.pth``/``.safetensors`` file starts from them.
        image_size: Square input side in pixels.
        epochs: Most epochs of the first phase.
        finetune_epochs: Most epochs of the fine-tuning phase (0 = none).
        batch_size: Images per step.
        lr: AdamW learning rate of the first phase.
        finetune_lr: Learning rate of the fine-tuning phase (lower, so the pretrained
            features move slowly).
        weight_decay: AdamW decoupled weight decay.
        patience: Epochs without a lower validation loss before a phase stops.
        min_delta: How much lower the validation loss must be to count as better.
        val_fraction: Share of each class held out when there is no validation folder.
        seed: Seeds the split, shuffling, augmentation, dropout and the head's init.
        freeze: Freeze the backbone in the first phase; None = freeze iff ``weights``.
        unfreeze_from: Fine-tune only this backbone stage and later ones (``"layer3"``);
            None = all of it.
        dropout: Dropout before the linear head.
        augment: Random affine augmentation of training images.
        precise_bn: Before each validation, re-estimate the BatchNorm statistics of the
            layers being trained from the (unaugmented) training images. With few steps
            per epoch the running averages lag far behind the weights and make
            eval-mode predictions useless; Wu & Johnson, "Rethinking 'Batch' in
            BatchNorm", arXiv:2105.07576 ("precise BN").
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
    """

    backbone: str = "resnet18"
    weights: str | None = None
    image_size: int = 224
    epochs: int = 20
    finetune_epochs: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    min_delta: float = 0.0
    val_fraction: float = 0.2
    seed: int = 0
    freeze: bool | None = None
    unfreeze_from: str | None = None
    dropout: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    precise_bn: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("finetune_epochs", self.finetune_epochs, minimum=0)
        check_int("image_size", self.image_size, minimum=16, maximum=MAX_IMAGE_SIZE)
        check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)  # numpy and torch seeds
        for name in ("lr", "finetune_lr"):
            check_finite(name, getattr(self, name), minimum=0.0, min_inclusive=False)
        check_finite("weight_decay", self.weight_decay, minimum=0.0)
        check_finite("min_delta", self.min_delta, minimum=0.0)
        check_finite("val_fraction", self.val_fraction, minimum=0.0, maximum=1.0, min_inclusive=False,
                     max_inclusive=False)
        check_finite("dropout", self.dropout, minimum=0.0, maximum=1.0, max_inclusive=False)
        if self.finetune_epochs and not self.frozen_first:
            raise TrainError("fine-tuning follows a frozen first phase: pass pretrained weights (or set freeze), "
                             "or set finetune epochs to 0 when training from scratch")

    @property
    def frozen_first(self) -> bool:
        return self.weights is not None if self.freeze is None else self.freeze

    def phases(self) -> list[dict]:
        """``[{name, epochs, lr, frozen, train_from}, ...]`` in order."""
        if not self.frozen_first:
            return [dict(name="full", epochs=self.epochs, lr=self.lr, frozen=False, train_from=None)]
        out = [dict(name="frozen", epochs=self.epochs, lr=self.lr, frozen=True, train_from=None)]
        if self.finetune_epochs:
            out.append(dict(name="finetune", epochs=self.finetune_epochs, lr=self.finetune_lr, frozen=False,
                            train_from=self.unfreeze_from))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("augment"), dict):
            kw["augment"] = AugmentConfig(**kw["augment"])
        return cls(**kw)


# Settings a resumed run may change: they extend or re-host the run without changing
# what was already computed.
RESUMABLE_CHANGES = ("epochs", "finetune_epochs", "patience", "device")


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    classes: list[str]
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    val_report: dict
    files: list[Path]


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    chunks = list(torch.split(order, batch_size))
    # A last batch of one image breaks BatchNorm in training mode (a single value per
    # channel at 1x1 spatial size); fold it into the previous batch.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


@torch.no_grad()
def _evaluate_tensors(model: Classifier, images: Tensor, labels: Tensor, cfg: ClassifierConfig,
                      device: torch.device, batch_size: int, forward=None) -> tuple[float, Tensor]:
    """Mean cross-entropy and softmax probabilities ``(N, K)`` in eval mode; ``forward`` runs
    the network when given (a :class:`visionscale.runtime.Runner` around ``model``)."""
    model.eval()
    run = forward or model
    total, probs = 0.0, []
    for idx in _batches(len(images), batch_size, None):
        x = normalize(images[idx].to(device), cfg.mean, cfg.std)
        logits = run(x).float()
        y = labels[idx].to(device)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits, 1).cpu())
    return total / max(1, len(images)), torch.cat(probs) if probs else torch.empty(0, cfg.num_classes)


@torch.no_grad()
def _precise_bn(model: Classifier, images: Tensor, cfg: ClassifierConfig, device: torch.device, batch_size: int) -> None:
    """Recompute the running mean/var of every BatchNorm in training mode as exact averages
    over ``images`` (frozen ones, in eval mode, are left alone)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    for idx in _batches(len(images), batch_size, None):
        model(normalize(images[idx].to(device), cfg.mean, cfg.std))
    for m, mom in zip(bns, momenta):
        m.momentum = mom


def _optimizer(model: Classifier, phase: dict, weight_decay: float) -> torch.optim.Optimizer:
    model.freeze_backbone(phase["frozen"], phase["train_from"])
    return torch.optim.AdamW(model.trainable_parameters(), lr=phase["lr"], weight_decay=weight_decay)






def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False, default=_jsonable) + "\n").encode()


def _jsonable(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _history_csv(history: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    return buf.getvalue().encode()


def _load_split(data_dir: Path, val_dir: Path | None, cfg: TrainConfig) -> tuple[ImageFolderSamples, ImageFolderSamples, str]:
    train = scan_image_folder(data_dir, min_classes=2)
    if val_dir is not None:
        val = scan_image_folder(val_dir, classes=train.classes, min_classes=1)
        return train, val, f"folder {val_dir}"
    tr, va = split_samples(train, cfg.val_fraction, cfg.seed)
    return tr, va, f"seeded split ({cfg.val_fraction:.0%} per class, seed {cfg.seed})"


def _check_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder holding files no classifier run wrote (unless ``overwrite``) or,
    when neither resuming nor overwriting, a run of ours. Writes nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"output folder {out_dir} exists and is not a folder")
    refuse_foreign(out_dir, RUN_KIND, overwrite=overwrite, writer="a visionscale training run")
    if not resume and not overwrite and any((out_dir / n).exists() for n in (LAST_FILE, MODEL_FILE)):
        raise TrainError(f"{out_dir} already holds a training run: resume it, replace it, "
                         f"or choose another output folder")


def _claim_run_dir(out_dir: Path, resume: bool, overwrite: bool, augment: bool) -> None:
    """Record in the folder's manifest the files this run writes, before it writes them, so a
    later run (or a resume) knows them as ours; replacing a run first removes the old one's."""
    record_files(out_dir, RUN_KIND, [f for f in RUN_FILES if augment or f != "augmentations.png"],
                 replace=overwrite and not resume)


def _check_resume(out_dir: Path, cfg: TrainConfig) -> tuple[dict, dict[str, Tensor]]:
    last = out_dir / LAST_FILE
    if not last.exists():
        raise TrainError(f"nothing to resume: {last} does not exist")
    meta = read_metadata(last)
    if "resume" not in meta:
        raise TrainError(f"{last} is not a visionscale training state")
    try:
        state = json.loads(meta["resume"])
    except ValueError as exc:
        raise InvalidFileError(f"{last}: the training state is not valid JSON ({exc})") from None
    fields_ = ("train_config", "classes", "history", "best_val_loss", "best_epoch", "phase", "epoch_in_phase",
               "bad_epochs")
    missing = [k for k in fields_ if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise InvalidFileError(f"{last}: damaged training state (field {', '.join(missing)} missing)")
    try:
        saved = TrainConfig.from_dict(state["train_config"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidFileError(f"{last}: damaged training state (field train_config: {exc})") from None
    diffs = config_differences(saved, cfg, RESUMABLE_CHANGES)
    if diffs:
        raise TrainError("a resumed run must use the settings of the interrupted one; differs in " + "; ".join(diffs))
    return state, safetensors.torch.load_file(str(last))


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    val_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a classifier on ``data_dir`` and write checkpoints, metrics and plots to ``out_dir``.

    Files written: ``model.safetensors`` (best weights + config in its header),
    ``config.json``, ``last.safetensors`` (resume state), ``history.json``/``.csv``,
    ``metrics_val.json``, and with ``plots``: ``curves.png``, ``confusion_val.png``,
    ``augmentations.png`` (when augmentation is on).

    Args:
        data_dir: ``<class>/<images>`` folder for training (and validation unless ``val_dir``).
        out_dir: Output folder; must not hold another run unless ``resume`` or ``overwrite``.
        cfg: Settings.
        val_dir: Separate validation folder with the same class names (subset allowed).
        resume: Continue the run in ``out_dir`` from its ``last.safetensors``.
        overwrite: Start over even if ``out_dir`` holds a run.
        progress: Receives one-line status messages.
        on_epoch: Receives each epoch's history row once it is saved.

    Raises:
        DataError, ImageReadError, TrainError, CheckpointError: bad input, before any file is written.
        OutputExistsError: ``out_dir`` holds files no training run wrote (and not ``overwrite``).
        RunLockedError: another process is training into ``out_dir``.
    """
    say = progress or (lambda msg: None)
    data_dir, out_dir = Path(data_dir).expanduser(), Path(out_dir).expanduser()
    device = resolve_device(cfg.device)
    _check_run_dir(out_dir, resume, overwrite)  # before the lock file: a refused folder stays as it was
    # The lock is held while the run writes; a folder that exists is locked at once (a busy
    # one fails before any image is decoded), a new one only once there is something to write.
    lock = RunLock(out_dir, what="training run folder")
    held = False

    def claim() -> None:
        nonlocal held
        if not held:
            lock.acquire()
            held = True
            _check_run_dir(out_dir, resume, overwrite)  # again: another process may have written meanwhile

    try:
        if out_dir.is_dir():
            claim()
        return _train(data_dir, out_dir, cfg, device, val_dir, resume, overwrite, claim, say, on_epoch)
    finally:
        lock.release()


def _train(data_dir: Path, out_dir: Path, cfg: TrainConfig, device: torch.device, val_dir, resume: bool,
           overwrite: bool, claim: Callable[[], None], say: Progress, on_epoch) -> TrainResult:
    resume_state, resume_tensors = _check_resume(out_dir, cfg) if resume else (None, None)

    train_s, val_s, val_source = _load_split(data_dir, Path(val_dir).expanduser() if val_dir else None, cfg)
    if resume_state is not None and resume_state["classes"] != train_s.classes:
        raise TrainError(f"classes changed since the interrupted run: {resume_state['classes']} vs {train_s.classes}")
    say(f"decoding {len(train_s) + len(val_s)} images at {cfg.image_size} px")
    x_train = load_images(train_s.paths, cfg.image_size)  # (N, 3, S, S) uint8
    x_val = load_images(val_s.paths, cfg.image_size)
    y_train = torch.tensor(train_s.labels, dtype=torch.long)
    y_val = torch.tensor(val_s.labels, dtype=torch.long)

    torch.manual_seed(cfg.seed)  # the head's init
    model_cfg = ClassifierConfig(backbone=cfg.backbone, classes=tuple(train_s.classes), image_size=cfg.image_size,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD, dropout=cfg.dropout)
    say(f"building {cfg.backbone} ({'weights ' + str(cfg.weights) if cfg.weights else 'random init, from scratch'})")
    # Pretrained weights are loaded only for a fresh run; a resumed one restores its own.
    model = Classifier(model_cfg, weights=cfg.weights if resume_state is None else None)
    model.to(device)
    check_output_dir(out_dir)
    claim()
    _claim_run_dir(out_dir, resume, overwrite, cfg.augment.active)
    phases = cfg.phases()

    history: list[dict] = []
    best_loss, best_epoch = math.inf, -1
    phase_i, epoch_in_phase, bad = 0, 0, 0
    if resume_state is not None:
        load_into(model, {k[6:]: v for k, v in resume_tensors.items() if k.startswith("model.")}, source=str(out_dir / LAST_FILE))
        history = resume_state["history"]
        best_loss, best_epoch = resume_state["best_val_loss"], resume_state["best_epoch"]
        phase_i, epoch_in_phase, bad = resume_state["phase"], resume_state["epoch_in_phase"], resume_state["bad_epochs"]
        if epoch_in_phase == 0 and phase_i > 0:
            # Interrupted between phases: the next one starts from the best weights, as it
            # would have without the interruption.
            load_into(model, load_state_dict(out_dir / MODEL_FILE), source=str(out_dir / MODEL_FILE))
        say(f"resuming after epoch {len(history)}")

    data_info = {"train_dir": str(data_dir), "validation": val_source, "classes": train_s.classes,
                 "train_counts": train_s.counts(), "val_counts": val_s.counts()}
    files: set[Path] = set()

    def write(name: str, data: bytes) -> None:
        write_atomic(out_dir / name, data)
        files.add(out_dir / name)

    if cfg.augment.active and resume_state is None:
        write("augmentations.png", augmentation_preview(x_train, y_train, train_s.classes, cfg.augment, cfg.seed))

    while phase_i < len(phases):
        phase = phases[phase_i]
        opt = _optimizer(model, phase, cfg.weight_decay)
        if resume_state is not None and resume_state["phase"] == phase_i and resume_state.get("optim"):
            optimizer_from_tensors(opt, resume_tensors, resume_state["optim"])
        resume_state = None
        trainable = count_parameters(model, trainable_only=True)
        say(f"phase {phase['name']}: {trainable:,} trainable parameters, lr {phase['lr']:g}")
        stopped = bad >= cfg.patience
        while epoch_in_phase < phase["epochs"] and not stopped:
            t0 = time.perf_counter()
            epoch = len(history) + 1
            # Per-epoch seeds: a resumed run draws the same numbers as an uninterrupted one.
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
            model.train()
            loss_sum, correct = 0.0, 0
            for idx in _batches(len(x_train), cfg.batch_size, gen):
                x = x_train[idx].to(device).float()  # (B, 3, S, S) in 0..255
                x = augment_batch(x, cfg.augment, gen)
                x = normalize(x, model_cfg.mean, model_cfg.std)
                y = y_train[idx].to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == y).sum())
            if cfg.precise_bn:
                _precise_bn(model, x_train, model_cfg, device, cfg.batch_size)  # model still in train mode
            val_loss, val_prob = _evaluate_tensors(model, x_val, y_val, model_cfg, device, cfg.batch_size * 2)
            val_acc = float((val_prob.argmax(1) == y_val).float().mean())
            row = {"epoch": epoch, "phase": phase["name"], "lr": phase["lr"],
                   "train_loss": loss_sum / len(x_train), "train_acc": correct / len(x_train),
                   "val_loss": val_loss, "val_acc": val_acc, "seconds": round(time.perf_counter() - t0, 3)}
            if not math.isfinite(val_loss):
                raise TrainError(f"validation loss became {val_loss} at epoch {epoch}: lower the learning rate")
            history.append(row)
            epoch_in_phase += 1
            if val_loss < best_loss - cfg.min_delta:
                best_loss, best_epoch, bad = val_loss, epoch, 0
                save_classifier(model, out_dir / MODEL_FILE, extra={"epoch": str(epoch), "val_loss": repr(val_loss)})
                files.add(out_dir / MODEL_FILE)
            else:
                bad += 1
            stopped = bad >= cfg.patience
            done_phase = stopped or epoch_in_phase >= phase["epochs"]
            _save_last(out_dir, model, opt, cfg, train_s.classes, history, best_loss, best_epoch,
                       phase_i + 1 if done_phase else phase_i, 0 if done_phase else epoch_in_phase,
                       0 if done_phase else bad, with_optim=not done_phase)
            files.add(out_dir / LAST_FILE)
            say(f"epoch {epoch} [{phase['name']}] train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
                f"val loss {val_loss:.4f} acc {val_acc:.3f}" + (" *" if best_epoch == epoch else ""))
            if on_epoch is not None:
                on_epoch(row)
        if stopped:
            say(f"phase {phase['name']}: early stop, no lower validation loss for {cfg.patience} epochs")
        # The next phase (and the run's result) starts from the best weights so far.
        load_into(model, load_state_dict(out_dir / MODEL_FILE), source=str(out_dir / MODEL_FILE))
        phase_i, epoch_in_phase, bad = phase_i + 1, 0, 0

    # Final outputs from the best weights.
    model.freeze_backbone(False)
    _, val_prob = _evaluate_tensors(model, x_val, y_val, model_cfg, device, cfg.batch_size * 2)
    report = classification_report(y_val.tolist(), val_prob.argmax(1).tolist(), train_s.classes)
    report["loss"] = best_loss
    from visionscale.classify.plots import confusion_png, curves_png

    write("history.json", _json_bytes(history))
    write("history.csv", _history_csv(history))
    write("metrics_val.json", _json_bytes(report))
    write("curves.png", curves_png(history))
    write("confusion_val.png", confusion_png(report["confusion_matrix"], train_s.classes,
                                              title=f"validation, epoch {best_epoch}"))
    summary = {
        "format": "visionscale.classify.run/1",
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "data": data_info,
        "result": {"best_epoch": best_epoch, "best_val_loss": best_loss, "val_accuracy": report["accuracy"],
                   "epochs_run": len(history), "phases": [p["name"] for p in phases],
                   "parameters": count_parameters(model)},
    }
    write(CONFIG_FILE, _json_bytes(summary))
    return TrainResult(out_dir, train_s.classes, history, best_epoch, best_loss, report, sorted(files))


def _save_last(out_dir: Path, model: Classifier, opt, cfg: TrainConfig, classes: list[str], history: list[dict],
               best_loss: float, best_epoch: int, phase: int, epoch_in_phase: int, bad: int, with_optim: bool) -> None:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    optim_meta = None
    if with_optim:
        t, optim_meta = optimizer_to_tensors(opt)
        tensors.update(t)
    state = {"train_config": cfg.to_dict(), "classes": classes, "history": history, "best_val_loss": best_loss,
             "best_epoch": best_epoch, "phase": phase, "epoch_in_phase": epoch_in_phase, "bad_epochs": bad,
             "optim": optim_meta}
    save_file_atomic(tensors, out_dir / LAST_FILE, metadata={"resume": json.dumps(state, default=_jsonable)})


def augmentation_preview(images: Tensor, labels: Tensor, classes: Sequence[str], aug: AugmentConfig, seed: int,
                         per_class: int = 1, variants: int = 5) -> bytes:
    """PNG: per class, one training image then ``variants`` augmented copies of it."""
    from visionscale.classify.inspect import tile_grid

    gen = torch.Generator().manual_seed(seed)
    tiles = []
    for c in range(len(classes)):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        for i in idx.tolist():
            x = images[i : i + 1].float().expand(variants, -1, -1, -1)
            aug_x = augment_batch(x.contiguous(), aug, gen)
            row = torch.cat([images[i : i + 1].float(), aug_x]).clamp(0, 255).byte()
            tiles += [t.permute(1, 2, 0).numpy() for t in row]
    return tile_grid(tiles, cols=variants + 1, min_tile=64)




@torch.no_grad()
def predict(checkpoint: str | Path, inputs: Sequence[str | Path], top_k: int = 3, batch_size: int = 64,
            device: str = "auto", backend: str = "eager", precision: str = "fp32") -> list[dict]:
    """Class probabilities for image files (or folders, searched recursively); ``backend`` and
    ``precision`` as :class:`visionscale.runtime.Runner` takes them.

    Returns:
        One ``{"path", "label", "probability", "top": [[label, probability], ...]}`` per image.
    """
    check_int("top_k", top_k, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    dev = resolve_device(device)
    model = load_classifier(checkpoint, device=str(dev))
    cfg = model.config
    files = _collect_inputs(inputs)
    k = min(top_k, cfg.num_classes)
    from visionscale.runtime import accelerate

    run = accelerate(model, backend, precision, dev, image_size=(cfg.image_size, cfg.image_size))
    out = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        x = normalize(load_images(chunk, cfg.image_size).to(dev), cfg.mean, cfg.std)
        prob = torch.softmax(run(x).float(), 1).cpu()
        p, i = prob.topk(k, dim=1)
        for path, pr, ix in zip(chunk, p.tolist(), i.tolist()):
            top = [[cfg.classes[j], float(q)] for j, q in zip(ix, pr)]
            out.append({"path": str(path), "label": top[0][0], "probability": top[0][1], "top": top})
    return out


@torch.no_grad()
def evaluate(checkpoint: str | Path, data_dir: str | Path, batch_size: int = 64, device: str = "auto",
             backend: str = "eager", precision: str = "fp32") -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on a labelled folder;
    ``backend`` and ``precision`` as :class:`visionscale.runtime.Runner` takes them.

    The folder's class names must be classes of the model (a subset is fine).

    Returns:
        :func:`~visionscale.classify.metrics.classification_report` plus ``"loss"``,
        ``"runtime"`` (backend, precision, device, provider) and ``"predictions"`` (path,
        true, predicted, probability per image).
    """
    from visionscale.runtime import accelerate, runtime_info

    check_int("batch_size", batch_size, minimum=1)
    dev = resolve_device(device)
    model = load_classifier(checkpoint, device=str(dev))
    size = model.config.image_size
    run = accelerate(model, backend, precision, dev, image_size=(size, size))
    report = evaluate_model(model, data_dir, batch_size, dev, forward=run)
    report["runtime"] = runtime_info(run, dev)
    return report


@torch.no_grad()
def evaluate_model(model: Classifier, data_dir: str | Path, batch_size: int = 64, device: str | torch.device = "cpu",
                   forward=None) -> dict:
    """:func:`evaluate` for a loaded classifier (on ``device``); ``forward`` runs the network
    when given (a :class:`visionscale.runtime.Runner` around ``model``)."""
    check_int("batch_size", batch_size, minimum=1)
    cfg = model.config
    samples = scan_image_folder(data_dir, classes=list(cfg.classes), min_classes=1)
    images = load_images(samples.paths, cfg.image_size)
    labels = torch.tensor(samples.labels, dtype=torch.long)
    loss, prob = _evaluate_tensors(model, images, labels, cfg, torch.device(device), batch_size, forward=forward)
    pred = prob.argmax(1)
    report = classification_report(samples.labels, pred.tolist(), list(cfg.classes))
    report["loss"] = loss
    report["predictions"] = [
        {"path": str(p), "true": cfg.classes[t], "predicted": cfg.classes[int(q)], "probability": float(prob[i, q])}
        for i, (p, t, q) in enumerate(zip(samples.paths, samples.labels, pred))
    ]
    return report


def check_eval_outputs(out_dir: str | Path, overwrite: bool = False) -> None:
    """Raise before an evaluation if :func:`write_eval_outputs` would refuse ``out_dir``."""
    OutputDir(Path(out_dir).expanduser(), kind=EVAL_KIND, overwrite=overwrite)


def write_eval_outputs(report: dict, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """``metrics.json`` (without per-image rows), ``predictions.csv`` and ``confusion.png``,
    written all at once; a folder holding other files is refused unless ``overwrite``."""
    from visionscale.classify.plots import confusion_png

    target = Path(out_dir).expanduser()
    metrics = {k: v for k, v in report.items() if k != "predictions"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "true", "predicted", "probability"], lineterminator="\n")
    w.writeheader()
    w.writerows(report.get("predictions", []))
    outputs = (("metrics.json", _json_bytes(metrics)), ("predictions.csv", buf.getvalue().encode()),
               ("confusion.png", confusion_png(report["confusion_matrix"], report["classes"],
                                               title=f"accuracy {report['accuracy']:.3f} (n={report['n']})")))
    with OutputDir(target, kind=EVAL_KIND, overwrite=overwrite) as tmp:
        for name, data in outputs:
            (tmp / name).write_bytes(data)
    return [target / name for name, _ in outputs]



def _collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    try:
        return collect_images(inputs, recursive=True)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None

"""EfficientAD training: teacher distillation, student-teacher + autoencoder training, map normalisation.

Paper: K. Batzner, L. Heckler, R. König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024, arXiv:2303.14535 (Algorithm 1; appendix: teacher
pretraining). The endorsed reimplementation https://github.com/nelson1425/EfficientAD
(``efficientad.py``, ``pretraining.py``) was read as a second source for details the paper
leaves open (marked "ref." below). This module holds the training pieces only; the run
folder (data split, calibration, files) is :mod:`visionscale.anomaly.efficientad_fit`.

Training (Algorithm 1), per step with a training batch ``x`` (ImageNet-normalised):

* teacher output normalised per channel, ``T(x) = (PDN_T(x) - mu) / sigma``, with ``mu`` and
  ``sigma`` the channel mean and standard deviation over the training images
  (:func:`teacher_channel_stats`);
* hard-feature loss: ``D = (T(x) - S(x)[:C])^2``, ``d_hard`` = the 0.999-quantile of ``D``,
  ``L_hard`` = mean of the elements ``D >= d_hard`` (:func:`hard_feature_loss`);
* optional penalty on a generic (ImageNet) image ``P``: ``L_ST = L_hard + mean(S(P)[:C]^2)``;
* autoencoder on an augmented copy ``x'`` (one of brightness, contrast, saturation with a
  factor in [0.8, 1.2], :func:`augment_ae`): ``L_AE = mean((T(x') - A(x'))^2)``,
  ``L_STAE = mean((A(x') - S(x')[C:])^2)``; total ``L_ST + L_AE + L_STAE``;
* Adam (lr 1e-4, weight decay 1e-5) on student and autoencoder; lr x 0.1 after 95 % of the
  steps (70,000 by default); batch size 1.

After training, :func:`map_normalization` runs the model over held-out *training* images and
sets the quantiles ``q_a`` = 0.9 and ``q_b`` = 0.995 of each map; the inference graph
(:mod:`visionscale.anomaly.efficientad`) maps them to 0 and 0.1, averages the two maps and
takes the image score as the map's maximum.

Teacher pretraining (appendix; ref. ``pretraining.py``): the PDN imitates Wide-ResNet-101-2
layer2 + layer3 patch features (PatchCore's locally aware features, pooled to 384 channels)
on generic images. The extractor sees the image at twice the PDN's resolution, so its
stride-8 layer2 grid equals the PDN's ~H/4 output; targets are normalised per channel (stats
over up to 10,000 images); MSE loss; Adam lr 1e-4, weight decay 1e-5; 60,000 steps of batch
16; random grayscale (p = 0.1) applied to both inputs.

Determinism and resuming: step ``s`` reads the training images of a permutation seeded by
``(seed, epoch)``, draws its augmentation from a generator seeded by ``(seed, s)`` and
re-seeds torch's global RNG (dropout) with ``(seed, s)``; the learning rate is a function of
``s``. A checkpoint (model, optimizer, history) every ``checkpoint_every`` steps therefore
resumes to exactly the weights an uninterrupted run reaches.

Deviations from the reference code, on purpose:

* Teacher statistics: one pass accumulating per-channel sums in float64 instead of two
  passes; identical for equally sized images (the images are resized to one size).
* The augmentation is applied after resizing (on the model-size tensor), not on the
  original PIL image; torchvision's uint8 rounding is not reproduced.
* Quantiles use linear interpolation as ``torch.quantile`` does, but through ``kthvalue``,
  so tensors above torch.quantile's 16M-element limit work (large batches, big images).

One module, just over 600 lines, on purpose: Algorithm 1, the teacher pretraining and the map
normalisation share the losses, the seeding and the checkpoint format described above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.anomaly.data import IMAGENET_MEAN, IMAGENET_STD
from visionscale.errors import InvalidFileError
from visionscale.io.atomic import atomic_path

__all__ = [
    "EfficientADTrainConfig",
    "quantile",
    "hard_feature_loss",
    "penalty_loss",
    "teacher_channel_stats",
    "augment_ae",
    "to_grayscale",
    "raw_maps",
    "map_normalization",
    "lr_at",
    "train_efficientad",
    "distill_teacher",
    "step_seed",
]

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

TRAIN_CHECKPOINT = "efficientad_train.pt"
DISTILL_CHECKPOINT = "teacher_distill.pt"


@dataclass(frozen=True)
class EfficientADTrainConfig:
    """Training settings; defaults are the paper's.

    Attributes:
        steps: Training iterations (70,000).
        batch_size: Training images per step (1).
        lr: Adam learning rate (1e-4).
        weight_decay: Adam weight decay (1e-5).
        lr_decay_at: Fraction of the steps after which the lr is multiplied by ``lr_decay``.
        lr_decay: Step decay factor (0.1).
        hard_quantile: q of the hard-feature loss (0.999).
        ae_jitter: Brightness / contrast / saturation factors are drawn from [1 - j, 1 + j].
        penalty_grayscale: Probability that a penalty image is turned grayscale (ref.: 0.3).
        map_q_start: Quantile mapped to 0 in the map normalisation (q_a = 0.9).
        map_q_end: Quantile mapped to 0.1 (q_b = 0.995).
        checkpoint_every: Steps between checkpoints (also between loss log lines).
        seed: Seeds data order, augmentation and dropout.
        distill_steps: Teacher pretraining iterations (60,000).
        distill_batch_size: Teacher pretraining batch size (16).
        distill_grayscale: Probability of grayscale in pretraining (ref.: 0.1).
        distill_norm_images: Images for the target feature statistics (ref.: 10,000).
    """

    steps: int = 70_000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_decay_at: float = 0.95
    lr_decay: float = 0.1
    hard_quantile: float = 0.999
    ae_jitter: float = 0.2
    penalty_grayscale: float = 0.3
    map_q_start: float = 0.9
    map_q_end: float = 0.995
    checkpoint_every: int = 1000
    seed: int = 0
    distill_steps: int = 60_000
    distill_batch_size: int = 16
    distill_grayscale: float = 0.1
    distill_norm_images: int = 10_000

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "distill_steps", "distill_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.hard_quantile < 1:
            raise ValueError(f"hard_quantile must be in (0, 1), got {self.hard_quantile}")
        if not 0 <= self.map_q_start < self.map_q_end <= 1:
            raise ValueError(f"need 0 <= map_q_start < map_q_end <= 1, got {self.map_q_start}, {self.map_q_end}")

    def training_identity(self) -> dict:
        """Fields that decide the trained weights (a checkpoint must match them to resume)."""
        d = asdict(self)
        for k in ("checkpoint_every", "map_q_start", "map_q_end"):
            d.pop(k)
        for k in [k for k in d if k.startswith("distill")]:
            d.pop(k)
        return d

    def distill_identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k.startswith("distill") or k in ("seed", "lr", "weight_decay")}


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for ``(seed, step, stream)``: per-step randomness without saved RNG state."""
    x = (seed * 1_000_003 + step) * 7_919 + stream
    x ^= x >> 31
    x = (x * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    return x >> 1


# ----------------------------------------------------------------------------------------
# Losses and statistics.


def quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x.flatten(), q)`` (linear interpolation) for tensors of any size."""
    flat = x.detach().flatten()
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    v_lo = flat.kthvalue(lo + 1).values
    if frac == 0 or lo + 1 >= n:
        return v_lo
    v_hi = flat.kthvalue(lo + 2).values
    return v_lo + frac * (v_hi - v_lo)


def hard_feature_loss(teacher: Tensor, student: Tensor, q: float = 0.999, reduction: str = "mean") -> Tensor:
    """Hard-feature loss of EfficientAD (paper Sec. 3.2, Algorithm 1).

    ``D = (teacher - student)^2`` elementwise; only elements at or above ``D``'s
    ``q``-quantile count, so the student is trained on the (1 - q) hardest features.

    Args:
        teacher: (B, C, h, w) normalised teacher output (no gradient needed).
        student: (B, C, h, w) the student's first C channels.
        q: Quantile (0.999).
        reduction: ``"mean"`` of the kept elements, ``"sum"``, or ``"none"`` (the kept values).
    """
    d = (teacher - student) ** 2  # (B, C, h, w)
    d_hard = quantile(d, q)
    kept = d[d >= d_hard]
    if reduction == "mean":
        return kept.mean()
    if reduction == "sum":
        return kept.sum()
    if reduction == "none":
        return kept
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def penalty_loss(student_on_generic: Tensor) -> Tensor:
    """``mean(S(P)[:C]^2)``: keeps the student from imitating the teacher off the training domain."""
    return (student_on_generic**2).mean()


@torch.no_grad()
def teacher_channel_stats(teacher: nn.Module, batches: Iterable[Tensor], device: torch.device | None = None,
                          progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Channel mean and std of ``teacher``'s outputs over all pixels of all ``batches``.

    Returns:
        ``(mean, std)``, each (1, C, 1, 1) float32 on the teacher's device.
    """
    total = sq = None
    count = 0
    for x in batches:
        dev = device or next(teacher.parameters()).device
        t = teacher(x.to(dev)).double()  # (B, C, h, w)
        s1 = t.sum(dim=(0, 2, 3))
        s2 = (t * t).sum(dim=(0, 2, 3))
        total = s1 if total is None else total + s1
        sq = s2 if sq is None else sq + s2
        count += t.shape[0] * t.shape[2] * t.shape[3]
        if progress is not None:
            progress(x.shape[0])
    if total is None:
        raise ValueError("no training images to compute the teacher's channel statistics on")
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0)
    # A channel that never varies (a dead ReLU-free output is unlikely, but a random tiny
    # teacher can have one) would divide by zero: leave it unscaled.
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def _denorm(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean


def _renorm(x01: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _gray(x01: Tensor) -> Tensor:
    # ITU-R 601 luma, as torchvision's rgb_to_grayscale: (B, 1, H, W)
    return (0.299 * x01[:, 0:1] + 0.587 * x01[:, 1:2] + 0.114 * x01[:, 2:3])


def augment_ae(x: Tensor, generator: torch.Generator, jitter: float = 0.2) -> Tensor:
    """The autoencoder's input augmentation: per image, one of brightness, contrast or saturation.

    Paper (Sec. 3.3) / ref. ``transform_ae``: a random choice of ColorJitter(brightness=0.2),
    ColorJitter(contrast=0.2), ColorJitter(saturation=0.2), i.e. a factor ``f`` uniform in
    [1 - j, 1 + j]: brightness ``f x``, contrast ``m + f (x - m)`` with ``m`` the mean gray
    value, saturation ``g + f (x - g)`` with ``g`` the gray image; results clipped to [0, 1].
    Works on ImageNet-normalised (B, 3, H, W) tensors and returns the same normalisation.
    The choices are drawn on the CPU from ``generator``.
    """
    x01 = _denorm(x)
    b = x.shape[0]
    kind = torch.randint(0, 3, (b,), generator=generator).tolist()
    factor = (1 - jitter + 2 * jitter * torch.rand(b, generator=generator)).tolist()
    out = []
    for i in range(b):
        img, f = x01[i : i + 1], factor[i]
        if kind[i] == 0:  # brightness
            img = img * f
        elif kind[i] == 1:  # contrast
            m = _gray(img).mean()
            img = m + f * (img - m)
        else:  # saturation
            g = _gray(img)
            img = g + f * (img - g)
        out.append(img.clamp(0, 1))
    return _renorm(torch.cat(out))


def to_grayscale(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Turn each image of an ImageNet-normalised batch gray (3 equal channels) with probability ``p``."""
    pick = (torch.rand(x.shape[0], generator=generator) < p).tolist()
    if not any(pick):
        return x
    x01 = _denorm(x)
    g = _gray(x01).expand(-1, 3, -1, -1)
    sel = torch.tensor(pick, device=x.device).view(-1, 1, 1, 1)
    return _renorm(torch.where(sel, g, x01))


# ----------------------------------------------------------------------------------------
# Maps and their normalisation.


def raw_maps(model, x: Tensor) -> tuple[Tensor, Tensor]:
    """Unnormalised student-teacher and student-autoencoder maps, each (B, 1, h', w').

    The same arithmetic as the inference graph before its quantile normalisation.
    """
    c = model.config.out_channels
    t = (model.teacher(x) - model.teacher_mean) / model.teacher_std  # (B, C, h', w')
    s = model.student(x)  # (B, 2C, h', w')
    ae = model.autoencoder(x)  # (B, C, h', w')
    map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)
    map_ae = torch.mean((ae - s[:, c:]) ** 2, dim=1, keepdim=True)
    return map_st, map_ae


@torch.no_grad()
def map_normalization(model, batches: Iterable[Tensor], q_start: float = 0.9, q_end: float = 0.995,
                      device: torch.device | None = None) -> dict[str, float]:
    """Set the model's map quantiles from (held-out, normal) images and return them.

    ``q_st_start`` / ``q_st_end`` are the ``q_start`` / ``q_end`` quantiles of all pixels of
    the student-teacher maps, likewise ``q_ae_*`` for the student-autoencoder maps. If
    ``q_end`` equals ``q_start`` (a constant map) the end is nudged up so the division stays finite.
    """
    was = model.training
    model.eval()
    dev = device or model.teacher_mean.device
    st, ae = [], []
    try:
        for x in batches:
            a, b = raw_maps(model, x.to(dev))
            st.append(a.flatten().cpu())
            ae.append(b.flatten().cpu())
    finally:
        model.train(was)
    if not st:
        raise ValueError("no validation images for the map normalisation")
    out = {}
    for name, maps in (("st", torch.cat(st)), ("ae", torch.cat(ae))):
        lo, hi = float(quantile(maps, q_start)), float(quantile(maps, q_end))
        if not hi > lo:
            hi = lo + max(abs(lo), 1.0) * 1e-6
        out[f"q_{name}_start"], out[f"q_{name}_end"] = lo, hi
    for k, v in out.items():
        getattr(model, k).fill_(v)
    return out


# ----------------------------------------------------------------------------------------
# Training.


def lr_at(step: int, cfg: EfficientADTrainConfig) -> float:
    """Step decay: ``lr`` until ``int(lr_decay_at x steps)``, then ``lr x lr_decay`` (ref. StepLR)."""
    return cfg.lr * (cfg.lr_decay if step >= int(cfg.lr_decay_at * cfg.steps) else 1.0)


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _corrupt_checkpoint(path: Path, reason: str) -> InvalidFileError:
    return InvalidFileError(f"cannot resume from the checkpoint {path}: {reason}; it is corrupt or was edited. "
                            f"Delete it to start this training over (or fit into a new run folder)")


def _load_checkpoint(path: Path, identity: dict, say: Log, keys: tuple[str, ...]) -> dict | None:
    """The checkpoint at ``path`` if it matches ``identity``; None if there is none.

    Checkpoints are written atomically, so one that cannot be read was damaged afterwards:
    it is reported (:class:`InvalidFileError`), never silently replaced by a fresh start.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and zip errors of every kind
        raise _corrupt_checkpoint(path, str(exc).split("\n")[0] or type(exc).__name__) from None
    if not isinstance(ckpt, dict):
        raise _corrupt_checkpoint(path, f"expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in ("identity", "step", *keys) if k not in ckpt]
    if missing:
        raise _corrupt_checkpoint(path, f"{', '.join(missing)} missing")
    if ckpt.get("identity") != identity:
        say(f"checkpoint {path} is from a different configuration; starting over")
        return None
    return ckpt


def _restore(path: Path, restore: Callable[[], None]) -> None:
    """Load a checkpoint's states; a state that does not fit is a damaged checkpoint."""
    try:
        restore()
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise _corrupt_checkpoint(path, str(exc).split("\n")[0]) from None


def train_efficientad(
    model,
    train_batch: Callable[[int], Tensor],
    cfg: EfficientADTrainConfig,
    checkpoint_dir: str | Path,
    *,
    penalty_batch: Callable[[int], Tensor] | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    device: torch.device | None = None,
) -> dict:
    """Train ``model``'s student and autoencoder in place (teacher frozen, normalisation set).

    Args:
        model: A :class:`visionscale.anomaly.efficientad.EfficientAD` whose teacher weights
            and ``teacher_mean`` / ``teacher_std`` are final.
        train_batch: ``step -> (B, 3, H, W)`` ImageNet-normalised training images; must
            be a pure function of ``step`` for resuming to be exact.
        cfg: Training settings.
        checkpoint_dir: Where ``efficientad_train.pt`` is written every
            ``cfg.checkpoint_every`` steps; a matching one there is resumed from.
        penalty_batch: ``step -> (B, 3, H, W)`` generic images for the penalty, or None.
        progress: ``progress("train", done, total)`` after every step.
        log: One-line messages (losses at each checkpoint, resuming).
        device: Defaults to the model's.

    Returns:
        ``{"loss": [...], "loss_hard": [...], "loss_penalty": [...], "loss_ae": [...],
        "loss_stae": [...], "seconds": float, "resumed_from": int}``, one entry per step.

    Raises:
        InvalidFileError: The checkpoint in ``checkpoint_dir`` cannot be read or restored
            (names it, and says to delete it to start over).
    """
    say = log or (lambda m: None)
    tick = progress or (lambda s, d, t: None)
    dev = device or model.teacher_mean.device
    c = model.config.out_channels
    path = Path(checkpoint_dir) / TRAIN_CHECKPOINT
    identity = {**cfg.training_identity(), "penalty": penalty_batch is not None}
    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    keys = ("loss", "loss_hard", "loss_penalty", "loss_ae", "loss_stae")
    history: dict = {k: [] for k in keys}
    start = 0
    ckpt = _load_checkpoint(path, identity, say, ("model", "optimizer", "history"))
    if ckpt is not None:
        def restore() -> None:
            nonlocal history, start
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            history = {k: list(ckpt["history"][k]) for k in keys}
            start = int(ckpt["step"])
            if not 0 <= start <= cfg.steps or any(len(v) != start for v in history.values()):
                raise ValueError(f"step {start} does not match its history of {len(history['loss'])} steps")

        _restore(path, restore)
        say(f"resuming training at step {start + 1} of {cfg.steps} from {path}")
    model.teacher.eval()
    for p in model.teacher.parameters():
        p.requires_grad_(False)
    model.student.train()
    model.autoencoder.train()
    t0 = time.perf_counter()
    secs0 = float(ckpt.get("seconds", 0.0)) if ckpt is not None else 0.0

    def checkpoint(step: int) -> None:
        _save({"identity": identity, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
               "history": history, "seconds": secs0 + time.perf_counter() - t0}, path)

    tick("train", start, cfg.steps)
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        torch.manual_seed(step_seed(cfg.seed, step, 1))  # dropout in the autoencoder's decoder
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 2))
        x = train_batch(step).to(dev)  # (B, 3, H, W)
        with torch.no_grad():
            t = (model.teacher(x) - model.teacher_mean) / model.teacher_std  # (B, C, h', w')
        s = model.student(x)[:, :c]
        loss_hard = hard_feature_loss(t, s, cfg.hard_quantile)
        if penalty_batch is not None:
            p = penalty_batch(step).to(dev)
            loss_pen = penalty_loss(model.student(p)[:, :c])
        else:
            loss_pen = torch.zeros((), device=dev)
        xa = augment_ae(x, gen, cfg.ae_jitter)
        ae = model.autoencoder(xa)  # (B, C, h', w')
        with torch.no_grad():
            ta = (model.teacher(xa) - model.teacher_mean) / model.teacher_std
        sa = model.student(xa)[:, c:]
        loss_ae = torch.mean((ta - ae) ** 2)
        loss_stae = torch.mean((ae - sa) ** 2)
        loss = loss_hard + loss_pen + loss_ae + loss_stae
        _descend(opt, loss)
        for k, v in zip(keys, (loss, loss_hard, loss_pen, loss_ae, loss_stae)):
            history[k].append(float(v.detach()))
        done = step + 1
        if _checkpoint_due(done, cfg.checkpoint_every, cfg.steps):
            checkpoint(done)
            say(f"step {done}/{cfg.steps}: loss {history['loss'][-1]:.4f} (hard {history['loss_hard'][-1]:.4f}, "
                f"ae {history['loss_ae'][-1]:.4f}, st-ae {history['loss_stae'][-1]:.4f}); checkpoint saved")
        tick("train", done, cfg.steps)
    model.eval()
    return _with_timing(history, secs0 + time.perf_counter() - t0, start)


def _descend(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on ``loss``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _with_timing(history: dict, seconds: float, resumed_from: int) -> dict:
    history["seconds"] = seconds  # this run's and the earlier runs' it resumed
    history["resumed_from"] = resumed_from
    return history


def _checkpoint_due(done: int, every: int, total: int) -> bool:
    """A checkpoint after every ``every`` steps and after the last one."""
    return done % every == 0 or done == total


def distill_teacher(
    teacher: nn.Module,
    extractor: nn.Module,
    batch: Callable[[int], tuple[Tensor, Tensor]],
    cfg: EfficientADTrainConfig,
    checkpoint_dir: str | Path,
    *,
    progress: Progress | None = None,
    log: Log | None = None,
    device: torch.device | None = None,
    norm_batches: int | None = None,
) -> dict:
    """Pretrain a PDN ``teacher`` to output the normalised features of ``extractor`` (appendix).

    Args:
        teacher: The PDN to train in place (output C channels).
        extractor: Frozen feature extractor, (B, 3, 2H, 2W) -> (B, C, h, w), e.g. WRN-101-2
            layer2 + layer3 patch features pooled to C channels.
        batch: ``step -> (extractor input (B, 3, 2H, 2W), PDN input (B, 3, H, W))``. Steps
            ``-1, -2, ...`` are asked for the feature statistics, ``0 ..`` for training.
        cfg: ``distill_*`` fields, ``lr``, ``weight_decay``, ``checkpoint_every``, ``seed``.
        checkpoint_dir: ``teacher_distill.pt`` goes there; a matching one is resumed.
        norm_batches: Batches for the feature statistics; default enough for
            ``cfg.distill_norm_images`` images (fewer make sense when the folder is smaller).

    Returns:
        ``{"loss": [...], "seconds": float, "resumed_from": int}``.
    """
    say = log or (lambda m: None)
    tick = progress or (lambda s, d, t: None)
    dev = device or next(teacher.parameters()).device
    path = Path(checkpoint_dir) / DISTILL_CHECKPOINT
    identity = cfg.distill_identity()
    extractor.eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(teacher.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = _load_checkpoint(path, identity, say, ("teacher", "optimizer", "mean", "std", "history"))
    if ckpt is not None:
        def restore() -> None:
            nonlocal mean, std, history, start
            teacher.load_state_dict(ckpt["teacher"])
            opt.load_state_dict(ckpt["optimizer"])
            mean, std = ckpt["mean"].to(dev), ckpt["std"].to(dev)
            history = {"loss": list(ckpt["history"]["loss"])}
            start = int(ckpt["step"])
            if not 0 <= start <= cfg.distill_steps:
                raise ValueError(f"step {start} is outside 0..{cfg.distill_steps}")

        _restore(path, restore)
        say(f"resuming teacher distillation at step {start + 1} of {cfg.distill_steps}")
    else:
        n_norm = norm_batches or max(1, -(-cfg.distill_norm_images // cfg.distill_batch_size))
        done_imgs = [0]

        def norm_batches():
            for i in range(n_norm):
                x_ext, _ = batch(-1 - i)
                yield x_ext

        def count(n: int) -> None:
            done_imgs[0] += 1
            tick("feature stats", done_imgs[0], n_norm)

        mean, std = teacher_channel_stats(extractor, norm_batches(), dev, count)
        history, start = {"loss": []}, 0
    t0 = time.perf_counter()
    secs0 = float(ckpt.get("seconds", 0.0)) if ckpt is not None else 0.0
    teacher.train()
    tick("distill", start, cfg.distill_steps)
    for step in range(start, cfg.distill_steps):
        x_ext, x_pdn = batch(step)
        with torch.no_grad():
            target = (extractor(x_ext.to(dev)) - mean) / std  # (B, C, h, w)
        pred = teacher(x_pdn.to(dev))  # (B, C, h', w')
        if target.shape[-2:] != pred.shape[-2:]:  # unpadded PDN or odd sizes: align the grids
            target = F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False)
        loss = torch.mean((target - pred) ** 2)
        _descend(opt, loss)
        history["loss"].append(float(loss.detach()))
        done = step + 1
        if _checkpoint_due(done, cfg.checkpoint_every, cfg.distill_steps):
            _save({"identity": identity, "step": done, "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
                   "mean": mean.cpu(), "std": std.cpu(), "history": history,
                   "seconds": secs0 + time.perf_counter() - t0}, path)
            say(f"teacher distillation step {done}/{cfg.distill_steps}: loss {history['loss'][-1]:.4f}; "
                f"checkpoint saved")
        tick("distill", done, cfg.distill_steps)
    teacher.eval()
    return _with_timing(history, secs0 + time.perf_counter() - t0, start)

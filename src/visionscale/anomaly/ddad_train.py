"""DDAD training: DDPM training of the denoising U-Net, then domain adaptation of the features.

Paper: A. Mousakhan, T. Brox, J. Tayyub, "Anomaly Detection with Conditioned Denoising
Diffusion Models", arXiv:2305.15956, 2023. Official code: https://github.com/arimousa/DDAD
(``train.py: trainer``, ``loss.py: get_loss``, ``feature_extractor.py: domain_adaptation``
and ``loss_fucntion``, ``reconstruction.py``, ``config.yaml``, ``main.py``).

Stage 1, DDPM (Ho et al. 2020) on the training images ``x0`` in [-1, 1]: per image a step
``t ~ U{0..999}`` and noise ``e ~ N(0, I)``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e``
(:func:`q_sample`), loss ``||e - U-Net(x_t, t)||^2`` summed over C, H, W and averaged over
the batch (:func:`ddpm_loss`, the official reduction), Adam.

Stage 2, domain adaptation (paper Sec. 3.4; official ``domain_adaptation``): the feature
extractor ``phi`` is fine-tuned while a frozen copy ``phi_bar`` of its pretrained weights is
the reference. Each batch is split in halves, ``y`` (target, first half) and ``x`` (input,
second half); ``x`` is noised to step 250 and denoised in 10 conditioned DDIM steps towards
``y`` with weight ``w_DA`` (:func:`visionscale.anomaly.ddad.conditioned_ddim_step`), giving
``x0``, a "nearly identical" normal image. Then (:func:`domain_adaptation_loss`)::

    L_DA = sum_j [1 - cos(phi_j(x0), phi_j(y))]                          (similarity)
         + lambda sum_j [1 - cos(phi_j(y), phi_bar_j(y)) + 1 - cos(phi_j(x0), phi_bar_j(x0))]

over layer1..layer3 (``j``), each feature map flattened per image, cosine per image, mean
over the batch; lambda = 0.1 (``DLlambda``), AdamW 1e-4.

Input: ``train_batches(epoch)`` yields (B, 3, H, W) batches exactly as
:func:`visionscale.anomaly.data.iter_batches` gives ``batch.images``, i.e. ImageNet-normalised.
The diffusion model works on ``2 x [0, 1] - 1`` (official ``Dataset_maker``), so every batch
is mapped back with :func:`to_signed` (``2 (x std + mean) - 1``) before anything else. The
incoming batches are cut into the trainer's own batches (``batch_size`` for the U-Net,
``da_batch_size`` for the adaptation), dropping an incomplete last one (official
``drop_last=True``).

Determinism: the steps ``t``, the noise and the adaptation's reconstruction noise come from
generators seeded with ``(seed, step, stream)``, and torch's global RNG (dropout) is forked
and re-seeded per step, so a run is a function of ``(config, model, data)`` and an
interrupted run resumes to exactly the weights of an uninterrupted one. The checkpoint
(``ddad_train.safetensors``, written atomically) holds the U-Net, the feature extractor,
the frozen reference (during adaptation), the optimiser state, the loss history and the
position (stage, epoch, batch).

One module, over 600 lines, on purpose: the two stages share one checkpoint, one resume
position and one seeding scheme, and are read against the official code together. The run
folder around the trainer (data, thresholds, files) is :mod:`visionscale.anomaly.ddad_fit`.
"""

from __future__ import annotations

from visionscale.errors import VisionscaleError

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.anomaly.data import IMAGENET_MEAN, IMAGENET_STD
from visionscale.anomaly.ddad import DDAD, conditioned_ddim_step, ddim_timesteps
from visionscale.io.weights import save_file_atomic
from visionscale.nn import resnet

__all__ = [
    "CHECKPOINT_NAME",
    "DDADTrainConfig",
    "DDADTrainError",
    "ddpm_loss",
    "domain_adaptation_loss",
    "fit_ddad",
    "q_sample",
    "reconstruct_towards",
    "to_signed",
]

CHECKPOINT_NAME = "ddad_train.safetensors"
_FORMAT = "visionscale.ddad_train/1"
# Fields that do not change what is trained: a resume may change them.
_RESUME_FREE = ("checkpoint_every",)
_STREAM_DDPM, _STREAM_DA = 1, 2

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class DDADTrainError(VisionscaleError, RuntimeError):
    """Training cannot go on (diverged, or a checkpoint that does not belong to this run)."""


@dataclass(frozen=True)
class DDADTrainConfig:
    """DDAD training settings; defaults are the official ``config.yaml`` (MVTec) and code.

    Inference settings (``w`` = 2, ``v`` = 1, ``eta`` = 1, start step 250, skip 25) live in
    :class:`visionscale.anomaly.ddad.DDADConfig` with the same official defaults; they do
    not change training and are not repeated here.

    Attributes:
        steps: U-Net optimiser steps. None: ``epochs`` full passes over the data.
        epochs: U-Net training epochs when ``steps`` is None. Official: ``epochs: 3000``
            are trained and ``load_chp: 2000`` is the checkpoint evaluated on MVTec (the
            README: "1000-1500-2000 for MVTec"), so 2000.
        batch_size: U-Net batch (``data.batch_size: 32``, "32 for DDAD and 16 for DDADS").
        lr: Adam learning rate (``learning_rate: 3e-4``).
        weight_decay: Adam's (L2, not decoupled) weight decay (``weight_decay: 0.05``;
            ``train.py`` uses ``torch.optim.Adam(..., weight_decay=...)``).
        num_train_steps: Diffusion steps T (``trajectory_steps: 1000``); must match the model.
        beta_start: First beta of the linear schedule (``beta_start: 0.0001``).
        beta_end: Last beta (``beta_end: 0.02``).
        da_steps: Domain-adaptation optimiser steps. None: ``da_epochs`` epochs.
        da_epochs: Domain-adaptation epochs (``DA_epochs: 4``; ``DA_chp: 4`` is loaded).
        da_batch_size: Adaptation batch, split into target and input halves
            (``DA_batch_size: 16``, "16 for MVTec"); must be even.
        da_lr: AdamW learning rate (hard-coded ``lr=1e-4`` in ``domain_adaptation``).
        da_weight_decay: AdamW weight decay (official: PyTorch's default, 0.01).
        da_lambda: Weight of the distance-to-reference terms (``DLlambda: 0.1`` for MVTec,
            0.01 for VisA; paper's lambda).
        w_da: Conditioning weight of the adaptation's reconstructions (``w_DA: 3``).
        da_noise_step: Step the adaptation's inputs are noised to (250: ``Reconstruction``
            reads ``test_trajectoy_steps``, equal to ``test_trajectoy_steps_DA: 250``).
        da_skip: Stride of that trajectory (``skip`` = ``skip_DA`` = 25, 10 steps).
        eta: DDIM stochasticity of those reconstructions (``eta: 1``).
        da_layers: Feature maps in the loss. The official extractor returns
            ``[layer1, layer2, layer3]`` and the loss sums over all of them.
        da_batchnorm_train: Run the adapted extractor in train mode (batch statistics,
            running statistics updated), as the official ``feature_extractor.train()``;
            the frozen reference runs in eval mode.
        seed: Seeds data-independent randomness (``seed: 42``).
        checkpoint_every: Optimiser steps between checkpoints (each stage); a checkpoint is
            also written at the end of each stage. Not part of the resume check.
    """

    steps: int | None = None
    epochs: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    da_steps: int | None = None
    da_epochs: int = 4
    da_batch_size: int = 16
    da_lr: float = 1e-4
    da_weight_decay: float = 0.01
    da_lambda: float = 0.1
    w_da: float = 3.0
    da_noise_step: int = 250
    da_skip: int = 25
    eta: float = 1.0
    da_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    da_batchnorm_train: bool = True
    seed: int = 42
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        for name in ("steps", "da_steps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {v}")
        for name in ("epochs", "da_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "checkpoint_every", "da_skip"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.da_batch_size < 2 or self.da_batch_size % 2:
            raise ValueError(f"da_batch_size must be even and >= 2 (halves: targets and inputs), "
                             f"got {self.da_batch_size}")
        for name in ("lr", "da_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not 0 < self.da_noise_step < self.num_train_steps:
            raise ValueError(f"da_noise_step must be in (0, {self.num_train_steps}), got {self.da_noise_step}")
        bad = [n for n in self.da_layers if n not in resnet.STAGES[1:]]
        if bad or not self.da_layers:
            raise ValueError(f"da_layers must be a non-empty subset of {resnet.STAGES[1:]}, got {self.da_layers!r}")
        object.__setattr__(self, "da_layers", tuple(self.da_layers))

    def identity(self) -> dict:
        """The fields that decide the trained weights (compared when resuming)."""
        d = asdict(self)
        for k in _RESUME_FREE:
            d.pop(k)
        d["da_layers"] = list(d["da_layers"])
        return d


# ----------------------------------------------------------------------------------------
# Pieces (pure functions, tested on hand-computed values).


def to_signed(x: Tensor) -> Tensor:
    """ImageNet-normalised (B, 3, H, W) (``batch.images``) -> [-1, 1] (``2 x [0, 1] - 1``)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return 2 * (x * std + mean) - 1


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (DDPM Eq. 4).

    Args:
        x0: Clean images (B, C, H, W).
        t: Steps (B,), int64, 0-based (``a_0 = 1 - beta_0``).
        noise: Gaussian noise like ``x0``.
        alphas_cumprod: (T,) cumulative products of ``1 - beta``.
    """
    a = alphas_cumprod.to(x0.dtype).index_select(0, t).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddpm_loss(unet: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor,
              reduction: str = "sum") -> Tensor:
    """Epsilon-prediction loss of DDPM (Ho et al. 2020, Eq. 14, "L_simple").

    ``reduction="sum"``: squared error summed over C, H, W, averaged over the batch, as
    the official ``get_loss`` (``(e - output).square().sum(dim=(1, 2, 3)).mean(dim=0)``);
    ``"mean"``: plain MSE (that value divided by C x H x W).
    """
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    err = (noise - unet(x_t, t.float())).square()  # (B, C, H, W)
    if reduction == "sum":
        return err.sum(dim=(1, 2, 3)).mean()
    if reduction == "mean":
        return err.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _cos_dist(a: Tensor, b: Tensor) -> Tensor:
    # 1 - cosine between whole feature maps, per image, averaged over the batch.
    return (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()


def domain_adaptation_loss(
    rec: dict[str, Tensor], target: dict[str, Tensor], target_ref: dict[str, Tensor],
    rec_ref: dict[str, Tensor], lam: float = 0.1,
) -> dict[str, Tensor]:
    """Paper's L_DA = L_Similarity + lambda L_Distance (official ``loss_fucntion``).

    Args:
        rec: Adapted extractor's features of the reconstructions ``x0``, by layer.
        target: Adapted extractor's features of the targets ``y``.
        target_ref: Frozen reference's features of ``y``.
        rec_ref: Frozen reference's features of ``x0``.
        lam: lambda (``DLlambda``).

    Returns:
        ``{"loss", "similarity", "distance"}`` (scalars; ``loss = similarity + lam * distance``).
    """
    sim = sum(_cos_dist(rec[k], target[k]) for k in rec)
    dist = sum(_cos_dist(target[k], target_ref[k]) + _cos_dist(rec[k], rec_ref[k]) for k in rec)
    return {"loss": sim + lam * dist, "similarity": sim, "distance": dist}


@torch.no_grad()
def reconstruct_towards(model: DDAD, x: Tensor, y: Tensor, w: float, noise_step: int, skip: int,
                        eta: float, generator: torch.Generator | None = None) -> Tensor:
    """Noise ``x`` to ``noise_step``, then denoise it conditioned on ``y`` (official
    ``Reconstruction(x, y0, w)``); inference is the case ``y = x``. Returns ``x0`` in [-1, 1]."""

    def randn() -> Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    a = model.alpha_bar(noise_step)
    x_t = math.sqrt(a) * x + math.sqrt(1 - a) * randn()
    for t, t_next in ddim_timesteps(noise_step, skip):
        at, an = model.alpha_bar(t), model.alpha_bar(t_next)
        eps = model.unet(x_t, torch.full((x.shape[0],), float(t), device=x.device))
        c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
        x_t = conditioned_ddim_step(x_t, y, eps, at, an, w, eta, randn() if c1 > 0 else None)
    return x_t


# ----------------------------------------------------------------------------------------
# Data.


def _step_seed(seed: int, step: int, stream: int) -> int:
    x = ((seed * 1_000_003 + step) * 7_919 + stream) & 0xFFFF_FFFF_FFFF_FFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    x ^= x >> 29
    return x & 0x7FFF_FFFF_FFFF_FFFF


class _Images:
    """Checks ``train_batches``' tensors and re-cuts them into batches of one size."""

    def __init__(self, train_batches: Callable[[int], Iterable[Tensor]], model: DDAD, device: torch.device):
        self.train_batches, self.model, self.device = train_batches, model, device
        self.size: tuple[int, int] | None = None

    def check(self, x: object, epoch: int, index: int) -> Tensor:
        where = f"train_batches({epoch}), batch {index}"
        if not isinstance(x, Tensor):
            raise TypeError(f"{where} is a {type(x).__name__}, expected a (B, 3, H, W) float tensor")
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{where} has shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"expected a (B, 3, H, W) float tensor (ImageNet-normalised batch.images)")
        hw = (int(x.shape[2]), int(x.shape[3]))
        if self.size is None:
            try:
                self.model.validate_input_size(*hw)
            except ValueError as exc:
                raise ValueError(f"training images are {hw[1]}x{hw[0]} (WxH), which this DDAD model cannot "
                                 f"take: {exc}; resize them (image size) to fit") from None
            self.size = hw
        elif hw != self.size:
            raise ValueError(f"{where} is {hw[1]}x{hw[0]} (WxH) but earlier batches were "
                             f"{self.size[1]}x{self.size[0]}: all training images must have one size")
        if not torch.isfinite(x).all():
            raise ValueError(f"{where} contains NaN or infinite values")
        return x

    def batches(self, epoch: int, batch_size: int, counter: list[int]) -> Iterator[Tensor]:
        """[-1, 1] batches of exactly ``batch_size``; the incomplete rest is dropped.
        ``counter[0]`` counts the images seen."""
        buf: list[Tensor] = []
        n = 0
        for i, x in enumerate(self.train_batches(epoch)):
            x = self.check(x, epoch, i)
            counter[0] += x.shape[0]
            buf.append(x)
            n += x.shape[0]
            while n >= batch_size:
                cat = torch.cat(buf) if len(buf) > 1 else buf[0]
                batch, rest = cat[:batch_size], cat[batch_size:]
                buf, n = ([rest] if rest.shape[0] else []), rest.shape[0]
                yield to_signed(batch.to(self.device, torch.float32))

    def count(self, epoch: int) -> int:
        """Images in ``epoch``, each batch checked; nothing is kept."""
        return sum(self.check(x, epoch, i).shape[0] for i, x in enumerate(self.train_batches(epoch)))


def _too_few(n: int, batch_size: int, name: str, epoch: int) -> ValueError:
    return ValueError(f"train_batches({epoch}) gave {n} image(s), fewer than one batch of {name}={batch_size} "
                      f"(incomplete batches are dropped, as in the official code): add training images or "
                      f"lower {name}")


# ----------------------------------------------------------------------------------------
# Checkpoints.


# DDADConfig fields used only at inference: training never reads them (the adaptation has
# its own w_da, da_noise_step, da_skip, eta), so a trained checkpoint serves any of them.
_INFERENCE_ONLY = ("w", "v", "sigma", "seed", "noise_step", "skip", "eta")


def _model_identity(model: DDAD) -> dict:
    d = asdict(model.config)
    for k in _INFERENCE_ONLY:
        d.pop(k)
    return json.loads(json.dumps(d))  # tuples -> lists, as after a round trip


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


@dataclass
class _State:
    stage: str = "ddpm"  # "ddpm", "da" or "done"
    step: int = 0  # optimiser steps done in the current stage
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already used
    loss: list[float] | None = None
    da_loss: list[float] | None = None
    seconds: dict | None = None
    image_size: list[int] | None = None

    def __post_init__(self) -> None:
        self.loss = self.loss or []
        self.da_loss = self.da_loss or []
        self.seconds = self.seconds or {"ddpm": 0.0, "domain_adaptation": 0.0}


def _save(path: Path, model: DDAD, reference: nn.Module | None, opt: torch.optim.Optimizer | None,
          st: _State, cfg: DDADTrainConfig) -> None:
    tensors: dict[str, Tensor] = {}
    for prefix, module in (("unet.", model.unet), ("backbone.", model.backbone), ("reference.", reference)):
        if module is not None:
            tensors.update({prefix + k: v.detach().cpu() for k, v in module.state_dict().items()})
    if opt is not None:
        for idx, s in opt.state_dict()["state"].items():
            for name, v in s.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(v).detach().cpu().clone()
    tensors["history.loss"] = torch.tensor(st.loss, dtype=torch.float64)
    tensors["history.da_loss"] = torch.tensor(st.da_loss, dtype=torch.float64)
    meta = {
        "format": _FORMAT,
        "config": json.dumps(cfg.identity(), sort_keys=True),
        "model": json.dumps(_model_identity(model), sort_keys=True),
        "position": json.dumps({"stage": st.stage, "step": st.step, "epoch": st.epoch, "batch": st.batch}),
        "seconds": json.dumps(st.seconds),
        "image_size": json.dumps(st.image_size),
    }
    save_file_atomic(tensors, path, metadata=meta)


def _read(path: Path, model: DDAD, cfg: DDADTrainConfig) -> tuple[_State, dict[str, Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; report and stop
        raise DDADTrainError(f"cannot read the DDAD training checkpoint {path} ({exc}); delete it to start "
                             f"over") from None
    if meta.get("format") != _FORMAT:
        raise DDADTrainError(f"{path} is not a DDAD training checkpoint (format {meta.get('format')!r}); "
                             f"use another checkpoint folder")
    diffs = _diff(json.loads(meta["config"]), cfg.identity())
    diffs += [f"model {d}" for d in _diff(json.loads(meta["model"]), _model_identity(model))]
    if diffs:
        raise DDADTrainError(f"{path} was written by a run with a different configuration ({'; '.join(diffs)}); "
                             f"refusing to resume from it. Use the same configuration, another checkpoint "
                             f"folder, or delete the file to start over")
    pos = json.loads(meta["position"])
    st = _State(stage=pos["stage"], step=pos["step"], epoch=pos["epoch"], batch=pos["batch"],
                loss=tensors.pop("history.loss").tolist(), da_loss=tensors.pop("history.da_loss").tolist(),
                seconds=json.loads(meta["seconds"]), image_size=json.loads(meta["image_size"]))
    return st, tensors


def _part(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    saved = _part(tensors, "optim.")
    if not saved:
        return
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in saved.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)  # moves moments to the parameters' device


# ----------------------------------------------------------------------------------------
# Training.


@contextlib.contextmanager
def _global_rng(seed: int, device: torch.device):
    # Dropout draws from torch's global RNG: fork it (the caller's stream is untouched) and
    # re-seed per step, so a resumed run draws what an uninterrupted one would.
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _optimise_only(model: nn.Module, part: nn.Module, saved: dict[str, Tensor], optimizer, **hyper):
    """Freeze ``model`` except ``part``; ``optimizer(part's parameters, **hyper)``, its state from ``saved``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in part.parameters():
        p.requires_grad_(True)
    opt = optimizer(part.parameters(), **hyper)
    _load_optimizer(opt, saved)
    return opt


def _descend(opt: torch.optim.Optimizer, loss: Tensor, stage: str, st: _State, lr_name: str, lr: float) -> float:
    """One optimiser step on ``loss`` (refused when it is not finite); advances ``st.step``."""
    value = loss.item()
    if not math.isfinite(value):
        raise _diverged(stage, st.step + 1, st.epoch, value, lr_name, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    st.step += 1
    return value


def _diverged(stage: str, step: int, epoch: int, value: float, lr_name: str, lr: float) -> DDADTrainError:
    return DDADTrainError(
        f"DDAD {stage} diverged: the loss is {value} at step {step} (epoch {epoch}); lower the learning rate "
        f"({lr_name}={lr:g}, try {lr / 10:g}) and train into a new checkpoint folder (a checkpoint made with "
        f"another learning rate is not resumed); no checkpoint was written for the diverged step")


def fit_ddad(
    model: DDAD,
    train_batches: Callable[[int], Iterable[Tensor]],
    cfg: DDADTrainConfig,
    checkpoint_dir: str | Path,
    progress: Progress | None = None,
    log: Log | None = None,
) -> dict:
    """Train ``model`` in place: DDPM training of its U-Net, then domain adaptation of its
    feature extractor (see the module docstring). Resumes from ``checkpoint_dir``.

    Args:
        model: A :class:`~visionscale.anomaly.ddad.DDAD` (e.g. ``registry.create("ddad_tiny")``)
            on the device to train on. Its ``backbone`` holds the pretrained weights the
            adaptation starts from (and keeps as the frozen reference).
        train_batches: ``epoch -> iterable of (B, 3, H, W)`` ImageNet-normalised tensors
            (``batch.images``); the same epoch must give the same images in the same order
            (resuming skips the batches already used). One image size for all.
        cfg: :class:`DDADTrainConfig`.
        checkpoint_dir: Folder of ``ddad_train.safetensors``, written atomically every
            ``cfg.checkpoint_every`` steps and at the end of each stage.
        progress: ``progress(stage, done, total)`` with stage ``"ddpm"`` or ``"domain_adaptation"``.
        log: ``log(message)`` for one-line status messages.

    Returns:
        ``{"loss": [per U-Net step], "da_loss": [per adaptation step], "seconds": total,
        "stage_seconds": {"ddpm", "domain_adaptation"}, "steps", "da_steps", "images",
        "resumed_from"}`` (the losses cover the whole run, resumed parts included; ``loss``
        is the official summed loss, see :func:`ddpm_loss`; ``images``: the count of epoch 0,
        None when a finished checkpoint was only loaded).

    Raises:
        ValueError: Wrong image size or shape, mixed sizes, too few images for a batch,
            schedule differing from the model's, non-finite images.
        TypeError: ``model`` is not a DDAD, or a batch is not a tensor.
        DDADTrainError: A non-finite loss (names the step; lower the learning rate), or a
            checkpoint from a different configuration or unreadable.
    """
    if not isinstance(model, DDAD):
        raise TypeError(f"fit_ddad trains a visionscale.anomaly.ddad.DDAD, got {type(model).__name__}")
    mc = model.config
    if (mc.num_train_steps, mc.beta_start, mc.beta_end) != (cfg.num_train_steps, cfg.beta_start, cfg.beta_end):
        raise ValueError(f"the training schedule ({cfg.num_train_steps} steps, beta {cfg.beta_start}..{cfg.beta_end}) "
                         f"differs from the model's ({mc.num_train_steps} steps, beta {mc.beta_start}..{mc.beta_end}): "
                         f"the U-Net must be trained on the schedule it denoises with")
    have = set(resnet.STAGES[1:]) & {n for n, _ in model.backbone.named_children()}
    missing = [n for n in cfg.da_layers if n not in have]
    if missing:
        raise ValueError(f"da_layers {missing} are not in the model's feature extractor (it has {sorted(have)})")
    say = log or (lambda msg: None)
    tick = progress or (lambda stage, done, total: None)
    ckpt = Path(checkpoint_dir).expanduser() / CHECKPOINT_NAME
    device = next(model.parameters()).device
    grad_flags = {p: p.requires_grad for p in model.parameters()}

    st, saved = (_read(ckpt, model, cfg) if ckpt.exists() else (_State(), {}))
    resumed = None
    if saved:
        model.unet.load_state_dict(_part(saved, "unet."))
        model.backbone.load_state_dict(_part(saved, "backbone."))
        resumed = {"stage": st.stage, "step": st.step}
        say(f"resuming DDAD training from {ckpt}: stage {st.stage}, step {st.step}")
    images = _Images(train_batches, model, device)
    history: dict = {}

    def finish() -> dict:
        history.setdefault("images", None)
        history.update({"loss": list(st.loss), "da_loss": list(st.da_loss),
                        "seconds": float(sum(st.seconds.values())), "stage_seconds": dict(st.seconds),
                        "steps": len(st.loss), "da_steps": len(st.da_loss), "resumed_from": resumed})
        return history

    try:
        if st.stage == "done":
            say(f"DDAD training already complete in {ckpt}")
            return finish()
        n_images = images.count(0)  # also checks every image before any training
        if images.size is None:
            raise ValueError("train_batches(0) gave no images: nothing to train on")
        if st.image_size is not None and tuple(st.image_size) != images.size:
            h, w = st.image_size
            raise DDADTrainError(f"{ckpt} was trained on {w}x{h} (WxH) images, these are "
                                 f"{images.size[1]}x{images.size[0]}: refusing to mix; use another checkpoint folder")
        st.image_size = list(images.size)
        history["images"] = n_images
        # Both stages' batch sizes are checked before any training.
        if st.stage == "ddpm" and (cfg.steps is None and cfg.epochs > 0 or cfg.steps) and n_images < cfg.batch_size:
            raise _too_few(n_images, cfg.batch_size, "batch_size", 0)
        if (cfg.da_steps is None and cfg.da_epochs > 0 or cfg.da_steps) and n_images < cfg.da_batch_size:
            raise _too_few(n_images, cfg.da_batch_size, "da_batch_size", 0)
        if st.stage == "ddpm":
            _train_ddpm(model, images, cfg, st, saved, n_images, ckpt, tick, say)
            saved = {}
        _train_da(model, images, cfg, st, saved, n_images, ckpt, tick, say)
        st.stage, st.step, st.epoch, st.batch = "done", 0, 0, 0
        _save(ckpt, model, None, None, st, cfg)
        say(f"DDAD training done ({sum(st.seconds.values()):.1f} s); checkpoint {ckpt}")
        return finish()
    finally:
        model.eval()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)


def _epoch_loop(images: _Images, cfg_steps: int | None, epochs: int, batch_size: int, name: str,
                st: _State) -> Iterator[Tensor]:
    """Yields the batches still to train on, advancing ``st.epoch`` / ``st.batch``;
    the caller increments ``st.step`` after each optimiser step."""

    def done() -> bool:
        return st.step >= cfg_steps if cfg_steps is not None else st.epoch >= epochs

    while not done():
        counter, used = [0], 0
        for k, x in enumerate(images.batches(st.epoch, batch_size, counter)):
            used += 1
            if k < st.batch:
                continue  # resumed: this batch was trained on before the interruption
            st.batch = k + 1
            yield x
            if done():
                return
        if used == 0:
            raise _too_few(counter[0], batch_size, name, st.epoch)
        st.epoch, st.batch = st.epoch + 1, 0


def _train_ddpm(model: DDAD, images: _Images, cfg: DDADTrainConfig, st: _State, saved: dict[str, Tensor],
                n_images: int, ckpt: Path, tick: Progress, say: Log) -> None:
    per_epoch = n_images // cfg.batch_size
    if per_epoch == 0:
        raise _too_few(n_images, cfg.batch_size, "batch_size", 0)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    unet = model.unet
    opt = _optimise_only(model, unet, saved, torch.optim.Adam, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = images.device
    say(f"DDPM training of the U-Net: {total} steps of {cfg.batch_size} images ({per_epoch} per epoch, "
        f"{n_images} images), Adam lr {cfg.lr:g}" + (f", from step {st.step}" if st.step else ""))
    unet.train()
    t0, last_saved = time.perf_counter(), st.step
    for x0 in _epoch_loop(images, cfg.steps, cfg.epochs, cfg.batch_size, "batch_size", st):
        s = st.step
        gen = torch.Generator(device=device).manual_seed(_step_seed(cfg.seed, s, _STREAM_DDPM))
        t = torch.randint(0, cfg.num_train_steps, (x0.shape[0],), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        with _global_rng(_step_seed(cfg.seed, s, _STREAM_DDPM + 10), device):
            loss = ddpm_loss(unet, x0, t, noise, model.alphas_cumprod)
        value = _descend(opt, loss, "DDPM training", st, "lr", cfg.lr)
        st.loss.append(value)
        tick("ddpm", st.step, total)
        if st.step % cfg.checkpoint_every == 0 and st.step < total:
            st.seconds["ddpm"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            _save(ckpt, model, None, opt, st, cfg)
            last_saved = st.step
            say(f"DDPM step {st.step}/{total} (epoch {st.epoch}): loss {value:.4g}; checkpoint saved")
    st.seconds["ddpm"] += time.perf_counter() - t0
    unet.eval()
    st.stage, st.step, st.epoch, st.batch = "da", 0, 0, 0
    _save(ckpt, model, None, None, st, cfg)
    if st.loss and last_saved != len(st.loss):
        say(f"DDPM training done: {len(st.loss)} steps, last loss {st.loss[-1]:.4g}")


def _train_da(model: DDAD, images: _Images, cfg: DDADTrainConfig, st: _State, saved: dict[str, Tensor],
              n_images: int, ckpt: Path, tick: Progress, say: Log) -> None:
    per_epoch = n_images // cfg.da_batch_size
    total = cfg.da_steps if cfg.da_steps is not None else cfg.da_epochs * per_epoch
    if total > 0 and per_epoch == 0:
        raise _too_few(n_images, cfg.da_batch_size, "da_batch_size", 0)
    backbone, unet = model.backbone, model.unet
    ref_state = _part(saved, "reference.")
    reference = copy.deepcopy(backbone)  # the pretrained weights, before any adaptation
    if ref_state:
        reference.load_state_dict(ref_state)
    reference.eval().requires_grad_(False)
    opt = _optimise_only(model, backbone, saved, torch.optim.AdamW, lr=cfg.da_lr, weight_decay=cfg.da_weight_decay)
    device = images.device
    say(f"domain adaptation of the feature extractor: {total} steps of {cfg.da_batch_size} images "
        f"(w_DA {cfg.w_da:g}, lambda {cfg.da_lambda:g}), AdamW lr {cfg.da_lr:g}"
        + (f", from step {st.step}" if st.step else ""))
    unet.eval()
    backbone.train(cfg.da_batchnorm_train)
    mean, std = model.mean, model.std

    def norm(x: Tensor) -> Tensor:  # [-1, 1] -> ImageNet statistics, as the official transform
        return ((x + 1) / 2 - mean) / std

    t0 = time.perf_counter()
    for batch in _epoch_loop(images, cfg.da_steps, cfg.da_epochs, cfg.da_batch_size, "da_batch_size", st):
        s = st.step
        half = batch.shape[0] // 2
        target, inp = batch[:half], batch[half:]  # official: first half targets, second half inputs
        gen = torch.Generator(device=device).manual_seed(_step_seed(cfg.seed, s, _STREAM_DA))
        x0 = reconstruct_towards(model, inp, target, cfg.w_da, cfg.da_noise_step, cfg.da_skip, cfg.eta, gen)
        with _global_rng(_step_seed(cfg.seed, s, _STREAM_DA + 10), device):
            f_rec = backbone.features(norm(x0), cfg.da_layers)  # official order: x0 first, then target
            f_tgt = backbone.features(norm(target), cfg.da_layers)
            with torch.no_grad():
                r_tgt = reference.features(norm(target), cfg.da_layers)
                r_rec = reference.features(norm(x0), cfg.da_layers)
            loss = domain_adaptation_loss(f_rec, f_tgt, r_tgt, r_rec, cfg.da_lambda)["loss"]
        value = _descend(opt, loss, "domain adaptation", st, "da_lr", cfg.da_lr)
        st.da_loss.append(value)
        tick("domain_adaptation", st.step, total)
        if st.step % cfg.checkpoint_every == 0 and st.step < total:
            st.seconds["domain_adaptation"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            _save(ckpt, model, reference, opt, st, cfg)
            say(f"domain adaptation step {st.step}/{total} (epoch {st.epoch}): loss {value:.4g}; checkpoint saved")
    st.seconds["domain_adaptation"] += time.perf_counter() - t0
    backbone.eval()
    if st.da_loss:
        say(f"domain adaptation done: {len(st.da_loss)} steps, last loss {st.da_loss[-1]:.4g}")

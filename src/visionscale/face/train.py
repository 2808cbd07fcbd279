"""Siamese training of a face embedder with contrastive (or triplet) loss, as seed 003 does.

Data, either
* an identity-folder layout ``<root>/<name>/*.jpg`` (LFW's own layout): identities are split
  into training and validation people (no person in both); every epoch draws fresh pairs
  (half same-person, half different-person) from the training people, with a seeded
  generator per epoch, and validation uses one fixed set of pairs; or
* LFW's View-1 files: ``pairsDevTrain.txt`` for training, ``pairsDevTest.txt`` for
  validation (seed 003's setup; image-restricted: only the listed pairs are used).

Seed 003's recipe, and our defaults where they differ: Adam at lr 1e-3, batch 32, margin 1.0,
ReduceLROnPlateau(factor 0.1, patience 5) on validation loss, keep the weights with the
lowest validation loss. The seed trains only the last ViT block of a pretrained backbone
(``freeze="all_but_last"``); without pretrained backbone weights (none download here) we
default to training everything. We add early stopping (``patience``), augmentation, atomic
checkpoints and exact resume.

Outputs in ``out_dir``: ``model.safetensors`` (best embedder, config in its header),
``last.safetensors`` (weights + optimizer + scheduler + history, for ``resume``),
``history.json`` / ``history.csv``, ``curves.png``, ``config.json``.
"""

from __future__ import annotations

from visionscale.errors import VisionscaleError

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from visionscale.device import resolve_device
from visionscale.io.outputs import check_writable_dir
from visionscale.face.embedder import FREEZE_MODES, FaceEmbedder, preprocess, save_embedder
from visionscale.face.losses import CONTRASTIVE_FORMS, contrastive_loss, triplet_loss
from visionscale.face.verification import best_threshold, roc_auc
from visionscale.io.atomic import write_atomic
from visionscale.io.images import IMAGE_SUFFIXES, read_image
from visionscale.io.weights import config_differences, load_into, optimizer_from_tensors, optimizer_to_tensors, save_file_atomic
from visionscale.registry import create

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "scan_identities"]

MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
# Settings that may change when resuming (more epochs, more patience, another device).
RESUMABLE = {"epochs", "patience", "device"}


class TrainError(VisionscaleError, ValueError):
    """Bad training input or settings; raised before any output file is written."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (saved in ``config.json`` and the resume state).

    Attributes:
        model: Registry name of the embedder (``face_embedder_resnet18``, ``face_embedder_tiny``...).
        embedding_dim: Override of the embedder's output size (None = its default).
        image_size: Override of its input size in px (None = its default).
        backbone_weights: Pretrained backbone (``"DEFAULT"`` = ImageNet, a file) or None.
        freeze: ``"none"``, ``"all_but_last"`` (seed 003) or ``"backbone"``; None = seed's
            ``all_but_last`` with backbone weights, else ``none``.
        loss: ``"contrastive"`` or ``"triplet"`` (identity folders only).
        contrastive_form: ``"hadsell"`` (paper, default) or ``"seed"`` (seed 003: 2x the paper's).
        margin: Contrastive margin ``m`` (seed: 1.0) or triplet margin ``alpha``.
        epochs, batch_size, lr, weight_decay: Optimisation (Adam; seed: 20, 32, 1e-3, 0).
        lr_patience: ReduceLROnPlateau patience (seed: 5), factor 0.1.
        patience: Stop after this many epochs without a lower validation loss.
        pairs_per_epoch: Pairs (or triplets) drawn per epoch from identity folders.
        val_pairs: Validation pairs drawn once from the validation people.
        val_fraction: Share of the people held out for validation (identity folders).
        hflip, rotation, shift, zoom: Augmentation (per image, each side of a pair independently).
        seed: Seed of splits, pair sampling, augmentation and init.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
    """

    model: str = "face_embedder_resnet18"
    embedding_dim: int | None = None
    image_size: int | None = None
    backbone_weights: str | None = None
    freeze: str | None = None
    loss: str = "contrastive"
    contrastive_form: str = "hadsell"
    margin: float = 1.0
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_patience: int = 5
    patience: int = 8
    pairs_per_epoch: int = 2000
    val_pairs: int = 600
    val_fraction: float = 0.2
    hflip: bool = True
    rotation: float = 10.0
    shift: float = 0.05
    zoom: float = 0.1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.loss not in ("contrastive", "triplet"):
            raise TrainError(f"loss must be contrastive or triplet, got {self.loss!r}")
        if self.contrastive_form not in CONTRASTIVE_FORMS:
            raise TrainError(f"contrastive_form must be one of {CONTRASTIVE_FORMS}, got {self.contrastive_form!r}")
        if self.freeze is not None and self.freeze not in FREEZE_MODES:
            raise TrainError(f"freeze must be one of {FREEZE_MODES}, got {self.freeze!r}")
        for name in ("epochs", "batch_size", "pairs_per_epoch", "val_pairs"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.margin > 0):
            raise TrainError(f"lr and margin must be positive, got lr={self.lr}, margin={self.margin}")
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def freeze_mode(self) -> str:
        return self.freeze or ("all_but_last" if self.backbone_weights else "none")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    files: list[Path] = field(default_factory=list)


# -- data ----------------------------------------------------------------------------------
def scan_identities(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``<root>/<name>/<images>`` -> ``{name: sorted image paths}`` (people without images skipped).

    ``root`` may also be the parent of an ``lfw`` / ``lfw-deepfunneled`` folder.
    """
    from visionscale.face.lfw import resolve_image_root

    base = resolve_image_root(root)
    people = {}
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        imgs = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if imgs:
            people[d.name] = imgs
    if len(people) < 2:
        # A folder holding only lfw/ etc. resolves above; here it is really too small.
        raise TrainError(f"{base} holds {len(people)} person folder(s) with images; training needs at least 2 "
                         f"(layout: {base}/<name>/<images>)")
    return people


def _load_images(paths: Sequence[Path], size: int, say: Callable[[str], None]) -> Tensor:
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    from visionscale.face.embedder import _resize_square

    for i, p in enumerate(paths):
        x = torch.from_numpy(read_image(p)).permute(2, 0, 1).float()
        out[i] = _resize_square(x, size).round_().clamp_(0, 255).to(torch.uint8)
        if (i + 1) % 500 == 0:
            say(f"decoded {i + 1}/{len(paths)} images")
    return out


def _sample_pairs(groups: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3)`` rows ``(i, j, same)`` of image indices: half same-person, half different."""
    multi = [g for g in groups if len(g) >= 2]
    if not multi:
        raise TrainError("no person has 2 or more images, so there are no same-person pairs to train on")
    rows = []
    n_pos = n // 2
    for _ in range(n_pos):
        g = multi[rng.integers(len(multi))]
        i, j = rng.choice(len(g), 2, replace=False)
        rows.append((g[i], g[j], 1))
    for _ in range(n - n_pos):
        a, b = rng.choice(len(groups), 2, replace=False)
        rows.append((groups[a][rng.integers(len(groups[a]))], groups[b][rng.integers(len(groups[b]))], 0))
    out = np.array(rows, dtype=np.int64)
    return out[rng.permutation(len(out))]


def _sample_triplets(groups: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    multi = [k for k, g in enumerate(groups) if len(g) >= 2]
    if not multi:
        raise TrainError("no person has 2 or more images, so there are no triplets to train on")
    rows = []
    for _ in range(n):
        a = multi[rng.integers(len(multi))]
        i, j = rng.choice(len(groups[a]), 2, replace=False)
        b = rng.integers(len(groups) - 1)
        b = b + 1 if b >= a else b
        rows.append((groups[a][i], groups[a][j], groups[b][rng.integers(len(groups[b]))]))
    return np.array(rows, dtype=np.int64)


@dataclass
class _Data:
    paths: list[Path]
    train_groups: list[np.ndarray] | None  # identity mode: image indices per training person
    train_pairs: np.ndarray | None  # pairs mode: fixed (i, j, same)
    val_pairs: np.ndarray  # (i, j, same)
    source: str


def _pairs_data(root, pairs_file, val_pairs_file, cfg: TrainConfig) -> _Data:
    from visionscale.face.lfw import image_path, missing_images, parse_pairs, resolve_image_root

    tr = parse_pairs(pairs_file)
    va = parse_pairs(val_pairs_file) if val_pairs_file else None
    names = [p.name1 for p in tr.pairs]
    base = resolve_image_root(root, names)
    allp = tr.pairs + (va.pairs if va else [])
    missing = missing_images(base, allp)
    if missing:
        shown = "\n  ".join(str(m) for m in missing[:20])
        raise TrainError(f"{len(missing)} image(s) named in the pairs files are missing under {base}:\n  {shown}"
                         + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""))
    keys = list(dict.fromkeys(k for p in allp for k in ((p.name1, p.n1), (p.name2, p.n2))))
    idx = {k: i for i, k in enumerate(keys)}

    def rows(prs):
        return np.array([(idx[(p.name1, p.n1)], idx[(p.name2, p.n2)], int(p.same)) for p in prs], dtype=np.int64)

    if va is not None:
        train_rows, val_rows, src = rows(tr.pairs), rows(va.pairs), f"pairs {tr.path} / validation {va.path}"
    else:
        r = rows(tr.pairs)
        perm = np.random.default_rng(cfg.seed).permutation(len(r))
        n_val = max(2, round(len(r) * cfg.val_fraction))
        train_rows, val_rows = r[perm[n_val:]], r[perm[:n_val]]
        src = f"pairs {tr.path}, {cfg.val_fraction:.0%} of them held out (seed {cfg.seed})"
    return _Data([image_path(base, n, i) for n, i in keys], None, train_rows, val_rows, src)


def _folder_data(root, cfg: TrainConfig) -> _Data:
    people = scan_identities(root)
    names = list(people)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(names))
    n_val = min(max(2, round(len(names) * cfg.val_fraction)), len(names) - 2)
    if n_val < 2:
        raise TrainError(f"{len(names)} people are too few to hold out validation people (need at least 4)")
    val_names = {names[i] for i in perm[:n_val]}
    paths: list[Path] = []
    train_groups, val_groups = [], []
    for name in names:
        start = len(paths)
        paths += people[name]
        (val_groups if name in val_names else train_groups).append(np.arange(start, len(paths)))
    if not any(len(g) >= 2 for g in val_groups):
        raise TrainError("no validation person has 2 or more images; add images or change val_fraction/seed")
    val_rows = _sample_pairs(val_groups, cfg.val_pairs, np.random.default_rng(cfg.seed + 1))
    src = f"identity folders {root}: {len(train_groups)} training / {len(val_groups)} validation people"
    return _Data(paths, train_groups, None, val_rows, src)


# -- augmentation --------------------------------------------------------------------------
def _augment(x: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Random flip / rotation / shift / zoom of a float batch ``(B, 3, S, S)`` (border fill)."""
    b = x.shape[0]
    if not (cfg.hflip or cfg.rotation or cfg.shift or cfg.zoom):
        return x

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    ang = torch.deg2rad(u(-cfg.rotation, cfg.rotation))
    scale = u(1 - cfg.zoom, 1 + cfg.zoom)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(b)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    # affine_grid maps output -> input coordinates in [-1, 1]: inverse rotation and zoom.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2], theta[:, 1, 2] = u(-2 * cfg.shift, 2 * cfg.shift), u(-2 * cfg.shift, 2 * cfg.shift)
    grid = torch.nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _batch(images: Tensor, idx: np.ndarray, model: FaceEmbedder, device, cfg: TrainConfig | None,
           gen: torch.Generator | None) -> Tensor:
    x = images[torch.from_numpy(idx)].float()  # (B, 3, S, S) 0..255
    if cfg is not None:
        x = _augment(x, cfg, gen)
    return preprocess(x, model.config).to(device)


# -- state ---------------------------------------------------------------------------------




def _history_csv(history: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    return buf.getvalue().encode()


# -- training ------------------------------------------------------------------------------
@torch.no_grad()
def _validate(model: FaceEmbedder, images: Tensor, pairs: np.ndarray, cfg: TrainConfig, device) -> dict:
    model.eval()
    used = np.unique(pairs[:, :2])
    pos = {int(k): i for i, k in enumerate(used)}
    emb = torch.cat([model(_batch(images, used[s:s + 128], model, device, None, None)).cpu()
                     for s in range(0, len(used), 128)])
    a = emb[[pos[int(i)] for i in pairs[:, 0]]]
    b = emb[[pos[int(j)] for j in pairs[:, 1]]]
    same = torch.from_numpy(pairs[:, 2])
    if cfg.loss == "contrastive":
        loss = contrastive_loss(a, b, same, cfg.margin, cfg.contrastive_form).item()
    else:
        # Triplet runs are validated on pairs with the Hadsell loss at the same margin, so
        # the number is comparable across epochs (not with the training loss).
        loss = contrastive_loss(a, b, same, cfg.margin, "hadsell").item()
    d = (a - b).double().norm(dim=1).numpy()
    y = pairs[:, 2].astype(bool)
    _, acc = best_threshold(d, y)
    return {"val_loss": loss, "val_acc": acc, "val_auc": roc_auc(d, y) if y.any() and not y.all() else float("nan")}


def train(data: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainConfig | None = None,
          pairs_file: str | os.PathLike | None = None, val_pairs_file: str | os.PathLike | None = None,
          resume: bool = False, overwrite: bool = False, plots: bool = True,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train a face embedder; see the module docstring for data, recipe and outputs.

    Args:
        data: Identity-folder root (``<name>/<images>``), or the LFW image root with ``pairs_file``.
        out_dir: Output folder; must not hold another run unless ``resume`` or ``overwrite``.
        cfg: Settings (defaults: :class:`TrainConfig`).
        pairs_file: LFW ``pairsDevTrain.txt``-style file: train on exactly these pairs.
        val_pairs_file: Validation pairs (``pairsDevTest.txt``); default: hold out ``val_fraction``.
        resume: Continue the run in ``out_dir`` from ``last.safetensors``.

    Raises:
        TrainError, LFWError, ImageReadError: bad input, before any output is written.
    """
    cfg = cfg or TrainConfig()
    say = progress or (lambda m: None)
    out = Path(out_dir).expanduser()
    device = resolve_device(cfg.device)
    check_writable_dir(out)  # a file in the way or a read-only folder fails now, not after the images load
    if not resume and not overwrite and any((out / n).exists() for n in (LAST_FILE, MODEL_FILE)):
        raise TrainError(f"{out} already holds a training run: resume it, overwrite it, or choose another folder")
    state, tensors = _read_resume(out, cfg) if resume else (None, None)
    if pairs_file is None and val_pairs_file is not None:
        raise TrainError("a validation pairs file needs a training pairs file too")
    if cfg.loss == "triplet" and pairs_file is not None:
        raise TrainError("triplet loss needs identity folders (pairs files give pairs, not triplets)")
    ds = _pairs_data(data, pairs_file, val_pairs_file, cfg) if pairs_file else _folder_data(data, cfg)

    torch.manual_seed(cfg.seed)
    kw = {k: v for k, v in (("embedding_dim", cfg.embedding_dim), ("image_size", cfg.image_size)) if v is not None}
    if cfg.backbone_weights is not None and state is None:  # a resumed run restores its own weights
        kw["backbone_weights"] = cfg.backbone_weights
    try:
        model = create(cfg.model, **kw)
    except TypeError as exc:
        raise TrainError(f"cannot build {cfg.model!r} with {kw}: {exc}") from None
    if not isinstance(model, FaceEmbedder):
        raise TrainError(f"{cfg.model!r} is not a face embedder (try face_embedder_resnet18 or face_embedder_tiny)")
    model.freeze(cfg.freeze_mode)
    size = model.config.image_size
    say(f"{ds.source}; decoding {len(ds.paths)} images at {size} px")
    images = _load_images(ds.paths, size, say)
    model.to(device)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=cfg.lr_patience)
    history: list[dict] = []
    best_loss, best_epoch, bad = math.inf, 0, 0
    if state is not None:
        load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, source=str(out / LAST_FILE))
        optimizer_from_tensors(opt, tensors, state["optim"])
        sched.load_state_dict(state["sched"])
        history, best_loss, best_epoch, bad = state["history"], state["best_val_loss"], state["best_epoch"], state["bad"]
        say(f"resuming after epoch {len(history)}")
    out.mkdir(parents=True, exist_ok=True)
    files: set[Path] = set()

    def write(name: str, payload: bytes) -> None:
        write_atomic(out / name, payload)
        files.add(out / name)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.trainable_parameters())
    say(f"{cfg.model}: {n_params:,} parameters, {n_train:,} trainable (freeze={cfg.freeze_mode}), device {device}")
    while len(history) < cfg.epochs and bad < cfg.patience:
        epoch = len(history) + 1
        t0 = time.perf_counter()
        # Per-epoch seeds: a resumed run draws exactly what an uninterrupted one would.
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        if ds.train_pairs is not None:
            rows = ds.train_pairs[rng.permutation(len(ds.train_pairs))]
        elif cfg.loss == "triplet":
            rows = _sample_triplets(ds.train_groups, cfg.pairs_per_epoch, rng)
        else:
            rows = _sample_pairs(ds.train_groups, cfg.pairs_per_epoch, rng)
        model.train()
        total, count = 0.0, 0
        for s in range(0, len(rows), cfg.batch_size):
            r = rows[s:s + cfg.batch_size]
            if len(r) < 2:
                continue  # BatchNorm needs more than one sample per channel
            opt.zero_grad(set_to_none=True)
            if cfg.loss == "triplet":
                z = model(torch.cat([_batch(images, r[:, c], model, device, cfg, gen) for c in range(3)]))
                a, p, n = z.split(len(r))
                loss = triplet_loss(a, p, n, cfg.margin)
            else:
                a, b = model.forward_pair(_batch(images, r[:, 0], model, device, cfg, gen),
                                          _batch(images, r[:, 1], model, device, cfg, gen))
                loss = contrastive_loss(a, b, torch.from_numpy(r[:, 2]).to(device), cfg.margin, cfg.contrastive_form)
            if not torch.isfinite(loss):
                raise TrainError(f"epoch {epoch}: the loss became {loss.item()}; lower the learning rate")
            loss.backward()
            opt.step()
            total += loss.item() * len(r)
            count += len(r)
        val = _validate(model, images, ds.val_pairs, cfg, device)
        sched.step(val["val_loss"])
        row = {"epoch": epoch, "train_loss": total / max(count, 1), **val, "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        if val["val_loss"] < best_loss:
            best_loss, best_epoch, bad = val["val_loss"], epoch, 0
            save_embedder(model, out / MODEL_FILE, extra={"epoch": epoch, "val_loss": val["val_loss"]})
            files.add(out / MODEL_FILE)
        else:
            bad += 1
        _save_last(out, model, opt, sched, cfg, history, best_loss, best_epoch, bad)
        files.add(out / LAST_FILE)
        write("history.json", (json.dumps(history, indent=2) + "\n").encode())
        write("history.csv", _history_csv(history))
        if plots:
            from visionscale.face.plots import curves_png

            write("curves.png", curves_png(history))
        say(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val['val_loss']:.4f}, "
            f"val acc {val['val_acc']:.3f}, val AUC {val['val_auc']:.3f} ({row['seconds']:.1f}s)")
    if bad >= cfg.patience and len(history) < cfg.epochs:
        say(f"early stop: no lower validation loss for {cfg.patience} epochs (best: epoch {best_epoch})")
    summary = {"format": "visionscale.face.train/1", "train": cfg.to_dict(), "model": model.config.to_dict(),
               "data": {"source": ds.source, "images": len(ds.paths), "val_pairs": int(len(ds.val_pairs))},
               "result": {"best_epoch": best_epoch, "best_val_loss": best_loss, "epochs_run": len(history)}}
    write("config.json", (json.dumps(summary, indent=2) + "\n").encode())
    return TrainResult(out, history, best_epoch, best_loss, sorted(files))


def _save_last(out: Path, model, opt, sched, cfg: TrainConfig, history, best_loss, best_epoch, bad) -> None:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    t, optim_meta = optimizer_to_tensors(opt)
    tensors.update(t)
    state = {"train_config": cfg.to_dict(), "history": history, "best_val_loss": best_loss, "best_epoch": best_epoch,
             "bad": bad, "optim": optim_meta, "sched": sched.state_dict()}
    save_file_atomic(tensors, out / LAST_FILE, metadata={"resume": json.dumps(state)})


def _read_resume(out: Path, cfg: TrainConfig) -> tuple[dict, dict[str, Tensor]]:
    last = out / LAST_FILE
    if not last.is_file():
        raise TrainError(f"nothing to resume: {last} does not exist")
    try:
        with safetensors.safe_open(str(last), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise TrainError(f"could not read {last}: {exc}") from None
    if "resume" not in meta:
        raise TrainError(f"{last} is not a visionscale face training state")
    state = json.loads(meta["resume"])
    saved = TrainConfig.from_dict(state["train_config"])
    diffs = config_differences(saved, cfg, RESUMABLE)
    if diffs:
        raise TrainError("resume must use the settings of the interrupted run; differs in " + "; ".join(diffs))
    return state, safetensors.torch.load_file(str(last))

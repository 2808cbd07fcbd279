"""Train and evaluate the anchor-based detector with plain or EAPM losses.

``train(TrainConfig(...))`` runs: anchor matching by IoU (positive / negative / ignore),
focal + balanced L1 (``loss="focal+balanced_l1"``) or their EAPM forms (``loss="eapm"``),
AdamW with warm-up and cosine decay, checkpoints as safetensors after every epoch (resume
continues bit-for-bit: data order and flips are drawn from (seed, epoch)), loss curves as
PNG, and COCO metrics (AP, AP50, AP75, AP_S/M/L via pycocotools) on the validation set.
``compare(...)`` trains both losses on the same data and seeds, like the paper's Tables 1-2.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from visionscale.detection import boxes as box_ops
from visionscale.detection.data import AnnotationError, DetectionDataset, ImageCache, to_coco_gt
from visionscale.detection.losses import balanced_l1_loss, eapm_balanced_l1_loss, eapm_focal_loss, sigmoid_focal_loss
from visionscale.errors import (
    InvalidFileError,
    InvalidValueError,
    OutputExistsError,
    RunLockedError,
    VisionscaleError,
    check_finite,
    check_int,
)
from visionscale.io.outputs import RunLock

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "evaluate", "compare", "load_dataset",
           "load_model", "METRICS", "format_table", "LOSSES"]

LOSSES = ("focal+balanced_l1", "eapm")
METRICS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
CHECKPOINT, WEIGHTS = "last.safetensors", "model.safetensors"
RUN_KIND = "detect-run"  # manifest kind of a training folder
RUN_FILES = (CHECKPOINT, WEIGHTS, "history.json", "metrics.json", "loss_curves.png")
COMPARE_KIND, COMPARE_FILES = "detect-compare", ("compare.json", "compare.md")
MAX_IMAGE_SIZE = 8192
Progress = Callable[[dict[str, Any]], None]


class TrainError(VisionscaleError, RuntimeError):
    """Training cannot start or continue; the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on (stored in its checkpoints).

    Attributes:
        train_ann, val_ann: Annotation files (COCO JSON, or WIDER FACE ``*_bbx_gt.txt``).
        train_images, val_images: Image folders (COCO default: the JSON's folder).
        data_format: "coco" or "widerface".
        model: Registered detector name (``ssd_tiny``, ``ssd_resnet18``).
        loss: "focal+balanced_l1" (plain) or "eapm" (both losses modulated).
        mu, theta: EAPM strengths for classification and regression (0 turns one off).
        mf_grad: EAPM backward mode: "paper", "constant" (MF detached) or "full".
        eapm_xy: "plain" (t_x, t_y unmodulated) or "gos".
        focal_alpha, focal_gamma: Focal loss (RetinaNet: 0.25, 2).
        bl1_alpha, bl1_gamma, bl1_beta: Balanced L1 (Libra RetinaNet: 0.5, 1.5, 0.11).
        pos_iou, neg_iou: Anchor matching thresholds (RetinaNet: 0.5, 0.4).
        image_size: Training / evaluation side in pixels (images are resized).
        epochs, batch_size, lr, weight_decay, warmup_steps: Optimisation (AdamW).
        flip: Random horizontal flips.
        seed: Model init, data order and flips.
        eval_every: Evaluate every N epochs (0: only after the last one).
        out_dir: Checkpoints, metrics, curves.
    """

    train_ann: str
    val_ann: str | None = None
    train_images: str | None = None
    val_images: str | None = None
    data_format: Literal["coco", "widerface"] = "coco"
    model: str = "ssd_tiny"
    loss: str = "focal+balanced_l1"
    mu: float = 1.5
    theta: float = 1.0
    mf_grad: str = "paper"
    eapm_xy: str = "plain"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    bl1_alpha: float = 0.5
    bl1_gamma: float = 1.5
    bl1_beta: float = 0.11
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    image_size: int = 160
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    flip: bool = True
    seed: int = 0
    eval_every: int = 0
    out_dir: str = "detect-run"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidValueError(f"loss must be one of {LOSSES}, got {self.loss!r}").about("loss")
        if self.data_format not in ("coco", "widerface"):
            raise InvalidValueError(f"data_format must be 'coco' or 'widerface', got {self.data_format!r}").about(
                "data_format")
        if self.mf_grad not in ("paper", "constant", "full"):
            raise InvalidValueError(f"mf_grad must be 'paper', 'constant' or 'full', got {self.mf_grad!r}").about(
                "mf_grad")
        if self.eapm_xy not in ("plain", "gos"):
            raise InvalidValueError(f"eapm_xy must be 'plain' or 'gos', got {self.eapm_xy!r}").about("eapm_xy")
        for name in ("mu", "theta", "focal_gamma", "weight_decay"):
            check_finite(name, getattr(self, name), minimum=0.0)
        check_finite("focal_alpha", self.focal_alpha, minimum=0.0, maximum=1.0)
        for name in ("bl1_alpha", "bl1_gamma", "bl1_beta", "lr"):
            check_finite(name, getattr(self, name), minimum=0.0, min_inclusive=False)
        for name in ("pos_iou", "neg_iou"):
            check_finite(name, getattr(self, name), minimum=0.0, maximum=1.0)
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        # The coarsest level has stride 32; the cap keeps a typo from allocating terabytes.
        check_int("image_size", self.image_size, minimum=32, maximum=MAX_IMAGE_SIZE)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("eval_every", self.eval_every, minimum=0)
        check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)  # torch generator seeds
        if not self.neg_iou <= self.pos_iou:
            raise InvalidValueError(f"need 0 <= neg_iou <= pos_iou <= 1, got {self.neg_iou}, {self.pos_iou}").about(
                "neg_iou", "pos_iou")

    def label(self) -> str:
        if self.loss == "eapm":
            return f"EAPM (mu={self.mu:g}, theta={self.theta:g})"
        return "focal + balanced L1"


@dataclass
class TrainResult:
    config: TrainConfig
    metrics: dict[str, float | None]
    history: dict[str, list]
    seconds: float
    out_dir: Path
    cpu_seconds: float = 0.0  # process CPU time of this call (robust to other work sharing the cores)


# ----------------------------------------------------------------------------- data
def load_dataset(ann: str | Path, images: str | Path | None, data_format: str, strict: bool = False) -> DetectionDataset:
    """Read annotations in ``data_format`` ("coco" or "widerface")."""
    if data_format == "coco":
        from visionscale.detection.coco import load_coco

        return load_coco(ann, images, strict=strict)
    if data_format == "widerface":
        from visionscale.detection.widerface import load_widerface

        if images is None:
            raise AnnotationError("WIDER FACE needs the images folder (WIDER_train/images)")
        return load_widerface(ann, images, strict=strict)
    raise InvalidValueError(f"data_format must be 'coco' or 'widerface', got {data_format!r}").about("data_format")


# ----------------------------------------------------------------------------- losses
def detection_loss(
    cfg: TrainConfig, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
    gt_boxes: list[Tensor], gt_labels: list[Tensor], gt_ignore: list[Tensor],
) -> tuple[Tensor, Tensor, int]:
    """(cls loss, reg loss, positives) for a batch; both losses are sums over anchors / positives.

    Args:
        cls_logits: (B, A, C); box_deltas: (B, A, 4); anchors: (A, 4); per image gt (G_b, 4).
    """
    b, a, c = cls_logits.shape
    assigned = torch.stack([
        box_ops.match_anchors(anchors, gb, cfg.pos_iou, cfg.neg_iou, gt_ignore=gi)
        for gb, gi in zip(gt_boxes, gt_ignore)
    ])  # (B, A)
    pos = assigned >= 0
    valid = assigned != box_ops.IGNORE
    cls_t = torch.zeros_like(cls_logits)  # (B, A, C)
    reg_t = []
    for i in range(b):
        idx = assigned[i][pos[i]]
        cls_t[i, pos[i], gt_labels[i][idx]] = 1.0
        reg_t.append(box_ops.encode(anchors[pos[i]], gt_boxes[i][idx]))
    reg_t = torch.cat(reg_t) if reg_t else box_deltas.new_zeros((0, 4))
    num_pos = int(pos.sum())
    norm = max(num_pos, 1)  # no positives: the negatives still train, nothing divides by 0
    logits, targets, preds = cls_logits[valid], cls_t[valid], box_deltas[pos]  # (V, C), (V, C), (P, 4)
    if cfg.loss == "eapm":
        cls = eapm_focal_loss(logits, targets, mu=cfg.mu, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                              reduction="sum", mf_grad=cfg.mf_grad)
        reg = eapm_balanced_l1_loss(preds, reg_t, theta=cfg.theta, alpha=cfg.bl1_alpha, gamma=cfg.bl1_gamma,
                                    beta=cfg.bl1_beta, reduction="sum", mf_grad=cfg.mf_grad, xy=cfg.eapm_xy)
    else:
        cls = sigmoid_focal_loss(logits, targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="sum")
        reg = balanced_l1_loss(preds, reg_t, alpha=cfg.bl1_alpha, gamma=cfg.bl1_gamma, beta=cfg.bl1_beta,
                               reduction="sum")
    return cls / norm, reg / norm, num_pos


# ----------------------------------------------------------------------------- model & checkpoints
def build_model(name: str, num_classes: int) -> nn.Module:
    import visionscale.detection.model  # noqa: F401  (registers ssd_*)
    from visionscale.registry import create

    model = create(name, num_classes=num_classes)
    if not (hasattr(model, "anchors") and hasattr(model, "num_classes")):
        raise TrainError(f"model {name!r} is not an anchor-based detector (needs anchors(h, w) and num_classes)")
    return model


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state split into flat tensors (safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_state(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, meta: dict) -> None:
    """Model (+ optimizer) tensors and a JSON ``meta`` in one safetensors file, written atomically."""
    from visionscale.io.atomic import write_atomic

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if opt is not None:
        t, rest = _optim_tensors(opt)
        tensors.update(t)
        meta["optimizer"] = rest
    write_atomic(path, st_save(tensors, metadata={"visionscale": json.dumps(meta)}))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrainError(f"checkpoint not found: {path}") from None
    try:
        tensors = st_load(raw)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["visionscale"])
    except Exception as exc:  # corrupt or foreign file
        raise TrainError(f"{path} is not a visionscale detection checkpoint ({exc})") from None
    return tensors, meta


def _checkpoint_fields(path: Path, meta) -> tuple[str, int, list[str], list[int]]:
    """(model name, image size, class names, category ids) of a checkpoint's metadata, each
    checked: an edited file fails here with its name and the field, not deep inside torch."""
    def bad(field: str, why: str) -> InvalidFileError:
        return InvalidFileError(f"{path}: field {field} {why}")

    cfg = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise bad("config", "is missing or not an object")
    name = cfg.get("model")
    if not isinstance(name, str) or not name:
        raise bad("config.model", f"must be a detector name, got {name!r}")
    size = cfg.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= MAX_IMAGE_SIZE:
        raise bad("config.image_size", f"must be an integer in 32..{MAX_IMAGE_SIZE}, got {size!r}")
    names, ids = meta.get("class_names"), meta.get("category_ids")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("class_names", f"must be a non-empty list of strings, got {names!r}")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise bad("category_ids", f"must be a list of integers, got {ids!r}")
    if len(ids) != len(names):
        raise bad("class_names", f"has {len(names)} entries but category_ids {len(ids)}")
    return name, size, names, ids


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the detector saved in ``model.safetensors`` / ``last.safetensors``.

    Raises:
        TrainError: not a detection checkpoint. InvalidFileError: an edited or damaged one.
    """
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    name, _, names, _ = _checkpoint_fields(path, meta)
    model = build_model(name, len(names))
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidFileError(f"{path}: the weights do not fit a {name} with {len(names)} classes "
                               f"(field class_names; {first})") from None
    return model.eval(), meta


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, cache: ImageCache, batch_size: int = 32,
            forward: Callable[[Tensor], Any] | None = None) -> list[dict]:
    """COCO-style detections ``{"image_id", "category_id", "bbox": xywh, "score"}`` in original pixels.

    ``forward``: what runs the network on a ``(B, 3, S, S)`` batch in 0..1 (default: ``model``;
    e.g. a :class:`visionscale.runtime.Runner` around it for another backend or precision).
    ``model`` still provides the anchors for decoding.
    """
    check_int("batch_size", batch_size, minimum=1)
    model.eval()
    size = cache.size
    anchors = model.anchors(size, size, device="cpu")
    ds = cache.dataset
    run = forward or model
    device = getattr(run, "device", None) or next(model.parameters()).device
    out = []
    for start in range(0, len(cache), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(cache)))
        imgs = cache.images[idx].to(device).float().div_(255)
        cls, box = run(imgs)
        cls, box = cls.float().cpu(), box.float().cpu()
        for j, i in enumerate(idx.tolist()):
            b, s, l = box_ops.postprocess(cls[j], box[j], anchors, (size, size))
            sx, sy = cache.scale[i].tolist()
            b = b * torch.tensor([sx, sy, sx, sy])
            rec = ds.records[i]
            for bb, ss, ll in zip(box_ops.xyxy_to_xywh(b).tolist(), s.tolist(), l.tolist()):
                out.append({"image_id": int(rec.image_id), "category_id": int(ds.category_ids[ll]),
                            "bbox": [round(v, 2) for v in bb], "score": round(ss, 5)})
    return out


def coco_metrics(dataset: DetectionDataset, detections: list[dict]) -> dict[str, float | None]:
    """AP, AP50, AP75, AP_S, AP_M, AP_L in percent (pycocotools); None where no GT of that size exists."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = to_coco_gt(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if detections:
            dt = gt.loadRes(detections)
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = ev.stats[:6].tolist()
    if not detections:  # pycocotools cannot load an empty result list: AP is 0 where GT exists
        areas = [a["area"] for a in gt.dataset["annotations"] if not a["iscrowd"]]
        has = [bool(areas), bool(areas), bool(areas), any(a < 32**2 for a in areas),
               any(32**2 <= a < 96**2 for a in areas), any(a >= 96**2 for a in areas)]
        stats = [0.0 if h else -1.0 for h in has]
    # -1 means "no ground truth in this area range"; report it as missing, not as 0.
    return {m: (None if v < 0 else round(100 * v, 2)) for m, v in zip(METRICS, stats)}


def evaluate(model: nn.Module, cache: ImageCache, batch_size: int = 32,
             forward: Callable[[Tensor], Any] | None = None) -> dict[str, float | None]:
    """COCO metrics of ``model`` (run through ``forward`` when given, see :func:`predict`) on ``cache``."""
    return coco_metrics(cache.dataset, predict(model, cache, batch_size, forward))


# ----------------------------------------------------------------------------- training
def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    warm = min(cfg.warmup_steps, max(1, total // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _comparable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("out_dir")
    d.pop("eval_every")
    return d


def train(
    cfg: TrainConfig,
    progress: Progress | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data: tuple[ImageCache, ImageCache | None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train one detector; writes checkpoints, metrics.json, history.json and loss_curves.png.

    Args:
        cfg: The run.
        progress: Called with ``{"kind": "step"|"epoch"|"eval", ...}`` events.
        resume: Continue from ``out_dir/last.safetensors`` (same config required).
        overwrite: Allow starting afresh in a folder that holds a checkpoint.
        data: Pre-loaded (train, val) caches (``compare`` shares them between runs).
        stop_after: Stop after this many epochs in total (simulates an interruption).

    Raises:
        OutputExistsError: ``out_dir`` holds files no detector run wrote (and not ``overwrite``).
        RunLockedError: another process is training into ``out_dir``.
    """
    from visionscale.io.outputs import ensure_output_dir as check_output_dir

    out = Path(cfg.out_dir)
    _check_run_dir(out, resume, overwrite)  # before the lock file: a refused folder stays as it was
    created = not out.exists()
    check_output_dir(out)
    lock = RunLock(out, what="training run folder")
    try:
        with lock:
            _check_run_dir(out, resume, overwrite)  # again: another process may have written meanwhile
            return _train(cfg, out, progress, resume, overwrite, data, stop_after)
    except RunLockedError:
        raise  # the folder and its lock file are the other process's
    except BaseException:
        if created and list(out.iterdir()) == [lock.file]:  # a new folder, failed before writing anything
            lock.file.unlink()
            out.rmdir()
        raise


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding files no detector run wrote (unless ``overwrite``), a missing
    checkpoint to resume, or (neither resuming nor overwriting) a checkpoint of ours."""
    from visionscale.io.outputs import refuse_foreign

    if out.exists() and not out.is_dir():
        raise TrainError(f"output folder {out} exists and is not a folder")
    refuse_foreign(out, RUN_KIND, overwrite=overwrite, writer="a visionscale training run")
    ckpt = out / CHECKPOINT
    if resume and not ckpt.exists():
        raise TrainError(f"nothing to resume: no checkpoint {ckpt}")
    if not resume and ckpt.exists() and not overwrite:
        raise TrainError(f"{out} already holds a checkpoint; resume it, overwrite it, or pick another output folder")


def _claim_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Record the files this run writes in the folder's manifest before writing them (so a
    rerun or resume knows them as ours); replacing a run first removes the old one's files."""
    from visionscale.io.outputs import record_files

    record_files(out, RUN_KIND, RUN_FILES, replace=overwrite and not resume)


def _train(cfg: TrainConfig, out: Path, progress: Progress | None, resume: bool, overwrite: bool,
           data: tuple[ImageCache, ImageCache | None] | None, stop_after: int | None) -> TrainResult:
    from visionscale.io.atomic import write_atomic

    ckpt = out / CHECKPOINT
    if data is None:
        train_ds = load_dataset(cfg.train_ann, cfg.train_images, cfg.data_format)
        val_ds = load_dataset(cfg.val_ann, cfg.val_images, cfg.data_format) if cfg.val_ann else None
        data = (ImageCache(train_ds, cfg.image_size), ImageCache(val_ds, cfg.image_size) if val_ds else None)
    train_cache, val_cache = data
    if len(train_cache) == 0:
        raise TrainError(f"no training images in {cfg.train_ann}")
    if train_cache.size != cfg.image_size:
        raise TrainError(f"pre-loaded images are {train_cache.size} px, config says {cfg.image_size}")
    class_names = train_cache.dataset.class_names
    _claim_run_dir(out, resume, overwrite)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(class_names))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_cache) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history: dict[str, list] = {"step": [], "epoch": [], "loss": [], "cls": [], "reg": [], "lr": [], "eval": []}
    start_epoch, elapsed = 0, 0.0
    if resume:
        tensors, meta = read_checkpoint(ckpt)
        try:
            saved = TrainConfig(**meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidFileError(f"{ckpt}: field config is damaged ({exc})") from None
        if _comparable(saved) != _comparable(cfg):
            old = _comparable(saved)
            diff = {k: (old[k], v) for k, v in _comparable(cfg).items() if old.get(k) != v}
            raise TrainError(f"cannot resume {ckpt}: the settings differ (checkpoint, now): {diff}")
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            opt.load_state_dict(_optim_state(tensors, meta["optimizer"]))
            start_epoch, history, elapsed = int(meta["epoch"]), meta["history"], float(meta.get("seconds", 0.0))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InvalidFileError(f"{ckpt}: damaged training state ({type(exc).__name__}: {exc})") from None

    anchors = model.anchors(cfg.image_size, cfg.image_size)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics: dict[str, float | None] = {}
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # order and flips of this epoch
        order = torch.randperm(len(train_cache), generator=g)
        flips = torch.rand(len(train_cache), generator=g) < 0.5 if cfg.flip else None
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            imgs, gtb, gtl, gti = train_cache.batch(idx, flips[idx] if flips is not None else None)
            lr = _lr_at(cfg, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            cls_logits, box_deltas = model(imgs)
            try:
                cls_loss, reg_loss, num_pos = detection_loss(cfg, cls_logits, box_deltas, anchors, gtb, gtl, gti)
            except InvalidValueError as exc:  # a diverged model (NaN predictions); other errors are bugs
                raise TrainError(f"epoch {epoch + 1}, step {step + 1}: {exc}") from None
            loss = cls_loss + reg_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            for key, v in (("step", step + 1), ("epoch", epoch + 1), ("loss", loss.item()), ("cls", cls_loss.item()),
                           ("reg", reg_loss.item()), ("lr", lr)):
                history[key].append(v)
            if progress:
                progress({"kind": "step", "step": step + 1, "total": total, "epoch": epoch + 1,
                          "loss": history["loss"][-1]})
        done = epoch + 1
        if val_cache is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.epochs):
            metrics = evaluate(model, val_cache)
            history["eval"].append({"epoch": done, **metrics})
            if progress:
                progress({"kind": "eval", "epoch": done, **metrics})
        seconds = elapsed + time.perf_counter() - t0
        meta = {"config": asdict(cfg), "epoch": done, "history": history, "seconds": seconds,
                "class_names": class_names, "category_ids": train_cache.dataset.category_ids}
        save_checkpoint(ckpt, model, opt, meta)
        if progress:
            progress({"kind": "epoch", "epoch": done, "epochs": cfg.epochs, "loss": history["loss"][-1]})

    seconds = elapsed + time.perf_counter() - t0
    if history["eval"] and history["eval"][-1]["epoch"] == last_epoch:
        metrics = {m: history["eval"][-1].get(m) for m in METRICS}
    meta = {"config": asdict(cfg), "epoch": last_epoch, "seconds": seconds, "class_names": class_names,
            "category_ids": train_cache.dataset.category_ids, "history": {}}
    if last_epoch == cfg.epochs:
        save_checkpoint(out / WEIGHTS, model, None, meta)
    write_atomic(out / "history.json", json.dumps(history).encode())
    write_atomic(out / "metrics.json", json.dumps({"label": cfg.label(), "metrics": metrics, "seconds": round(seconds, 2),
                                                   "epochs_done": last_epoch, "config": asdict(cfg)}, indent=2).encode())
    if history["step"]:
        from visionscale.detection.plots import plot_loss_curves

        plot_loss_curves(history, out / "loss_curves.png", title=cfg.label())
    return TrainResult(cfg, metrics, history, seconds, out, time.process_time() - c0)


# ----------------------------------------------------------------------------- comparison
def compare(
    cfg: TrainConfig,
    seeds: tuple[int, ...] = (0,),
    progress: Progress | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the plain losses and EAPM (``cfg.mu``, ``cfg.theta``) on the same data and seeds.

    Runs go to ``cfg.out_dir/{baseline,eapm}_seed{S}``. Returns ``{"rows": [...], "runs": [...]}``
    where each row is one setting with metrics averaged over the seeds.
    """
    if not seeds:
        raise InvalidValueError("need at least one seed")
    for seed in seeds:
        check_int("seed", seed, minimum=0, maximum=2**32 - 1)
    if cfg.val_ann is None:
        raise TrainError("compare needs validation annotations")
    _claim_compare_dir(Path(cfg.out_dir), overwrite)
    train_ds = load_dataset(cfg.train_ann, cfg.train_images, cfg.data_format)
    val_ds = load_dataset(cfg.val_ann, cfg.val_images, cfg.data_format)
    data = (ImageCache(train_ds, cfg.image_size), ImageCache(val_ds, cfg.image_size))
    settings = [("baseline", replace(cfg, loss="focal+balanced_l1")), ("eapm", replace(cfg, loss="eapm"))]
    runs = []
    for seed in seeds:
        for tag, c in settings:
            c = replace(c, seed=seed, out_dir=str(Path(cfg.out_dir) / f"{tag}_seed{seed}"))
            if progress:
                progress({"kind": "run", "label": c.label(), "seed": seed})
            res = train(c, progress=progress, overwrite=overwrite, data=data)
            runs.append({"setting": tag, "label": c.label(), "seed": seed, "metrics": res.metrics,
                         "seconds": round(res.seconds, 1), "cpu_seconds": round(res.cpu_seconds, 1),
                         "final_loss": res.history["loss"][-1]})
    rows = []
    for tag, c in settings:
        mine = [r for r in runs if r["setting"] == tag]
        avg = {}
        for m in METRICS:
            vals = [r["metrics"].get(m) for r in mine if r["metrics"].get(m) is not None]
            avg[m] = round(sum(vals) / len(vals), 2) if vals else None
        rows.append({"setting": tag, "label": c.label(), "metrics": avg, "seeds": list(seeds),
                     "seconds": round(sum(r["seconds"] for r in mine), 1),
                     "cpu_seconds": round(sum(r["cpu_seconds"] for r in mine), 1)})
    return {"rows": rows, "runs": runs, "config": {k: v for k, v in asdict(cfg).items() if k != "seed"}}


def _claim_compare_dir(out: Path, overwrite: bool) -> None:
    """Refuse a comparison folder with files neither a comparison nor one of its runs wrote
    (unless ``overwrite``), then record ``compare.json`` / ``compare.md`` as ours. Each run
    folder inside is checked by :func:`train` itself."""
    from visionscale.io.atomic import write_atomic
    from visionscale.io.outputs import MANIFEST, foreign_files, read_manifest

    if out.exists() and not out.is_dir():
        raise TrainError(f"output folder {out} exists and is not a folder")
    runs = {p.name for p in out.iterdir() if p.is_dir() and (read_manifest(p) or {}).get("kind") == RUN_KIND} \
        if out.is_dir() else set()
    foreign = [f for f in foreign_files(out, COMPARE_KIND) if f.split("/", 1)[0] not in runs or "/" not in f]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputExistsError(f"output folder {out} holds files a visionscale comparison did not write "
                                f"({shown}); choose an empty or new folder, or allow overwriting")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MANIFEST, json.dumps({"kind": COMPARE_KIND, "files": list(COMPARE_FILES)}).encode())


def format_table(result: dict, per_seed: bool = True) -> str:
    """Markdown table: one row per setting (mean over seeds), then optionally one per run."""
    def cell(v):
        return "–" if v is None else f"{v:.1f}"

    def secs(r):
        return f"{r.get('cpu_seconds', 0):.0f} / {r['seconds']:.0f}"

    lines = ["| Setting | " + " | ".join(METRICS) + " | CPU s / wall s |", "|---" * (len(METRICS) + 2) + "|"]
    for r in result["rows"]:
        n = len(r["seeds"])
        label = r["label"] + (f", mean of {n} seeds" if n > 1 else "")
        lines.append(f"| {label} | " + " | ".join(cell(r["metrics"][m]) for m in METRICS) + f" | {secs(r)} |")
    if per_seed and len(result["runs"]) > 2:
        for r in result["runs"]:
            lines.append(f"| &nbsp;&nbsp;{r['label']}, seed {r['seed']} | "
                         + " | ".join(cell(r["metrics"].get(m)) for m in METRICS) + f" | {secs(r)} |")
    return "\n".join(lines)


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]

"""Use a fitted run folder: load it, score images (labels, heatmaps), evaluate on a data set.

A run folder is what :func:`visionscale.anomaly.train.fit` writes for any method (PatchCore,
EfficientAD, DDAD; see there); everything needed to predict is inside it: ``config.json``
(model, method and input size), ``model.safetensors`` (the whole model: backbone + memory
bank, or teacher + student + autoencoder with their normalisation, or U-Net + feature
extractor) and ``calibration.json`` (thresholds and score normalisation).

Predictions say *anomalous* when the image score is >= the saved image threshold.
``normalized_score`` is ``clip((score - threshold) / span + 0.5, 0, 1)`` with ``span`` =
2 x (threshold - the lowest normal calibration score): that lowest normal score reads 0, the
threshold 0.5, so scores of different runs read the same way. Heatmaps use the same scale
on the pixel values (blue = the lowest normal value, green = the pixel threshold, red = far
above it).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visionscale.anomaly.data import (
    Batch,
    DataError,
    ReadLog,
    Sample,
    iter_batches,
    load_dataset,
)
from visionscale.anomaly.metrics import (
    ImageMetrics,
    evaluate_scores,
    pro_curve,
    roc_curve,
)
from visionscale.io.atomic import write_atomic
from visionscale.io.images import collect_images, read_image
from visionscale.io.weights import load_state_dict

__all__ = [
    "RunError",
    "LoadedRun",
    "Scored",
    "resolve_device",
    "load_run",
    "score_batches",
    "normalize",
    "predict",
    "evaluate",
    "records_csv",
    "EvalResult",
]

Progress = Callable[[str, int, int], None]


class RunError(RuntimeError):
    """A run folder is missing, incomplete or inconsistent; the message says which file."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path.parent} is not a complete run folder: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None


@dataclass
class LoadedRun:
    """A fitted model with its thresholds, ready to score images."""

    path: Path
    config: dict
    calibration: dict
    model: torch.nn.Module  # or a visionscale.runtime.Runner (load_run with a backend / precision)
    device: torch.device

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.config["image_size"]
        return int(h), int(w)


def load_run(run: str | os.PathLike, device: str | torch.device = "auto", *, backend: str = "eager",
             precision: str = "fp32") -> LoadedRun:
    """Load ``config.json``, ``model.safetensors`` and ``calibration.json`` of a run folder.

    With another ``backend`` (``compile``, ``onnxruntime``, ``tensorrt``) or ``precision``
    (``fp16``, ``bf16``) than eager fp32, ``model`` is a :class:`visionscale.runtime.Runner`
    around the fitted model (its ``info`` says what actually runs); scoring is unchanged.

    Raises:
        RunError: The folder or one of its files is missing or unreadable.
    """
    from visionscale.anomaly.train import (
        build_run_model,  # the builders live with fitting
    )

    path = Path(run).expanduser()
    if not path.is_dir():
        raise RunError(f"run folder not found: {path}")
    config = _read_json(path / "config.json")
    calibration = _read_json(path / "calibration.json")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise RunError(f"{path} is not a complete run folder: model.safetensors is missing (did fitting finish?)")
    dev = resolve_device(device)
    try:
        model = build_run_model(config, load_state_dict(weights), str(weights))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise RunError(f"cannot load {weights}: {exc}") from None
    model.eval().to(dev)
    if backend != "eager" or precision != "fp32":
        model = _runner(model, config, backend, precision, dev)
    return LoadedRun(path, config, calibration, model, dev)


def _runner(model: torch.nn.Module, config: dict, backend: str, precision: str, device: torch.device):
    from visionscale.runtime import accelerate
    from visionscale.runtime.errors import BackendUnavailableError, ExportError, RunnerError

    h, w = config["image_size"]
    try:
        return accelerate(model, backend, precision, device, image_size=(int(h), int(w)))
    except (BackendUnavailableError, ExportError, RunnerError) as exc:
        raise RunError(f"backend {backend!r} / {precision}: {exc}") from None


@dataclass
class Scored:
    """Scores of a set of images, in the order they were read (unreadable ones left out)."""

    samples: list[Sample] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # (h, w) float32 at the model size
    masks: list[np.ndarray] = field(default_factory=list)  # (h, w) bool, when asked for
    log: ReadLog = field(default_factory=ReadLog)


@torch.inference_mode()
def score_batches(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
                  total: int | None = None, progress: Progress | None = None, stage: str = "scoring",
                  keep_maps: bool = True) -> Scored:
    """Run the model over batches; collect image scores, anomaly maps and masks on the CPU."""
    out = Scored()
    done = 0
    for batch in batches:
        res = model(batch.images.to(device))
        out.scores.extend(res["pred_score"].float().cpu().tolist())
        if keep_maps:
            out.maps.extend(m for m in res["anomaly_map"][:, 0].float().cpu().numpy())
        if batch.masks is not None:
            out.masks.extend(m for m in batch.masks.numpy())
        out.samples.extend(batch.samples)
        done += len(batch.samples)
        if progress is not None:
            progress(stage, done, total or done)
    return out


def normalize(value: np.ndarray | float, threshold: float, span: float) -> np.ndarray | float:
    """Min-max normalisation centred on the threshold: ``clip((v - t) / span + 0.5, 0, 1)``."""
    return np.clip((np.asarray(value, dtype=np.float64) - threshold) / span + 0.5, 0.0, 1.0)




def _unique_names(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return names


def predict(
    run: LoadedRun,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    skip_bad: bool = False,
    overlays: bool = True,
    progress: Progress | None = None,
) -> tuple[list[dict], ReadLog]:
    """Score images: one record per readable image, heatmap overlay PNGs in ``out_dir``.

    Records hold ``path``, ``score``, ``normalized_score``, ``label`` (``"anomalous"`` or
    ``"normal"``), ``heatmap`` (PNG path or None). With ``out_dir``, ``predictions.json``
    and ``predictions.csv`` are written there too.

    Raises:
        DataError: An image cannot be read and ``skip_bad`` is False (names the file).
    """
    paths = collect_images(images)
    cal = run.calibration
    samples = [Sample(p, -1, "") for p in paths]
    log = ReadLog()
    batches = iter_batches(samples, run.image_size, batch_size, skip_bad=skip_bad, log=log)
    scored = score_batches(run.model, batches, run.device, len(samples), progress, "predicting", keep_maps=overlays)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    names = dict(zip([s.path for s in scored.samples], _unique_names([s.path for s in scored.samples])))
    records = []
    for i, (s, score) in enumerate(zip(scored.samples, scored.scores)):
        rec = {
            "path": str(s.path),
            "score": float(score),
            "normalized_score": float(normalize(score, cal["image_threshold"], cal["image_span"])),
            "label": "anomalous" if score >= cal["image_threshold"] else "normal",
            "heatmap": None,
        }
        if overlays and out is not None:
            rec["heatmap"] = str(_write_overlay(s.path, scored.maps[i], cal, out / f"{names[s.path]}_heatmap.png"))
        records.append(rec)
    if out is not None:
        write_atomic(out / "predictions.json", (json.dumps(records, indent=2) + "\n").encode())
        write_atomic(out / "predictions.csv", records_csv(records).encode())
    return records, log


def records_csv(records: Sequence[dict]) -> str:
    buf = io.StringIO()
    fields = ["path", "score", "normalized_score", "label", "heatmap"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def _write_overlay(path: Path, amap: np.ndarray, cal: dict, dst: Path) -> Path:
    from visionscale.anomaly.plots import heatmap_overlay, save_png

    image = read_image(path)  # already read once; small next to the model's cost
    h, w = image.shape[:2]
    t = torch.from_numpy(amap)[None, None]
    full = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    thr, half = cal["pixel_threshold"], cal["pixel_span"] / 2
    overlay = heatmap_overlay(image, full, thr - half, thr + half, thr)
    return save_png(overlay, dst)


@dataclass
class EvalResult:
    metrics: ImageMetrics
    files: list[Path]
    log: ReadLog
    notes: list[str]


def evaluate(
    run: LoadedRun,
    data: str | os.PathLike,
    category: str | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    skip_bad: bool = False,
    plots: bool = True,
    progress: Progress | None = None,
) -> EvalResult:
    """Score a data set's test images; metrics, ROC/PRO PNGs and per-image scores in ``out_dir``.

    Masks are resized (nearest) to the model size, where the maps are. Pixel metrics
    need a mask for every anomalous image and are skipped, with a note, otherwise.

    Raises:
        DataError: No test images, unreadable data (see ``skip_bad``), mask size mismatch.
    """
    ds = load_dataset(data, category, require_train=False)
    if not ds.test:
        raise DataError(f"no test images in {ds.root} (expected test/good and test/<defect>, or normal_test/ and abnormal/)")
    notes = list(ds.notes)
    with_masks = ds.test_has_masks
    if (note := ds.mask_note()) is not None:
        notes.append(note)
    log = ReadLog()
    batches = iter_batches(ds.test, run.image_size, batch_size, skip_bad=skip_bad, log=log, with_masks=with_masks)
    scored = score_batches(run.model, batches, run.device, len(ds.test), progress, "evaluating", keep_maps=with_masks)
    if (n := log.size_note(run.image_size)) is not None:
        notes.append(n)
    if (n := log.bad_note()) is not None:
        notes.append(n)
    labels = np.array([s.label for s in scored.samples])
    maps = np.stack(scored.maps) if with_masks else None
    masks = np.stack(scored.masks) if with_masks else None
    metrics = evaluate_scores(labels, scored.scores, maps, masks)
    metrics.notes = tuple(notes) + metrics.notes
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"run": str(run.path), "data": str(ds.root), "category": ds.category, **metrics.as_dict(),
                   "threshold_used": run.calibration["image_threshold"],
                   "accuracy_at_saved_threshold": _accuracy(labels, scored.scores, run.calibration["image_threshold"])}
        write_atomic(out / "metrics.json", (json.dumps(payload, indent=2) + "\n").encode())
        files.append(out / "metrics.json")
        rows = [{"path": str(s.path), "defect": s.defect, "label": int(s.label), "score": float(v)}
                for s, v in zip(scored.samples, scored.scores)]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["path", "defect", "label", "score"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_atomic(out / "scores.csv", buf.getvalue().encode())
        files.append(out / "scores.csv")
        if plots:
            files.extend(_eval_plots(labels, scored, maps, masks, metrics, out))
    return EvalResult(metrics, files, log, notes)


def _accuracy(labels: np.ndarray, scores: Sequence[float], threshold: float) -> float | None:
    if labels.size == 0:
        return None
    return float(np.mean((np.asarray(scores) >= threshold) == (labels == 1)))


def _eval_plots(labels, scored: Scored, maps, masks, metrics: ImageMetrics, out: Path) -> list[Path]:
    from visionscale.anomaly.plots import plot_pro, plot_roc

    files = []
    curves = {}
    if metrics.image_auroc is not None:
        fpr, tpr, _ = roc_curve(labels, scored.scores)
        curves["image"] = (fpr, tpr, metrics.image_auroc)
    if metrics.pixel_auroc is not None:
        fpr, tpr, _ = roc_curve(masks, maps)
        curves["pixel"] = (fpr, tpr, metrics.pixel_auroc)
    if curves:
        files.append(plot_roc(curves, out / "roc.png"))
    if metrics.aupro is not None:
        fpr, pro, _ = pro_curve(maps, masks)
        files.append(plot_pro(fpr, pro, metrics.aupro, out / "pro.png", metrics.fpr_limit))
    return files


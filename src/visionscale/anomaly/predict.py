"""Use a fitted run folder: load it, score images (labels, heatmaps), evaluate on a data set.

A run folder is what :func:`visionscale.anomaly.train.fit` writes for any method (PatchCore,
EfficientAD, DDAD; see :mod:`visionscale.anomaly.run`), loaded by :func:`~visionscale.anomaly.runs.load_run`
(re-exported here); everything needed to predict is inside it: ``config.json``
(model, method and input size), ``model.safetensors`` (the whole model: backbone + memory
bank, or teacher + student + autoencoder with their normalisation, or U-Net + feature
extractor) and ``calibration.json`` (thresholds and score normalisation).

Predictions say *anomalous* when the image score is >= the saved image threshold.
``normalized_score`` is ``clip((score - threshold) / span + 0.5, 0, 1)`` with ``span`` =
2 x (threshold - the lowest normal calibration score): that lowest normal score reads 0, the
threshold 0.5, so scores of different runs read the same way. Heatmaps use the same scale
on the pixel values (blue = the lowest normal value, green = the pixel threshold, red = far
above it). They are drawn over the image shrunk to at most :data:`HEATMAP_MAX_SIDE` (1024)
pixels on its longer side, so what is written (and the memory drawing it takes) does not grow
with the input: a 12000 x 12000 photo gets a 1024 x 1024 heatmap.

Every file of a run is checked when it is loaded (see :mod:`visionscale.anomaly.runs`).
"""

from __future__ import annotations

from visionscale.errors import check_finite, check_int

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

from visionscale.device import resolve_device
from visionscale.anomaly.data import (
    Batch,
    DataError,
    ReadLog,
    Sample,
    iter_batches,
    load_dataset,
)
from visionscale.anomaly.runs import LoadedRun, RunError, load_run, validate_run_files
from visionscale.anomaly.metrics import (
    ImageMetrics,
    evaluate_scores,
    pro_curve,
    roc_curve,
)
from visionscale.io.atomic import write_atomic
from visionscale.io.images import collect_images, read_image
from visionscale.io.outputs import OutputDir

__all__ = [
    "HEATMAP_MAX_SIDE",
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
    "validate_run_files",
]

Progress = Callable[[str, int, int], None]

HEATMAP_MAX_SIDE = 1024  # px, the longer side of a heatmap overlay at most


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
    threshold: float | None = None,
    overwrite: bool = False,
) -> tuple[list[dict], ReadLog]:
    """Score images: one record per readable image, heatmap overlay PNGs in ``out_dir``.

    Records hold ``path``, ``score``, ``normalized_score``, ``label`` (``"anomalous"`` or
    ``"normal"``), ``heatmap`` (PNG path or None). With ``out_dir``, ``predictions.json``
    and ``predictions.csv`` are written there too, all at once when every image is done
    (:class:`~visionscale.io.outputs.OutputDir`, kind ``ad-predict``): a failure leaves
    ``out_dir`` as it was, and files of an earlier prediction there that this one does not
    write are removed. A folder holding other files is refused unless ``overwrite``.

    Args:
        threshold: Image threshold instead of the run's saved one (``normalized_score``
            then reads 0.5 at it).

    Raises:
        DataError: An image cannot be read and ``skip_bad`` is False (names the file).
        InvalidValueError: ``threshold`` is not finite, ``batch_size`` < 1.
        OutputExistsError: ``out_dir`` holds files that are not an earlier prediction's.
    """
    check_int("batch_size", batch_size, minimum=1)
    thr = run.calibration["image_threshold"] if threshold is None else check_finite("threshold", threshold)
    target = OutputDir(out_dir, kind="ad-predict", overwrite=overwrite) if out_dir is not None else None
    paths = collect_images(images)
    cal = run.calibration
    samples = [Sample(p, -1, "") for p in paths]
    log = ReadLog()
    batches = iter_batches(samples, run.image_size, batch_size, skip_bad=skip_bad, log=log)
    draw = overlays and target is not None
    scored = score_batches(run.model, batches, run.device, len(samples), progress, "predicting", keep_maps=draw)
    names = dict(zip([s.path for s in scored.samples], _unique_names([s.path for s in scored.samples])))
    records = []
    for s, score in zip(scored.samples, scored.scores):
        records.append({
            "path": str(s.path),
            "score": float(score),
            "normalized_score": float(normalize(score, thr, cal["image_span"])),
            "label": "anomalous" if score >= thr else "normal",
            "heatmap": str(target.target / f"{names[s.path]}_heatmap.png") if draw else None,
        })
    if target is not None:
        with target as tmp:
            if draw:
                for s, amap in zip(scored.samples, scored.maps):
                    _write_overlay(s.path, amap, cal, tmp / f"{names[s.path]}_heatmap.png")
            write_atomic(tmp / "predictions.json", (json.dumps(records, indent=2) + "\n").encode())
            write_atomic(tmp / "predictions.csv", records_csv(records).encode())
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

    # Read again (small next to the model's cost), shrunk in PIL: the overlay's size is bounded.
    image = read_image(path, max_side=HEATMAP_MAX_SIDE)
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
    overwrite: bool = False,
) -> EvalResult:
    """Score a data set's test images; metrics, ROC/PRO PNGs and per-image scores in ``out_dir``.

    Masks are resized (nearest) to the model size, where the maps are. Pixel metrics
    need a mask for every anomalous image and are skipped, with a note, otherwise.
    ``out_dir`` is written all at once, like :func:`predict`'s (kind ``ad-eval``).

    Raises:
        DataError: No test images, unreadable data (see ``skip_bad``), mask size mismatch.
        OutputExistsError: ``out_dir`` holds files that are not an earlier evaluation's.
    """
    check_int("batch_size", batch_size, minimum=1)
    target = OutputDir(out_dir, kind="ad-eval", overwrite=overwrite) if out_dir is not None else None
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
    if target is not None:
        with target as out:
            files = [target.target / p.name for p in _write_eval(run, ds, labels, scored, maps, masks, metrics, out,
                                                                plots)]
    return EvalResult(metrics, files, log, notes)


def _write_eval(run: LoadedRun, ds, labels, scored: Scored, maps, masks, metrics: ImageMetrics, out: Path,
                plots: bool) -> list[Path]:
    thr = run.calibration["image_threshold"]
    payload = {"run": str(run.path), "data": str(ds.root), "category": ds.category, **metrics.as_dict(),
               "threshold_used": thr, "accuracy_at_saved_threshold": _accuracy(labels, scored.scores, thr)}
    write_atomic(out / "metrics.json", (json.dumps(payload, indent=2) + "\n").encode())
    rows = [{"path": str(s.path), "defect": s.defect, "label": int(s.label), "score": float(v)}
            for s, v in zip(scored.samples, scored.scores)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "defect", "label", "score"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "scores.csv", buf.getvalue().encode())
    files = [out / "metrics.json", out / "scores.csv"]
    if plots:
        files.extend(_eval_plots(labels, scored, maps, masks, metrics, out))
    return files


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


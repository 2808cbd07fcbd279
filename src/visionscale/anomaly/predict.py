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

from visionscale.errors import check_int
from visionscale.tiling import Tiling

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visionscale.device import resolve_device
from visionscale.anomaly.data import DataError, ReadLog, Sample, load_dataset
from visionscale.anomaly.streaming_metrics import PixelStats
from visionscale.anomaly.regions import choose_image_threshold, write_region_outputs
from visionscale.anomaly.runs import LoadedRun, RunError, load_run, validate_run_files
from visionscale.anomaly.tiles import ImageScore, score_images
from visionscale.anomaly.metrics import ImageMetrics, roc_curve
from visionscale.anomaly.records import HEATMAP_MAX_SIDE, label_of, normalize, records_csv, unique_names
from visionscale.io.atomic import write_atomic
from visionscale.io.images import collect_images, read_image
from visionscale.io.outputs import OutputDir

__all__ = [
    "HEATMAP_MAX_SIDE",
    "RunError",
    "LoadedRun",
    "resolve_device",
    "load_run",
    "image_threshold",
    "normalize",
    "predict",
    "evaluate",
    "records_csv",
    "image_record",
    "write_image_outputs",
    "write_predictions",
    "EvalResult",
    "validate_run_files",
]

Progress = Callable[[str, int, int], None]



def predict(
    run: LoadedRun,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    skip_bad: bool = False,
    overlays: bool = True,
    masks: bool = True,
    regions: bool = True,
    raw_maps: bool = False,
    progress: Progress | None = None,
    threshold: float | None = None,
    target_fpr: float | None = None,
    tiling: Tiling | None = None,
    memory_budget: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
) -> tuple[list[dict], ReadLog]:
    """Score images: one record per readable image; per image files in ``out_dir``.

    Records hold ``path``, ``score``, ``normalized_score``, ``label`` (``"anomalous"`` or
    ``"normal"``), ``heatmap`` (PNG path or None), ``mask`` (PNG path or None), ``regions``
    (the number of connected defect regions) and ``regions_file`` / ``map_file``. Per image,
    ``out_dir`` gets ``<name>_heatmap.png`` (overlay, at most 1024 px), ``<name>_mask.png``
    (predicted defect mask at the image's own size), ``<name>_regions.json`` (boxes of the
    connected regions in image pixels) and, with ``raw_maps``, ``<name>_map.npy`` (see
    :mod:`visionscale.anomaly.regions`). Each image's files are written as soon as it is
    scored, so no more than one map is held; ``predictions.json`` and ``predictions.csv``
    come last. The folder is staged (:class:`~visionscale.io.outputs.OutputDir`, kind
    ``ad-predict``): a failure leaves ``out_dir`` as it was, and files of an earlier
    prediction there that this one does not write are removed. A folder holding other files
    is refused unless ``overwrite``.

    Args:
        threshold: Image threshold instead of the run's saved one (``normalized_score``
            then reads 0.5 at it).
        target_fpr: Set the image threshold so that at most this fraction of the normal
            calibration images (held out of fitting, or the normal test images) scores above it.
        tiling: Overrides the run's tiling (e.g. another overlap); None: the run's.
        memory_budget: Bytes; a tiled image whose own buffers exceed it is refused by name
            before it is decoded (pick the batch with :func:`~visionscale.anomaly.tiles.plan_batch`).
        workers: Threads decoding the next images while the model runs (0: none).

    Raises:
        DataError: An image cannot be read and ``skip_bad`` is False (names the file).
        MemoryBudgetError: An image does not fit ``memory_budget``.
        InvalidValueError: ``threshold`` is not finite, ``batch_size`` < 1, both thresholds given.
        OutputExistsError: ``out_dir`` holds files that are not an earlier prediction's.
    """
    check_int("batch_size", batch_size, minimum=1)
    cal = run.calibration
    thr = image_threshold(run, threshold, target_fpr)
    target = OutputDir(out_dir, kind="ad-predict", overwrite=overwrite) if out_dir is not None else None
    paths = collect_images(images)
    samples = [Sample(p, -1, "") for p in paths]
    names = dict(zip(paths, unique_names(paths)))
    log = ReadLog()
    write = target is not None
    records: list[dict] = []
    with (target if target is not None else contextlib.nullcontext()) as tmp:
        for r in score_images(run.model, samples, run.device, image_size=run.image_size,
                              tiling=tiling or run.tiling, batch_size=batch_size, skip_bad=skip_bad, log=log,
                              keep_maps=write and (overlays or masks or regions or raw_maps), progress=progress,
                              stage="predicting", budget_bytes=memory_budget, workers=workers):
            name = names[r.sample.path]
            rec = image_record(r.sample.path, r.score, thr, cal)
            if write and r.amap is not None:
                write_image_outputs(r, name, cal, tmp, target.target, rec, overlays=overlays, masks=masks,
                                    regions=regions, raw_maps=raw_maps)
            records.append(rec)
        if tmp is not None:
            write_predictions(tmp, records)
    return records, log


def image_record(path: str | os.PathLike, score: float, threshold: float, calibration: dict) -> dict:
    """One image's prediction record (no files yet): path, score, normalised score, label."""
    return {"path": str(path), "score": float(score),
            "normalized_score": float(normalize(score, threshold, calibration["image_span"])),
            "label": label_of(score, threshold), "heatmap": None, "mask": None,
            "regions": None, "regions_file": None, "map_file": None}


def write_image_outputs(r: ImageScore, name: str, calibration: dict, folder: Path, published: Path, rec: dict, *,
                        overlays: bool = True, masks: bool = True, regions: bool = True,
                        raw_maps: bool = False) -> list[Path]:
    """Write one scored image's files into ``folder`` and name them in ``rec`` as they will be
    found in ``published`` (the output folder once it is moved into place); the files written."""
    written: list[Path] = []
    if overlays:
        written.append(_write_overlay(r.sample.path, r.amap, calibration, folder / f"{name}_heatmap.png"))
        rec["heatmap"] = str(published / f"{name}_heatmap.png")
    if masks or regions or raw_maps:
        got = write_region_outputs(name, r.amap, calibration["pixel_threshold"], r.image_size, folder,
                                   mask=masks, boxes=regions, raw=raw_maps)
        for key, field_name in (("mask", "mask"), ("regions_file", "json"), ("map_file", "map")):
            if got.get(field_name) is not None:
                rec[key] = str(published / Path(got[field_name]).name)
                written.append(Path(got[field_name]))
        rec["regions"] = len(got["regions"]) if "regions" in got else None
    return written


def write_predictions(folder: Path, records: Sequence[dict]) -> None:
    """``predictions.json`` and ``predictions.csv`` of ``records`` in ``folder`` (atomic writes)."""
    write_atomic(folder / "predictions.json", (json.dumps(list(records), indent=2) + "\n").encode())
    write_atomic(folder / "predictions.csv", records_csv(records).encode())


def image_threshold(run: LoadedRun, threshold: float | None = None, target_fpr: float | None = None) -> float:
    """The image threshold: given, set at a target false-positive rate, or the run's saved one."""
    return choose_image_threshold(run.calibration, threshold, target_fpr, RunError(
        f"{run.path}/calibration.json has no normal calibration scores (the run was fitted by an older "
        f"visionscale): refit it to set a threshold by target_fpr"))


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
    tiling: Tiling | None = None,
    memory_budget: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
) -> EvalResult:
    """Score a data set's test images; metrics, ROC/PRO PNGs and per-image scores in ``out_dir``.

    Whole-image runs compare maps and masks at the model size (masks resized, nearest);
    tiled runs at the image's own size. Maps are folded into the pixel metrics image by image
    (:class:`~visionscale.anomaly.streaming_metrics.PixelStats`). Pixel metrics need a mask for
    every anomalous image and are skipped, with a note, otherwise. ``out_dir`` is written all
    at once, like :func:`predict`'s (kind ``ad-eval``).

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
    pixels = PixelStats(with_masks)
    samples, scores = [], []
    tiling = tiling or run.tiling
    for r in score_images(run.model, ds.test, run.device, image_size=run.image_size, tiling=tiling,
                          batch_size=batch_size, skip_bad=skip_bad, log=log, with_masks=with_masks,
                          keep_maps=with_masks, progress=progress, stage="evaluating",
                          budget_bytes=memory_budget, workers=workers):
        if with_masks:
            pixels.update(r.amap, r.sample.label == 0, r.mask)
        samples.append(r.sample)
        scores.append(r.score)
    if tiling is None and (n := log.size_note(run.image_size)) is not None:
        notes.append(n)
    if (n := log.bad_note()) is not None:
        notes.append(n)
    labels = np.array([s.label for s in samples])
    metrics = pixels.metrics(labels, np.asarray(scores, dtype=np.float64))
    metrics.notes = tuple(notes) + metrics.notes
    files: list[Path] = []
    if target is not None:
        with target as out:
            files = [target.target / p.name for p in _write_eval(run, ds, labels, samples, scores, pixels, metrics,
                                                                out, plots)]
    return EvalResult(metrics, files, log, notes)


def _write_eval(run: LoadedRun, ds, labels, samples, scores, pixels, metrics: ImageMetrics, out: Path,
                plots: bool) -> list[Path]:
    thr = run.calibration["image_threshold"]
    payload = {"run": str(run.path), "data": str(ds.root), "category": ds.category, **metrics.as_dict(),
               "threshold_used": thr, "accuracy_at_saved_threshold": _accuracy(labels, scores, thr)}
    write_atomic(out / "metrics.json", (json.dumps(payload, indent=2) + "\n").encode())
    rows = [{"path": str(s.path), "defect": s.defect, "label": int(s.label), "score": float(v)}
            for s, v in zip(samples, scores)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "defect", "label", "score"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "scores.csv", buf.getvalue().encode())
    files = [out / "metrics.json", out / "scores.csv"]
    if plots:
        files.extend(_eval_plots(labels, scores, pixels, metrics, out))
    return files


def _accuracy(labels: np.ndarray, scores: Sequence[float], threshold: float) -> float | None:
    if labels.size == 0:
        return None
    return float(np.mean((np.asarray(scores) >= threshold) == (labels == 1)))


def _eval_plots(labels, scores, pixels, metrics: ImageMetrics, out: Path) -> list[Path]:
    from visionscale.anomaly.plots import plot_pro, plot_roc

    files = []
    curves = {}
    if metrics.image_auroc is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        curves["image"] = (fpr, tpr, metrics.image_auroc)
    if metrics.pixel_auroc is not None:
        fpr, tpr = pixels.roc()
        curves["pixel"] = (fpr, tpr, metrics.pixel_auroc)
    if curves:
        files.append(plot_roc(curves, out / "roc.png"))
    if metrics.aupro is not None:
        fpr, pro = pixels.pro()
        files.append(plot_pro(fpr, pro, metrics.aupro, out / "pro.png", metrics.fpr_limit))
    return files

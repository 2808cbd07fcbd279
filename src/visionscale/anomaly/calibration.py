"""Thresholds, score normalisation and test metrics of a fitted model: the last stage of every fit.

With a test set holding both normal and anomalous images, the image threshold is the
F1-optimal one on it (and the pixel threshold the F1-optimal one on its masks, if every
anomalous image has one; else a margin above the highest map value of the normal test
images). Without labels, normal images the fit held out are scored (or, with too few
training images, the training images themselves; the notes say their scores are biased
low) and the threshold is a margin above their highest score:

- scores that are distances (>= 0: PatchCore, DDAD): ``(1 + margin) x`` the highest score;
  a relative margin does not shrink when few images are held out;
- scores that can be negative (``signed_scores``: EfficientAD's quantile-normalised maps,
  where 0 is the 0.9-quantile of normal pixels): ``max + margin x (max - min)``;

and the pixel threshold the same rule on their maps. Normalised scores map the lowest
normal calibration score to 0 and the threshold to 0.5 (see :mod:`visionscale.anomaly.predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from visionscale.anomaly.data import ADDataset, DataError, ReadLog, Sample
from visionscale.anomaly.metrics import f1_optimal_threshold
from visionscale.anomaly.streaming_metrics import PixelStats
from visionscale.anomaly.tiles import score_images
from visionscale.tiling import Tiling

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """What calibration found: ``calibration.json``, ``metrics.json`` (labelled test set only), notes."""

    thresholds: dict
    metrics: dict | None = None
    notes: list[str] = field(default_factory=list)


def calibrate(model, ds: ADDataset, normal: list[Sample], cfg, device: torch.device, progress, *,
              held_out_what: str | None, batch_size: int | None = None,
              signed_scores: bool = False, tiling: Tiling | None = None) -> Calibration:
    """Thresholds + normalisation from the labelled test set, else from the ``normal`` images.

    Images are scored one at a time (:func:`~visionscale.anomaly.tiles.score_images`): maps
    are reduced to their extremes as they come, and kept only for the pixel metrics of a
    labelled test set with masks.

    Args:
        model: Returns ``pred_score`` and ``anomaly_map`` for ImageNet-normalised batches.
        ds: The data set; its test set is used when it is labelled.
        normal: Normal images to score without labels: held out of fitting, or (when
            ``held_out_what`` is None) the training images themselves.
        cfg: The :class:`~visionscale.anomaly.config.FitConfig` (image size, batch size,
            margin, ``skip_bad``).
        held_out_what: How the notes name the held-out ``normal`` images.
        batch_size: Images (or tiles) per scoring batch (default: ``cfg.batch_size`` or 8).
        signed_scores: Scores can be negative (see the module docstring).
        tiling: The run's tiling (maps at the image's size), or None (maps at the model size).
    """
    labelled = ds.test_has_labels
    notes: list[str] = []
    with_masks = labelled and ds.test_has_masks
    samples = ds.test if labelled else normal
    read_log = ReadLog()
    pixels = PixelStats(with_masks)
    scored: list = []
    for r in score_images(model, samples, device, image_size=cfg.image_size, tiling=tiling,
                          batch_size=batch_size or cfg.batch_size or 8, skip_bad=cfg.skip_bad, log=read_log,
                          with_masks=with_masks, progress=progress, stage="calibration",
                          workers=getattr(cfg, "workers", 0)):
        pixels.update(r.amap, r.sample.label == 0 or not labelled, r.mask)
        scored.append((r.sample, r.score))
    if read_log.bad:
        notes.append("calibration: " + read_log.bad_note())
    if not scored:
        raise DataError("no calibration image could be read: " + (read_log.bad_note() or ""))
    scores = np.asarray([sc for _, sc in scored], dtype=np.float64)
    labels = np.array([s.label for s, _ in scored])
    margin = cfg.threshold_margin
    normal_mask = labels == 0 if labelled else np.ones(labels.size, dtype=bool)
    cal: dict = {"image_max": float(scores.max()), "pixel_max": pixels.max}
    metrics = None
    if labelled and 0 < labels.sum() < labels.size:
        thr, f1 = f1_optimal_threshold(labels, scores)
        cal.update(image_threshold=thr, image_threshold_source=(
            f"F1-optimal on the labelled test set ({labels.size} images, {int(labels.sum())} anomalous; F1 {f1:.3f})"))
        m = pixels.metrics(labels, scores)
        note = ds.mask_note()
        if note:
            m.notes = (note,) + tuple(n for n in m.notes if not n.startswith("pixel metrics skipped"))
            notes.append(note)
        metrics = {**m.as_dict(), "threshold_note": "image_f1 / pixel_f1 are at thresholds chosen on this same "
                   "test set, so they are optimistic; AUROC and AUPRO do not depend on a threshold"}
        if with_masks:
            cal.update(pixel_threshold=m.pixel_threshold, pixel_threshold_source="F1-optimal on the test masks")
        else:
            thr, rule = _above_max(pixels.normal_max, pixels.normal_min, margin, signed_scores)
            cal.update(pixel_threshold=thr,
                       pixel_threshold_source=f"{rule} the highest map value of the normal test images (no masks)")
    else:
        held_out = held_out_what is not None
        where = (held_out_what if held_out else
                 "the training images themselves (fewer than 10, none held out: scores are biased low)")
        thr, rule = _above_max(float(scores.max()), float(scores.min()), margin, signed_scores)
        pthr, prule = _above_max(pixels.max, pixels.min, margin, signed_scores)
        cal.update(image_threshold=thr, image_threshold_source=f"{rule} the highest score of {where}",
                   pixel_threshold=pthr, pixel_threshold_source=f"{prule} the highest map value of {where}")
        if not held_out:
            notes.append("threshold set on the training images themselves (too few to hold some out); "
                         "expect false alarms: add a labelled test set or more training images")
    # Normalisation: the lowest normal score -> 0, the threshold -> 0.5, as far again above -> 1.
    cal["image_min"] = float(scores[normal_mask].min())
    cal["pixel_min"] = pixels.normal_min
    cal["image_span"] = _span(cal["image_threshold"], cal["image_min"], float(scores.min()), float(scores.max()))
    cal["pixel_span"] = _span(cal["pixel_threshold"], cal["pixel_min"], pixels.min, pixels.max)
    cal["normalization"] = ("normalized = clip((score - threshold) / span + 0.5, 0, 1) with span = 2 x (threshold - "
                            "lowest normal calibration score): 0 = that lowest normal score, 0.5 = the threshold; "
                            "heatmaps use the same scale with the pixel values")
    cal["calibration_images"] = len(scored)
    cal["normal_scores"] = sorted(float(v) for v in scores[normal_mask])  # for a threshold at a target FPR
    return Calibration(cal, metrics, notes)


def _above_max(hi: float, lo: float, margin: float, signed: bool) -> tuple[float, str]:
    """Threshold a margin above the highest normal value ``hi`` (``lo`` the lowest), and the rule's wording."""
    if not signed:
        return (1 + margin) * hi, f"(1 + {margin}) x"
    return hi + margin * (hi - lo), f"{margin} x (max - min) above"


def _span(threshold: float, lowest_normal: float, lo: float, hi: float) -> float:
    """2 x (threshold - lowest normal value); max - min of all values (or 1) if that is not positive."""
    span = 2.0 * (threshold - lowest_normal)
    if span > 0:
        return span
    return (hi - lo) if hi > lo else 1.0

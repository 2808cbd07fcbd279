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

from visionscale.anomaly.data import ADDataset, DataError, ReadLog, Sample, iter_batches
from visionscale.anomaly.metrics import evaluate_scores, f1_optimal_threshold
from visionscale.anomaly.predict import Scored, score_batches

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """What calibration found: ``calibration.json``, ``metrics.json`` (labelled test set only), notes."""

    thresholds: dict
    metrics: dict | None = None
    notes: list[str] = field(default_factory=list)


def calibrate(model, ds: ADDataset, normal: list[Sample], cfg, device: torch.device, progress, *,
              held_out_what: str | None, batch_size: int | None = None,
              signed_scores: bool = False) -> Calibration:
    """Thresholds + normalisation from the labelled test set, else from the ``normal`` images.

    Args:
        model: Returns ``pred_score`` and ``anomaly_map`` for ImageNet-normalised batches.
        ds: The data set; its test set is used when it is labelled.
        normal: Normal images to score without labels: held out of fitting, or (when
            ``held_out_what`` is None) the training images themselves.
        cfg: The :class:`~visionscale.anomaly.config.FitConfig` (image size, batch size,
            margin, ``skip_bad``).
        held_out_what: How the notes name the held-out ``normal`` images.
        batch_size: Images per scoring batch (default: ``cfg.batch_size`` or 8).
        signed_scores: Scores can be negative (see the module docstring).
    """
    labelled = ds.test_has_labels
    notes: list[str] = []
    with_masks = labelled and ds.test_has_masks
    samples = ds.test if labelled else normal
    read_log = ReadLog()
    batches = iter_batches(samples, cfg.image_size, batch_size or cfg.batch_size or 8, skip_bad=cfg.skip_bad,
                           log=read_log, with_masks=with_masks)
    scored: Scored = score_batches(model, batches, device, len(samples), progress, "calibration")
    if read_log.bad:
        notes.append("calibration: " + read_log.bad_note())
    if not scored.samples:
        raise DataError("no calibration image could be read: " + (read_log.bad_note() or ""))
    scores = np.asarray(scored.scores, dtype=np.float64)
    maps = np.stack(scored.maps)  # (N, h, w)
    labels = np.array([s.label for s in scored.samples])
    margin = cfg.threshold_margin
    normal_mask = labels == 0 if labelled else np.ones(labels.size, dtype=bool)
    cal: dict = {"image_max": float(scores.max()), "pixel_max": float(maps.max())}
    metrics = None
    if labelled and 0 < labels.sum() < labels.size:
        thr, f1 = f1_optimal_threshold(labels, scores)
        cal.update(image_threshold=thr, image_threshold_source=(
            f"F1-optimal on the labelled test set ({labels.size} images, {int(labels.sum())} anomalous; F1 {f1:.3f})"))
        masks = np.stack(scored.masks) if with_masks else None
        m = evaluate_scores(labels, scores, maps if with_masks else None, masks)
        note = ds.mask_note()
        if note:
            m.notes = (note,) + tuple(n for n in m.notes if not n.startswith("pixel metrics skipped"))
            notes.append(note)
        metrics = {**m.as_dict(), "threshold_note": "image_f1 / pixel_f1 are at thresholds chosen on this same "
                   "test set, so they are optimistic; AUROC and AUPRO do not depend on a threshold"}
        if with_masks:
            cal.update(pixel_threshold=m.pixel_threshold, pixel_threshold_source="F1-optimal on the test masks")
        else:
            thr, rule = _above_max(maps[normal_mask], margin, signed_scores)
            cal.update(pixel_threshold=thr,
                       pixel_threshold_source=f"{rule} the highest map value of the normal test images (no masks)")
    else:
        held_out = held_out_what is not None
        where = (held_out_what if held_out else
                 "the training images themselves (fewer than 10, none held out: scores are biased low)")
        thr, rule = _above_max(scores, margin, signed_scores)
        pthr, prule = _above_max(maps, margin, signed_scores)
        cal.update(image_threshold=thr, image_threshold_source=f"{rule} the highest score of {where}",
                   pixel_threshold=pthr, pixel_threshold_source=f"{prule} the highest map value of {where}")
        if not held_out:
            notes.append("threshold set on the training images themselves (too few to hold some out); "
                         "expect false alarms: add a labelled test set or more training images")
    # Normalisation: the lowest normal score -> 0, the threshold -> 0.5, as far again above -> 1.
    cal["image_min"] = float(scores[normal_mask].min())
    cal["pixel_min"] = float(maps[normal_mask].min())
    cal["image_span"] = _span(cal["image_threshold"], cal["image_min"], scores)
    cal["pixel_span"] = _span(cal["pixel_threshold"], cal["pixel_min"], maps)
    cal["normalization"] = ("normalized = clip((score - threshold) / span + 0.5, 0, 1) with span = 2 x (threshold - "
                            "lowest normal calibration score): 0 = that lowest normal score, 0.5 = the threshold; "
                            "heatmaps use the same scale with the pixel values")
    cal["calibration_images"] = len(scored.samples)
    return Calibration(cal, metrics, notes)


def _above_max(values: np.ndarray, margin: float, signed: bool) -> tuple[float, str]:
    """Threshold a margin above the highest normal value, and the rule's wording."""
    hi, lo = float(np.max(values)), float(np.min(values))
    if not signed:
        return (1 + margin) * hi, f"(1 + {margin}) x"
    return hi + margin * (hi - lo), f"{margin} x (max - min) above"


def _span(threshold: float, lowest_normal: float, values: np.ndarray) -> float:
    """2 x (threshold - lowest normal value); max - min of all values (or 1) if that is not positive."""
    span = 2.0 * (threshold - lowest_normal)
    if span > 0:
        return span
    lo, hi = float(np.min(values)), float(np.max(values))
    return (hi - lo) if hi > lo else 1.0

"""What ``ad predict`` says about an image, without torch: labels, normalised scores, the CSV.

Shared by :mod:`visionscale.anomaly.predict` (the torch path) and a deployment bundle's
predictor (:mod:`visionscale.bundle`), so both write the same records and files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["HEATMAP_MAX_SIDE", "RECORD_FIELDS", "normalize", "label_of", "unique_names", "records_csv"]

HEATMAP_MAX_SIDE = 1024  # px, the longer side of a heatmap overlay at most

RECORD_FIELDS = ["path", "score", "normalized_score", "label", "heatmap", "mask", "regions", "regions_file",
                 "map_file"]


def normalize(value: np.ndarray | float, threshold: float, span: float) -> np.ndarray | float:
    """Min-max normalisation centred on the threshold: ``clip((v - t) / span + 0.5, 0, 1)``."""
    return np.clip((np.asarray(value, dtype=np.float64) - threshold) / span + 0.5, 0.0, 1.0)


def label_of(score: float, threshold: float) -> str:
    """``"anomalous"`` when the image score is >= the image threshold, else ``"normal"``."""
    return "anomalous" if score >= threshold else "normal"


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique in order (``a``, ``a-1``, ...): the prefix of each image's outputs."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return names


def records_csv(records: Sequence[dict]) -> str:
    """``predictions.csv``: one row per record, the fields of :data:`RECORD_FIELDS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_FIELDS})
    return buf.getvalue()

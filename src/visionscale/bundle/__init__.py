"""Deployment bundles: one self-describing folder (or archive) per model, run without torch.

* :func:`write_bundle` (needs torch, onnx, onnxscript: it exports the model) writes a folder
  with ``bundle.json`` (format, kind, pre-processing, thresholds, model card), the ONNX
  graph(s) and ``checksums.sha256``, and optionally a ``.tar`` / ``.zip`` of it.
* :func:`load_bundle` (needs onnxruntime, numpy and Pillow only; face bundles also safetensors)
  checks every checksum and returns a predictor: :class:`~visionscale.bundle.anomaly.AnomalyPredictor`
  for an ``ad fit`` run, whose scores, labels, maps and regions are ``ad predict``'s;
  :class:`~visionscale.bundle.face.FacePredictor` for the face pipeline (``export face``), whose
  faces, descriptors and verify / identify answers are :class:`~visionscale.face.api.FaceRecognizer`'s.

docs/deploy.md ("Bundle") describes the format. This package's ``__init__`` imports nothing
heavy: ``import visionscale.bundle`` never imports torch.
"""

from __future__ import annotations

import os

from visionscale.bundle.format import BundleChecksumError, BundleError

__all__ = ["load_bundle", "write_bundle", "BundleError", "BundleChecksumError", "BundleResult"]


def load_bundle(path: str | os.PathLike, *, providers=None, threads: int | None = None):
    """The predictor of a bundle folder or ``.tar`` / ``.zip`` archive, after checking every checksum.

    Args:
        path: The folder :func:`write_bundle` wrote, or its archive (extracted to a temporary
            folder that the predictor's ``close()`` removes).
        providers: ONNX Runtime execution providers: full names or aliases (``cpu``, ``cuda``,
            ``tensorrt``), a list or a comma string (default ``["CPUExecutionProvider"]``).
            Each must be offered and enabled: never a quiet fallback to the CPU.
        threads: ONNX Runtime intra-op threads (default: its own choice).

    Raises:
        BundleChecksumError: A file does not match ``checksums.sha256`` (the message names it).
        BundleError: Not a bundle, a file missing, a newer format version, an execution
            provider this onnxruntime does not offer or could not enable (the message says why).
        MissingDependencyError: onnxruntime is not installed.
    """
    from visionscale.bundle.format import open_folder, read_manifest, verify

    folder, tmp = open_folder(path)
    try:
        verify(folder)
        manifest = read_manifest(folder)
        if manifest["kind"] == "anomaly":
            from visionscale.bundle.anomaly import AnomalyPredictor

            return AnomalyPredictor(folder, manifest, cleanup=tmp, providers=providers, threads=threads)
        if manifest["kind"] == "face":
            from visionscale.bundle.face import FacePredictor

            return FacePredictor(folder, manifest, cleanup=tmp, providers=providers, threads=threads)
        raise BundleError(f"bundle {path} is of kind {manifest['kind']!r}, which this visionscale cannot run yet")
    except BaseException:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise


def __getattr__(name: str):  # the writer imports torch: load it on first use only
    if name in ("write_bundle", "BundleResult"):
        from visionscale.bundle import write

        return getattr(write, name)
    raise AttributeError(f"module 'visionscale.bundle' has no attribute {name!r}")

"""A bundle's face predictor: the face pipeline with onnxruntime, numpy, Pillow and safetensors only.

Every step is :class:`~visionscale.face.api.FaceRecognizer`'s, minus torch (bundle.json records
each setting):

* detection: BlazeFace's ONNX graph (the one :class:`~visionscale.face.detector.FaceDetector`
  runs in ONNX Runtime), between the same numpy steps (:mod:`visionscale.face.detections`:
  letterbox, decode, weighted NMS, back to image pixels) with the anchors regenerated from
  MediaPipe's anchor options (:func:`visionscale.face.anchors.ssd_anchors`);
* alignment: :class:`visionscale.face.dlib_align.DlibAligner` (dlib box from the keypoints, dlib's
  5-point landmarks, dlib's 150 px chip) with the shape predictor's arrays from the bundle;
* description: dlib's ResNet as an ONNX graph, on chips normalised as the embedder does
  (``(x / 255 - mean) / std`` in float32);
* the rest (largest face first, faces too small to describe, verify, identify against a
  gallery): :class:`visionscale.face.pipeline.FacePipeline`, the code FaceRecognizer runs.

So results are FaceRecognizer's types (:class:`~visionscale.face.pipeline.Face`,
:class:`~visionscale.face.pipeline.VerifyResult`, ...), and a predictor is a
:class:`~visionscale.face.gallery.Gallery`'s embedder with the same model id as
FaceRecognizer's: galleries are shared between the two.
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visionscale.bundle.format import BundleError, require, session
from visionscale.bundle.imaging import to_model_input
from visionscale.errors import check_int
from visionscale.face.anchors import SsdAnchorOptions, ssd_anchors
from visionscale.face.decode import DecodeOptions
from visionscale.face.detections import FaceDetection, as_rgb_list, blend, detections, letterbox_batch
from visionscale.face.pipeline import FacePipeline, load_images

__all__ = ["FacePredictor", "BundleFaceDetector"]


class BundleFaceDetector:
    """BlazeFace from a bundle: ``detect(images)`` as :meth:`FaceDetector.detect
    <visionscale.face.detector.FaceDetector.detect>` (ONNX Runtime backend) gives it."""

    def __init__(self, session, detector: dict, batch_size: int = 8):
        self.session = session
        self.input_name = detector["input"]
        self.outputs = list(detector["outputs"])  # regressors (B, N, 16), classificators (B, N, 1)
        pre, dec = detector["preprocess"], detector["decode"]
        self.input_size = int(pre["input_size"])
        self.anchors = ssd_anchors(SsdAnchorOptions(**{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in dec["anchors"].items()}))
        self.options = DecodeOptions(**dec["options"])
        self.min_score = float(dec["min_score"])
        self.blending = dec["blending"]
        self.suppression_threshold = float(dec["suppression_threshold"])
        self.batch_size = check_int("batch_size", batch_size, minimum=1)

    def detect(self, images) -> list[list[FaceDetection]]:
        """Faces in each ``(H, W, 3)`` uint8 RGB image, best first."""
        if self.session is None:
            raise BundleError("this predictor was closed")
        imgs = as_rgb_list(images)
        out: list[list[FaceDetection]] = []
        for i in range(0, len(imgs), self.batch_size):
            batch, maps = letterbox_batch(imgs[i:i + self.batch_size], self.input_size)
            reg, cls = self.session.run(self.outputs, {self.input_name: batch})
            out += detections(blend(reg, cls, self.anchors, self.options, self.min_score, self.blending,
                                    self.suppression_threshold), maps)
        return out


class FacePredictor(FacePipeline):
    """Detects, describes, verifies and identifies faces with a face bundle (see the module docstring).

    Built by :func:`visionscale.load_bundle`. Besides FaceRecognizer's methods
    (:meth:`find_faces`, :meth:`embed_faces`, :meth:`embed`, :meth:`verify`, :meth:`identify`),
    :meth:`detect` gives the detector's raw results.

    Attributes:
        path: The bundle folder (a temporary extraction for an archive, removed on :meth:`close`).
        manifest: ``bundle.json``.
        model_id, dim, metric, threshold, min_face, chip_size: The descriptor's, as FaceRecognizer's.
    """

    kind = "face"

    def __init__(self, folder: Path, manifest: dict, *, cleanup: Path | None = None, providers=None,
                 threads: int | None = None, batch_size: int = 32):
        require("safetensors", "a face bundle's predictor (the landmark model's arrays)")
        from visionscale.face.dlib_align import DlibAligner
        from visionscale.face.dlib_landmarks import ShapePredictor

        self.path = folder
        self.manifest = manifest
        graphs = manifest["graphs"]
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self._detector = BundleFaceDetector(session(folder / graphs["detector"]["file"], providers, threads),
                                            graphs["detector"])
        desc = graphs["descriptor"]
        self._descriptor = session(folder / desc["file"], providers, threads)
        self._descriptor_io = (desc["input"], desc["outputs"])
        pre = desc["preprocess"]
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        align = manifest["alignment"]
        predictor = ShapePredictor.from_safetensors(folder / align["landmarks"]["file"])
        snap = align.get("box_snap")
        if snap:  # dlib's HOG detector, from the bundle's own copy of its filters
            from visionscale.face.dlib_hog import HogFaceDetector

            hog, upsample = HogFaceDetector(folder / snap["file"]), int(snap.get("upsample", 1))
        else:  # a bundle without it aligns from the calibrated box only, as it says
            hog, upsample = False, 1
        self.aligner = DlibAligner(predictor, size=int(align["chip_size"]), padding=float(align["chip_padding"]),
                                   hog=hog, upsample=upsample)
        rec = manifest["recognition"]
        self._model_id = rec["model_id"]
        self.dim = int(rec["dim"])
        self.metric = rec["metric"]
        self._threshold = float(rec["threshold"])
        self.min_face = float(rec["min_face"])
        self.fallbacks = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(cleanup), True) if cleanup else None

    # -- what FacePipeline asks --------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def alignment(self) -> str:
        return "dlib5"

    @property
    def chip_size(self) -> int:
        return self.aligner.size

    def _embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        if self._descriptor is None:
            raise BundleError("this predictor was closed")
        size = (self.chip_size, self.chip_size)
        name, outputs = self._descriptor_io
        out = []
        for i in range(0, len(chips), self.batch_size):
            x = np.stack([to_model_input(np.asarray(c), size, self.mean, self.std) for c in chips[i:i + self.batch_size]])
            out.append(np.asarray(self._descriptor.run(outputs, {name: x})[0], dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # -- more --------------------------------------------------------------------------------------
    def detect(self, images: Sequence) -> list[list[FaceDetection]]:
        """The detector's faces (box, score, six keypoints) in each image (arrays or paths), best first."""
        arrays, _ = load_images(images)
        return self._detector.detect(arrays)

    @property
    def card(self) -> dict:
        """The model card of bundle.json (components, licences, training data, metrics, versions)."""
        return self.manifest["card"]

    @property
    def info(self) -> dict:
        return {"kind": "face", "model": self.model_id, "dim": self.dim, "metric": self.metric,
                "threshold": self.threshold, "min_face": self.min_face}

    def close(self) -> None:
        """Release the sessions and remove an archive's temporary extraction."""
        self._descriptor = None
        self._detector.session = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> FacePredictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Face recognition from images: detect -> align -> embed, then verify or use a gallery.

``verify(a, b)`` answers "same person?" for two images (arrays or paths); ``embed(images)``
gives one descriptor per image (its largest face); :class:`FaceRecognizer` holds a detector,
an aligner and an embedder for reuse (and is the ``embedder`` a
:class:`~visionscale.face.gallery.Gallery` takes); :meth:`FaceRecognizer.find_faces` and
:meth:`FaceRecognizer.identify` answer for *every* face of a photo.

The default model is dlib's ResNet descriptor (``face_embedder_dlib``: 128-D, public-domain
weights from the ``face-recognition-models`` package, 99.38 % on LFW per its author), aligned
exactly as dlib does it (:mod:`~visionscale.face.dlib_align`: BlazeFace keypoints -> dlib box ->
5-point landmarks -> ``get_face_chip``) and compared by Euclidean distance with dlib's
threshold, 0.6. Other embedders (a checkpoint from ``visionscale face train``, a registry name
such as ``face_embedder_resnet18``, which has *random* weights) are aligned from BlazeFace's eye
keypoints (:func:`visionscale.face.align.align_face`) and compared by the distance of their unit
embeddings with their own ``default_threshold`` (0.5, seed 003).

``detector=None`` skips detection: the inputs are taken as face crops already (LFW images,
aligned chips). With a detector, an image with no face raises :class:`NoFaceError` where one
face is needed (``verify``, ``embed``, enrolment), and several faces use the largest one with a
:class:`MultipleFacesWarning`; faces too small for the descriptor (narrower than ``min_face``
pixels) are reported as such, never silently described.
"""

from __future__ import annotations

from visionscale.errors import InvalidValueError, MissingDependencyError

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visionscale.face.embedder import FaceEmbedder, build_embedder
from visionscale.face.pipeline import (  # noqa: F401 - the result types and errors, re-exported
    Face,
    FaceIdentification,
    FacePipeline,
    FaceTooSmallError,
    MultipleFacesWarning,
    NoFaceError,
    VerifyResult,
    square_crop as _square_crop,
)

__all__ = ["FaceRecognizer", "NoFaceError", "FaceTooSmallError", "MultipleFacesWarning", "VerifyResult", "Face",
           "FaceIdentification", "verify", "embed", "DEFAULT_MODEL", "DEFAULT_THRESHOLD"]

DEFAULT_MODEL = "face_embedder_dlib"
DEFAULT_THRESHOLD = 0.6  # dlib's: same person when the Euclidean distance of descriptors is < 0.6


class FaceRecognizer(FacePipeline):
    """Detector + aligner + embedder, reusable across calls (the steps: :class:`~visionscale.face.pipeline.FacePipeline`).

    Args:
        model: ``"face_embedder_dlib"`` (default: dlib's descriptor with its real weights), a
            face-embedder checkpoint (``.safetensors`` or training folder), another registry name
            (random weights, see the module docstring) or a :class:`FaceEmbedder`.
        detector: ``"auto"`` (BlazeFace front model, built on first use), ``None`` (inputs
            are face crops already) or any object with ``detect(images)`` returning, per
            image, detections with ``box``, ``score`` and ``keypoints``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the embedder (and the auto detector);
            one this machine lacks raises :class:`~visionscale.errors.DeviceError`.
        batch_size: Faces per embedding batch.
        seed: Seed of random weights when ``model`` is a registry name without weights.
        backend, precision: What runs the embedder (:func:`visionscale.runtime.accelerate`).
        min_face: Faces narrower than this (pixels) are not described; default: the
            aligner's (32 px for the dlib descriptor, see
            :data:`~visionscale.face.dlib_align.MIN_FACE_PX`), else 0.
    """

    def __init__(self, model: str | os.PathLike | FaceEmbedder = DEFAULT_MODEL, detector="auto", device: str = "cpu",
                 batch_size: int = 64, seed: int = 0, backend: str = "eager", precision: str = "fp32",
                 min_face: float | None = None) -> None:
        from visionscale.device import resolve_device
        from visionscale.runtime import accelerate

        device = resolve_device(device)
        self.embedder = build_embedder(model, device, seed)
        size = self.embedder.config.image_size
        self._forward = accelerate(self.embedder.eval(), backend, precision, device, image_size=(size, size))
        self.device = device
        self.batch_size = batch_size
        self._detector = detector
        self._aligner = None
        if min_face is None:
            min_face = _dlib_min_face() if self.alignment == "dlib5" else 0.0
        if min_face < 0:
            raise InvalidValueError(f"min_face must be >= 0 pixels, got {min_face}").about("min_face")
        self.min_face = float(min_face)
        self.fallbacks = 0  # images embedded whole by faces(if_none="whole")

    @property
    def runtime(self) -> dict:
        """What runs the network: backend, precision, device and, for ONNX Runtime, the provider."""
        from visionscale.runtime import runtime_info

        return runtime_info(self._forward, self.device)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def metric(self) -> str:
        """``"euclidean"`` (raw descriptors, dlib) or ``"cosine"`` (unit embeddings)."""
        return getattr(self.embedder, "metric", "cosine")

    @property
    def threshold(self) -> float:
        """The embedder's same-person distance threshold (0.6 for dlib's descriptor)."""
        return float(getattr(self.embedder, "default_threshold", 0.5))

    @property
    def alignment(self) -> str:
        """``"dlib5"`` (dlib's landmarks and chips) or ``"keypoints"`` (BlazeFace's eyes)."""
        return getattr(self.embedder, "alignment", "keypoints")

    @property
    def detector(self):
        if isinstance(self._detector, str):
            if self._detector != "auto":
                raise InvalidValueError(f"detector must be 'auto', None or a detector object, "
                                        f"got {self._detector!r}").about("detector")
            try:
                from visionscale.face.detector import FaceDetector
            except ImportError as exc:
                raise MissingDependencyError(f"face detection is unavailable ({exc}); pass detector=None "
                                             f"to embed images that are face crops already").about("detector") from None
            self._detector = FaceDetector(model="front", weights=None, device=self.device)
        return self._detector

    @property
    def aligner(self):
        """The dlib aligner (5-point model parsed on first use), for ``alignment == "dlib5"``."""
        if self._aligner is None:
            from visionscale.face.dlib_align import DlibAligner

            self._aligner = DlibAligner(size=self.embedder.config.image_size)
        return self._aligner

    @property
    def chip_size(self) -> int:
        """The embedder's input side: the aligned crops' size."""
        return self.embedder.config.image_size

    def _embed_chips(self, chips) -> np.ndarray:
        return self.embedder.embed(chips, batch_size=self.batch_size, forward=self._forward)

    @staticmethod
    def _align(image: np.ndarray, det, size: int) -> np.ndarray:
        try:
            from visionscale.face.align import align_face
        except ImportError:
            return _square_crop(image, det.box)
        return align_face(image, np.asarray(det.keypoints), size=size)


def _dlib_min_face() -> float:
    from visionscale.face.dlib_align import MIN_FACE_PX

    return float(MIN_FACE_PX)


def verify(a, b, model: str | os.PathLike | FaceEmbedder = DEFAULT_MODEL, threshold: float | None = None,
           detector="auto", device: str = "cpu") -> VerifyResult:
    """Are ``a`` and ``b`` (RGB arrays or image paths) the same person?

    Returns the descriptor distance and ``same = distance < threshold`` (default: the model's,
    dlib's 0.6 for the default model).

    Raises:
        NoFaceError: An image shows no face (with ``detector`` set), or one too small.
        ImageReadError: A path cannot be read.
    """
    return FaceRecognizer(model, detector=detector, device=device).verify(a, b, threshold)


def embed(images: Sequence, model: str | os.PathLike | FaceEmbedder = DEFAULT_MODEL, detector="auto",
          device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """``(N, D)`` descriptors of the largest face in each image (arrays or paths)."""
    return FaceRecognizer(model, detector=detector, device=device, batch_size=batch_size).embed(images)


def open_gallery(path: str | os.PathLike | Path, recognizer: FaceRecognizer | None = None, **kwargs):
    """A :class:`~visionscale.face.gallery.Gallery` that embeds images with ``recognizer``."""
    from visionscale.face.gallery import Gallery

    return Gallery(path, embedder=recognizer, **kwargs)

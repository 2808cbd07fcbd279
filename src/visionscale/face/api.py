"""Face recognition from images: detect -> align -> embed, then verify or use a gallery.

``verify(a, b)`` answers "same person?" for two images (arrays or paths); ``embed(images)``
gives unit embeddings; :class:`FaceRecognizer` holds a detector and an embedder for reuse
(and is the ``embedder`` a :class:`~visionscale.face.gallery.Gallery` takes).

Detection uses :class:`visionscale.face.detector.FaceDetector` (BlazeFace) and
:func:`visionscale.face.align.align_face` (eye-keypoint alignment). ``detector=None``
skips detection: the inputs are taken as face crops already (LFW images, aligned crops).
An image with no face raises :class:`NoFaceError`; one with several uses the largest face
and warns (:class:`MultipleFacesWarning`).

No trained face weights ship with visionscale: a registry name (``face_embedder_resnet18``)
gives *random* weights (seeded, so the same in every process), which make the plumbing
work but do not recognise anyone. Train with ``visionscale face train`` and pass the
checkpoint.
"""

from __future__ import annotations

from visionscale.errors import InvalidValueError, MissingDependencyError, VisionscaleError

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionscale.face.embedder import FaceEmbedder, build_embedder
from visionscale.io.images import read_image

__all__ = ["FaceRecognizer", "NoFaceError", "MultipleFacesWarning", "VerifyResult", "verify", "embed",
           "DEFAULT_MODEL", "DEFAULT_THRESHOLD"]

DEFAULT_MODEL = "face_embedder_resnet18"
DEFAULT_THRESHOLD = 0.5  # seed 003: same person when the embedding distance is < 0.5


class NoFaceError(VisionscaleError, ValueError):
    """No face was found in an image where one was expected; the message names the image."""


class MultipleFacesWarning(UserWarning):
    """Several faces where one was expected; the largest was used."""


@dataclass(frozen=True)
class VerifyResult:
    distance: float
    same: bool
    threshold: float
    model: str

    def to_dict(self) -> dict:
        return {"distance": self.distance, "same": self.same, "threshold": self.threshold, "model": self.model}


def _load(images: Sequence) -> tuple[list[np.ndarray], list[str]]:
    arrays, labels = [], []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            arrays.append(read_image(im))
            labels.append(str(im))
        else:
            a = np.asarray(im)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise InvalidValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array or a path, "
                                        f"got {a.dtype} {a.shape}").about("images")
            arrays.append(a)
            labels.append(f"image {i}")
    return arrays, labels


def _square_crop(image: np.ndarray, box, scale: float = 1.2) -> np.ndarray:
    """Fallback when no keypoint alignment is available: a square around the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale / 2
    h, w = image.shape[:2]
    a, b = int(max(0, round(cx - half))), int(min(w, round(cx + half)))
    c, d = int(max(0, round(cy - half))), int(min(h, round(cy + half)))
    if b - a < 2 or d - c < 2:
        raise NoFaceError(f"the face box {tuple(round(v) for v in (x0, y0, x1, y1))} lies outside the image")
    return np.ascontiguousarray(image[c:d, a:b])


class FaceRecognizer:
    """Detector + aligner + embedder, reusable across calls.

    Args:
        model: A face-embedder checkpoint (``.safetensors`` or training folder), a registry
            name (random weights, see the module docstring) or a :class:`FaceEmbedder`.
        detector: ``"auto"`` (BlazeFace front model, built on first use), ``None`` (inputs
            are face crops already) or any object with ``detect(images)`` returning, per
            image, detections with ``box`` and ``keypoints``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the embedder (and the auto detector);
            one this machine lacks raises :class:`~visionscale.errors.DeviceError`.
        batch_size: Images per embedding batch.
        seed: Seed of random weights when ``model`` is a registry name.
    """

    def __init__(self, model: str | os.PathLike | FaceEmbedder = DEFAULT_MODEL, detector="auto", device: str = "cpu",
                 batch_size: int = 64, seed: int = 0, backend: str = "eager", precision: str = "fp32") -> None:
        from visionscale.device import resolve_device
        from visionscale.runtime import accelerate

        device = resolve_device(device)
        self.embedder = build_embedder(model, device, seed)
        size = self.embedder.config.image_size
        self._forward = accelerate(self.embedder.eval(), backend, precision, device, image_size=(size, size))
        self.device = device
        self.batch_size = batch_size
        self._detector = detector

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

    def faces(self, images: Sequence, labels: Sequence[str] | None = None) -> list[np.ndarray]:
        """One aligned face crop per image (the largest face; warns when there are several)."""
        arrays, auto_labels = _load(images)
        labels = list(labels) if labels is not None else auto_labels
        if self._detector is None:
            return arrays
        size = self.embedder.config.image_size
        dets = self.detector.detect(arrays)
        crops = []
        for img, found, label in zip(arrays, dets, labels):
            if not found:
                raise NoFaceError(f"no face found in {label}")
            areas = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in found]
            best = found[int(np.argmax(areas))]
            if len(found) > 1:
                warnings.warn(f"{len(found)} faces in {label}; using the largest", MultipleFacesWarning, stacklevel=2)
            crops.append(self._align(img, best, size))
        return crops

    @staticmethod
    def _align(image: np.ndarray, det, size: int) -> np.ndarray:
        try:
            from visionscale.face.align import align_face
        except ImportError:
            return _square_crop(image, det.box)
        return align_face(image, np.asarray(det.keypoints), size=size)

    def embed(self, images: Sequence, labels: Sequence[str] | None = None) -> np.ndarray:
        """``(N, D)`` float32 unit embeddings of the (largest) face in each image."""
        crops = self.faces(images, labels)
        return self.embedder.embed(crops, batch_size=self.batch_size, forward=self._forward)

    def verify(self, a, b, threshold: float = DEFAULT_THRESHOLD) -> VerifyResult:
        e = self.embed([a, b])
        d = float(np.linalg.norm(e[0].astype(np.float64) - e[1].astype(np.float64)))
        return VerifyResult(d, d < threshold, float(threshold), self.model_id)


def verify(a, b, model: str | os.PathLike | FaceEmbedder = DEFAULT_MODEL, threshold: float = DEFAULT_THRESHOLD,
           detector="auto", device: str = "cpu") -> VerifyResult:
    """Are ``a`` and ``b`` (RGB arrays or image paths) the same person?

    Returns the embedding distance and ``same = distance < threshold``.

    Raises:
        NoFaceError: An image shows no face (with ``detector`` set).
        ImageReadError: A path cannot be read.
    """
    return FaceRecognizer(model, detector=detector, device=device).verify(a, b, threshold)


def embed(images: Sequence, model: str | os.PathLike | FaceEmbedder = DEFAULT_MODEL, detector="auto",
          device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """``(N, D)`` unit embeddings of the largest face in each image (arrays or paths)."""
    return FaceRecognizer(model, detector=detector, device=device, batch_size=batch_size).embed(images)


def open_gallery(path: str | os.PathLike | Path, recognizer: FaceRecognizer | None = None, **kwargs):
    """A :class:`~visionscale.face.gallery.Gallery` that embeds images with ``recognizer``."""
    from visionscale.face.gallery import Gallery

    return Gallery(path, embedder=recognizer, **kwargs)

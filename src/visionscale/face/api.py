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

from visionscale.errors import InvalidValueError, MissingDependencyError, VisionscaleError

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionscale.face.embedder import FaceEmbedder, build_embedder
from visionscale.io.images import read_image

__all__ = ["FaceRecognizer", "NoFaceError", "FaceTooSmallError", "MultipleFacesWarning", "VerifyResult", "Face",
           "FaceIdentification", "verify", "embed", "DEFAULT_MODEL", "DEFAULT_THRESHOLD"]

DEFAULT_MODEL = "face_embedder_dlib"
DEFAULT_THRESHOLD = 0.6  # dlib's: same person when the Euclidean distance of descriptors is < 0.6


class NoFaceError(VisionscaleError, ValueError):
    """No face was found in an image where one was expected; the message names the image."""


class FaceTooSmallError(NoFaceError):
    """The only (or largest) face of an image is too small for the descriptor."""


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


@dataclass
class Face:
    """One detected face of an image.

    Attributes:
        box: ``(x0, y0, x1, y1)`` detector box in image pixels.
        score: Detection confidence.
        width: The face's width in pixels as the embedder sees it (dlib's box for the dlib
            descriptor, the detector box otherwise); compared with ``min_face``.
        landmarks: The points the face was aligned on (dlib's five, integer pixels, for the dlib
            descriptor; BlazeFace's six keypoints otherwise); None without a detector.
        usable: False when the face is too small to describe (``reason`` says why).
        embedding: The face's descriptor (None until embedded, and for unusable faces).
        chip: The aligned crop the embedder gets.
    """

    box: tuple[float, float, float, float]
    score: float
    width: float
    landmarks: np.ndarray | None = field(default=None, repr=False)
    usable: bool = True
    reason: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    chip: np.ndarray | None = field(default=None, repr=False)

    @property
    def area(self) -> float:
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
             "width": round(float(self.width), 1), "usable": self.usable}
        if self.landmarks is not None:
            d["landmarks"] = np.asarray(self.landmarks).round(2).tolist()
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class FaceIdentification:
    """Who one face of an image is: ``name`` None = unknown (or not identifiable: see ``face``)."""

    face: Face
    name: str | None
    distance: float | None
    matches: list = field(default_factory=list)

    @property
    def label(self) -> str:
        if not self.face.usable:
            return "too small"
        return self.name if self.name is not None else "unknown"

    def to_dict(self) -> dict:
        return {**self.face.to_dict(), "name": self.name, "distance": self.distance,
                "matches": [{"name": m.name, "distance": m.distance} for m in self.matches]}


class FaceRecognizer:
    """Detector + aligner + embedder, reusable across calls.

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
    def default_threshold(self) -> float:
        """:attr:`threshold`, under the name embedders use (a Gallery reads it)."""
        return self.threshold

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

    # -- faces -----------------------------------------------------------------------------
    def find_faces(self, images: Sequence) -> list[list[Face]]:
        """Every face of each image, largest first, aligned but not embedded.

        Without a detector each image is one face (the whole image)."""
        arrays, _ = _load(images)
        if self._detector is None:
            return [[Face((0.0, 0.0, float(a.shape[1]), float(a.shape[0])), 1.0, float(a.shape[1]), chip=a)]
                    for a in arrays]
        size = self.embedder.config.image_size
        out = []
        for img, found in zip(arrays, self.detector.detect(arrays)):
            faces = []
            for det in sorted(found, key=lambda d: -(d.box[2] - d.box[0]) * (d.box[3] - d.box[1])):
                box = tuple(float(v) for v in det.box)
                if self.alignment == "dlib5":
                    al = self.aligner(img, det)
                    face = Face(box, float(det.score), float(al.width), al.landmarks, chip=al.chip)
                else:
                    face = Face(box, float(det.score), box[2] - box[0], np.asarray(det.keypoints, dtype=np.float64))
                if face.width < self.min_face:
                    face.usable = False
                    face.reason = (f"face is {face.width:.0f} px wide; the descriptor needs at least "
                                   f"{self.min_face:g} px (use a larger image of it)")
                elif face.chip is None:
                    face.chip = self._align(img, det, size)
                faces.append(face)
            out.append(faces)
        return out

    def embed_faces(self, images: Sequence) -> list[list[Face]]:
        """:meth:`find_faces`, with ``embedding`` set on every usable face (one batched pass)."""
        per_image = self.find_faces(images)
        usable = [f for faces in per_image for f in faces if f.usable]
        if usable:
            emb = self.embedder.embed([f.chip for f in usable], batch_size=self.batch_size, forward=self._forward)
            for f, e in zip(usable, emb):
                f.embedding = e
        return per_image

    def faces(self, images: Sequence, labels: Sequence[str] | None = None, pick: str = "largest",
              if_none: str = "raise") -> list[np.ndarray]:
        """One aligned face crop per image.

        Args:
            pick: ``"largest"`` face (warns when there are several) or the face nearest the
                image ``"centre"`` (LFW's convention: its subject is centred, others may be larger).
            if_none: ``"raise"`` (:class:`NoFaceError` / :class:`FaceTooSmallError`) or
                ``"whole"``: use the whole image as the crop (counted in :attr:`fallbacks`).
        """
        if pick not in ("largest", "centre"):
            raise InvalidValueError(f"pick must be 'largest' or 'centre', got {pick!r}").about("pick")
        if if_none not in ("raise", "whole"):
            raise InvalidValueError(f"if_none must be 'raise' or 'whole', got {if_none!r}").about("if_none")
        arrays, auto_labels = _load(images)
        labels = list(labels) if labels is not None else auto_labels
        crops = []
        for img, faces, label in zip(arrays, self.find_faces(arrays), labels):
            usable = [f for f in faces if f.usable]
            if not usable:
                if if_none == "whole":
                    self.fallbacks += 1
                    crops.append(img)
                    continue
                if not faces:
                    raise NoFaceError(f"no face found in {label}")
                raise FaceTooSmallError(f"{label}: {faces[0].reason}")
            if pick == "centre":
                c = np.array([img.shape[1] / 2, img.shape[0] / 2])
                best = min(usable, key=lambda f: float(np.hypot((f.box[0] + f.box[2]) / 2 - c[0],
                                                                (f.box[1] + f.box[3]) / 2 - c[1])))
            else:
                if len(faces) > 1:
                    warnings.warn(f"{len(faces)} faces in {label}; using the largest", MultipleFacesWarning,
                                  stacklevel=2)
                if not faces[0].usable:
                    raise FaceTooSmallError(f"{label}: {faces[0].reason}")
                best = faces[0]
            crops.append(best.chip)
        return crops

    @staticmethod
    def _align(image: np.ndarray, det, size: int) -> np.ndarray:
        try:
            from visionscale.face.align import align_face
        except ImportError:
            return _square_crop(image, det.box)
        return align_face(image, np.asarray(det.keypoints), size=size)

    def embed(self, images: Sequence, labels: Sequence[str] | None = None, pick: str = "largest",
              if_none: str = "raise") -> np.ndarray:
        """``(N, D)`` float32 descriptors of one face per image (see :meth:`faces`)."""
        crops = self.faces(images, labels, pick, if_none)
        return self.embedder.embed(crops, batch_size=self.batch_size, forward=self._forward)

    def verify(self, a, b, threshold: float | None = None) -> VerifyResult:
        """Same person in ``a`` and ``b`` (their largest faces)? ``threshold`` defaults to the
        embedder's (:attr:`threshold`)."""
        t = self.threshold if threshold is None else float(threshold)
        e = self.embed([a, b])
        d = float(np.linalg.norm(e[0].astype(np.float64) - e[1].astype(np.float64)))
        return VerifyResult(d, d < t, t, self.model_id)

    def identify(self, gallery, images: Sequence, k: int = 3, threshold: float | None = None,
                 largest_only: bool = False) -> list[list[FaceIdentification]]:
        """For each image, who every face in it is (largest first), against ``gallery``
        (a :class:`~visionscale.face.gallery.Gallery` built with this recognizer's model).

        An image without faces gives an empty list; a face too small to describe is listed with
        ``usable=False`` and no match. ``largest_only`` keeps just the largest face of each image.
        """
        t = self.threshold if threshold is None else float(threshold)
        per_image = self.embed_faces(images)
        if largest_only:
            per_image = [faces[:1] for faces in per_image]
        usable = [f for faces in per_image for f in faces if f.usable]
        found = iter(gallery.identify(embeddings=np.stack([f.embedding for f in usable]), k=k, threshold=t)
                     if usable else [])
        out = []
        for faces in per_image:
            row = []
            for f in faces:
                if f.usable:
                    r = next(found)
                    row.append(FaceIdentification(f, r.name, r.distance, list(r.matches)))
                else:
                    row.append(FaceIdentification(f, None, None, []))
            out.append(row)
        return out


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

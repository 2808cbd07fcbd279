"""The face pipeline's steps over any detector, aligner and descriptor: find faces, align, embed,
verify, identify; and its result types. numpy only (this module never imports torch).

:class:`FacePipeline` holds the logic; two classes supply the parts:

* :class:`visionscale.face.api.FaceRecognizer`: BlazeFace (PyTorch or ONNX Runtime) and a
  PyTorch embedder (dlib's descriptor by default, or a trained checkpoint);
* :class:`visionscale.bundle.face.FacePredictor`: a deployment bundle's ONNX graphs in ONNX
  Runtime, without torch.

Both therefore give the same :class:`Face`, :class:`VerifyResult` and
:class:`FaceIdentification` results, raise the same errors, and work as a
:class:`~visionscale.face.gallery.Gallery`'s embedder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from visionscale.errors import InvalidValueError, VisionscaleError
from visionscale.io.images import read_image

__all__ = ["FacePipeline", "NoFaceError", "FaceTooSmallError", "MultipleFacesWarning", "VerifyResult", "Face",
           "FaceIdentification", "load_images", "square_crop"]


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


def load_images(images: Sequence) -> tuple[list[np.ndarray], list[str]]:
    """(H, W, 3) uint8 RGB arrays of images given as arrays or paths, and a label for each."""
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


def square_crop(image: np.ndarray, box, scale: float = 1.2) -> np.ndarray:
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
        keypoints: The detector's six keypoints (``(6, 2)`` image pixels, BlazeFace's order);
            None without a detector.
        dlib_box: For the dlib descriptor: dlib's inclusive ``(left, top, right, bottom)`` box
            the landmarks were predicted from; None otherwise.
        box_source: Where ``dlib_box`` came from: ``"hog"`` (dlib's HOG detector near the face:
            the box dlib's own pipeline uses) or ``"calibrated"`` (mapped from the keypoints,
            where the HOG detector finds no face: profiles, strong rotations); None otherwise.
    """

    box: tuple[float, float, float, float]
    score: float
    width: float
    landmarks: np.ndarray | None = field(default=None, repr=False)
    usable: bool = True
    reason: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    chip: np.ndarray | None = field(default=None, repr=False)
    keypoints: np.ndarray | None = field(default=None, repr=False)
    dlib_box: tuple[int, int, int, int] | None = None
    box_source: str | None = None

    @property
    def area(self) -> float:
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
             "width": round(float(self.width), 1), "usable": self.usable}
        if self.landmarks is not None:
            d["landmarks"] = np.asarray(self.landmarks).round(2).tolist()
        if self.dlib_box is not None:
            d["dlib_box"] = [int(v) for v in self.dlib_box]
            d["box_source"] = self.box_source
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


class FacePipeline:
    """Detect -> align -> embed, then verify or identify (see the module docstring).

    A subclass sets ``_detector`` (None: inputs are face crops already), ``min_face``,
    ``fallbacks`` (0) and provides ``detector`` (an object with ``detect(images)`` giving, per
    image, detections with ``box``, ``score`` and ``keypoints``), ``aligner`` (for ``alignment
    == "dlib5"``: ``aligner(image, detection)`` -> an object with ``width``, ``landmarks``,
    ``chip``), ``alignment``, ``chip_size``, ``threshold``, ``model_id`` and
    :meth:`_embed_chips`.
    """

    _detector = None
    min_face: float = 0.0
    fallbacks: int = 0

    # -- what a subclass supplies ----------------------------------------------------------
    @property
    def detector(self):
        return self._detector

    @property
    def alignment(self) -> str:
        return "keypoints"

    @property
    def chip_size(self) -> int:
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        raise NotImplementedError

    @property
    def model_id(self) -> str:
        raise NotImplementedError

    def _embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """``(N, D)`` float32 descriptors of aligned crops."""
        raise NotImplementedError

    @staticmethod
    def _align(image: np.ndarray, det, size: int) -> np.ndarray:
        """A crop of a face for keypoint-aligned embedders (here: a square around the box)."""
        return square_crop(image, det.box)

    @property
    def default_threshold(self) -> float:
        """:attr:`threshold`, under the name embedders use (a Gallery reads it)."""
        return self.threshold

    # -- faces -----------------------------------------------------------------------------
    def find_faces(self, images: Sequence) -> list[list[Face]]:
        """Every face of each image, largest first, aligned but not embedded.

        Without a detector each image is one face (the whole image)."""
        arrays, _ = load_images(images)
        if self._detector is None:
            return [[Face((0.0, 0.0, float(a.shape[1]), float(a.shape[0])), 1.0, float(a.shape[1]), chip=a)]
                    for a in arrays]
        size = self.chip_size
        out = []
        for img, found in zip(arrays, self.detector.detect(arrays)):
            faces = []
            for det in sorted(found, key=lambda d: -(d.box[2] - d.box[0]) * (d.box[3] - d.box[1])):
                box = tuple(float(v) for v in det.box)
                keypoints = np.asarray(det.keypoints, dtype=np.float64)
                if self.alignment == "dlib5":
                    al = self.aligner(img, det)
                    face = Face(box, float(det.score), float(al.width), al.landmarks, chip=al.chip,
                                keypoints=keypoints, dlib_box=tuple(int(v) for v in al.rect),
                                box_source=getattr(al, "box_source", None))
                else:
                    face = Face(box, float(det.score), box[2] - box[0], keypoints, keypoints=keypoints)
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
            emb = self._embed_chips([f.chip for f in usable])
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
        arrays, auto_labels = load_images(images)
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

    def embed(self, images: Sequence, labels: Sequence[str] | None = None, pick: str = "largest",
              if_none: str = "raise") -> np.ndarray:
        """``(N, D)`` float32 descriptors of one face per image (see :meth:`faces`)."""
        return self._embed_chips(self.faces(images, labels, pick, if_none))

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
        (a :class:`~visionscale.face.gallery.Gallery` built with this pipeline's model).

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

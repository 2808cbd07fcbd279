"""Face detections and the numpy steps around the BlazeFace network, shared by
:class:`~visionscale.face.detector.FaceDetector` (network in PyTorch or ONNX Runtime) and a
deployment bundle's face predictor (:mod:`visionscale.bundle.face`, ONNX Runtime without torch).

One batch of images goes::

    letterbox_batch(images, S)            -> (B, 3, S, S) float32 in [-1, 1], a Letterbox per image
    network(batch)                        -> regressors (B, N, 16), classificators (B, N, 1)
    detections(reg, cls, anchors, opts, ...) -> per image: decoded, blended (weighted NMS or NMS),
                                            mapped back to image pixels as FaceDetection

numpy only (this module never imports torch; :mod:`~visionscale.face.letterbox` and
:mod:`~visionscale.face.decode` do their work in numpy too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from visionscale.errors import InvalidValueError
from visionscale.face.decode import DecodeOptions, RawDetections, decode, nms, weighted_nms
from visionscale.face.letterbox import Letterbox, letterbox_into

__all__ = ["FaceDetection", "KEYPOINT_NAMES", "MIN_IMAGE_SIDE", "BLENDINGS", "as_rgb_list", "letterbox_batch",
           "blend", "detections"]

# MediaPipe's order (the person's right eye is on the image's left in a frontal photo).
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion")
MIN_IMAGE_SIDE = 8  # below this no face is resolvable; such images are rejected with an error
BLENDINGS = ("weighted", "nms")


@dataclass
class FaceDetection:
    """One face.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels of the original image (may extend past its border,
            as MediaPipe's boxes do).
        score: Detection confidence in [0, 1].
        keypoints: ``(6, 2)`` float ``x, y`` pixels in :data:`KEYPOINT_NAMES` order.
    """

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray = field(repr=False)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "keypoints": {n: [round(float(x), 2), round(float(y), 2)] for n, (x, y) in zip(KEYPOINT_NAMES, self.keypoints)},
        }


def as_rgb_list(images) -> list[np.ndarray]:
    """Normalise the ``images`` argument: one array or a sequence of ``(H, W, 3)`` uint8 RGB arrays.

    Grayscale ``(H, W)`` and ``(H, W, 1)`` become RGB, ``(H, W, 4)`` drops alpha.

    Raises:
        TypeError / InvalidValueError: naming the offending image's index.
    """
    if isinstance(images, np.ndarray):
        images = [images]
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise TypeError(f"image {i}: expected a numpy array (H, W, 3) uint8, got {type(img).__name__}")
        if img.dtype != np.uint8:
            raise InvalidValueError(f"image {i}: expected uint8 pixels, got {img.dtype}").about("images")
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise InvalidValueError(f"image {i}: expected shape (H, W, 3), got {img.shape}").about("images")
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
        if min(img.shape[:2]) < MIN_IMAGE_SIDE:
            raise InvalidValueError(f"image {i} is {img.shape[1]}x{img.shape[0]} px: too small for face detection "
                                    f"(need at least {MIN_IMAGE_SIDE} px per side)").about("images")
        out.append(img)
    return out


def letterbox_batch(images: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, list[Letterbox]]:
    """Letterboxed ``(B, 3, size, size)`` float32 batch in [-1, 1] and each image's mapping."""
    batch = np.empty((len(images), 3, size, size), np.float32)
    for img, out in zip(images, batch):
        letterbox_into(img, out)
    return batch, [Letterbox(img.shape[1], img.shape[0]) for img in images]


def blend(regressors, classificators, anchors, opts: DecodeOptions, min_score: float | None = None,
          blending: str = "weighted", threshold: float = 0.3) -> list[RawDetections]:
    """Decoded detections of a batch (``min_score`` overriding ``opts``'s), blended per image by
    MediaPipe's weighted NMS (``"weighted"``) or classic NMS (``"nms"``) at IoU ``threshold``;
    normalised tensor coordinates. Tensors or arrays."""
    if blending not in BLENDINGS:
        raise InvalidValueError(f"blending must be 'weighted' or 'nms', got {blending!r}").about("blending")
    if min_score is not None and min_score != opts.min_score_thresh:
        opts = replace(opts, min_score_thresh=float(min_score))
    merge = weighted_nms if blending == "weighted" else nms
    return [merge(d, threshold) for d in decode(regressors, classificators, anchors, opts)]


def detections(blended: Sequence[RawDetections], letterboxes: Sequence[Letterbox]) -> list[list[FaceDetection]]:
    """Blended detections (see :func:`blend`) mapped back to each image's pixels, best first."""
    results = []
    for dets, lb in zip(blended, letterboxes):
        corners = lb.to_image(dets.boxes.reshape(-1, 2, 2)).reshape(-1, 4)  # tensor -> image pixels
        kps = lb.to_image(dets.keypoints).astype(np.float32)
        results.append([FaceDetection(tuple(float(v) for v in box), float(score), k)
                        for box, k, score in zip(corners, kps, dets.scores)])
    return results

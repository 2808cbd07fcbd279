"""BlazeFace post-processing: box and keypoint decoding, scores, weighted blending, NMS.

Follows MediaPipe's calculators:

* ``TensorsToDetectionsCalculator`` with ``reverse_output_order: true`` (raw boxes are
  ``x, y, w, h`` then ``x, y`` per keypoint): ``x = raw_x / x_scale * anchor_w + anchor_x``,
  ``w = raw_w / w_scale * anchor_w`` (no exponential); scores are clipped to
  ``[-score_clipping_thresh, +score_clipping_thresh]`` then passed through a sigmoid; boxes
  below ``min_score_thresh`` and boxes with negative or NaN width/height are dropped.
* ``NonMaxSuppressionCalculator`` with ``algorithm: WEIGHTED``, ``overlap_type:
  INTERSECTION_OVER_UNION`` and ``min_suppression_threshold: 0.3``: detections are visited by
  decreasing score; every remaining detection whose IoU with the current best is ``> 0.3``
  (the best itself included) is a candidate; the output box corners and keypoints are the
  score-weighted mean over the candidates, the output score is the best detection's own score;
  the candidates are removed and the loop repeats. This is BlazeFace's "tie resolution"
  (paper section 3), which the paper prefers to NMS because it jitters less in video.

Coordinates here are normalised to the letterboxed network input ([0, 1] over the tensor).

numpy only, apart from :func:`decode_tensors` (the model's ``decode`` component), which imports
torch when called: a deployment bundle decodes without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["DecodeOptions", "RawDetections", "decode", "weighted_nms", "nms", "iou_matrix"]


@dataclass(frozen=True)
class DecodeOptions:
    """``TensorsToDetectionsCalculatorOptions`` fields for BlazeFace (MediaPipe's values)."""

    x_scale: float
    y_scale: float
    w_scale: float
    h_scale: float
    num_keypoints: int = 6
    score_clipping_thresh: float = 100.0
    min_score_thresh: float = 0.5


@dataclass
class RawDetections:
    """Decoded detections of one image before blending; all arrays share the first axis.

    Attributes:
        boxes: ``(N, 4)`` float ``xmin, ymin, xmax, ymax`` in normalised tensor coordinates.
        keypoints: ``(N, K, 2)`` float ``x, y`` in the same coordinates.
        scores: ``(N,)`` float sigmoid scores.
    """

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _decode_rows(regressors, anchors, opts: DecodeOptions, stack):
    """Boxes ``(..., 4)`` xyxy and keypoints ``(..., K, 2)`` from raw regressors ``(..., 4 + 2K)``
    and their anchors ``(..., 4)`` (broadcastable: one per regressor row, or one per anchor).
    Tensors with ``stack=torch.stack``, or numpy arrays with ``stack=np.stack`` (the same float32
    operations)."""
    ax, ay, aw, ah = anchors[..., 0], anchors[..., 1], anchors[..., 2], anchors[..., 3]
    xc = regressors[..., 0] / opts.x_scale * aw + ax
    yc = regressors[..., 1] / opts.y_scale * ah + ay
    w = regressors[..., 2] / opts.w_scale * aw
    h = regressors[..., 3] / opts.h_scale * ah
    boxes = stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], -1)
    k = opts.num_keypoints
    kp = regressors[..., 4 : 4 + 2 * k].reshape(*regressors.shape[:-1], k, 2)
    kx = kp[..., 0] / opts.x_scale * aw[..., None] + ax[..., None]
    ky = kp[..., 1] / opts.y_scale * ah[..., None] + ay[..., None]
    return boxes, stack([kx, ky], -1)


def decode_tensors(regressors: Tensor, classificators: Tensor, anchors: Tensor, opts: DecodeOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorised decoding of every anchor.

    Args:
        regressors: ``(B, N, 4 + 2K)`` raw regressor output.
        classificators: ``(B, N, 1)`` raw logits.
        anchors: ``(N, 4)`` ``x_center, y_center, w, h``.

    Returns:
        boxes ``(B, N, 4)`` xyxy, keypoints ``(B, N, K, 2)``, scores ``(B, N)``.
    """
    import torch

    boxes, keypoints = _decode_rows(regressors, anchors.to(regressors), opts, stack=torch.stack)
    t = opts.score_clipping_thresh
    return boxes, keypoints, torch.sigmoid(classificators[..., 0].clamp(-t, t))


def _as_array(x) -> np.ndarray:
    """A float32 numpy array of a tensor (any device) or an array, without importing torch."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def decode(regressors, classificators, anchors, opts: DecodeOptions) -> list[RawDetections]:
    """Decode a batch and keep, per image, the anchors with ``score >= min_score_thresh``.

    Scores are thresholded first and only the kept anchors (a few per face among 896) are
    decoded, in numpy (a dozen small operations per batch, where torch's per-call overhead
    would dominate at batch 1); the formulas are those of :func:`decode_tensors`.
    """
    reg, logits = _as_array(regressors), _as_array(classificators)[..., 0]  # (B, N, 16), (B, N)
    t = opts.score_clipping_thresh
    with np.errstate(over="ignore"):
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -t, t)))
    image, anchor = np.nonzero(scores >= opts.min_score_thresh)  # row-major: by image, then anchor
    boxes, kps = _decode_rows(reg[image, anchor], _as_array(anchors)[anchor], opts, stack=np.stack)
    with np.errstate(invalid="ignore"):
        ok = (boxes[:, 2] - boxes[:, 0] >= 0) & (boxes[:, 3] - boxes[:, 1] >= 0)  # NaN compares False: dropped, as MediaPipe does
    image, anchor = image[ok], anchor[ok]
    ends = np.searchsorted(image, np.arange(1, scores.shape[0]))  # split points: image is sorted
    parts = zip(np.split(boxes[ok], ends), np.split(kps[ok], ends), np.split(scores[image, anchor], ends))
    return [RawDetections(b, k, s) for b, k, s in parts]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` ``(N, 4)`` with every box in ``b`` ``(M, 4)`` (xyxy); 0 when a union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, kind="stable")  # decreasing score; ties keep anchor order


def weighted_nms(dets: RawDetections, threshold: float = 0.3) -> RawDetections:
    """MediaPipe's WEIGHTED non-max suppression (see the module docstring)."""
    if len(dets) == 0:
        return dets
    order = _order(dets.scores)
    boxes, kps, scores = dets.boxes[order], dets.keypoints[order], dets.scores[order]
    # All pairwise IoUs at once (a few dozen candidates at most); column `top` holds the IoU of
    # every detection with `top`, computed exactly as a one-column call would.
    overlaps = iou_matrix(boxes, boxes)
    alive = np.ones(len(scores), bool)
    out_b, out_k, out_s = [], [], []
    for top in range(len(scores)):  # score order
        if not alive[top]:
            continue
        remaining = np.flatnonzero(alive)
        cand = remaining[overlaps[remaining, top] > threshold]
        if cand.size == 0:
            # A zero-area best box overlaps nothing, not even itself. MediaPipe then stops
            # (the loop sees no change); we output it alone and go on with the rest instead.
            cand = remaining[:1]
        w = scores[cand].astype(np.float64)
        total = w.sum()
        out_b.append((boxes[cand] * w[:, None]).sum(0) / total)
        out_k.append((kps[cand] * w[:, None, None]).sum(0) / total)
        out_s.append(scores[top])
        alive[cand] = False
    return RawDetections(np.asarray(out_b, np.float32), np.asarray(out_k, np.float32), np.asarray(out_s, np.float32))


def nms(dets: RawDetections, threshold: float = 0.3) -> RawDetections:
    """Classic greedy NMS (MediaPipe's DEFAULT algorithm): keep a detection unless its IoU
    with an already kept one is ``> threshold``; boxes and keypoints are not blended."""
    if len(dets) == 0:
        return dets
    order = _order(dets.scores)
    keep: list[int] = []
    for i in order:
        if keep and (iou_matrix(dets.boxes[keep], dets.boxes[i : i + 1])[:, 0] > threshold).any():
            continue
        keep.append(int(i))
    idx = np.asarray(keep)
    return RawDetections(dets.boxes[idx], dets.keypoints[idx], dets.scores[idx])

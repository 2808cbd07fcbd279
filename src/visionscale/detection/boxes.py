"""Box operations in plain torch: IoU, anchor matching, delta encoding, NMS.

Boxes are ``(N, 4)`` float tensors ``(x1, y1, x2, y2)`` in pixels with continuous
coordinates (width = x2 - x1, as in torchvision and mmdetection 2+).

Deltas follow Faster R-CNN (Ren et al., NIPS 2015), the parameterisation EAPM's GoS is
defined on: t_x = (x - x_a) / w_a, t_y = (y - y_a) / h_a, t_w = log(w / w_a),
t_h = log(h / h_a), optionally divided by ``stds`` (mmdetection's DeltaXYWHBBoxCoder).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Matching results besides a GT index >= 0.
NEGATIVE = -1
IGNORE = -2

# dw, dh larger than this would overflow exp(); mmdetection's wh_ratio_clip = 16/1000.
_MAX_DWH = abs(math.log(16 / 1000))


def box_area(boxes: Tensor) -> Tensor:
    """(N, 4) -> (N,) areas (0 for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU, (N, 4) x (M, 4) -> (N, M); 0 where the union is empty."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``."""
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def encode(anchors: Tensor, boxes: Tensor, stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas (t_x, t_y, t_w, t_h) that move each anchor onto its box; (N, 4), (N, 4) -> (N, 4)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    deltas = torch.stack([(bx - ax) / aw, (by - ay) / ah, torch.log(bw / aw), torch.log(bh / ah)], dim=1)
    return deltas / deltas.new_tensor(stds)


def decode(anchors: Tensor, deltas: Tensor, stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Inverse of :func:`encode`; dw, dh are clipped so that exp() cannot overflow."""
    deltas = deltas * deltas.new_tensor(stds)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    cx, cy = ax + deltas[:, 0] * aw, ay + deltas[:, 1] * ah
    w = aw * deltas[:, 2].clamp(-_MAX_DWH, _MAX_DWH).exp()
    h = ah * deltas[:, 3].clamp(-_MAX_DWH, _MAX_DWH).exp()
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    low_quality: bool = True,
    gt_ignore: Tensor | None = None,
) -> Tensor:
    """Assign each anchor a GT index, ``NEGATIVE`` or ``IGNORE`` (RetinaNet's max-IoU assigner).

    Args:
        anchors: (A, 4).
        gt_boxes: (G, 4); may be empty (then every anchor is negative).
        pos_iou: IoU >= this makes a positive.
        neg_iou: IoU < this makes a negative; in between is ignored.
        low_quality: Also make each GT's best anchor(s) positive, so that a box no anchor
            overlaps by ``pos_iou`` (a small or oddly shaped face) still gets trained.
        gt_ignore: (G,) bool; anchors whose best match is an ignored GT (crowd, WIDER FACE
            "invalid") are ignored instead of positive.

    Returns:
        (A,) int64.
    """
    if not 0 <= neg_iou <= pos_iou <= 1:
        raise ValueError(f"need 0 <= neg_iou <= pos_iou <= 1, got neg_iou={neg_iou}, pos_iou={pos_iou}")
    n = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((n,), NEGATIVE, dtype=torch.long, device=anchors.device)
    iou = box_iou(anchors, gt_boxes)  # (A, G)
    best_iou, best_gt = iou.max(dim=1)
    assigned = torch.full((n,), IGNORE, dtype=torch.long, device=anchors.device)
    assigned[best_iou < neg_iou] = NEGATIVE
    pos = best_iou >= pos_iou
    assigned[pos] = best_gt[pos]
    if low_quality:
        gt_best = iou.max(dim=0).values  # (G,)
        # every anchor tied for a GT's best IoU (> 0) goes to that GT
        a_idx, g_idx = torch.nonzero((iou == gt_best[None, :]) & (gt_best[None, :] > 0), as_tuple=True)
        assigned[a_idx] = g_idx
    if gt_ignore is not None and bool(gt_ignore.any()):
        hit = assigned >= 0
        assigned[hit & gt_ignore[assigned.clamp_min(0)]] = IGNORE
    return assigned


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; indices of kept boxes by decreasing score.

    Pure torch: one (N, N) IoU matrix, then a loop over the survivors. Callers keep N
    to a few thousand (top-k before NMS), where this is fast enough on a CPU.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    iou = box_iou(boxes[order], boxes[order])  # (N, N), rows and columns in score order
    over = (iou > iou_threshold).cpu()
    sup = torch.zeros(order.numel(), dtype=torch.bool)
    keep = []
    for i in range(order.numel()):
        if sup[i]:
            continue
        keep.append(i)
        sup |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each label: boxes of different labels are shifted apart so they never overlap."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


def postprocess(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    score_threshold: float = 0.05,
    pre_nms_top_k: int = 1000,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's raw outputs -> (boxes (K, 4), scores (K,), labels (K,)) after NMS.

    Args:
        cls_logits: (A, C) logits; box_deltas: (A, 4); anchors: (A, 4).
        image_size: (height, width); boxes are clipped to it.
    """
    scores = torch.sigmoid(cls_logits).flatten()  # (A * C,), index = anchor * C + class
    num_classes = cls_logits.shape[1]
    keep = torch.nonzero(scores > score_threshold).squeeze(1)
    if keep.numel() > pre_nms_top_k:
        keep = keep[scores[keep].topk(pre_nms_top_k).indices]
    scores = scores[keep]
    anchor_idx, labels = keep // num_classes, keep % num_classes
    boxes = decode(anchors[anchor_idx], box_deltas[anchor_idx], stds)
    h, w = image_size
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1
    )
    ok = box_area(boxes) > 0
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    kept = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    return boxes[kept], scores[kept], labels[kept]

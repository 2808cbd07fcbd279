"""SSD anchors exactly as MediaPipe's ``SsdAnchorsCalculator`` makes them.

MediaPipe (``mediapipe/calculators/tflite/ssd_anchors_calculator.cc``, non-multiscale path):
layers with equal strides are merged; each merged layer places, at every cell of its
``ceil(input / stride)`` grid, one anchor per (aspect ratio, scale) of each merged layer plus
one interpolated-scale anchor when ``interpolated_scale_aspect_ratio > 0``. Centres are
``(x + offset) / grid_width``. With ``fixed_anchor_size`` every anchor is 1 x 1 (BlazeFace's
regressor predicts absolute sizes, scaled by ``w_scale``/``h_scale``).

Front/short-range (128 px, strides 8,16,16,16): 16x16x2 + 8x8x6 = 896 anchors.
Back (256 px, strides 16,32,32,32): 16x16x2 + 8x8x6 = 896 anchors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SsdAnchorOptions", "FRONT_ANCHORS", "BACK_ANCHORS", "ssd_anchors"]


@dataclass(frozen=True)
class SsdAnchorOptions:
    """The fields of MediaPipe's ``SsdAnchorsCalculatorOptions`` that BlazeFace uses (same defaults)."""

    input_size_width: int
    input_size_height: int
    num_layers: int
    strides: tuple[int, ...]
    min_scale: float
    max_scale: float
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    aspect_ratios: tuple[float, ...] = (1.0,)
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False


# mediapipe/modules/face_detection/face_detection_short_range.pbtxt + face_detection.pbtxt
# (and the tasks FaceDetectorGraph, which hard-codes the same values).
FRONT_ANCHORS = SsdAnchorOptions(
    input_size_width=128, input_size_height=128, num_layers=4, strides=(8, 16, 16, 16),
    min_scale=0.1484375, max_scale=0.75, fixed_anchor_size=True,
)
# mediapipe/graphs/face_detection/face_detection_back_desktop_live.pbtxt (MediaPipe <= 0.7).
BACK_ANCHORS = SsdAnchorOptions(
    input_size_width=256, input_size_height=256, num_layers=4, strides=(16, 32, 32, 32),
    min_scale=0.15625, max_scale=0.75, fixed_anchor_size=True,
)


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1.0)


def ssd_anchors(opts: SsdAnchorOptions) -> np.ndarray:
    """Anchors as an ``(N, 4)`` float32 array of ``(x_center, y_center, w, h)``, normalised to [0, 1].

    The order is MediaPipe's: merged layer, then row, then column, then anchor within the cell,
    which is also the order of the model's reshaped NHWC head outputs.
    """
    if len(opts.strides) != opts.num_layers:
        raise ValueError(f"{len(opts.strides)} strides given for {opts.num_layers} layers")
    out: list[tuple[float, float, float, float]] = []
    layer = 0
    n = len(opts.strides)
    while layer < opts.num_layers:
        heights: list[float] = []
        widths: list[float] = []
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < n and opts.strides[last] == opts.strides[layer]:
            scale = _scale(opts.min_scale, opts.max_scale, last, n)
            if last == 0 and opts.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for r in opts.aspect_ratios:
                    ratios.append(r)
                    scales.append(scale)
                if opts.interpolated_scale_aspect_ratio > 0.0:
                    nxt = 1.0 if last == n - 1 else _scale(opts.min_scale, opts.max_scale, last + 1, n)
                    scales.append(math.sqrt(scale * nxt))
                    ratios.append(opts.interpolated_scale_aspect_ratio)
            last += 1
        for r, s in zip(ratios, scales):
            heights.append(s / math.sqrt(r))
            widths.append(s * math.sqrt(r))
        stride = opts.strides[layer]
        fh = math.ceil(opts.input_size_height / stride)
        fw = math.ceil(opts.input_size_width / stride)
        for y in range(fh):
            for x in range(fw):
                for k in range(len(heights)):
                    xc = (x + opts.anchor_offset_x) / fw
                    yc = (y + opts.anchor_offset_y) / fh
                    if opts.fixed_anchor_size:
                        out.append((xc, yc, 1.0, 1.0))
                    else:
                        out.append((xc, yc, widths[k], heights[k]))
        layer = last
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)

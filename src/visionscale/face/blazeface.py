"""BlazeFace networks: MediaPipe's front/short-range (128 px) and back (256 px) detectors and
the paper's network (Table 1), from the blocks in :mod:`visionscale.face.blocks`.

Bazarevsky, Kartynnik, Vakunov, Raveendran, Grundmann, "BlazeFace: Sub-millisecond Neural
Face Detection on Mobile GPUs", CVPR Workshop on Computer Vision for AR/VR, 2019
(arXiv:1907.05047). Seed 002 (Li et al.) reprints Table 1; where it lists the first
convolution's kernel as "128x128x3x24" we follow the paper: 5x5x3x24 with stride 2.

All variants end in two SSD heads: 2 anchors per cell on the 16x16 map and 6 on the 8x8 map
(896 anchors), each anchor with one logit and 16 regression values (box x, y, w, h and six
keypoints x, y). ``forward`` takes ``(B, 3, S, S)`` in [-1, 1] (MediaPipe's input range) and
returns ``regressors (B, 896, 16)`` and ``classificators (B, 896, 1)`` in the TFLite files'
order (NHWC reshape, first map first).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from visionscale.components import Component, State
from visionscale.errors import InvalidValueError
from visionscale.face.anchors import BACK_ANCHORS, FRONT_ANCHORS, SsdAnchorOptions, ssd_anchors
from visionscale.face.blocks import BlazeBlock, SameConv2d, SeparableConv, conv_layers
from visionscale.face.decode import DecodeOptions, decode_tensors
from visionscale.face.blazeface_weights import WEIGHTS, BlazeFaceWeights  # noqa: F401 - re-exported
from visionscale.modelinfo import ModelInfo
from visionscale.registry import register_model

__all__ = [
    "BlockSpec", "BlazeFaceConfig", "BlazeFace", "BlazeFaceWeights", "VARIANTS", "WEIGHTS", "config_for",
    "blazeface_front", "blazeface_back", "blazeface_paper", "blazeface_tiny",
]


@dataclass(frozen=True)
class BlockSpec:
    """One stage element: a BlazeBlock (``mid_ch`` set: double) or a plain separable conv."""

    out_ch: int
    stride: int = 1
    mid_ch: int | None = None
    separable: bool = False


@dataclass(frozen=True)
class BlazeFaceConfig:
    """Architecture, anchors and decoding of one BlazeFace variant.

    Attributes:
        name: Variant name (``front``, ``back``, ``paper``, ``tiny``).
        input_size: Square input side in pixels.
        blocks: Blocks after the stem, in order.
        tap: Index in ``blocks`` whose output feeds the first (16x16) head; the last block
            feeds the second (8x8) head.
        stem_channels: Output channels of the 5x5 stride-2 stem convolution.
        kernel: Depthwise kernel size in the blocks (3 in MediaPipe's files, 5 in the paper).
        anchors_per_cell: Anchors per cell on the two head maps.
        anchors: SSD anchor options (MediaPipe's calculator options).
        decode: Decoding options (scales, keypoints, score clipping, default min score).
    """

    name: str
    input_size: int
    blocks: tuple[BlockSpec, ...]
    tap: int
    anchors: SsdAnchorOptions
    decode: DecodeOptions
    stem_channels: int = 24
    stem_kernel: int = 5
    kernel: int = 3
    anchors_per_cell: tuple[int, int] = (2, 6)


def _front_blocks() -> tuple[BlockSpec, ...]:
    return (BlockSpec(24), BlockSpec(28), BlockSpec(32, 2), BlockSpec(36), BlockSpec(42), BlockSpec(48, 2),
            BlockSpec(56), BlockSpec(64), BlockSpec(72), BlockSpec(80), BlockSpec(88),  # tap: 16x16x88
            BlockSpec(96, 2), BlockSpec(96), BlockSpec(96), BlockSpec(96), BlockSpec(96))


def _back_blocks() -> tuple[BlockSpec, ...]:
    b = [BlockSpec(24)] * 7 + [BlockSpec(24, 2)] + [BlockSpec(24)] * 7 + [BlockSpec(48, 2)] + [BlockSpec(48)] * 7
    b += [BlockSpec(96, 2)] + [BlockSpec(96)] * 7  # tap: 16x16x96
    return tuple(b) + (BlockSpec(96, 2, separable=True),)


def _paper_blocks() -> tuple[BlockSpec, ...]:
    # Table 1: 5 single blocks (24, 24, 48/s2, 48, 48) then 6 double blocks 96 (24 inside),
    # stride 2 at the first and the fourth double block.
    singles = (BlockSpec(24), BlockSpec(24), BlockSpec(48, 2), BlockSpec(48), BlockSpec(48))
    doubles = tuple(BlockSpec(96, 2 if i in (0, 3) else 1, mid_ch=24) for i in range(6))
    return singles + doubles


FRONT_DECODE = DecodeOptions(x_scale=128.0, y_scale=128.0, w_scale=128.0, h_scale=128.0, min_score_thresh=0.5)
BACK_DECODE = DecodeOptions(x_scale=256.0, y_scale=256.0, w_scale=256.0, h_scale=256.0, min_score_thresh=0.65)

VARIANTS: dict[str, BlazeFaceConfig] = {
    "front": BlazeFaceConfig("front", 128, _front_blocks(), tap=10, anchors=FRONT_ANCHORS, decode=FRONT_DECODE),
    "back": BlazeFaceConfig("back", 256, _back_blocks(), tap=30, anchors=BACK_ANCHORS, decode=BACK_DECODE),
    "paper": BlazeFaceConfig("paper", 128, _paper_blocks(), tap=7, anchors=FRONT_ANCHORS, decode=FRONT_DECODE, kernel=5),
    "tiny": BlazeFaceConfig("tiny", 128, (BlockSpec(8), BlockSpec(12, 2), BlockSpec(16, 2), BlockSpec(16, 2)), tap=2,
                            anchors=FRONT_ANCHORS, decode=FRONT_DECODE, stem_channels=8),
}
# "short" (MediaPipe's short-range model) is the front model: same graph, byte-identical file.
_ALIASES = {"short": "front", "short_range": "front", "front": "front", "back": "back", "paper": "paper", "tiny": "tiny"}

def config_for(model: str) -> BlazeFaceConfig:
    """The config of a variant name or alias (``front``/``short``, ``back``, ``paper``, ``tiny``)."""
    key = _ALIASES.get(model.lower())
    if key is None:
        raise InvalidValueError(f"unknown BlazeFace model {model!r}; choose one of {sorted(_ALIASES)}").about("model")
    return VARIANTS[key]


class BlazeFace(nn.Module):
    """BlazeFace backbone and SSD heads; see the module docstring for inputs and outputs."""

    def __init__(self, config: BlazeFaceConfig) -> None:
        super().__init__()
        self.config = config
        c = config.stem_channels
        self.stem = SameConv2d(3, c, config.stem_kernel, 2)
        blocks: list[nn.Module] = []
        channels = []
        for spec in config.blocks:
            if spec.separable:
                blocks.append(SeparableConv(c, spec.out_ch, config.kernel, spec.stride))
            else:
                blocks.append(BlazeBlock(c, spec.out_ch, config.kernel, spec.stride, spec.mid_ch))
            c = spec.out_ch
            channels.append(c)
        self.stage1 = nn.Sequential(*blocks[: config.tap + 1])  # -> 16x16 map
        self.stage2 = nn.Sequential(*blocks[config.tap + 1 :])  # -> 8x8 map
        c1, c2 = channels[config.tap], channels[-1]
        a1, a2 = config.anchors_per_cell
        self.num_coords = 4 + 2 * config.decode.num_keypoints
        self.cls1 = nn.Conv2d(c1, a1, 1)
        self.cls2 = nn.Conv2d(c2, a2, 1)
        self.reg1 = nn.Conv2d(c1, a1 * self.num_coords, 1)
        self.reg2 = nn.Conv2d(c2, a2 * self.num_coords, 1)
        self.register_buffer("anchors", torch.from_numpy(ssd_anchors(config.anchors)), persistent=False)
        # Anchors are generated for the fixed input size (128 front, 256 back): no other size
        # is meaningful, and with symbolic H/W torch.export's shape solver did not finish on the
        # head reshapes within 10 minutes. Input in [-1, 1].
        side = config.input_size
        self.model_info = ModelInfo(input_size=(side, side), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                    dynamic_axes=(0,))

    def validate_input_size(self, h: int, w: int) -> None:
        """Raise InvalidValueError unless ``h x w`` is the size the anchors were generated for."""
        side = self.config.input_size
        if (h, w) != (side, side):
            name = f"{type(self).__name__}[{self.config.name}]"
            raise InvalidValueError(f"{name} runs at {side}x{side} only (its anchors are generated for that size), "
                                    f"got {h}x{w}").about("image_size")

    def for_export(self, batch: int, height: int, width: int) -> tuple[nn.Module, None]:
        """The module a graph export holds: :class:`~visionscale.face.blazeface_graph.BlazeFaceGraph`,
        the same function laid out for ONNX Runtime's CPU kernels (no note: the batch stays dynamic)."""
        from visionscale.face.blazeface_graph import BlazeFaceGraph

        return BlazeFaceGraph(self), None

    def tflite_conv_order(self) -> list[nn.Conv2d]:
        """Convolutions in the order MediaPipe's TFLite graphs execute them."""
        convs: list[nn.Conv2d] = [self.stem]
        for block in list(self.stage1) + list(self.stage2):
            convs += conv_layers(block)
        return convs + [self.cls1, self.cls2, self.reg1, self.reg2]

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, S, S)`` -> the 16x16 and 8x8 feature maps (for S = 128 front / 256 back)."""
        f1 = self.stage1(torch.relu(self.stem(x)))
        return f1, self.stage2(f1)

    def heads(self, f1: Tensor, f2: Tensor) -> tuple[Tensor, Tensor]:
        b = f1.shape[0]

        def flat(t: Tensor, width: int) -> Tensor:
            return t.permute(0, 2, 3, 1).reshape(b, -1, width)  # NHWC order, as TFLite's RESHAPE

        reg = torch.cat([flat(self.reg1(f1), self.num_coords), flat(self.reg2(f2), self.num_coords)], 1)
        cls = torch.cat([flat(self.cls1(f1), 1), flat(self.cls2(f2), 1)], 1)
        if reg.shape[1] != self.anchors.shape[0]:
            raise ValueError(f"{type(self).__name__}[{self.config.name}] made {reg.shape[1]} predictions for "
                             f"{self.anchors.shape[0]} anchors: input must be {self.config.input_size}x{self.config.input_size}")
        return reg, cls

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, S, S)`` in [-1, 1] -> ``regressors (B, N, 16)``, ``classificators (B, N, 1)``."""
        return self.heads(*self.features(x))

    def components(self) -> list[Component]:
        """Backbone (stem + blocks), SSD heads, anchor decoding; in execution order (CONVENTIONS §11)."""

        def backbone(s: State) -> State:
            f1, f2 = self.features(s["image"])
            return {"f16": f1, "f8": f2}

        def head(s: State) -> State:
            reg, cls = self.heads(s["f16"], s["f8"])
            return {"regressors": reg, "classificators": cls}

        def decode(s: State) -> State:
            boxes, kps, scores = decode_tensors(s["regressors"], s["classificators"], self.anchors, self.config.decode)
            return {"boxes": boxes, "keypoints": kps, "scores": scores}

        heads = nn.ModuleList([self.cls1, self.cls2, self.reg1, self.reg2])
        return [Component("backbone", nn.ModuleList([self.stem, self.stage1, self.stage2]), backbone),
                Component("head", heads, head), Component("decode", _NoParams(), decode)]


class _NoParams(nn.Module):
    """Stands for a parameter-free component (anchor decoding)."""


def _build(variant: str, weights: str | None, **kwargs) -> BlazeFace:
    config = VARIANTS[variant]
    if kwargs:
        config = replace(config, **kwargs)
    net = BlazeFace(config)
    if weights is not None:
        from visionscale.face.tflite_import import load_weights

        load_weights(net, weights)
    return net.eval()


@register_model()
def blazeface_front(weights: str | None = None, **kwargs) -> BlazeFace:
    """MediaPipe's front-camera / short-range BlazeFace (128 px, 3x3 depthwise, single blocks).

    ``weights``: None (random), ``"mediapipe"`` (find the released .tflite), or a .tflite /
    .safetensors path.
    """
    return _build("front", weights, **kwargs)


@register_model()
def blazeface_back(weights: str | None = None, **kwargs) -> BlazeFace:
    """MediaPipe's back-camera BlazeFace (256 px, 31 single blocks and a separable conv)."""
    return _build("back", weights, **kwargs)


@register_model()
def blazeface_paper(weights: str | None = None, **kwargs) -> BlazeFace:
    """The paper's BlazeFace (Table 1: 5x5 depthwise, 5 single and 6 double BlazeBlocks), for training."""
    return _build("paper", weights, **kwargs)


@register_model()
def blazeface_tiny(weights: str | None = None, **kwargs) -> BlazeFace:
    """A few-thousand-parameter BlazeFace for CPU tests (same anchors and heads as front)."""
    return _build("tiny", weights, **kwargs)


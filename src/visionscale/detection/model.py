"""A minimal anchor-based single-stage detector: ResNet -> small FPN -> shared conv head.

Design after RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017;
official code: github.com/facebookresearch/Detectron), which is also the detector EAPM's
paper (Wu et al., ICASSP 2022) reports on: levels P3-P5 (strides 8, 16, 32), A = octave
scales x aspect ratios anchors per cell, one sigmoid logit per class and anchor, four
Faster R-CNN box deltas per anchor, classification bias initialised to the prior 0.01.
Smaller than RetinaNet on purpose (no P6/P7, fewer head convs) so that it trains in CPU
minutes; ``ssd_tiny`` is the CPU-test variant, ``ssd_resnet18`` a real-size one.

Inputs are RGB images scaled to [0, 1]; the ImageNet normalisation happens inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.components import Component, State, run_components
from visionscale.errors import InvalidValueError
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD, ModelInfo
from visionscale.nn.resnet import ResNet, ResNetConfig, resnet18
from visionscale.registry import register_model

__all__ = ["DetectorConfig", "SingleStageDetector", "ssd_tiny", "ssd_resnet18"]

_LEVELS = ("layer2", "layer3", "layer4")  # strides 8, 16, 32


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of a :class:`SingleStageDetector`.

    Attributes:
        num_classes: Foreground classes (no background logit: sigmoid per class).
        backbone: ResNet architecture; its ``layer2..layer4`` feed the FPN.
        fpn_channels: Channels of P3-P5 and of the head.
        head_convs: 3x3 conv + ReLU layers in each head tower (RetinaNet: 4).
        anchor_scale: Base anchor side = anchor_scale x stride (RetinaNet: 4).
        octave_scales: Extra anchor scales per level (RetinaNet: 2^0, 2^(1/3), 2^(2/3)).
        aspect_ratios: Anchor height / width ratios.
        prior_prob: Initial foreground probability (RetinaNet: 0.01), so that the
            many easy negatives do not swamp the first iterations.
    """

    num_classes: int = 1
    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(block="basic", layers=(2, 2, 2, 2), num_classes=0))
    fpn_channels: int = 128
    head_convs: int = 2
    anchor_scale: float = 4.0
    octave_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    prior_prob: float = 0.01

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise InvalidValueError(f"num_classes must be >= 1, got {self.num_classes}").about("num_classes")
        if not 0 < self.prior_prob < 1:
            raise InvalidValueError(f"prior_prob must be in (0, 1), got {self.prior_prob}").about("prior_prob")
        if not self.octave_scales or not self.aspect_ratios:
            raise InvalidValueError("need at least one octave scale and one aspect ratio").about(
                "octave_scales", "aspect_ratios")

    @property
    def anchors_per_cell(self) -> int:
        return len(self.octave_scales) * len(self.aspect_ratios)


class FPN(nn.Module):
    """Top-down feature pyramid (Lin et al., CVPR 2017) over C3-C5 -> P3-P5."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]  # (B, F, H_l, W_l)
        for i in range(len(lat) - 2, -1, -1):  # coarse to fine
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.smooth, lat)]


class Head(nn.Module):
    """Classification and box towers shared across pyramid levels."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, n_convs: int, prior_prob: float) -> None:
        super().__init__()

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.num_classes = num_classes
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_out = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # sigmoid(bias) = prior_prob at the start (RetinaNet Sec. 4.1)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        cls, box = [], []
        for x in feats:
            b, _, h, w = x.shape
            # (B, A*C, H, W) -> (B, H, W, A*C) -> (B, H*W*A, C): anchor order (y, x, a)
            cls.append(self.cls_out(self.cls_tower(x)).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes))
            box.append(self.box_out(self.box_tower(x)).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(cls, 1), torch.cat(box, 1)  # (B, N, C), (B, N, 4)


class SingleStageDetector(nn.Module):
    """Anchor-based single-stage detector.

    ``forward(images)`` returns raw ``(cls_logits (B, N, C), box_deltas (B, N, 4))``;
    ``anchors(h, w)`` gives the N matching anchors ``(N, 4)`` xyxy in pixels. Decoding and
    NMS live in :mod:`visionscale.detection.boxes` so that this file stays a pure model.
    """

    def __init__(self, config: DetectorConfig | None = None, backbone: ResNet | None = None) -> None:
        super().__init__()
        cfg = config or DetectorConfig()
        self.config = cfg
        self.backbone = backbone if backbone is not None else ResNet(cfg.backbone)
        self.strides = tuple(self.backbone.strides[name] for name in _LEVELS)
        self.fpn = FPN(tuple(self.backbone.channels[name] for name in _LEVELS), cfg.fpn_channels)
        self.head = Head(cfg.fpn_channels, cfg.anchors_per_cell, cfg.num_classes, cfg.head_convs, cfg.prior_prob)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Takes [0, 1] images (normalised inside) at any size; a loaded checkpoint gets the
        # size it was trained at (deploy.checkpoints).
        self.model_info = ModelInfo(input_size=(256, 256))
        self._anchor_cache: dict[tuple, Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def components(self) -> list[Component]:
        """Backbone (normalisation + ResNet C3-C5), FPN, head; in execution order."""

        def backbone(s: State) -> State:
            x = (s["image"] - self.mean) / self.std
            return self.backbone.features(x, layers=_LEVELS)

        def fpn(s: State) -> State:
            return dict(zip(("p3", "p4", "p5"), self.fpn([s[name] for name in _LEVELS])))

        def head(s: State) -> State:
            cls, box = self.head([s["p3"], s["p4"], s["p5"]])
            return {"cls_logits": cls, "box_deltas": box}

        return [Component("backbone", self.backbone, backbone), Component("fpn", self.fpn, fpn),
                Component("head", self.head, head)]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> cls_logits (B, N, C), box_deltas (B, N, 4)."""
        state = run_components(self.components(), images)
        return state["cls_logits"], state["box_deltas"]

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        # Every stride-2 conv/pool in the ResNet has padding k//2, so each halves with ceil.
        return [(-(-height // s), -(-width // s)) for s in self.strides]

    def anchors(self, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
        """Anchors for an input of ``height x width``: (N, 4) xyxy pixels, in the head's order."""
        device = torch.device(device) if device is not None else self.mean.device
        key = (height, width, str(device))
        if key not in self._anchor_cache:
            cfg = self.config
            out = []
            for stride, (fh, fw) in zip(self.strides, self.feature_sizes(height, width)):
                # (A, 2) anchor (w, h) per cell, octave-major then ratio (h / w)
                wh = torch.tensor(
                    [[cfg.anchor_scale * stride * o / math.sqrt(r), cfg.anchor_scale * stride * o * math.sqrt(r)]
                     for o in cfg.octave_scales for r in cfg.aspect_ratios]
                )
                ys, xs = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
                ctr = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 1, 2).float()  # (HW, 1, 2)
                boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], -1)  # (HW, A, 4)
                out.append(boxes.reshape(-1, 4))
            self._anchor_cache[key] = torch.cat(out).to(device)
        return self._anchor_cache[key]


def _factory_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    kwargs.pop("image_size", None)  # accepted for the profiler; any size works
    return kwargs


@register_model()
def ssd_tiny(num_classes: int = 1, **kwargs) -> SingleStageDetector:
    """Tiny detector for CPU tests and the demo benchmark: ResNet BasicBlock x [1,1,1,1],
    stages 16/32/64/128 channels, FPN 32, 1-conv towers, anchors 2x stride."""
    kw = _factory_kwargs(kwargs)
    kw.setdefault("backbone", ResNetConfig(block="basic", layers=(1, 1, 1, 1), stem_width=16, base_width=16, num_classes=0))
    kw.setdefault("fpn_channels", 32)
    kw.setdefault("head_convs", 1)
    kw.setdefault("anchor_scale", 2.0)
    return SingleStageDetector(DetectorConfig(num_classes=num_classes, **kw))


@register_model()
def ssd_resnet18(num_classes: int = 1, backbone_weights=None, **kwargs) -> SingleStageDetector:
    """ResNet-18 detector (FPN 128, 2-conv towers, RetinaNet anchors).

    Args:
        backbone_weights: None (random init), "DEFAULT" (ImageNet) or a file path; see
            :func:`visionscale.nn.resnet.resnet18`.
    """
    kw = _factory_kwargs(kwargs)
    net = resnet18(weights=backbone_weights, num_classes=0)
    return SingleStageDetector(DetectorConfig(num_classes=num_classes, backbone=net.config, **kw), backbone=net)

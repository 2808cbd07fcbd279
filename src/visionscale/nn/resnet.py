"""ResNet and Wide-ResNet backbones whose state dicts match torchvision's exactly.

Papers: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385; official code: github.com/KaimingHe/deep-residual-networks).
Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146; official
code: github.com/szagoruyko/wide-residual-networks).

Parameter names, shapes and initialisation follow torchvision's ``models/resnet.py``
(github.com/pytorch/vision) so its published ImageNet checkpoints load with
``strict=True``. Like torchvision ("ResNet v1.5"), a bottleneck's stride sits on its 3x3
conv, not on the first 1x1 as in the original Caffe models. Wide-ResNet-50/101-2 are
ResNet-50/101 with twice the bottleneck inner width (``width_per_group=128``).

``features(x, layers=("layer2", "layer3"))`` returns named intermediate maps and stops
after the deepest one asked for, which is what PatchCore, EfficientAD and DDAD need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from visionscale.components import Component, State
from visionscale.errors import InvalidValueError
from visionscale.io.weights import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIX,
    WeightsSpec,
    download_to_cache,
    load_into,
    load_state_dict,
)
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD, imagenet
from visionscale.registry import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetConfig",
    "RESNET_WEIGHTS",
    "DEFAULT_WEIGHTS",
    "STAGES",
    "get_weights_spec",
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnet_tiny",
]

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
WeightsArg = str | os.PathLike | WeightsSpec | None


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Output channels = ``planes``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 (use Bottleneck for wide nets)")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # None is not registered, so no keys appear for it

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place on `out`, never on the caller's `x`
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand. Output channels = 4 * ``planes``."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        # Inner width: planes for ResNet, 2 * planes for Wide-ResNet-x-2 (torchvision's formula).
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a ResNet.

    Attributes:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50+, Wide-ResNet).
        layers: Blocks per stage ``layer1..layer4``.
        num_classes: Size of the ``fc`` head; 0 drops it (``forward`` returns pooled features).
        width_per_group: Bottleneck inner width per group at 64 planes; 128 = Wide-ResNet-x-2.
        groups: Grouped 3x3 convs (ResNeXt); 1 for ResNet/Wide-ResNet.
        stem_width: Output channels of ``conv1`` (64 in torchvision; small for tiny nets).
        base_width: ``planes`` of ``layer1``; doubles per stage (64 in torchvision).
        zero_init_residual: Zero the last BN of each block (torchvision option, off by default).
    """

    block: Literal["basic", "bottleneck"] = "bottleneck"
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    num_classes: int = 1000
    width_per_group: int = 64
    groups: int = 1
    stem_width: int = 64
    base_width: int = 64
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        if self.block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
        if len(self.layers) != 4 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"layers must be 4 positive block counts, got {self.layers!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 drops the fc head), got {self.num_classes}")
        for name in ("width_per_group", "groups", "stem_width", "base_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ResNet(nn.Module):
    """ResNet / Wide-ResNet with torchvision's module names.

    Attributes:
        config: The architecture.
        channels: Output channels per stage, e.g. ``{"stem": 64, "layer1": 256, ...}``.
        strides: Output stride per stage relative to the input, ``stem``/``layer1`` = 4 ... ``layer4`` = 32.
        weights_spec: Metadata of the loaded pretrained weights, or None.
    """

    def __init__(self, config: ResNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or ResNetConfig()
        self.config = cfg
        self.weights_spec: WeightsSpec | None = None
        self.model_info = imagenet(input_size=(224, 224))  # torchvision's weights' size
        block = _BLOCKS[cfg.block]

        # Stem: 7x7/2 conv + 3x3/2 max pool -> stride 4.
        self.conv1 = nn.Conv2d(3, cfg.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = cfg.stem_width
        self.channels: dict[str, int] = {"stem": cfg.stem_width}
        self.strides: dict[str, int] = {"stem": 4}
        for i, n_blocks in enumerate(cfg.layers):
            planes = cfg.base_width * 2**i
            stride = 1 if i == 0 else 2
            layer, inplanes = self._make_layer(block, inplanes, planes, int(n_blocks), stride)
            self.add_module(f"layer{i + 1}", layer)
            self.channels[f"layer{i + 1}"] = inplanes
            self.strides[f"layer{i + 1}"] = 4 * 2**i

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # Identity keeps forward() meaningful without a head and adds no state-dict keys.
        self.fc: nn.Module = nn.Linear(inplanes, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.num_features = inplanes
        self._init_weights()

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, n_blocks: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        cfg = self.config
        out = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            # Projection shortcut; torchvision names it downsample.0 (conv) / downsample.1 (bn).
            downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
        blocks = [block(inplanes, planes, stride, downsample, cfg.groups, cfg.width_per_group)]
        blocks += [block(out, planes, 1, None, cfg.groups, cfg.width_per_group) for _ in range(1, n_blocks)]
        return nn.Sequential(*blocks), out

    def _init_weights(self) -> None:
        # torchvision's init: He normal (fan_out) for convs, BN = identity; Linear keeps
        # PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if self.config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def stem(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, stem_width, ~H/4, ~W/4)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def head(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or pooled (B, C) when num_classes=0."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def features(self, x: Tensor, layers: str | tuple[str, ...] | list[str] = STAGES[1:]) -> dict[str, Tensor]:
        """Intermediate feature maps by name, in execution order.

        Args:
            x: Images (B, 3, H, W), normalised like the weights expect.
            layers: Names from ``"stem", "layer1" .. "layer4"``. Stages after the deepest
                one requested are not run.

        Returns:
            ``{name: (B, channels[name], ceil(H / strides[name]), ...)}``.
        """
        wanted = (layers,) if isinstance(layers, str) else tuple(layers)
        unknown = [n for n in wanted if n not in STAGES]
        if unknown or not wanted:
            raise ValueError(f"layers must be a non-empty subset of {STAGES}, got {wanted!r}")
        last = max(STAGES.index(n) for n in wanted)
        out: dict[str, Tensor] = {}
        for name in STAGES[: last + 1]:
            x = self.stem(x) if name == "stem" else self.get_submodule(name)(x)
            if name in wanted:
                out[name] = x
        return out

    def forward(self, x: Tensor) -> Tensor:
        # A plain chain (not run_components) so each stage's input can be freed as soon
        # as the next stage has consumed it; components() gives the same result.
        x = self.stem(x)  # (B, stem_width, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C4, H/32, W/32)
        return self.head(x)

    def components(self) -> list[Component]:
        """Stem, the four stages and the head, in execution order."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)  # not registered: no new keys
        head = nn.Sequential(self.avgpool, nn.Flatten(1), self.fc)
        parts = [Component("stem", stem, lambda s: {"stem": stem(s["image"])})]
        prev = "stem"
        for i in range(1, 5):
            name, src = f"layer{i}", prev
            layer = self.get_submodule(name)
            parts.append(Component(name, layer, _stage_run(layer, src, name)))
            prev = name
        parts.append(Component("head", head, lambda s: {"output": head(s["layer4"])}))
        return parts


def _stage_run(module: nn.Module, src: str, dst: str):
    def run(state: State) -> State:
        return {dst: module(state[src])}

    return run


# ----------------------------------------------------------------------------------------
# Published torchvision weights (torchvision/models/resnet.py, *_Weights enums).



def _tv(name: str, filename: str, num_params: int, resize_size: int) -> WeightsSpec:
    # torchvision file names end in "-<sha256 prefix>.pth".
    prefix = filename.rsplit("-", 1)[1].split(".", 1)[0]
    return WeightsSpec(
        name=name,
        url=f"https://download.pytorch.org/models/{filename}",
        num_params=num_params,
        input_size=(224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license="BSD-3-Clause",
        sha256_prefix=prefix,
        # V1 recipes evaluate resize 256 -> crop 224, the V2 ("new recipe") ones 232 -> 224.
        resize_size=resize_size,
    )


RESNET_WEIGHTS: dict[str, dict[str, WeightsSpec]] = {
    "resnet18": {
        "IMAGENET1K_V1": _tv("IMAGENET1K_V1", "resnet18-f37072fd.pth", 11_689_512, 256),
    },
    "resnet50": {
        "IMAGENET1K_V1": _tv("IMAGENET1K_V1", "resnet50-0676ba61.pth", 25_557_032, 256),
        "IMAGENET1K_V2": _tv("IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 25_557_032, 232),
    },
    "wide_resnet50_2": {
        "IMAGENET1K_V1": _tv("IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth", 68_883_240, 256),
        "IMAGENET1K_V2": _tv("IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth", 68_883_240, 232),
    },
    "wide_resnet101_2": {
        "IMAGENET1K_V1": _tv("IMAGENET1K_V1", "wide_resnet101_2-32ee1156.pth", 126_886_696, 256),
        "IMAGENET1K_V2": _tv("IMAGENET1K_V2", "wide_resnet101_2-d733dc28.pth", 126_886_696, 232),
    },
}
# What "DEFAULT" means, as in torchvision. Note: PatchCore-style papers used the V1
# weights of wide_resnet50_2; ask for "IMAGENET1K_V1" explicitly to reproduce them.
DEFAULT_WEIGHTS = {
    "resnet18": "IMAGENET1K_V1",
    "resnet50": "IMAGENET1K_V2",
    "wide_resnet50_2": "IMAGENET1K_V2",
    "wide_resnet101_2": "IMAGENET1K_V2",
}


def get_weights_spec(arch: str, name: str = "DEFAULT") -> WeightsSpec:
    """Metadata of published weights, e.g. ``get_weights_spec("wide_resnet50_2", "IMAGENET1K_V1")``."""
    table = RESNET_WEIGHTS.get(arch, {})
    key = DEFAULT_WEIGHTS.get(arch) if name == "DEFAULT" else name
    if key not in table:
        known = ", ".join(["DEFAULT", *table]) if table else "none"
        raise InvalidValueError(f"{arch} has no published weights named {name!r} (known: {known})").about("weights")
    return table[key]


def _resolve_weights(arch: str, weights: WeightsArg) -> tuple[WeightsSpec | None, Path | None]:
    """Map the ``weights`` argument to published weights or a local file."""
    if weights is None:
        return None, None
    if isinstance(weights, bool):
        raise TypeError(f"weights must be None, 'DEFAULT', a weights name or a file path, got {weights!r}")
    if isinstance(weights, WeightsSpec):
        return weights, None
    text = os.fspath(weights)
    if text == "DEFAULT" or text in RESNET_WEIGHTS.get(arch, {}):
        return get_weights_spec(arch, text), None
    p = Path(text).expanduser()
    looks_like_path = p.suffix.lower() in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES) or os.sep in text or p.exists()
    if looks_like_path or not isinstance(weights, str):
        return None, p  # load_state_dict raises FileNotFoundError if it is missing
    names = ", ".join(["DEFAULT", *RESNET_WEIGHTS.get(arch, {})]) if arch in RESNET_WEIGHTS else "none published"
    raise InvalidValueError(
        f"unknown weights {text!r} for {arch}: pass None (random init), a weights name ({names}) "
        f"or a path to a .pth/.pt/.bin/.safetensors file"
    ).about("weights")


def _build(arch: str, weights: WeightsArg, progress: bool, fixed: dict, kwargs: dict) -> ResNet:
    kwargs = dict(kwargs)
    # Accepted so the profiler can build any registered model per resolution; a ResNet
    # takes any input size, so it is ignored.
    kwargs.pop("image_size", None)
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{arch} fixes {key}={value!r}, got {kwargs[key]!r}")
        kwargs[key] = value
    spec, path = _resolve_weights(arch, weights)
    cfg = ResNetConfig(**kwargs)
    if spec is not None and cfg.num_classes not in (0, 1000):
        raise ValueError(
            f"{arch} weights {spec.name} have a 1000-class ImageNet head; "
            f"pass num_classes=1000, or 0 to drop the head, got {cfg.num_classes}"
        )
    net = ResNet(cfg)
    if spec is None and path is None:
        return net
    file = download_to_cache(spec.url, spec.sha256_prefix, progress=progress) if spec is not None else path
    state = load_state_dict(file)
    if cfg.num_classes == 0:
        # The only tolerated difference: a headless net ignores the checkpoint's fc.
        state = {k: v for k, v in state.items() if k not in ("fc.weight", "fc.bias")}
    load_into(net, state, source=str(file))
    net.weights_spec = spec
    return net


@register_model()
def resnet18(weights: WeightsArg = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]; stages 64/128/256/512 channels.

    Args:
        weights: None (random init), ``"DEFAULT"``/``"IMAGENET1K_V1"``, or a file path.
        progress: Show a download progress bar.
        **kwargs: :class:`ResNetConfig` fields (``num_classes``...); ``image_size`` is ignored.
    """
    return _build("resnet18", weights, progress, {"block": "basic", "layers": (2, 2, 2, 2)}, kwargs)


@register_model()
def resnet50(weights: WeightsArg = None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]; stages 256/512/1024/2048 channels.

    Args:
        weights: None, ``"DEFAULT"`` (= V2), ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` or a path.
        progress: Show a download progress bar.
        **kwargs: :class:`ResNetConfig` fields; ``image_size`` is ignored.
    """
    return _build("resnet50", weights, progress, {"block": "bottleneck", "layers": (3, 4, 6, 3)}, kwargs)


@register_model()
def wide_resnet50_2(weights: WeightsArg = None, progress: bool = True, **kwargs) -> ResNet:
    """Wide-ResNet-50-2: ResNet-50 with 2x bottleneck inner width (PatchCore's backbone).

    Args:
        weights: None, ``"DEFAULT"`` (= V2), ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` or a path.
        progress: Show a download progress bar.
        **kwargs: :class:`ResNetConfig` fields; ``image_size`` is ignored.
    """
    fixed = {"block": "bottleneck", "layers": (3, 4, 6, 3), "width_per_group": 128}
    return _build("wide_resnet50_2", weights, progress, fixed, kwargs)


@register_model()
def wide_resnet101_2(weights: WeightsArg = None, progress: bool = True, **kwargs) -> ResNet:
    """Wide-ResNet-101-2: Bottleneck x [3, 4, 23, 3] with 2x inner width.

    Args:
        weights: None, ``"DEFAULT"`` (= V2), ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` or a path.
        progress: Show a download progress bar.
        **kwargs: :class:`ResNetConfig` fields; ``image_size`` is ignored.
    """
    fixed = {"block": "bottleneck", "layers": (3, 4, 23, 3), "width_per_group": 128}
    return _build("wide_resnet101_2", weights, progress, fixed, kwargs)


@register_model()
def resnet_tiny(weights: WeightsArg = None, progress: bool = True, **kwargs) -> ResNet:
    """Tiny ResNet for CPU tests: BasicBlock x [1, 1, 1, 1], stem 8, stages 8/16/32/64.

    Same code as the real nets; no published weights (``weights`` may be a file path).
    """
    kwargs.setdefault("stem_width", 8)
    kwargs.setdefault("base_width", 8)
    return _build("resnet_tiny", weights, progress, {"block": "basic", "layers": (1, 1, 1, 1)}, kwargs)

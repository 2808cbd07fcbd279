"""Image classifier: a registry backbone without its head, global pooling, a linear layer.

Transfer learning as in seed 004 ("Using Pre-trained Models"): the backbone's
convolutional features are reused and only a new linear head is trained for the new
classes, then optionally the whole net is fine-tuned at a lower learning rate.

Backbone paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016 (arXiv:1512.03385; official code: github.com/KaimingHe/deep-residual-networks).
Recipe reference: Yosinski, Clune, Bengio, Lipson, "How transferable are features in deep
neural networks?", NeurIPS 2014 (arXiv:1411.1792; code: github.com/yosinski/convnet_transfer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from visionscale.components import Component, State, components_of
from visionscale.errors import InvalidValueError, check_finite, check_int
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD, ModelInfo
from visionscale.registry import create

__all__ = ["ClassifierConfig", "Classifier", "build_backbone", "first_conv", "count_parameters", "MAX_IMAGE_SIZE"]

# Largest square input side accepted: far above any classifier input, far below what would
# exhaust memory in the first convolution of a batch.
MAX_IMAGE_SIZE = 8192


def _rgb_triple(name: str, value, positive: bool) -> tuple[float, float, float]:
    """Three finite numbers (one per RGB channel); ``positive``: each > 0 (a divisor)."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise InvalidValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidValueError(f"{name}[{i}] must be a number, got {v!r}")
        check_finite(f"{name}[{i}]", v, minimum=0.0 if positive else None, min_inclusive=not positive)
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and input contract of a classifier (saved beside its weights).

    Attributes:
        backbone: Registry name of a model that takes ``num_classes=0`` and exposes
            ``num_features`` (the ResNets: ``resnet18``, ``resnet50``, ``resnet_tiny``...).
        classes: Class names; the logit index is the position in this list.
        image_size: Square side the images are resized/cropped to.
        mean: Per-channel RGB mean for normalisation (0..1 scale).
        std: Per-channel RGB std.
        dropout: Dropout before the linear head (0 = none).
    """

    backbone: str
    classes: tuple[str, ...]
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Every field is checked: a config read back from an edited file must not turn into
        # NaN probabilities (std 0) or a wrong-sized model.
        if not isinstance(self.backbone, str) or not self.backbone:
            raise InvalidValueError(f"backbone must be a model name, got {self.backbone!r}")
        if not isinstance(self.classes, (tuple, list)) or not all(isinstance(c, str) and c for c in self.classes):
            raise InvalidValueError(f"classes must be a list of class names (non-empty strings), got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) < 2:
            raise InvalidValueError(f"a classifier needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise InvalidValueError(f"class names must be unique, got {list(self.classes)}")
        check_int("image_size", self.image_size, minimum=8, maximum=MAX_IMAGE_SIZE)
        object.__setattr__(self, "mean", _rgb_triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _rgb_triple("std", self.std, positive=True))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise InvalidValueError(f"dropout must be a number, got {self.dropout!r}")
        check_finite("dropout", self.dropout, minimum=0.0, maximum=1.0, max_inclusive=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        """The config from its :meth:`to_dict` form; :class:`InvalidValueError` names a bad field."""
        if not isinstance(d, dict):
            raise InvalidValueError(f"a classifier config is a JSON object, got {type(d).__name__}")
        for key in ("backbone", "classes"):
            if key not in d:
                raise InvalidValueError(f"{key} is missing")
        known = {"backbone", "classes", "image_size", "mean", "std", "dropout"}
        return cls(**{k: v for k, v in d.items() if k in known})


def build_backbone(name: str, weights=None) -> nn.Module:
    """A registry model without its classification head (``num_classes=0``).

    Raises:
        InvalidValueError: The model cannot serve as a backbone (no ``num_classes=0`` option or
            no ``num_features``); the message names the models that can.
    """
    try:
        net = create(name, weights=weights, num_classes=0)
    except TypeError:
        net = None
    if net is None or not isinstance(getattr(net, "num_features", None), int):
        from visionscale.registry import list_models

        ok = [m for m in list_models() if "resnet" in m]
        raise InvalidValueError(f"model {name!r} cannot be a classifier backbone (needs a headless num_classes=0 "
                                f"variant with num_features); use one of: {', '.join(ok)}").about("backbone")
    return net


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``Conv2d`` in registration order (the image-facing one in our nets)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


class Classifier(nn.Module):
    """Backbone features ``(B, F)`` -> dropout -> ``Linear(F, num_classes)`` logits.

    Attributes:
        config: The :class:`ClassifierConfig`.
        backbone: Headless registry model; ``backbone(x)`` returns pooled features ``(B, F)``.
        head: The new linear layer.
    """

    def __init__(self, config: ClassifierConfig, weights=None, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, weights)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.backbone.num_features, config.num_classes)
        conv = first_conv(self.backbone)
        self.in_channels = conv[1].in_channels if conv is not None else 3
        self.model_info = ModelInfo(input_size=(config.image_size, config.image_size), mean=tuple(config.mean),
                                    std=tuple(config.std), channels=self.in_channels)

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError when ``x`` is not ``(B, in_channels, H, W)``."""
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"images have {x.shape[1]} channels but the {self.config.backbone} backbone "
                             f"expects {self.in_channels} (read images with visionscale.io.images.read_image, "
                             f"which always gives RGB)")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        feats = self.backbone(x)  # (B, F): pooled, the backbone has no head
        return self.head(self.dropout(feats))  # (B, num_classes)

    def components(self) -> list[Component]:
        """The backbone's own components, then ``"classifier"`` (dropout + linear head)."""
        parts = list(components_of(self.backbone))  # ends with {"output": (B, F)}
        head = nn.Sequential(self.dropout, self.head)

        def run(state: State) -> State:
            return {"logits": head(state["output"])}

        return parts + [Component("classifier", head, run)]

    def freeze_backbone(self, frozen: bool = True, train_from: str | None = None) -> None:
        """Stop (or restart) gradient updates to the backbone.

        Args:
            frozen: True freezes every backbone parameter.
            train_from: When unfreezing, only the named top-level stage and those after
                it train (e.g. ``"layer3"`` trains layer3 and layer4); None trains everything.
        """
        names = [n for n, _ in self.backbone.named_children()]
        if train_from is not None and train_from not in names:
            raise InvalidValueError(f"unknown backbone stage {train_from!r}; choose one of: "
                                    f"{', '.join(names)}").about("unfreeze_from")
        start = 0 if train_from is None else names.index(train_from)
        self._frozen = [n for i, n in enumerate(names) if frozen or i < start]
        for name, child in self.backbone.named_children():
            for p in child.parameters():
                p.requires_grad_(name not in self._frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # Frozen stages also keep their BatchNorm statistics: small batches of a new data
        # set would otherwise drift the pretrained running means and variances.
        frozen = getattr(self, "_frozen", [])
        if mode and frozen:
            if len(frozen) == len(list(self.backbone.children())):
                self.backbone.eval()
            for name in frozen:
                self.backbone.get_submodule(name).eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

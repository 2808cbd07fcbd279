"""What a model says about its own input: the facts export, bench, inspect and the study ask for.

After timm's ``pretrained_cfg``: each model class sets ``self.model_info = ModelInfo(...)`` in
its constructor, so a consumer asks the model (:func:`model_info`) instead of keeping a
table keyed by class name. A model that sets none (a user's ``package.module:attr`` module)
gets facts read from what it has: ``config.image_size``, its first convolution's channels.

This module imports only torch, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

# The one definition of the ImageNet statistics (torchvision's), on the [0, 1] RGB scale.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_INPUT_SIZE = (256, 256)
ALL_AXES = (0, 2, 3)  # batch, height, width of a (B, C, H, W) input


@dataclass(frozen=True)
class ModelInfo:
    """Input facts of one model.

    Attributes:
        input_size: ``(H, W)`` used when the caller gives no size: the size the model was
            built, trained or published for.
        mean: Per-channel mean subtracted from [0, 1] RGB before ``forward`` (``None``: the
            model takes [0, 1] images, or the facts are unknown).
        std: Per-channel std the input is divided by, as ``mean``.
        channels: Input channels.
        export_batch: Example batch for a graph export. 2 keeps the batch axis dynamic
            (``torch.export`` specialises axes of size 0 and 1); 1 where the model loops over
            the batch in Python or freezes per-shape state.
        dynamic_axes: Input axes a graph export may leave dynamic; ``(0,)`` for a model
            whose height and width are fixed by design.
        not_exportable: Why no graph export of this model can match its eager outputs
            (``None``: exportable).
        tile_align: Tiles of a large image start at multiples of this many px (the model's
            total stride), so each tile's output grid lines up with the whole image's.
        tile_margin: Outputs closer than this many px to a tile edge inside the image differ
            from the whole-image outputs (zero padding where the image has pixels); tiled
            inference gives them weight 0 (see :mod:`visionscale.tiling`). For a model whose
            receptive field is wider (a deep backbone), a margin past which the difference is
            small, not zero; the docs of each model say which.
    """

    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int = 3
    export_batch: int = 2
    dynamic_axes: tuple[int, ...] = ALL_AXES
    not_exportable: str | None = None
    tile_align: int = 1
    tile_margin: int = 0

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, int):
            object.__setattr__(self, "input_size", (size, size))
        h, w = self.input_size
        if h < 1 or w < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if self.export_batch < 1:
            raise ValueError(f"export_batch must be >= 1, got {self.export_batch}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    @property
    def static_size(self) -> bool:
        """Height and width are fixed: only the input size runs."""
        return 2 not in self.dynamic_axes and 3 not in self.dynamic_axes


def imagenet(**kw) -> ModelInfo:
    """A :class:`ModelInfo` for a model fed ImageNet-normalised images."""
    return ModelInfo(mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


def model_info(model: nn.Module, default_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> ModelInfo:
    """The model's own :class:`ModelInfo`, else one read from what it has.

    A thin input wrapper (a module holding the real model as ``.model``, e.g. an anomaly
    run's input conversion) gives its inner model's shape facts; its normalisation is the
    wrapper's business, so it is reported unknown. ``default_size`` is the input size of a
    model that declares none.
    """
    info = getattr(model, "model_info", None)
    if isinstance(info, ModelInfo):
        return info
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "model_info", None), ModelInfo):
        return replace(inner.model_info, mean=None, std=None)
    return ModelInfo(input_size=_declared_size(model) or default_size, channels=_first_conv_channels(model))


def input_size_problem(model: nn.Module, h: int, w: int) -> str | None:
    """Why ``model`` cannot run at ``h`` x ``w`` (its own ``validate_input_size`` says), or None.

    The one size check that export, bench and the study share; each wraps the answer in its
    own error, naming the model.
    """
    if h < 1 or w < 1:
        return f"image size must be positive, got {h}x{w}"
    check = getattr(model, "validate_input_size", None)
    if check is not None:
        try:
            check(h, w)
        except ValueError as exc:
            return str(exc)
    return None


def _declared_size(model: nn.Module) -> tuple[int, int] | None:
    size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _first_conv_channels(model: nn.Module, default: int = 3) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return default

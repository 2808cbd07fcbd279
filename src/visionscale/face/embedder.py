"""Face embedding network: a backbone, a projection head and L2-normalised outputs.

Trained as a Siamese pair (both images through the same weights) with the contrastive
loss of Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant
Mapping", CVPR 2006 (see :mod:`visionscale.face.losses`), as seed 003 does. Seed 003 used
a timm ViT (``vit_mediumd_patch16_reg4_gap_256``) with every parameter frozen except its
last transformer block; ``freeze="all_but_last"`` does the same here on any backbone.

Backbones: our registry ResNets (``resnet18``, ``resnet50``, ``resnet_tiny``...; He et al.,
CVPR 2016, arXiv:1512.03385) or, when the optional ``timm`` package is installed, any timm
model via ``backbone="timm:<name>"``.

Shapes: images ``(B, 3, S, S)`` normalised with ``config.mean/std`` -> backbone pooled
features ``(B, F)`` -> projection ``(B, D)`` -> unit-length embeddings ``(B, D)``. On unit
vectors the Euclidean distance is ``sqrt(2 - 2 cos)``, in ``[0, 2]``; seed 003's decision
rule is "same person when distance < 0.5".
"""

from __future__ import annotations

from visionscale.errors import InvalidValueError, MissingDependencyError, VisionscaleError

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.components import Component, State, components_of
from visionscale.device import resolve_device
from visionscale.io.weights import load_into, load_state_dict, save_file_atomic
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD, ModelInfo
from visionscale.registry import create, list_models, register_model

__all__ = [
    "EmbedderConfig",
    "FaceEmbedder",
    "EmbedderCheckpointError",
    "FREEZE_MODES",
    "preprocess",
    "save_embedder",
    "load_embedder",
    "build_embedder",
    "register_embedder_class",
    "embedder_class",
    "face_embedder_resnet18",
    "face_embedder_resnet50",
    "face_embedder_tiny",
    "face_embedder_timm",
]

FORMAT = "visionscale.face_embedder/1"
FREEZE_MODES = ("none", "all_but_last", "backbone")


class EmbedderCheckpointError(VisionscaleError, ValueError):
    """A file is not a usable face-embedder checkpoint."""


@dataclass(frozen=True)
class EmbedderConfig:
    """Architecture and input contract of a face embedder (saved inside its checkpoint).

    Attributes:
        backbone: Registry name of a headless-capable model (``resnet18``, ``resnet_tiny``...)
            or ``"timm:<model name>"`` (needs the optional ``timm`` package).
        embedding_dim: Size ``D`` of the output embedding.
        image_size: Square input side in px (faces are resized to it).
        hidden_dim: 0 = one linear projection ``F -> D``; > 0 = ``F -> hidden -> ReLU -> D``.
        mean: Per-channel RGB normalisation mean (0..1 scale).
        std: Per-channel RGB normalisation std.
        name: Registry name of the embedder (``face_embedder_resnet18``...), used in ids.
    """

    backbone: str = "resnet18"
    embedding_dim: int = 512
    image_size: int = 112
    hidden_dim: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = "face_embedder"

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise InvalidValueError(f"embedding_dim must be positive, got {self.embedding_dim}").about("embedding_dim")
        if self.image_size < 16:
            raise InvalidValueError(f"image_size must be at least 16 px, got {self.image_size}").about("image_size")
        if self.hidden_dim < 0:
            raise InvalidValueError(f"hidden_dim must be >= 0, got {self.hidden_dim}").about("hidden_dim")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EmbedderConfig:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def _timm_backbone(name: str, pretrained: bool) -> nn.Module:
    try:
        import timm  # optional: seed 003's ViT lives there
    except ImportError:
        raise MissingDependencyError(
            f"backbone 'timm:{name}' needs the optional package timm (pip install timm); "
            f"without it use a registry backbone such as resnet18 or resnet50"
        ).about("backbone") from None
    # num_classes=0 removes the classifier: forward() returns pooled features (B, num_features).
    return timm.create_model(name, pretrained=pretrained, num_classes=0)


def _build_backbone(spec: str, weights) -> nn.Module:
    if spec.startswith("timm:"):
        return _timm_backbone(spec[5:], pretrained=bool(weights))
    net = create(spec, weights=weights, num_classes=0)
    if not isinstance(getattr(net, "num_features", None), int):
        raise InvalidValueError(f"model {spec!r} cannot be an embedding backbone: it has no num_features "
                                f"(use resnet18, resnet50, resnet_tiny or timm:<name>)").about("backbone")
    return net


def _last_block(backbone: nn.Module) -> nn.Module:
    """The last residual / transformer block: what seed 003 leaves trainable."""
    for attr in ("layer4", "blocks", "stages", "layers"):
        seq = getattr(backbone, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            last = seq[-1]
            # timm's `stages` hold their own `blocks`; the last block is the unit, not the stage.
            inner = getattr(last, "blocks", None)
            if attr == "stages" and isinstance(inner, (nn.Sequential, nn.ModuleList)) and len(inner) > 0:
                return inner[-1]
            return last
    raise InvalidValueError(f"cannot find the last block of {type(backbone).__name__} (looked for layer4, blocks, "
                            f"stages, layers); use freeze='none' or 'backbone'").about("freeze")


class FaceEmbedder(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings ``(B, D)``.

    Attributes:
        config: The :class:`EmbedderConfig`.
        backbone: Headless feature extractor, ``(B, 3, S, S) -> (B, F)``.
        head: Projection to ``D`` dimensions.
        freeze_mode: ``"none"``, ``"all_but_last"`` (seed 003) or ``"backbone"``.
        metric: How embeddings are compared (class attribute). ``"cosine"``: outputs are unit
            vectors, compared by the Euclidean distance of unit vectors (``sqrt(2 - 2 cos)``);
            ``"euclidean"``: raw vectors compared by Euclidean distance (dlib's descriptor).
        default_threshold: Distance below which two faces are the same person (class attribute).
        alignment: How faces are cropped for this model (class attribute): ``"keypoints"``
            (the detector's keypoints) or ``"dlib5"`` (dlib's 5-point ``get_face_chip``).
    """

    metric = "cosine"
    default_threshold = 0.5
    alignment = "keypoints"

    def __init__(self, config: EmbedderConfig | None = None, backbone_weights=None,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = cfg = config or EmbedderConfig()
        self.backbone = backbone if backbone is not None else _build_backbone(cfg.backbone, backbone_weights)
        feats = int(self.backbone.num_features)
        if cfg.hidden_dim > 0:
            self.head: nn.Module = nn.Sequential(nn.Linear(feats, cfg.hidden_dim), nn.ReLU(inplace=True),
                                                 nn.Linear(cfg.hidden_dim, cfg.embedding_dim))
        else:
            self.head = nn.Linear(feats, cfg.embedding_dim)
        self.freeze_mode = "none"
        self._fingerprint: str | None = None
        self.model_info = ModelInfo(input_size=(cfg.image_size, cfg.image_size), mean=tuple(cfg.mean),
                                    std=tuple(cfg.std))

    @property
    def dim(self) -> int:
        return self.config.embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected normalised RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
        feats = self.backbone(x)  # (B, F), pooled: the backbone has no classifier
        return self.project(feats)

    def project(self, feats: Tensor) -> Tensor:
        """Pooled backbone features ``(B, F)`` -> embeddings ``(B, D)``: the head, then L2
        normalisation (unit length)."""
        return F.normalize(self.head(feats), dim=1)

    def forward_pair(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Siamese forward: one set of weights, two inputs (run as one batch, so BatchNorm
        sees both sides' statistics alike)."""
        z = self(torch.cat([a, b], 0))
        return z[: a.shape[0]], z[a.shape[0]:]

    def components(self) -> list[Component]:
        """The backbone's components, then ``"projection"`` (:meth:`project`: the head and, for
        unit-vector embedders, L2 normalisation)."""
        parts = list(components_of(self.backbone))  # ends with {"output": (B, F)}
        project = self.project

        def run(state: State) -> State:
            return {"embedding": project(state["output"])}

        return parts + [Component("projection", self.head, run)]

    # -- freezing --------------------------------------------------------------------
    def freeze(self, mode: str = "all_but_last") -> None:
        """Choose what trains. The projection head always trains.

        ``"all_but_last"`` freezes the backbone except its last block (seed 003 trained only
        ``blocks[-1]`` of its ViT); ``"backbone"`` freezes the whole backbone; ``"none"``
        trains everything. Frozen parts also keep their BatchNorm statistics (eval mode).
        """
        if mode not in FREEZE_MODES:
            raise InvalidValueError(f"freeze must be one of {', '.join(FREEZE_MODES)}, got {mode!r}").about("freeze")
        last = _last_block(self.backbone) if mode == "all_but_last" else None
        for p in self.backbone.parameters():
            p.requires_grad_(mode == "none")
        if last is not None:
            for p in last.parameters():
                p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.freeze_mode = mode
        self.train(self.training)

    def train(self, mode: bool = True) -> FaceEmbedder:
        super().train(mode)
        if mode and self.freeze_mode != "none":
            self.backbone.eval()
            if self.freeze_mode == "all_but_last":
                _last_block(self.backbone).train(True)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- identity ----------------------------------------------------------------------
    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 (16 hex digits) of all weights and buffers: two embedders with the same
        fingerprint give the same embeddings. Cached; pass ``refresh=True`` after training."""
        if self._fingerprint is None or refresh:
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def model_id(self) -> str:
        """``<name>/<D>d/<fingerprint>``: what a gallery stores to refuse mixing models."""
        return f"{self.config.name}/{self.dim}d/{self.fingerprint()}"

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray] | Tensor, batch_size: int = 64, device: str | torch.device | None = None,
              forward=None) -> np.ndarray:
        """Embed RGB uint8 images ``(H, W, 3)`` (any size; resized) in batches -> ``(N, D)`` float32.

        ``forward``: what runs the network (default: this module; e.g. a
        :class:`visionscale.runtime.Runner` around it for another backend or precision)."""
        was_training = self.training
        self.eval()
        dev = resolve_device(device) if device is not None else next(self.parameters()).device
        out = []
        try:
            n = len(images)
            for i in range(0, n, batch_size):
                x = preprocess(images[i:i + batch_size], self.config).to(dev)
                out.append((forward or self)(x).float().cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(out, 0) if out else np.zeros((0, self.dim), np.float32)


def _resize_square(x: Tensor, size: int) -> Tensor:
    """``(3, H, W)`` float -> ``(3, size, size)``: shorter side to ``size``, centre crop."""
    _, h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size]


def preprocess(images: Sequence[np.ndarray] | Tensor, config: EmbedderConfig) -> Tensor:
    """RGB uint8 ``(H, W, 3)`` arrays (or a uint8/0..255 ``(B, 3, S, S)`` tensor) -> normalised
    float ``(B, 3, S, S)`` at ``config.image_size``."""
    size = config.image_size
    if isinstance(images, Tensor):
        x = images.float()
        if x.dim() != 4 or x.shape[1] != 3:
            raise InvalidValueError(f"expected a (B, 3, H, W) tensor, got {tuple(x.shape)}").about("images")
        if x.shape[-2:] != (size, size):
            x = torch.stack([_resize_square(im, size) for im in x])
    else:
        batch = []
        for i, im in enumerate(images):
            a = np.asarray(im)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise InvalidValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, "
                                        f"got {a.dtype} {a.shape}").about("images")
            if min(a.shape[:2]) < 4:
                raise InvalidValueError(f"image {i} is too small ({a.shape[1]}x{a.shape[0]} px) "
                                        f"to embed").about("images")
            batch.append(_resize_square(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float(), size))
        x = torch.stack(batch) if batch else torch.zeros((0, 3, size, size))
    m = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


# -- embedder classes ----------------------------------------------------------------------
# Backbones whose embedder is a FaceEmbedder subclass (another head, output or comparison), so
# a checkpoint that names one is rebuilt as that class. Filled by the subclasses' modules, which
# the registry imports by name: this module imports none of them (no import cycle).
_EMBEDDER_CLASSES: dict[str, type[FaceEmbedder]] = {}


def register_embedder_class(backbone: str):
    """Class decorator: checkpoints whose ``config.backbone`` is ``backbone`` load as this class
    (constructed as ``cls(config)``)."""

    def wrap(cls: type[FaceEmbedder]) -> type[FaceEmbedder]:
        known = _EMBEDDER_CLASSES.get(backbone)
        if known is not None and known is not cls:
            raise ValueError(f"backbone {backbone!r} already has embedder class {known.__name__}")
        _EMBEDDER_CLASSES[backbone] = cls
        return cls

    return wrap


def embedder_class(config: EmbedderConfig) -> type[FaceEmbedder]:
    """The class that builds an embedder of ``config``: a registered subclass for its backbone
    (e.g. ``"dlib_resnet"``), else :class:`FaceEmbedder`."""
    if config.backbone not in _EMBEDDER_CLASSES:
        list_models()  # imports the registry's model modules, which register their classes
    return _EMBEDDER_CLASSES.get(config.backbone, FaceEmbedder)


# -- checkpoints ---------------------------------------------------------------------------
def save_embedder(model: FaceEmbedder, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write weights + config (safetensors header metadata) atomically; nothing is pickled."""
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "fingerprint": model.fingerprint(refresh=True)}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save_file_atomic(model.state_dict(), path, metadata=meta)


def read_embedder_config(path: str | os.PathLike) -> EmbedderConfig:
    import safetensors

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise EmbedderCheckpointError(f"face-embedder checkpoint not found: {p}")
    try:
        with safetensors.safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise EmbedderCheckpointError(f"could not read {p} as safetensors: {exc}") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise EmbedderCheckpointError(f"{p} is not a visionscale face-embedder checkpoint (format "
                                      f"{meta.get('format')!r}, expected {FORMAT!r})")
    try:
        return EmbedderConfig.from_dict(json.loads(meta["config"]))
    except (TypeError, ValueError) as exc:
        raise EmbedderCheckpointError(f"bad embedder config in {p}: {exc}") from None


def load_embedder(path: str | os.PathLike, device: str | torch.device = "cpu") -> FaceEmbedder:
    """Rebuild a saved embedder (eval mode) from a ``.safetensors`` file or a training folder."""
    device = resolve_device(device)
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    cfg = read_embedder_config(p)
    model = embedder_class(cfg)(cfg)
    load_into(model, load_state_dict(p), source=str(p))
    return model.to(device).eval()


def build_embedder(model: str | os.PathLike | FaceEmbedder, device: str | torch.device = "cpu", seed: int = 0) -> FaceEmbedder:
    """A ready embedder from an instance, a checkpoint path, or a registry name.

    A registry name gives randomly initialised weights drawn with ``seed`` (so the same name
    gives the same weights, and the same gallery id, in every process): no trained face
    weights ship with visionscale; train your own with ``visionscale face train``.
    """
    device = resolve_device(device)
    if isinstance(model, FaceEmbedder):
        return model.to(device).eval()
    text = os.fspath(model)
    p = Path(text).expanduser()
    if p.suffix.lower() == ".safetensors" or p.is_dir() or os.sep in text:
        return load_embedder(p, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create(text)
    if not isinstance(net, FaceEmbedder):
        raise InvalidValueError(f"{text!r} is not a face embedder (try face_embedder_resnet18, face_embedder_tiny, "
                                f"or a checkpoint from `visionscale face train`)").about("model")
    return net.to(device).eval()


# -- registry ------------------------------------------------------------------------------
def _factory(name: str, backbone: str, defaults: dict, weights, backbone_weights, kwargs: dict) -> FaceEmbedder:
    freeze = kwargs.pop("freeze", "none")
    unknown = sorted(set(kwargs) - set(EmbedderConfig.__dataclass_fields__) - {"backbone", "name"})
    if unknown or "backbone" in kwargs or "name" in kwargs:
        allowed = ", ".join(f for f in EmbedderConfig.__dataclass_fields__ if f not in ("backbone", "name"))
        raise TypeError(f"{name} got unexpected argument(s) {', '.join(unknown or ['backbone/name'])}; "
                        f"accepted: weights, backbone_weights, freeze, {allowed}")
    cfg_kw = {**defaults, **kwargs, "backbone": backbone, "name": name}
    model = FaceEmbedder(EmbedderConfig.from_dict(cfg_kw), backbone_weights=backbone_weights)
    if weights is not None:
        file = Path(os.fspath(weights)).expanduser()
        load_into(model, load_state_dict(file), source=str(file))
    model.freeze(freeze)
    return model


@register_model()
def face_embedder_resnet18(weights=None, backbone_weights=None, **kwargs) -> FaceEmbedder:
    """ResNet-18 face embedder: 512-d unit embeddings of 112x112 faces.

    Args:
        weights: A face-embedder ``.safetensors`` file (whole model), or None.
        backbone_weights: Backbone weights (``"DEFAULT"`` = ImageNet, a file, or None).
        **kwargs: :class:`EmbedderConfig` fields and ``freeze``.
    """
    return _factory("face_embedder_resnet18", "resnet18", {"embedding_dim": 512, "image_size": 112},
                    weights, backbone_weights, kwargs)


@register_model()
def face_embedder_resnet50(weights=None, backbone_weights=None, **kwargs) -> FaceEmbedder:
    """ResNet-50 face embedder: 512-d unit embeddings of 112x112 faces."""
    return _factory("face_embedder_resnet50", "resnet50", {"embedding_dim": 512, "image_size": 112},
                    weights, backbone_weights, kwargs)


@register_model()
def face_embedder_tiny(weights=None, backbone_weights=None, **kwargs) -> FaceEmbedder:
    """Tiny embedder for CPU tests: ``resnet_tiny`` backbone, 32-d embeddings of 32x32 faces."""
    return _factory("face_embedder_tiny", "resnet_tiny", {"embedding_dim": 32, "image_size": 32},
                    weights, backbone_weights, kwargs)


@register_model()
def face_embedder_timm(model_name: str = "vit_mediumd_patch16_reg4_gap_256", weights=None, pretrained: bool = False,
                       **kwargs) -> FaceEmbedder:
    """Embedder on any timm model (optional dependency), e.g. seed 003's ViT.

    Args:
        model_name: timm model name.
        weights: A face-embedder ``.safetensors`` file, or None.
        pretrained: Let timm load its own pretrained weights (downloads).
    """
    kwargs.setdefault("image_size", 256 if "256" in model_name else 224)
    return _factory("face_embedder_timm", f"timm:{model_name}", {"embedding_dim": 512}, weights,
                    pretrained or None, kwargs)

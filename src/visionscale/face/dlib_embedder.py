"""dlib's ResNet face descriptor as a registered face embedder: ``create("face_embedder_dlib")``.

The network is :mod:`visionscale.face.dlib_resnet` (dlib's ``dnn_face_recognition_ex.cpp``,
CC0 weights from the ``face-recognition-models`` package) split the embedder's way: the
backbone is :class:`~visionscale.face.dlib_resnet.DlibTrunk` (stem, 14 residual blocks, global
average pool, ``(B, 3, 150, 150) -> (B, 256)``) and the head is dlib's fc layer
(``nn.Linear(256, 128, bias=False)``).

Where it differs from the other embedders (:class:`~visionscale.face.embedder.FaceEmbedder`):

- ``forward`` returns dlib's raw descriptor ``(B, 128)``, *not* normalised (norms about 1.3
  to 1.7); descriptors are compared by Euclidean distance (``metric = "euclidean"``), same
  person below 0.6 (``default_threshold``, the distance threshold stored in dlib's file).
- Faces are 150x150 chips aligned the way dlib's ``get_face_chip`` does it from 5 landmarks
  (``alignment = "dlib5"``, :mod:`visionscale.face.dlib_chip`).
- The normalisation is dlib's ``(x - mean) / 256`` written in the embedder's terms:
  ``mean = dlib_mean / 255`` and ``std = 256 / 255`` on the 0..1 scale, so
  ``(x / 255 - mean) / std`` is ``(x - dlib_mean) / 256`` up to float32 rounding (about 1e-7
  relative; descriptors move by less than 1e-6, see the tests).
- The input size is fixed (150 px): the ONNX export keeps only the batch axis dynamic.

Weights: ``weights=None`` reads the ``.dat`` found by
:func:`~visionscale.face.dlib_resnet.find_dlib_dat` (``$VISIONSCALE_DLIB_DAT`` or the
installed package) with our own reader (no dlib at run time), once: the converted weights are
cached as safetensors in the face cache folder (where imported BlazeFace weights go), in a
file named after the size and sha256 of the ``.dat``, so another ``.dat`` never gets a stale
cache. On one CPU thread, loading from the ``.dat`` took 0.11 to 0.16 s and from the cache
0.06 to 0.10 s; the sha256 of the ``.dat`` (the cache key) is a third of the latter
(docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch import Tensor, nn

from visionscale.errors import InvalidValueError, MissingDependencyError
from visionscale.face.dlib_resnet import (
    DLIB_DAT_NAME,
    DLIB_INPUT_SIZE,
    DLIB_MEAN_RGB,
    DlibTrunk,
    dlib_layers,
    find_dlib_dat,
    read_dlib_resnet,
)
from visionscale.face.embedder import EmbedderConfig, FaceEmbedder, register_embedder_class
from visionscale.io.weights import (
    WeightsFileNotFoundError,
    load_into,
    load_state_dict,
    save_file_atomic,
)
from visionscale.modelinfo import ModelInfo
from visionscale.registry import register_model

__all__ = ["DLIB_EMBEDDER_CONFIG", "DlibFaceEmbedder", "load_dlib_weights", "dlib_cache_file", "face_embedder_dlib"]

DESCRIPTOR_DIM = 128
DLIB_EMBEDDER_CONFIG = EmbedderConfig(
    backbone="dlib_resnet", embedding_dim=DESCRIPTOR_DIM, image_size=DLIB_INPUT_SIZE,
    mean=tuple(m / 255 for m in DLIB_MEAN_RGB), std=(256 / 255,) * 3, name="face_embedder_dlib")
CACHE_FORMAT = "visionscale.dlib_descriptor/1"


@register_embedder_class("dlib_resnet")
class DlibFaceEmbedder(FaceEmbedder):
    """dlib's face descriptor: :class:`DlibTrunk` + dlib's fc, raw 128-D outputs.

    Built with random weights; :func:`face_embedder_dlib` (or :func:`load_dlib_weights`) loads
    dlib's. ``config`` must describe this architecture (backbone ``"dlib_resnet"``, 128-D, no
    hidden layer, 150 px); its mean, std and name may differ (a fine-tuned copy keeps dlib's).
    """

    metric = "euclidean"
    default_threshold = 0.6
    alignment = "dlib5"

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        cfg = config or DLIB_EMBEDDER_CONFIG
        _check_config(cfg)
        super().__init__(cfg, backbone=DlibTrunk())
        self.head = nn.Linear(DlibTrunk.num_features, DESCRIPTOR_DIM, bias=False)  # dlib's fc
        # dlib's add_prev pads by amounts fixed at 150 px: export with the batch axis dynamic only.
        self.model_info = ModelInfo(input_size=(cfg.image_size, cfg.image_size), mean=tuple(cfg.mean),
                                    std=tuple(cfg.std), dynamic_axes=(0,))

    def project(self, feats: Tensor) -> Tensor:
        """``(B, 256) -> (B, 128)``: dlib's fc, not normalised."""
        return self.head(feats)

    def validate_input_size(self, h: int, w: int) -> None:
        """Raise InvalidValueError unless ``h x w`` is 150 x 150: dlib's weights, and the sizes
        its ``add_prev`` pads between, are those of 150 px chips."""
        side = self.config.image_size
        if (h, w) != (side, side):
            raise InvalidValueError(f"face_embedder_dlib runs at {side}x{side} only (dlib's aligned chips), "
                                    f"got {h}x{w}").about("image_size")

    def dlib_layers(self) -> list[tuple]:
        """The layers in dlib's file order (what :func:`read_dlib_resnet` loads into)."""
        return dlib_layers(self.backbone, self.head)


def _check_config(cfg: EmbedderConfig) -> None:
    want = {"backbone": "dlib_resnet", "embedding_dim": DESCRIPTOR_DIM, "hidden_dim": 0, "image_size": DLIB_INPUT_SIZE}
    for field, value in want.items():
        if getattr(cfg, field) != value:
            raise InvalidValueError(f"dlib's face descriptor has {field} {value!r}, got {getattr(cfg, field)!r}"
                                    ).about(field)


# -- weights ---------------------------------------------------------------------------------------

def dlib_cache_file(size: int, sha256: str) -> Path:
    """Where the weights converted from a ``.dat`` of ``size`` bytes and this sha256 are cached."""
    from visionscale.face.tflite_import import cache_dir  # the face cache folder (imported BlazeFace too)

    return cache_dir() / f"dlib_resnet-{size}-{sha256[:16]}.safetensors"


def _cached_sha256(path: Path) -> str | None:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("sha256") if meta.get("format") == CACHE_FORMAT else None


def load_dlib_weights(model: DlibFaceEmbedder, path: str | os.PathLike, cache: bool = True) -> dict:
    """Load weights into ``model`` from dlib's ``.dat`` (through the cache) or a state dict file
    (``.safetensors``, e.g. a checkpoint written by ``save_embedder``; or ``.pth``).

    Returns:
        ``{"read": "dat" | "cache" | "file", "path": what was read, "cache": the cache file
        used or written, or None}``.

    Raises:
        InvalidFileError: A corrupt or foreign ``.dat`` (names the file and byte offset).
        WeightsFileNotFoundError: ``path`` does not exist.
        WeightsFileError, StateDictMismatchError: A state dict file that does not fit.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.suffix.lower() != ".dat":
        load_into(model, load_state_dict(p), source=str(p))
        return {"read": "file", "path": p, "cache": None}
    if not p.is_file():
        raise WeightsFileNotFoundError(f"dlib weights file not found: {p}")
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    target = dlib_cache_file(len(data), digest)
    if cache and target.is_file():
        try:
            if _cached_sha256(target) == digest:
                load_into(model, load_state_dict(target), source=str(target))
                return {"read": "cache", "path": target, "cache": target}
        except Exception:  # noqa: BLE001 - a damaged cache file: parse the .dat below and overwrite it
            pass
    read_dlib_resnet(data, model, str(p))
    if cache:
        meta = {"format": CACHE_FORMAT, "source": p.name, "size": str(len(data)), "sha256": digest,
                "license": "CC0-1.0"}
        try:
            save_file_atomic(model.state_dict(), target, metadata=meta)
        except OSError:
            return {"read": "dat", "path": p, "cache": None}  # read-only cache folder: the load still worked
        return {"read": "dat", "path": p, "cache": target}
    return {"read": "dat", "path": p, "cache": None}


def missing_weights_message() -> str:
    env = os.environ.get("VISIONSCALE_DLIB_DAT")
    if env:
        return (f"VISIONSCALE_DLIB_DAT={env} is not a file: point it at dlib's {DLIB_DAT_NAME}, or unset it and "
                f'pip install "visionscale[face]"')
    return (f"face_embedder_dlib needs dlib's face descriptor weights ({DLIB_DAT_NAME}): "
            f'pip install "visionscale[face]", or set VISIONSCALE_DLIB_DAT to the file')


@register_model()
def face_embedder_dlib(weights=None, freeze: str = "none") -> DlibFaceEmbedder:
    """dlib's ResNet face descriptor (CC0 weights): raw 128-D descriptors of 150x150 dlib-aligned
    chips, Euclidean distance, same person below 0.6.

    There is no ``image_size`` or ``embedding_dim`` argument: both are dlib's (150 px, 128-D).
    Built on the ``meta`` device (the scale study's analytic pass), it loads no weights.

    Args:
        weights: None (dlib's ``.dat`` from ``$VISIONSCALE_DLIB_DAT`` or the
            ``face-recognition-models`` package, converted once and cached), or a path to a
            ``.dat`` or a ``.safetensors`` (e.g. a fine-tuned checkpoint).
        freeze: What trains (see :meth:`FaceEmbedder.freeze`).

    Raises:
        MissingDependencyError: ``weights`` is None and no ``.dat`` is installed.
    """
    model = DlibFaceEmbedder()
    if model.head.weight.is_meta:  # shapes only: nothing to load into
        model.freeze(freeze)
        return model
    if weights is None:
        weights = find_dlib_dat()
        if weights is None:
            raise MissingDependencyError(missing_weights_message()).about("weights")
    load_dlib_weights(model, weights)
    model.freeze(freeze)
    return model

"""Classifier checkpoints: safetensors weights that carry their own JSON config.

``model.safetensors`` holds the state dict and, in the safetensors header metadata, the
:class:`~visionscale.classify.model.ClassifierConfig` as JSON (key ``"config"``), so one
file is enough to rebuild the model; ``config.json`` beside it repeats the config for
people and scripts. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors

from visionscale.classify.model import Classifier, ClassifierConfig
from visionscale.errors import InvalidFileError, InvalidValueError, VisionscaleError
from visionscale.io.weights import load_into, load_state_dict, save_file_atomic

__all__ = ["FORMAT", "CheckpointError", "InvalidCheckpointError", "save_classifier", "load_classifier",
           "resolve_checkpoint", "read_metadata"]

FORMAT = "visionscale.classifier/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(VisionscaleError, ValueError):
    """A path is not a usable classifier checkpoint."""


class InvalidCheckpointError(CheckpointError, InvalidFileError):
    """A checkpoint's config was edited or damaged; the message names the file and the field."""


def save_classifier(model: Classifier, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model``'s weights and config to ``path`` (a ``.safetensors`` file) atomically."""
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save_file_atomic(model.state_dict(), path, metadata=meta)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A training output folder or a ``.safetensors`` file -> the weights file."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / MODEL_FILE
        if not f.exists():
            raise CheckpointError(f"{p} holds no {MODEL_FILE}: pass a `visionscale classify train` output folder "
                                  f"or a classifier .safetensors file")
        return f
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix.lower() != ".safetensors":
        raise CheckpointError(f"classifier checkpoints are .safetensors files or training folders, got {p}")
    return p


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata (empty dict when there is none)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError for garbage, OSError for unreadable
        raise CheckpointError(f"could not read {path} as safetensors: {exc}") from None


def load_config(path: str | os.PathLike) -> ClassifierConfig:
    """The classifier config stored in a checkpoint (header, else ``config.json`` beside it).

    Raises:
        InvalidCheckpointError: The config is not JSON or a field is missing, of the wrong type
            or out of range (the message names the file and the field).
    """
    file = resolve_checkpoint(path)
    meta = read_metadata(file)
    raw = meta.get("config")
    source = file
    if raw is None and (file.parent / CONFIG_FILE).exists():
        source = file.parent / CONFIG_FILE
        try:
            raw = source.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidCheckpointError(f"cannot read {source}: {exc}") from None
    elif raw is None:
        raise CheckpointError(f"{file} is not a visionscale classifier checkpoint (no config in its header "
                              f"and no {CONFIG_FILE} beside it)")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidCheckpointError(f"{source}: the classifier config is not valid JSON ({exc})") from None
    if source != file and isinstance(data, dict):
        data = data.get("model", data)  # a run's config.json nests it under "model"
    try:
        return ClassifierConfig.from_dict(data)
    except InvalidValueError as exc:
        raise InvalidCheckpointError(f"{source}: bad classifier config: {exc}") from None


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> Classifier:
    """Rebuild a trained classifier (eval mode) from a folder or ``.safetensors`` file."""
    file = resolve_checkpoint(path)
    cfg = load_config(file)
    model = Classifier(cfg, weights=None)
    load_into(model, load_state_dict(file), source=str(file))
    return model.to(device).eval()


def is_classifier_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a classifier checkpoint; a damaged one counts (loading it then says
    which file and field are wrong, instead of "not a checkpoint")."""
    try:
        load_config(path)
    except InvalidCheckpointError:
        return _says_classifier(resolve_checkpoint(path))
    except (CheckpointError, OSError, ValueError):
        return False
    return True


def _says_classifier(file: Path) -> bool:
    """The file's header or the run's ``config.json`` names the classifier format."""
    if read_metadata(file).get("format") == FORMAT:
        return True
    try:
        data = json.loads((file.parent / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("visionscale.classify.run/")

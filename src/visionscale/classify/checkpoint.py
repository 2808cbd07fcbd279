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
from visionscale.io.weights import load_into, load_state_dict, save_file_atomic

__all__ = ["FORMAT", "CheckpointError", "save_classifier", "load_classifier", "resolve_checkpoint", "read_metadata"]

FORMAT = "visionscale.classifier/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A path is not a usable classifier checkpoint."""


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
    """The classifier config stored in a checkpoint (header, else ``config.json`` beside it)."""
    file = resolve_checkpoint(path)
    meta = read_metadata(file)
    raw = meta.get("config")
    if raw is None and (file.parent / CONFIG_FILE).exists():
        data = json.loads((file.parent / CONFIG_FILE).read_text())
        raw_dict = data.get("model", data)
    elif raw is None:
        raise CheckpointError(f"{file} is not a visionscale classifier checkpoint (no config in its header "
                              f"and no {CONFIG_FILE} beside it)")
    else:
        raw_dict = json.loads(raw)
    try:
        return ClassifierConfig.from_dict(raw_dict)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad classifier config in {file}: {exc}") from None


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> Classifier:
    """Rebuild a trained classifier (eval mode) from a folder or ``.safetensors`` file."""
    file = resolve_checkpoint(path)
    cfg = load_config(file)
    model = Classifier(cfg, weights=None)
    load_into(model, load_state_dict(file), source=str(file))
    return model.to(device).eval()


def is_classifier_checkpoint(path: str | os.PathLike) -> bool:
    try:
        load_config(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return True

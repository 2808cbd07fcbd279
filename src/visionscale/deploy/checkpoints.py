"""Which trained model a path is, and loading it: the one place that knows every domain's files.

Tried in order, first match wins:

1. a folder with ``calibration.json``: an anomaly run written by ``visionscale ad fit``;
2. a classifier checkpoint (``visionscale classify train``);
3. a face-embedder checkpoint (``visionscale face train``);
4. a detector checkpoint (``visionscale detect train``); it gets the size it was trained and
   evaluated at as its ``model_info.input_size`` (its config has none: any size runs).

:func:`load_checkpoint` is registered as a path loader with the registry, so the runtime
(``Runner``, ``export``) loads these files through :func:`visionscale.registry.load_path`
without importing any domain.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from visionscale.modelinfo import model_info
from visionscale.registry import register_loader
from visionscale.runtime.errors import RunnerError


@register_loader
def load_checkpoint(path: str | Path) -> tuple[str, nn.Module] | None:
    """``(display name, module in eval mode)`` for a trained model at ``path``, or None when
    ``path`` is none of the files this project writes.

    Raises:
        RunnerError: ``path`` is one of them but does not load (the message says why).
    """
    path = Path(path)
    if path.is_dir() and (path / "calibration.json").is_file():
        from visionscale.anomaly.predict import RunError, load_run

        try:
            return path.name, load_run(path, device="cpu").model.eval()
        except RunError as exc:
            raise RunnerError(str(exc)) from None
    from visionscale.classify.checkpoint import CheckpointError, is_classifier_checkpoint, load_classifier

    if is_classifier_checkpoint(path):
        try:
            return display_name(path), load_classifier(path, device="cpu").eval()
        except CheckpointError as exc:
            raise RunnerError(str(exc)) from None
    return _embedder_or_detector(path)


def _embedder_or_detector(path: Path) -> tuple[str, nn.Module] | None:
    from visionscale.face.embedder import EmbedderCheckpointError, load_embedder, read_embedder_config

    file = path / "model.safetensors" if path.is_dir() else path
    try:
        read_embedder_config(file)
    except EmbedderCheckpointError:
        pass
    else:
        return display_name(path), load_embedder(file).eval()
    from visionscale.detection.train import TrainError, load_model

    try:
        model, meta = load_model(file)
    except (TrainError, OSError):
        return None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a detector file that does not load
        raise RunnerError(f"{file} looks like a detector checkpoint but cannot be loaded: {exc}") from None
    side = int(meta["config"]["image_size"])
    model.model_info = replace(model_info(model), input_size=(side, side))
    return display_name(path), model


def display_name(path: Path) -> str:
    """``run/model`` for ``run/model.safetensors``, ``run`` for a training folder."""
    path = path.resolve()
    return path.name if path.is_dir() else f"{path.parent.name}/{path.stem}"

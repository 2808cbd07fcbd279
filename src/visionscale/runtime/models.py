"""What a Runner, an export or a benchmark can be given as a model, and its input contract.

* an ``nn.Module``;
* a registry name (``visionscale models``): ``efficientad_s``, ``ssd_tiny``, ``blazeface_*``...;
* ``package.module:attr``: your own module or a factory returning one;
* a checkpoint written by ``visionscale classify train``, ``detect train`` or ``face train``
  (the ``model.safetensors`` file or its training folder);
* an anomaly-detection run folder written by ``visionscale ad fit``.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

from torch import nn

from visionscale.runtime.errors import ExportError, RunnerError

# Families whose forward cannot be exported with matching outputs, and why. Keyed by class
# name so this module imports none of the model packages.
NOT_EXPORTABLE: dict[str, str] = {}

# Example batch for ONNX export when the caller gives none (default 2: torch.export
# specialises axes of size 0/1, so batch 2 keeps the batch axis dynamic).
EXPORT_BATCH = {
    # PatchCore's memory-bank search loops over the batch in Python, so the batch axis is
    # fixed at export anyway; exported with batch 2 and dynamic H/W, the graph fails in
    # ONNX Runtime (a Resize gets wrong scales), with batch 1 it runs and H/W stay dynamic.
    "PatchCore": 1,
    # DDAD is exported with its sampling noise frozen for one shape (see freeze_for_export);
    # batch 1 lets a Runner score any batch image by image.
    "DDAD": 1,
}


# Families whose height and width are fixed by design: only the batch axis is offered as
# dynamic to torch.export.
STATIC_HW = {
    # BlazeFace's anchors are generated for its fixed 128 px (front) / 256 px (back) input,
    # so other sizes are meaningless; and with symbolic H/W, torch.export's shape solver
    # did not finish on the head reshapes within 10 minutes (sympy simplification).
    "BlazeFace",
}


def export_dynamic_axes(model: nn.Module) -> tuple[int, ...]:
    """Input axes offered to torch.export as dynamic (``Dim.AUTO``) for this model."""
    return (0,) if type(model).__name__ in STATIC_HW else (0, 2, 3)


def export_batch(model: nn.Module) -> int:
    inner = getattr(model, "model", None)  # a thin input wrapper (an anomaly run's DDAD)
    key = type(model).__name__ if type(model).__name__ in EXPORT_BATCH else type(inner).__name__
    return EXPORT_BATCH.get(key, 2)


def freeze_for_export(model: nn.Module, batch: int, height: int, width: int) -> tuple[nn.Module, str | None]:
    """Models whose forward draws random numbers get them frozen for the export shape.

    DDAD samples Gaussian noise from seeded generators at each DDIM step; a graph cannot hold
    torch's generator (ONNX RandomNormal uses the runtime's own), so the export holds the very
    draws the eager model makes for ``(batch, 3, height, width)``: outputs match eager exactly,
    at that shape only. Returns ``(model to export, note or None)``; ``model`` is not modified.
    """
    from visionscale.anomaly.ddad import DDAD, DDADFixedNoise

    note = (f"DDAD's sampling noise is frozen into the graph for inputs ({batch}, 3, {height}, {width}) (the draws "
            "of its seeded generators, so outputs equal eager ones); the graph accepts that shape only")
    if isinstance(model, DDAD):
        return DDADFixedNoise(model, batch, height, width), note
    inner = getattr(model, "model", None)
    if isinstance(inner, DDAD):  # e.g. an anomaly run's SignedInput wrapper
        wrapper = copy.copy(model)
        wrapper._modules = dict(model._modules)
        wrapper.model = DDADFixedNoise(inner, batch, height, width)
        return wrapper, note
    return model, None


def _import_object(spec: str) -> Any:
    """``"package.module:attr"`` -> the object (a user's model or model factory)."""
    from visionscale.registry import ModelImportError, import_model

    try:
        return import_model(spec)
    except ModelImportError as exc:
        raise RunnerError(str(exc)) from None


def _build(factory, name: str, kw: dict[str, Any]) -> nn.Module:
    from visionscale.registry import ModelImportError, build_model

    try:
        return build_model(factory, name, **kw)
    except ModelImportError as exc:
        raise RunnerError(str(exc)) from None


def _accepts(fn, name: str) -> bool:
    """True when ``fn`` names the parameter explicitly (``**kwargs`` may forward it to a config
    that has no such field, as BlazeFace's does)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def resolve_model(spec: nn.Module | str, image_size: tuple[int, int] | None = None,
                  model_kwargs: dict[str, Any] | None = None) -> tuple[str, nn.Module]:
    """``(display name, module in eval mode)`` for any of the accepted model specs.

    Raises:
        RunnerError: Unknown name, missing file, import failure (the message names it).
    """
    kw = dict(model_kwargs or {})
    if isinstance(spec, nn.Module):
        return type(spec).__name__, spec.eval()
    if not isinstance(spec, str) or not spec.strip():
        raise RunnerError(f"model must be an nn.Module, a registry name or 'package.module:attr', got {spec!r}")
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and (path / "calibration.json").is_file():
            from visionscale.anomaly.predict import RunError, load_run

            try:
                return path.name, load_run(path, device="cpu").model.eval()
            except RunError as exc:
                raise RunnerError(str(exc)) from None
        from visionscale.classify.checkpoint import (
            CheckpointError,
            is_classifier_checkpoint,
            load_classifier,
        )

        if is_classifier_checkpoint(path):
            try:
                return _display_name(path), load_classifier(path, device="cpu").eval()
            except CheckpointError as exc:
                raise RunnerError(str(exc)) from None
        trained = _trained_checkpoint(path)
        if trained is not None:
            return trained
        raise RunnerError(f"{path} is none of: an anomaly run folder (with calibration.json), a classifier, detector "
                          "or face-embedder checkpoint; give a registry name (visionscale models) or "
                          "'package.module:attr'")
    if ":" in spec:
        obj = _import_object(spec)
        if isinstance(obj, nn.Module):
            return spec, obj.eval()
        if image_size is not None and _accepts(obj, "image_size"):
            kw.setdefault("image_size", image_size[0] if image_size[0] == image_size[1] else image_size)
        return spec, _build(obj, spec, kw).eval()
    from visionscale.registry import UnknownModelError, get_model_factory

    try:
        factory = get_model_factory(spec)
    except UnknownModelError as exc:
        raise RunnerError(str(exc)) from None
    if image_size is not None and _accepts(factory, "image_size"):
        kw.setdefault("image_size", image_size[0] if image_size[0] == image_size[1] else image_size)
    try:
        return spec, _build(factory, spec, kw).eval()
    except TypeError as exc:  # raised inside the factory
        raise RunnerError(f"cannot build model {spec!r} with {kw}: {exc}") from None


# Files a training or anomaly run folder holds that loading it reads.
RUN_FILES = ("config.json", "calibration.json", "model.safetensors")


def model_files(spec: Any) -> list[Path]:
    """The files :func:`resolve_model` reads for ``spec``: what an export may never overwrite.

    Empty for a module, a registry name or ``package.module:attr``. For a checkpoint file, the
    file and the ``config.json`` beside it (a classifier's fallback config); for a folder, the
    run files in it.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        return []
    path = Path(str(spec).strip()).expanduser()
    if path.is_dir():
        files = [path / name for name in RUN_FILES]
    elif path.exists():
        files = [path, path.parent / "config.json"]
    else:
        return []
    return [f for f in files if f.exists()]


def _trained_checkpoint(path: Path) -> tuple[str, nn.Module] | None:
    """A face-embedder or detector checkpoint (file or training folder) as ``(name, module)``,
    or None when ``path`` is neither. A detector gets ``trained_image_size``, the side it was
    trained and evaluated at (its config has none: any size runs)."""
    from visionscale.face.embedder import EmbedderCheckpointError, load_embedder, read_embedder_config

    file = path / "model.safetensors" if path.is_dir() else path
    try:
        read_embedder_config(file)
    except EmbedderCheckpointError:
        pass
    else:
        return _display_name(path), load_embedder(file).eval()
    from visionscale.detection.train import TrainError, load_model

    try:
        model, meta = load_model(file)
    except (TrainError, OSError):
        return None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a detector file that does not load
        raise RunnerError(f"{file} looks like a detector checkpoint but cannot be loaded: {exc}") from None
    side = int(meta["config"]["image_size"])
    model.trained_image_size = (side, side)
    return _display_name(path), model


def _display_name(path: Path) -> str:
    """``run/model`` for ``run/model.safetensors``, ``run`` for a training folder."""
    path = path.resolve()
    return path.name if path.is_dir() else f"{path.parent.name}/{path.stem}"


def default_image_size(model: nn.Module, fallback: int = 256) -> tuple[int, int]:
    """The model's own input size when it declares one (``config.image_size``, or the
    ``trained_image_size`` of a loaded detector checkpoint), else ``fallback``."""
    trained = getattr(model, "trained_image_size", None)
    if trained is not None:
        return int(trained[0]), int(trained[1])
    size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return fallback, fallback


def validate_size(model: nn.Module, name: str, h: int, w: int) -> None:
    """The model's own ``validate_input_size`` check, as a RunnerError naming the model."""
    if h < 1 or w < 1:
        raise RunnerError(f"image size must be positive, got {h}x{w}")
    check = getattr(model, "validate_input_size", None)
    if check is not None:
        try:
            check(h, w)
        except ValueError as exc:
            raise RunnerError(f"model {name!r} cannot run at {h}x{w}: {exc}") from None


def export_refusal(model: nn.Module) -> str | None:
    """Why this model cannot be exported, or None."""
    return NOT_EXPORTABLE.get(type(model).__name__)


def check_exportable(model: nn.Module, name: str) -> None:
    reason = export_refusal(model)
    if reason:
        raise ExportError(f"model {name!r} cannot be exported: {reason}")


def in_channels(model: nn.Module, default: int = 3) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return default

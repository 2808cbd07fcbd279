"""What a Runner, an export or a benchmark can be given as a model, and its input contract.

* an ``nn.Module``;
* a registry name (``visionscale models``): ``efficientad_s``, ``ssd_tiny``, ``blazeface_*``...;
* ``package.module:attr``: your own module or a factory returning one;
* a path to a trained model: a checkpoint written by ``visionscale classify train``,
  ``detect train`` or ``face train`` (the ``model.safetensors`` file or its training folder),
  or an anomaly run folder written by ``visionscale ad fit``; loaded by the path loaders
  registered with :func:`visionscale.registry.register_loader` (``visionscale.deploy``).

The input contract (default size, channels, export batch, dynamic axes) is the model's own
:class:`visionscale.modelinfo.ModelInfo`: this module asks the model, it keeps no table of
model classes and imports no domain package.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

from torch import nn

from visionscale.modelinfo import input_size_problem, model_info
from visionscale.registry import import_model
from visionscale.runtime.errors import ExportError, RunnerError


def export_dynamic_axes(model: nn.Module) -> tuple[int, ...]:
    """Input axes offered to torch.export as dynamic (``Dim.AUTO``) for this model."""
    return tuple(model_info(model).dynamic_axes)


def export_batch(model: nn.Module) -> int:
    """Example batch for a graph export when the caller gives none (the model's own)."""
    return model_info(model).export_batch


def freeze_for_export(model: nn.Module, batch: int, height: int, width: int) -> tuple[nn.Module, str | None]:
    """The module a graph export holds for this shape, and a note, or ``(model, None)``.

    A model whose forward cannot be a graph as it is (DDAD draws random numbers) offers
    ``for_export(batch, height, width) -> (module, note)``; a thin input wrapper holding such
    a model as ``.model`` gets a copy wrapping the exported one. ``model`` is not modified.
    """
    hook = getattr(model, "for_export", None)
    if callable(hook):
        return hook(batch, height, width)
    inner = getattr(model, "model", None)
    hook = getattr(inner, "for_export", None)
    if isinstance(inner, nn.Module) and callable(hook):
        exported, note = hook(batch, height, width)
        wrapper = copy.copy(model)
        wrapper._modules = dict(model._modules)
        wrapper.model = exported
        return wrapper, note
    return model, None


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
        from visionscale.registry import load_path

        found = load_path(path)
        if found is None:
            raise RunnerError(f"{path} is none of: an anomaly run folder (with calibration.json), a classifier, "
                              "detector or face-embedder checkpoint; give a registry name (visionscale models) or "
                              "'package.module:attr'")
        name, net = found
        return name, net.eval()
    if ":" in spec:
        obj = import_model(spec)  # ModelImportError (a VisionscaleError) names the module
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
    except ImportError as exc:  # an optional package the model needs (timm) is not installed
        raise RunnerError(f"cannot build model {spec!r}: {exc}") from None


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


def default_image_size(model: nn.Module, fallback: int = 256) -> tuple[int, int]:
    """The model's own input size (:func:`visionscale.modelinfo.model_info`), else ``fallback``."""
    h, w = model_info(model, (fallback, fallback)).input_size
    return int(h), int(w)


def validate_size(model: nn.Module, name: str, h: int, w: int) -> None:
    """The model's own input-size check, as a RunnerError naming the model."""
    problem = input_size_problem(model, h, w)
    if problem is not None:
        raise RunnerError(f"model {name!r} cannot run at {h}x{w}: {problem}")


def export_refusal(model: nn.Module) -> str | None:
    """Why this model cannot be exported (its ``model_info.not_exportable``), or None."""
    return model_info(model).not_exportable


def check_exportable(model: nn.Module, name: str) -> None:
    reason = export_refusal(model)
    if reason:
        raise ExportError(f"model {name!r} cannot be exported: {reason}")


def in_channels(model: nn.Module, default: int = 3) -> int:
    """Input channels the model declares (``model_info.channels``)."""
    return model_info(model).channels

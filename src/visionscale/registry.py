"""A small explicit model registry (after torchvision's ``models/_api.py``).

Model files register factories with :func:`register_model`; nothing is discovered by
scanning. ``create("patchcore", image_size=512)`` builds a model, ``list_models("*tiny")``
lists names with an fnmatch pattern.

Trained models on disk (run folders, checkpoints) are loaded the same way: a loader
registered with :func:`register_loader` (``visionscale.deploy.checkpoints``, which knows
every domain's files) turns a path into a module, and :func:`load_path` asks the loaders.
So the runtime accepts a path without importing any domain: the registry names the modules
to import, by string, and imports them on first use.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from visionscale.errors import VisionscaleError

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Modules whose import registers models. Listed explicitly, imported on first use, so
# that `import visionscale.registry` stays cheap and there is no import-time scanning.
_MODEL_MODULES = (
    "visionscale.nn.resnet",
    "visionscale.anomaly.patchcore",
    "visionscale.anomaly.efficientad",
    "visionscale.anomaly.ddad",
    "visionscale.detection.model",
    "visionscale.face.blazeface",
    "visionscale.face.embedder",
    "visionscale.face.dlib_embedder",
)
_loaded = False

PathLoader = Callable[[Path], "tuple[str, nn.Module] | None"]
_LOADERS: list[PathLoader] = []
# Modules whose import registers path loaders; imported on first load_path().
_LOADER_MODULES = ("visionscale.deploy.checkpoints",)
_loaders_loaded = False


class UnknownModelError(VisionscaleError, KeyError):
    """Raised for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def register_model(name: str | None = None) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name`` (default: function name)."""

    def wrap(fn: F) -> F:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return wrap


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for mod in _MODEL_MODULES:
            importlib.import_module(mod)
        _loaded = True


def register_loader(fn: PathLoader) -> PathLoader:
    """Decorator registering ``fn(path) -> (display name, module) | None`` as a path loader:
    it returns None for a path it does not recognise and raises a VisionscaleError for one
    it recognises but cannot load."""
    if fn not in _LOADERS:
        _LOADERS.append(fn)
    return fn


def load_path(path: str | Path) -> tuple[str, nn.Module] | None:
    """The first registered loader's ``(display name, module)`` for ``path``, or None when no
    loader recognises it."""
    global _loaders_loaded
    if not _loaders_loaded:
        for mod in _LOADER_MODULES:
            importlib.import_module(mod)
        _loaders_loaded = True
    for loader in _LOADERS:
        found = loader(Path(path))
        if found is not None:
            return found
    return None


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching an fnmatch ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_model_factory(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Keyword arguments go to its factory."""
    return build_model(get_model_factory(name), name, **kwargs)


class ModelImportError(VisionscaleError, ValueError):
    """A ``package.module:attr`` model spec names a module or attribute that cannot be loaded."""


class NotAModelError(ModelImportError, TypeError):
    """A model spec names something that is not an ``nn.Module`` nor a function returning one, or
    a factory that cannot take the arguments given (a ``TypeError``, as calling it would raise)."""


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}" if type(obj).__module__ != "builtins" \
        else type(obj).__name__


def build_model(factory: Callable[..., Any], name: str, **kwargs) -> nn.Module:
    """``factory(**kwargs)``, checked: the arguments fit its signature and the result is an ``nn.Module``.

    Raises:
        NotAModelError: The factory cannot take ``kwargs`` or returned something else (named).
    """
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise NotAModelError(f"model {name!r} cannot be built with arguments {kwargs}: {exc}") from None
    except ValueError:  # no signature (some builtins): let the call decide
        pass
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise NotAModelError(f"model {name!r} is not a model: calling it returned {_describe(model)} "
                             f"{_short_repr(model)}, not a torch.nn.Module")
    return model


def _short_repr(obj: Any) -> str:
    text = repr(obj)
    return f"({text[:60]}...)" if len(text) > 60 else f"({text})"


def import_model(spec: str) -> nn.Module | Callable[..., nn.Module]:
    """``"package.module:attr"`` -> an ``nn.Module`` or a callable to build one with :func:`build_model`.

    Raises:
        ModelImportError: The module does not import or has no such attribute.
        NotAModelError: The attribute is neither a module nor callable (say a number or a string).
    """
    obj = import_object(spec)
    if isinstance(obj, nn.Module) or callable(obj):
        return obj
    raise NotAModelError(f"model {spec!r} is a {_describe(obj)}, not a torch.nn.Module or a function returning one")


def import_object(spec: str) -> object:
    """``"package.module:attr"`` (attr may be dotted) -> the object: a user's model or model
    factory, for the commands that accept models outside the registry.

    Raises:
        ModelImportError: The module does not import or has no such attribute (the message says which).
    """
    module_name, _, attr = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelImportError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    except Exception as exc:  # the user's module fails while importing (SyntaxError, its own errors)
        raise ModelImportError(f"cannot import {module_name!r} for model {spec!r}: "
                               f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            raise ModelImportError(f"model {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj

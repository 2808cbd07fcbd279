"""visionscale: resolution scalability of vision models, anomaly detection, faces.

``import visionscale`` imports nothing heavy: ``create`` and ``list_models`` (the model
registry, which needs torch) and ``load_bundle`` (a deployment bundle's predictor, which needs
only onnxruntime, numpy and Pillow) are loaded on first use, so a process without torch can
``import visionscale; visionscale.load_bundle(path)``.
"""

__version__ = "0.1.0"

_LAZY = {
    "create": "visionscale.registry",
    "list_models": "visionscale.registry",
    "load_bundle": "visionscale.bundle",
    "write_bundle": "visionscale.bundle",
}

__all__ = ["create", "list_models", "load_bundle", "write_bundle", "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'visionscale' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

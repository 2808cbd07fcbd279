"""visionscale: resolution scalability of vision models, anomaly detection, faces."""

__version__ = "0.1.0"

from visionscale.registry import create, list_models  # noqa: E402

__all__ = ["create", "list_models", "__version__"]

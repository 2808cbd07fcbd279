"""HTTP service: anomaly scoring and faces behind FastAPI, with dynamic batching and a web page.

``create_app(target, gallery=None, api_key=None, limits=ServeLimits())`` builds the app;
``visionscale serve`` runs it with uvicorn. FastAPI, uvicorn and python-multipart are the
``serve`` extra. See docs/serve.md.
"""

from __future__ import annotations

__all__ = ["create_app", "ServeLimits"]


def __getattr__(name: str):
    if name in __all__:
        from visionscale.serve import app

        return getattr(app, name)
    raise AttributeError(name)

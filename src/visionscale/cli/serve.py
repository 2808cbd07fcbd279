"""``visionscale serve TARGET``: the HTTP service (FastAPI run by uvicorn) and its web page.

A thin layer over :func:`visionscale.serve.create_app`: parse, build the app (a bad run folder,
bundle or gallery fails here, before the port is opened), run uvicorn. docs/serve.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from visionscale.cli._common import fail, note
from visionscale.cli._options import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_PRECISION, Backend, Device, Precision


def serve_cmd(
    target: str = typer.Argument(..., help="A run folder (`ad fit`'s), an anomaly bundle (a folder holding "
                                           "bundle.json, or its .tar/.zip), 'face' to serve faces only, or a face "
                                           "bundle (`export face --bundle`: faces without torch)."),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="Face gallery .db (created if missing): adds "
                                                                   "face detect / identify / verify / enroll."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Name of an environment variable holding "
                                                                          "the API key that write endpoints "
                                                                          "(enroll, remove) require as X-API-Key."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most concurrent requests run in one model call."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", help="Longest wait for more requests to batch."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body, MiB (413 above)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image, width x height (413 above)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds a request may wait for its model (504 after)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Most requests waiting per model (503 above)."),
    face_model: str = typer.Option("face_embedder_dlib", "--face-model", help="Face descriptor: registry name, "
                                                                              "checkpoint or face bundle folder."),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level (warning: no access log)."),
) -> None:
    """Serve anomaly scoring and/or faces over HTTP, with a web page at / and OpenAPI docs at /docs."""
    try:
        import uvicorn  # noqa: F401
        from visionscale.serve import ServeLimits, create_app
    except ImportError as exc:
        fail(f"serving needs FastAPI, uvicorn and python-multipart ({exc}); pip install 'visionscale[serve]'")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            fail(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    limits = ServeLimits(max_upload_bytes=max(1, int(max_upload_mb * 2**20)), max_pixels=max_pixels,
                         timeout_s=timeout, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    app = create_app(target, gallery=gallery, api_key=api_key, limits=limits, face_model=face_model, device=device,
                     backend=backend, precision=precision)
    if api_key is None and gallery is not None and host not in ("127.0.0.1", "localhost", "::1"):
        note(f"listening on {host} without an API key: anyone who reaches it can enroll into {gallery}")
    uvicorn.run(app, host=host, port=port, log_level=log_level)

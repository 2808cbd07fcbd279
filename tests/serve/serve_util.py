"""Helpers of the service tests (imported by name: a module called ``conftest`` would clash with
the other test folders' conftest files when several folders run in one pytest session)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

FACE_DATA = Path(__file__).resolve().parents[1] / "face" / "data" / "dlib"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, timeout_s: float = 120.0):
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port until /readyz says ready;
    yields the base URL, stops the server after."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server on {base} did not get ready")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)

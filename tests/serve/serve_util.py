"""Helpers of the service tests (imported by name: a module called ``conftest`` would clash with
the other test folders' conftest files when several folders run in one pytest session)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FACE_DATA = Path(__file__).resolve().parents[1] / "face" / "data" / "dlib"
SRC = Path(__file__).resolve().parents[2] / "src"


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


@contextlib.contextmanager
def serving_process(args: list[str], port: int, timeout_s: float = 120.0):
    """Run ``python ARGS`` (a server listening on ``port``, with this checkout's ``src`` on the
    path) until /readyz says ready; yields the base URL, terminates the process after. Fails
    with the server's stderr when it exits before, or after ``timeout_s``."""
    import httpx

    proc = subprocess.Popen([sys.executable, *args], env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"the server did not get ready in {timeout_s:g} s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


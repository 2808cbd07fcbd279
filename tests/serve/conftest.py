"""Fixtures of the service tests: a tiny fitted run and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")


@pytest.fixture(scope="session")
def tiny_run(brick_demo, tmp_path_factory):
    """A PatchCore tiny run fitted on the 64 px brick demo (a few seconds)."""
    import torch

    from visionscale.anomaly import train as T

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("serve_runs") / "tiny"
        T.fit_patchcore(brick_demo, run, T.FitConfig(model="patchcore_tiny", image_size=64, batch_size=4,
                                                     device="cpu"))
    finally:
        torch.set_num_threads(n)
    return run


@pytest.fixture(scope="session")
def demo_images(brick_demo):
    return sorted((brick_demo / "test").rglob("*.png"))

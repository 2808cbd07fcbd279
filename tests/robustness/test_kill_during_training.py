"""kill -9 during training: the run resumes to exactly the weights of an uninterrupted run.

Two deterministic kill points, in a real child process (SIGKILL cannot be caught, so nothing
in the process gets to clean up): right after an epoch's checkpoint, and in the middle of
writing a checkpoint (between its temporary file and the rename that publishes it).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ("TrainConfig(backbone='resnet_tiny', image_size=32, batch_size=8, epochs=3, device='cpu', seed=0, "
       "augment=AugmentConfig(rotation=10, hflip=True), dropout=0.2)")


def _train(data, out, *, kill: str | None = None, resume: bool = False) -> int:
    killer = {
        None: "",
        "after_epoch": "on_epoch = lambda row: os.kill(os.getpid(), signal.SIGKILL) if row['epoch'] == 2 else None",
        # The second checkpoint rename of epoch 2 (the first is epoch 1's): the temporary file is
        # complete and fsynced, the rename never happens.
        "mid_write": textwrap.dedent("""
            import visionscale.io.atomic as A
            real, calls = os.replace, []
            def replace(src, dst):
                calls.append(str(dst))
                if str(dst).endswith('.safetensors') and sum(c.endswith('.safetensors') for c in calls) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst)
            A.os.replace = replace
            """),
    }[kill]
    code = textwrap.dedent("""
        import os, signal, torch
        torch.set_num_threads(1)
        from visionscale.classify.train import TrainConfig, train
        from visionscale.classify.data import AugmentConfig
        on_epoch = None
        """) + killer + textwrap.dedent(f"""
        train({str(data)!r}, {str(out)!r}, {CFG}, resume={resume}, on_epoch=on_epoch)
        """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).returncode


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from visionscale.classify.demo import make_demo

    root = tmp_path_factory.mktemp("kill") / "textures"
    make_demo(root, train_per_class=6, test_per_class=2, size=32, seed=0)
    return root / "train"


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert _train(data, out) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("kill", ["after_epoch", "mid_write"])
def test_kill_9_then_resume_gives_the_uninterrupted_weights(data, uninterrupted, tmp_path, kill):
    out = tmp_path / "run"
    assert _train(data, out, kill=kill) == -9  # really killed
    assert not any(p.name.endswith(".tmp") and p.stat().st_size == 0 for p in out.iterdir())
    assert _train(data, out, resume=True) == 0
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == uninterrupted.keys()
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got)

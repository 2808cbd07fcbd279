"""Fixtures shared by several test files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tests/numerics.py (shared float comparisons) is importable from every test folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: on a shared 2-core machine a second
    thread only adds waiting (tiny DDAD steps ran 10-50x slower with two threads fighting other jobs).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def brick_demo(tmp_path_factory):
    """A 64 px demo ``brick`` category in the MVTec layout: 10 good training images, 3 good and one
    of each defect type in the test set, with masks. Shared: copy it before changing anything."""
    from visionscale.anomaly.synthetic import make_demo

    root = tmp_path_factory.mktemp("brick_demo")
    make_demo(root, seed=0, size=64, categories=["brick"], num_train=10, num_test_good=3, num_test_defect=1)
    return root / "brick"

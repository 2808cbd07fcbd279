"""The fault-and-bad-input suite: every test here is marked ``robustness`` (CI runs them all)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.robustness)


try:  # bounded property tests: the same budget on a developer's machine and on CI's 2 cores
    from hypothesis import HealthCheck, settings

    settings.register_profile("visionscale", max_examples=60, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.load_profile("visionscale")
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass

"""Fixtures of the anomaly tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def demo(brick_demo):
    """The shared 64 px brick demo (tests/conftest.py); modules that need other data override it."""
    return brick_demo

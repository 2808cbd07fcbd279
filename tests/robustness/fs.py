"""Small file systems made inside a test: a full one (ENOSPC) and a read-only one (EROFS).

They need root and a kernel that lets this sandbox mount tmpfs; elsewhere the tests that use
them are skipped with the reason (permission checks with chmod mean nothing to root, so a real
read-only mount is the honest test).
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(target: Path, options: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root")


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextmanager
def small_fs(folder: Path, size: str = "64k"):
    """A tmpfs of ``size`` mounted at ``folder`` (created); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    _mount(folder, f"size={size}")
    try:
        yield folder
    finally:
        _umount(folder)


@contextmanager
def read_only_fs(folder: Path, files: dict[str, bytes] | None = None):
    """A tmpfs at ``folder`` holding ``files``, then remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    _mount(folder, "size=16m")
    try:
        for name, data in (files or {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        r = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield folder
    finally:
        _umount(folder)

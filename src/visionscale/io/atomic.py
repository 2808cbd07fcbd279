"""Atomic file output: write to a temporary file beside the target, fsync, then rename.

Readers see either the old file or the complete new one; an error (or Ctrl-C) midway leaves
the old file untouched and no temporary file behind. ``tempfile`` creates files and folders
private to the user (0600 / 0700); :func:`publish` gives them the permissions a plain
``open()`` / ``mkdir()`` would have (0666 / 0777 minus the umask) before the rename.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike) -> None:
    """Give a file or folder made by ``tempfile`` the default permissions of a new one."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    The caller writes the complete file to the yielded path (any library that takes a file
    name works). On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        publish(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)

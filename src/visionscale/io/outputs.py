"""Outputs that never destroy what the user owns.

Three mechanisms, used by every command that writes:

* :func:`check_output_file` before the work starts: the output is not one of the inputs
  (never, even with ``overwrite``), is not an existing file unless ``overwrite`` is set, and its
  folder exists (or can be made) and is writable. A command checks this *before* a long export
  or study, so a bad ``--out`` fails in milliseconds, not after the work.
* :class:`OutputDir` for a folder of results (``scale --out``, ``ad predict --out``, demo data):
  files are written into a hidden staging folder beside the target and moved into place only
  when everything succeeded, so a failed command leaves no partial folder and a rerun leaves no
  stale files from the previous one. A folder that holds files visionscale did not write is
  refused unless ``overwrite`` is set (then only the files of the same name are replaced).
  Which files visionscale wrote is recorded in a manifest, ``.visionscale-output.json``.
* :class:`RunLock` (``fcntl.flock`` on ``<folder>/.lock``) for folders written over a long time
  (training runs, galleries): a second process gets :class:`RunLockedError` at once instead of
  interleaving its writes. The kernel drops the lock when the process dies, ``kill -9`` too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from visionscale.errors import OutputError, OutputExistsError, RunLockedError, SameAsInputError
from visionscale.io.atomic import publish, write_atomic

__all__ = ["check_output_file", "check_writable_dir", "ensure_output_dir", "OutputDir", "RunLock", "MANIFEST",
           "foreign_files", "read_manifest", "is_our_scratch", "refuse_foreign", "record_files"]

MANIFEST = ".visionscale-output.json"
LOCK = ".lock"
# io.atomic's temporary files: ".<name>.<8 random chars>.tmp". One is left behind only when a
# process was killed mid-write (kill -9, power loss); it is ours, never the user's.
_SCRATCH = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def is_our_scratch(name: str) -> bool:
    """True for the lock file and for a temporary file a killed atomic write left behind."""
    return name == LOCK or bool(_SCRATCH.match(name))


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve()


def check_writable_dir(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Raise :class:`OutputError` unless ``folder`` is (or can be created as) a writable folder."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise OutputError(f"{what} {folder}: {probe} is a broken link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise OutputError(f"{what} {folder}: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder}: {probe} is not writable (permission denied or read-only)")
    return folder


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` if needed and prove it is writable (a probe file), before work.

    For commands that write single files into a folder one by one (training runs); a folder of
    results written at the end uses :class:`OutputDir` instead.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return path


def check_output_file(path: str | os.PathLike, *, inputs=(), overwrite: bool = False,
                      what: str = "output") -> Path:
    """Check, before any work, that writing ``path`` loses nothing; return it as a ``Path``.

    Args:
        path: the file the command will write (atomically).
        inputs: files or folders the command reads; ``path`` may be none of them, nor a file
            inside an input folder that the command reads (pass those files explicitly).
        overwrite: allow replacing an existing file that is not an input.
        what: how the message names the output.
    """
    path = Path(path)
    for item in inputs:
        if item is not None and _same(path, Path(item)):
            raise SameAsInputError(f"{what} {path} is the input {item}: writing it would destroy the "
                                   f"input; choose another output path")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; choose another path or allow overwriting it")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what=f"folder of {what} {path}")
    return path


def read_manifest(folder: Path) -> dict | None:
    """The manifest visionscale left in ``folder``, or ``None`` (missing or unreadable)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def foreign_files(folder: str | os.PathLike, kind: str) -> list[str]:
    """Files in ``folder`` that an earlier ``kind`` output did not write (relative paths)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    manifest = read_manifest(folder)
    ours = set(manifest["files"]) if manifest and manifest.get("kind") == kind else set()
    ours.add(MANIFEST) if manifest and manifest.get("kind") == kind else None
    return [f for f in _listing(folder) if f not in ours and not is_our_scratch(Path(f).name)]


def refuse_foreign(folder: str | os.PathLike, kind: str, *, overwrite: bool = False,
                   writer: str = "visionscale") -> None:
    """Raise :class:`OutputExistsError` if ``folder`` holds files no ``kind`` output wrote, unless
    ``overwrite``; ``writer`` names who would have written them in the message."""
    foreign = foreign_files(folder, kind)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputExistsError(f"output folder {folder} holds files {writer} did not write "
                                f"({shown}); choose an empty or new folder, or allow overwriting")


def record_files(folder: str | os.PathLike, kind: str, files, *, replace: bool = False) -> None:
    """Add ``files`` (relative paths) to ``folder``'s manifest for ``kind``, *before* writing them,
    so a rerun or a resume knows them as ours. ``replace`` first deletes the files an earlier
    ``kind`` output listed (replacing a run) and starts a new list."""
    folder = Path(folder)
    old = read_manifest(folder)
    ours = set(old["files"]) if old and old.get("kind") == kind else set()
    if replace:
        for rel in sorted(ours):
            try:
                (folder / rel).unlink()
            except (FileNotFoundError, IsADirectoryError):
                pass
        ours = set()
    manifest = {"kind": kind, "files": sorted(ours | set(files))}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


class OutputDir:
    """Write a folder of results all at once, or not at all.

    Use as a context manager; inside, write every file under :attr:`path` (a staging folder).
    On success the files move into ``target``; on any exception the staging folder is removed
    and ``target`` is exactly as it was::

        with OutputDir(out, kind="scale", overwrite=False) as tmp:
            (tmp / "results.json").write_text(...)

    A ``target`` that holds files visionscale did not write for this ``kind`` raises
    :class:`OutputExistsError` when the object is made, before any work, unless ``overwrite``.
    Files a previous ``kind`` output wrote and this one does not are removed (no stale results).

    ``staging``: a folder of the caller's to stage in instead of a fresh temporary one (a job
    that resumes: :mod:`visionscale.engines.resume`). It is kept on an exception, with what was
    written so far, and removed after a successful move.
    """

    def __init__(self, target: str | os.PathLike, *, kind: str, overwrite: bool = False,
                 staging: str | os.PathLike | None = None):
        self.target = Path(target)
        self.kind = kind
        self.overwrite = overwrite
        self._staging = Path(staging) if staging is not None else None
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"output folder {self.target} exists and is not a folder")
        check_writable_dir(self.target)
        refuse_foreign(self.target, kind, overwrite=overwrite)
        self.path: Path | None = None

    def __enter__(self) -> Path:
        parent = self.target.parent
        # Folders this creates on the way, so that a failure can take them away again.
        self._created = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        if self._staging is not None:
            self._staging.mkdir(parents=True, exist_ok=True)
            self.path = self._staging
        else:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".partial", dir=parent))
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        staging = self.path
        assert staging is not None
        if exc_type is not None:
            if self._staging is not None:  # the caller's: kept for a resume
                return False
            shutil.rmtree(staging, ignore_errors=True)
            for folder in self._created:  # deepest first; only while empty (another process may use it)
                try:
                    folder.rmdir()
                except OSError:
                    break
            return False
        try:
            self._commit(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return False

    def _commit(self, staging: Path) -> None:
        new_files = _listing(staging)
        manifest = {"kind": self.kind, "files": new_files}
        write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        for root, dirs, _ in os.walk(staging):
            for d in dirs:
                publish(os.path.join(root, d))
        if not self.target.exists():
            publish(staging)
            os.replace(staging, self.target)
            self.path = None
            return
        old = read_manifest(self.target)
        if old and old.get("kind") == self.kind:
            # Remove what the previous output of this kind wrote and this one does not.
            for rel in old["files"]:
                if rel not in new_files:
                    try:
                        (self.target / rel).unlink()
                    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                        pass
        for rel in new_files + [MANIFEST]:
            dst = self.target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_dir():
                raise OutputError(f"cannot write {dst}: a folder of that name is in the way")
            os.replace(staging / rel, dst)
        # Empty folders left by removed stale files.
        for root, dirs, files in sorted(os.walk(self.target), key=lambda t: -len(t[0])):
            if root != str(self.target) and not dirs and not files:
                try:
                    os.rmdir(root)
                except OSError:
                    pass


class RunLock:
    """An exclusive, non-blocking lock on a folder (a training run, a gallery) for one process.

    ``with RunLock(folder, what="run folder"):`` raises :class:`RunLockedError` at once if
    another process holds it. The lock file ``.lock`` stays (it holds the last owner's pid); the
    lock itself lives in the kernel and vanishes with the process, however it ends.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "run folder", name: str = LOCK):
        self.folder = Path(folder)
        self.what = what
        self.file = self.folder / name
        self._fh = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.file, "a+")
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the folder checks still apply
            self._fh = fh
            return self
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            fh.close()
            raise RunLockedError(f"{self.what} {self.folder} is in use by another visionscale process "
                                 f"(pid {owner}); wait for it to finish or use another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

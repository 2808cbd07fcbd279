"""A folder of per-item results that an interrupted job fills again without redoing finished items.

:class:`ResumableOutput` stages a job's files in ``.<out>.<kind>.resume/`` beside the output
folder (``files/``: the outputs as they will be published; ``done/<index>.json``: one marker per
finished item, written atomically *after* that item's files), and moves ``files/`` into place
only when every item is done, through :class:`~visionscale.io.outputs.OutputDir` (same manifest,
same refusal of a folder holding the user's files, same removal of an earlier output's stale
files). A job that stops (an error, Ctrl-C, ``kill -9``) leaves the resume folder; the next run
with the same arguments (the *fingerprint*: inputs with their sizes and times, the model's
files, the options that change outputs) skips every item with a marker. Another fingerprint
discards the old state and starts over. An item whose files were written but whose marker was
not is simply done again: every file is written atomically, so none is ever half written.
A :class:`~visionscale.io.outputs.RunLock` keeps two processes out of one resume folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from visionscale.io.atomic import write_atomic
from visionscale.io.outputs import OutputDir, RunLock

__all__ = ["ResumableOutput", "file_facts"]

JOB = "job.json"


def file_facts(path: str | os.PathLike) -> list:
    """``[absolute path, size, mtime_ns]`` of a file (``None`` s when it cannot be read) for a fingerprint."""
    p = Path(path)
    try:
        st = p.stat()
        return [str(p.absolute()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p.absolute()), None, None]


class ResumableOutput:
    """Use as a context manager around a job; see the module doc.

    Args:
        target: The output folder.
        kind: The output's kind (``ad-predict``, ``face-detect``), as :class:`OutputDir` records it.
        fingerprint: JSON-able facts that decide whether earlier markers are valid.
        overwrite: As :class:`OutputDir`.
    """

    def __init__(self, target: str | os.PathLike, *, kind: str, fingerprint: dict, overwrite: bool = False):
        self.target = Path(target)
        self.kind = kind
        self.state = self.target.parent / f".{self.target.name}.{kind}.resume"
        self.key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        # Refuses a folder holding the user's files now, before any work.
        self.output = OutputDir(self.target, kind=kind, overwrite=overwrite, staging=self.state / "files")
        self._lock = RunLock(self.state, what="resume folder")
        self.files: Path | None = None
        self.resumed = 0  # items found finished when the job started
        self.discarded = False  # earlier state of other arguments was thrown away

    @property
    def done_dir(self) -> Path:
        return self.state / "done"

    def __enter__(self) -> "ResumableOutput":
        self._lock.acquire()  # creates the state folder
        try:
            try:
                job = json.loads((self.state / JOB).read_text())
            except (OSError, ValueError):
                job = None
            if not isinstance(job, dict) or job.get("key") != self.key:
                self.discarded = job is not None
                for sub in ("files", "done"):
                    shutil.rmtree(self.state / sub, ignore_errors=True)
                write_atomic(self.state / JOB, json.dumps({"kind": self.kind, "key": self.key}).encode())
            self.done_dir.mkdir(exist_ok=True)
            self.files = self.output.__enter__()
            self.resumed = len(self.finished())
        except BaseException:
            self._lock.release()
            raise
        return self

    def finished(self) -> dict[int, dict]:
        """``{index: payload}`` of the items marked done (an unreadable marker counts as not done)."""
        out = {}
        for p in self.done_dir.glob("*.json"):
            try:
                out[int(p.stem)] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
        return out

    def mark_done(self, index: int, payload: dict) -> None:
        """Record item ``index`` as finished; call after its files are written."""
        write_atomic(self.done_dir / f"{index:09d}.json", json.dumps(payload).encode())

    def write_file(self, name: str, data: bytes) -> Path:
        """Write one output file into the staging folder, atomically."""
        assert self.files is not None
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"not a plain file name: {name!r}")
        dst = self.files / name
        write_atomic(dst, data)
        return dst

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.output.__exit__(exc_type, exc, tb)  # success: files/ moved into the target
            if exc_type is None:
                shutil.rmtree(self.state, ignore_errors=True)
        finally:
            self._lock.release()
        return False

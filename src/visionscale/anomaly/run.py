"""The run folder a fit writes, as one object: claim, open, stage, save state, finish.

Every method's fit is a sequence of stages over a :class:`FitRun`::

    with FitRun.claim(out, overwrite=..., log=..., progress=...) as run:
        ds = run.load_data(data, category, cfg.seed)
        train, holdout = run.threshold_holdout(ds, cfg, "the memory bank")
        if run.open(cfg, ds, train, holdout):       # a complete run of the same fit is there
            return run.finished()
        run.write_config(device, weights="...", method="...")
        ... stages, each marked done with run.mark(name, ...) ...
        return run.finish(calibrate(...), seconds)

Run folder::

    config.json          model, sizes, seed, method fields, data (root, category, counts, fingerprint)
    versions.json        python, torch, numpy, visionscale, platform, device
    model.safetensors    the fitted model (PatchCore: backbone + memory bank)
    teacher.safetensors  EfficientAD with a distilled teacher
    calibration.json     image/pixel thresholds and normalisation range, and their source
    metrics.json         test-set metrics (labelled test set only)
    state.json           finished stages, seconds, peak memory, skipped files, notes
    cache/, checkpoints/ what an interrupted fit resumes from

A rerun with the same fit (:meth:`FitConfig.identity` and the training images'
fingerprint) resumes; a different fit is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from visionscale.anomaly.calibration import Calibration
from visionscale.anomaly.config import FIT_MODELS, FitConfig, FitError, FitResult, Log, Progress
from visionscale.anomaly.data import ADDataset, Sample, load_dataset
from visionscale.errors import InvalidFileError, OutputExistsError
from visionscale.io.atomic import write_atomic
from visionscale.io.outputs import RunLock
from visionscale.io.weights import save_file_atomic

__all__ = ["FitRun", "RUN_FILES", "RUN_FOLDERS", "peak_rss_bytes", "is_oom", "out_of_memory_as", "split_holdout",
           "training_oom_error", "write_json"]

RUN_FILES = ("config.json", "versions.json", "model.safetensors", "teacher.safetensors", "calibration.json",
             "metrics.json", "state.json")
RUN_FOLDERS = ("cache", "checkpoints")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``getrusage``; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory (CUDA, or the CPU allocator)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def out_of_memory_as(make_error: Callable[[], FitError]) -> Iterator[None]:
    """Turn running out of memory inside the block into ``make_error()`` (which names the knobs)."""
    try:
        yield
    except BaseException as exc:
        if is_oom(exc):
            raise make_error() from None
        raise


def training_oom_error(stage: str, cfg: FitConfig, device: torch.device) -> FitError:
    """Out of memory in a method that trains (EfficientAD, DDAD): the knobs that lower it."""
    h, w = cfg.image_size
    return FitError(f"out of memory during {stage} on {device}: lower batch_size (now {cfg.batch_size}) or "
                    f"image_size (now {w}x{h}); steps (now {cfg.steps}) sets how long training runs, not its "
                    f"memory, but fewer steps finish sooner. A different batch size or image size is a new fit: "
                    f"give it a new run folder (out)").about("batch_size", "image_size", "steps", "out")


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def split_holdout(samples: list[Sample], fraction: float, seed: int, minimum: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): a seeded ``fraction`` of ``samples`` (at least ``minimum``), order kept."""
    n_hold = max(minimum, round(fraction * len(samples)))
    picked = set(random.Random(seed).sample(range(len(samples)), n_hold))
    return ([s for i, s in enumerate(samples) if i not in picked], [s for i, s in enumerate(samples) if i in picked])


def _versions(device: torch.device) -> dict:
    import visionscale

    info = {
        "visionscale": visionscale.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _data_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        try:
            size = s.path.stat().st_size
        except OSError:
            size = -1
        h.update(f"{s.path.name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _run_config(path: Path) -> dict | None:
    """The ``config.json`` of a run visionscale fitted, or None (missing, unreadable, someone else's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("model") in FIT_MODELS and isinstance(data.get("image_size"), list):
        return data
    return None


def _read_run_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidFileError(f"invalid run file {path}: not valid JSON ({exc}); the file was edited or is "
                               f"corrupt: delete the run folder {path.parent} to fit again") from None
    if not isinstance(data, dict):
        raise InvalidFileError(f"invalid run file {path}: expected a JSON object, got {type(data).__name__}; "
                               f"delete the run folder {path.parent} to fit again")
    return data


def _has_progress(run: Path) -> bool:
    """Whether ``run`` holds anything a rerun would resume from (weights, checkpoints, features)."""
    if any((run / name).is_file() for name in ("model.safetensors", "teacher.safetensors")):
        return True
    if (run / "checkpoints").is_dir() and any(p.is_file() for p in (run / "checkpoints").rglob("*")):
        return True
    try:
        return json.loads((run / "cache" / "progress.json").read_text()).get("rows", 0) > 0
    except (OSError, ValueError, AttributeError):
        return False


def _remove_new_entries(run: Path, before: set[str]) -> None:
    try:
        added = set(os.listdir(run)) - before
    except OSError:
        return
    for name in added:
        target = run / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _clear_run(run: Path) -> None:
    """Remove the files a run consists of (``overwrite``), nothing else."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run / name, ignore_errors=True)


_logger = logging.getLogger(__name__)


class FitRun:
    """One run folder while a fit writes it: what it holds (``state``), what the user is told (``notes``).

    Made by :meth:`claim`, which holds the folder's lock for the whole fit.
    """

    def __init__(self, path: Path, *, overwrite: bool = False, log: Log | None = None,
                 progress: Progress | None = None):
        self.path = path
        self.overwrite = overwrite
        # Messages go to the caller's ``log`` if given, else to this module's logger (the CLI
        # renders INFO as "note:" and WARNING as "warning:").
        self._log = log
        self.say: Log = log or _logger.info
        self.tick: Progress = progress or (lambda stage, done, total: None)
        self.notes: list[str] = []
        self.state: dict = {}
        self.record: dict = {}
        self.cfg: FitConfig | None = None

    @classmethod
    @contextlib.contextmanager
    def claim(cls, out: str | os.PathLike, *, overwrite: bool = False, log: Log | None = None,
              progress: Progress | None = None) -> Iterator[FitRun]:
        """Hold the lock on the run folder ``out`` while the block fits into it.

        Before the lock is taken (taking it creates the folder and its ``.lock``): a folder
        with anything in it but a run of ours is refused unless ``overwrite``. A failure
        before anything resumable was saved removes what this fit created: the folder (and
        missing parents) if it was new, else the entries it added.
        """
        run = Path(out).expanduser()
        if run.exists() and not run.is_dir():
            raise FitError(f"run folder {run} exists and is not a folder")
        top = run  # the outermost folder this call creates
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        before = set(os.listdir(run)) if run.is_dir() else None
        others = sorted((before or set()) - {".lock"})
        if others and _run_config(run / "config.json") is None and not overwrite:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise OutputExistsError(f"run folder {run} is not empty and is not a run folder (it holds {shown}); "
                                    f"choose a new or empty folder, or allow overwriting (a run's file names "
                                    f"there are then replaced)")
        # Not cleaned up when this fails: another process may have just made the folder and hold it.
        lock = RunLock(run, what="run folder").acquire()
        try:
            yield cls(run, overwrite=overwrite, log=log, progress=progress)
        except BaseException:
            if not _has_progress(run):
                if before is None:
                    shutil.rmtree(top, ignore_errors=True)
                else:
                    _remove_new_entries(run, before)
            raise
        finally:
            lock.release()

    # -- telling the user -------------------------------------------------------------

    def warn(self, message: str, *fields: str) -> None:
        """A warning about the settings ``fields``: logged at WARNING (a front end may name its
        spelling of them), or given to the caller's ``log`` with everything else."""
        if self._log is not None:
            self._log(message)
        else:
            _logger.warning(message, extra={"fields": fields})

    def note(self, message: str | None) -> None:
        """Keep ``message`` in ``state.json``'s notes and tell the user (None / empty: nothing)."""
        if message:
            self.notes.append(message)
            self.say(message)

    # -- data -------------------------------------------------------------------------

    def load_data(self, data: str | os.PathLike, category: str | None, seed: int) -> ADDataset:
        ds = load_dataset(data, category, seed=seed)
        for n in ds.notes:
            self.note(n)
        return ds

    def threshold_holdout(self, ds: ADDataset, cfg: FitConfig, out_of: str) -> tuple[list[Sample], list[Sample]]:
        """(fitted on, held out): without test labels and with 10 or more training images, a
        seeded ``holdout_fraction`` (at least two) is kept out of ``out_of`` to set the threshold."""
        if ds.test_has_labels or len(ds.train) < 10 or cfg.holdout_fraction <= 0:
            return list(ds.train), []
        train, holdout = split_holdout(ds.train, cfg.holdout_fraction, cfg.seed, 2)
        self.note(f"the test set has no labels: {len(holdout)} of {len(ds.train)} training images are held out of "
                  f"{out_of} to set the threshold")
        return train, holdout

    # -- the folder -------------------------------------------------------------------

    def open(self, cfg: FitConfig, ds: ADDataset, train: list[Sample], holdout: list[Sample]) -> bool:
        """Create the run folder, or check that it holds the same fit and load its state.

        Returns whether the run there is already complete (then :meth:`finished`).
        """
        self.cfg = cfg
        self.record = {
            "fit": cfg.identity(),
            "data": {
                "root": str(ds.root), "category": ds.category, "layout": ds.layout,
                "train_images": len(train), "holdout_images": len(holdout), "test_images": len(ds.test),
                "test_anomalous": sum(s.label == 1 for s in ds.test), "fingerprint": _data_fingerprint(ds.train),
            },
        }
        self.state = self._resume_or_create()
        return bool(self.state.get("complete"))

    def _resume_or_create(self) -> dict:
        run, fit = self.path, self.record["fit"]
        if run.exists() and not run.is_dir():
            raise FitError(f"run folder {run} exists and is not a folder")
        old = _run_config(run / "config.json")
        if old is not None:
            diff = [k for k in fit if old.get(k) != fit[k]]
            old_data = old.get("data")
            if not isinstance(old_data, dict) or old_data.get("fingerprint") != self.record["data"]["fingerprint"]:
                diff.append("training images")
            if diff and not self.overwrite:
                raise FitError(f"{run} already holds a fit with a different {', '.join(diff)}; "
                               f"choose another run folder, delete it, or allow overwriting it")
            if not diff:
                state_path = run / "state.json"
                state = _read_run_json(state_path) if state_path.is_file() else {}
                if not state.get("complete"):
                    self.say(f"resuming the unfinished fit in {run}")
                return state
            self.say(f"{run} held a fit with a different {', '.join(diff)}: starting over (overwrite)")
            _clear_run(run)
        elif run.is_dir() and any(p.name != ".lock" for p in run.iterdir()):
            if not self.overwrite:
                raise OutputExistsError(f"run folder {run} is not empty and is not a run folder; choose a new or "
                                        f"empty folder, or allow overwriting")
            _clear_run(run)
        try:
            run.mkdir(parents=True, exist_ok=True)
            probe = run / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise FitError(f"cannot write to run folder {run}: {exc.strerror or exc}") from None
        return {}

    def write_config(self, device: torch.device, weights: str, **fields) -> None:
        """``config.json`` (the fit's identity, ``fields``, the data) and ``versions.json``;
        ``weights`` says in ``state.json`` where the weights came from."""
        write_json(self.path / "config.json", {**self.record["fit"], **fields, "data": self.record["data"]})
        write_json(self.path / "versions.json", _versions(device))
        self.state.setdefault("stages", {})
        self.state["weights"] = weights

    # -- stages -----------------------------------------------------------------------

    def done(self, stage: str) -> bool:
        return bool(self.state.get("stages", {}).get(stage, {}).get("done"))

    def mark(self, stage: str, **info) -> None:
        """Record ``stage`` as finished (with its seconds and figures) and save the state."""
        self.state["stages"][stage] = {"done": True, **info}
        self.save_state()

    def save_state(self) -> None:
        self.state["peak_rss_bytes"] = peak_rss_bytes()
        self.state["notes"] = self.notes
        write_json(self.path / "state.json", self.state)

    def save_weights(self, module: torch.nn.Module, fmt: str, name: str = "model.safetensors") -> Path:
        path = self.path / name
        save_file_atomic({k: v.cpu() for k, v in module.state_dict().items()}, path,
                         metadata={"model": self.cfg.model, "format": fmt})
        return path

    def restore_weights(self, module: torch.nn.Module, name: str = "model.safetensors") -> None:
        from visionscale.io.weights import load_into, load_state_dict

        path = self.path / name
        load_into(module, load_state_dict(path), source=str(path))

    # -- the end ----------------------------------------------------------------------

    def finish(self, calibration: Calibration, seconds: float) -> FitResult:
        """The last stage of every method: write calibration.json (and metrics.json), mark the run complete."""
        for n in calibration.notes:
            self.note(n)
        write_json(self.path / "calibration.json", calibration.thresholds)
        if calibration.metrics is not None:
            write_json(self.path / "metrics.json", calibration.metrics)
        self.state["stages"]["calibration"] = {"done": True, "seconds": seconds}
        self.state["complete"] = True
        self.save_state()
        return FitResult(self.path, calibration.thresholds, calibration.metrics, self.state, self.notes)

    def finished(self) -> FitResult:
        """The result of the complete run already in the folder."""
        run = self.path
        self.say(f"{run} already holds this fit, complete; nothing to do")
        metrics = _read_run_json(run / "metrics.json") if (run / "metrics.json").exists() else None
        return FitResult(run, _read_run_json(run / "calibration.json"), metrics, self.state,
                         self.state.get("notes", []))

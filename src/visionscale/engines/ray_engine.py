"""The Ray engine: a Ray Data pipeline over a list of files with an actor pool of workers.

:func:`map_items` is the whole mechanism, shared by anomaly prediction and face detection:

* **Ray Data reads the file list**: ``ray.data.from_items`` of ``{"index", "path", ...}`` rows,
  one row per worker call (the files of one forward pass); the files are read and decoded *inside the
  workers* (each node must see the paths: a local folder on one machine, a shared mount on a
  cluster);
* **an actor pool of workers** (``map_batches`` with :class:`ray.data.ActorPoolStrategy`): each
  actor builds its model once (a ``load_run``, a ``FaceDetector``) and maps batches of rows to
  result rows. One actor per GPU when the cluster has GPUs and the device is not ``cpu``, else
  one per ``cpus_per_worker`` cores;
* **the driver** iterates the results as they stream in and hands each row to the caller, which
  writes the files (:class:`~visionscale.engines.resume.ResumableOutput`), so results are written
  by one process, exactly as the local engine writes them.

Failures: a worker process that dies is restarted and its batch retried (``max_restarts``
times, Ray's actor restart and task retry); past that, or on an error in the worker's code, the
job stops with an :class:`EngineError` (or the worker's own :class:`~visionscale.errors.VisionscaleError`,
unwrapped from Ray's), and the finished items stay marked for a resume. Ray's own default is to
restart forever, which would hang on an image that kills its worker every time.

Without ``address`` a local Ray instance is started with this machine's cores (no dashboard,
logs in a temporary folder) and shut down afterwards; ``address="auto"`` or ``"HOST:PORT"``
connects to a running cluster (``ray start --head``), which is left running.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from visionscale.errors import InvalidValueError, MissingDependencyError, VisionscaleError, check_int

__all__ = ["RayOptions", "EngineError", "ray_session", "map_items", "plan_workers"]


class EngineError(VisionscaleError, RuntimeError):
    """The Ray job failed as a whole (a worker kept dying, the cluster is unreachable)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray job runs.

    Attributes:
        address: ``None``: start a local Ray instance for this job; ``"auto"`` or
            ``"HOST:PORT"``: connect to a running cluster.
        workers: Actors in the pool; ``None``: one per GPU (device not ``cpu`` and the cluster
            has GPUs), else the cluster's CPUs // ``cpus_per_worker``.
        cpus_per_worker: CPU cores each actor reserves (and its torch threads).
        max_restarts: Times a dead worker is restarted (and its batch retried) before the job fails.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    max_restarts: int = 2

    def __post_init__(self):
        if self.workers is not None:
            check_int("workers", self.workers, minimum=1)
        check_int("cpus_per_worker", self.cpus_per_worker, minimum=1)
        check_int("max_restarts", self.max_restarts, minimum=0)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"the ray engine needs Ray Data ({exc}): pip install 'visionscale[ray]' "
                                     f"(or 'ray[data]')").about("engine") from None
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict]:
    """Ray for one job; yields ``{"started": bool, "startup_s": float}``.

    Already initialised (a test, a notebook): used as it is and left running. ``address``:
    connect, and disconnect afterwards. Neither: a local instance with ``num_cpus`` (default:
    this machine's cores), stopped afterwards with its temporary folder.
    """
    ray = _ray()
    t0 = time.perf_counter()
    if ray.is_initialized():
        yield {"started": False, "startup_s": 0.0}
        return
    temp = None
    # Errors only: Ray's notes (token authentication, disabled progress bars, per-dataset INFO)
    # would bury the command's own output; the workers' logs stay in Ray's session folder.
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if address is not None:
        _probe(address)
    try:
        if address is not None:
            ray.init(address=address, **kwargs)
        else:
            # A short path: Ray's socket paths must stay under 107 characters.
            temp = tempfile.mkdtemp(prefix="vs-ray-")
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, _temp_dir=temp, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise EngineError(f"cannot start or reach {where}: {exc}").about("address") from None
    try:
        yield {"started": address is None, "startup_s": time.perf_counter() - t0}
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on: Ray itself retries its GCS for minutes."""
    import socket

    if address == "auto" or "://" in address:
        return  # "auto" reads this machine's Ray session; ray:// is Ray Client, which times out itself
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidValueError(f"address must be 'auto' or HOST:PORT, got {address!r}").about("address")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EngineError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc} (is `ray start "
                          f"--head` running there, and is the port open?)").about("address") from None


def plan_workers(options: RayOptions, use_gpu: bool) -> tuple[int, dict]:
    """(actors, resources per actor) for the running cluster; see :class:`RayOptions`."""
    ray = _ray()
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if use_gpu and gpus > 0:
        n = options.workers or gpus
        return n, {"num_gpus": 1, "num_cpus": options.cpus_per_worker}
    n = options.workers or max(1, cpus // options.cpus_per_worker)
    if n * options.cpus_per_worker > cpus:
        raise InvalidValueError(f"{n} workers x {options.cpus_per_worker} CPU(s) need {n * options.cpus_per_worker} "
                                f"CPUs; the Ray cluster has {cpus}").about("workers", "cpus_per_worker")
    return n, {"num_cpus": options.cpus_per_worker}


def _unwrap(exc: BaseException) -> VisionscaleError | None:
    """The first VisionscaleError in Ray's wrapping of a worker's exception, if any."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the worker's own exception
        if isinstance(cause, BaseException):
            stack.append(cause)
            continue
        if isinstance(e, VisionscaleError):
            return e
        stack += [e.__cause__, e.__context__]
    return None


def _on_node(worker: type) -> type:
    """``worker`` whose result rows also say which Ray node computed them (column ``node``)."""

    class NodeStamped(worker):
        def __call__(self, batch: dict) -> dict:
            import numpy as np
            import ray

            out = super().__call__(batch)
            rows = len(next(iter(out.values()))) if out else 0
            out["node"] = np.asarray([ray.get_runtime_context().get_node_id()] * rows, dtype=object)
            return out

    NodeStamped.__name__ = NodeStamped.__qualname__ = worker.__name__  # Ray names the actors after it
    return NodeStamped


def map_items(items: Sequence[dict], worker: type, worker_kwargs: dict, options: RayOptions, *,
              use_gpu: bool = False, on_result: Callable[[dict], None],
              progress: Callable[[int], None] | None = None) -> dict:
    """Run ``worker`` (a class: ``worker(**worker_kwargs)(batch) -> batch``) over ``items``.

    Each item is one call of a worker (one Ray Data block, one row): the caller puts a whole
    forward pass's worth of files in it, so a pass holds the same images as on the local engine
    and the scores are the same to the bit. Must run inside :func:`ray_session`. Each result row
    goes to ``on_result`` as it arrives (in any order: rows carry their ``index``);
    ``progress(n)`` after each call's rows. Returns ``{"workers": n, "resources": {...},
    "nodes": {node_id: rows}}``: how many result rows each Ray node computed.

    Raises:
        VisionscaleError: A worker raised one (bad input it met): re-raised as it is.
        EngineError: A worker died more than ``max_restarts`` times, or any other failure.
    """
    ray = _ray()
    n, resources = plan_workers(options, use_gpu)
    info = {"workers": n, "resources": resources, "nodes": {}}
    if not items:
        return info
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller shows its own
    ds = ray.data.from_items(list(items), override_num_blocks=len(items))
    with warnings.catch_warnings():
        # max_restarts / max_task_retries travel as ray_remote_args, deprecated in Ray 2.60 with
        # no named replacement yet; Ray Data's default (restart forever) would hang on an image
        # that kills its worker every time.
        warnings.simplefilter("ignore")
        ds = ds.map_batches(_on_node(worker), fn_constructor_kwargs=worker_kwargs, batch_size=1,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(n, len(items))),
                            max_restarts=options.max_restarts, max_task_retries=options.max_restarts,
                            **resources)
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except VisionscaleError:
            raise
        except Exception as exc:  # Ray's wrappers: RayTaskError, ActorDiedError, UserCodeException...
            inner = _unwrap(exc)
            if inner is not None:
                raise inner.with_traceback(None) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"the Ray job failed ({type(exc).__name__}: {first}); finished items are kept: "
                              f"run the same command again to resume").about("engine") from exc
        # The caller's callbacks run outside the try: their errors (and Ctrl-C) are theirs.
        cols = list(batch)
        count = len(batch[cols[0]]) if cols else 0
        for i in range(count):
            row = {c: _plain(batch[c][i]) for c in cols}
            node = str(row.pop("node", "?"))
            info["nodes"][node] = info["nodes"].get(node, 0) + 1
            on_result(row)
        if progress is not None:
            progress(count)
    return info


def _plain(value):
    """A numpy scalar or 0-d array from a numpy batch as a plain Python value."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value

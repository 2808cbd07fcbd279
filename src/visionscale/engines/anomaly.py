"""``ad predict`` on an engine: ``local`` (this process, :func:`visionscale.anomaly.predict.predict`)
or ``ray`` (an actor pool of :class:`AnomalyWorker` s, :mod:`visionscale.engines.ray_engine`).

Both write the same folder: per image ``<name>_heatmap.png``, ``<name>_mask.png``,
``<name>_regions.json`` (and ``<name>_map.npy``), then ``predictions.json`` / ``predictions.csv``,
with the same records in the same order: the Ray workers call the very writers ``predict`` calls
(:func:`~visionscale.anomaly.predict.image_record`, :func:`~visionscale.anomaly.predict.write_image_outputs`)
into a private folder and send the bytes to the driver, which stages them
(:class:`~visionscale.engines.resume.ResumableOutput`) and publishes the folder when all images
are done. Scores can differ from the local engine's in the last float bits only: the images of
a forward pass are batched differently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from visionscale.engines.ray_engine import EngineError, RayOptions, map_items, plan_workers, ray_session
from visionscale.engines.resume import ResumableOutput, file_facts
from visionscale.errors import InvalidValueError

__all__ = ["ENGINES", "predict", "AnomalyWorker"]

ENGINES = ("local", "ray")
Progress = Callable[[str, int, int], None]


class AnomalyWorker:
    """A Ray Data actor: loads the run once, then scores rows ``{"index", "path", "name"}``, each a
    list: the images of one forward pass.

    Each output row: ``index``; ``result``, JSON ``{"record", "size", "files": [[name, bytes]...]}``
    or ``{"bad": reason}`` for an unreadable image; ``blob``, the files' bytes one after another.
    """

    def __init__(self, run_dir: str, device: str, backend: str, precision: str, threshold: float,
                 tiling: dict | None, batch_size: int, memory_budget: int | None, dest: str | None,
                 overlays: bool, masks: bool, regions: bool, raw_maps: bool, threads: int = 1,
                 cwd: str | None = None):
        import torch

        from visionscale.anomaly.runs import load_run

        torch.set_num_threads(max(1, threads))
        self.run = load_run(run_dir, device, backend=backend, precision=precision)
        self.threshold = threshold
        self.cwd = cwd  # the driver's working folder: relative paths are relative to it
        self.tiling = tiling
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.dest = Path(dest) if dest is not None else None
        self.write = dict(overlays=overlays, masks=masks, regions=regions, raw_maps=raw_maps)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from visionscale.anomaly.data import ReadLog, Sample
        from visionscale.anomaly.predict import image_record, write_image_outputs
        from visionscale.anomaly.tiles import score_images
        from visionscale.tiling import Tiling

        run = self.run
        cal = run.calibration
        # Read by absolute path (a worker's working folder is not the driver's), named as given.
        given = [str(p) for row in batch["path"] for p in row]
        samples = [Sample(Path(p).absolute() if self.cwd is None else Path(self.cwd, p), -1, "") for p in given]
        names = [str(n) for row in batch["name"] for n in row]
        indices = [int(i) for row in batch["index"] for i in row]
        results: dict[int, dict] = {}
        blobs: dict[int, bytes] = {}
        log = ReadLog()
        keep = self.dest is not None and any(self.write.values())
        tiling = Tiling.from_dict(self.tiling) if self.tiling else None
        scratch = Path(tempfile.mkdtemp(prefix="vs-worker-"))
        try:
            k = 0
            for r in score_images(run.model, samples, run.device, image_size=run.image_size, tiling=tiling,
                                  batch_size=self.batch_size, skip_bad=True, log=log, keep_maps=keep,
                                  budget_bytes=self.memory_budget):
                while samples[k] is not r.sample:  # the ones skipped before it were unreadable
                    k += 1
                rec = image_record(given[k], r.score, self.threshold, cal)
                files: list[Path] = []
                if keep and r.amap is not None:
                    files = write_image_outputs(r, names[k], cal, scratch, self.dest, rec, **self.write)
                data = [p.read_bytes() for p in files]
                results[k] = {"record": rec, "size": list(r.image_size),
                              "files": [[p.name, len(d)] for p, d in zip(files, data)]}
                blobs[k] = b"".join(data)
                for p in files:
                    p.unlink()
                k += 1
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        reasons = {str(p): why for p, why in log.bad}
        out = [results.get(k) or {"bad": reasons.get(str(s.path), "unreadable")} for k, s in enumerate(samples)]
        return {"index": np.asarray(indices, dtype=np.int64),
                "result": np.asarray([json.dumps(o) for o in out], dtype=object),
                "blob": np.asarray([blobs.get(k, b"") for k in range(len(samples))], dtype=object)}


def _fingerprint(run, paths: Sequence[Path], dest: Path, **options) -> dict:
    return {"run": [file_facts(run.path / f) for f in ("config.json", "calibration.json", "model.safetensors")],
            "images": [file_facts(p) for p in paths], "dest": str(Path(dest).absolute()), **options}


def predict(run, images: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
            engine: str = "local", ray: RayOptions | None = None, device: str = "auto", backend: str = "eager",
            precision: str = "fp32", batch_size: int = 8, skip_bad: bool = False, overlays: bool = True,
            masks: bool = True, regions: bool = True, raw_maps: bool = False, progress: Progress | None = None,
            threshold: float | None = None, target_fpr: float | None = None, tiling=None,
            memory_budget: int | None = None, workers: int = 0, overwrite: bool = False,
            on_start: Callable[[dict], None] | None = None, on_end: Callable[[dict], None] | None = None):
    """Score images on an engine; ``(records, read_log)`` as :func:`visionscale.anomaly.predict.predict`.

    ``engine="local"`` is exactly :func:`~visionscale.anomaly.predict.predict` (``workers``:
    decoding threads). ``engine="ray"``: ``run`` gives the thresholds and the tiling, and each
    worker loads ``run.path`` on ``device`` / ``backend`` / ``precision``; ``ray`` says where and
    how wide (``workers`` is ignored: see :class:`~visionscale.engines.ray_engine.RayOptions`).
    An interrupted Ray job resumes: run it again with the same arguments and finished images are
    not scored again (:class:`~visionscale.engines.resume.ResumableOutput`). ``on_start`` gets
    ``{"workers", "resources", "startup_s", "resumed", "discarded", "todo"}`` once the job is set up
    (``startup_s``: starting Ray; ``resumed``: images found done; ``todo``: images left), and
    ``on_end`` ``{"nodes": {node_id: images}}`` once the workers are done (the images this run
    scored, per Ray node).

    Raises:
        As ``predict``; :class:`~visionscale.engines.ray_engine.EngineError` when the Ray job fails
        as a whole; :class:`~visionscale.errors.MissingDependencyError` without Ray.
    """
    from visionscale.anomaly import predict as P

    if engine not in ENGINES:
        raise InvalidValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}").about("engine")
    if engine == "local":
        return P.predict(run, images, out_dir, batch_size=batch_size, skip_bad=skip_bad, overlays=overlays,
                         masks=masks, regions=regions, raw_maps=raw_maps, progress=progress, threshold=threshold,
                         target_fpr=target_fpr, tiling=tiling, memory_budget=memory_budget, workers=workers,
                         overwrite=overwrite)
    return _predict_ray(run, images, out_dir, ray=ray or RayOptions(), device=str(device), backend=backend,
                        precision=precision, batch_size=batch_size, skip_bad=skip_bad,
                        write=dict(overlays=overlays, masks=masks, regions=regions, raw_maps=raw_maps),
                        progress=progress, threshold=P.image_threshold(run, threshold, target_fpr),
                        tiling=tiling or run.tiling, memory_budget=memory_budget, overwrite=overwrite,
                        on_start=on_start, on_end=on_end)


def _predict_ray(run, images, out_dir, *, ray: RayOptions, device, backend, precision, batch_size, skip_bad,
                 write: dict, progress, threshold: float, tiling, memory_budget, overwrite, on_start, on_end=None):
    from visionscale.anomaly.data import SKIP_HINT, DataError, ReadLog
    from visionscale.anomaly.predict import write_predictions
    from visionscale.anomaly.records import unique_names
    from visionscale.errors import check_int
    from visionscale.io.images import collect_images

    check_int("batch_size", batch_size, minimum=1)
    paths = collect_images(images)
    names = dict(zip(paths, unique_names(paths)))
    tiling_d = tiling.as_dict() if tiling is not None else None
    job = None
    if out_dir is not None:
        job = ResumableOutput(out_dir, kind="ad-predict", overwrite=overwrite, fingerprint=_fingerprint(
            run, paths, Path(out_dir), threshold=threshold, tiling=tiling_d, device=device,
            backend=backend, precision=precision, **write))
    worker_kwargs = dict(run_dir=str(Path(run.path).absolute()), cwd=os.getcwd(), device=device, backend=backend,
                         precision=precision, threshold=threshold, tiling=tiling_d, batch_size=batch_size,
                         memory_budget=memory_budget,
                         dest=str(out_dir) if out_dir is not None else None, threads=ray.cpus_per_worker, **write)
    total = len(paths)
    finished: dict[int, dict] = {}

    def take(row: dict) -> None:
        i = int(row["index"])
        res = json.loads(row["result"])
        if "bad" in res and not skip_bad:
            raise DataError(f"cannot read image {paths[i]}: {res['bad']}; {SKIP_HINT}").about("skip_bad")
        if job is not None:
            blob, at = bytes(row["blob"]), 0
            for name, n in res.pop("files", []) if "record" in res else []:
                job.write_file(name, blob[at:at + n])
                at += n
            job.mark_done(i, res)
        res.pop("files", None)
        finished[i] = res

    def advance(n: int) -> None:
        if progress is not None:
            progress("predicting", len(finished), total)

    with (job if job is not None else contextlib.nullcontext()) as state:
        if state is not None:  # skip_bad is not in the fingerprint: a rerun with --skip-bad keeps the work
            finished.update({i: r for i, r in state.finished().items() if skip_bad or "bad" not in r})
        left = [i for i in range(total) if i not in finished]
        # One row per forward pass, as the local engine batches them (then the scores are equal to the bit).
        todo = [{"index": c, "path": [str(paths[i]) for i in c], "name": [names[paths[i]] for i in c]}
                for c in (left[k:k + batch_size] for k in range(0, len(left), batch_size))]
        with ray_session(ray.address) as session:
            use_gpu = not device.startswith("cpu")  # "auto" or "cuda...": one worker per GPU where there are any
            n, resources = plan_workers(ray, use_gpu)
            info = dict(workers=n, resources=resources, startup_s=session["startup_s"], resumed=len(finished),
                        discarded=bool(state is not None and state.discarded), todo=len(left))
            if on_start is not None:
                on_start(info)
            advance(0)
            done = map_items(todo, AnomalyWorker, worker_kwargs, ray, use_gpu=use_gpu,
                             on_result=take, progress=advance)
        if on_end is not None:  # one result row per image
            on_end({"nodes": done["nodes"]})
        log = ReadLog()
        records = []
        for i in range(total):
            res = finished.get(i)
            if res is None:  # cannot happen unless a worker lost rows: never publish a hole
                raise EngineError(f"the Ray job returned no result for {paths[i]}; run it again to resume")
            if "bad" in res:
                log.bad.append((paths[i], res["bad"]))
                continue
            log.sizes[tuple(res["size"])] += 1
            records.append(res["record"])
        if state is not None:
            write_predictions(state.files, records)
    return records, log

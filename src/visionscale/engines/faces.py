"""``face detect`` over files on Ray: an actor pool of :class:`FaceDetectWorker` s, each holding one
:class:`~visionscale.face.detector.FaceDetector`.

The results equal ``face detect``'s local loop (``visionscale.cli.face``): the same rows
(``{"image", "width", "height", "faces"}`` in file order), the same annotated copies (drawn by
:func:`~visionscale.face.plots.annotate_faces`, under the names the driver chose), images
detected in the same groups of ``batch_size``. With an output folder the job resumes like
``ad predict --engine ray`` (:class:`~visionscale.engines.resume.ResumableOutput`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from visionscale.engines.ray_engine import EngineError, RayOptions, map_items, plan_workers, ray_session
from visionscale.engines.resume import ResumableOutput, file_facts

__all__ = ["FaceDetectWorker", "detect_ray"]


class FaceDetectWorker:
    """A Ray Data actor: builds the detector once; rows ``{"index", "path", "out"}`` (lists: one
    detector call). Output rows: ``index``, ``result`` (JSON row), ``blob`` (annotated image or b"")."""

    def __init__(self, detector: dict, annotate: bool, threads: int = 1, cwd: str | None = None):
        import torch

        from visionscale.face.detector import FaceDetector

        torch.set_num_threads(max(1, threads))
        self.detector = FaceDetector(**detector)
        self.annotate = annotate
        self.cwd = cwd  # the driver's working folder: relative paths are relative to it

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from visionscale.errors import InvalidValueError
        from visionscale.face.detector import MIN_IMAGE_SIDE
        from visionscale.face.plots import annotate_faces
        from visionscale.io.images import read_image

        paths = [Path(str(p)) for row in batch["path"] for p in row]  # as given: the rows name them so
        outs = [str(o) for row in batch["out"] for o in row]
        indices = [int(i) for row in batch["index"] for i in row]
        arrays = []
        for f in paths:
            # ImageReadError names the file; the driver re-raises it.
            a = read_image(Path(self.cwd, f) if self.cwd else f)
            if min(a.shape[:2]) < MIN_IMAGE_SIDE:
                raise InvalidValueError(f"image too small for face detection: {f} is {a.shape[1]}x{a.shape[0]} px "
                                        f"(need at least {MIN_IMAGE_SIDE} px per side)")
            arrays.append(a)
        results, blobs = [], []
        for f, a, out, faces in zip(paths, arrays, outs, self.detector.detect(arrays)):
            results.append(json.dumps({"image": str(f), "width": a.shape[1], "height": a.shape[0],
                                       "faces": [x.to_dict() for x in faces]}))
            fmt = "JPEG" if out.lower().endswith((".jpg", ".jpeg")) else "PNG"
            blobs.append(annotate_faces(a, faces, fmt) if self.annotate and out else b"")
        return {"index": np.asarray(indices, dtype=np.int64), "result": np.asarray(results, dtype=object),
                "blob": np.asarray(blobs, dtype=object)}


def detect_ray(files: Sequence[Path], detector: dict, *, out_dir: Path | None = None,
               out_names: Sequence[str] | None = None, overwrite: bool = False, batch_size: int = 32,
               ray: RayOptions | None = None, progress: Callable[[int, int], None] | None = None,
               on_start: Callable[[dict], None] | None = None,
               on_end: Callable[[dict], None] | None = None) -> list[dict]:
    """Detect faces in ``files`` on Ray; the result rows in file order.

    ``detector``: :class:`~visionscale.face.detector.FaceDetector` arguments (``weights`` a path
    string or None). ``out_names``: the annotated copy's file name per file (with ``out_dir``).
    ``on_start`` / ``on_end``: as :func:`visionscale.engines.anomaly.predict` (``on_end`` gets
    ``{"nodes": {node_id: images}}``).
    """
    ray = ray or RayOptions()
    if detector.get("weights"):
        detector = {**detector, "weights": str(Path(detector["weights"]).absolute())}
    files = list(files)
    total = len(files)
    job = None
    if out_dir is not None:
        w = detector.get("weights")
        job = ResumableOutput(out_dir, kind="face-detect", overwrite=overwrite, fingerprint={
            "images": [file_facts(p) for p in files], "names": list(out_names or []),
            "detector": {**detector, "weights": file_facts(w) if w else None}, "batch_size": batch_size,
            "dest": str(Path(out_dir).absolute())})
    finished: dict[int, dict] = {}

    def take(row: dict) -> None:
        i = int(row["index"])
        res = json.loads(row["result"])
        if job is not None and out_names:
            job.write_file(out_names[i], bytes(row["blob"]))
            job.mark_done(i, res)
        finished[i] = res

    def advance(_n: int) -> None:
        if progress is not None:
            progress(len(finished), total)

    use_gpu = not str(detector.get("device", "cpu")).startswith("cpu")
    with (job if job is not None else contextlib.nullcontext()) as state:
        if state is not None:
            finished.update(state.finished())
        left = [i for i in range(total) if i not in finished]
        names = list(out_names) if out_names else [""] * total
        todo = [{"index": c, "path": [str(files[i]) for i in c], "out": [names[i] for i in c]}
                for c in (left[k:k + batch_size] for k in range(0, len(left), batch_size))]
        with ray_session(ray.address) as session:
            n, resources = plan_workers(ray, use_gpu)
            if on_start is not None:
                on_start(dict(workers=n, resources=resources, startup_s=session["startup_s"], resumed=len(finished),
                              discarded=bool(state is not None and state.discarded), todo=len(left)))
            done = map_items(todo, FaceDetectWorker, dict(detector=detector, annotate=job is not None,
                                                          threads=ray.cpus_per_worker, cwd=os.getcwd()),
                             ray, use_gpu=use_gpu, on_result=take, progress=advance)
        if on_end is not None:
            on_end({"nodes": done["nodes"]})
    missing = [files[i] for i in range(total) if i not in finished]
    if missing:  # never publish a hole
        raise EngineError(f"the Ray job returned no result for {missing[0]}; run it again to resume")
    return [finished[i] for i in range(total)]

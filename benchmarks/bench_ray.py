"""Batch inference on Ray: ``ad predict`` images/s, local engine vs Ray with 1 and 2 workers.

Usage: PYTHONPATH=src python benchmarks/bench_ray.py [--images 192] [--size 256] [--model patchcore_tiny]
       [--repeats 2] [--write]
       (--write updates the "Batch inference on Ray" section of docs/benchmarks.md)

One ``make_demo`` category (``--images`` normal test images of ``--size`` px) and one run fitted
on it (random backbone weights, model size = ``--size``). Every variant writes what ``ad
predict`` writes by default (heatmaps, masks, regions, predictions.json/csv) into a fresh folder:

* ``local, 1 thread`` / ``local, 2 threads``: the local engine (``engines.anomaly.predict``);
* ``ray, 1 worker`` / ``ray, 2 workers``: Ray Data with an actor pool of 1 CPU per worker, in a
  Ray instance started once (``ray.init`` timed apart: "Ray startup").

Per variant the job runs on all the images; a Ray variant also on one batch per worker, its fixed
cost (actor processes start, import torch and load the run, Ray Data schedules). The marginal
rate, (images - those batches) / (wall - fixed), is the number a throughput model scales. Ray Data
queues results, so the time to the first result is no measure of the rate. Variants are interleaved within each repetition and medians reported (shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchlib import machine, update_section  # noqa: E402

TITLE = "Batch inference on Ray (`benchmarks/bench_ray.py`)"
VARIANTS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def _data(root: Path, images: int, size: int, model: str) -> tuple[Path, list[Path]]:
    from visionscale.anomaly import train as T
    from visionscale.anomaly.synthetic import make_demo

    make_demo(root / "demo", seed=0, size=size, categories=["brick"], num_train=10, num_test_good=images,
              num_test_defect=0)
    run = root / "run"
    T.fit_patchcore(root / "demo" / "brick", run, T.FitConfig(model=model, image_size=size, batch_size=8,
                                                              device="cpu"))
    return run, sorted((root / "demo" / "brick" / "test" / "good").glob("*.png"))


def _one(run, files, out: Path, engine: str, n: int, batch_size: int) -> float:
    """Wall time of one job (seconds)."""
    from visionscale.engines.anomaly import predict
    from visionscale.engines.ray_engine import RayOptions

    shutil.rmtree(out, ignore_errors=True)
    threads = torch.get_num_threads()
    if engine == "local":
        torch.set_num_threads(n)
    t0 = time.perf_counter()
    try:
        records, _ = predict(run, files, out, engine=engine, ray=RayOptions(workers=n) if engine == "ray" else None,
                             device="cpu", batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)
    assert len(records) == len(files)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", default="patchcore_tiny")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import ray

    from visionscale.anomaly.runs import load_run
    from visionscale.engines.ray_engine import ray_session

    about = machine()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        run_dir, files = _data(root, args.images, args.size, args.model)
        run = load_run(run_dir, "cpu")
        results: dict[str, list[dict]] = {f"{e} {n}": [] for e, n in VARIANTS}
        startups = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            with ray_session(num_cpus=os.cpu_count()):
                startups.append(time.perf_counter() - t0)
                assert ray.is_initialized()
                for engine, n in VARIANTS:
                    b = args.batch_size
                    first = b * n if engine == "ray" else 0  # one batch per worker: every actor starts
                    fixed = _one(run, files[:first], root / "out", engine, n, b) if first else 0.0
                    full = _one(run, files, root / "out", engine, n, b)
                    rate = (len(files) - first) / (full - fixed) if full > fixed else float("nan")
                    r = {"fixed_s": fixed, "wall_s": full, "images_per_s": len(files) / full,
                         "marginal_images_per_s": rate}
                    results[f"{engine} {n}"].append(r)
                    print(f"rep {rep} {engine} x{n}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(key, rows):
        vals = [r[key] for r in rows if r[key] == r[key]]
        return statistics.median(vals) if vals else float("nan")

    lines = [f"| variant | wall, {len(files)} images (s) | images/s overall | fixed cost (s) | marginal images/s |",
             "|---|---:|---:|---:|---:|"]
    label = {"local 1": "local engine, 1 thread", "local 2": "local engine, 2 threads",
             "ray 1": "ray, 1 worker (1 CPU)", "ray 2": "ray, 2 workers (1 CPU each)"}
    for key, rows in results.items():
        lines.append(f"| {label[key]} | {med('wall_s', rows):.1f} | {med('images_per_s', rows):.2f} | "
                     f"{med('fixed_s', rows):.1f} | {med('marginal_images_per_s', rows):.2f} |")
    body = "\n".join([
        f"Machine: {about}; load average {load_after:.1f} at the end (other jobs share this machine).",
        f"Command: `PYTHONPATH=src python benchmarks/bench_ray.py --images {args.images} --size {args.size} "
        f"--model {args.model} --batch-size {args.batch_size} --repeats {args.repeats} --write`",
        "",
        f"`ad predict` of {args.images} images of {args.size} px with a `{args.model}` run (random backbone, "
        f"{args.size} px), writing heatmaps, masks and regions; batches of {args.batch_size}; medians of "
        f"{args.repeats} interleaved repetitions; Ray's fixed cost is the wall time of a job of one batch per worker "
        f"(the local engine's is taken as 0). Ray startup (`ray.init` of a local instance, timed apart): "
        f"{statistics.median(startups):.1f} s (runs: {', '.join(f'{s:.1f}' for s in startups)}).",
        "",
        *lines,
    ])
    print(body)
    if args.write:
        print(f"updated {update_section('bench_ray', TITLE, body)}")


if __name__ == "__main__":
    main()

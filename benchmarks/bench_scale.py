"""Benchmark the main job: wall time of the default study and of the analytic pass alone.

Usage: python benchmarks/bench_scale.py [--write]   (--write updates docs/benchmarks.md)

Measures, on this machine:
  1. the analytic pass (meta device) per model and resolution, median of 3;
  2. the memory-budget planner (visionscale.study.tiles.plan_tiles) on each default model
     for a 3000x4000 image and a 4 GiB budget, median of 3;
  3. the whole default study as `visionscale scale` runs it (timing, fits, exact GPU
     limits, tile plans, outputs), once, end to end in a subprocess.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


from benchlib import machine, update_section
from visionscale.study.sweep import DEFAULT_MODELS, StudyConfig, _Source, analytic



def bench_analytic(resolutions=(256, 512, 1024, 3000)) -> list[tuple[str, int, float]]:
    cfg = StudyConfig()
    out = []
    for name in DEFAULT_MODELS:
        src = _Source(name, None, {})
        for r in resolutions:
            if name == "ddad" and r % 32:
                r = (r + 31) // 32 * 32
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                analytic(src, cfg, r)
                times.append(time.perf_counter() - t0)
            out.append((name, r, statistics.median(times)))
    return out


PLAN_BUDGET = 4 * 1024**3
PLAN_IMAGE = (3000, 4000)


def bench_planner() -> list[tuple[str, tuple[int, int], int, int, float]]:
    """(model, tile, batch, tiles per image, seconds) of plan_tiles on the model as a module (what
    `ad predict` hands it: built once, copied to meta once, no rebuild per tile size)."""
    import torch

    from visionscale.registry import get_model_factory
    from visionscale.study.tiles import plan_tiles

    out = []
    for name in DEFAULT_MODELS:
        with torch.device("meta"):
            model = get_model_factory(name)()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            plan = plan_tiles(model, PLAN_BUDGET, image_size=PLAN_IMAGE)
            times.append(time.perf_counter() - t0)
        out.append((name, plan.tile, plan.batch, len(plan.tiling().grid(*PLAN_IMAGE)), statistics.median(times)))
    return out


def bench_default_study() -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "visionscale.cli.main", "scale", "--out", tmp],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.stderr.write(proc.stderr)
        return wall, proc.returncode


def render(analytic_rows, wall, rc, plans) -> str:
    lines = [f"Machine: {machine()}. Command: `python benchmarks/bench_scale.py --write`.", "",
             f"Default study (`visionscale scale`, no arguments, CPU): **{wall:.1f} s** wall time (exit code {rc}).", "",
             "Analytic pass alone (meta device, all components, median of 3):", "",
             "| model | px | seconds |", "|---|---:|---:|"]
    lines += [f"| {m} | {r} | {s:.3f} |" for m, r, s in analytic_rows]
    lines += ["", f"Memory-budget planner (`plan_tiles(model, 4 GiB, image_size=(3000, 4000))`, the model as "
                  "a module built at its default size, 25 % safety; tile, batch and tiles are analytic, "
                  "the same on any machine; median of 3):", "",
              "| model | tile px | batch | tiles per image | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {t[0]}x{t[1]} | {b} | {n} | {s:.2f} |" for m, t, b, n, s in plans]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    rows = bench_analytic()
    for m, r, s in rows:
        print(f"analytic {m:14s} {r:5d} px  {s:.3f} s")
    plans = bench_planner()
    for m, t, b, n, s in plans:
        print(f"plan_tiles {m:14s} tile {t} batch {b} tiles {n}  {s:.2f} s")
    wall, rc = bench_default_study()
    print(f"default study wall time: {wall:.1f} s (exit {rc})")
    if args.write:
        print(f"updated {update_section('bench_scale', 'The scale study (`benchmarks/bench_scale.py`)', render(rows, wall, rc, plans))}")


if __name__ == "__main__":
    main()

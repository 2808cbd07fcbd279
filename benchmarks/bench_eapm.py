"""Benchmark EAPM against the plain losses: `detect compare` on the demo face set at CPU scale.

Usage: python benchmarks/bench_eapm.py [--write] [--seeds 0,1,2] [--epochs 12]
       (--write updates docs/benchmarks.md between the bench_eapm markers)

Generates the demo set (600 train / 150 val images, 160 px, faces from scikit-image's LFW
subset and the astronaut, non-face distractors), then trains `ssd_tiny` with focal +
balanced L1 and with EAPM (mu = 1.5, theta = 1.0) on the same data and seeds, and reports
COCO AP, AP50, AP75, AP_S/M/L on the validation images, as in the paper's Tables 1-2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


from benchlib import machine, update_section
from visionscale.detection.demo import DemoConfig, make_demo
from visionscale.detection.train import TrainConfig, compare, format_table



def verdict(result: dict) -> str:
    """One honest sentence from the numbers: mean AP difference and its spread over seeds."""
    base, eapm = result["rows"]
    d = eapm["metrics"]["AP"] - base["metrics"]["AP"]
    per_seed = []
    for s in base["seeds"]:
        a = next(r for r in result["runs"] if r["setting"] == "baseline" and r["seed"] == s)["metrics"]["AP"]
        b = next(r for r in result["runs"] if r["setting"] == "eapm" and r["seed"] == s)["metrics"]["AP"]
        per_seed.append(b - a)
    spread = ", ".join(f"{x:+.1f}" for x in per_seed)
    if len(per_seed) > 1:
        sd = statistics.stdev(per_seed)
        noise = abs(d) <= sd or min(per_seed) < 0 < max(per_seed)
    else:
        noise = True
    word = "higher" if d > 0 else "lower"
    if noise:
        return (f"EAPM's mean AP is {abs(d):.1f} points {word} than the plain losses (per seed: {spread}); "
                f"the sign changes between seeds or the gap is within the seed-to-seed spread, so on this data "
                f"the difference is **not significant** — no gain from EAPM is shown here.")
    return (f"EAPM's mean AP is {abs(d):.1f} points {word} than the plain losses, consistently over seeds "
            f"(per seed: {spread}).")


def render(result: dict, demo: DemoConfig, cfg: TrainConfig, wall: float, cpu: float) -> str:
    lines = [
        f"Machine: {machine()}. CPU only. \"CPU s\" is the training process's CPU time (all threads), "
        f"\"wall s\" its elapsed time; other jobs may share the cores, which inflates both.",
        "",
        f"Data: `visionscale detect make-demo` ({demo.n_train} train / {demo.n_val} val images, {demo.size} px, "
        f"seed {demo.seed}). Model `{cfg.model}`, {cfg.epochs} epochs, batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, "
        f"image size {cfg.image_size}. Focal alpha {cfg.focal_alpha:g}, gamma {cfg.focal_gamma:g}; balanced L1 "
        f"alpha {cfg.bl1_alpha:g}, gamma {cfg.bl1_gamma:g}, beta {cfg.bl1_beta:g}; EAPM mu {cfg.mu:g}, theta "
        f"{cfg.theta:g}, mf_grad `{cfg.mf_grad}`, t_x/t_y `{cfg.eapm_xy}`. Seeds: "
        f"{', '.join(str(s) for s in result['rows'][0]['seeds'])}. COCO metrics (pycocotools) on the validation "
        f"images, percent.",
        "",
        format_table(result),
        "",
        verdict(result),
        "",
        f"Wall time of the whole benchmark: {wall / 60:.1f} min; CPU time {cpu / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=150)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--mu", type=float, default=1.5)
    ap.add_argument("--theta", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data and runs here (default: a temp folder)")
    args = ap.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))

    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        demo = DemoConfig(n_train=args.n_train, n_val=args.n_val, size=args.size, seed=0)
        make_demo(work / "data", demo)
        cfg = TrainConfig(train_ann=str(work / "data" / "train.json"), val_ann=str(work / "data" / "val.json"),
                          loss="eapm", mu=args.mu, theta=args.theta, image_size=args.size, epochs=args.epochs,
                          out_dir=str(work / "runs"))

        def progress(ev: dict) -> None:
            if ev["kind"] == "run":
                print(f"[{time.perf_counter() - t0:6.0f} s] training {ev['label']}, seed {ev['seed']}", flush=True)
            elif ev["kind"] == "eval":
                print(f"           AP {ev['AP']}  AP50 {ev['AP50']}  AP75 {ev['AP75']}", flush=True)

        result = compare(cfg, seeds=seeds, progress=progress, overwrite=True)
        (work / "runs" / "compare.json").write_text(json.dumps(result, indent=2))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(format_table(result))
    print(verdict(result))
    print(f"wall time {wall:.0f} s")
    if args.write:
        print(f"updated {update_section('bench_eapm', 'EAPM (`benchmarks/bench_eapm.py`)', render(result, demo, cfg, wall, cpu))}")
    # a sanity floor: the baseline must have learnt something, or the comparison means nothing
    if result["rows"][0]["metrics"]["AP"] is None or result["rows"][0]["metrics"]["AP"] < 10:
        sys.exit("baseline AP below 10: the detector did not learn; the comparison is meaningless")


if __name__ == "__main__":
    main()

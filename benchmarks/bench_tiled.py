"""Tiled anomaly detection at native resolution (issue 13): memory under a budget, and accuracy.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_tiled.py memory [--budget 2GiB] [--side 4096]
        [--models efficientad_s,patchcore_wrn50,ddad] [--max-batches 0] [--work DIR]
    OMP_NUM_THREADS=2 python benchmarks/bench_tiled.py accuracy [--size 1024] [--tile 256]
        [--models patchcore_tiny,efficientad_tiny] [--steps 200] [--work DIR]

``memory``: for each model, fit a tiled run with ``memory_budget`` (so the tile is chosen by the
planner) on three 1024 px normal images of the demo texture (random weights: offline), then in a
fresh child process score one ``--side`` x ``--side`` image with ``predict(..., memory_budget)``
(the batch of tiles from :func:`visionscale.anomaly.tiles.plan_batch`) and report the child's peak
resident memory (``VmHWM`` of /proc/self/status; ``ru_maxrss`` carries the parent's peak over ``exec``) next to the budget and to the analytic memory the model would need
for the whole image in one pass (:func:`visionscale.study.tiles.tile_need_bytes`). With
``--max-batches N`` the child stops after N batches of tiles (for DDAD, whose ten denoising steps
make a whole 4096 px image take hours on a CPU); the peak is reached within the first batch (the
image, the stitcher and one batch's activations are all allocated by then), and the time of a
whole image is extrapolated from the measured time per tile.

``accuracy``: on a high-resolution small-defect demo category (``make_demo(size, small_defects)``),
each model is fitted twice, tiled at native resolution and on whole images resized to 256 px, and
evaluated on the test split: image AUROC, pixel AUROC and AUPRO. CPU budgets are short (random
backbones, few steps): the numbers compare the two ways of using the same images, not the methods.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHILD = r"""
import json, sys, time, torch

def hwm():  # this process's peak resident memory (VmHWM: per address space, so not inherited across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

from visionscale.anomaly.predict import load_run, predict
from visionscale.anomaly.tiles import plan_batch
from visionscale.io.images import read_image_and_size
run_dir, image, budget, max_batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = hwm()
run = load_run(run_dir, "cpu")
after_load = hwm()
from visionscale.anomaly.data import image_size_of
size = image_size_of(image)
batch = plan_batch(run.model, run.tiling.tile, budget, 16, size)
calls = [0]
forward = run.model.forward
class Stop(Exception):
    pass
def counted(x):
    calls[0] += 1
    if max_batches and calls[0] > max_batches:
        raise Stop()
    return forward(x)
run.model.forward = counted
t0 = time.perf_counter()
try:
    predict(run, [image], None, batch_size=batch, memory_budget=budget)
    finished = True
except Stop:
    finished = False
secs = time.perf_counter() - t0
from visionscale.tiling import tile_count
n_tiles = tile_count(*size, run.tiling.tile, run.tiling.overlap, run.tiling.align)
done_tiles = n_tiles if finished else max_batches * batch
print(json.dumps({"peak_rss": hwm(), "rss_at_start": base,
                  "rss_after_load": after_load, "batch": batch, "tiles": n_tiles, "tiles_scored": done_tiles,
                  "finished": finished, "seconds": secs, "seconds_per_tile": secs / max(done_tiles, 1)}))
"""


def _gib(b):
    return f"{b / 2**30:.2f} GiB"


def memory(args) -> dict:
    import numpy as np
    from PIL import Image

    from visionscale.anomaly.synthetic import make_demo
    from visionscale.anomaly.train import FitConfig, fit
    from visionscale.study.tiles import parse_budget, tile_need_bytes
    from visionscale import registry

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_tiled_"))
    budget = parse_budget(args.budget)
    data = work / "train"
    if not (data / "brick").is_dir():
        make_demo(data, size=1024, categories=["brick"], num_train=3, num_test_good=0, num_test_defect=0)
    big = work / f"test_{args.side}.png"
    if not big.is_file():  # the 1024 px texture mirrored out to the side: real texture at full resolution
        tile = np.array(Image.open(next((data / "brick" / "train" / "good").glob("*.png"))).convert("RGB"))
        row = np.concatenate([tile, tile[:, ::-1]] * (args.side // 2048 + 1), axis=1)
        img = np.concatenate([row, row[::-1]] * (args.side // 2048 + 1), axis=0)[: args.side, : args.side]
        Image.fromarray(np.ascontiguousarray(img)).save(big)
    rows = []
    for name in args.models.split(","):
        run = work / f"run_{name}"
        steps = {"efficientad": 2, "ddad": 1}
        method = "patchcore" if name.startswith("patchcore") else "efficientad" if name.startswith("efficientad") \
            else "ddad"
        t0 = time.perf_counter()
        kw = dict(steps=steps[method]) if method in steps else dict(coreset_ratio=0.01)
        if not (run / "calibration.json").is_file():
            fit(data / "brick", run, FitConfig(model=name, memory_budget=budget, batch_size=1, **kw), overwrite=True)
        fit_s = time.perf_counter() - t0
        child = subprocess.run([sys.executable, "-c", CHILD, str(run), str(big), str(budget), str(args.max_batches
                                if method == "ddad" else 0)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if child.returncode != 0:
            raise SystemExit(f"{name}: child failed:\n{child.stderr[-3000:]}")
        got = json.loads(child.stdout.strip().splitlines()[-1])
        config = json.loads((run / "config.json").read_text())
        with __import__("torch").device("meta"):
            whole = registry.create(name, image_size=(args.side, args.side)) if method != "efficientad" \
                else registry.create(name)
        need = tile_need_bytes(whole, (args.side, args.side))
        rows.append({"model": name, "budget": budget, "tile": config["tiling"]["tile"],
                     "overlap": config["tiling"]["overlap"], "fit_seconds": fit_s, "whole_image_need": need, **got})
        print(json.dumps(rows[-1]), flush=True)
    return {"side": args.side, "rows": rows}


def accuracy(args) -> dict:
    from visionscale.anomaly.predict import evaluate, load_run
    from visionscale.anomaly.synthetic import make_demo
    from visionscale.anomaly.train import FitConfig, fit

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_tiled_acc_"))
    data = work / "data"
    if not (data / "brick").is_dir():
        make_demo(data, size=args.size, categories=["brick"], num_train=args.train, num_test_good=4,
                  num_test_defect=2, small_defects=True)
    rows = []
    for name in args.models.split(","):
        kw = {} if name.startswith("patchcore") else dict(steps=args.steps)
        if name.startswith("ddad"):
            kw["batch_size"] = 4  # the trainer's default 32 tiles of 256 px runs out of memory on a small CPU box
        for mode, cfg in (("tiled", FitConfig(model=name, tile=args.tile, **kw)),
                          ("resized 256", FitConfig(model=name, image_size=(256, 256), **kw))):
            run = work / f"run_{name}_{mode.split()[0]}"
            shutil.rmtree(run, ignore_errors=True)  # a finished run of the same fit would be reused, not refitted
            t0 = time.perf_counter()
            fit(data / "brick", run, cfg, overwrite=True)
            m = evaluate(load_run(run, "cpu"), data / "brick").metrics
            rows.append({"model": name, "mode": mode, "image_auroc": m.image_auroc, "pixel_auroc": m.pixel_auroc,
                         "aupro": m.aupro, "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return {"size": args.size, "tile": args.tile, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--budget", default="2GiB")
    m.add_argument("--side", type=int, default=4096)
    m.add_argument("--models", default="efficientad_s,patchcore_wrn50,ddad")
    m.add_argument("--max-batches", type=int, default=2, help="DDAD only: batches of tiles scored (0: all)")
    m.add_argument("--work")
    a = sub.add_parser("accuracy")
    a.add_argument("--size", type=int, default=1024)
    a.add_argument("--tile", type=int, default=256)
    a.add_argument("--train", type=int, default=10)
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--models", default="patchcore_tiny,efficientad_tiny,ddad_tiny")
    a.add_argument("--work")
    args = p.parse_args()
    out = memory(args) if args.what == "memory" else accuracy(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""CPU (or GPU) cost of one DDAD training step: DDPM step of the U-Net and domain-adaptation step.

Runs :func:`visionscale.anomaly.ddad_train.fit_ddad` itself on random images for ``--steps``
steps of each stage (no checkpoint in between) and times the gaps between consecutive
progress callbacks, so the first step (warm-up) is left out and a measured step is one
whole optimiser step as training runs it: batch preparation, noise, forward, backward,
optimiser update (adaptation: the 10-step conditioned reconstruction of half the batch,
two passes of the adapted extractor, two of the frozen reference, backward, AdamW).

    .venv/bin/python benchmarks/bench_ddad_train.py --model ddad_tiny --size 64 --batch 32 --da-batch 16

prints one markdown table row per run (median step seconds; per image) under a machine line.
Backbones and U-Nets are random (no downloads); the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine

from visionscale.anomaly.ddad_train import DDADTrainConfig, fit_ddad
from visionscale.registry import create


def run(model_name: str, size: int, batch: int, da_batch: int, steps: int, attention: str, device: str) -> dict:
    torch.manual_seed(0)
    model = create(model_name, image_size=size, attention=attention).to(device)
    images = torch.randn(max(batch, da_batch), 3, size, size)
    stamps: dict[str, list[float]] = {"ddpm": [], "domain_adaptation": []}

    def progress(stage: str, done: int, total: int) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps[stage].append(time.perf_counter())

    cfg = DDADTrainConfig(steps=steps, batch_size=batch, da_steps=steps, da_batch_size=da_batch,
                          checkpoint_every=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        fit_ddad(model, lambda epoch: iter([images]), cfg, Path(tmp), progress=progress)
    out = {}
    for stage, ts in stamps.items():
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        out[stage] = statistics.median(gaps) if gaps else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ddad_tiny", choices=["ddad", "ddad_tiny"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="U-Net batch (official 32)")
    ap.add_argument("--da-batch", type=int, default=4, help="adaptation batch, even (official 16)")
    ap.add_argument("--steps", type=int, default=2, help="steps per stage; the first is warm-up")
    ap.add_argument("--attention", default="math", choices=["math", "sdpa"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--header", action="store_true", help="print the machine line and table header first")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.header:
        print(f"Machine: {machine()}\n")
        print("| model | px | attention | U-Net batch | DDPM step (s) | s / image | DA batch | DA step (s) | s / image |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    r = run(args.model, args.size, args.batch, args.da_batch, args.steps, args.attention, args.device)
    d, a = r["ddpm"], r["domain_adaptation"]
    print(f"| {args.model} | {args.size} | {args.attention} | {args.batch} | {d:.3g} | {d / args.batch:.3g} | "
          f"{args.da_batch} | {a:.3g} | {a / args.da_batch:.3g} |", flush=True)


if __name__ == "__main__":
    main()

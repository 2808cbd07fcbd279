"""Benchmark the anomaly-detection methods: inference speed and the demo-data metrics of a short fit.

Usage: python benchmarks/bench_ad.py [--write] [--size 256] [--device cpu] [--images 5] [--ddad-images 1]
                                     [--train 20] [--steps 20] [--ddad-steps 20] [--methods patchcore,efficientad_s,ddad]
       (--write updates the "Anomaly detection: methods" section of docs/benchmarks.md)

Measures at ``--size`` px (256) on ``--device`` (cpu), every network with RANDOM weights (nothing can be
downloaded here):
  1. inference latency at batch 1 through the whole graph (``model(x)``: score and map), after one
     warm-up image: PatchCore (WRN-101-2, memory bank of a 10% coreset of 200 images), EfficientAD-S,
     DDAD-10 (WRN-101-2 features, official U-Net); median over ``--images`` images -> images/second;
  2. ``visionscale.anomaly.train.fit`` of each method on a demo category (``make_demo`` brick:
     ``--train`` good training images, 4 good and 2 per defect type in the test set) with a short
     training budget (EfficientAD ``--steps``, DDAD ``--ddad-steps``), then the test-set metrics.
     Random weights and a few steps: the metrics are a smoke test of the pipeline, not the
     methods' quality. DDAD is fitted only when ``visionscale.anomaly.ddad_train`` exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import machine, update_section

FIT_MODEL = {"patchcore": "patchcore", "efficientad_s": "efficientad_s", "ddad": "ddad"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(model: torch.nn.Module, size: int, n: int, device: torch.device, signed: bool = False,
            warmup: int = 1) -> dict:
    """Median / mean / p95 seconds per image at batch 1 after ``warmup`` images."""
    model.eval().to(device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 3, size, size, generator=g) for _ in range(n + warmup)]
    if signed:
        xs = [x.clamp(-1, 1) for x in xs]
    times = []
    with torch.inference_mode():
        for i, x in enumerate(xs):
            x = x.to(device)
            sync(device)
            t0 = time.perf_counter()
            out = model(x)
            out["pred_score"].cpu()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    p95 = sorted(times)[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "p95_s": p95, "n": len(times)}


def inference_table(methods: list[str], size: int, n: int, n_ddad: int, device: torch.device,
                    warmup: int = 1) -> list[dict]:
    from visionscale import registry

    rows = []
    for name in methods:
        torch.manual_seed(0)
        if name == "patchcore":
            model = registry.create("patchcore", image_size=size)  # bank: 10% of 200 images' patches
            what = f"WRN-101-2 layer2+3, bank {model.bank_size:,} x {model.embed_dim}"
            res = latency(model, size, n, device, warmup=warmup)
        elif name == "efficientad_s":
            model = registry.create("efficientad_s")
            what = "PDN-S teacher + student, autoencoder"
            res = latency(model, size, n, device, warmup=warmup)
        elif name == "ddad":
            if n_ddad < 1:
                continue
            model = registry.create("ddad")
            what = "U-Net x 10 DDIM steps + WRN-101-2 features"
            res = latency(model, size, n_ddad, device, signed=True, warmup=warmup)
        else:
            raise SystemExit(f"unknown method {name}")
        rows.append({"method": name, "what": what, **res})
        print(f"{name}: {res['median_s']:.3f} s/image ({1 / res['median_s']:.2f} images/s)", file=sys.stderr)
        del model
    return rows


def fit_table(methods: list[str], size: int, n_train: int, steps: int, ddad_steps: int, device: str,
              root: Path) -> tuple[list[dict], list[str]]:
    from visionscale.anomaly.synthetic import make_demo
    from visionscale.anomaly.train import FitConfig, fit

    make_demo(root / "demo", seed=0, size=size, categories=["brick"], num_train=n_train, num_test_good=4,
              num_test_defect=2)
    data = root / "demo" / "brick"
    rows, skipped = [], []
    for name in methods:
        kw: dict = {"model": FIT_MODEL[name], "image_size": size, "device": device}
        if name == "efficientad_s":
            kw.update(steps=steps, checkpoint_every=max(1, steps))
            budget = f"{steps} steps, batch 1"
        elif name == "ddad":
            if importlib.util.find_spec("visionscale.anomaly.ddad_train") is None:
                skipped.append("ddad: not fitted, its trainer `visionscale.anomaly.ddad_train` does not exist yet")
                continue
            kw.update(steps=ddad_steps, checkpoint_every=max(1, ddad_steps))
            budget = f"{ddad_steps} steps"
        else:
            budget = "coreset 10%"
        t0 = time.perf_counter()
        res = fit(data, root / f"run_{name}", FitConfig(**kw))
        secs = time.perf_counter() - t0
        m = res.metrics
        rows.append({"method": name, "budget": budget, "fit_s": secs, "image_auroc": m["image_auroc"],
                     "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"]})
        print(f"{name}: fit {secs:.0f} s, {m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} / {m['aupro']:.3f}",
              file=sys.stderr)
    return rows, skipped


def fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=5, help="timed images per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images first (the seed protocol: 100 on a GPU)")
    ap.add_argument("--ddad-images", type=int, default=1, help="timed DDAD images (0 skips DDAD's latency)")
    ap.add_argument("--train", type=int, default=20, help="demo training images")
    ap.add_argument("--steps", type=int, default=20, help="EfficientAD training steps")
    ap.add_argument("--ddad-steps", type=int, default=20, help="DDAD training steps")
    ap.add_argument("--methods", default="patchcore,efficientad_s,ddad")
    ap.add_argument("--no-fit", action="store_true", help="only the inference latency")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    device = torch.device(args.device)
    env = machine()
    t_start = time.perf_counter()
    inf = inference_table(methods, args.size, args.images, args.ddad_images, device, args.warmup)
    fits, skipped = [], []
    if not args.no_fit:
        with tempfile.TemporaryDirectory() as tmp:
            fits, skipped = fit_table(methods, args.size, args.train, args.steps, args.ddad_steps, args.device,
                                      Path(tmp))
    total = time.perf_counter() - t_start
    cmd = "python benchmarks/bench_ad.py " + " ".join(sys.argv[1:])
    lines = [
        f"Measured with `{cmd}` on {env} (device `{args.device}`; {total / 60:.0f} min in all). "
        f"All networks have RANDOM weights (no downloads here).",
        "",
        f"**Inference** at {args.size}x{args.size}, batch 1, fp32, whole graph (score and map), after "
        f"{args.warmup} warm-up image(s):",
        "",
        "| method | graph | median ms / image | mean ms | p95 ms | images / s (median) | timed images |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in inf:
        lines.append(f"| {r['method']} | {r['what']} | {1e3 * r['median_s']:.1f} | {1e3 * r['mean_s']:.1f} | "
                     f"{1e3 * r['p95_s']:.1f} | {1 / r['median_s']:.2f} | {r['n']} |")
    if fits:
        lines += [
            "",
            f"**Demo-data metrics** after a short fit (`ad fit`; demo category brick at {args.size} px, "
            f"{args.train} training images, test set 4 good + 8 defective). Random weights and a tiny training "
            f"budget: these check the pipeline end to end and say nothing about the methods' real accuracy.",
            "",
            "| method | training budget | fit s | image AUROC | pixel AUROC | AUPRO@0.3 |",
            "|---|---|---|---|---|---|",
        ]
        for r in fits:
            lines.append(f"| {r['method']} | {r['budget']} | {r['fit_s']:.0f} | {fmt(r['image_auroc'])} | "
                         f"{fmt(r['pixel_auroc'])} | {fmt(r['aupro'])} |")
    for s in skipped:
        lines += ["", f"Note: {s}."]
    if args.ddad_images < 1 and "ddad" in methods:
        lines += ["", "Note: DDAD's latency was not measured in this run (`--ddad-images 0`)."]
    body = "\n".join(lines)
    print(body)
    if args.write:
        print(f"wrote {update_section('bench-ad-methods', 'Anomaly detection: methods', body)}", file=sys.stderr)


if __name__ == "__main__":
    main()

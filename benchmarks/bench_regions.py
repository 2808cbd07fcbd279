"""Benchmark the per-image outputs of visionscale.anomaly.regions on a 20 MP image.

Usage: python benchmarks/bench_regions.py [--write] [--repeats 3] [--size 3648x5472]
       (--write updates docs/benchmarks.md between the bench_regions markers)

A 256 x 256 float32 anomaly map (the model's size) is turned into a mask, regions and files
at the image's size, in bands (the default, ``BAND_PIXELS``) and in one band covering the whole
image (what a full-size resampled copy would cost). Two maps: "typical" (smooth background and
six blobs, ~1 % anomalous) and "noisy" (uniform noise thresholded at its median: ~50 %
anomalous, thousands of regions, a worst case for the labelling). Times are medians of
``--repeats`` runs; peak memory is tracemalloc's peak of numpy allocations during the call,
beyond the inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from benchlib import machine, update_section
from visionscale.anomaly import regions as R


def maps(seed: int = 0) -> dict[str, tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    typical = 0.2 * rng.random((256, 256)).astype(np.float32)
    for cy, cx, r in rng.integers(20, 236, size=(6, 3)):
        typical += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r % 6 + 2) ** 2))
    noisy = rng.random((256, 256)).astype(np.float32)
    return {"typical": (typical, 0.5), "noisy": (noisy, 0.5)}


def measure(fn, repeats: int) -> tuple[float, float, object]:
    """Median seconds and tracemalloc peak (MiB) of ``fn()``, and its last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return statistics.median(times), peak, result


def run(size: tuple[int, int], repeats: int) -> list[dict]:
    rows = []
    default_band = R.BAND_PIXELS
    with tempfile.TemporaryDirectory() as tmp:
        for name, (amap, t) in maps().items():
            for banding, band in [("bands", default_band), ("one band", size[0] * size[1])]:
                R.BAND_PIXELS = band
                try:
                    cases = {
                        "predicted_mask": lambda: R.predicted_mask(amap, t, size),
                        "defect_regions": lambda: R.defect_regions(amap, t, image_size=size),
                        "write_region_outputs": lambda: R.write_region_outputs("img", amap, t, size, tmp),
                    }
                    for fn_name, fn in cases.items():
                        sec, peak, res = measure(fn, repeats)
                        n = len(res) if isinstance(res, list) else len(res.get("regions", [])) \
                            if isinstance(res, dict) else None
                        rows.append({"map": name, "banding": banding, "call": fn_name, "seconds": sec,
                                     "peak_mib": peak, "regions": n})
                        print(f"{name:8s} {banding:9s} {fn_name:21s} {sec:7.3f} s {peak:8.1f} MiB  regions={n}",
                              flush=True)
                finally:
                    R.BAND_PIXELS = default_band
    return rows


def render(rows: list[dict], size: tuple[int, int], repeats: int, cpu: str, cmd: str) -> str:
    h, w = size
    lines = [
        f"Machine: {cpu}. Command: `{cmd}`.",
        "",
        f"A 256 × 256 float32 map to a {w} × {h} image ({w * h / 1e6:.1f} MP), threshold 0.5; median of "
        f"{repeats} runs; peak = tracemalloc's peak of numpy allocations during the call. \"bands\" is the "
        f"default (`BAND_PIXELS` = {R.BAND_PIXELS:,} pixels per band); \"one band\" resamples the whole image "
        "at once, the cost of a full-size float copy. The (H, W) uint8 mask itself is "
        f"{h * w / 2**20:.1f} MiB. On a shared 2-core machine the times vary by up to 2x between runs "
        "(load average above); the peaks do not.",
        "",
        "| map | call | banding | seconds | peak MiB | regions |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['map']} | `{r['call']}` | {r['banding']} | {r['seconds']:.3f} | {r['peak_mib']:.1f} | "
                     f"{'' if r['regions'] is None else r['regions']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3648x5472", help="HEIGHTxWIDTH of the image (default 20 MP)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    cpu = machine()
    rows = run((h, w), args.repeats)
    if args.write:
        cmd = "python " + " ".join(["benchmarks/bench_regions.py", *sys.argv[1:]])
        body = render(rows, (h, w), args.repeats, cpu, cmd)
        title = "Anomaly regions and masks at 20 MP (`benchmarks/bench_regions.py`)"
        print(f"updated {update_section('bench_regions', title, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark pixel metrics in bounded memory (issue 13): streaming histograms against the exact sort.

Usage: OMP_NUM_THREADS=1 python benchmarks/pixel_metrics.py [--write] [--maps 100] [--size 1024]
       [--exact-size 256] [--native 2]
       (--write puts the section "Pixel metrics in bounded memory (issue 13)" into docs/benchmarks.md)

Synthetic, seeded maps: a smooth random field (Gaussian low-pass of white noise, unit variance)
plus white noise; two images in three get 1-3 disc defects (radius size/40 to size/10) whose
scores are raised, so normal and anomalous scores overlap (pixel AUROC about 0.8). Map ``i`` is
drawn from the seed ``(0, i)``, so every run and every measurement sees the same maps.

Each measurement runs in a child process of its own, so that memory figures do not mix:

* ``streaming``: make each map, pass it to ``PixelMetricAccumulator.update``, drop it; then
  ``result`` (at ``--size`` and, with ``--native N``, N maps of 4096 px);
* ``exact``: make all maps at ``--exact-size``, stack them, ``metrics.evaluate_scores`` (the sort
  over all pixels), then the streaming path over the same maps, for the error between them.

Memory is measured with tracemalloc (numpy buffers included): the largest peak inside one metric
call above what was allocated when it began (the map passed in and the accumulator's state are
not counted), and the peak over the whole loop (making the maps included); as a cross-check, the
growth of the process's resident high-water mark (``getrusage`` ``ru_maxrss``) over its resident
size when the loop started. Time is wall time inside the metric calls only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402

MiB = 2**20


def make_map(i: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Map ``i`` (float32, (size, size)) and its mask (bool, ``None`` for a good image)."""
    rng = np.random.default_rng((0, i))
    base = min(size, 1024)  # fields above 1024 px are a 1024 px field enlarged: the FFT stays cheap
    f = np.fft.rfft2(rng.normal(size=(base, base)))
    ky, kx = np.fft.fftfreq(base)[:, None], np.fft.rfftfreq(base)[None, :]
    f *= np.exp(-2 * (np.pi * base / 32) ** 2 * (kx**2 + ky**2))
    field = np.fft.irfft2(f, s=(base, base)).astype(np.float32)
    field = (field - field.mean()) / field.std()
    if base < size:
        field = np.repeat(np.repeat(field, size // base, axis=0), size // base, axis=1)
    amap = field + 0.3 * rng.standard_normal((size, size), dtype=np.float32)
    if i % 3 == 0:
        return amap, None
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(size / 40, size / 10)
        cy, cx = rng.integers(int(r) + 1, size - int(r) - 1, 2)
        y0, y1, x0, x1 = int(cy - r), int(cy + r) + 1, int(cx - r), int(cx + r) + 1
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask[y0:y1, x0:x1] |= disc
        amap[y0:y1, x0:x1] += np.float32(1.5 * rng.uniform(0.5, 1.5)) * disc
    return amap, mask


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Meter:
    """Wall time and tracemalloc peak above what was held at the start of each measured call."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.added_peak = 0

    def __call__(self, fn, *args):
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        t = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t
        self.added_peak = max(self.added_peak, tracemalloc.get_traced_memory()[1] - held)
        return out


def child(kind: str, maps: int, size: int) -> dict:
    from visionscale.anomaly import metrics as M
    from visionscale.anomaly.streaming_metrics import PixelMetricAccumulator

    warm = PixelMetricAccumulator()  # warm-up: imports, FFT plans, scipy's labelling
    warm.update(*make_map(1, 64))
    rss0 = _rss()
    tracemalloc.start()
    meter = Meter()
    loop_peak = 0
    out: dict = {"kind": kind, "maps": maps, "size": size}
    if kind == "streaming":
        acc = PixelMetricAccumulator()
        for i in range(maps):
            amap, mask = make_map(i, size)
            loop_peak = max(loop_peak, tracemalloc.get_traced_memory()[1])
            meter(acc.update, amap, mask)
            del amap, mask
        r = meter(acc.result)
        out.update(pixel_auroc=r.pixel_auroc, aupro=r.aupro, pixel_f1=r.pixel_f1, state_bytes=acc.nbytes,
                   bounds=[r.auroc_error_bound, r.aupro_error_bound, r.f1_error_bound])
    else:  # exact, then the streaming path over the same maps for the error between them
        pairs = [make_map(i, size) for i in range(maps)]
        amaps = np.stack([a for a, _ in pairs])
        masks = np.stack([m if m is not None else np.zeros((size, size), dtype=bool) for _, m in pairs])
        del pairs
        out["input_bytes"] = tracemalloc.get_traced_memory()[0]
        ex = meter(M.evaluate_scores, [0, 1], [0.0, 1.0], amaps, masks)
        loop_peak = max(loop_peak, tracemalloc.get_traced_memory()[1] + out["input_bytes"])
        acc = PixelMetricAccumulator()
        t = time.perf_counter()
        for a, m in zip(amaps, masks):
            acc.update(a, m if m.any() else None)
        r = acc.result()
        out["streaming_seconds"] = time.perf_counter() - t
        out.update(exact={"pixel_auroc": ex.pixel_auroc, "aupro": ex.aupro, "pixel_f1": ex.pixel_f1},
                   binned={"pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "pixel_f1": r.pixel_f1},
                   bounds=[r.auroc_error_bound, r.aupro_error_bound, r.f1_error_bound])
    loop_peak = max(loop_peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    out.update(seconds=meter.seconds, added_peak=meter.added_peak, loop_peak=loop_peak,
               maxrss_growth=max(_maxrss() - rss0, 0))
    return out


def run_child(kind: str, maps: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--maps", str(maps), "--size", str(size)]
    t = time.perf_counter()
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t
    print(f"{kind} {maps} x {size} px: {out['seconds']:.2f} s, added peak {out['added_peak'] / MiB:.1f} MiB, "
          f"loop peak {out['loop_peak'] / MiB:.0f} MiB, maxrss growth {out['maxrss_growth'] / MiB:.0f} MiB "
          f"(process {out['wall']:.0f} s)", file=sys.stderr)
    return out


def render(stream: list[dict], ex: dict, cmd: str) -> str:
    def mib(x: float) -> str:
        return f"{x / MiB:,.1f}"

    rows = [
        "| path | maps | map px | one map (float32) MiB | metric time s | peak added by the metric calls MiB | "
        "traced peak of the loop MiB | ru_maxrss growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stream:
        rows.append(f"| streaming: make a map, `update`, drop it; then `result` | {s['maps']} | {s['size']} | "
                    f"{mib(s['size'] ** 2 * 4)} | {s['seconds']:.1f} | {mib(s['added_peak'])} | "
                    f"{mib(s['loop_peak'])} | {mib(s['maxrss_growth'])} |")
    rows.append(f"| exact `evaluate_scores` over the stacked maps | {ex['maps']} | {ex['size']} | "
                f"{mib(ex['size'] ** 2 * 4)} | {ex['seconds']:.1f} | {mib(ex['added_peak'])} | "
                f"{mib(ex['loop_peak'])} | {mib(ex['maxrss_growth'])} |")
    rows.append(f"| streaming over the same maps as the exact row | {ex['maps']} | {ex['size']} | "
                f"{mib(ex['size'] ** 2 * 4)} | {ex['streaming_seconds']:.1f} | - | - | - |")
    per_px = ex["added_peak"] / (ex["maps"] * ex["size"] ** 2)
    names = {"pixel_auroc": "pixel AUROC", "aupro": "AUPRO@0.3", "pixel_f1": "pixel F1"}
    err = ["| metric | exact | streaming (2^16 cells) | abs. difference | stated bound |", "|---|---:|---:|---:|---:|"]
    for (k, label), bound in zip(names.items(), ex["bounds"]):
        e, b = ex["exact"][k], ex["binned"][k]
        err.append(f"| {label} | {e:.6f} | {b:.6f} | {abs(e - b):.1e} | {bound:.1e} |")
    return "\n".join([
        f"Machine: {machine()} (shared with other jobs). CPU numbers. Command: `{cmd}`.",
        "",
        "Synthetic seeded maps (`make_map` in the script: smooth random field + noise, float32; two images in three "
        "with 1-3 disc defects; maps above 1024 px are a 1024 px field enlarged, plus full-size noise). Each row is "
        "a process of its own. Memory from tracemalloc (numpy buffers included): *peak added by the metric calls* is "
        "the largest peak inside one `update` / `result` / `evaluate_scores` call above what was allocated when the "
        "call began (the map passed in and the accumulator's state existed before and are not counted); "
        "*traced peak of the loop* includes making the maps (the exact row: holding all of them). "
        "*ru_maxrss growth*: the process's resident high-water mark minus its resident size when the loop started. "
        "*Metric time*: wall time inside those calls only.",
        "",
        *rows,
        "",
        f"The streaming state is {stream[0]['state_bytes'] / MiB:.1f} MiB (three histograms of 2^16 cells) for any "
        "number or size of maps; an `update` adds one map's temporaries: blocks of 2^20 pixels, and for an image with "
        "defects its region labels as int32 (64 MiB at 4096 px). The exact row's peak grows with maps x pixels: "
        f"{per_px:.0f} bytes per pixel on top of the maps here, so {stream[0]['maps']} maps of {stream[0]['size']} px "
        f"would need about {per_px * stream[0]['maps'] * stream[0]['size'] ** 2 / 2**30:.1f} GiB more (extrapolated, not run).",
        "",
        f"Error against the exact path on the {ex['maps']} maps of {ex['size']} px (bounds as stated in "
        "`visionscale.anomaly.streaming_metrics`, computed from the data):",
        "",
        *err,
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--maps", type=int, default=100)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--exact-size", type=int, default=256)
    ap.add_argument("--native", type=int, default=3, help="maps of 4096 px through the streaming path (0: none)")
    ap.add_argument("--child", choices=["generate", "streaming", "exact"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.maps, a.size)))
        return
    stream = [run_child("streaming", a.maps, a.size)]
    if a.native:
        stream.append(run_child("streaming", a.native, 4096))
    ex = run_child("exact", a.maps, a.exact_size)
    cmd = "OMP_NUM_THREADS=1 python benchmarks/pixel_metrics.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items()
        if k in ("maps", "size", "exact_size", "native") and v != ap.get_default(k)) + (" --write" if a.write else "")
    body = render(stream, ex, cmd)
    print(body)
    if a.write:
        print(update_section("pixel_metrics", "Pixel metrics in bounded memory (issue 13)", body), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Bounded load test of the HTTP service (``visionscale serve``) against 127.0.0.1 only.

Usage: python benchmarks/bench_serve.py [--requests 2000] [--concurrency 16] [--max-batch 1,8]
                                        [--run RUN] [--write]
       (--write updates the "HTTP service load test" section of docs/benchmarks.md)

Fits a tiny PatchCore run (``patchcore_tiny``, 64 px, the 64 px brick demo, random backbone: a
few seconds) unless ``--run`` is given, then for each ``--max-batch`` value starts
``visionscale serve RUN --port P --max-batch N`` as its own process (so the client does not share
its interpreter), waits for /readyz, and sends ``--requests`` POST /v1/anomaly/score uploads
(the demo's 64 px test PNGs in turn, ``images=none``: scores, labels and regions, no overlay) from
``--concurrency`` concurrent connections (httpx, asyncio). Reports per configuration: p50/p95/p99
latency, throughput, the count of 5xx (must be 0) and of other non-200 answers, the server's
resident memory (VmRSS) after warm-up and after the load, and the mean batch size from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fit(tmp: Path) -> tuple[Path, list[Path]]:
    import torch

    from visionscale.anomaly import train as T
    from visionscale.anomaly.synthetic import make_demo

    torch.set_num_threads(1)
    make_demo(tmp / "demo", seed=0, size=64, categories=["brick"], num_train=10, num_test_good=3, num_test_defect=1)
    T.fit_patchcore(tmp / "demo" / "brick", tmp / "run",
                    T.FitConfig(model="patchcore_tiny", image_size=64, batch_size=4, device="cpu"))
    return tmp / "run", sorted((tmp / "demo" / "brick" / "test").rglob("*.png"))


async def _load(base: str, images: list[bytes], n: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        async def worker():
            for i in counter:
                data = images[i % len(images)]
                t0 = time.perf_counter()
                r = await client.post("/v1/anomaly/score?images=none", files={"file": ("x.png", data, "image/png")})
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def q(p):
        return lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]

    return {"requests": n, "concurrency": concurrency, "wall_s": wall, "throughput_rps": n / wall,
            "p50_ms": 1000 * q(0.5), "p95_ms": 1000 * q(0.95), "p99_ms": 1000 * q(0.99),
            "mean_ms": 1000 * statistics.fmean(lat), "statuses": statuses,
            "n_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "n_other_non_200": sum(v for k, v in statuses.items() if k != 200 and k < 500)}


def _batch_mean(metrics: str) -> float | None:
    s = re.search(r'^visionscale_batch_size_sum\{model="anomaly"\} (\S+)$', metrics, re.M)
    c = re.search(r'^visionscale_batch_size_count\{model="anomaly"\} (\S+)$', metrics, re.M)
    return float(s.group(1)) / float(c.group(1)) if s and c and float(c.group(1)) else None


def bench_one(run: Path, images: list[bytes], max_batch: int, n: int, concurrency: int) -> dict:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "visionscale.cli.main", "serve", str(run), "--port", str(port),
                             "--device", "cpu", "--max-batch", str(max_batch), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        asyncio.run(_load(base, images, min(50, n), concurrency))  # warm-up: connections, first batches
        rss_before = _rss(proc.pid)
        res = asyncio.run(_load(base, images, n, concurrency))
        rss_after = _rss(proc.pid)
        res.update(max_batch=max_batch, rss_before_mib=rss_before / 2**20, rss_after_mib=rss_after / 2**20,
                   mean_batch=_batch_mean(httpx.get(base + "/metrics").text))
        return res
    finally:
        proc.terminate()
        proc.wait(30)


def table(results: list[dict]) -> str:
    rows = ["| --max-batch | requests | concurrency | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | 5xx | other non-200 "
            "| mean batch | server RSS before → after (MiB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r['max_batch']} | {r['requests']} | {r['concurrency']} | {r['throughput_rps']:.1f} | "
                    f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['n_5xx']} | "
                    f"{r['n_other_non_200']} | {r['mean_batch']:.2f} | "
                    f"{r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", default="1,8", help="comma list: one server per value")
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is None:
            run, files = _fit(Path(tmp))
        else:
            run, files = args.run, []
        if not files:
            raise SystemExit("give --run together with the demo images, or let the benchmark fit one")
        images = [p.read_bytes() for p in files]
        with open("/proc/loadavg") as fh:
            load_before = fh.read().split()[:3]
        results = [bench_one(run, images, int(b), args.requests, args.concurrency) for b in args.max_batch.split(",")]
        with open("/proc/loadavg") as fh:
            load_after = fh.read().split()[:3]
    print(json.dumps(results, indent=2))
    print(table(results))
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    if args.write:
        from benchlib import machine, update_section

        body = (f"Machine: {machine()}. Load average (1/5/15 min) {' '.join(load_before)} before, "
                f"{' '.join(load_after)} after: other jobs shared the 2 cores, so absolute numbers are "
                f"noisy; compare rows of one run.\n\n"
                f"Command: `python benchmarks/bench_serve.py --requests {args.requests} --concurrency "
                f"{args.concurrency} --max-batch {args.max_batch} --write`. Server: `visionscale serve RUN --device "
                f"cpu --max-batch N` (uvicorn, one process) on 127.0.0.1; client: httpx (asyncio) in another "
                f"process on the same machine; model: `patchcore_tiny` at 64 px (random backbone), POST "
                f"/v1/anomaly/score with 64 px PNGs, `images=none` (score, label, regions; no overlay PNG).\n\n"
                + table(results))
        print(update_section("bench-serve", "HTTP service load test (`benchmarks/bench_serve.py`)", body))


if __name__ == "__main__":
    main()

"""Bounded load test of the HTTP service (``visionscale serve``) against 127.0.0.1 only.

Usage: python benchmarks/bench_serve.py [--requests 2000] [--concurrency 16] [--max-batch 1,8]
                                        [--framework fastapi[,litserve]] [--rounds 1] [--run RUN] [--write]
       (--write updates the "HTTP service load test" section of docs/benchmarks.md, or with
       litserve in --framework the "Serving framework comparison" section)

Fits a tiny PatchCore run (``patchcore_tiny``, 64 px, the 64 px brick demo, random backbone: a
few seconds) unless ``--run`` is given, then for each ``--max-batch`` value starts
``visionscale serve RUN --port P --max-batch N`` as its own process (so the client does not share
its interpreter), waits for /readyz, and sends ``--requests`` POST /v1/anomaly/score uploads
(the demo's 64 px test PNGs in turn, ``images=none``: scores, labels and regions, no overlay) from
``--concurrency`` concurrent connections (httpx, asyncio). Reports per configuration: p50/p95/p99
latency, throughput, the count of 5xx (must be 0) and of other non-200 answers, the server's
resident memory (VmRSS of the server process and its children) after warm-up and after the load,
and the mean batch size from /metrics.

``--framework litserve`` serves the same endpoint and model with LitServe instead
(``benchmarks/litserve_anomaly.py``; needs ``pip install litserve``), so the framework choice in
docs/serve.md rests on a measurement; ``--rounds R`` repeats every configuration R times,
interleaved, and reports each configuration's median-throughput round.
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


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _rss(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (LitServe runs its model in child processes)."""
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


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


def bench_one(run: Path, images: list[bytes], max_batch: int, n: int, concurrency: int,
              framework: str = "fastapi") -> dict:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if framework == "litserve":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "litserve_anomaly.py"), str(run), "--port", str(port),
               "--max-batch", str(max_batch)]
        ready = "/health"
    else:
        cmd = [sys.executable, "-m", "visionscale.cli.main", "serve", str(run), "--port", str(port),
               "--device", "cpu", "--max-batch", str(max_batch), "--log-level", "warning"]
        ready = "/readyz"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + ready, timeout=5).status_code == 200:
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
        res.update(framework=framework, max_batch=max_batch, rss_before_mib=rss_before / 2**20,
                   rss_after_mib=rss_after / 2**20,
                   mean_batch=_batch_mean(httpx.get(base + "/metrics").text) if framework == "fastapi" else None)
        return res
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)  # LitServe's worker processes too
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(not installed)"


def table(results: list[dict], rounds: bool = False) -> str:
    head = ("| framework | --max-batch | requests | concurrency | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) "
            "| 5xx | other non-200 | mean batch | server RSS before → after (MiB) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    if rounds:
        head += " req/s of each round |"
        rule += "---|"
    rows = [head, rule]
    for r in results:
        mb = "n/a" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
        row = (f"| {r.get('framework', 'fastapi')} | {r['max_batch']} | {r['requests']} | {r['concurrency']} | "
               f"{r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['n_5xx']} | "
               f"{r['n_other_non_200']} | {mb} | {r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f} |")
        if rounds:
            row += " " + ", ".join(str(x) for x in r.get("rounds_rps", [])) + " |"
        rows.append(row)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", default="1,8", help="comma list: one server per value")
    ap.add_argument("--framework", default="fastapi", help="comma list of fastapi, litserve")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the median-throughput round is kept")
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
        configs = [(f, int(b)) for f in args.framework.split(",") for b in args.max_batch.split(",")]
        rounds: dict[tuple, list[dict]] = {c: [] for c in configs}
        for _ in range(args.rounds):
            for f, b in configs:
                rounds[(f, b)].append(bench_one(run, images, b, args.requests, args.concurrency, f))
        results = []
        for c in configs:
            rs = sorted(rounds[c], key=lambda r: r["throughput_rps"])
            results.append({**rs[len(rs) // 2], "rounds_rps": [round(r["throughput_rps"], 1) for r in rounds[c]]})
        with open("/proc/loadavg") as fh:
            load_after = fh.read().split()[:3]
    print(json.dumps(results, indent=2))
    print(table(results))
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    if args.write and args.framework != "fastapi":
        from benchlib import machine, update_section

        body = (f"Machine: {machine()}. Load average (1/5/15 min) {' '.join(load_before)} before, "
                f"{' '.join(load_after)} after.\n\n"
                f"Command: `python benchmarks/bench_serve.py --requests {args.requests} --concurrency "
                f"{args.concurrency} --max-batch {args.max_batch} --framework {args.framework} --rounds "
                f"{args.rounds} --write`. The same endpoint (POST /v1/anomaly/score, 64 px PNG uploads, "
                f"`patchcore_tiny` at 64 px, one torch thread, scored by the same `RunAnomalyService`) served "
                f"by our FastAPI app (`visionscale serve`, uvicorn, one process) and by LitServe "
                f"{_version('litserve')} (`benchmarks/litserve_anomaly.py`: one API server process, one "
                f"inference worker process, `batch_timeout` 2 ms like our `--max-wait-ms`). Each row is the "
                f"median-throughput of {args.rounds} interleaved rounds (all rounds' req/s in the last column). "
                f"RSS counts the server and its child processes.\n\n"
                + table(results, rounds=True))
        print(update_section("bench-serve-frameworks", "Serving framework comparison (`benchmarks/bench_serve.py "
                             "--framework fastapi,litserve`)", body))
    elif args.write:
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

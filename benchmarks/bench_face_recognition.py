"""Benchmark face recognition: embedding throughput and gallery identify latency.

Usage: python benchmarks/bench_face_recognition.py [--write] [--sizes 10000,1000000] [--dim 512] [--cuda]
       (--write updates docs/benchmarks.md between the bench_face_recognition markers)

The gallery at scale (exact vs approximate indexes, both metrics, recall@1) is measured by
``benchmarks/bench_gallery.py``; ``--sizes`` here (empty by default) keeps the older exact-only
512-d measurement.

1. Embedding throughput of ``face_embedder_resnet18`` (random weights: speed does not depend
   on them) on 112x112 inputs, batch 1 and batch 64, images per second, model forward only
   (the input tensors are prepared beforehand), median over repeats.
2. Gallery at N identities (one random unit 512-d vector each): bulk enrolment into SQLite
   (``Gallery.enroll_many``: one transaction), index build from the database (first search
   after opening, including writing the vector cache), reopening with the cache, and
   identify latency (top-5) for one query at a time and for a batch of 64 queries, with
   faiss ``IndexFlatIP`` and with the numpy fallback (both exact).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402

from visionscale.face.gallery import Gallery, faiss_available  # noqa: E402
import visionscale.face.embedder  # noqa: E402,F401  registers the face_embedder_* models
from visionscale.registry import create  # noqa: E402


def _time(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_embedding(repeats: int, threads: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = create("face_embedder_resnet18").eval()
    rows = []
    before = torch.get_num_threads()
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            for bs in (1, 64):
                x = torch.randn(bs, 3, 112, 112)
                with torch.inference_mode():
                    ts = _time(lambda x=x: model(x), repeats if bs == 1 else max(3, repeats // 5))
                med = statistics.median(ts)
                rows.append({"device": "cpu", "dtype": "fp32", "threads": nt, "batch": bs, "median_ms": med * 1e3,
                             "p95_ms": _p95(ts) * 1e3, "images_per_s": bs / med})
    finally:
        torch.set_num_threads(before)
    return rows


def bench_embedding_cuda(warmup: int = 100, repeats: int = 1000) -> list[dict]:
    """CONVENTIONS protocol: warm-up at every shape, synchronise around host timers."""
    torch.manual_seed(0)
    model = create("face_embedder_resnet18").eval().cuda()
    rows = []
    for dtype in ("fp32", "fp16"):
        for bs in (1, 64):
            x = torch.randn(bs, 3, 112, 112, device="cuda")
            ctx = (torch.autocast("cuda", dtype=torch.float16) if dtype == "fp16" else torch.autocast("cuda", enabled=False))
            with torch.inference_mode(), ctx:
                for _ in range(warmup):
                    model(x)
                torch.cuda.synchronize()
                ts = []
                for _ in range(repeats if bs == 1 else repeats // 4):
                    t0 = time.perf_counter()
                    model(x)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
            med = statistics.median(ts)
            rows.append({"device": torch.cuda.get_device_name(0), "dtype": dtype, "threads": torch.get_num_threads(),
                         "batch": bs, "median_ms": med * 1e3, "mean_ms": statistics.mean(ts) * 1e3,
                         "p95_ms": _p95(ts) * 1e3, "images_per_s": bs / med})
    return rows


def _p95(ts: list[float]) -> float:
    return float(np.percentile(ts, 95))


def bench_gallery(n: int, dim: int, queries: int, workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    names = [f"id{i:07d}" for i in range(n)]
    db = workdir / f"gallery_{n}.db"
    res: dict = {"n": n, "dim": dim}
    with Gallery(db, model=f"bench/{dim}d", backend="numpy") as g:
        t0 = time.perf_counter()
        g.enroll_many(names, vecs)
        res["enroll_s"] = time.perf_counter() - t0
    res["db_bytes"] = db.stat().st_size  # after close: the WAL is checkpointed into it and removed
    # Queries: noisy copies of enrolled vectors (known answer) -> check correctness too.
    idx = rng.integers(0, n, 64)
    q = vecs[idx] + 0.05 * rng.standard_normal((64, dim), dtype=np.float32)
    del vecs
    backends = ["numpy"] + (["faiss"] if faiss_available() else [])
    for b in backends:
        with Gallery(db, model=f"bench/{dim}d", backend=b, index="exact") as g:
            g.rebuild_index()  # drop the cache: measure the build from SQLite
            t0 = time.perf_counter()
            g.identify(embeddings=q[:1])
            res[f"{b}_build_s"] = time.perf_counter() - t0
        with Gallery(db, model=f"bench/{dim}d", backend=b, index="exact") as g:
            t0 = time.perf_counter()
            g.identify(embeddings=q[:1])
            res[f"{b}_reopen_s"] = time.perf_counter() - t0
            it = iter(range(10**9))
            single = _time(lambda: g.identify(embeddings=q[next(it) % 64], k=5), queries)
            batch = _time(lambda: g.identify(embeddings=q, k=5), max(2, queries // 10), warmup=1)
            hits = [r.matches[0].name for r in g.identify(embeddings=q, k=5)]
        res[f"{b}_single_ms"] = statistics.median(single) * 1e3
        res[f"{b}_single_p95_ms"] = _p95(single) * 1e3
        res[f"{b}_batch64_per_query_ms"] = statistics.median(batch) * 1e3 / 64
        res[f"{b}_top1_correct"] = sum(h == names[i] for h, i in zip(hits, idx)) / 64
    for f in workdir.glob(f"gallery_{n}.db*"):
        f.unlink()
    return res


def to_markdown(emb: list[dict], gal: list[dict], env: str, cmd: str) -> str:
    lines = [f"Measured with `{cmd}` on {env}.", "",
             "**Embedding throughput** (`face_embedder_resnet18`, 112x112, model forward only, median):", "",
             "| device | dtype | torch threads | batch | ms per batch (median / p95) | images/s |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['device']} | {r['dtype']} | {r['threads']} | {r['batch']} | {r['median_ms']:.2f} / {r['p95_ms']:.2f} | "
              f"{r['images_per_s']:.1f} |" for r in emb]
    if not gal:
        return "\n".join(lines)
    lines += ["", "**Gallery** (one random unit 512-d vector per identity; SQLite + exact inner-product search; top-5):", "",
              "| identities | backend | enrol (bulk, 1 transaction) | index build from SQLite | reopen (cache) | "
              "identify, 1 query: median / p95 | per query in a batch of 64 | top-1 correct |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in gal:
        for b in ("numpy", "faiss"):
            if f"{b}_single_ms" not in r:
                continue
            lines.append(f"| {r['n']:,} | {b} | {r['enroll_s']:.1f} s | {r[f'{b}_build_s']:.2f} s | {r[f'{b}_reopen_s']:.2f} s | "
                         f"{r[f'{b}_single_ms']:.2f} / {r[f'{b}_single_p95_ms']:.2f} ms | "
                         f"{r[f'{b}_batch64_per_query_ms']:.3f} ms | {r[f'{b}_top1_correct']:.2f} |")
    lines += ["", "Database size: " + ", ".join(f"{r['n']:,} identities {r['db_bytes'] / 2**20:.0f} MiB" for r in gal) + ".",
              "Enrolment goes through `Gallery.enroll_many` (one SQLite transaction for all rows); `enroll()` per person "
              "commits (and fsyncs) once per call and is much slower per identity. Index build = reading every vector "
              "from SQLite after the cache was deleted, plus writing the cache; reopen = loading the cache. CPU numbers "
              "on a shared machine: compare rows of one run, not across machines."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="", help="Gallery sizes (identities), comma-separated (exact search only; "
                    "see bench_gallery.py).")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=30, help="Single-query repeats per backend.")
    ap.add_argument("--repeats", type=int, default=30, help="Batch-1 embedding repeats.")
    ap.add_argument("--threads", default="1,2", help="torch thread counts for the embedding benchmark.")
    ap.add_argument("--cuda", action="store_true", help="Also time the embedder on the GPU (fp32 and fp16 autocast).")
    ap.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = ap.parse_args()
    env = machine()
    cmd = "python benchmarks/bench_face_recognition.py " + " ".join(sys.argv[1:])
    print(f"# {env}", file=sys.stderr)
    emb = bench_embedding(args.repeats, [int(t) for t in args.threads.split(",") if t.strip()])
    if args.cuda:
        if not torch.cuda.is_available():
            ap.error("--cuda given but CUDA is not available")
        emb += bench_embedding_cuda()
    print(f"# embedding: {emb}", file=sys.stderr)
    gal = []
    with tempfile.TemporaryDirectory(prefix="vs-bench-gallery-") as tmp:
        for n in (int(s) for s in args.sizes.split(",") if s.strip()):
            r = bench_gallery(n, args.dim, args.queries, Path(tmp))
            print(f"# gallery: {r}", file=sys.stderr)
            gal.append(r)
    md = to_markdown(emb, gal, env, cmd.strip())
    print(md)
    if args.write:
        print(f"updated {update_section('bench_face_recognition', 'Face recognition: embeddings and gallery search', md)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()

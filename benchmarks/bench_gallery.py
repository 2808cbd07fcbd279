"""Benchmark the face gallery at scale: exact vs approximate search, build time, latency, recall@1.

Usage: python benchmarks/bench_gallery.py [--sizes 10000,100000,1000000] [--metrics euclidean,cosine]
       [--kinds exact,ivf,hnsw] [--hnsw-max 100000] [--queries 1000] [--timed 300] [--nprobe 0,256] [--write]
       (--write updates the bench_gallery part of docs/benchmarks.md)

Data (128-d, like dlib's descriptor): every identity a random centre; the first
``min(1000, n/10)`` identities get two more embeddings (enrolled one ``enroll`` call each), the
rest one (``enroll_many``). ``euclidean``: raw dlib-like vectors, a shared offset of norm 1.4 plus
identity offsets ~0.9 apart (norms ~1.5), samples of one person ~0.4 apart. ``cosine``: random
unit centres, samples = centre + N(0, 0.03^2) per value, normalised (same person ~0.5 apart,
others ~1.4). Queries: a fresh sample
of a random identity, so the true identity is known.

Per size, metric and index: the build from SQLite (cache files deleted; the first ``identify``:
reading every vector, training and filling the index, writing its file), reopening (the first
``identify`` of a new ``Gallery``, from the cache file), single-query ``identify(k=5)`` latency
(median and p95 over ``--timed`` queries, one at a time, names included), and over ``--queries``
queries recall@1 = share whose top person equals exact search's, top-1 = share naming the true
identity.
Then 1000 people are enrolled by another connection and the first search after it is timed
(the approximate index appends them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402

from visionscale.face.gallery import Gallery  # noqa: E402
from visionscale.face.gallery_ann import AnnParams  # noqa: E402

DIM = 128


def make_data(n: int, metric: str, n_queries: int, rng: np.random.Generator):
    """Enrolled vectors (n + 2 * extra rows), their owners, queries and their true owners."""
    extra = min(1000, n // 10)
    if metric == "euclidean":
        offset = rng.standard_normal(DIM).astype(np.float32)
        offset *= 1.4 / np.linalg.norm(offset)
        spread, noise = 0.9 / np.sqrt(2 * DIM), 0.4 / np.sqrt(2 * DIM)
    else:
        offset, spread, noise = np.zeros(DIM, np.float32), 1.0, 0.03
    centres = rng.standard_normal((n, DIM), dtype=np.float32)
    centres *= spread
    if metric == "cosine":
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    else:
        centres += offset

    def sample(owners):
        x = centres[owners] + noise * rng.standard_normal((len(owners), DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x

    owners = np.concatenate([np.arange(n), np.repeat(np.arange(extra), 2)])
    emb = sample(owners)
    qi = rng.integers(0, n, n_queries)
    return emb, owners, sample(qi), qi


def _p(ts: list[float], pct: float) -> float:
    return float(np.percentile(ts, pct)) * 1e3


def bench(n: int, metric: str, kinds: list[str], n_queries: int, n_timed: int, hnsw_max: int,
          nprobes: list[int | None], workdir: Path, rng: np.random.Generator) -> list[dict]:
    emb, owners, q, qi = make_data(n, metric, n_queries, rng)
    names = [f"id{i:07d}" for i in range(n)]
    db = workdir / f"g_{metric}_{n}.db"
    model = f"bench/{DIM}d/{metric}"
    t0 = time.perf_counter()
    with Gallery(db, model=model, metric=metric, index="exact", cache_index=False) as g:
        g.enroll_many(names, emb[:n])
        t_bulk = time.perf_counter() - t0
        for j in range(n, len(owners), 2):
            g.enroll(names[owners[j]], embeddings=emb[j:j + 2])
    enrol_s = time.perf_counter() - t0
    n_vec = len(owners)
    new_people = emb[:1000] + 0.5  # enrolled later by another connection (far from everyone)
    del emb
    rows, exact_top = [], None
    for kind in kinds:
        if kind == "hnsw" and n > hnsw_max:
            continue
        work = workdir / f"w_{metric}_{n}_{kind}.db"
        shutil.copyfile(db, work)  # a fresh copy per kind (closed: no WAL): the later enrolment changes it
        settings = nprobes if kind == "ivf" else [None]
        for i, nprobe in enumerate(settings):
            params = AnnParams(nprobe=nprobe)
            r = {"n": n, "vectors": n_vec, "metric": metric, "index": kind, "enrol_s": enrol_s, "bulk_s": t_bulk,
                 "db_mib": work.stat().st_size / 2**20, "build_s": None, "after_add_s": None}
            if i == 0:  # later settings search the same index (search-time parameters only)
                with Gallery(work, model=model, metric=metric, index=kind, ann_params=params, backend="numpy") as g:
                    g.rebuild_index()
                    t0 = time.perf_counter()
                    g.identify(embeddings=q[:1])
                    r["build_s"] = time.perf_counter() - t0
            cache = g.ann_path if kind != "exact" else g.cache_path
            r["file_mib"] = cache.stat().st_size / 2**20 if cache.exists() else float("nan")
            with Gallery(work, model=model, metric=metric, index=kind, ann_params=params, backend="numpy") as g:
                t0 = time.perf_counter()
                g.identify(embeddings=q[:1])
                r["reopen_s"] = time.perf_counter() - t0
                if kind != "exact":
                    r["params"] = g._index.ann.params
                ts = []
                for x in q[:n_timed]:
                    t0 = time.perf_counter()
                    g.identify(embeddings=x, k=5)
                    ts.append(time.perf_counter() - t0)
                r["p50_ms"], r["p95_ms"] = _p(ts, 50), _p(ts, 95)
                top = [res.matches[0].name for res in g.identify(embeddings=q, k=5)]
                if kind == "exact":
                    exact_top = top
                r["recall1"] = float(np.mean([a == b for a, b in zip(top, exact_top)])) if exact_top else float("nan")
                r["top1"] = float(np.mean([t == names[j] for t, j in zip(top, qi)]))
                if i == len(settings) - 1:
                    with Gallery(work, model=model, metric=metric, cache_index=False) as writer:
                        writer.enroll_many([f"new{j:04d}" for j in range(len(new_people))], new_people)
                    t0 = time.perf_counter()
                    hit = g.identify(embeddings=new_people[7])[0].matches[0].name
                    r["after_add_s"] = time.perf_counter() - t0
                    assert hit == "new0007", hit
            rows.append(r)
            print(f"# {r}", file=sys.stderr, flush=True)
        for f in workdir.glob(f"{work.name}*"):
            f.unlink()
    for f in workdir.glob(f"{db.name}*"):
        f.unlink()
    return rows


def describe(r: dict) -> str:
    p = r.get("params")
    if p is None:
        return "exact (numpy)"
    if r["index"] == "ivf":
        return f"ivf: {p.nlist} cells, nprobe {p.nprobe}, PQ{DIM // p.pq_dims}x4 fast scan, re-rank {p.rerank}"
    return f"hnsw: M {p.m}, efConstruction {p.ef_construction}, efSearch {p.ef_search}, re-rank {p.rerank}"


def to_markdown(rows: list[dict], env: str, cmd: str) -> str:
    lines = [f"Measured with `{cmd}` on {env}.", "",
             "| identities (vectors) | metric | index | enrol | build from SQLite | reopen (file) | "
             "1 query: p50 / p95 | recall@1 vs exact | top-1 correct | first search after +1000 people | "
             "index file |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        build = f"{r['build_s']:.2f} s" if r["build_s"] is not None else "(same index)"
        add = f"{r['after_add_s']:.2f} s" if r["after_add_s"] is not None else ""
        lines.append(f"| {r['n']:,} ({r['vectors']:,}) | {r['metric']} | {describe(r)} | {r['enrol_s']:.1f} s | "
                     f"{build} | {r['reopen_s']:.2f} s | {r['p50_ms']:.2f} / {r['p95_ms']:.2f} ms | "
                     f"{r['recall1']:.3f} | {r['top1']:.3f} | {add} | {r['file_mib']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--metrics", default="euclidean,cosine")
    ap.add_argument("--kinds", default="exact,ivf,hnsw", help="exact first: recall is measured against it")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="Largest gallery to build HNSW for.")
    ap.add_argument("--queries", type=int, default=1000, help="Queries for recall@1 and top-1 (one batch).")
    ap.add_argument("--timed", type=int, default=300, help="Of which timed one at a time.")
    ap.add_argument("--nprobe", default="0", help="IVF cells per query, comma-separated settings searched on "
                    "the same index (0: the default, nlist/8).")
    ap.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = ap.parse_args()
    env = machine()
    cmd = "python benchmarks/bench_gallery.py " + " ".join(sys.argv[1:])
    print(f"# {env}", file=sys.stderr)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs-bench-gallery-", dir=os.environ.get("BENCH_TMP")) as tmp:
        for n in (int(s) for s in args.sizes.split(",") if s.strip()):
            for metric in args.metrics.split(","):
                rows += bench(n, metric, args.kinds.split(","), args.queries, args.timed, args.hnsw_max,
                              [int(v) or None for v in args.nprobe.split(",")], Path(tmp), rng)
    md = to_markdown(rows, env, cmd.strip())
    print(md)
    if args.write:
        print(f"updated {update_section('bench_gallery', 'Face gallery at scale', md)}", file=sys.stderr)


if __name__ == "__main__":
    main()

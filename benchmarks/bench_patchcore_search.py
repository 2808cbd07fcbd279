"""Benchmark PatchCore's nearest-neighbour search on the CPU: torch vs faiss vs the measured choice.

Usage: python benchmarks/bench_patchcore_search.py [--write] [--threads 2] [--repeats 3]
       (--write updates the "PatchCore nearest-neighbour search (issue 13)" section of docs/benchmarks.md)

Measures, with ``--threads`` intra-op threads for torch and faiss alike:
  1. the search alone: a bank of 16,384 x 1536 rows shaped like WRN-50 patch features
     (``||x||^2 ~ 700``, anomalib's 1536-d embedding) searched by a batch of 8 images at
     256 px (8 x 1024 patches), as ``MemoryBankSearch`` does it (nearest neighbour per
     patch plus the Eq. 7 image score): ``search="torch"``, ``"faiss"`` and ``"auto"``
     (its one-off probe timed apart);
  2. the accuracy of the distances against a float64 ``cdist`` on the first image's
     patches: the plain ``||q||^2 - 2 q.b + ||b||^2`` expansion (the search before issue
     13) and faiss on the raw bank (what it used to be given), against the centred
     ranking and the refined distances;
  3. end to end: ``visionscale.anomaly.predict.predict`` (what ``ad predict`` runs) with
     batches of 8 on a ``patchcore_wrn50`` run (random backbone weights, 256 px) fitted on
     a ``make_demo`` category, with each search.
Variants are interleaved within each repetition and medians reported (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchlib import machine, update_section

TITLE = "PatchCore nearest-neighbour search (issue 13)"
MODES = ("torch", "faiss", "auto")


def wrn_like(num_bank: int, num_queries: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 bank (N, D) and queries (Q, D): a common offset with ||offset||^2 = 700, bank
    rows spread around it, every query a bank row moved by 0.2-0.5 (its nearest-neighbour distance)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(dim, generator=g, dtype=torch.float64) + 0.3
    mu *= (700 / mu.square().sum()).sqrt()
    bank = (mu + 0.05 * torch.randn(num_bank, dim, generator=g, dtype=torch.float64)).float()
    step = torch.randn(num_queries, dim, generator=g)
    radius = 0.2 + 0.3 * torch.rand(num_queries, 1, generator=g)
    queries = bank[torch.randint(0, num_bank, (num_queries,), generator=g)] + step / step.norm(dim=1, keepdim=True) * radius
    return bank, queries


def _search_module(bank: torch.Tensor, mode: str):
    from visionscale.anomaly.patchcore import MemoryBankSearch

    m = MemoryBankSearch(1, bank.shape[1], num_neighbors=9, search=mode)
    m.memory_bank = bank
    return m


def bench_search(threads: int, repeats: int, bank_rows: int, dim: int) -> dict:
    bank, queries = wrn_like(bank_rows, 8 * 1024, dim)
    emb = queries.T.reshape(dim, 8, 32, 32).transpose(0, 1).contiguous()  # (8, D, 32, 32) like the extractor's
    modules = {mode: _search_module(bank, mode) for mode in MODES}
    out: dict = {"bank": [bank_rows, dim], "queries": [8, 1024], "seconds": {m: [] for m in MODES}}
    with torch.inference_mode():
        t0 = time.perf_counter()
        modules["auto"].choose(emb[0].flatten(1).T)  # the probe the first auto batch makes
        out["probe_s"] = time.perf_counter() - t0
        out["choice"] = modules["auto"].search_choice
        results = {}
        for m in MODES:  # warm-up: the faiss import, thread pools, the bank stats
            results[m] = modules[m](emb[:1])
        for _ in range(repeats):
            for m in MODES:
                t0 = time.perf_counter()
                results[m] = modules[m](emb)
                out["seconds"][m].append(time.perf_counter() - t0)
    out["same_scores"] = max(float((results[m][0] - results["torch"][0]).abs().max()) for m in MODES)
    out["accuracy"] = accuracy(bank, queries[:1024])
    return out


def accuracy(bank: torch.Tensor, q: torch.Tensor) -> dict:
    from visionscale.anomaly import patchcore as pc

    ref = torch.cdist(q.double(), bank.double()).min(dim=1).values  # float64 on the same float32 inputs
    strided = q.T.contiguous().view(q.shape[1], 32, 32).flatten(1).T  # (1024, D) view, as MemoryBankSearch passes it

    def err(d):
        return float((d.reshape(-1).double() - ref).abs().max())

    def plain(x):  # the search before issue 13: uncentred expansion in float32
        d2 = torch.addmm(bank.square().sum(1).unsqueeze(0), x, bank.T, alpha=-2).add_(x.square().sum(1, keepdim=True))
        return d2.clamp_min_(0).min(dim=1).values.sqrt()

    res = {"plain expansion": err(plain(q)), "plain expansion, strided queries": err(plain(strided)),
           "centred ranking (refine=False)": err(pc.nearest_neighbors(q, bank, refine=False)[0]),
           "centred ranking, strided queries": err(pc.nearest_neighbors(strided, bank, refine=False)[0]),
           "refined (default)": err(pc.nearest_neighbors(q, bank)[0]),
           "refined, strided queries": err(pc.nearest_neighbors(strided, bank)[0])}
    if pc.faiss_installed():
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank.numpy())
        res["faiss on the raw bank (before)"] = err(torch.from_numpy(index.search(q.numpy(), 1)[0]).clamp_min(0).sqrt())
        res["faiss, centred + refined (now)"] = err(pc.nearest_neighbors(q, bank, use_faiss=True)[0])
    return res


def bench_predict(tmp: Path, model: str, size: int, num_train: int, repeats: int) -> dict:
    from visionscale.anomaly.predict import load_run, predict
    from visionscale.anomaly.synthetic import make_demo
    from visionscale.anomaly.train import FitConfig, fit

    make_demo(tmp / "demo", seed=0, size=size, categories=["brick"], num_train=num_train, num_test_good=8,
              num_test_defect=2)
    data = tmp / "demo" / "brick"
    t0 = time.perf_counter()
    fit(data, tmp / "run", FitConfig(model=model, image_size=size, coreset_ratio=0.1, batch_size=8, device="cpu"))
    fit_s = time.perf_counter() - t0
    images = sorted(p for p in (data / "test").rglob("*.png"))
    batches = -(-len(images) // 8)
    runs = {}
    for mode in MODES:  # one loaded run per search, as `ad predict` would load it
        runs[mode] = load_run(tmp / "run", "cpu")
        runs[mode].model.nn_search.search = mode
    bank = runs["auto"].model.nn_search.memory_bank
    out: dict = {"model": model, "size": size, "train_images": num_train, "fit_s": fit_s, "images": len(images),
                 "batches": batches, "bank": list(bank.shape), "seconds": {m: [] for m in MODES}}
    scores = {}
    for mode in MODES:  # warm-up; the auto run makes its probe on its first batch here
        t0 = time.perf_counter()
        records, _ = predict(runs[mode], images, batch_size=8, overlays=False)
        if mode == "auto":
            out["auto_first_s"] = time.perf_counter() - t0
            out["choice"] = runs[mode].model.nn_search.search_choice
        scores[mode] = [r["score"] for r in records]
    for _ in range(repeats):
        for mode in MODES:
            t0 = time.perf_counter()
            predict(runs[mode], images, batch_size=8, overlays=False)
            out["seconds"][mode].append((time.perf_counter() - t0) / batches)
    out["score_spread"] = max(abs(a - b) for m in MODES for a, b in zip(scores[m], scores["torch"]))
    return out


def render(raw: dict, command: str) -> str:
    s, p = raw["search"], raw["predict"]
    med = {m: statistics.median(v) for m, v in s["seconds"].items()}
    pmed = {m: statistics.median(v) for m, v in p["seconds"].items()}
    choice, pchoice = s["choice"], p["choice"]
    probe = ", ".join(f"{k} {v:.0f} ms" for k, v in choice["probe_ms"].items())
    pprobe = ", ".join(f"{k} {v:.0f} ms" for k, v in pchoice["probe_ms"].items())
    end = f", {raw['load_end']:.1f} at the end" if "load_end" in raw else ""
    lines = [
        f"Machine: {raw['machine']}{end}. CPU numbers: {raw['threads']} threads for torch and faiss "
        f"(faiss {raw['faiss']}). Command: `{command}`. Medians of {raw['repeats']} interleaved repetitions; "
        "the machine is shared, so compare the variants within a table (ratios), not across runs.",
        "",
        f"### The search alone: bank {s['bank'][0]:,} x {s['bank'][1]}, a batch of 8 images at 256 px "
        f"(8 x 1024 patches)",
        "",
        "Patch nearest neighbours and the Eq. 7 image score, as `MemoryBankSearch` runs them.",
        "",
        "| search | s per batch of 8 | vs torch |",
        "|---|---:|---:|",
    ]
    for m in MODES:
        label = f"auto (chose {choice['backend']})" if m == "auto" else m
        lines.append(f"| {label} | {med[m]:.2f} | {med[m] / med['torch']:.2f}x |")
    lines += [
        "",
        f"`auto` probe (once per bank and device, on the first batch): {s['probe_s']:.2f} s in all; "
        f"{choice['probe_rows']} query rows timed: {probe}. The three give the same scores "
        f"(largest difference {s['same_scores']:.1e}).{_same_backend(choice)}",
        "",
        "Distance accuracy on the first image's 1024 patches against a float64 `cdist` (largest "
        "absolute error; nearest-neighbour distances 0.2-0.5, `||q||^2` ~ 700):",
        "",
        "| distances from | max abs error |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1e} |" for k, v in s["accuracy"].items()]
    lines += [
        "",
        f"### `ad predict` end to end: `{p['model']}` at {p['size']} px, batch 8",
        "",
        f"Random backbone weights, fitted on {p['train_images']} `make_demo` brick images (coreset 10%: bank "
        f"{p['bank'][0]:,} x {p['bank'][1]}), {p['images']} test images = {p['batches']} batches; "
        f"`visionscale.anomaly.predict.predict` without overlays (image reading included).",
        "",
        "| search | s per batch | vs torch |",
        "|---|---:|---:|",
    ]
    for m in MODES:
        label = f"auto (chose {pchoice['backend']})" if m == "auto" else m
        lines.append(f"| {label} | {pmed[m]:.2f} | {pmed[m] / pmed['torch']:.2f}x |")
    lines += [
        "",
        f"First `auto` predict, probe included: {p['auto_first_s']:.1f} s for {p['batches']} batches "
        f"(probe: {pprobe}). Scores of the three agree to {p['score_spread']:.1e}.{_same_backend(pchoice)}",
    ]
    return "\n".join(lines)


def _same_backend(choice: dict) -> str:
    return (f" `auto` runs the same code as `{choice['backend']}` after its probe: the difference between "
            "their rows is the machine's noise.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bank-rows", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--model", default="patchcore_wrn50")
    ap.add_argument("--train-images", type=int, default=40)
    ap.add_argument("--render", metavar="RAW", help="only render (and with --write, write) an earlier run's raw JSON")
    args = ap.parse_args()
    command = "python benchmarks/bench_patchcore_search.py --write"
    if args.render:
        raw = json.loads(Path(args.render).read_text())
    else:
        torch.set_num_threads(args.threads)
        faiss_version = "not installed"
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
            faiss_version = faiss.__version__
        except ImportError:
            pass
        raw = {"machine": machine(), "threads": args.threads, "faiss": faiss_version, "repeats": args.repeats}
        print(raw["machine"], flush=True)
        raw["search"] = bench_search(args.threads, args.repeats, args.bank_rows, args.dim)
        print(json.dumps(raw["search"], default=str), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            raw["predict"] = bench_predict(Path(tmp), args.model, 256, args.train_images, args.repeats)
        print(json.dumps(raw["predict"], default=str), flush=True)
        raw["load_end"] = os.getloadavg()[0]
        Path(os.environ.get("BENCH_RAW", os.devnull)).write_text(json.dumps(raw, default=str))
    block = render(raw, command)
    print(block)
    if args.write:
        update_section("bench_patchcore_search", TITLE, block)


if __name__ == "__main__":
    main()

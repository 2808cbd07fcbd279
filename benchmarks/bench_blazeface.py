"""BlazeFace throughput on CPU: our PyTorch port vs the TFLite interpreter and MediaPipe's detector.

Measures images/second at batch 1 and batch 64, in one run, for:

* ``network``: the BlazeFace network alone on a preprocessed input (ours: one torch call per
  batch; TFLite: ``ai-edge-litert``, one ``invoke`` per image since MediaPipe's graphs have a
  fixed batch of 1);
* ``pipeline``: image in, faces out (ours: ``FaceDetector.detect``, letterbox + network +
  decoding + weighted blending; MediaPipe: the tasks ``FaceDetector``, one image per call).

Each figure is the median of ``--repeats`` timed rounds after a warm-up round; ratios compare
rows measured in the same process. Prints a markdown section for docs/benchmarks.md.

    python benchmarks/bench_blazeface.py [--model front] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchlib import machine, update_section


def _rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="front", choices=["front", "back"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()

    import skimage.data

    from visionscale.face.detector import FaceDetector
    from visionscale.face.tflite_import import find_tflite

    torch.set_num_threads(args.threads)
    det = FaceDetector(args.model)
    path = find_tflite(args.model)
    base = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    # 64 distinct 512x512 images: the astronaut, shifted and with mild noise.
    images = [np.clip(np.roll(base, int(rng.integers(-40, 40)), axis=1).astype(np.int16)
                      + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(max(args.batch))]

    try:
        from visionscale.face.reference import LiteRTRunner

        litert = LiteRTRunner(path, num_threads=args.threads) if path is not None else None
    except ImportError:
        litert = None
    mp_det = None
    if args.model == "front" and path is not None:
        try:
            from visionscale.face.reference import MediaPipeFaceDetector

            mp_det = MediaPipeFaceDetector(path, min_score=det.min_score)
        except ImportError:
            mp_det = None

    rows = []
    for bs in args.batch:
        imgs = images[:bs]
        x, _ = det.preprocess(imgs)
        x_nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
        ours_net = _rate(lambda: det.raw(x), bs, args.repeats)
        ours_pipe = _rate(lambda: det.detect(imgs), bs, args.repeats)
        ref_net = _rate(lambda: litert(x_nhwc), bs, args.repeats) if litert is not None else None
        ref_pipe = _rate(lambda: [mp_det.detect(i) for i in imgs], bs, args.repeats) if mp_det is not None else None
        rows.append((bs, ours_net, ref_net, ours_pipe, ref_pipe))
    if mp_det is not None:
        mp_det.close()

    def fmt(v):
        return "n/a" if v is None else f"{v:,.0f}"

    def ratio(a, b):
        return "n/a" if b is None else f"{a / b:.2f}x"

    lines = []
    lines.append(f"Machine: {machine()}. Command: `python benchmarks/bench_blazeface.py --model {args.model} --threads {args.threads}`; "
          f"{args.threads} threads for torch and TFLite; 512x512 input images; median of {args.repeats} rounds.\n")
    lines.append("| batch | ours: network | TFLite (ai-edge-litert): network | ratio | ours: image -> faces | MediaPipe FaceDetector: image -> faces | ratio |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|")
    for bs, on, rn, op, rp in rows:
        lines.append(f"| {bs} | {fmt(on)} | {fmt(rn)} | {ratio(on, rn)} | {fmt(op)} | {fmt(rp)} | {ratio(op, rp)} |")
    lines.append("\nTFLite and MediaPipe run one image per call (MediaPipe's graphs have a fixed batch of 1); "
          "ratio = ours / reference (> 1: ours faster). CPU numbers on a shared machine are noisy; compare ratios.")

    title = f"BlazeFace ({args.model}, {det.input_size} px) on CPU: images/second (`benchmarks/bench_blazeface.py`)"
    print(f"## {title}\n\n" + "\n".join(lines))
    if args.write:
        print(f"updated {update_section(f'bench_blazeface_{args.model}', title, chr(10).join(lines))}")

if __name__ == "__main__":
    main()

"""BlazeFace on CPU, side by side with MediaPipe: image -> faces throughput at batch 1 and 64.

One run measures, on the same images and in the same process:

* ``pipeline`` (image in, faces out): ours with the default backend (``FaceDetector()``: ONNX
  Runtime when installed), ours with ``backend="eager"`` (PyTorch), and MediaPipe's tasks
  ``FaceDetector`` (one image per call: its graph has a fixed batch of 1);
* ``network`` alone on a preprocessed batch: ours (default backend, and eager) and MediaPipe's
  ``.tflite`` in the TFLite interpreter (``ai-edge-litert``, one ``invoke`` per image).

Each round takes every contender, in turn (the order rotating from round to round), through
the same ``--images`` photos in calls of ``batch`` images (MediaPipe: one call per image), so a
change in the machine's load hits all of them alike; each figure is the median over
``--repeats`` rounds after a warm-up round, in images per second. The "cores busy" column is process CPU time over wall time while the contender ran
(MediaPipe's tasks API has no thread setting; this shows what it used), and CPU ms per image
is that over the throughput: the work per image, whatever share of a loaded machine each got. ``--size`` sets the
photos' sizes: at 512x512 every sample falls on a whole source pixel (the letterbox reads one
bilinear corner), at 500x375 it needs all four. Prints a markdown section for docs/benchmarks.md (``--write``).

    python benchmarks/bench_blazeface.py [--model front] [--threads 2] [--repeats 7] [--size 512x512 500x375] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from benchlib import machine, update_section


def _images(n: int, width: int = 512, height: int = 512) -> list[np.ndarray]:
    """``n`` distinct photos: the astronaut resized to ``width x height``, shifted, with mild noise."""
    import skimage.data
    from PIL import Image

    base = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BILINEAR))
    rng = np.random.default_rng(0)
    return [np.clip(np.roll(base, int(rng.integers(-40, 40)), axis=1).astype(np.int16)
                    + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _round_robin(fns: dict, n_images: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Images/second (median over rounds) and CPU utilisation (cores busy) for each function,
    each call of which handles ``n_images`` images."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    for r in range(repeats):
        # The order rotates every round: whatever one contender leaves behind (PyTorch's OpenMP
        # threads spinning, cold caches) falls on each of the others in turn.
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t, c = time.perf_counter() - t0, time.process_time() - c0
            times[name].append(t)
            cpu[name].append(c / t)
    return {k: (n_images / statistics.median(times[k]), statistics.median(cpu[k])) for k in fns}


def _calls(fn, images: list, batch: int):
    """A function that takes ``fn`` over ``images`` in calls of ``batch``."""
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    return lambda: [fn(c) for c in chunks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="front", choices=["front", "back"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--images", type=int, default=64, help="photos per round (a multiple of each batch)")
    ap.add_argument("--size", nargs="+", default=["512x512", "500x375"], help="photo sizes WIDTHxHEIGHT")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()

    from visionscale.face.detector import FaceDetector
    from visionscale.face.tflite_import import find_tflite

    torch.set_num_threads(args.threads)
    host = machine()  # with the load average at the start
    t0 = time.perf_counter()
    ours = FaceDetector(args.model, threads=args.threads)  # default backend
    built_s = time.perf_counter() - t0
    eager = FaceDetector(args.model, backend="eager")
    path = find_tflite(args.model)
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.size]

    try:
        from visionscale.face.reference import LiteRTRunner

        litert = LiteRTRunner(path, num_threads=args.threads) if path is not None else None
    except ImportError:
        litert = None
    mp_det = None
    if args.model == "front" and path is not None:
        try:
            from visionscale.face.reference import MediaPipeFaceDetector

            mp_det = MediaPipeFaceDetector(path, min_score=ours.min_score)
        except ImportError:
            mp_det = None

    pipe, net, found = {}, {}, {}
    for width, height in sizes:
        images = _images(args.images, width, height)
        for bs in args.batch:
            fns = {"ours": _calls(ours.detect, images, bs), "eager": _calls(eager.detect, images, bs)}
            if mp_det is not None:
                fns["mediapipe"] = lambda: [mp_det.detect(i) for i in images]
            pipe[width, height, bs] = _round_robin(fns, len(images), args.repeats)
        found[width, height] = (sum(len(f) for f in ours.detect(images)),
                                None if mp_det is None else sum(len(mp_det.detect(i)) for i in images))
    for bs in args.batch:  # the network does not depend on the photos' size
        x, _ = ours.preprocess(images[:bs])
        x_nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
        fns = {"ours": lambda: ours.raw(x), "eager": lambda: eager.raw(x)}
        if litert is not None:
            fns["tflite"] = lambda: litert(x_nhwc)
        net[bs] = _round_robin(fns, bs, args.repeats)
    if mp_det is not None:
        mp_det.close()
    load1 = os.getloadavg()[0]

    def fmt(d, key):
        return "n/a" if key not in d else f"{d[key][0]:,.0f}"

    def cores(d, key):
        return "n/a" if key not in d else f"{d[key][1]:.1f}"

    def cpu_ms(d, key):  # CPU time per image: what a contender costs, whatever share of the machine it got
        return "n/a" if key not in d else f"{1e3 * d[key][1] / d[key][0]:.2f}"

    def ratio(d, a, b):
        return "n/a" if a not in d or b not in d else f"**{d[a][0] / d[b][0]:.2f}x**"

    rt = ours.runtime
    lines = [
        f"Machine: {host}, {load1:.1f} at the end (other jobs share this machine). "
        f"Command: `python benchmarks/bench_blazeface.py --model {args.model} --threads {args.threads} "
        f"--repeats {args.repeats} --size {' '.join(args.size)} --write`. {args.images} distinct photos per size "
        f"(the astronaut resized, shifted, with noise), each round through all of them in calls of `batch` images; median of "
        f"{args.repeats} round-robin rounds after a warm-up round; images/second.",
        "",
        f"Ours, default backend: `FaceDetector(\"{args.model}\", threads={args.threads})` = {rt['backend']} "
        f"({rt.get('provider', 'PyTorch')}): one image or one chunk runs on one ONNX Runtime session with {args.threads} threads, a larger batch goes to {args.threads} worker threads with one ONNX Runtime thread each, "
        f"at most 8 images per ONNX Runtime call "
        f"(constructed in {built_s:.1f} s: the ONNX export is cached). Eager: `backend=\"eager\"`, "
        f"`torch.set_num_threads({args.threads})`. MediaPipe: the tasks `FaceDetector` on the same `.tflite`, "
        f"one image per call (its graph has a fixed batch of 1; its API has no thread setting). "
        f"TFLite network: `ai-edge-litert` with {args.threads} threads, one `invoke` per image.",
        "",
        "Image -> faces (letterbox, network, decoding, weighted blending, boxes in image pixels):",
        "",
        "| photos | batch | ours (default) img/s | ours eager img/s | MediaPipe img/s | ours / MediaPipe "
        "| eager / MediaPipe | cores busy: ours / eager / MediaPipe | CPU ms per image: ours / MediaPipe |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (width, height, bs), d in pipe.items():
        lines.append(f"| {width}x{height} | {bs} | {fmt(d, 'ours')} | {fmt(d, 'eager')} | {fmt(d, 'mediapipe')} | "
                     f"{ratio(d, 'ours', 'mediapipe')} | {ratio(d, 'eager', 'mediapipe').strip('*')} | "
                     f"{cores(d, 'ours')} / {cores(d, 'eager')} / {cores(d, 'mediapipe')} | "
                     f"{cpu_ms(d, 'ours')} / {cpu_ms(d, 'mediapipe')} |")
    lines += ["", "Network alone on a preprocessed batch:", "",
              "| batch | ours (default) img/s | ours eager img/s | TFLite img/s | ours / TFLite | eager / TFLite |",
              "|---:|---:|---:|---:|---:|---:|"]
    for bs, d in net.items():
        lines.append(f"| {bs} | {fmt(d, 'ours')} | {fmt(d, 'eager')} | {fmt(d, 'tflite')} | "
                     f"{ratio(d, 'ours', 'tflite').strip('*')} | {ratio(d, 'eager', 'tflite').strip('*')} |")
    same = "; ".join(f"{w}x{h}: {a} faces found by ours, {b} by MediaPipe" for (w, h), (a, b) in found.items())
    lines += ["", f"Faces on the {args.images} photos per size: {same}. Ratios > 1: ours faster. The network-alone rows "
              f"make one call on the whole batch, ours in one {rt['backend']} thread; the pipeline splits a batch "
              f"over the worker threads (a single image: one call on the all-threads session). "
              f"CPU numbers on a shared machine are noisy, compare the ratios (measured in the same rounds)."]

    title = f"BlazeFace ({args.model}, {ours.input_size} px) on CPU: images/second (`benchmarks/bench_blazeface.py`)"
    print(f"## {title}\n\n" + "\n".join(lines))
    if args.write:
        print(f"updated {update_section(f'bench_blazeface_{args.model}', title, chr(10).join(lines))}")


if __name__ == "__main__":
    main()

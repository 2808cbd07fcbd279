"""``visionscale face detect ...``: BlazeFace face detection on image files and folders.

Thin layer over :class:`visionscale.face.detector.FaceDetector`: parse, read images in batches,
one library call per batch, print (``--json`` for scripts) and optionally write annotated
copies: all moved into ``--out`` at the end, and a folder holding files of the user's is refused
before any work. Bad input prints ``error: ...`` naming the file and exits with status 2 (the
library raises a :class:`~visionscale.errors.VisionscaleError`, which
:class:`~visionscale.cli._common.CLIGroup` prints); any other exception is a bug.
The recognition commands (verify, enroll, identify, ...) are added to this app by
:mod:`visionscale.cli.face_recognition`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from visionscale.cli._common import CLIGroup, err, fail, note_runner, out
from visionscale.cli._options import (Address, CpusPerWorker, DEFAULT_DEVICE, DEFAULT_PRECISION, Device, Engine,
                                      Precision)

# Detection's own default: ONNX Runtime on a CPU when installed (FaceDetector(backend="auto")).
FaceBackend = Annotated[str, typer.Option("--backend", help="auto (ONNX Runtime on a CPU when installed, else eager), "
                                          "eager, compile, onnxruntime or tensorrt (see `visionscale bench`).")]

app = typer.Typer(
    cls=CLIGroup,
    help="Faces: BlazeFace detection with MediaPipe's weights (and recognition commands).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _group() -> None:
    """Faces: BlazeFace detection with MediaPipe's weights (and recognition commands)."""
    # A callback keeps `face` a command group even while `detect` is its only command.


def _annotate(image, faces, path: Path) -> None:
    """Write ``image`` with boxes, scores and keypoints drawn, atomically."""
    from visionscale.face.plots import annotate_faces
    from visionscale.io.atomic import write_atomic

    write_atomic(path, annotate_faces(image, faces, _format(path)))


def _format(path: Path) -> str:
    return "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"


def _out_name(src: Path, used: set[str]) -> str:
    suffix = src.suffix.lower() if src.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    name = f"{src.stem}_faces{suffix}"
    k = 1
    while name in used:  # same file name in two input folders
        k += 1
        name = f"{src.stem}_faces-{k}{suffix}"
    used.add(name)
    return name


@app.command("detect")
def detect_cmd(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write annotated copies (boxes, keypoints) here."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON (boxes and keypoints in pixels)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even if it holds files of your own (same names are replaced)."),
    model: str = typer.Option("front", "--model", "-m", help="front (= short range, 128 px) or back (256 px)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Score threshold (default 0.5 front, 0.65 back)."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="A .tflite or .safetensors file (default: MediaPipe's, installed)."),
    blending: str = typer.Option("weighted", "--blending", help="weighted (MediaPipe's weighted NMS) or nms."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per network call."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also read images in subfolders."),
    backend: FaceBackend = "auto",
    precision: Precision = DEFAULT_PRECISION,
    device: Device = DEFAULT_DEVICE,
    engine: Engine = "local",
    address: Address = None,
    workers: int = typer.Option(0, "--workers", min=0, help="--engine ray: Ray workers (0: one per GPU, or per --cpus-per-worker cores)."),
    cpus_per_worker: CpusPerWorker = 1,
) -> None:
    """Find faces; print boxes and the six keypoints per face, optionally write annotated images."""
    from visionscale.io.images import collect_images

    files = collect_images(images, recursive=recursive)
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        fail(f"--min-score must be in [0, 1], got {min_score}")
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (address is not None or workers or cpus_per_worker != 1):
        fail("--address, --workers and --cpus-per-worker need --engine ray")
    # Never name an annotated copy like an input image that lives in --out.
    used = {f.name for f in files if out_dir is not None and f.absolute().parent == out_dir.absolute()}
    if engine == "ray":
        results = _detect_ray(files, out_dir, used, overwrite, batch_size, address, workers, cpus_per_worker,
                              dict(model=model, weights=str(weights) if weights is not None else None,
                                   min_score=min_score, blending=blending, batch_size=batch_size, backend=backend,
                                   precision=precision, device=device))
    else:
        results = _detect_local(files, out_dir, used, overwrite, model, weights, min_score, blending, batch_size,
                                backend, precision, device)
    _print_results(results, as_json, out_dir)


def _detect_ray(files, out_dir, used, overwrite, batch_size, address, workers, cpus_per_worker, detector) -> list[dict]:
    from visionscale.cli._common import note, note_nodes
    from visionscale.cli.face_recognition import literal_progress
    from visionscale.engines.faces import detect_ray
    from visionscale.engines.ray_engine import RayOptions

    names = [_out_name(f, used) for f in files] if out_dir is not None else None

    def started(info: dict) -> None:
        resumed = f"; resuming: {info['resumed']} image(s) already done" if info["resumed"] else ""
        note(f"ray: {info['workers']} worker(s) for {info['todo']} image(s){resumed}")

    with literal_progress(transient=True, disable=len(files) <= batch_size) as progress:
        task = progress.add_task("detecting faces", total=len(files))
        return detect_ray(files, detector, out_dir=out_dir, out_names=names, overwrite=overwrite,
                          batch_size=batch_size, on_start=started, on_end=note_nodes,
                          ray=RayOptions(address=address, workers=workers or None, cpus_per_worker=cpus_per_worker),
                          progress=lambda done, total: progress.update(task, completed=done))


def _detect_local(files, out_dir, used, overwrite, model, weights, min_score, blending, batch_size, backend,
                  precision, device) -> list[dict]:
    from visionscale.cli.face_recognition import literal_progress
    from visionscale.face.detector import MIN_IMAGE_SIDE, FaceDetector
    from visionscale.io.images import read_image
    from visionscale.io.outputs import OutputDir

    # Checked before the detector is built: a bad --out fails at once, and no user file is replaced.
    output = OutputDir(out_dir, kind="face-detect", overwrite=overwrite) if out_dir is not None else None
    detector = FaceDetector(model=model, weights=weights, min_score=min_score, blending=blending, batch_size=batch_size,
                            backend=backend, precision=precision, device=device)
    note_runner(detector.runtime)

    results = []
    with (output if output is not None else nullcontext()) as staging, \
            literal_progress(transient=True, disable=len(files) <= batch_size) as progress:
        task = progress.add_task("detecting faces", total=len(files))
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            arrays = []
            for f in chunk:
                a = read_image(f)
                if min(a.shape[:2]) < MIN_IMAGE_SIDE:
                    fail(f"image too small for face detection: {f} is {a.shape[1]}x{a.shape[0]} px "
                         f"(need at least {MIN_IMAGE_SIDE} px per side)")
                arrays.append(a)
            for f, a, faces in zip(chunk, arrays, detector.detect(arrays)):
                if staging is not None:
                    _annotate(a, faces, staging / _out_name(f, used))
                results.append({"image": str(f), "width": a.shape[1], "height": a.shape[0],
                                "faces": [x.to_dict() for x in faces]})
            progress.advance(task, len(chunk))
    return results


def _print_results(results: list[dict], as_json: bool, out_dir) -> None:
    if as_json:
        out.print_json(json.dumps(results))
    else:
        for r in results:
            faces = r["faces"]
            if not faces:
                out.print(f"{r['image']}: no face found", highlight=False)
                continue
            out.print(f"{r['image']}: {len(faces)} face{'s' if len(faces) != 1 else ''}", highlight=False)
            for i, f in enumerate(faces):
                x0, y0, x1, y1 = f["box"]
                eyes = f["keypoints"]
                out.print(f"  face {i}: box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) score {f['score']:.3f} "
                          f"eyes {tuple(round(v) for v in eyes['right_eye'])} {tuple(round(v) for v in eyes['left_eye'])}",
                          highlight=False)
    n_faces = sum(len(r["faces"]) for r in results)
    if n_faces == 0:
        err.print(f"no face found in {len(results)} image{'s' if len(results) != 1 else ''}", highlight=False)
    if out_dir is not None:
        err.print(f"annotated images written to {out_dir}", highlight=False)


# verify, enroll, identify, gallery, train, eval-lfw, make-lfw-demo (the recognition half)
from visionscale.cli.face_recognition import register as _register_recognition  # noqa: E402

_register_recognition(app)

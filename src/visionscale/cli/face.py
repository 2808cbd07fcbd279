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
from visionscale.cli._options import DEFAULT_DEVICE, DEFAULT_PRECISION, Device, Precision

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


_KEYPOINT_COLOURS = [(0, 255, 0), (0, 200, 255), (255, 0, 255), (255, 255, 0), (255, 128, 0), (128, 128, 255)]


def _annotate(image, faces, path: Path) -> None:
    """Write ``image`` with boxes, scores and keypoints drawn, atomically."""
    from PIL import Image, ImageDraw

    from visionscale.io.atomic import atomic_path

    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    line = max(1, round(min(img.size) / 200))
    r = max(2, line * 2)
    for f in faces:
        draw.rectangle([f.box[0], f.box[1], f.box[2], f.box[3]], outline=(255, 0, 0), width=line)
        draw.text((f.box[0] + line, max(f.box[1] - 12, 0)), f"{f.score:.2f}", fill=(255, 0, 0))
        for (x, y), colour in zip(f.keypoints, _KEYPOINT_COLOURS):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)


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
) -> None:
    """Find faces; print boxes and the six keypoints per face, optionally write annotated images."""
    from visionscale.cli.face_recognition import literal_progress
    from visionscale.face.detector import MIN_IMAGE_SIDE, FaceDetector
    from visionscale.io.images import collect_images, read_image
    from visionscale.io.outputs import OutputDir

    files = collect_images(images, recursive=recursive)
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        fail(f"--min-score must be in [0, 1], got {min_score}")
    # Checked before the detector is built: a bad --out fails at once, and no user file is replaced.
    output = OutputDir(out_dir, kind="face-detect", overwrite=overwrite) if out_dir is not None else None
    detector = FaceDetector(model=model, weights=weights, min_score=min_score, blending=blending, batch_size=batch_size,
                            backend=backend, precision=precision, device=device)
    note_runner(detector.runtime)

    results = []
    # Never name an annotated copy like an input image that lives in --out.
    used = {f.name for f in files if out_dir is not None and f.absolute().parent == out_dir.absolute()}
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

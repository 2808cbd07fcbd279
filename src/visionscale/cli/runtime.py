"""``visionscale export`` and ``visionscale bench``: thin commands over :mod:`visionscale.runtime`.

Registered in ``cli/main.py`` with ``app.command("export")(export_cmd)`` and
``app.command("bench")(bench_cmd)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from visionscale.cli._common import err, error_line, fail, out, split_csv
from visionscale.cli._options import DEFAULT_DEVICE, DEFAULT_PRECISION, Backends, Device, Precision, Precisions
from visionscale.errors import VisionscaleError


def _image_size(values: Optional[tuple[int, int]]) -> tuple[int, int] | None:
    if not values:
        return None
    if len(values) != 2 or any(v <= 0 for v in values):
        raise ValueError(f"--image-size takes two positive numbers H W, got {list(values)}")
    return int(values[0]), int(values[1])


def _ints(text: str, what: str) -> tuple[int, ...]:
    vals = []
    for item in split_csv(text):
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"{what} {item!r} is not an integer") from None
        if v < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
        vals.append(v)
    if not vals:
        raise ValueError(f"no {what} given")
    return tuple(vals)


def export_cmd(
    model: str = typer.Argument(..., help="Registry name (visionscale models), 'package.module:attr', a classifier / detector / face-embedder checkpoint or an anomaly run folder."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx or tensorrt (TensorRT needs a CUDA GPU and torch-tensorrt)."),
    precision: Precision = DEFAULT_PRECISION,
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (.onnx, or .ep for TensorRT); metadata and parity go to FILE.json. Required unless --bundle is given.", show_default=False),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Write a deployment bundle folder instead (an anomaly run folder, or 'face'): ONNX graph(s), bundle.json, checksums.sha256; load it with visionscale.load_bundle (onnxruntime, numpy and Pillow only).", show_default=False),
    archive: Optional[str] = typer.Option(None, "--archive", help="With --bundle: also write BUNDLE.tar or BUNDLE.zip (tar or zip).", show_default=False),
    image_size: Optional[tuple[int, int]] = typer.Option(None, "--image-size", help="Example input H W [default: the model's own, else 256].", show_default=False),
    batch: Optional[int] = typer.Option(None, help="Example batch [default: 2 so the batch axis stays dynamic; 1 for PatchCore]."),
    static: bool = typer.Option(False, "--static", help="Export the example shape only (no dynamic batch/height/width)."),
    opset: int = typer.Option(18, help="ONNX opset."),
    as_json: bool = typer.Option(False, "--json", help="Print the export report (the sidecar JSON) to stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file and its FILE.json (never the model being exported)."),
) -> None:
    """Export a model to ONNX or TensorRT, or a deployment bundle; a parity check against eager FP32 follows every export."""
    if bundle is not None:
        _export_bundle(model, bundle, archive, out_file, format, opset, overwrite, as_json)
        return
    if archive is not None:
        fail("--archive needs --bundle")
    if out_file is None:
        fail("give --out FILE (or --bundle FOLDER for a deployment bundle)")
    from visionscale.runtime.export import export_model

    try:
        size = _image_size(image_size)
        if batch is not None and batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
    except ValueError as exc:
        fail(str(exc))
    kw = dict(precision=precision, image_size=size, batch=batch, overwrite=overwrite)
    if format == "onnx":
        kw.update(dynamic=not static, opset=opset)
    try:  # RunnerError, PrecisionError, ExportError... (caught here too for apps without CLIGroup)
        with err.status(f"exporting {model} to {format}"):
            result = export_model(model, out_file, format=format, **kw)
    except VisionscaleError as exc:
        fail(error_line(exc))
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=1, default=lambda o: None) + "\n")
    else:
        dyn = [k for k, v in result.dynamic.items() if v]
        out.print(f"wrote {result.path} ({result.format}, {result.precision}, input {result.input_shape}, "
                  f"dynamic: {', '.join(dyn) or 'none'}) in {result.export_seconds:.1f} s", highlight=False)
        for check in result.parity:
            if check.get("error"):
                out.print(f"parity {check['shape']}: FAILED to run: {check['error']}", highlight=False)
            else:
                out.print(f"parity vs eager fp32 {check['shape']}: max abs {check['max_abs']:.3g}, "
                          f"max rel {check['max_rel']:.3g} {'ok' if check['ok'] else 'OUT OF TOLERANCE'}", highlight=False)
        out.print(f"report: {result.sidecar}", highlight=False)
    if not result.parity_ok:
        err.print("error: the exported model does not match eager FP32 within tolerance (see the report)", highlight=False)
        raise typer.Exit(1)


def _export_bundle(model: str, bundle: Path, archive: Optional[str], out_file: Optional[Path], format: str,
                   opset: int, overwrite: bool, as_json: bool) -> None:
    """``export RUN --bundle OUT``: one library call (:func:`visionscale.bundle.write_bundle`)."""
    from visionscale.bundle import write_bundle

    if out_file is not None:
        fail("--out and --bundle exclude each other: a bundle names its graph files itself")
    if format != "onnx":
        fail("a bundle holds ONNX graphs: --format must be onnx with --bundle")
    try:
        with err.status(f"writing bundle {bundle} from {model}"):
            result = write_bundle(model, bundle, archive=archive, overwrite=overwrite, opset=opset)
    except VisionscaleError as exc:
        fail(error_line(exc))
    if as_json:
        sys.stdout.write(json.dumps({"path": str(result.path), "archive": str(result.archive) if result.archive else None,
                                     "manifest": result.manifest}, indent=1, default=lambda o: None) + "\n")
        return
    card = result.manifest["card"]
    out.print(f"wrote bundle {result.path} ({result.manifest['kind']}: {card.get('model', card.get('what'))})"
              + (f" and {result.archive}" if result.archive else ""), highlight=False)
    for check in result.parity:
        if check.get("max_abs") is not None:
            out.print(f"parity vs eager fp32 {check['shape']}: max abs {check['max_abs']:.3g}", highlight=False)


def bench_cmd(
    model: str = typer.Argument(..., help="Registry name, 'package.module:attr', a classifier / detector / face-embedder checkpoint or an anomaly run folder."),
    # bench compares: by default the eager baseline against ONNX Runtime, not a single backend.
    backend: Backends = "eager,onnxruntime",
    precision: Precisions = DEFAULT_PRECISION,
    batch: str = typer.Option("1", "--batch", help="Comma list of batch sizes."),
    image_size: Optional[tuple[int, int]] = typer.Option(None, "--image-size", help="Input H W [default: the model's own, else 256].", show_default=False),
    device: Device = DEFAULT_DEVICE,
    providers: Optional[str] = typer.Option(None, help="ONNX Runtime providers, comma list (cpu, cuda, tensorrt) [default: from --device]."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up calls per row [default: 20 on CUDA, 2 on CPU]."),
    repeats: Optional[int] = typer.Option(None, help="Timed calls per row [default: 100 on CUDA, 10 on CPU]."),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC for the PyTorch backends."),
    run: Optional[Path] = typer.Option(None, "--run", help="Fitted anomaly run folder: benchmark its model and report AUROC per row (needs --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data: the task metric per backend/precision. Anomaly run: its data set (AUROC); classifier checkpoint: labelled folder (accuracy); detector checkpoint: folder with val.json (COCO AP); face embedder: LFW folder with pairs.txt (verification accuracy)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write bench.json and bench.md here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a --out folder that holds files visionscale did not write."),
    as_json: bool = typer.Option(False, "--json", help="Print bench.json to stdout."),
) -> None:
    """Latency, throughput and accuracy deltas per backend x precision x batch, against eager FP32."""
    from visionscale.io.outputs import OutputDir
    from visionscale.deploy.bench import BenchConfig, bench, render_markdown, write_result

    try:
        batches, size = _ints(batch, "batch size"), _image_size(image_size)
    except ValueError as exc:
        fail(str(exc))
    try:  # RunnerError, PrecisionError, OutputError... (caught here too for apps without CLIGroup)
        cfg = BenchConfig(
            model=str(run) if run is not None else model, backends=tuple(split_csv(backend)),
            precisions=tuple(split_csv(precision)), batches=batches, image_size=size,
            device=device, warmup=warmup, repeats=repeats,
            providers=tuple(split_csv(providers)) if providers else None, channels_last=channels_last,
            run_dir=str(run) if run is not None else None, data=str(data) if data is not None else None,
        )
        cfg.validate()
        # checked before the benchmark runs
        target = OutputDir(out_dir, kind="bench", overwrite=overwrite) if out_dir is not None else None
        with err.status("starting") as status:
            result = bench(cfg, progress=lambda m: status.update(m))
    except VisionscaleError as exc:
        fail(error_line(exc))
    if target is not None:
        write_result(result, target)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=1, default=lambda o: None) + "\n")
    else:
        out.print(render_markdown(result), highlight=False, markup=False)
        if out_dir is not None:
            out.print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}", highlight=False)
    if not any(r["status"] == "ok" and (r["backend"], r["precision"]) != ("eager", "fp32") for r in result.rows) \
            and any((b, p) != ("eager", "fp32") for b in cfg.backends for p in cfg.precisions):
        err.print("error: none of the requested backend/precision combinations could run (see the notes)", highlight=False)
        raise typer.Exit(1)

"""``visionscale`` command line: a thin typer layer over the Python API.

Each command parses arguments, makes one library call and prints. Errors in the input
print one line naming what is wrong and exit with status 2; nothing is written then.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from visionscale.cli._common import CLIApp, CLIGroup, err, fail, out, split_csv, set_verbosity, warn
from visionscale.cli._options import DEFAULT_DEVICE, DEFAULT_PRECISION, Device, Precisions

app = CLIApp(
    cls=CLIGroup,
    help="How memory and latency of vision models grow with image resolution, and what fits on your GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show warnings and errors only, no notes."),
) -> None:
    """How memory and latency of vision models grow with image resolution, and what fits on your GPU."""
    set_verbosity(verbose=verbose, quiet=quiet)


def parse_resolutions(text: str) -> tuple[int, ...]:
    values = []
    for item in split_csv(text):
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"resolution {item!r} is not an integer number of pixels") from None
        if v <= 0:
            raise ValueError(f"resolution must be positive, got {v}")
        values.append(v)
    if not values:
        raise ValueError("no resolutions given")
    return tuple(values)


@app.command("models")
def models_cmd(pattern: str = typer.Argument("*", help="fnmatch pattern, e.g. '*tiny'")) -> None:
    """List registered models."""
    from visionscale.registry import list_models

    for name in list_models(pattern):
        out.print(name, highlight=False)


@app.command("scale")
def scale_cmd(
    models: str = typer.Option("patchcore,efficientad_m,ddad", "--models", "-m", help="Comma-separated model names (see `visionscale models`), or your own as 'package.module:attr' (an nn.Module or a function returning one; it may take image_size)."),
    resolutions: str = typer.Option("256,512,1024", "--resolutions", "-r", help="Comma-separated square sizes in px."),
    target: int = typer.Option(3000, help="Extrapolate the fits to this side length (px)."),
    precision: Precisions = DEFAULT_PRECISION,
    dtype: Optional[str] = typer.Option(None, "--dtype", hidden=True, help="Deprecated name of --precision."),
    device: Device = DEFAULT_DEVICE,
    batch_size: int = typer.Option(1, help="Images per forward pass (the seed uses 1)."),
    timing: bool = typer.Option(True, "--timing/--no-timing", help="Measure runtime (analytic memory is always computed)."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up runs per resolution [default: 100 on CUDA, 1 on CPU]."),
    repeats: Optional[int] = typer.Option(None, help="Timed runs [default: 1000 on CUDA, 3 on CPU]."),
    time_budget: Optional[float] = typer.Option(None, help="Seconds for all timing [default: none on CUDA, 60 on CPU]; what does not fit is marked skipped."),
    gpu: list[str] = typer.Option([], "--gpu", help="Add a GPU to the catalogue: 'NAME=SIZE', e.g. 'RTX 6000 Ada=48GiB'. Repeatable."),
    only_gpus: bool = typer.Option(False, "--only-gpus", help="Use only the --gpu cards, not the built-in catalogue."),
    cuda_context: str = typer.Option("512MiB", help="Memory the CUDA context and libraries take beside PyTorch's tensors."),
    exact_limits: bool = typer.Option(True, "--exact-limits/--no-exact-limits", help="Also find each GPU's limit by bisection on the analytic pass."),
    limit_cap: int = typer.Option(16384, help="Largest side (px) the GPU-limit search tries; a model that still fits there is reported as '>= CAP'."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
    out_dir: Path = typer.Option(Path("scale-results"), "--out", "-o", help="Output folder (replaced as a whole; an earlier study's files there are removed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds files visionscale did not write (files of the same name are replaced)."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json to stdout."),
) -> None:
    """Run the resolution-scalability study (defaults: seed 000's study).

    --precision stores parameters and activations in that precision; a comma list
    (fp32,fp16,bf16) is a precision axis: rows, fits and GPU limits per precision.
    """
    from visionscale.study.gpus import GPUS, parse_gpu, parse_size
    from visionscale.study.report import output_dir, write_outputs
    from visionscale.study.sweep import StudyConfig, run_study

    if dtype is not None:
        if precision != DEFAULT_PRECISION and precision != dtype:
            fail("--dtype is the old name of --precision: give one of them")
        warn("--dtype is deprecated and will be removed; use --precision")
        precision = dtype
    # Bad input (a StudyError, UnknownModelError, DeviceError, OutputError, a GPU or memory size
    # parse_gpu / parse_size cannot read...: all VisionscaleErrors) becomes one line in CLIGroup;
    # only parse_resolutions' ValueErrors are the CLI's own.
    try:
        res = parse_resolutions(resolutions)
    except ValueError as exc:
        fail(str(exc))
    extra = tuple(parse_gpu(g) for g in gpu)
    cards = extra if only_gpus else GPUS + extra
    if not cards:
        fail("--only-gpus needs at least one --gpu NAME=SIZE")
    context_bytes = parse_size(cuda_context)
    cfg = StudyConfig(
        models=tuple(split_csv(models)), resolutions=res, target=target, dtype=precision, device=device,
        batch_size=batch_size, timing=timing, warmup=warmup, repeats=repeats, time_budget_s=time_budget,
        gpus=cards, cuda_context_bytes=context_bytes, exact_limits=exact_limits, limit_cap=limit_cap,
    )
    cfg.resolved_device()  # an unknown or absent device fails before the folder is checked
    target_dir = output_dir(out_dir, overwrite=overwrite)  # checked before the study runs
    with err.status("starting") as status:
        result = run_study(cfg, progress=lambda msg: status.update(msg))
    written = write_outputs(result, target_dir, plots=plots)

    if as_json:
        sys.stdout.write((out_dir / "results.json").read_text() + "\n")
        return
    _print_summary(result)
    out.print(f"wrote {len(written)} files to {out_dir}/ (report.md, results.json, CSVs{', plots' if plots else ''})",
              highlight=False)


def _print_summary(result) -> None:
    from rich.table import Table

    from visionscale.study.report import analytic_limit_text

    exact = bool(result.config.get("exact_limits"))
    title = "Largest square resolution per GPU, px: analytic (quadratic fit)" if exact else \
        "Largest square resolution per GPU, px (quadratic fit of peak memory)"
    dtypes = list(result.config.get("dtypes") or [result.config.get("dtype", "fp32")])
    multi = len(dtypes) > 1
    if any(g.get("capped") for g in result.gpu_limits):
        title += f"; >= N: still fits at the search's cap of {result.config.get('limit_cap')} px"
    t = Table(title=title)
    t.add_column("GPU")
    models = list(dict.fromkeys(g["model"] for g in result.gpu_limits))
    columns = [(m, d) for m in models for d in dtypes] if multi else [(m, None) for m in models]
    for m, d in columns:
        t.add_column(m if d is None else f"{m} {d}", justify="right")
    for name in dict.fromkeys(g["gpu"] for g in result.gpu_limits):
        cells = []
        for m, d in columns:
            g = next(x for x in result.gpu_limits
                     if x["gpu"] == name and x["model"] == m and (d is None or x.get("dtype") == d))
            fit = "–" if g["max_resolution"] is None else str(g["max_resolution"])
            if exact:
                cells.append(f"{analytic_limit_text(g)} ({fit})")
            else:
                cells.append(fit)
        t.add_row(name, *cells)
    out.print(t)
    if result.tile_plans:
        _print_tiles(result, columns, multi)


def _print_tiles(result, columns, multi: bool) -> None:
    """The tile that fits on each GPU, and the tiles (and estimated time) of one 12 MP image."""
    from rich.table import Table

    from visionscale.study.report import tile_cell, timing_device_text

    plans = result.tile_plans
    mp = 12.0 if any(p["megapixels"] == 12.0 for p in plans) else plans[0]["megapixels"]
    side = next(p["image_side_px"] for p in plans if p["megapixels"] == mp)
    timed = any(p["seconds_per_image"] is not None for p in plans)
    title = f"Tile that fits per GPU, px: tiles{' and estimated time' if timed else ''} per {mp:g} MP image ({side} px)"
    rules = sorted({p["time_rule"] for p in plans if p.get("time_rule")})
    t = Table(title=title, caption=f"times on {timing_device_text(result)} ({'; '.join(rules)})" if timed else
              "no estimated times: no resolution was timed (see report.md)")
    t.add_column("GPU")
    for m, d in columns:
        t.add_column(m if d is None else f"{m} {d}", justify="right")
    for name in dict.fromkeys(p["gpu"] for p in plans):
        cells = []
        for m, d in columns:
            p = next((x for x in plans if x["gpu"] == name and x["model"] == m and x["megapixels"] == mp
                      and (d is None or x.get("dtype") == d)), None)
            if p is None or p["tile_limit_px"] is None:
                cells.append("–")
                continue
            limit = (">= " if p.get("tile_limit_capped") else "") + str(p["tile_limit_px"])
            cells.append(f"{limit}: " + tile_cell(p, short=True))
        t.add_row(name, *cells)
    out.print(t)


from visionscale.cli import ad as _ad, classify as _classify, detect as _detect, face as _face  # noqa: E402
from visionscale.cli.inspect import inspect_cmd  # noqa: E402
from visionscale.cli.runtime import bench_cmd, export_cmd  # noqa: E402
from visionscale.cli.serve import serve_cmd  # noqa: E402

app.command("inspect")(inspect_cmd)
app.command("export")(export_cmd)
app.command("bench")(bench_cmd)
app.command("serve")(serve_cmd)
app.add_typer(_ad.app, name="ad")
app.add_typer(_classify.app, name="classify")
app.add_typer(_detect.app, name="detect")
app.add_typer(_face.app, name="face")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

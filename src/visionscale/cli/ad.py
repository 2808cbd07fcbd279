"""``visionscale ad``: anomaly detection from the command line (demo data, fit, predict, eval).

A thin typer layer over :mod:`visionscale.anomaly`: each command parses arguments, makes one
library call and prints. Bad input prints ``error: ...`` on stderr and exits with status 2;
notes and warnings go to stderr, results (tables, ``--json``, ``--csv``) to stdout.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from visionscale.cli._common import CLIGroup, err, fail, note, note_nodes, note_runner, out, split_csv, warn
from visionscale.cli._options import (Address, Backend, CpusPerWorker, DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_PRECISION,
                                      Device, Engine, Precision)
from visionscale.io.outputs import OutputDir
from visionscale.tiling import parse_tile


def parse_budget(text: str) -> int:
    from visionscale.study.tiles import parse_budget as parse

    return parse(text)

app = typer.Typer(
    cls=CLIGroup,
    help="Anomaly detection: make demo data, fit PatchCore / EfficientAD / DDAD, predict on images, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def warn_if_random(run) -> None:
    what = run.config.get("random_weights", "legacy")
    if what == "legacy":  # runs written before the field existed: PatchCore, random iff no --weights
        what = "backbone" if run.config.get("weights") is None else None
    if what == "teacher":
        warn("running on a RANDOM EfficientAD teacher: this run was fitted without --teacher or --distill-teacher; "
             "refit with --teacher FILE (a pretrained PDN) for meaningful anomaly scores")
    elif what:
        warn(f"running on RANDOM {what} weights: this run was fitted without --weights; refit with "
             f"--weights FILE (an ImageNet state dict of the backbone) for meaningful anomaly scores")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"320x256"`` (width x height) -> (256, 320) as (H, W)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--image-size must be N or WIDTHxHEIGHT in pixels, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise ValueError(f"--image-size must be N or WIDTHxHEIGHT in pixels, got {text!r}")
    w, h = vals
    return h, w


@contextmanager
def _progress():
    """A rich progress bar on stderr; yields a ``progress(stage, done, total)`` callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = prog.add_task(stage, total=total)
            prog.update(bars[stage], completed=done, total=total)

        yield update




@app.command("make-demo")
def make_demo_cmd(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to write the categories into."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives identical files."),
    size: int = typer.Option(256, help="Side of the square images, px (32 to 8192; above 512 a larger field of the texture, not a blurrier one)."),
    categories: str = typer.Option("brick,grass,gravel", help="Comma-separated textures: brick, grass, gravel."),
    train: int = typer.Option(40, help="Good training images per category."),
    test_good: int = typer.Option(10, help="Good test images per category."),
    test_defect: int = typer.Option(5, help="Test images per defect type (scratch, stain, hole, color)."),
    small_defects: bool = typer.Option(False, "--small-defects", help="Defects of 0.05-0.2% of the image area (at 2048 px about 50-100 px across) instead of a few percent."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing category folders."),
) -> None:
    """Build MVTec-layout demo categories from scikit-image's textures, with exact defect masks."""
    from visionscale.anomaly.synthetic import DemoExistsError, make_demo

    try:
        with err.status("writing demo images") as status:
            written = make_demo(out_dir, seed=seed, size=size, categories=split_csv(categories), num_train=train,
                                num_test_good=test_good, num_test_defect=test_defect, small_defects=small_defects,
                                overwrite=overwrite,
                                progress=lambda done, total: status.update(f"writing demo images {done}/{total}"))
    except DemoExistsError as exc:
        fail(f"{exc}: pass --overwrite to replace them")
    for p in written:
        out.print(f"wrote {p}", highlight=False)


@app.command("fit")
def fit_cmd(
    data: Path = typer.Option(..., "--data", help="MVTec AD root or category, or a normal/ abnormal/ masks/ folder."),
    run_dir: Path = typer.Option(..., "--out", help="Run folder to write (an unfinished one is resumed)."),
    model: str = typer.Option("patchcore", "--model", help="patchcore (WRN-101-2), patchcore_wrn50, patchcore_tiny, "
                              "efficientad_s, efficientad_m, efficientad_tiny, ddad or ddad_tiny."),
    category: Optional[str] = typer.Option(None, "--category", help="MVTec category when DATA holds several."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="N or WIDTHxHEIGHT, px: whole images are resized to it [default: 256]. Not with --tile (see --pre-resize)."),
    tile: Optional[str] = typer.Option(None, "--tile", help="Fit and score at native resolution in tiles of N or WIDTHxHEIGHT px (the model input), or 'auto' with --memory-budget."),
    tile_overlap: Optional[int] = typer.Option(None, "--tile-overlap", help="px shared by neighbouring tiles [default: twice the model's tile margin + tile/8]."),
    pre_resize: Optional[str] = typer.Option(None, "--pre-resize", help="With --tile: resize every image to WIDTHxHEIGHT before tiling [default: native resolution]."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory one forward pass may use (e.g. 4GiB, 512MiB): picks the largest tile that fits (--tile auto)."),
    workers: int = typer.Option(0, "--workers", help="Threads decoding images in parallel (0: none)."),
    tile_bank: str = typer.Option("shared", "--tile-bank", help="PatchCore with --tile: 'shared' (one memory bank over all tiles) or 'per-position' (one bank per tile position: fixed camera, aligned parts; all images one size)."),
    coreset_ratio: float = typer.Option(0.1, "--coreset-ratio", help="PatchCore: share of patch features kept (0.1, 0.01)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step [default: PatchCore 8, EfficientAD 1 (paper), DDAD its trainer's]."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights (PatchCore, DDAD; EfficientAD: the WRN-101-2 to distil from): a .pth/.safetensors file, or DEFAULT (download). Random if not given."),
    steps: Optional[int] = typer.Option(None, "--steps", help="EfficientAD / DDAD training steps [default: EfficientAD 70000, DDAD its trainer's]."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="EfficientAD: pretrained teacher PDN weights (.pth or .safetensors state dict)."),
    distill_teacher: bool = typer.Option(False, "--distill-teacher", help="EfficientAD: distil the teacher from Wide-ResNet-101-2 features on the --imagenet images first."),
    imagenet: Optional[Path] = typer.Option(None, "--imagenet", help="EfficientAD: folder of generic images (ImageNet) for the student penalty and for --distill-teacher."),
    distill_steps: int = typer.Option(60000, "--distill-steps", help="EfficientAD: teacher distillation steps (paper: 60000, batch 16)."),
    allow_random_weights: bool = typer.Option(False, "--allow-random-weights", help="EfficientAD: distil from a RANDOM WRN when its weights cannot be had (offline)."),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", help="EfficientAD / DDAD: steps between checkpoints (resume after an interruption)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unreadable images out and list them, instead of stopping."),
    seed: int = typer.Option(0, help="Seeds random weights, projection, coreset start, data order and hold-outs."),
    device: Device = DEFAULT_DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Fit into a folder that holds other files (a run's file names there are replaced) or a different fit (started over)."),
) -> None:
    """Fit an anomaly detector on normal images and save it with its thresholds.

    The run folder is locked while fitting: a second `ad fit` into it stops at once.
    """
    from visionscale.anomaly import train as T

    # Library errors (FitError, DataError, ...) are VisionscaleErrors: CLIGroup prints them.
    if tile is not None and image_size is not None:
        fail("--image-size resizes whole images; with --tile the model input is the tile: use --pre-resize to resize "
             "images before tiling")
    if (pre_resize is not None or tile_overlap is not None) and tile is None and memory_budget is None:
        fail("--pre-resize and --tile-overlap apply to tiled fits: add --tile N (or --memory-budget)")
    try:
        size = parse_image_size(image_size or "256")
    except ValueError as exc:
        fail(str(exc))
    budget = parse_budget(memory_budget) if memory_budget is not None else None
    tile_size = None if tile is None or tile.strip().lower() == "auto" else parse_tile(tile, "tile")
    if tile is not None and tile_size is None and budget is None:
        fail("--tile auto needs --memory-budget (the tile is chosen to fit it)")
    cfg = T.FitConfig(model=model, image_size=size, coreset_ratio=coreset_ratio, tile=tile_size,
                      tile_overlap=tile_overlap, pre_resize=parse_tile(pre_resize, "pre_resize") if pre_resize else None,
                      memory_budget=budget, workers=workers, tile_bank=tile_bank,
                      batch_size=batch_size, weights=weights, seed=seed, device=device, skip_bad=skip_bad,
                      steps=steps, teacher=teacher, distill_teacher=distill_teacher,
                      imagenet=str(imagenet) if imagenet is not None else None, distill_steps=distill_steps,
                      allow_random_weights=allow_random_weights, checkpoint_every=checkpoint_every)
    try:
        with _progress() as progress:
            result = T.fit(data, run_dir, cfg, category=category, progress=progress, overwrite=overwrite)
    except KeyboardInterrupt:
        fail(f"interrupted; finished batches and checkpoints are kept in {run_dir}: run the same command again "
             f"to resume", 130)
    if as_json:
        sys.stdout.write(json.dumps({"run": str(result.run), "calibration": result.calibration,
                                     "metrics": result.metrics, "state": result.state}, indent=2, default=str) + "\n")
        return
    _print_fit(result)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def _print_fit(result) -> None:
    st, cal = result.state, result.calibration
    stages = st.get("stages", {})
    secs = ", ".join(f"{k} {v.get('seconds', 0):.1f} s" for k, v in stages.items())
    peak = f"peak memory {st.get('peak_rss_bytes', 0) / 2**20:,.0f} MiB"
    if "coreset" in stages:
        co = stages["coreset"]
        what = f"memory bank {co.get('bank_rows', '?')} of {co.get('patch_rows', '?')} patches"
    else:
        m = stages.get("model", {})
        loss = m.get("final_loss")
        what = f"trained {m.get('steps', '?')} steps" + (f", final loss {loss:.4f}" if loss is not None else "")
    out.print(f"fitted {result.run}: {what} ({secs}; {peak})", highlight=False)
    out.print(f"image threshold {cal['image_threshold']:.4f}: {cal['image_threshold_source']}", highlight=False)
    if result.metrics:
        _print_metrics(result.metrics)


def _print_metrics(m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"test set: {m['num_images']} images, {m['num_anomalous']} anomalous")
    for col in ("image AUROC", "image F1", "pixel AUROC", "pixel F1", f"AUPRO@{m['fpr_limit']:g}"):
        t.add_column(col, justify="right")
    t.add_row(_fmt(m["image_auroc"]), _fmt(m["image_f1"]), _fmt(m["pixel_auroc"]), _fmt(m["pixel_f1"]),
              _fmt(m["aupro"]))
    out.print(t)


def _note_search(run) -> None:
    """Which nearest-neighbour search PatchCore's probe chose (measured, not by what is installed)."""
    inner = run.model
    while not hasattr(inner, "nn_search") and hasattr(inner, "model"):
        inner = inner.model
    choice = getattr(getattr(inner, "nn_search", None), "search_choice", None)
    if choice:
        note(f"nearest-neighbour search: {choice.get('backend')} ({choice.get('reason')})")


def _tiling_and_batch(run, tile_overlap: int | None, budget: int | None, batch_size: int, inputs):
    """The tiling to score with (the run's, or another overlap) and the batch of tiles a budget allows."""
    from visionscale.anomaly.tiles import plan_batch, retile

    tiling = run.tiling
    if tiling is None:
        if tile_overlap is not None:
            fail(f"--tile-overlap applies to tiled runs; {run.path} was fitted on whole images (ad fit --tile)")
        if budget is not None:
            note("--memory-budget: this run scores whole images at its model size; the budget only checks they fit")
    elif tile_overlap is not None:
        tiling = retile(run.model, tiling, tile_overlap)
    if budget is not None:
        batch_size = plan_batch(run.model, run.tiling.tile if tiling is not None else run.image_size, budget,
                                batch_size)
        note(f"--memory-budget {budget / 2**30:.2f} GiB: {batch_size} "
             f"{'tile' if tiling is not None else 'image'}(s) per forward pass")
    return tiling, batch_size


@app.command("predict")
def predict_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="Run folder written by `ad fit`."),
    images: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Image files or folders of images."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where heatmaps and predictions.json/csv go [default: RUN/predictions]; written all at once, replacing an earlier prediction's files."),
    as_json: bool = typer.Option(False, "--json", help="Print predictions as JSON on stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="Print predictions as CSV on stdout."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write heatmap overlay PNGs (at most 1024 px on the longer side)."),
    masks: bool = typer.Option(True, "--masks/--no-masks", help="Write each image's predicted defect mask PNG (image size, 0/255)."),
    regions: bool = typer.Option(True, "--regions/--no-regions", help="Write each image's connected defect regions as boxes in image pixels (NAME_regions.json)."),
    raw_maps: bool = typer.Option(False, "--raw-maps", help="Also write each raw anomaly map as NAME_map.npy (float32)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Image threshold to use instead of the run's saved one."),
    target_fpr: Optional[float] = typer.Option(None, "--target-fpr", help="Set the image threshold so at most this share of the run's normal calibration images score above it (e.g. 0.01)."),
    tile_overlap: Optional[int] = typer.Option(None, "--tile-overlap", help="Tiled runs: another overlap than the run's."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Tiled runs: memory one forward pass may use (e.g. 2GiB); picks the batch of tiles."),
    workers: int = typer.Option(0, "--workers", min=0, help="Threads decoding images in parallel (0: none); with --engine ray, Ray workers (0: one per GPU, or per --cpus-per-worker cores)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out folder that holds other files (same names are replaced)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unreadable images out and list them."),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    engine: Engine = "local",
    address: Address = None,
    cpus_per_worker: CpusPerWorker = 1,
) -> None:
    """Score images: anomalous or normal, a score, and a heatmap overlay each."""
    from visionscale.anomaly.predict import image_threshold, load_run, records_csv
    from visionscale.engines.anomaly import predict

    if as_json and as_csv:
        fail("--json and --csv exclude each other")
    dest = out_dir or run_dir / "predictions"
    # RunError, DataError, OutputError...: VisionscaleErrors, printed by CLIGroup.
    OutputDir(dest, kind="ad-predict", overwrite=overwrite)  # refuse a bad --out before loading anything
    budget = parse_budget(memory_budget) if memory_budget is not None else None
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (address is not None or cpus_per_worker != 1):
        fail("--address and --cpus-per-worker need --engine ray")
    ray_opts = None
    if engine == "ray":  # the workers load the run; here only its thresholds and tiling are needed
        from visionscale.engines.ray_engine import RayOptions

        ray_opts = RayOptions(address=address, workers=workers or None, cpus_per_worker=cpus_per_worker)
    run = load_run(run_dir, device if engine == "local" else "cpu",
                   backend=backend if engine == "local" else "eager",
                   precision=precision if engine == "local" else "fp32")
    warn_if_random(run)
    if engine == "local":
        note_runner(run.model)
    tiling, batch_size = _tiling_and_batch(run, tile_overlap, budget, batch_size, images)
    with _progress() as progress:
        records, log = predict(run, images, dest, engine=engine, ray=ray_opts, device=device, backend=backend,
                               precision=precision, batch_size=batch_size, skip_bad=skip_bad, overlays=heatmaps,
                               masks=masks, regions=regions, raw_maps=raw_maps, progress=progress,
                               threshold=threshold, target_fpr=target_fpr, tiling=tiling, overwrite=overwrite,
                               memory_budget=budget, workers=workers, on_start=_note_engine,
                               on_end=note_nodes)
    _note_search(run)
    for n in (log.size_note(run.image_size), log.bad_note()):
        if n:
            note(n)
    if as_json:
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
    elif as_csv:
        sys.stdout.write(records_csv(records))
    else:
        from rich.table import Table

        thr = image_threshold(run, threshold, target_fpr)
        t = Table(title=f"threshold {thr:.4f} (normalized 0.5)")
        for col in ("image", "label", "score", "normalized"):
            t.add_column(col, justify="left" if col in ("image", "label") else "right")
        for r in records:
            style = "bold red" if r["label"] == "anomalous" else None
            t.add_row(r["path"], r["label"], f"{r['score']:.4f}", f"{r['normalized_score']:.3f}", style=style)
        out.print(t)
        out.print(f"wrote predictions and heatmaps to {dest}", highlight=False)


def _note_engine(info: dict) -> None:
    """What a Ray job is about to do, on stderr."""
    res = " + ".join(f"{v:g} {k.removeprefix('num_')[:3].upper()}" for k, v in info["resources"].items())
    resumed = f"; resuming: {info['resumed']} image(s) already done" if info.get("resumed") else ""
    if info.get("discarded"):
        resumed += "; an unfinished job with other arguments was discarded"
    note(f"ray: {info['workers']} worker(s) of {res} each for {info['todo']} image(s){resumed}")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="Run folder written by `ad fit`."),
    data: Path = typer.Option(..., "--data", help="Data set with a test split (MVTec or folder layout)."),
    category: Optional[str] = typer.Option(None, "--category"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where metrics.json, scores.csv, roc.png, pro.png go [default: RUN/eval]."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write ROC and PRO curves as PNG."),
    tile_overlap: Optional[int] = typer.Option(None, "--tile-overlap", help="Tiled runs: another overlap than the run's."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Tiled runs: memory one forward pass may use (e.g. 2GiB); picks the batch of tiles."),
    workers: int = typer.Option(0, "--workers", help="Threads decoding images in parallel (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out folder that holds other files (same names are replaced)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unreadable images out and list them."),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
) -> None:
    """Evaluate a fitted run on a test set: image/pixel AUROC, AUPRO@0.3, F1; ROC and PRO PNGs."""
    from visionscale.anomaly.predict import evaluate, load_run

    dest = out_dir or run_dir / "eval"
    # RunError, DataError, OutputError...: VisionscaleErrors, printed by CLIGroup.
    OutputDir(dest, kind="ad-eval", overwrite=overwrite)  # refuse a bad --out before loading anything
    budget = parse_budget(memory_budget) if memory_budget is not None else None
    run = load_run(run_dir, device, backend=backend, precision=precision)
    warn_if_random(run)
    note_runner(run.model)
    tiling, batch_size = _tiling_and_batch(run, tile_overlap, budget, batch_size, [data])
    with _progress() as progress:
        res = evaluate(run, data, category, dest, batch_size=batch_size, skip_bad=skip_bad, plots=plots,
                       progress=progress, tiling=tiling, overwrite=overwrite, memory_budget=budget,
                       workers=workers)
    _note_search(run)
    for n in res.metrics.notes:
        note(n)
    if as_json:
        sys.stdout.write((dest / "metrics.json").read_text())
        return
    _print_metrics(res.metrics.as_dict())
    out.print(f"wrote {', '.join(p.name for p in res.files)} to {dest}", highlight=False)

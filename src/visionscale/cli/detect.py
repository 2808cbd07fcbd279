"""``visionscale detect ...``: EAPM figures, the demo dataset, detector training and comparison.

Thin layer over :mod:`visionscale.detection`: each command parses, makes one library call
and prints. Bad input prints ``error: ...`` on stderr and exits with status 2: the library's
:class:`~visionscale.errors.VisionscaleError` goes to :class:`~visionscale.cli._common.CLIGroup`,
which prints it; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from visionscale.cli._common import CLIGroup, err, fail, note, note_runner, out, warn
from visionscale.cli._options import Backend, DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_PRECISION, Device, Precision

app = typer.Typer(
    cls=CLIGroup,
    help="Object detection with EAPM (example-attribute based prediction modulation) and plain losses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)




@app.command("plot-eapm")
def plot_eapm_cmd(
    out_dir: Path = typer.Option(Path("eapm-figures"), "--out", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds other files (those stay)."),
) -> None:
    """Draw the paper's Fig. 3 (focal vs EAPM, mu = 1, 1.5, 2) and Fig. 4 (smooth L1, balanced L1, EAPM theta = 1, 1.5, 2)."""
    from visionscale.detection.plots import plot_eapm

    paths = plot_eapm(out_dir, overwrite=overwrite)
    for p in paths:
        out.print(f"wrote {p}", highlight=False)


@app.command("make-demo")
def make_demo_cmd(
    out_dir: Path = typer.Argument(..., help="Folder for images/, train.json and val.json."),
    n_train: int = typer.Option(600, "--train", help="Training images."),
    n_val: int = typer.Option(150, "--val", help="Validation images."),
    size: int = typer.Option(160, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds other files (those stay)."),
) -> None:
    """Generate the offline demo face-detection set (scikit-image faces and non-faces on textures, COCO JSON)."""
    from visionscale.detection.demo import DemoConfig, make_demo

    cfg = DemoConfig(n_train=n_train, n_val=n_val, size=size, seed=seed)
    with err.status("rendering") as status:
        summary = make_demo(out_dir, cfg, progress=lambda d, t: status.update(f"rendering {d}/{t}"),
                            overwrite=overwrite)
    out.print(f"wrote {summary['train_images']} train images ({summary['train_faces']} faces) and "
              f"{summary['val_images']} val images ({summary['val_faces']} faces) to {out_dir}/", highlight=False)


def _config(
    data: Optional[Path], train_ann: Optional[Path], train_images: Optional[Path], val_ann: Optional[Path],
    val_images: Optional[Path], data_format: str, **kw,
):
    from visionscale.detection.train import TrainConfig

    if data is not None:
        if train_ann is not None:
            fail("give either --data DIR or --train-ann, not both")
        train_ann, val_ann = data / "train.json", data / "val.json"
        for p in (train_ann, val_ann):
            if not p.is_file():
                fail(f"--data {data}: missing {p.name} (make one with `visionscale detect make-demo {data}`)")
        data_format = "coco"
    if train_ann is None:
        fail("no training data: give --data DIR or --train-ann FILE")
    s = lambda p: None if p is None else str(p)  # noqa: E731
    return TrainConfig(train_ann=str(train_ann), train_images=s(train_images), val_ann=s(val_ann),
                       val_images=s(val_images), data_format=data_format, **kw)


def _check_data(cfg, strict: bool) -> None:
    """Read the annotations once up front: errors exit 2, skipped boxes are listed as warnings."""
    from visionscale.detection.data import AnnotationError
    from visionscale.detection.train import load_dataset

    for ann, images in ((cfg.train_ann, cfg.train_images), (cfg.val_ann, cfg.val_images)):
        if ann is None:
            continue
        ds = load_dataset(ann, images, cfg.data_format, strict=strict)
        _warn_skipped(ds, ann)
        if len(ds) == 0:
            raise AnnotationError(f"{ann}: no images")


def _warn_skipped(ds, ann, shown: int = 20) -> None:
    """One warning per ground-truth entry the reader skipped (the first ``shown``), then a count."""
    for msg in ds.problems[:shown]:
        warn(f"{msg} (skipped)")
    if len(ds.problems) > shown:
        warn(f"... and {len(ds.problems) - shown} more skipped entries in {ann}")


def _check_model(name: str) -> None:
    import visionscale.detection.model  # noqa: F401  (registers the detectors)
    from visionscale.registry import get_model_factory

    get_model_factory(name)


class _Bar:
    """Rich progress bar fed by the trainer's events."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=err)
        self.task = None
        self.label = "training"

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, ev: dict) -> None:
        if ev["kind"] == "run":
            self.label = f"{ev['label']}, seed {ev['seed']}"
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = None
        elif ev["kind"] == "step":
            if self.task is None:
                self.task = self.progress.add_task(self.label, total=ev["total"], loss=ev["loss"])
            self.progress.update(self.task, completed=ev["step"], loss=ev["loss"])
        elif ev["kind"] == "eval":
            ap = ev.get("AP")
            self.progress.console.print(f"{self.label}: epoch {ev['epoch']} AP {'–' if ap is None else f'{ap:.1f}'}",
                                        highlight=False)


@app.command("train")
def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Folder with train.json / val.json (COCO, e.g. from make-demo)."),
    train_ann: Optional[Path] = typer.Option(None, help="Training annotations (COCO JSON or WIDER FACE *_bbx_gt.txt)."),
    train_images: Optional[Path] = typer.Option(None, help="Training image folder [COCO default: the JSON's folder]."),
    val_ann: Optional[Path] = typer.Option(None, help="Validation annotations."),
    val_images: Optional[Path] = typer.Option(None, help="Validation image folder."),
    data_format: str = typer.Option("coco", "--format", help="coco or widerface."),
    loss: str = typer.Option("focal+balanced_l1", help="focal+balanced_l1 or eapm."),
    mu: float = typer.Option(1.5, help="EAPM classification strength (0: plain focal)."),
    theta: float = typer.Option(1.0, help="EAPM regression strength (0: plain balanced L1)."),
    mf_grad: str = typer.Option("paper", help="EAPM backward: paper (dL/dx at x'), constant (MF detached) or full."),
    model: str = typer.Option("ssd_tiny", help="ssd_tiny or ssd_resnet18."),
    image_size: int = typer.Option(160, help="Train/eval side in px (images are resized)."),
    epochs: int = typer.Option(12),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(2e-3, help="AdamW peak learning rate."),
    seed: int = typer.Option(0),
    eval_every: int = typer.Option(0, help="Evaluate every N epochs (0: only at the end)."),
    out_dir: Path = typer.Option(Path("detect-run"), "--out", "-o", help="Checkpoints, metrics, curves."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.safetensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh even if OUT holds a checkpoint or other files."),
    strict: bool = typer.Option(False, "--strict", help="Fail on bad boxes instead of skipping them."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
) -> None:
    """Train the detector with plain (focal + balanced L1) or EAPM losses; evaluate with COCO AP."""
    from visionscale.detection.train import train

    cfg = _config(data, train_ann, train_images, val_ann, val_images, data_format, loss=loss, mu=mu, theta=theta,
                  mf_grad=mf_grad, model=model, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                  seed=seed, eval_every=eval_every, out_dir=str(out_dir))
    _check_data(cfg, strict)
    _check_model(cfg.model)
    with _Bar() as bar:
        bar.label = cfg.label()
        res = train(cfg, progress=bar, resume=resume, overwrite=overwrite)
    if as_json:
        sys.stdout.write((res.out_dir / "metrics.json").read_text() + "\n")
        return
    from visionscale.detection.train import format_table

    table = {"rows": [{"label": cfg.label(), "metrics": res.metrics, "seeds": [seed], "seconds": res.seconds,
                       "cpu_seconds": res.cpu_seconds}], "runs": []}
    out.print(format_table(table), highlight=False)
    out.print(f"wrote {res.out_dir}/ (model.safetensors, last.safetensors, metrics.json, loss_curves.png)", highlight=False)


@app.command("compare")
def compare_cmd(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Folder with train.json / val.json (COCO)."),
    train_ann: Optional[Path] = typer.Option(None, help="Training annotations."),
    train_images: Optional[Path] = typer.Option(None, help="Training image folder."),
    val_ann: Optional[Path] = typer.Option(None, help="Validation annotations."),
    val_images: Optional[Path] = typer.Option(None, help="Validation image folder."),
    data_format: str = typer.Option("coco", "--format", help="coco or widerface."),
    mu: float = typer.Option(1.5, help="EAPM classification strength."),
    theta: float = typer.Option(1.0, help="EAPM regression strength."),
    mf_grad: str = typer.Option("paper", help="EAPM backward mode."),
    model: str = typer.Option("ssd_tiny"),
    image_size: int = typer.Option(160),
    epochs: int = typer.Option(12),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(2e-3),
    seeds: str = typer.Option("0", help="Comma-separated seeds; both losses train once per seed."),
    out_dir: Path = typer.Option(Path("detect-compare"), "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier runs in OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Train focal + balanced L1 and EAPM on the same data and seeds; print COCO metrics side by side."""
    from visionscale.detection.train import compare, format_table
    from visionscale.io.atomic import write_atomic
    from visionscale.io.outputs import ensure_output_dir as check_output_dir

    try:  # the CLI's own parsing of --seeds
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError as exc:
        fail(f"--seeds must be comma-separated integers ({exc})")
    if not seed_list:
        fail("--seeds must be comma-separated integers (--seeds: no seed given)")
    cfg = _config(data, train_ann, train_images, val_ann, val_images, data_format, loss="eapm", mu=mu, theta=theta,
                  mf_grad=mf_grad, model=model, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                  seed=seed_list[0], out_dir=str(out_dir))
    if cfg.val_ann is None:
        fail("compare needs validation data (--data DIR or --val-ann)")
    _check_model(cfg.model)
    _check_data(cfg, strict=False)
    check_output_dir(out_dir)
    with _Bar() as bar:
        result = compare(cfg, seeds=seed_list, progress=bar, overwrite=overwrite)
    table = format_table(result)
    write_atomic(out_dir / "compare.json", json.dumps(result, indent=2).encode())
    write_atomic(out_dir / "compare.md", (table + "\n").encode())
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    out.print(table, highlight=False)
    out.print(f"wrote {out_dir}/compare.md, compare.json and one folder per run", highlight=False)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="model.safetensors or last.safetensors from `detect train`."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Folder with val.json (COCO)."),
    ann: Optional[Path] = typer.Option(None, help="Annotations (COCO JSON or WIDER FACE *_bbx_gt.txt)."),
    images: Optional[Path] = typer.Option(None, help="Image folder."),
    data_format: str = typer.Option("coco", "--format", help="coco or widerface."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    device: Device = DEFAULT_DEVICE,
    strict: bool = typer.Option(False, "--strict", help="Fail on invalid ground-truth boxes instead of skipping them."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics and the number of skipped ground-truth entries as JSON."),
) -> None:
    """Evaluate a trained detector with COCO metrics, with any backend and precision.

    Ground-truth entries that cannot be used (a box with NaN or no area, an annotation of an
    unknown image or category) are skipped with a warning each, as in training, and counted in
    the result; with --strict the first one is an error."""
    from visionscale.detection.data import ImageCache
    from visionscale.detection.train import evaluate, load_dataset, load_model
    from visionscale.errors import check_int
    from visionscale.runtime import accelerate, resolve_device

    if data is not None:
        ann, data_format = data / "val.json", "coco"
    if ann is None:
        fail("give --data DIR or --ann FILE")
    check_int("batch_size", batch_size, minimum=1)
    dev = resolve_device(device)
    model, meta = load_model(checkpoint)
    size = int(meta["config"]["image_size"])
    ds = load_dataset(ann, images, data_format, strict=strict)
    _warn_skipped(ds, ann)
    forward = accelerate(model.to(dev), backend, precision, dev, image_size=(size, size))
    note_runner(forward)
    metrics = evaluate(model, ImageCache(ds, size), batch_size, forward=forward)
    if as_json:
        sys.stdout.write(json.dumps({**metrics, "skipped_annotations": len(ds.problems)}) + "\n")
        return
    out.print("  ".join(f"{k} {'–' if v is None else f'{v:.1f}'}" for k, v in metrics.items()), highlight=False)
    if ds.problems:
        note(f"{len(ds.problems)} invalid ground-truth entries in {ann} were skipped (see the warnings above)")

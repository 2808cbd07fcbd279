"""``visionscale classify``: demo data, training, prediction, evaluation, conv arithmetic.

Each command parses arguments, makes one library call (``visionscale.classify.*``) and
prints. Bad input makes the library raise a :class:`~visionscale.errors.VisionscaleError`, which
:class:`~visionscale.cli._common.CLIGroup` prints as one line ``error: ...`` on stderr with exit
status 2, before any output file is written; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from visionscale.cli._common import CLIGroup, err, out
from visionscale.cli._options import Backend, DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_PRECISION, Device, Precision

app = typer.Typer(
    cls=CLIGroup,
    help="Image classifiers on registry backbones: demo data, train (augmentation, transfer learning), predict, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command("make-demo")
def make_demo_cmd(
    out_dir: Path = typer.Argument(..., help="New folder for the data set (train/ and test/ inside)."),
    train_per_class: int = typer.Option(40, help="Training images per class."),
    test_per_class: int = typer.Option(15, help="Test images per class."),
    size: int = typer.Option(96, help="Side of the square images in px."),
    seed: int = typer.Option(0, help="Random seed of the crops."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds other files (those stay)."),
) -> None:
    """Write a small texture data set (brick / grass / gravel from scikit-image, CC0), offline."""
    from visionscale.classify.demo import make_demo

    info = make_demo(out_dir, train_per_class=train_per_class, test_per_class=test_per_class, size=size, seed=seed,
                     overwrite=overwrite)
    n_train, n_test = sum(info["train"].values()), sum(info["test"].values())
    out.print(f"wrote {n_train} training and {n_test} test images ({', '.join(info['train'])}; {size} px) to "
              f"{out_dir}/train and {out_dir}/test", highlight=False, soft_wrap=True)


@app.command("train")
def train_cmd(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder of images per class."),
    out_dir: Path = typer.Option(Path("classify-run"), "--out", "-o", help="Output folder (checkpoints, metrics, plots)."),
    val_dir: Optional[Path] = typer.Option(None, help="Separate validation folder [default: seeded split of DATA_DIR]."),
    backbone: str = typer.Option("resnet18", "--backbone", "-b", help="Registry backbone: resnet18, resnet50, wide_resnet50_2, resnet_tiny..."),
    weights: Optional[str] = typer.Option(None, help="Pretrained backbone: DEFAULT, a weights name or a file [default: none, train from scratch]."),
    image_size: int = typer.Option(224, help="Square input size in px."),
    epochs: int = typer.Option(20, help="Most epochs of the first phase (frozen backbone, or everything from scratch)."),
    finetune_epochs: int = typer.Option(0, help="Most epochs of fine-tuning the unfrozen backbone afterwards (0 = none)."),
    batch_size: int = typer.Option(32, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Learning rate (AdamW)."),
    finetune_lr: float = typer.Option(1e-4, help="Learning rate while fine-tuning."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    patience: int = typer.Option(5, help="Stop a phase after this many epochs without a lower validation loss."),
    val_fraction: float = typer.Option(0.2, help="Share of each class held out for validation (without --val-dir)."),
    seed: int = typer.Option(0, help="Seed of the split, shuffling, augmentation and init."),
    freeze: Optional[bool] = typer.Option(None, "--freeze/--no-freeze", help="Freeze the backbone in the first phase [default: only with --weights]."),
    unfreeze_from: Optional[str] = typer.Option(None, help="Fine-tune from this backbone stage on (e.g. layer3) [default: all]."),
    dropout: float = typer.Option(0.0, help="Dropout before the linear head."),
    rotation: float = typer.Option(0.0, help="Augmentation: max rotation in degrees."),
    zoom: float = typer.Option(0.0, help="Augmentation: scale drawn from [1-zoom, 1+zoom]."),
    shift: float = typer.Option(0.0, help="Augmentation: max shift as a fraction of the size."),
    shear: float = typer.Option(0.0, help="Augmentation: max horizontal shear in degrees."),
    hflip: bool = typer.Option(False, "--hflip/--no-hflip", help="Augmentation: random left-right mirror."),
    vflip: bool = typer.Option(False, "--vflip/--no-vflip", help="Augmentation: random top-bottom mirror."),
    fill: str = typer.Option("border", help="Augmentation: border, reflection or zeros outside the image."),
    precise_bn: bool = typer.Option(True, "--precise-bn/--no-precise-bn", help="Re-estimate BatchNorm statistics on the training images before each validation."),
    device: Device = DEFAULT_DEVICE,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in --out, or write into a folder that holds other files."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Train a classifier: frozen pretrained backbone then optional fine-tuning, or from scratch."""
    from visionscale.classify.data import AugmentConfig
    from visionscale.classify.train import TrainConfig, train

    cfg = TrainConfig(
        backbone=backbone, weights=weights, image_size=image_size, epochs=epochs, finetune_epochs=finetune_epochs,
        batch_size=batch_size, lr=lr, finetune_lr=finetune_lr, weight_decay=weight_decay, patience=patience,
        val_fraction=val_fraction, seed=seed, freeze=freeze, unfreeze_from=unfreeze_from, dropout=dropout,
        augment=AugmentConfig(rotation=rotation, zoom=zoom, shift=shift, shear=shear, hflip=hflip, vflip=vflip,
                              fill=fill),
        precise_bn=precise_bn, device=device,
    )
    with err.status("starting") as status:
        result = train(data_dir, out_dir, cfg, val_dir=val_dir, resume=resume, overwrite=overwrite,
                       progress=lambda msg: status.update(msg),
                       on_epoch=lambda row: err.print(_epoch_line(row), markup=False, highlight=False, soft_wrap=True))
    summary = {"out_dir": str(result.out_dir), "classes": result.classes, "best_epoch": result.best_epoch,
               "best_val_loss": result.best_val_loss, "val_accuracy": result.val_report["accuracy"],
               "epochs_run": len(result.history), "files": [p.name for p in result.files]}
    if as_json:
        _print_json(summary)
        return
    out.print(f"best epoch {result.best_epoch}: validation loss {result.best_val_loss:.4f}, accuracy "
              f"{result.val_report['accuracy']:.3f} ({result.val_report['n']} images)", highlight=False)
    out.print(f"wrote {len(result.files)} files to {result.out_dir}/ (model.safetensors, curves.png, "
              f"confusion_val.png, ...)", highlight=False, soft_wrap=True)


def _epoch_line(row: dict) -> str:
    return (f"epoch {row['epoch']:>3} [{row['phase']}] train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} ({row['seconds']:.1f} s)")


@app.command("predict")
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="Training output folder or its model.safetensors."),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    top_k: int = typer.Option(3, help="Classes listed per image."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    device: Device = DEFAULT_DEVICE,
    csv_out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the predictions to this CSV file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print predictions as JSON."),
) -> None:
    """Predict the class of images with a trained classifier."""
    from visionscale.classify.train import predict
    from visionscale.io.atomic import write_atomic
    from visionscale.io.outputs import check_output_file

    if csv_out is not None:
        check_output_file(csv_out, inputs=[checkpoint, *inputs], overwrite=overwrite, what="predictions file")
    preds = predict(checkpoint, inputs, top_k=top_k, batch_size=batch_size, device=device, backend=backend,
                    precision=precision)
    if csv_out is not None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "probability", "top"])
        for p in preds:
            w.writerow([p["path"], p["label"], f"{p['probability']:.6f}",
                        ";".join(f"{c}:{q:.4f}" for c, q in p["top"])])
        write_atomic(csv_out, buf.getvalue().encode())
    if as_json:
        _print_json(preds)
        return
    from rich.table import Table

    t = Table(title=f"Predictions ({len(preds)} images)")
    t.add_column("image")
    t.add_column("class")
    t.add_column("probability", justify="right")
    t.add_column("runners-up")
    for p in preds:
        rest = ", ".join(f"{c} {q:.2f}" for c, q in p["top"][1:])
        t.add_row(p["path"], p["label"], f"{p['probability']:.3f}", rest)
    out.print(t)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Training output folder or its model.safetensors."),
    data_dir: Path = typer.Argument(..., help="Labelled folder: one sub-folder per class (names as in training)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write metrics.json, predictions.csv, confusion.png here."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    device: Device = DEFAULT_DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out folder that holds other files."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Accuracy, per-class precision/recall and the confusion matrix on a labelled folder."""
    from visionscale.classify.train import check_eval_outputs, evaluate, write_eval_outputs

    if out_dir is not None:
        check_eval_outputs(out_dir, overwrite)  # before the evaluation, not after it
    report = evaluate(checkpoint, data_dir, batch_size=batch_size, device=device, backend=backend,
                      precision=precision)
    written = write_eval_outputs(report, out_dir, overwrite) if out_dir is not None else []
    if as_json:
        _print_json({k: v for k, v in report.items() if k != "predictions"})
        return
    from rich.table import Table

    rt = report.get("runtime", {})
    how = "" if (rt.get("backend"), rt.get("precision")) == ("eager", "fp32") else \
        f", {rt.get('backend')} {rt.get('precision')}" + (f" ({rt['provider']})" if rt.get("provider") else "")
    t = Table(title=f"accuracy {report['accuracy']:.3f} on {report['n']} images (loss {report['loss']:.4f}{how})")
    for col in ("class", "precision", "recall", "F1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")

    def f(v):
        return "–" if v is None else f"{v:.3f}"

    for name, m in report["per_class"].items():
        t.add_row(name, f(m["precision"]), f(m["recall"]), f(m["f1"]), str(m["support"]))
    out.print(t)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for name in report["classes"]:
        cm.add_column(name, justify="right")
    for name, row in zip(report["classes"], report["confusion_matrix"]):
        cm.add_row(name, *[str(v) for v in row])
    out.print(cm)
    if written:
        out.print(f"wrote {', '.join(p.name for p in written)} to {out_dir}/", highlight=False, soft_wrap=True)


@app.command("conv")
def conv_cmd(
    input_size: int = typer.Argument(..., help="Input height/width in px."),
    layers: list[str] = typer.Argument(..., help="Layers in order: KERNEL[sSTRIDE][pPAD|psame|pvalid][dDILATION], e.g. 3p1 2s2 7s2p3."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON."),
) -> None:
    """Convolution arithmetic: output size and receptive field after each layer of a stack."""
    from visionscale.classify.convarith import parse_layer_spec, receptive_fields

    rows = receptive_fields([parse_layer_spec(s) for s in layers], input_size)
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    t = Table(title=f"{input_size} px input")
    for col in ("layer", "window", "in", "out", "receptive field", "jump", "first centre"):
        t.add_column(col, justify="left" if col in ("layer", "window") else "right")
    for r in rows:
        t.add_row(r["name"], r["spec"], str(r["in"]), str(r["out"]), str(r["rf"]), str(r["jump"]), f"{r['start']:g}")
    out.print(t)

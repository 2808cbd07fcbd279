"""``visionscale face`` recognition verbs: verify, enroll, identify, gallery, train, eval-lfw.

``register(app)`` adds them to the ``face`` sub-app (whose detection verbs live in
``cli/face.py``). Each command parses arguments, makes one library call
(``visionscale.face.*``) and prints. Bad input prints one line ``error: ...`` on stderr and
exits with status 2; ``verify`` on an image without a face exits 2 too. The library raises a
:class:`~visionscale.errors.VisionscaleError` for those (a gallery's SQLite errors included), which
:class:`~visionscale.cli._common.CLIGroup` prints; any other exception is a bug. Names and paths are
printed literally (the consoles have no markup; progress descriptions neither). Commands that
only read a gallery open it read-only: they never create or change the file.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from visionscale.cli._common import CLIGroup, err, fail, note, note_runner, out, warn
from visionscale.cli._options import Backend, DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_PRECISION, Device, Precision

DEFAULT_GALLERY = "gallery.db"
LFW_EVAL_KIND = "face-eval-lfw"


@contextmanager
def _warnings_to_stderr():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                warn(str(w.message))


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def literal_progress(**kwargs):
    """A Rich progress bar on stderr whose task descriptions are shown literally (Rich's default
    description column would parse them as markup)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}", markup=False, style="progress.description"), BarColumn(),
                    TaskProgressColumn(), TimeRemainingColumn(), console=err, **kwargs)


def _model_note(model: str) -> None:
    from visionscale.face.api import DEFAULT_MODEL

    p = Path(model)
    if (model != DEFAULT_MODEL and p.suffix.lower() != ".safetensors" and not p.is_dir()
            and os.sep not in model):
        note(f"{model} has random (untrained) weights: distances are not meaningful for "
             f"real faces; use the default model ({DEFAULT_MODEL}) or a checkpoint from "
             f"`visionscale face train`.")


def _recognizer(model: str, detect: bool, device: str, backend: str = "eager", precision: str = "fp32"):
    from visionscale.face.api import FaceRecognizer

    rec = FaceRecognizer(model, detector="auto" if detect else None, device=device, backend=backend,
                         precision=precision)
    note_runner(rec.runtime)
    return rec


def _stored_source(gallery: Path) -> Optional[str]:
    """The model source recorded in an existing gallery (read-only: the file is not changed)."""
    from visionscale.face.gallery import Gallery

    with Gallery(gallery, read_only=True) as g:
        return g.stored_model_source


def _model_for_gallery(model: Optional[str], stored: Optional[str]) -> str:
    """--model, else the source recorded in the gallery, else the default."""
    from visionscale.face.api import DEFAULT_MODEL

    if model:
        return str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    return stored or DEFAULT_MODEL


_MODEL_HELP = ("Face embedder: face_embedder_dlib (dlib's descriptor, real weights), a checkpoint "
               "(.safetensors or `face train` folder) or another registry name (random weights) "
               "[default: the gallery's model, else face_embedder_dlib].")
_DETECT_HELP = "Detect and align the largest face first; --no-detect takes the images as face crops."
_THRESHOLD_HELP = ("Same person when the descriptor distance is below this [default: the model's: 0.6 "
                   "(Euclidean, dlib's) for face_embedder_dlib, 0.5 for the unit-embedding models].")


def verify_cmd(
    a: Path = typer.Argument(..., help="First image."),
    b: Path = typer.Argument(..., help="Second image."),
    model: str = typer.Option("face_embedder_dlib", "--model", "-m", help=_MODEL_HELP),
    threshold: Optional[float] = typer.Option(None, help=_THRESHOLD_HELP),
    detect: bool = typer.Option(True, "--detect/--no-detect", help=_DETECT_HELP),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Are the faces in A and B the same person? Exits 2 when an image has no face."""
    _model_note(model)
    with _warnings_to_stderr():
        res = _recognizer(model, detect, device, backend, precision).verify(a, b, threshold)
    if as_json:
        _print_json({"a": str(a), "b": str(b), **res.to_dict()})
    else:
        verdict = "same person" if res.same else "different people"
        out.print(f"{verdict}: distance {res.distance:.4f} (threshold {res.threshold:g})", highlight=False)

def enroll_cmd(
    name: str = typer.Argument(..., help="The person's name."),
    images: list[Path] = typer.Argument(..., help="One or more images of this person (several help)."),
    gallery: Path = typer.Option(Path(DEFAULT_GALLERY), "--gallery", "-g", help="Gallery database file (created if missing)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    detect: bool = typer.Option(True, "--detect/--no-detect", help=_DETECT_HELP),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
) -> None:
    """Add a person (or more images of one) to the gallery."""
    from visionscale.face.gallery import Gallery

    # Only enroll creates a gallery: a missing or empty file is a new one.
    fresh = not gallery.exists() or (gallery.is_file() and gallery.stat().st_size == 0)
    src = _model_for_gallery(model, None if fresh else _stored_source(gallery))
    _model_note(src)
    with _warnings_to_stderr():
        rec = _recognizer(src, detect, device, backend, precision)
        emb = rec.embed([str(p) for p in images])
    with Gallery(gallery, embedder=rec, model_source=src) as g:
        n = g.enroll(name, embeddings=emb, sources=[str(p) for p in images])
        total = next(p.n_embeddings for p in g.list() if p.name == name)
    out.print(f"enrolled {n} image(s) of {name} in {gallery} ({total} in total)", highlight=False)

def identify_cmd(
    images: list[Path] = typer.Argument(..., help="Images to identify (every face in each)."),
    gallery: Path = typer.Option(Path(DEFAULT_GALLERY), "--gallery", "-g", help="Gallery database file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    k: int = typer.Option(3, "--top-k", "-k", help="Candidates to list per face."),
    threshold: Optional[float] = typer.Option(None, help="Known when the nearest person's distance is below this "
                                              "[default: the model's: 0.6 for face_embedder_dlib]."),
    largest: bool = typer.Option(False, "--largest", help="Only the largest face of each image."),
    detect: bool = typer.Option(True, "--detect/--no-detect", help="Detect every face first; --no-detect takes "
                                "each image as one face crop."),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    index: str = typer.Option("auto", "--index", help="Search: exact, ivf or hnsw (approximate, faiss; kept "
                              "beside the gallery as <gallery>.ann.faiss), or auto: exact below 50,000 "
                              "embeddings, ivf above."),
) -> None:
    """Who is in these photos? For every face: the nearest enrolled people, or "unknown"."""
    from visionscale.face.gallery import Gallery

    if not gallery.exists():
        fail(f"gallery not found: {gallery} (enroll people first with `visionscale face enroll`)")
    src = _model_for_gallery(model, _stored_source(gallery))
    with _warnings_to_stderr():
        rec = _recognizer(src, detect, device, backend, precision)
        with Gallery(gallery, embedder=rec, read_only=True, index=index) as g:
            results = rec.identify(g, [str(p) for p in images], k=k, threshold=threshold, largest_only=largest)
    if as_json:
        _print_json([{"image": str(p), "faces": [r.to_dict() for r in faces]} for p, faces in zip(images, results)])
        return
    for p, faces in zip(images, results):
        if not faces:
            out.print(f"{p}: no face found", highlight=False, soft_wrap=True)
        for i, r in enumerate(faces):
            where = "" if not detect else f" face {i + 1} at ({', '.join(f'{v:.0f}' for v in r.face.box)})"
            if not r.face.usable:
                out.print(f"{p}{where}: too small ({r.face.reason})", highlight=False, soft_wrap=True)
                continue
            cands = ", ".join(f"{m.name} {m.distance:.3f}" for m in r.matches) or "gallery is empty"
            out.print(f"{p}{where}: {r.label}  ({cands})", highlight=False, soft_wrap=True)

def _open_gallery(gallery: Path, read_only: bool):
    from visionscale.face.gallery import Gallery

    if not gallery.exists():
        fail(f"gallery not found: {gallery}")
    return Gallery(gallery, read_only=read_only, create=False)

def gallery_list(
    gallery: Path = typer.Option(Path(DEFAULT_GALLERY), "--gallery", "-g", help="Gallery database file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Enrolled people and how many embeddings each has."""
    with _open_gallery(gallery, read_only=True) as g:
        people, model = g.list(), g.stored_model
    if as_json:
        _print_json({"model": model, "people": [{"name": p.name, "embeddings": p.n_embeddings} for p in people]})
        return
    err.print(f"{len(people)} people in {gallery} (model {model or 'none yet'})", highlight=False)
    # Tab-separated lines, written as they are (a Rich console would expand the tabs).
    sys.stdout.write("".join(f"{p.name}\t{p.n_embeddings}\n" for p in people))

def gallery_rename(
    old: str = typer.Argument(..., help="Current name."),
    new: str = typer.Argument(..., help="New name."),
    gallery: Path = typer.Option(Path(DEFAULT_GALLERY), "--gallery", "-g", help="Gallery database file."),
) -> None:
    """Rename a person."""
    with _open_gallery(gallery, read_only=False) as g:
        g.rename(old, new)
    out.print(f"renamed {old} to {new}", highlight=False)

def gallery_remove(
    name: str = typer.Argument(..., help="Person to remove (with all their embeddings)."),
    gallery: Path = typer.Option(Path(DEFAULT_GALLERY), "--gallery", "-g", help="Gallery database file."),
) -> None:
    """Remove a person."""
    with _open_gallery(gallery, read_only=False) as g:
        n = g.remove(name)
    out.print(f"removed {name} ({n} embedding(s))", highlight=False)

def train_cmd(
    data: Path = typer.Argument(..., help="Identity folders <name>/<images> (e.g. an LFW folder), or the LFW image root with --pairs."),
    out_dir: Path = typer.Option(Path("face-run"), "--out", "-o", help="Output folder (checkpoints, history, curves)."),
    pairs: Optional[Path] = typer.Option(None, help="Train on the pairs of an LFW pairsDevTrain.txt-style file."),
    val_pairs: Optional[Path] = typer.Option(None, help="Validation pairs file (e.g. pairsDevTest.txt)."),
    model: str = typer.Option("face_embedder_resnet18", "--model", "-m", help="Registry embedder: face_embedder_resnet18, face_embedder_resnet50, face_embedder_tiny, face_embedder_timm."),
    backbone_weights: Optional[str] = typer.Option(None, help="Pretrained backbone: DEFAULT (ImageNet) or a file [default: random init]."),
    freeze: Optional[str] = typer.Option(None, help="none, all_but_last (seed 003) or backbone [default: all_but_last with --backbone-weights, else none]."),
    image_size: Optional[int] = typer.Option(None, help="Input size in px [default: the model's, 112]."),
    embedding_dim: Optional[int] = typer.Option(None, help="Embedding size [default: the model's, 512]."),
    loss: str = typer.Option("contrastive", help="contrastive or triplet."),
    form: str = typer.Option("hadsell", help="Contrastive form: hadsell (paper, 1/2 factors) or seed (seed 003, 2x)."),
    margin: float = typer.Option(1.0, help="Contrastive margin (seed 003: 1.0) or triplet margin."),
    epochs: int = typer.Option(20, help="Most epochs."),
    batch_size: int = typer.Option(32, help="Pairs per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    patience: int = typer.Option(8, help="Early stop after this many epochs without a lower validation loss."),
    pairs_per_epoch: int = typer.Option(2000, help="Pairs drawn per epoch from identity folders."),
    seed: int = typer.Option(0, help="Seed of split, sampling, augmentation and init."),
    device: Device = DEFAULT_DEVICE,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in --out."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write curves.png."),
) -> None:
    """Train a Siamese face embedder with contrastive loss (seed 003's recipe)."""
    from visionscale.face.train import TrainConfig, train

    cfg = TrainConfig(model=model, backbone_weights=backbone_weights, freeze=freeze, image_size=image_size,
                      embedding_dim=embedding_dim, loss=loss, contrastive_form=form, margin=margin, epochs=epochs,
                      batch_size=batch_size, lr=lr, patience=patience, pairs_per_epoch=pairs_per_epoch,
                      seed=seed, device=device)
    res = train(data, out_dir, cfg, pairs_file=pairs, val_pairs_file=val_pairs, resume=resume,
                overwrite=overwrite, plots=plots, progress=lambda m: err.print(m, highlight=False))
    out.print(f"best epoch {res.best_epoch} (val loss {res.best_val_loss:.4f}); model: {out_dir / 'model.safetensors'}",
              highlight=False)

def eval_lfw_cmd(
    root: Path = typer.Option(..., "--root", help="LFW image folder (lfw/, lfw-deepfunneled/ or their parent)."),
    pairs: Path = typer.Option(..., "--pairs", help="pairs.txt (10 folds) or pairsDevTest.txt."),
    model: str = typer.Option("face_embedder_dlib", "--model", "-m", help=_MODEL_HELP),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.json, pairs.csv and roc.png here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write --out even if it holds files of your own (same names are replaced)."),
    threshold: list[float] = typer.Option([], "--threshold", "-t", help="Fixed thresholds for the seed's table (repeatable) [default: 0.5, 0.6 and the model's]."),
    far: float = typer.Option(1e-3, help="FAR for TAR @ FAR."),
    batch_size: int = typer.Option(64, help="Images per embedding batch."),
    detect: Optional[bool] = typer.Option(None, "--detect/--no-detect", help="Detect and align the face nearest the centre first (an image without a usable face is embedded whole, and counted) [default: yes for face_embedder_dlib, which needs dlib's alignment; no for the other models, as seed 003 used LFW's centred faces]."),
    device: Device = DEFAULT_DEVICE,
    backend: Backend = DEFAULT_BACKEND,
    precision: Precision = DEFAULT_PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
) -> None:
    """LFW verification: 10-fold accuracy, ROC AUC, EER, TAR@FAR and the seed's fixed-threshold table."""
    from visionscale.face.api import DEFAULT_MODEL
    from visionscale.face.lfw import evaluate_lfw, write_lfw_outputs
    from visionscale.io.outputs import OutputDir

    _model_note(model)
    if out_dir is not None:  # refused now, not after embedding every image
        OutputDir(out_dir, kind=LFW_EVAL_KIND, overwrite=overwrite)
    if detect is None:
        detect = model == DEFAULT_MODEL
    rec = _recognizer(model, detect, device, backend, precision)
    if not threshold:
        threshold = sorted({0.5, 0.6, rec.threshold})
    with _warnings_to_stderr(), literal_progress(transient=True) as bar:
        task = bar.add_task("embedding", total=None)
        res = evaluate_lfw(root, pairs, lambda imgs: rec.embed(imgs, pick="centre", if_none="whole"),
                           batch_size=batch_size, thresholds=threshold, far=far,
                           progress=lambda i, n: bar.update(task, completed=i, total=n))
    res.report["model"] = rec.model_id
    if detect:
        res.report["images_without_usable_face"] = rec.fallbacks
    if out_dir is not None:
        write_lfw_outputs(res, out_dir, overwrite=overwrite, kind=LFW_EVAL_KIND)
    rep = res.report
    if as_json:
        _print_json(rep)
        return
    out.print(f"{rep['n_pairs']} pairs ({rep['n_same']} same), {rep['n_images_embedded']} images, model {rep['model']}",
              highlight=False)
    if "kfold" in rep:
        kf = rep["kfold"]
        out.print(f"{len(kf['accuracies'])}-fold accuracy: {kf['mean']:.4f} ± {kf['std']:.4f} (sem {kf['sem']:.4f})",
                  highlight=False)
    out.print(f"ROC AUC {rep['roc_auc']:.4f}   EER {rep['eer']:.4f}   TAR@FAR={far:g}: {rep['tar_at_far']:.4f}",
              highlight=False)
    for m in rep["fixed_thresholds"]:
        out.print(f"threshold {m['threshold']:g}: accuracy {m['accuracy']:.4f} precision {m['precision']:.4f} "
                  f"recall {m['recall']:.4f} F1 {m['f1']:.4f} ROC AUC (hard labels) {m['roc_auc_hard']:.4f}",
                  highlight=False)
    if out_dir is not None:
        err.print(f"wrote {out_dir}/report.json, pairs.csv, roc.png", highlight=False)

def make_lfw_demo_cmd(
    out_dir: Path = typer.Argument(..., help="New folder for an LFW-shaped synthetic data set."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds files of your own (same names are replaced)."),
    people: int = typer.Option(24, help="Synthetic identities."),
    images_per_person: int = typer.Option(4, help="Images per identity."),
    size: int = typer.Option(64, help="Image side in px."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write synthetic identities in LFW's layout with pairs/people files (offline; not real faces)."""
    from visionscale.face.lfw import make_synthetic_lfw

    info = make_synthetic_lfw(out_dir, n_people=people, images_per_person=images_per_person, size=size, seed=seed,
                              overwrite=overwrite)
    out.print(f"wrote {info['n_images']} images of {people} identities to {info['root']}, and pairs.txt, "
              f"pairsDevTrain.txt, pairsDevTest.txt, people*.txt in {out_dir}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the recognition commands (and the ``gallery`` group) to the ``face`` typer app."""
    app.command("verify")(verify_cmd)
    app.command("enroll")(enroll_cmd)
    app.command("identify")(identify_cmd)
    gal = typer.Typer(cls=CLIGroup, help="List, rename and remove enrolled people.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
    gal.command("list")(gallery_list)
    gal.command("rename")(gallery_rename)
    gal.command("remove")(gallery_remove)
    app.add_typer(gal, name="gallery")
    app.command("train")(train_cmd)
    app.command("eval-lfw")(eval_lfw_cmd)
    app.command("make-lfw-demo")(make_lfw_demo_cmd)

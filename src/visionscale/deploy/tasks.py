"""Task-level metrics for ``BenchConfig.data`` (``visionscale bench --data``): what a backend or precision change does
to the number a user actually reports, not only to the raw outputs.

One metric per model family, computed with the very Runner that was timed:

========================  ===================================  ==================================
model                     ``--data``                           metric
========================  ===================================  ==================================
anomaly run folder        its data set (MVTec category or      image AUROC of ``pred_score``
                          folder layout)
classifier checkpoint     labelled folder (a sub-folder per    top-1 accuracy
                          class)
detector checkpoint       folder with ``val.json`` (COCO), or  COCO AP (AP@[.5:.95], in %)
                          a COCO / WIDER FACE annotation file
face embedder             LFW folder: ``pairs.txt`` (10-fold)  verification accuracy (10-fold
(checkpoint or registry)  or ``pairsDevTest.txt`` beside the   mean, else best threshold over all
                          images                               pairs)
========================  ===================================  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from visionscale.runtime.errors import RunnerError


@dataclass
class TaskMetric:
    """``evaluate(runner)`` -> the metric (``None`` where the data cannot give one)."""

    kind: str  # anomaly_auroc | classification_accuracy | detection_ap | verification_accuracy
    label: str  # how reports name it
    data: str
    evaluate: Callable[[Any], float | None]
    higher_is_better: bool = True


def _unwrap(net: nn.Module) -> nn.Module:
    """The model inside a thin input wrapper (an anomaly run's model)."""
    inner = getattr(net, "model", None)
    return inner if isinstance(inner, nn.Module) else net


def task_metric(net: nn.Module, data: str | Path, image_size: tuple[int, int], anomaly_run: bool = False,
                batch_size: int = 8) -> TaskMetric:
    """The metric of ``net``'s family on ``data``; see the module docstring.

    Raises:
        RunnerError: The family has no task metric, or ``data`` does not fit it (what is missing).
    """
    from visionscale.classify.model import Classifier
    from visionscale.detection.model import SingleStageDetector
    from visionscale.face.embedder import FaceEmbedder

    data = Path(data).expanduser()
    if not data.exists():
        raise RunnerError(f"data {data} does not exist").about("data")
    if anomaly_run:
        return _anomaly(data, image_size, batch_size)
    if isinstance(net, Classifier):
        return _classifier(net, data, batch_size)
    if isinstance(net, SingleStageDetector):
        return _detector(net, data, image_size, batch_size)
    if isinstance(_unwrap(net), FaceEmbedder):
        return _embedder(_unwrap(net), data, batch_size)
    raise RunnerError(f"data gives a task metric for anomaly run folders, classifier, detector and face-embedder "
                      f"checkpoints; {type(net).__name__} is none of them").about("data")


# -- anomaly detection ---------------------------------------------------------------------
def _anomaly(data: Path, size: tuple[int, int], batch_size: int) -> TaskMetric:
    from visionscale.anomaly.data import iter_batches, load_dataset

    ds = load_dataset(data, require_train=False)
    if not ds.test:
        raise RunnerError(f"no test images in {data}")
    batches = list(iter_batches(ds.test, size, batch_size))
    labels = [s.label for b in batches for s in b.samples]
    return TaskMetric("anomaly_auroc", "image AUROC", str(data), lambda runner: anomaly_auroc(runner, batches, labels))


def anomaly_auroc(runner, batches, labels) -> float | None:
    """Image AUROC of ``runner``'s ``pred_score`` over normalised test ``batches`` (None with one class).
    A graph exported with batch 1 (PatchCore's, DDAD's) takes the batches too: the ONNX Runtime
    backend runs it image by image."""
    from visionscale.anomaly.metrics import auroc

    if len(set(labels)) < 2:
        return None
    scores = []
    for b in batches:
        scores.extend(runner(b.images)["pred_score"].float().cpu().tolist())
    return float(auroc(labels, scores))


# -- classification --------------------------------------------------------------------------
def _classifier(net, data: Path, batch_size: int) -> TaskMetric:
    from visionscale.classify.data import scan_image_folder

    try:
        scan_image_folder(data, classes=list(net.config.classes), min_classes=1)
    except ValueError as exc:
        raise RunnerError(f"data {data}: {exc}").about("data") from None

    def evaluate(runner) -> float:
        from visionscale.classify.train import evaluate_model

        return float(evaluate_model(net, data, batch_size, runner.device, forward=runner)["accuracy"])

    return TaskMetric("classification_accuracy", "top-1 accuracy", str(data), evaluate)


# -- detection -----------------------------------------------------------------------------
def _detector(net, data: Path, size: tuple[int, int], batch_size: int) -> TaskMetric:
    from visionscale.detection.data import AnnotationError, ImageCache
    from visionscale.detection.train import load_dataset

    if size[0] != size[1]:
        raise RunnerError(f"detection AP is measured on square inputs; got image_size {size[0]} "
                          f"{size[1]}").about("image_size")
    if data.is_dir():
        ann, fmt = data / "val.json", "coco"
        if not ann.is_file():
            raise RunnerError(f"data {data}: no val.json (COCO) in it; give the folder of `visionscale detect "
                              "make-demo` or an annotation file").about("data")
    else:
        ann, fmt = data, "widerface" if data.suffix.lower() == ".txt" else "coco"
    try:
        cache = ImageCache(load_dataset(ann, None, fmt), size[0])
    except AnnotationError as exc:
        raise RunnerError(str(exc)) from None

    def evaluate(runner) -> float | None:
        from visionscale.detection.train import evaluate as coco_eval

        return coco_eval(net, cache, batch_size, forward=runner)["AP"]

    return TaskMetric("detection_ap", "COCO AP", str(ann), evaluate)


# -- face verification ---------------------------------------------------------------------
def _embedder(net, data: Path, batch_size: int) -> TaskMetric:
    if data.is_dir():
        pairs = next((data / n for n in ("pairs.txt", "pairsDevTest.txt") if (data / n).is_file()), None)
        if pairs is None:
            raise RunnerError(f"data {data}: no pairs.txt or pairsDevTest.txt in it (an LFW folder, or "
                              "`visionscale face make-lfw-demo`)").about("data")
        root = data
    else:
        pairs, root = data, data.parent
    from visionscale.face.lfw import LFWError, missing_images, parse_pairs, resolve_image_root

    try:  # the checks evaluate_lfw makes, up front: fail before the timing, not after it
        pf = parse_pairs(pairs)
        base = resolve_image_root(root, list(dict.fromkeys(n for pr in pf.pairs for n in (pr.name1, pr.name2))))
        missing = missing_images(base, pf.pairs)
    except LFWError as exc:
        raise RunnerError(str(exc)) from None
    if missing:
        raise RunnerError(f"{len(missing)} image(s) named in {pairs} are missing under {base}, e.g. {missing[0]}")

    def evaluate(runner) -> float:
        from visionscale.face.lfw import evaluate_lfw

        res = evaluate_lfw(root, pairs, lambda imgs: net.embed(imgs, batch_size, runner.device, forward=runner),
                           batch_size=batch_size)
        rep = res.report
        return float(rep["kfold"]["mean"] if "kfold" in rep else rep["best_accuracy_all_pairs"])

    return TaskMetric("verification_accuracy", "verification accuracy", str(pairs), evaluate)

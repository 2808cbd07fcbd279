"""Fit PatchCore from a folder of images, in bounded memory, into a self-describing run folder.

Stages (each is skipped when a rerun finds it finished):

1. ``features``: training images are read in batches, passed through the backbone and
   aggregated to patch features (B, D, h, w); each batch's rows go straight to two
   files in ``RUN/cache/``: the full D-dim features and their 128-dim JL projection.
   Only one batch is in memory at a time; after each batch the files are flushed and
   ``cache/progress.json`` records how far it got, so an interrupted fit resumes at the
   next batch (the batch size may change between attempts).
2. ``coreset``: the projected features (rows x 128 float32) are loaded, greedy k-center
   picks ``round(ratio * rows)`` of them, and just those rows are read back from the full
   features file into the memory bank. ``model.safetensors`` is written; the cache goes.
3. ``calibration``: images are scored to set the thresholds and score normalisation
   (``calibration.json``) and, on a labelled test set, the metrics (``metrics.json``).

Thresholds. With a test set holding both normal and anomalous images, the image threshold
is the F1-optimal one on it (and the pixel threshold the F1-optimal one on its masks, if
every anomalous image has one; else ``(1 + margin)`` x the highest map value of the normal
test images). Without labels, a seeded ``holdout_fraction`` (10%, at least two images) of
the training images is kept out of the memory bank and scored; the threshold is
``(1 + margin)`` x their highest score (margin 0.1; PatchCore scores are distances, >= 0,
and a relative margin does not shrink when few images are held out), and the pixel
threshold the same rule on their maps. With fewer than 10 training images nothing is held
out and the training images themselves are scored (their scores are biased low; the
notes say so). Normalised scores map the lowest normal calibration score to 0 and the
threshold to 0.5 (see :mod:`visionscale.anomaly.predict`).

Memory (see docs/anomaly.md for measurements). With ``rows = images * ceil(H/8) * ceil(W/8)``
patch rows, D the feature width (1024 for WRN) and d = 128, the peak of the process is about
``model + one batch's activations + rows * (d + 3) * 4 bytes (coreset) + k * D * 4 (bank)``;
the full features (``rows * D * 4`` bytes) live on disk, never in memory.

Run folder::

    config.json          model, sizes, ratio, seed, data (root, category, counts)
    versions.json        python, torch, numpy, visionscale, platform, device
    model.safetensors    backbone up to layer3 + memory bank (``nn_search.memory_bank``)
    calibration.json     image/pixel thresholds and normalisation range, and their source
    metrics.json         test-set metrics (labelled test set only)
    state.json           finished stages, seconds, peak memory, skipped files, notes
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from visionscale.anomaly.coreset import (
    DEFAULT_PROJECTION_DIM,
    DEFAULT_STARTING_POINTS,
    coreset_size,
    greedy_kcenter,
    project,
    random_projection,
)
from visionscale.anomaly.data import ADDataset, DataError, ReadLog, Sample, iter_batches, load_dataset, pair
from visionscale.anomaly.metrics import evaluate_scores, f1_optimal_threshold
from visionscale.anomaly.predict import Scored, resolve_device, score_batches
from visionscale.io.weights import WeightsUnavailableError, save_file_atomic
from visionscale.io.atomic import write_atomic

__all__ = [
    "PATCHCORE_MODELS",
    "PLANNED_MODELS",
    "FitConfig",
    "FitError",
    "FitResult",
    "build_model",
    "fit_patchcore",
    "peak_rss_bytes",
    "fit_memory_estimate",
]

PATCHCORE_MODELS = ("patchcore", "patchcore_wrn50", "patchcore_tiny")
PLANNED_MODELS = ("efficientad_s", "efficientad_m", "ddad")  # issue 3 follow-up
RANDOM_WEIGHTS_WARNING = (
    "running on RANDOM backbone weights: pass --weights FILE (an ImageNet state dict of the backbone, "
    ".pth or .safetensors) or --weights DEFAULT (downloads torchvision's) for meaningful anomaly scores"
)

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class FitError(RuntimeError):
    """Fitting cannot go on; the message says what to change."""


@dataclass(frozen=True)
class FitConfig:
    """What to fit. Everything but ``batch_size``, ``device`` and ``skip_bad`` must match to resume.

    Attributes:
        model: ``patchcore`` (WRN-101-2), ``patchcore_wrn50`` or ``patchcore_tiny``.
        image_size: (H, W) every image is resized to.
        coreset_ratio: Share of patch features kept in the memory bank (0.1, 0.01...).
        batch_size: Images per forward pass.
        weights: Backbone weights: None (random), ``"DEFAULT"`` or a file path.
        seed: Seeds random weights, the JL projection, the coreset start and hold-outs.
        projection_dim: JL dimension of the coreset search (official: 128).
        num_starting_points: Random start points of the approximate greedy (official: 10).
        threshold_margin: Relative margin of the no-labels threshold: (1 + margin) x max.
        holdout_fraction: Training images held out for the unlabelled threshold.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        skip_bad: Leave unreadable images out (and list them) instead of stopping.
    """

    model: str = "patchcore"
    image_size: tuple[int, int] = (256, 256)
    coreset_ratio: float = 0.1
    batch_size: int = 8
    weights: str | None = None
    seed: int = 0
    projection_dim: int = DEFAULT_PROJECTION_DIM
    num_starting_points: int = DEFAULT_STARTING_POINTS
    threshold_margin: float = 0.1
    holdout_fraction: float = 0.1
    device: str = "auto"
    skip_bad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", pair(self.image_size))
        if self.model in PLANNED_MODELS or self.model.startswith(("efficientad", "ddad")):
            raise FitError(f"--model {self.model} is not implemented yet (issue 3 follow-up); "
                           f"available now: {', '.join(PATCHCORE_MODELS)}")
        if self.model not in PATCHCORE_MODELS:
            raise FitError(f"unknown model {self.model!r}; choose one of {', '.join(PATCHCORE_MODELS)}")
        if not 0 < self.coreset_ratio <= 1:
            raise FitError(f"coreset ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.batch_size < 1:
            raise FitError(f"batch size must be >= 1, got {self.batch_size}")
        if min(self.image_size) < 32:
            raise FitError(f"image size must be at least 32 px per side, got {self.image_size[1]}x{self.image_size[0]}")
        if self.projection_dim < 1 or self.num_starting_points < 0:
            raise FitError("projection_dim must be >= 1 and num_starting_points >= 0")
        if not 0 <= self.holdout_fraction < 1 or self.threshold_margin < 0:
            raise FitError("holdout_fraction must be in [0, 1) and threshold_margin >= 0")

    def identity(self) -> dict:
        """Fields that decide the result (a resumed fit must match them)."""
        d = asdict(self)
        for k in ("batch_size", "device", "skip_bad"):
            d.pop(k)
        d["image_size"] = list(self.image_size)
        return d


@dataclass
class FitResult:
    run: Path
    calibration: dict
    metrics: dict | None
    state: dict
    notes: list[str] = field(default_factory=list)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``getrusage``; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def fit_memory_estimate(num_images: int, image_size: tuple[int, int], embed_dim: int, coreset_ratio: float,
                        projection_dim: int = DEFAULT_PROJECTION_DIM) -> dict:
    """Bytes the fit holds that grow with the data (model and one batch come on top)."""
    h, w = pair(image_size)
    rows = num_images * -(-h // 8) * -(-w // 8)
    d = min(projection_dim, embed_dim)
    k = coreset_size(rows, coreset_ratio) if rows else 0
    return {
        "patch_rows": rows,
        "coreset_ram_bytes": rows * (d + 3) * 4,  # projected rows + three (rows,) vectors
        "bank_bytes": k * embed_dim * 4,
        "features_on_disk_bytes": rows * (embed_dim + (d if embed_dim > projection_dim else 0)) * 4,
    }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def build_model(name: str, image_size: tuple[int, int], coreset_ratio: float, weights: str | None, seed: int = 0):
    """PatchCore from the registry with a placeholder bank (replaced by the fitted one).

    Random weights are drawn from ``seed`` so a resumed fit sees the same backbone.
    """
    from visionscale import registry

    try:
        import faiss  # noqa: F401  (exact IndexFlatL2 search when installed)

        use_faiss = True
    except ImportError:
        use_faiss = False
    torch.manual_seed(seed)
    try:
        # num_train_images=1: the placeholder bank is one image's coreset, not the data's.
        return registry.create(name, image_size=image_size, coreset_ratio=coreset_ratio, num_train_images=1,
                               backbone_weights=weights, use_faiss=use_faiss)
    except WeightsUnavailableError as exc:
        raise FitError(str(exc)) from None
    except FileNotFoundError as exc:
        raise FitError(f"--weights: {exc}") from None
    except (ValueError, RuntimeError) as exc:  # unreadable file, keys that do not fit the backbone
        raise FitError(f"--weights {weights}: {exc}") from None


def _versions(device: torch.device) -> dict:
    import visionscale

    info = {
        "visionscale": visionscale.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _data_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        try:
            size = s.path.stat().st_size
        except OSError:
            size = -1
        h.update(f"{s.path.name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _param_checksum(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def _oom_error(stage: str, cfg: FitConfig, device: torch.device, extra: str = "") -> FitError:
    h, w = cfg.image_size
    knobs = {
        "features": (f"lower --batch-size (now {cfg.batch_size}; finished batches are kept, so rerunning the same "
                     f"command with a smaller batch size resumes) or --image-size (now {w}x{h})"),
        "coreset": (f"lower --coreset-ratio (now {cfg.coreset_ratio}), --image-size (now {w}x{h}) or the number "
                    f"of training images: the coreset search holds every patch's {cfg.projection_dim}-d projection"),
        "calibration": f"lower --batch-size (now {cfg.batch_size}) or --image-size (now {w}x{h})",
    }[stage]
    return FitError(f"out of memory during {stage} on {device}: {knobs}{extra}")


def fit_patchcore(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FitConfig | None = None,
    *,
    category: str | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    keep_cache: bool = False,
) -> FitResult:
    """Fit PatchCore on the normal training images under ``data`` and write a run folder to ``out``.

    Args:
        data: MVTec AD root/category or plain folder layout (see :mod:`visionscale.anomaly.data`).
        out: Run folder; created, or resumed if it holds an unfinished fit of the same config.
        config: What to fit.
        category: MVTec category when ``data`` holds several.
        progress: ``progress(stage, done, total)``.
        log: Receives one-line messages for the user (random weights, notes, skipped files).
        keep_cache: Keep ``RUN/cache/`` (the streamed features) after the bank is built.

    Raises:
        FitError: Bad configuration, weights that cannot be loaded, out of memory (naming
            the knobs), a run folder that holds a different fit.
        DataError: Missing/empty training folder, unreadable image (without ``skip_bad``),
            mask/image size mismatch.
    """
    cfg = config or FitConfig()
    say = log or (lambda msg: None)
    tick = progress or (lambda stage, done, total: None)
    run = Path(out).expanduser()
    ds = load_dataset(data, category, seed=cfg.seed)
    notes = list(ds.notes)
    for n in notes:
        say(n)

    # Which images build the bank, and which set the threshold.
    labelled = ds.test_has_labels
    bank_samples, holdout = list(ds.train), []
    if not labelled and len(ds.train) >= 10 and cfg.holdout_fraction > 0:
        n_hold = max(2, round(cfg.holdout_fraction * len(ds.train)))
        picked = set(random.Random(cfg.seed).sample(range(len(ds.train)), n_hold))
        holdout = [s for i, s in enumerate(ds.train) if i in picked]
        bank_samples = [s for i, s in enumerate(ds.train) if i not in picked]
        notes.append(f"the test set has no labels: {n_hold} of {len(ds.train)} training images are held out of "
                     f"the memory bank to set the threshold")
        say(notes[-1])

    device = resolve_device(cfg.device)
    record = {
        "fit": cfg.identity(),
        "data": {
            "root": str(ds.root), "category": ds.category, "layout": ds.layout,
            "train_images": len(bank_samples), "holdout_images": len(holdout), "test_images": len(ds.test),
            "test_anomalous": sum(s.label == 1 for s in ds.test), "fingerprint": _data_fingerprint(ds.train),
        },
    }
    state = _open_run(run, record, say)
    if state.get("complete"):
        say(f"{run} already holds this fit, complete; nothing to do")
        return FitResult(run, json.loads((run / "calibration.json").read_text()),
                         json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else None,
                         state, state.get("notes", []))
    if cfg.weights is None:
        say(RANDOM_WEIGHTS_WARNING)
    # Built before config.json is written: weights that fail to load leave no run behind
    # that a corrected command would then refuse as "a different fit".
    model = build_model(cfg.model, cfg.image_size, cfg.coreset_ratio, cfg.weights, cfg.seed).eval()
    model.to(device)
    _write_json(run / "config.json", {**record["fit"], "batch_size": cfg.batch_size, "data": record["data"]})
    _write_json(run / "versions.json", _versions(device))
    state.setdefault("stages", {})
    state["weights"] = cfg.weights or "random"
    state["rss_after_model_bytes"] = peak_rss_bytes()
    est = fit_memory_estimate(len(bank_samples), cfg.image_size, model.embed_dim, cfg.coreset_ratio,
                              cfg.projection_dim)
    state["memory_estimate"] = est

    def save_state() -> None:
        state["peak_rss_bytes"] = peak_rss_bytes()
        state["notes"] = notes
        _write_json(run / "state.json", state)

    # 1-2. Features and coreset -> model.safetensors.
    if not state["stages"].get("coreset", {}).get("done"):
        try:
            rows, emb_path, proj_path, read_log = _extract_features(model, bank_samples, cfg, device, run, state,
                                                                    tick, say)
        except BaseException as exc:
            if _is_oom(exc):
                raise _oom_error("features", cfg, device) from None
            raise
        for n in (read_log.size_note(cfg.image_size), read_log.bad_note()):
            if n:
                notes.append(n)
                say(n)
        state["bad_images"] = [[str(p), why] for p, why in read_log.bad]
        save_state()
        t0 = time.perf_counter()
        try:
            bank, k, frac = _select_bank(rows, emb_path, proj_path, model.embed_dim, cfg, device, tick)
        except BaseException as exc:
            if _is_oom(exc):
                raise _oom_error("coreset", cfg, device, f" ({rows} patch rows)") from None
            raise
        model.set_memory_bank(bank)
        save_file_atomic({k: v.cpu() for k, v in model.state_dict().items()}, run / "model.safetensors",
                         metadata={"model": cfg.model, "format": "visionscale.patchcore"})
        state["stages"]["coreset"] = {"done": True, "seconds": time.perf_counter() - t0, "patch_rows": rows,
                                      "bank_rows": int(bank.shape[0]), "k": k, "candidate_fraction": frac}
        state["rss_after_coreset_bytes"] = peak_rss_bytes()
        save_state()
        if not keep_cache:
            shutil.rmtree(run / "cache", ignore_errors=True)
        del bank
    else:
        from visionscale.io.weights import load_state_dict

        saved = load_state_dict(run / "model.safetensors")
        model.set_memory_bank(saved["nn_search.memory_bank"])
        model.load_state_dict(saved)
        model.to(device)
        say("features and memory bank already done: resuming at calibration")

    # 3. Calibration (thresholds, normalisation) and metrics.
    t0 = time.perf_counter()
    try:
        calibration, metrics, cal_notes = _calibrate(model, ds, holdout or bank_samples, labelled, bool(holdout),
                                                     cfg, device, tick)
    except BaseException as exc:
        if _is_oom(exc):
            raise _oom_error("calibration", cfg, device) from None
        raise
    for n in cal_notes:
        notes.append(n)
        say(n)
    _write_json(run / "calibration.json", calibration)
    if metrics is not None:
        _write_json(run / "metrics.json", metrics)
    state["stages"]["calibration"] = {"done": True, "seconds": time.perf_counter() - t0}
    state["complete"] = True
    save_state()
    return FitResult(run, calibration, metrics, state, notes)


def _open_run(run: Path, record: dict, say: Log) -> dict:
    """Create the run folder, or check that it holds the same fit and return its state."""
    if run.exists() and not run.is_dir():
        raise FitError(f"--out {run} exists and is not a folder")
    cfg_path = run / "config.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except ValueError:
            raise FitError(f"{cfg_path} is unreadable; choose another --out or delete {run}") from None
        old_fit = {k: old.get(k) for k in record["fit"]}
        diff = [k for k in record["fit"] if old_fit[k] != record["fit"][k]]
        if old.get("data", {}).get("fingerprint") != record["data"]["fingerprint"]:
            diff.append("training images")
        if diff:
            raise FitError(f"{run} already holds a fit with a different {', '.join(diff)}; "
                           f"choose another --out or delete it")
        state_path = run / "state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if not state.get("complete"):
            say(f"resuming the unfinished fit in {run}")
        return state
    if run.is_dir() and any(run.iterdir()):
        raise FitError(f"--out {run} is not empty and is not a run folder; choose a new or empty folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FitError(f"cannot write to --out {run}: {exc.strerror or exc}") from None
    return {}


def _extract_features(model, samples: list[Sample], cfg: FitConfig, device: torch.device, run: Path, state: dict,
                      tick: Progress, say: Log) -> tuple[int, Path, Path | None, ReadLog]:
    """Stream patch features of ``samples`` to ``RUN/cache``; resume from its progress file.

    Rows are appended with plain file writes, not a memory map: written pages stay in the
    OS page cache (reclaimable) instead of counting as this process's resident memory.
    """
    cache = run / "cache"
    cache.mkdir(exist_ok=True)
    h, w = model.feature_size(cfg.image_size)
    dim = model.embed_dim
    max_rows = len(samples) * h * w
    proj = random_projection(dim, cfg.projection_dim, cfg.seed, device)
    pdim = proj.shape[1] if proj is not None else 0
    emb_path = cache / "embeddings.f32"
    proj_path = cache / "projected.f32" if proj is not None else None
    prog_path = cache / "progress.json"
    checksum = _param_checksum(model.feature_extractor)
    read_log = ReadLog()
    prog = None
    if prog_path.is_file():
        try:
            prog = json.loads(prog_path.read_text())
        except ValueError:
            prog = None
        if prog is not None:
            rows = prog.get("rows", -1)
            files_ok = emb_path.is_file() and emb_path.stat().st_size >= rows * dim * 4 and (
                proj_path is None or (proj_path.is_file() and proj_path.stat().st_size >= rows * pdim * 4))
            if (prog.get("max_rows") != max_rows or not files_ok
                    or not np.isclose(prog.get("checksum", -1.0), checksum, rtol=1e-9)):
                say("cached features do not match these weights, images or files: extracting again")
                prog = None
    if prog is None:
        need = max_rows * (dim + pdim) * 4
        free = shutil.disk_usage(cache).free
        if need > free:
            raise FitError(f"the features of {len(samples)} images at {cfg.image_size[1]}x{cfg.image_size[0]} "
                           f"need {need / 2**30:.1f} GiB in {cache}, {free / 2**30:.1f} GiB are free: lower "
                           f"--image-size, use fewer images, or put --out on a larger disk")
        prog = {"images_done": 0, "rows": 0, "bad": [], "max_rows": max_rows, "checksum": checksum}
    else:
        read_log.bad = [(Path(p), why) for p, why in prog["bad"]]
        if prog["images_done"] < len(samples):
            say(f"resuming feature extraction at image {prog['images_done'] + 1} of {len(samples)}")
    done, rows = prog["images_done"], prog["rows"]
    files = [(open(emb_path, "r+b" if rows else "wb"), dim)]
    if proj_path is not None:
        files.append((open(proj_path, "r+b" if rows else "wb"), pdim))
    for f, width in files:  # drop whatever a crash left after the last recorded batch
        f.truncate(rows * width * 4)
        f.seek(rows * width * 4)
    t0 = time.perf_counter()
    position = {s.path: i for i, s in enumerate(samples)}
    tick("features", done, len(samples))
    try:
        with torch.inference_mode():
            for batch in iter_batches(samples[done:], cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad,
                                      log=read_log):
                emb = model.feature_extractor(batch.images.to(device))  # (B, D, h, w)
                flat = emb.permute(0, 2, 3, 1).reshape(-1, dim).float()  # (B*h*w, D): patch rows, image-major
                flat.cpu().numpy().tofile(files[0][0])
                if proj is not None:
                    project(flat, proj).cpu().numpy().tofile(files[1][0])  # (B*h*w, d)
                for f, _ in files:
                    f.flush()
                rows += flat.shape[0]
                done = position[batch.samples[-1].path] + 1
                prog.update(images_done=done, rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
                _write_json(prog_path, prog)  # after the rows are written: a resume never trusts missing rows
                tick("features", done, len(samples))
    finally:
        for f, _ in files:
            f.close()
    prog.update(images_done=len(samples), rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
    _write_json(prog_path, prog)  # trailing unreadable files were logged by the loop
    if rows == 0:
        raise DataError(f"none of the {len(samples)} training images could be read: " + (read_log.bad_note() or ""))
    secs = time.perf_counter() - t0 + state.get("stages", {}).get("features", {}).get("seconds", 0.0)
    state["stages"]["features"] = {"done": True, "seconds": secs, "images": len(samples) - len(read_log.bad),
                                   "patch_rows": rows, "feature_dim": dim, "feature_grid": [h, w]}
    state["rss_after_features_bytes"] = peak_rss_bytes()
    return rows, emb_path, proj_path, read_log


def _select_bank(rows: int, emb_path: Path, proj_path: Path | None, dim: int, cfg: FitConfig,
                 device: torch.device, tick: Progress) -> tuple[torch.Tensor, int, float]:
    """Greedy coreset on the projected rows; read only the chosen full rows back."""
    k = coreset_size(rows, cfg.coreset_ratio)
    if k == rows:
        return torch.from_numpy(np.fromfile(emb_path, dtype=np.float32, count=rows * dim).reshape(rows, dim)), k, 0.0
    src, width = (proj_path, min(cfg.projection_dim, dim)) if proj_path is not None else (emb_path, dim)
    # (rows, d) in memory: the coreset's working set, the one part of fitting that grows with the data.
    points = torch.from_numpy(np.fromfile(src, dtype=np.float32, count=rows * width).reshape(rows, width))
    stats: dict = {}
    idx = greedy_kcenter(points.to(device), k, cfg.num_starting_points, cfg.seed,
                         progress=lambda done, total: tick("coreset", done, total), stats=stats)
    del points
    chosen = np.sort(idx.cpu().numpy())
    # (k, D): only these rows are read, straight into the bank (a memory map would keep the
    # pages it touched resident, and fancy indexing would copy once more).
    bank = np.empty((chosen.size, dim), dtype=np.float32)
    with open(emb_path, "rb") as f:
        for i, r in enumerate(chosen.tolist()):
            f.seek(r * dim * 4)
            f.readinto(bank[i])
    return torch.from_numpy(bank), k, stats["candidate_fraction"]


def _calibrate(model, ds: ADDataset, fallback: list[Sample], labelled: bool, held_out: bool, cfg: FitConfig,
               device: torch.device, tick: Progress) -> tuple[dict, dict | None, list[str]]:
    """Thresholds + normalisation from the labelled test set, else from normal images."""
    notes: list[str] = []
    with_masks = labelled and ds.test_has_masks
    samples = ds.test if labelled else fallback
    read_log = ReadLog()
    batches = iter_batches(samples, cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad, log=read_log,
                           with_masks=with_masks)
    scored: Scored = score_batches(model, batches, device, len(samples), tick, "calibration")
    if read_log.bad:
        notes.append("calibration: " + read_log.bad_note())
    if not scored.samples:
        raise DataError("no calibration image could be read: " + (read_log.bad_note() or ""))
    scores = np.asarray(scored.scores, dtype=np.float64)
    maps = np.stack(scored.maps)  # (N, h, w)
    labels = np.array([s.label for s in scored.samples])
    margin = cfg.threshold_margin
    normal = labels == 0 if labelled else np.ones(labels.size, dtype=bool)
    cal: dict = {"image_max": float(scores.max()), "pixel_max": float(maps.max())}
    metrics = None
    if labelled and 0 < labels.sum() < labels.size:
        thr, f1 = f1_optimal_threshold(labels, scores)
        cal.update(image_threshold=thr, image_threshold_source=(
            f"F1-optimal on the labelled test set ({labels.size} images, {int(labels.sum())} anomalous; F1 {f1:.3f})"))
        masks = np.stack(scored.masks) if with_masks else None
        m = evaluate_scores(labels, scores, maps if with_masks else None, masks)
        note = ds.mask_note()
        if note:
            m.notes = (note,) + tuple(n for n in m.notes if not n.startswith("pixel metrics skipped"))
            notes.append(note)
        metrics = {**m.as_dict(), "threshold_note": "image_f1 / pixel_f1 are at thresholds chosen on this same "
                   "test set, so they are optimistic; AUROC and AUPRO do not depend on a threshold"}
        if with_masks:
            cal.update(pixel_threshold=m.pixel_threshold, pixel_threshold_source="F1-optimal on the test masks")
        else:
            cal.update(pixel_threshold=(1 + margin) * float(maps[normal].max()),
                       pixel_threshold_source=f"(1 + {margin}) x the highest map value of the normal test images "
                                              f"(no masks)")
    else:
        where = ("normal images held out of the memory bank" if held_out else
                 "the training images themselves (fewer than 10, none held out: scores are biased low)")
        # PatchCore scores are distances (>= 0): a relative margin does not depend on how
        # many normal images were scored, unlike one proportional to their spread.
        cal.update(image_threshold=(1 + margin) * float(scores.max()),
                   image_threshold_source=f"(1 + {margin}) x the highest score of {where}",
                   pixel_threshold=(1 + margin) * float(maps.max()),
                   pixel_threshold_source=f"(1 + {margin}) x the highest map value of {where}")
        if not held_out:
            notes.append("threshold set on the training images themselves (too few to hold some out); "
                         "expect false alarms: add a labelled test set or more training images")
    # Normalisation: the lowest normal score -> 0, the threshold -> 0.5, as far again above -> 1.
    cal["image_min"] = float(scores[normal].min())
    cal["pixel_min"] = float(maps[normal].min())
    cal["image_span"] = _span(cal["image_threshold"], cal["image_min"], scores)
    cal["pixel_span"] = _span(cal["pixel_threshold"], cal["pixel_min"], maps)
    cal["normalization"] = ("normalized = clip((score - threshold) / span + 0.5, 0, 1) with span = 2 x (threshold - "
                            "lowest normal calibration score): 0 = that lowest normal score, 0.5 = the threshold; "
                            "heatmaps use the same scale with the pixel values")
    cal["calibration_images"] = int(len(scored.samples))
    return cal, metrics, notes


def _span(threshold: float, lowest_normal: float, values: np.ndarray) -> float:
    """2 x (threshold - lowest normal value); max - min of all values (or 1) if that is not positive."""
    span = 2.0 * (threshold - lowest_normal)
    if span > 0:
        return span
    lo, hi = float(np.min(values)), float(np.max(values))
    return (hi - lo) if hi > lo else 1.0

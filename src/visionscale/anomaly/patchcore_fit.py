"""Fit PatchCore from a folder of images, in bounded memory, into a self-describing run folder.

:func:`fit_patchcore` reads as its stages over a :class:`~visionscale.anomaly.run.FitRun`.

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
   (``calibration.json``) and, on a labelled test set, the metrics (``metrics.json``);
   see :mod:`visionscale.anomaly.calibration`.

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

The run folder's files: :mod:`visionscale.anomaly.run`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from visionscale.anomaly.calibration import calibrate
from visionscale.anomaly.config import RANDOM_WEIGHTS_WARNING, FitConfig, FitError, FitResult, Log, Progress
from visionscale.anomaly.coreset import (
    DEFAULT_PROJECTION_DIM,
    coreset_size,
    greedy_kcenter,
    project,
    random_projection,
)
from visionscale.anomaly.data import DataError, ReadLog, Sample, pair
from visionscale.anomaly.tiles import TileSample, expand_tiles, fit_tiling, iter_sample_batches, tiling_fields
from visionscale.anomaly.run import FitRun, out_of_memory_as, peak_rss_bytes, write_json
from visionscale.anomaly.runs import build_patchcore
from visionscale.device import resolve_device

__all__ = ["fit_patchcore", "fit_memory_estimate"]


def fit_patchcore(data: str | os.PathLike, out: str | os.PathLike, config: FitConfig | None = None, *,
                  category: str | None = None, progress: Progress | None = None, log: Log | None = None,
                  keep_cache: bool = False, overwrite: bool = False) -> FitResult:
    """Fit PatchCore on the normal training images under ``data`` and write a run folder to ``out``.

    Args:
        data: MVTec AD root/category or plain folder layout (see :mod:`visionscale.anomaly.data`).
        out: Run folder; created, or resumed if it holds an unfinished fit of the same config
            (see :func:`visionscale.anomaly.train.fit` for the lock, foreign files and ``overwrite``).
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
    if cfg.method != "patchcore":
        raise FitError(f"fit_patchcore fits PatchCore, not {cfg.model}: call visionscale.anomaly.train.fit")
    with FitRun.claim(out, overwrite=overwrite, log=log, progress=progress) as run:
        ds = run.load_data(data, category, cfg.seed)
        bank_samples, holdout = run.threshold_holdout(ds, cfg, "the memory bank")
        device = resolve_device(cfg.device)
        if run.open(cfg, ds, bank_samples, holdout):
            return run.finished()
        if cfg.weights is None:
            run.warn(RANDOM_WEIGHTS_WARNING, "weights")
        # Built before config.json is written: weights that fail to load leave no run behind
        # that a corrected command would then refuse as "a different fit".
        model = build_patchcore(cfg.model, cfg.image_size, cfg.coreset_ratio, cfg.weights, cfg.seed).eval()
        model.to(device)
        tiling = fit_tiling(model, cfg)
        run.write_config(device, cfg.weights or "random", method="patchcore", batch_size=cfg.batch_size,
                         random_weights="backbone" if cfg.weights is None else None, **tiling_fields(tiling))
        bank_items = expand_tiles(bank_samples, tiling) if tiling is not None else bank_samples
        run.state["rss_after_model_bytes"] = peak_rss_bytes()
        # Tiled: every tile is one input of the model's size (tiles.expand_tiles).
        run.state["memory_estimate"] = fit_memory_estimate(len(bank_items), cfg.image_size, model.embed_dim,
                                                           cfg.coreset_ratio, cfg.projection_dim)
        if run.done("coreset"):
            _load_bank(model, run, device)
        else:
            _build_bank(model, bank_items, cfg, device, run, keep_cache)
        t0 = time.perf_counter()
        with out_of_memory_as(lambda: _oom_error("calibration", cfg, device)):
            calibration = calibrate(model, ds, holdout or bank_samples, cfg, device, run.tick, tiling=tiling,
                                    held_out_what="normal images held out of the memory bank" if holdout else None)
        return run.finish(calibration, time.perf_counter() - t0)


def _build_bank(model, samples: list[Sample], cfg: FitConfig, device: torch.device, run: FitRun,
                keep_cache: bool) -> None:
    """Stages 1-2: features streamed to ``RUN/cache``, coreset -> ``model.safetensors``."""
    with out_of_memory_as(lambda: _oom_error("features", cfg, device)):
        rows, emb_path, proj_path, read_log = _extract_features(model, samples, cfg, device, run)
    if not any(isinstance(s, TileSample) for s in samples[:1]):  # tiles are cut, never resized
        run.note(read_log.size_note(cfg.image_size))
    run.note(read_log.bad_note())
    run.state["bad_images"] = [[str(p), why] for p, why in read_log.bad]
    run.save_state()
    t0 = time.perf_counter()
    with out_of_memory_as(lambda: _oom_error("coreset", cfg, device, f" ({rows} patch rows)")):
        bank, k, frac = _select_bank(rows, emb_path, proj_path, model.embed_dim, cfg, device, run.tick)
    model.set_memory_bank(bank)
    run.save_weights(model, "visionscale.patchcore")
    run.state["rss_after_coreset_bytes"] = peak_rss_bytes()
    run.mark("coreset", seconds=time.perf_counter() - t0, patch_rows=rows, bank_rows=int(bank.shape[0]), k=k,
             candidate_fraction=frac)
    if not keep_cache:
        shutil.rmtree(run.path / "cache", ignore_errors=True)


def _load_bank(model, run: FitRun, device: torch.device) -> None:
    from visionscale.io.weights import load_state_dict

    saved = load_state_dict(run.path / "model.safetensors")
    model.set_memory_bank(saved["nn_search.memory_bank"])  # its size differs from the placeholder's
    model.load_state_dict(saved)
    model.to(device)
    run.say("features and memory bank already done: resuming at calibration")


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



def _param_checksum(module: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def _oom_error(stage: str, cfg: FitConfig, device: torch.device, extra: str = "") -> FitError:
    h, w = cfg.image_size
    knobs = {
        "features": (f"lower batch_size (now {cfg.batch_size}; finished batches are kept, so rerunning the same "
                     f"fit with a smaller batch size resumes) or image_size (now {w}x{h})", "batch_size", "image_size"),
        "coreset": (f"lower coreset_ratio (now {cfg.coreset_ratio}), image_size (now {w}x{h}) or the number "
                    f"of training images: the coreset search holds every patch's {cfg.projection_dim}-d projection",
                    "coreset_ratio", "image_size"),
        "calibration": (f"lower batch_size (now {cfg.batch_size}) or image_size (now {w}x{h})",
                        "batch_size", "image_size"),
    }[stage]
    return FitError(f"out of memory during {stage} on {device}: {knobs[0]}{extra}").about(*knobs[1:])



def _extract_features(model, samples: list[Sample], cfg: FitConfig, device: torch.device,
                      run: FitRun) -> tuple[int, Path, Path | None, ReadLog]:
    """Stream patch features of ``samples`` to ``RUN/cache``; resume from its progress file.

    Rows are appended with plain file writes, not a memory map: written pages stay in the
    OS page cache (reclaimable) instead of counting as this process's resident memory.
    """
    say, tick, state = run.say, run.tick, run.state
    cache = run.path / "cache"
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
                           f"image_size, use fewer images, or put the run folder (out) on a larger "
                           f"disk").about("image_size", "out")
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
    position = {s: i for i, s in enumerate(samples)}  # tiles of one image share its path
    tick("features", done, len(samples))
    try:
        with torch.inference_mode():
            for batch in iter_sample_batches(samples[done:], cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad,
                                             log=read_log, workers=cfg.workers):
                emb = model.feature_extractor(batch.images.to(device))  # (B, D, h, w)
                flat = emb.permute(0, 2, 3, 1).reshape(-1, dim).float()  # (B*h*w, D): patch rows, image-major
                flat.cpu().numpy().tofile(files[0][0])
                if proj is not None:
                    project(flat, proj).cpu().numpy().tofile(files[1][0])  # (B*h*w, d)
                for f, _ in files:
                    f.flush()
                rows += flat.shape[0]
                done = position[batch.samples[-1]] + 1
                prog.update(images_done=done, rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
                write_json(prog_path, prog)  # after the rows are written: a resume never trusts missing rows
                tick("features", done, len(samples))
    finally:
        for f, _ in files:
            f.close()
    prog.update(images_done=len(samples), rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
    write_json(prog_path, prog)  # trailing unreadable files were logged by the loop
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

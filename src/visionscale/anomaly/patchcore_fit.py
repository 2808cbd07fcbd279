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
   Per-position banks (``tile_bank="per-position"``, tiled fits whose images all have one
   size): stage 1 writes each tile's rows to the files of its grid position
   (``cache/positions/P/``), and stage 2 runs the coreset per position (``coreset_ratio``
   of that position's rows), keeping each finished bank in ``cache/banks/`` so a rerun
   resumes at the next position; ``model.safetensors`` holds the banks one after another
   and their row offsets (``nn_search.bank_offsets``).
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
from collections.abc import Callable
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
from visionscale.anomaly.data import DataError, ReadLog, Sample, image_size_of, pair
from visionscale.anomaly.tiles import TileSample, expand_tiles, fit_tiling, iter_sample_batches, tiling_fields
from visionscale.anomaly.run import FitRun, out_of_memory_as, peak_rss_bytes, write_json
from visionscale.anomaly.runs import build_patchcore
from visionscale.device import resolve_device
from visionscale.tiling import TileGrid

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
        # Per-position banks: one fixed grid for every image (checked before anything is written).
        grid = _position_grid(bank_samples + holdout, tiling) if cfg.tile_bank == "per-position" else None
        model.tile_grid = grid
        run.write_config(device, cfg.weights or "random", method="patchcore", batch_size=cfg.batch_size,
                         random_weights="backbone" if cfg.weights is None else None, **tiling_fields(tiling),
                         **({"tile_grid": grid.as_dict()} if grid is not None else {}))
        bank_items = expand_tiles(bank_samples, tiling, grid) if tiling is not None else bank_samples
        run.state["rss_after_model_bytes"] = peak_rss_bytes()
        # Tiled: every tile is one input of the model's size (tiles.expand_tiles).
        run.state["memory_estimate"] = fit_memory_estimate(len(bank_items), cfg.image_size, model.embed_dim,
                                                           cfg.coreset_ratio, cfg.projection_dim)
        if run.done("coreset"):
            _load_bank(model, run, device)
        else:
            _build_bank(model, bank_items, cfg, device, run, keep_cache, grid)
        t0 = time.perf_counter()
        with out_of_memory_as(lambda: _oom_error("calibration", cfg, device)):
            calibration = calibrate(model, ds, holdout or bank_samples, cfg, device, run.tick, tiling=tiling,
                                    held_out_what="normal images held out of the memory bank" if holdout else None)
        return run.finish(calibration, time.perf_counter() - t0)


def _position_grid(samples: list[Sample], tiling) -> TileGrid:
    """The one tile grid of a per-position fit: every image (after ``pre_resize``) has one size.

    Sizes come from the file headers; a file whose header cannot be read is left to the
    reading, which names it (or skips it with ``skip_bad``).
    """
    first = None
    for s in samples:
        size = tiling.resize or image_size_of(s.path)
        if size is None:
            continue
        if first is None:
            first = (s, size)
        elif size != first[1]:
            (h0, w0), (h, w) = first[1], size
            raise FitError(f"tile_bank per-position needs every training image at one size (one tile grid, one "
                           f"bank per tile position): {s.path} is {w}x{h} px, {first[0].path} is {w0}x{h0} px; set "
                           f"pre_resize to resize all images to one size first, or use tile_bank "
                           f"shared").about("tile_bank", "pre_resize")
    if first is None:
        raise DataError(f"none of the {len(samples)} training images has a readable size")
    return tiling.grid(*first[1])


def _build_bank(model, samples: list[Sample], cfg: FitConfig, device: torch.device, run: FitRun,
                keep_cache: bool, grid: TileGrid | None = None) -> None:
    """Stages 1-2: features streamed to ``RUN/cache``, coreset -> ``model.safetensors``.

    With ``grid`` (per-position banks) each tile's rows go to the files of its grid position
    (``cache/positions/P/``), and each position gets a coreset of its own rows (``coreset_ratio``
    of them), saved to ``cache/banks/`` as it finishes: a rerun resumes at the next position.
    """
    route = None
    if grid is not None:
        position_of = {box: p for p, box in enumerate(grid.boxes)}
        route = (len(grid), lambda s: position_of[s.box])
    with out_of_memory_as(lambda: _oom_error("features", cfg, device)):
        rows, position_rows, read_log = _extract_features(model, samples, cfg, device, run, route)
    if not any(isinstance(s, TileSample) for s in samples[:1]):  # tiles are cut, never resized
        run.note(read_log.size_note(cfg.image_size))
    run.note(read_log.bad_note())
    run.state["bad_images"] = [[str(p), why] for p, why in read_log.bad]
    run.save_state()
    t0 = time.perf_counter()
    with out_of_memory_as(lambda: _oom_error("coreset", cfg, device, f" ({rows} patch rows)")):
        if grid is None:
            emb_path, proj_path = _feature_files(run.path / "cache", None, cfg, model.embed_dim)
            bank, k, frac = _select_bank(rows, emb_path, proj_path, model.embed_dim, cfg, device, run.tick)
            offsets, per_position = None, None
        else:
            bank, offsets, per_position = _select_position_banks(position_rows, model.embed_dim, cfg, device, run)
            k = int(bank.shape[0])
            frac = float(np.mean([p["candidate_fraction"] for p in per_position]))
    model.set_memory_bank(bank, offsets)
    run.save_weights(model, "visionscale.patchcore")
    run.state["rss_after_coreset_bytes"] = peak_rss_bytes()
    extra = {} if per_position is None else {"positions": len(per_position),
                                             "position_bank_rows": [p["bank_rows"] for p in per_position],
                                             "position_patch_rows": [p["patch_rows"] for p in per_position]}
    run.mark("coreset", seconds=time.perf_counter() - t0, patch_rows=rows, bank_rows=int(bank.shape[0]), k=k,
             candidate_fraction=frac, **extra)
    if not keep_cache:
        shutil.rmtree(run.path / "cache", ignore_errors=True)


def _select_position_banks(position_rows: list[int], dim: int, cfg: FitConfig, device: torch.device,
                           run: FitRun) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """One coreset per grid position, into one preallocated (sum k_p, D) bank with (P + 1,) offsets.

    Each position's bank is written to ``cache/banks/P.f32`` (and ``cache/banks/done.json``)
    when it is chosen, so an interrupted coreset stage resumes at the next position.
    """
    cache = run.path / "cache"
    banks_dir = cache / "banks"
    banks_dir.mkdir(exist_ok=True)
    done_path = banks_dir / "done.json"
    sizes = [coreset_size(r, cfg.coreset_ratio) if r else 0 for r in position_rows]
    if 0 in sizes:
        raise DataError(f"tile position {sizes.index(0)} has no readable tile in any training image")
    offsets = torch.tensor([0] + np.cumsum(sizes).tolist(), dtype=torch.int64)
    bank = torch.empty(int(offsets[-1]), dim)
    try:
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    except ValueError:
        done = {}
    info: list[dict] = []
    total = int(offsets[-1])
    for p, rows in enumerate(position_rows):
        lo, hi = int(offsets[p]), int(offsets[p + 1])
        saved = banks_dir / f"{p}.f32"
        rec = done.get(str(p))
        if rec is not None and rec.get("patch_rows") == rows and saved.is_file() and \
                saved.stat().st_size == (hi - lo) * dim * 4:
            bank[lo:hi] = torch.from_numpy(np.fromfile(saved, dtype=np.float32).reshape(hi - lo, dim))
        else:
            emb_path, proj_path = _feature_files(cache, p, cfg, dim)
            part, _, frac = _select_bank(rows, emb_path, proj_path, dim, cfg, device,
                                         lambda stage, d, t, lo=lo: run.tick(stage, lo + d, total))
            bank[lo:hi] = part
            del part
            bank[lo:hi].numpy().tofile(saved)
            rec = done[str(p)] = {"patch_rows": rows, "bank_rows": hi - lo, "candidate_fraction": frac}
            write_json(done_path, done)  # after the bank file: a resume never trusts a missing one
        info.append(rec)
        run.tick("coreset", hi, total)
    return bank, offsets, info


def _load_bank(model, run: FitRun, device: torch.device) -> None:
    from visionscale.io.weights import load_state_dict

    saved = load_state_dict(run.path / "model.safetensors")
    # Its size differs from the placeholder's; per-position runs also hold the banks' offsets.
    model.set_memory_bank(saved["nn_search.memory_bank"], saved.get("nn_search.bank_offsets"))
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



def _feature_files(cache: Path, position: int | None, cfg: FitConfig, dim: int) -> tuple[Path, Path | None]:
    """Full and projected feature files of one bank: ``cache/`` itself, or ``cache/positions/P/``."""
    folder = cache if position is None else cache / "positions" / str(position)
    return folder / "embeddings.f32", (folder / "projected.f32" if dim > cfg.projection_dim else None)


def _extract_features(model, samples: list[Sample], cfg: FitConfig, device: torch.device, run: FitRun,
                      route: tuple[int, Callable[[Sample], int]] | None = None) -> tuple[int, list[int], ReadLog]:
    """Stream patch features of ``samples`` to ``RUN/cache``; resume from its progress file.

    ``route`` = (P, position of a sample): per-position banks, each sample's rows go to the
    files of its position (``cache/positions/p/``); None: all rows to ``cache/``.

    Rows are appended with plain file writes, not a memory map: written pages stay in the
    OS page cache (reclaimable) instead of counting as this process's resident memory.

    Returns:
        (rows, rows per position, read log); one position without ``route``.
    """
    say, tick, state = run.say, run.tick, run.state
    cache = run.path / "cache"
    cache.mkdir(exist_ok=True)
    h, w = model.feature_size(cfg.image_size)
    dim = model.embed_dim
    max_rows = len(samples) * h * w
    proj = random_projection(dim, cfg.projection_dim, cfg.seed, device)
    pdim = proj.shape[1] if proj is not None else 0
    num_pos, position_of = route if route is not None else (1, None)
    paths = [_feature_files(cache, p if route is not None else None, cfg, dim) for p in range(num_pos)]
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
            pos_rows = prog.get("position_rows") if route is not None else [prog.get("rows", -1)]
            files_ok = isinstance(pos_rows, list) and len(pos_rows) == num_pos and all(
                emb.is_file() and emb.stat().st_size >= r * dim * 4
                and (pj is None or (pj.is_file() and pj.stat().st_size >= r * pdim * 4))
                for (emb, pj), r in zip(paths, pos_rows))
            if (prog.get("max_rows") != max_rows or not files_ok or prog.get("positions", 1) != num_pos
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
        if route is not None:
            prog.update(positions=num_pos, position_rows=[0] * num_pos)
    else:
        read_log.bad = [(Path(p), why) for p, why in prog["bad"]]
        if prog["images_done"] < len(samples):
            say(f"resuming feature extraction at image {prog['images_done'] + 1} of {len(samples)}")
    done, rows = prog["images_done"], prog["rows"]
    pos_rows = list(prog["position_rows"]) if route is not None else [rows]
    for (emb, pj), r in zip(paths, pos_rows):  # drop whatever a crash left after the last recorded batch
        emb.parent.mkdir(parents=True, exist_ok=True)
        for path, width in ((emb, dim), (pj, pdim)):
            if path is not None:
                with open(path, "r+b" if r and path.is_file() else "wb") as f:
                    f.truncate(r * width * 4)
    t0 = time.perf_counter()
    index = {s: i for i, s in enumerate(samples)}  # tiles of one image share its path
    per_sample = h * w
    tick("features", done, len(samples))
    with torch.inference_mode():
        for batch in iter_sample_batches(samples[done:], cfg.image_size, cfg.batch_size, skip_bad=cfg.skip_bad,
                                         log=read_log, workers=cfg.workers):
            emb = model.feature_extractor(batch.images.to(device))  # (B, D, h, w)
            flat = emb.permute(0, 2, 3, 1).reshape(-1, dim).float()  # (B*h*w, D): patch rows, image-major
            projected = project(flat, proj) if proj is not None else None  # (B*h*w, d)
            if position_of is None:
                groups = [(0, slice(0, flat.shape[0]))]
            else:  # each input's h*w rows to its position's files
                groups = [(position_of(s), slice(b * per_sample, (b + 1) * per_sample))
                          for b, s in enumerate(batch.samples)]
            for p, sl in groups:
                emb_path, proj_path = paths[p]
                with open(emb_path, "ab") as f:
                    flat[sl].cpu().numpy().tofile(f)
                if projected is not None:
                    with open(proj_path, "ab") as f:
                        projected[sl].cpu().numpy().tofile(f)
                pos_rows[p] += sl.stop - sl.start
            rows += flat.shape[0]
            done = index[batch.samples[-1]] + 1
            prog.update(images_done=done, rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
            if route is not None:
                prog["position_rows"] = pos_rows
            write_json(prog_path, prog)  # after the rows are written: a resume never trusts missing rows
            tick("features", done, len(samples))
    prog.update(images_done=len(samples), rows=rows, bad=[[str(p), why] for p, why in read_log.bad])
    write_json(prog_path, prog)  # trailing unreadable files were logged by the loop
    if rows == 0:
        raise DataError(f"none of the {len(samples)} training images could be read: " + (read_log.bad_note() or ""))
    secs = time.perf_counter() - t0 + state.get("stages", {}).get("features", {}).get("seconds", 0.0)
    state["stages"]["features"] = {"done": True, "seconds": secs, "images": len(samples) - len(read_log.bad),
                                   "patch_rows": rows, "feature_dim": dim, "feature_grid": [h, w]}
    state["rss_after_features_bytes"] = peak_rss_bytes()
    return rows, pos_rows, read_log


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

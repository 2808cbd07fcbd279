"""Write a study's outputs: results.json, tidy CSVs, PNG plots and report.md.

The folder is written all at once through :class:`~visionscale.io.outputs.OutputDir`: a failed
or interrupted run leaves the folder as it was, a rerun leaves no stale files of the previous
one, and a folder holding files visionscale did not write is refused unless overwriting.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from visionscale.errors import OutputError  # re-exported: other commands catch it from here
from visionscale.io.figures import figure_png
from visionscale.io.outputs import OutputDir, ensure_output_dir, read_manifest
from visionscale.study.sweep import StudyResult
from visionscale.study.tiles import square_tiles

MiB = 1024**2
OUTPUT_KIND = "scale"

__all__ = ["OutputError", "check_output_dir", "output_dir", "write_outputs", "render_markdown"]


def check_output_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable (kept for callers of this old place:
    :func:`visionscale.io.outputs.ensure_output_dir`)."""
    return ensure_output_dir(path)


# What a study writes (before outputs had a manifest): a folder holding only these is an
# earlier study's, replaced without asking like one with a manifest.
_STUDY_FILES = re.compile(r"(results\.json|report\.md|(rows|fits|gpu_limits|checks|totals|tile_plans)\.csv|"
                          r"components_.+\.png|(memory_extrapolated(_seed_sum)?|runtime_extrapolated|tile_plans)\.png)")


def _earlier_study(folder: Path) -> bool:
    if not folder.is_dir() or read_manifest(folder) is not None:
        return False
    entries = list(folder.iterdir())
    if not all(p.is_file() and _STUDY_FILES.fullmatch(p.name) for p in entries) \
            or "results.json" not in {p.name for p in entries}:
        return False
    try:
        data = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "rows", "gpu_limits"} <= set(data)


def output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> OutputDir:
    """The study's output folder, checked now (before the study runs).

    Raises:
        OutputError: ``out_dir`` is a file, cannot be written, or holds files that are not a
            study's (:class:`~visionscale.errors.OutputExistsError`) and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    return OutputDir(out_dir, kind=OUTPUT_KIND, overwrite=overwrite or _earlier_study(out_dir))




def dtypes_of(result: StudyResult) -> list[str]:
    """The study's dtypes in order (one for a single-precision study)."""
    listed = result.config.get("dtypes")
    if listed:
        return list(listed)
    return list(dict.fromkeys(r.get("dtype", result.config.get("dtype", "fp32")) for r in result.rows)) or \
        [str(result.config.get("dtype", "fp32"))]


def subset(result: StudyResult, dtype: str) -> StudyResult:
    """The part of a (multi-dtype) study for one dtype, shaped like a single-dtype study."""
    def pick(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [x for x in items if x.get("dtype", dtype) == dtype]

    config = dict(result.config, dtype=dtype, dtypes=[dtype])
    return StudyResult(config=config, environment=result.environment, rows=pick(result.rows), fits=pick(result.fits),
                       gpu_limits=pick(result.gpu_limits), checks=pick(result.checks), totals=pick(result.totals),
                       analytic_points=pick(result.analytic_points), sensors=result.sensors,
                       tile_plans=pick(result.tile_plans))


# Line style per dtype in the comparison plots (colour is the model).
DTYPE_STYLES = {"fp32": "-", "fp16": "--", "bf16": ":"}


def _csv_bytes(records: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    if records:
        fields: list[str] = []
        for rec in records:
            fields.extend(k for k in rec if k not in fields)
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return buf.getvalue().encode()


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MiB:,.1f}"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.2f}"


def _models(result: StudyResult) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in result.rows))


def _components(result: StudyResult, model: str) -> list[str]:
    return list(dict.fromkeys(r["component"] for r in result.rows if r["model"] == model))


def _fit(result: StudyResult, model: str, component: str, metric: str) -> dict[str, Any] | None:
    for f in result.fits:
        if f["model"] == model and f["component"] == component and f["metric"] == metric:
            return f
    return None


def _png(fig) -> bytes:
    return figure_png(fig, dpi=110)


def plot_model(result: StudyResult, model: str) -> bytes:
    """Stacked per-component memory and runtime per resolution (seed Figures 2-7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r["model"] == model]
    res = sorted({r["resolution"] for r in rows})
    comps = _components(result, model)
    timed = any(r["time_ms_mean"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(res))
    bottom = np.zeros(len(res))
    colors = plt.get_cmap("tab10")
    for i, comp in enumerate(comps):
        by_res = {r["resolution"]: r for r in rows if r["component"] == comp}
        params = np.array([by_res[q]["params_bytes"] / MiB for q in res])
        acts = np.array([by_res[q]["activation_sum_bytes"] / MiB for q in res])
        ax.bar(x, params, bottom=bottom, color=colors(i), alpha=0.45, hatch="//", edgecolor="white")
        bottom += params
        ax.bar(x, acts, bottom=bottom, color=colors(i), label=comp)
        bottom += acts
    ax.set_xticks(x, [f"{q}×{q}" for q in res])
    ax.set_ylabel("MiB (hatched: parameters, solid: activations)")
    ax.set_title(f"{model}: memory per component ({result.config['dtype']}, seed Eq. 1)")
    ax.legend()
    if timed:
        ax = axes[0][1]
        bottom = np.zeros(len(res))
        for i, comp in enumerate(comps):
            by_res = {r["resolution"]: r for r in rows if r["component"] == comp}
            t = np.array([by_res[q]["time_ms_mean"] or 0.0 for q in res])
            ax.bar(x, t, bottom=bottom, color=colors(i), label=comp)
            bottom += t
        ax.set_xticks(x, [f"{q}×{q}" for q in res])
        device = result.environment.get("gpu") or "CPU"
        ax.set_ylabel("ms per image (mean)")
        ax.set_title(f"{model}: runtime per component on {device}")
        ax.legend()
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _model_totals(result: StudyResult, model: str, metric: str) -> dict[int, float]:
    """Model-level value per resolution (memory from the study's totals, time summed)."""
    if metric.endswith("_bytes"):
        return {t["resolution"]: t[metric] for t in result.totals if t["model"] == model}
    out: dict[int, float] = {}
    for q in sorted({r["resolution"] for r in result.rows if r["model"] == model}):
        sel = [r for r in result.rows if r["model"] == model and r["resolution"] == q]
        if all(r[metric] is not None for r in sel):
            out[q] = sum(r[metric] for r in sel)
    return out


def plot_comparison(result: StudyResult, metric: str) -> bytes:
    """Fitted and extrapolated curves of all models with GPU and sensor lines (Figures 8-9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = result.config["target"]
    right = max([target, *result.config["resolutions"], *(x["side_px"] for x in result.sensors)]) * 1.03
    xs = np.linspace(1, right, 400)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab10")
    memory = metric.endswith("_bytes")
    scale = 1 / 1024**3 if memory else 1.0
    dts = dtypes_of(result)
    multi = len(dts) > 1
    for dt in dts:
        sub = subset(result, dt) if multi else result
        style = DTYPE_STYLES.get(dt, "-.")
        tag = f" {dt}" if multi else ""
        for i, model in enumerate(_models(result)):
            f = _fit(sub, model, "total", metric)
            pts = _model_totals(sub, model, metric)
            if f is not None:
                ax.plot(xs, (f["beta0"] + f["beta1"] * xs + f["beta2"] * xs**2) * scale, color=colors(i), ls=style,
                        label=f"{model}{tag} (fit)")
            if pts:
                ax.scatter(list(pts), [v * scale for v in pts.values()], color=colors(i), zorder=3,
                           marker="o" if dt == dts[0] else "s")
            if metric == "total_peak_bytes":
                extra = [(p["resolution"], p["total_peak_bytes"]) for p in sub.analytic_points
                         if p["model"] == model and p["resolution"] <= right]
                if extra:
                    ax.scatter([e[0] for e in extra], [e[1] * scale for e in extra], marker=".", s=25, color=colors(i),
                               alpha=0.7, label=f"{model}{tag} analytic passes")
            if memory:
                for c in sub.checks:
                    if c["model"] == model and c["metric"] == metric:
                        ax.scatter([c["resolution"]], [c["analytic_bytes"] * scale], marker="x", s=60, color=colors(i),
                                   zorder=4, label=f"{model}{tag} analytic at {c['resolution']}")
    if memory:
        # Log scale: attention and the PatchCore bank span four orders of magnitude.
        ax.set_yscale("log")
        seen: list[float] = []
        for gpu in sorted(result.config["gpus"], key=lambda g: g["vram_bytes"]):
            v = gpu["vram_bytes"] * scale
            ax.axhline(v, color="grey", lw=0.8, ls="--")
            if all(abs(v - u) / u > 0.15 for u in seen):  # cards of equal size share one label
                names = [g["name"] for g in result.config["gpus"] if abs(g["vram_bytes"] * scale - v) / v <= 0.15]
                ax.text(xs[-1], v, " / ".join(names) + " ", va="bottom", ha="right", fontsize=7, color="dimgrey")
                seen.append(v)
        ax.set_ylabel(f"GiB, log scale ({'peak of live tensors + params' if metric == 'total_peak_bytes' else 'seed Eq. 1: params + sum of activations'})")
    else:
        ax.set_ylabel("ms per image")
    ymin, ymax = ax.get_ylim()
    for s in result.sensors:
        if s["side_px"] <= xs[-1]:
            ax.axvline(s["side_px"], color="tab:red", lw=0.8, ls=":")
            ax.text(s["side_px"], ymax * (0.9 if memory else 0.98), f"{s['megapixels']:g} MP", rotation=90, va="top", ha="right",
                    fontsize=8, color="tab:red")
    ax.set_ylim(ymin if memory else 0, ymax)
    ax.set_xlabel("square image side (px)")
    device = result.environment.get("gpu") or "CPU"
    what = "memory" if memory else f"runtime on {device}"
    styles = ", ".join(f"{d} {DTYPE_STYLES.get(d, '-.')}" for d in dts) if multi else ""
    ax.set_title(f"{what}, fitted on {result.config['resolutions']} px and extrapolated to {target} px"
                 + (f"\nline style by dtype: {styles}" if multi else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def seconds_text(seconds: float | None) -> str:
    """``0.123 s``, ``12.3 s``, ``1,234 s`` (three significant digits below 100 s), or ``–``."""
    if seconds is None:
        return "–"
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    return f"{seconds:.3g} s" if seconds >= 1e-3 else f"{seconds:.1e} s"


def tile_cell(plan: dict[str, Any], short: bool = False) -> str:
    """One tile plan as text: ``whole image, 0.52 s``, ``9 × 1792 px (overlap 224), 31.4 s``, or
    with ``short`` (the tile side shown elsewhere) ``whole, 0.52 s`` and ``9 tiles, 31.4 s``."""
    if plan.get("tiles") is None:
        return "–" if short else "– (no tile fits)"
    if plan["whole_image"]:
        text = "whole" if short else "whole image"
    elif short:
        text = f"{plan['tiles']} tiles"
    else:
        text = f"{plan['tiles']} × {plan['tile_px']} px (overlap {plan['overlap_px']})"
    if plan.get("seconds_per_image") is not None:
        text += f", {seconds_text(plan['seconds_per_image'])}"
    return text


def timing_device_text(result: StudyResult) -> str:
    """Where the study's times come from, for the sentence under a table of estimated times."""
    env = result.environment
    if env.get("device") == "cuda":
        return f"the GPU that ran the study ({env.get('gpu')}), not on the GPU in each row"
    threads = env.get("cpu_count")
    return (f"the CPU that ran the study ({env.get('processor')}, {threads} thread{'s' if threads != 1 else ''}), "
            "not on the GPU in each row")


def _tile_time_gaps(result: StudyResult) -> list[str]:
    """Why a model has no estimated times: no runtime fit (timing off, too few timed sizes)."""
    gaps = []
    for model in _models(result):
        for dt in dtypes_of(result):
            if any(f["model"] == model and f["component"] == "total" and f["metric"] == "time_ms_mean"
                   and f.get("dtype", dt) == dt for f in result.fits):
                continue
            if any(p["model"] == model and p.get("dtype", dt) == dt and p.get("seconds_per_image") is not None
                   for p in result.tile_plans):
                continue  # timed at one or two sizes: area scaling gave the times
            timed = {r["resolution"] for r in result.rows if r["model"] == model and r.get("dtype", dt) == dt
                     and r["time_ms_mean"] is not None}
            tag = f" ({dt})" if len(dtypes_of(result)) > 1 else ""
            gaps.append(f"{model}{tag}: {len(timed)} timed resolution{'s' if len(timed) != 1 else ''}")
    return gaps


def reference_gpu(result: StudyResult) -> str | None:
    """The GPU the tile plot is drawn for: the smallest card of the study on which some model has a
    tile that fits (where tiles matter most)."""
    with_tiles = {p["gpu"] for p in result.tile_plans if p["tile_limit_px"] is not None}
    gpus = sorted((g for g in result.config.get("gpus") or [] if g["name"] in with_tiles), key=lambda g: g["vram_bytes"])
    return gpus[0]["name"] if gpus else None


def plot_tile_plans(result: StudyResult) -> bytes:
    """Tiles and estimated seconds per native-resolution image vs megapixels, on the reference GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = reference_gpu(result)
    plans = [p for p in result.tile_plans if p["gpu"] == gpu and p["tile_limit_px"] is not None]
    timed = any(p["seconds_per_image"] is not None for p in plans)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6.5, 4.4), squeeze=False)
    mps = np.linspace(0.5, max([24.0, *(p["megapixels"] for p in plans)]), 96)
    colors = plt.get_cmap("tab10")
    dts = dtypes_of(result)
    multi = len(dts) > 1
    for i, model in enumerate(_models(result)):
        for dt in dts:
            mine = [p for p in plans if p["model"] == model and p.get("dtype", dt) == dt]
            if not mine:
                continue
            p0 = mine[0]
            fit = _fit(subset(result, dt) if multi else result, model, "total", "time_ms_mean")
            counts, secs = [], []
            for mp in mps:
                side = int(round(math.sqrt(mp * 1e6)))
                # The whole image fits when the limit reaches it; the study's rows also check the
                # model accepts that size, which the curve between the sensors does not.
                tile, _, n = square_tiles(side, p0["tile_limit_px"], p0["tile_margin"], p0["tile_align"])
                counts.append(n)
                ms = None if fit is None else fit["beta0"] + fit["beta1"] * tile + fit["beta2"] * tile**2
                secs.append(np.nan if ms is None or ms <= 0 else
                            -(-n // result.config.get("batch_size", 1)) * ms / 1e3)
            label = f"{model} {dt}" if multi else model
            style = DTYPE_STYLES.get(dt, "-.") if multi else "-"
            axes[0][0].step(mps, counts, where="post", color=colors(i), ls=style, label=label)
            axes[0][0].scatter([p["megapixels"] for p in mine], [p["tiles"] for p in mine], color=colors(i), zorder=3)
            if timed:
                axes[0][1].plot(mps, secs, color=colors(i), ls=style, label=label)
                pts = [p for p in mine if p["seconds_per_image"] is not None]
                axes[0][1].scatter([p["megapixels"] for p in pts], [p["seconds_per_image"] for p in pts],
                                   color=colors(i), zorder=3)
    axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel("tiles per image (log scale)")
    axes[0][0].set_title(f"tiles per image with the tile that fits on {gpu}", fontsize=10)
    if timed:
        axes[0][1].set_yscale("log")
        device = "GPU" if result.environment.get("device") == "cuda" else "CPU"
        axes[0][1].set_ylabel(f"estimated s per image on the study's {device} (log)")
        axes[0][1].set_title(f"time per image with those tiles (timed on the study's {device}, not on {gpu})",
                             fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("megapixels (square image at native resolution)")
        for mp in sorted({p["megapixels"] for p in plans}):
            ax.axvline(mp, color="tab:red", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _sensor_for(side: int | None, sensors: list[dict[str, Any]]) -> str:
    if side is None:
        return "–"
    ok = [s for s in sensors if s["side_px"] <= side]
    return f"{max(s['megapixels'] for s in ok):g} MP" if ok else "< 2 MP"


def analytic_limit_text(limit: dict[str, Any]) -> str:
    """``4096``, ``>= 16384`` when the search hit its cap, or ``–`` (nothing fits / not searched)."""
    value = limit.get("max_resolution_analytic")
    if value is None:
        return "–"
    return f">= {value}" if limit.get("capped") else str(value)


def render_markdown(result: StudyResult, images: list[str]) -> str:
    env, cfg = result.environment, result.config
    multi = len(dtypes_of(result)) > 1
    dcol = (lambda e: f"{e.get('dtype', cfg['dtype'])} | ") if multi else (lambda e: "")
    dhead, dsep = ("dtype | ", "---|") if multi else ("", "")
    device = env.get("gpu") or f"CPU ({env.get('processor')}, {env.get('cpu_count')} threads)"
    lines = [
        "# Resolution scalability study",
        "",
        f"Models: {', '.join(cfg['models'])}. Resolutions: {', '.join(map(str, cfg['resolutions']))} px "
        f"(square, batch {cfg['batch_size']}, {cfg['dtype']}). Extrapolated to {cfg['target']} px."
        + (" Precision axis: every table has a dtype column; parameters and activations are stored in that "
           "dtype (autocast would keep fp32 weights)." if multi else ""),
        f"Device: {device}; torch {env['torch']}" + (f", CUDA {env.get('cuda')}" if env.get("cuda") else "") + ".",
    ]
    if cfg.get("timing"):
        kind = "GPU (CUDA events)" if env["device"] == "cuda" else "**CPU timings** (host timer; not GPU numbers)"
        lines.append(f"Runtime: {kind}, warm-up {cfg['warmup']}, repetitions {cfg['repeats']}"
                     + (f", time budget {cfg['time_budget_s']:g} s" if cfg.get("time_budget_s") else "") + ".")
    lines += [
        "",
        "Memory is computed from shapes on PyTorch's `meta` device. *Sum* is the seed's Eq. 1 "
        "(every layer's output added up); *peak* is the most bytes held at once by live tensors, "
        "which is what has to fit on a GPU beside the parameters and inputs.",
        "",
        "## Per component",
        "",
        f"| {dhead}model | component | px | params MiB | act. sum MiB | act. peak MiB | measured peak MiB | ms mean | ms median | ms p95 | n | status |",
        f"|{dsep}---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {dcol(r)}{r['model']} | {r['component']} | {r['resolution']} | {_mib(r['params_bytes'])} | "
            f"{_mib(r['activation_sum_bytes'])} | {_mib(r['activation_peak_bytes'])} | "
            f"{_mib(r['measured_activation_peak_bytes'])} | {_ms(r['time_ms_mean'])} | {_ms(r['time_ms_median'])} | "
            f"{_ms(r['time_ms_p95'])} | {r['time_n']} | {r['status']} |")
    lines += ["", "## Quadratic fits of the model totals (x = side in px)", "",
              f"| {dhead}model | metric | β0 | β1 | β2 | R² | at target |", f"|{dsep}---|---|---:|---:|---:|---:|---:|"]
    for f in result.fits:
        if f["component"] != "total":
            continue
        unit = (lambda v: f"{v / MiB:,.1f} MiB") if f["metric"].endswith("bytes") else (lambda v: f"{v:,.1f} ms")
        lines.append(f"| {dcol(f)}{f['model']} | {f['metric']} | {f['beta0']:.4g} | {f['beta1']:.4g} | {f['beta2']:.4g} | "
                     f"{f['r2']:.4f} | {unit(f['prediction_at_target'])} |")
    if any(f["n"] == 3 for f in result.fits):
        lines += ["", "With three resolutions a quadratic passes through every point (R² = 1 by construction); "
                      "the check below compares the extrapolation with the analytic value at the target."]
    if result.checks:
        lines += ["", "## Extrapolation checked against the analytic pass", "",
                  f"| {dhead}model | metric | px | fitted GiB | analytic GiB | fit error |", f"|{dsep}---|---|---:|---:|---:|---:|"]
        for c in result.checks:
            err = "–" if c["relative_error"] is None else f"{c['relative_error'] * 100:+.1f} %"
            lines.append(f"| {dcol(c)}{c['model']} | {c['metric']} | {c['resolution']} | {c['fitted_bytes'] / 1024**3:,.2f} | "
                         f"{c['analytic_bytes'] / 1024**3:,.2f} | {err} |")
    lines += ["", f"## Largest square resolution per GPU (CUDA context allowance "
                  f"{cfg['cuda_context_bytes'] / MiB:,.0f} MiB)", "",
              f"`analytic`: search on the analytic peak (to {cfg['limit_step']} px), the number to plan with; "
              f"the search stops at {cfg.get('limit_cap', 16384)} px, so `>= N` means the model still fits there "
              "(its true limit is higher); "
              "`peak fit`: the seed's method, quadratic fit of the peak total; `seed sum fit`: fit of the seed's "
              "Eq. 1 total (every activation held at once, so pessimistic). *Sensor*: the largest square camera "
              "sensor that fits, by the first available of these columns.", "",
              f"| {dhead}model | GPU | VRAM GiB | max px (analytic) | sensor | max px (peak fit) | max px (seed sum fit) |",
              f"|{dsep}---|---|---:|---:|---|---:|---:|"]
    for g in result.gpu_limits:
        best = g.get("max_resolution_analytic") or g["max_resolution"]
        lines.append(f"| {dcol(g)}{g['model']} | {g['gpu']} | {g['vram_bytes'] / 1024**3:,.1f} | "
                     f"{analytic_limit_text(g)} | {_sensor_for(best, result.sensors)} | "
                     f"{g['max_resolution'] or '–'} | {g['max_resolution_seed_sum'] or '–'} |")
    lines += ["", "Camera sensors (1:1): " + ", ".join(f"{s['megapixels']:g} MP = {s['side_px']} px" for s in result.sensors), ""]
    lines += _tile_section(result, dhead, dsep, dcol)
    if images:
        lines += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    return "\n".join(lines)


def _tile_section(result: StudyResult, dhead: str, dsep: str, dcol) -> list[str]:
    """The report's section on the tile that fits and the time per native-resolution image."""
    plans = result.tile_plans
    if not plans:
        return []
    cfg = result.config
    sensors = list(dict.fromkeys((p["megapixels"], p["image_side_px"]) for p in plans))
    sources = {p["tile_limit_source"] for p in plans if p["tile_limit_source"]}
    limit = "the analytic limit of the table above" if sources <= {"analytic"} else \
        "the limit from the quadratic fit of the peak (exact limits were off)"
    info = {}
    for p in plans:
        info.setdefault(p["model"], (p["tile_margin"], p["tile_align"]))
    lines = [
        "## Tiles that fit: native-resolution images on each GPU", "",
        f"The *tile that fits* is the largest square tile whose analytic peak at batch {cfg['batch_size']} plus the "
        f"CUDA context allowance fits the GPU ({limit}), capped at the image side: a whole image that fits is one "
        "tile. Tiles overlap by 2 × margin + tile / 8 px rounded up to the model's stride "
        "(`visionscale.tiling.default_overlap`), start at multiples of the stride, and the last one ends at the "
        "border; the count is `visionscale.tiling.tile_count` on a square image of the sensor's side. Margin / "
        "stride from each model's ModelInfo: " + ", ".join(f"{m} {mg} / {al} px" for m, (mg, al) in info.items())
        + ". The estimated time is the number of forward passes (tiles / batch) × the runtime fit of the model "
        f"total at the tile side: **times on {timing_device_text(result)}**; the fit is extrapolated beyond "
        f"{max(cfg['resolutions'])} px, like the one in the fits table. Where fewer than three resolutions were "
        "timed (no quadratic fit), the time per tile is the largest timed resolution's scaled by the pixel count, "
        "(tile / side)², which a convolutional model follows at large sizes; `tile_plans.csv`'s `time_rule` says "
        "which rule gave each time.",
    ]
    gaps = _tile_time_gaps(result)
    if gaps:
        lines += ["", "No estimated time where no resolution was timed ("
                      + ("timing was off" if not cfg.get("timing") else "; ".join(gaps)) + ")."]
    lines += ["", "Planning for a memory budget of your own, with a safety margin for what the analytic pass "
                  "does not see: `visionscale.study.tiles.plan_tiles`.", "",
              f"| {dhead}model | GPU | tile px | " + " | ".join(f"{mp:g} MP ({side} px)" for mp, side in sensors) + " |",
              f"|{dsep}---|---|---:|" + "---|" * len(sensors)]
    keys = list(dict.fromkeys((p.get("dtype"), p["model"], p["gpu"]) for p in plans))
    for key in keys:
        mine = {p["megapixels"]: p for p in plans if (p.get("dtype"), p["model"], p["gpu"]) == key}
        p0 = next(iter(mine.values()))
        tile = "–" if p0["tile_limit_px"] is None else \
            (">= " if p0.get("tile_limit_capped") else "") + str(p0["tile_limit_px"])
        lines.append(f"| {dcol(p0)}{p0['model']} | {p0['gpu']} | {tile} | "
                     + " | ".join(tile_cell(mine[mp]) for mp, _ in sensors) + " |")
    return lines + [""]


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def write_outputs(result: StudyResult, out_dir: str | os.PathLike | OutputDir, plots: bool = True,
                  overwrite: bool = False) -> list[Path]:
    """Write all outputs of a study into ``out_dir`` at once; returns the files written.

    ``out_dir`` may be the :class:`OutputDir` from :func:`output_dir`, made before the study so a
    bad folder fails first. Files of an earlier study there that this one does not write are
    removed; any other files are refused unless ``overwrite``.
    """
    target = out_dir if isinstance(out_dir, OutputDir) else output_dir(out_dir, overwrite)
    files: dict[str, bytes] = {}
    files["results.json"] = json.dumps(result.to_dict(), indent=1, default=_json_default).encode()
    files["rows.csv"] = _csv_bytes(result.rows)
    files["fits.csv"] = _csv_bytes(result.fits)
    files["gpu_limits.csv"] = _csv_bytes(result.gpu_limits)
    files["checks.csv"] = _csv_bytes(result.checks)
    files["totals.csv"] = _csv_bytes(result.totals)
    if result.tile_plans:
        files["tile_plans.csv"] = _csv_bytes(result.tile_plans)
    images: list[str] = []
    if plots:
        dts = dtypes_of(result)
        for dt in dts:
            sub = subset(result, dt) if len(dts) > 1 else result
            for model in _models(sub):
                # The first dtype keeps the single-study name, so default outputs do not change.
                name = f"components_{model}.png" if dt == dts[0] else f"components_{model}_{dt}.png"
                files[name] = plot_model(sub, model)
                images.append(name)
        for metric, name in (("total_peak_bytes", "memory_extrapolated.png"),
                             ("total_sum_bytes", "memory_extrapolated_seed_sum.png"),
                             ("time_ms_mean", "runtime_extrapolated.png")):
            if any(f["component"] == "total" and f["metric"] == metric for f in result.fits):
                files[name] = plot_comparison(result, metric)
                images.append(name)
        if any(p["tile_limit_px"] is not None for p in result.tile_plans):
            files["tile_plans.png"] = plot_tile_plans(result)
            images.append("tile_plans.png")
    files["report.md"] = render_markdown(result, images).encode()
    with target as staging:
        for name, data in files.items():
            try:
                (staging / name).write_bytes(data)
            except OSError as exc:  # a full disk fails in write(), with no file name: name it
                if exc.filename is None and exc.errno is not None:
                    raise OSError(exc.errno, exc.strerror, str(target.target / name)) from exc
                raise
    return [target.target / name for name in files]

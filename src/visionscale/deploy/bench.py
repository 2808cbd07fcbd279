"""``visionscale bench``: latency and throughput per backend x precision x batch, in one run.

Protocol (CONVENTIONS "Measuring"): the same module and the same input for every
combination; warm-up at every shape (it also triggers torch.compile's compilation, whose
time is reported apart as ``setup_seconds`` and never enters latency); then ``repeats``
timed calls (host timer, CUDA synchronised); mean, median and p95 per call; throughput =
batch / median. Ratios are eager-FP32 median over this combination's median at the same
batch (> 1 = faster), so on a noisy shared CPU compare within one run only.

Task-level effect of a backend/precision change, from the outputs on the benchmark input
compared with eager FP32: every output's max abs difference, and by family: anomaly
models, the change of the image score (``pred_score``); classifiers (``(B, K)`` logits),
top-1 agreement; the detector, score (sigmoid) and box-delta differences; embedders
(``(B, D)``), the lowest cosine similarity to the FP32 embedding. Given evaluation data
(``BenchConfig.data``), also the metric a user reports, computed with each timed Runner
(:mod:`visionscale.deploy.tasks`): image AUROC of an anomaly run, a classifier's top-1
accuracy, a detector's COCO AP, an embedder's LFW verification accuracy, and its change
against eager FP32.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from visionscale.study.timing import summarize
from visionscale.runtime.backends import BACKENDS
from visionscale.runtime.errors import BackendUnavailableError, ExportError, RunnerError
from visionscale.runtime.models import default_image_size, in_channels, resolve_model, validate_size
from visionscale.runtime.outputs import OutputSpec, max_differences, tree_map
from visionscale.runtime.precision import parse_precision
from visionscale.runtime.runner import Runner, resolve_device


@dataclass
class BenchConfig:
    model: Any
    backends: tuple[str, ...] = ("eager",)
    precisions: tuple[str, ...] = ("fp32",)
    batches: tuple[int, ...] = (1,)
    image_size: tuple[int, int] | None = None
    device: str = "auto"
    warmup: int | None = None  # default: 20 on CUDA, 2 on the CPU
    repeats: int | None = None  # default: 100 on CUDA, 10 on the CPU
    providers: tuple[str, ...] | None = None
    channels_last: bool = False
    run_dir: str | None = None  # fitted anomaly run folder (the model to time)
    data: str | None = None  # evaluation data: the task metric per combination (deploy/tasks.py)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_backend: str = "inductor"
    # Exactly these (backend, precision) pairs instead of backends x precisions (eager fp32 is
    # always added as the baseline).
    combos: tuple[tuple[str, str], ...] | None = None

    def validate(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise RunnerError(f"backend must be among {', '.join(BACKENDS)}, got {b!r}")
        self.precisions = tuple(parse_precision(p) for p in self.precisions)
        if not self.backends or not self.precisions or not self.batches:
            raise RunnerError("give at least one backend, precision and batch size")
        if self.combos is not None:
            if not self.combos or any(len(c) != 2 or c[0] not in BACKENDS for c in self.combos):
                raise RunnerError(f"combos must be (backend, precision) pairs with backends among {', '.join(BACKENDS)}, "
                                  f"got {self.combos}")
            self.combos = tuple((b, parse_precision(p)) for b, p in self.combos)
            self.backends = tuple(dict.fromkeys(b for b, _ in self.combos))
            self.precisions = tuple(dict.fromkeys(p for _, p in self.combos))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            raise RunnerError(f"batch sizes must be positive integers, got {list(self.batches)}")
        if self.run_dir is not None and self.data is None:
            raise RunnerError("run_dir (an anomaly run) needs its data set (data) for the AUROC per row")


@dataclass
class BenchResult:
    config: dict[str, Any]
    environment: dict[str, Any]
    rows: list[dict[str, Any]]
    task: list[dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int):
    """``warmup`` untimed calls, then ``repeats`` timed ones (ms per call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples, device.type)


def task_effect(ref: Any, got: Any) -> dict[str, Any]:
    """Family-aware comparison of one combination's outputs with eager FP32's."""
    spec = OutputSpec.of(ref)
    diffs = max_differences(ref, got, spec)
    d: dict[str, Any] = {"max_abs": max(v["max_abs"] for v in diffs.values()),
                         "max_rel": max(v["max_rel"] for v in diffs.values()),
                         "outputs": {k: v["max_abs"] for k, v in diffs.items()}}
    # an ONNX Runtime or TensorRT output may sit elsewhere than eager's
    ref, got = (tree_map(lambda t: t.detach().cpu(), o) for o in (ref, got))
    if isinstance(ref, dict) and "pred_score" in ref:
        d["kind"] = "anomaly"
        d["score_max_abs"] = float((ref["pred_score"].float() - got["pred_score"].float()).abs().max())
    elif isinstance(ref, Tensor) and ref.dim() == 2:
        d["kind"] = "logits_or_embedding"
        d["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).float().mean())
        d["min_cosine"] = float(F.cosine_similarity(ref.float(), got.float(), dim=1).min())
    elif isinstance(ref, (tuple, list)) and len(ref) == 2 and ref[0].dim() == 3 and ref[1].dim() == 3:
        # Anchor-based detector: (B, N, classes) logits and (B, N, 4k) regressions, in either
        # order (ssd: cls first; BlazeFace: 16 box+keypoint values first, 1 score second).
        c = 0 if ref[0].shape[-1] <= ref[1].shape[-1] else 1
        d["kind"] = "detector"
        d["score_max_abs"] = float((ref[c].float().sigmoid() - got[c].float().sigmoid()).abs().max())
        d["box_delta_max_abs"] = float((ref[1 - c].float() - got[1 - c].float()).abs().max())
    return d


def _is_run_dir(spec: Any) -> bool:
    return isinstance(spec, (str, Path)) and Path(spec).is_dir() and (Path(spec) / "calibration.json").is_file()


def bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every (backend, precision, batch) of ``cfg``; see the module docstring."""
    say = progress or (lambda _m: None)
    cfg.validate()
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    warmup = cfg.warmup if cfg.warmup is not None else (20 if cuda else 2)
    repeats = cfg.repeats if cfg.repeats is not None else (100 if cuda else 10)
    if warmup < 0 or repeats < 1:
        raise RunnerError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    model_spec = cfg.run_dir if cfg.run_dir is not None else cfg.model
    name, net = resolve_model(model_spec, cfg.image_size, cfg.model_kwargs)
    if cfg.run_dir is not None and not (isinstance(cfg.model, str) and cfg.model == cfg.run_dir):
        name = f"{name} (run {Path(cfg.run_dir).name})"
    size = cfg.image_size or default_image_size(net)
    validate_size(net, name, *size)
    metric = None
    if cfg.data is not None:
        from visionscale.deploy.tasks import task_metric

        say(f"loading {cfg.data}")
        metric = task_metric(net, cfg.data, size, anomaly_run=cfg.run_dir is not None or _is_run_dir(model_spec))
    channels = in_channels(net)
    net = net.float().eval()

    combos = ([(b, parse_precision(p)) for b, p in cfg.combos] if cfg.combos is not None
              else [(b, p) for b in cfg.backends for p in cfg.precisions])
    if ("eager", "fp32") not in combos:
        combos.insert(0, ("eager", "fp32"))  # the baseline every ratio refers to
    gen = torch.Generator().manual_seed(0)
    inputs = {bs: torch.rand(bs, channels, *size, generator=gen) for bs in cfg.batches}
    rows: list[dict[str, Any]] = []
    task: list[dict[str, Any]] = []
    notes: list[str] = []
    baseline_out: dict[int, Any] = {}
    baseline_metric: float | None = None
    for backend, precision in combos:
        key = f"{backend}/{precision}"
        say(f"building {key}")
        t0 = time.perf_counter()
        try:
            runner = Runner(net, backend=backend, precision=precision, device=device,
                            channels_last=cfg.channels_last and backend in ("eager", "compile"),
                            providers=list(cfg.providers) if cfg.providers and backend == "onnxruntime" else None,
                            image_size=size, batch=max(cfg.batches) if max(cfg.batches) > 1 else None,
                            compile_backend=cfg.compile_backend)
        except (BackendUnavailableError, ExportError, RunnerError) as exc:
            for bs in cfg.batches:
                rows.append(dict(backend=backend, precision=precision, batch=bs, status="unavailable", reason=str(exc)))
            notes.append(f"{key}: {exc}")
            continue
        setup_s = time.perf_counter() - t0
        info = runner.info
        for note in info.get("notes", []):
            if note not in notes:
                notes.append(note)
        try:
            for bs in cfg.batches:
                x = inputs[bs].to(device)
                say(f"timing {key} batch {bs}")
                compile_s = runner.warmup(x, runs=0)
                with torch.inference_mode():
                    out = runner(x)
                stats = time_calls(lambda: runner(x), device, warmup, repeats)
                row = dict(backend=backend, precision=precision, batch=bs, status="ok",
                           provider=info.get("provider"), device=str(device),
                           latency_ms_mean=stats.mean_ms, latency_ms_median=stats.median_ms, latency_ms_p95=stats.p95_ms,
                           n=stats.n, per_image_ms=stats.median_ms / bs, throughput_ips=bs * 1e3 / stats.median_ms,
                           setup_seconds=setup_s + (compile_s or 0.0), compile_seconds=compile_s,
                           export_seconds=info.get("export_seconds"))
                rows.append(row)
                if (backend, precision) == ("eager", "fp32"):
                    baseline_out[bs] = out
                else:
                    task.append(dict(backend=backend, precision=precision, batch=bs, **task_effect(baseline_out[bs], out)))
            if metric is not None:
                say(f"{metric.label} {key}")
                with torch.inference_mode():
                    value = metric.evaluate(runner)
                if (backend, precision) == ("eager", "fp32"):
                    baseline_metric = value
                task.append(dict(backend=backend, precision=precision, batch=None, kind=metric.kind,
                                 metric=metric.label, value=value, data=metric.data,
                                 delta=None if value is None or baseline_metric is None else value - baseline_metric))
        except RunnerError as exc:
            rows.append(dict(backend=backend, precision=precision, batch=None, status="error", reason=str(exc)))
            notes.append(f"{key}: {exc}")
        finally:
            runner.close()

    for row in rows:
        base = next((r for r in rows if r["backend"] == "eager" and r["precision"] == "fp32"
                     and r["batch"] == row["batch"] and r["status"] == "ok"), None)
        if row["status"] == "ok" and base is not None:
            row["speedup_vs_eager_fp32"] = base["latency_ms_median"] / row["latency_ms_median"]
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "device": device.type}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if cuda:
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    config = dict(model=name, backends=list(cfg.backends), precisions=list(cfg.precisions),
                  combos=[list(c) for c in combos], batches=list(cfg.batches),
                  image_size=list(size), device=device.type, warmup=warmup, repeats=repeats,
                  providers=list(cfg.providers) if cfg.providers else None, channels_last=cfg.channels_last,
                  run_dir=cfg.run_dir, data=cfg.data)
    return BenchResult(config=config, environment=env, rows=rows, task=task, notes=notes)


def _f(v, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(result: BenchResult) -> str:
    cfg, env = result.config, result.environment
    where = env.get("gpu") or f"CPU ({env.get('processor')}, {env.get('threads')} threads)"
    lines = [f"### `{cfg['model']}` at {cfg['image_size'][0]}x{cfg['image_size'][1]} px", "",
             f"{where}; torch {env['torch']}" + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else "")
             + f"; warm-up {cfg['warmup']}, {cfg['repeats']} timed calls per row"
             + ("" if env["device"] == "cuda" else "; **CPU timings**") + ".", "",
             "| backend | precision | batch | provider | mean ms | median ms | p95 ms | ms/image | images/s | vs eager fp32 | setup s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['precision']} | {r['batch'] or '–'} | {r['status']} | | | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r.get('provider') or '–'} | "
                     f"{_f(r['latency_ms_mean'])} | {_f(r['latency_ms_median'])} | {_f(r['latency_ms_p95'])} | "
                     f"{_f(r['per_image_ms'])} | {_f(r['throughput_ips'], '{:.1f}')} | "
                     f"{_f(r.get('speedup_vs_eager_fp32'), '{:.2f}x')} | {_f(r['setup_seconds'], '{:.1f}')} |")
    if result.task:
        lines += ["", "Task-level effect against eager fp32 (same input):", "",
                  "| backend | precision | batch | max abs diff | family metric |", "|---|---|---:|---:|---|"]
        for t in result.task:
            if "metric" in t:  # task metric on cfg.data
                fmt = "{:.2f}" if t["kind"] == "detection_ap" else "{:.4f}"
                metric = f"{t['metric']} {_f(t['value'], fmt)} (Δ {_f(t['delta'], '{:+' + fmt[2:])})"
                lines.append(f"| {t['backend']} | {t['precision']} | – | – | {metric} |")
                continue
            if t.get("kind") == "anomaly":
                metric = f"image score Δ {t['score_max_abs']:.3g}"
            elif t.get("kind") == "logits_or_embedding":
                metric = f"top-1 agreement {t['top1_agreement']:.3f}, min cosine {t['min_cosine']:.5f}"
            elif t.get("kind") == "detector":
                metric = f"score Δ {t['score_max_abs']:.3g}, box delta Δ {t['box_delta_max_abs']:.3g}"
            else:
                metric = "–"
            lines.append(f"| {t['backend']} | {t['precision']} | {t['batch']} | {t['max_abs']:.3g} | {metric} |")
    if result.notes:
        lines += [""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def write_result(result: BenchResult, out, overwrite: bool = False) -> list[Path]:
    """``bench.json`` and ``bench.md`` into folder ``out``, all at once.

    ``out`` is a folder path or the :class:`~visionscale.io.outputs.OutputDir` made before the
    benchmark (so a folder holding files visionscale did not write fails first, unless
    ``overwrite``); an earlier benchmark's files there are replaced.
    """
    from visionscale.io.outputs import OutputDir

    target = out if isinstance(out, OutputDir) else OutputDir(out, kind="bench", overwrite=overwrite)
    js = json.dumps(result.to_dict(), indent=1, default=lambda o: None if isinstance(o, float) else str(o))
    with target as staging:
        (staging / "bench.json").write_bytes(js.encode())
        (staging / "bench.md").write_bytes(render_markdown(result).encode())
    return [target.target / "bench.json", target.target / "bench.md"]

"""The resolution sweep: analytic memory, measured time and memory, fits and GPU limits.

``run_study(StudyConfig(...))`` is what ``visionscale scale`` calls. It works on any
registered model name and on any ``nn.Module`` (or a factory ``resolution -> nn.Module``)
passed through ``modules=``. The order of work is chosen so bad input fails before
anything expensive runs: names, resolutions and every model's size constraints are
checked first, then the analytic pass (free, on the ``meta`` device), then timing.
"""

from __future__ import annotations

import inspect
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from visionscale.components import Component, State, components_of
from visionscale.errors import InvalidValueError, VisionscaleError, check_finite, check_int
from visionscale.study.fit import QuadraticFit, fit_quadratic
from visionscale.study.gpus import CUDA_CONTEXT_BYTES, GPU, GPUS, SENSORS_MP, TILE_SENSORS_MP, sensor_side
from visionscale.study.memory import MemoryEstimate, estimate_model, parts_totals, to_meta
from visionscale.study.tiles import MIN_TILE, square_tiles
from visionscale.study.timing import TimingStats, is_oom, measure_cuda_memory, time_component
from visionscale.modelinfo import ModelInfo, input_size_problem, model_info
from visionscale.registry import get_model_factory, import_model
from visionscale.runtime.precision import PRECISIONS, PrecisionError, parse_precisions, torch_dtype

# The runtime's precision table (one table for the whole package); the old name stays for imports.
DTYPES = PRECISIONS

# The seed's study: PatchCore-10, EfficientAD-M and DDAD-10 at 256/512/1024 px.
DEFAULT_MODELS = ("patchcore", "efficientad_m", "ddad")
DEFAULT_RESOLUTIONS = (256, 512, 1024)
DEFAULT_TARGET = 3000

ModelSource = nn.Module | Callable[[int], nn.Module]

# The GPU-limit search stops here: a model that still fits at this side length gets the
# limit ">= LIMIT_CAP" (``capped`` in the results), never a made-up number.
LIMIT_CAP = 16384

MEMORY_METRICS = ("params_bytes", "activation_sum_bytes", "activation_peak_bytes", "total_sum_bytes", "total_peak_bytes")


class StudyError(VisionscaleError, ValueError):
    """Bad study input, reported before any work is done."""


@dataclass
class StudyConfig:
    """What to measure. ``None`` for warmup/repeats/time_budget_s means the device default:
    the seed's 100 / 1000 and no budget on CUDA; 1 / 3 and 60 s on the CPU.

    ``dtype`` is the study's precision (the CLI's ``--precision``; the field keeps its name so
    results.json stays as it was): one of ``fp32``, ``fp16``, ``bf16`` (or an alias such as
    ``half``, see :mod:`visionscale.runtime.precision`) or several, comma-separated
    (``"fp32,bf16"``) or as a tuple: the precision axis. Each dtype gets its own rows, fits,
    checks and GPU limits (every entry carries a ``dtype`` field); a time budget is split
    evenly between the dtypes.

    Every field is checked when the config is made (:meth:`validate`): a bad value raises
    :class:`StudyError` naming the field, before any work."""

    models: tuple[str, ...] = DEFAULT_MODELS
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    target: int = DEFAULT_TARGET
    dtype: str | tuple[str, ...] = "fp32"
    device: str = "auto"
    batch_size: int = 1
    in_channels: int = 3
    timing: bool = True
    warmup: int | None = None
    repeats: int | None = None
    time_budget_s: float | None = None
    gpus: tuple[GPU, ...] = GPUS
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    exact_limits: bool = True
    limit_step: int = 32
    limit_cap: int = LIMIT_CAP
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`StudyError` naming the first field with a value the study cannot use."""
        try:
            self._validate()
        except InvalidValueError as exc:
            raise StudyError(str(exc)) from None

    def _validate(self) -> None:
        if isinstance(self.models, str) or not all(isinstance(m, str) and m.strip() for m in self.models):
            raise StudyError(f"models must be a sequence of model names, got {self.models!r}")
        if not self.models:
            raise StudyError("no models given")
        _no_repeats("models", list(self.models))
        if isinstance(self.resolutions, (str, bytes)) or not len(self.resolutions):
            raise StudyError("no resolutions given")
        for r in self.resolutions:
            check_int("resolutions", r, minimum=1)
        # A repeated size would count twice in the fits (and with three sizes, leave too few to fit).
        _no_repeats("resolutions", list(self.resolutions))
        check_int("target", self.target, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("in_channels", self.in_channels, minimum=1)
        if self.warmup is not None:
            check_int("warmup", self.warmup, minimum=0)
        if self.repeats is not None:
            check_int("repeats", self.repeats, minimum=1)
        if self.time_budget_s is not None:
            check_finite("time_budget_s", self.time_budget_s, minimum=0)
        check_int("cuda_context_bytes", self.cuda_context_bytes, minimum=0)
        check_int("limit_step", self.limit_step, minimum=1)
        check_int("limit_cap", self.limit_cap, minimum=self.limit_step)
        try:
            self.dtypes
        except PrecisionError as exc:
            raise StudyError(str(exc)) from None
        if not self.gpus:
            raise StudyError("gpus is empty: give at least one GPU")
        for g in self.gpus:
            check_int(f"vram_bytes of GPU {g.name!r}", g.vram_bytes, minimum=1)

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes of the study as canonical precision names, in the order given, without repeats."""
        return parse_precisions(self.dtype, field="dtype")

    def resolved_device(self) -> torch.device:
        from visionscale.device import resolve_device

        return resolve_device(self.device)


def _no_repeats(name: str, values: list) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise StudyError(f"{name} lists {v!r} more than once; give each once")
        seen.add(v)


@dataclass
class StudyResult:
    config: dict[str, Any]
    environment: dict[str, Any]
    rows: list[dict[str, Any]]
    fits: list[dict[str, Any]]
    gpu_limits: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    totals: list[dict[str, Any]]
    analytic_points: list[dict[str, Any]]
    sensors: list[dict[str, Any]]
    # Per model, GPU, dtype and sensor: the tile that fits and the estimated time per image
    # (see :func:`tile_plan_rows`).
    tile_plans: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _Source:
    """Builds one model at a resolution on a device, whatever the user handed us."""

    def __init__(self, name: str, source: ModelSource | None, kwargs: dict[str, Any]):
        self.name = name
        self.kwargs = kwargs
        if source is None and ":" in name:
            source = import_model(name)  # ModelImportError (a VisionscaleError) names the module
        if source is None:
            self.factory: Callable[..., nn.Module] | None = get_model_factory(name)
            self.module = None
        elif isinstance(source, nn.Module):
            self.factory, self.module = None, source
        elif callable(source):
            self.factory, self.module = source, None
        else:
            raise StudyError(f"model {name!r}: expected an nn.Module or a callable, got {type(source).__name__}")

    def build(self, resolution: int, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
        if self.module is not None:
            if torch.device(device).type == "meta":  # a copy: the user's module stays where it is
                return to_meta(self.module, dtype)
            return self.module.to(device=device, dtype=dtype).eval()
        assert self.factory is not None
        kw = dict(self.kwargs)
        if _accepts(self.factory, "image_size"):
            kw.setdefault("image_size", resolution)
        from visionscale.registry import ModelImportError, build_model

        try:
            with torch.device(device):
                model = build_model(self.factory, self.name, **kw)
        except ModelImportError as exc:
            raise StudyError(str(exc)) from None
        return model.to(device=device, dtype=dtype).eval()


def _validate(model: nn.Module, name: str, resolution: int) -> None:
    problem = input_size_problem(model, resolution, resolution)
    if problem is not None:
        raise StudyError(f"model {name!r} cannot run at {resolution}x{resolution}: {problem}")


def _nearest_supported(model_at: Callable[[int], nn.Module], name: str, target: int, step: int = 1) -> int | None:
    """Smallest size >= target (within 64 px) that the model accepts, for the analytic check."""
    for r in range(target, target + 65, step):
        try:
            _validate(model_at(r), name, r)
            return r
        except StudyError:
            continue
    return None


def _meta_input(cfg: StudyConfig, resolution: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(cfg.batch_size, cfg.in_channels, resolution, resolution, device="meta", dtype=dtype)


def analytic(source: _Source, cfg: StudyConfig, resolution: int) -> tuple[dict[str, MemoryEstimate], list[Component]]:
    """Per-component analytic memory of a model at one square resolution."""
    dtype = torch_dtype(cfg.dtype)
    model = source.build(resolution, "meta", dtype)
    parts = components_of(model)
    return estimate_model(parts, _meta_input(cfg, resolution, dtype)), parts


def _totals_of(estimates: dict[str, MemoryEstimate], parts: list[Component]) -> dict[str, int]:
    return parts_totals(estimates, parts)


def _totals(source: _Source, cfg: StudyConfig, resolution: int) -> dict[str, int]:
    return _totals_of(*analytic(source, cfg, resolution))


def exact_limit(
    source: _Source, cfg: StudyConfig, vram_bytes: int, lo: int, hi: int | None = None,
    cache: dict[int, int | None] | None = None, guess: float | None = None,
) -> int | None:
    """Largest multiple of ``cfg.limit_step`` whose analytic peak (plus the CUDA context)
    fits into ``vram_bytes``, searched with analytic passes up to ``hi`` (default
    ``cfg.limit_cap``). None if ``lo`` does not fit; the largest multiple of the step <= ``hi``
    when even that fits, which is then a lower bound (see :func:`is_capped`).

    Assumes memory grows with resolution, which holds for every conv/attention model;
    sizes the model rejects count as not fitting. The search interpolates on
    ``sqrt(peak)``, nearly linear in the side length, starting from ``guess`` (the fit's
    answer), so it needs a handful of passes rather than a full bisection. ``cache``
    (resolution -> peak bytes) lets the searches for several GPUs share passes.
    """
    step = cfg.limit_step
    hi = cfg.limit_cap if hi is None else hi
    budget = vram_bytes - cfg.cuda_context_bytes
    cache = {} if cache is None else cache

    def peak(k: int) -> int | None:
        r = k * step
        if r not in cache:
            try:
                _validate(source.build(r, "meta", torch_dtype(cfg.dtype)), source.name, r)
                cache[r] = _totals(source, cfg, r)["total_peak_bytes"]
            except (StudyError, ValueError, RuntimeError):
                cache[r] = None
        return cache[r]

    def fits(k: int) -> bool:
        p = peak(k)
        return p is not None and p <= budget

    lo_k, max_k = -(-lo // step), hi // step
    if lo_k < 1 or lo_k > max_k or not fits(lo_k):
        return None
    # Bracket: lo_k fits, hi_k does not (or is the cap and fits).
    hi_k = min(max_k, max(lo_k + 1, round((guess or 2 * lo) / step)))
    while fits(hi_k):
        if hi_k == max_k:
            return max_k * step
        lo_k, hi_k = hi_k, min(max_k, hi_k * 2)
    while hi_k - lo_k > 1:
        p_lo, p_hi = peak(lo_k), peak(hi_k)
        if p_hi is not None and p_lo is not None and p_hi > p_lo:
            frac = (math.sqrt(budget) - math.sqrt(p_lo)) / (math.sqrt(p_hi) - math.sqrt(p_lo))
            mid = lo_k + int(frac * (hi_k - lo_k))
        else:
            mid = (lo_k + hi_k) // 2
        mid = min(max(mid, lo_k + 1), hi_k - 1)
        if fits(mid):
            lo_k = mid
            if mid + 1 < hi_k and not fits(mid + 1):
                hi_k = mid + 1
        else:
            hi_k = mid
            if mid - 1 > lo_k and fits(mid - 1):
                lo_k = mid - 1
    return lo_k * step


def is_capped(cfg: StudyConfig, limit: int | None) -> bool:
    """Whether a limit from :func:`exact_limit` is the search's cap: the model fits at least there."""
    return limit is not None and limit >= (cfg.limit_cap // cfg.limit_step) * cfg.limit_step


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


Progress = Callable[[str], None]


def _timing_defaults(cfg: StudyConfig, device: torch.device) -> tuple[int, int, float | None]:
    cuda = device.type == "cuda"
    warmup = cfg.warmup if cfg.warmup is not None else (100 if cuda else 1)
    repeats = cfg.repeats if cfg.repeats is not None else (1000 if cuda else 3)
    budget = cfg.time_budget_s if cfg.time_budget_s is not None else (None if cuda else 60.0)
    return warmup, repeats, budget


def _measure(
    source: _Source, cfg: StudyConfig, resolution: int, device: torch.device, warmup: int, repeats: int,
    deadline: float | None, label: str,
) -> tuple[dict[str, dict[str, Any]], float]:
    """Time (and on CUDA measure memory of) every component at one resolution.

    Returns per-component measurement fields and the seconds one full pass took.
    """
    dtype = torch_dtype(cfg.dtype)
    model = source.build(resolution, device, dtype)
    parts = components_of(model)
    image = torch.randn(cfg.batch_size, cfg.in_channels, resolution, resolution, device=device, dtype=dtype)
    # One pass in order, keeping the state each component starts from; it doubles as a
    # first warm-up and tells how long a full pass takes (for the CPU time budget).
    states: list[State] = []
    state: State = {"image": image}
    probe_ms: list[float] = []
    t_all = time.perf_counter()
    with torch.inference_mode():
        for part in parts:
            states.append(dict(state))
            t0 = time.perf_counter()
            state.update(part.run(state))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            probe_ms.append((time.perf_counter() - t0) * 1e3 * part.repeats)
            for _ in range(part.repeats - 1):
                state.update(part.run(state))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    pass_s = time.perf_counter() - t_all

    out: dict[str, dict[str, Any]] = {}
    for part, before, first_ms in zip(parts, states, probe_ms):
        fields: dict[str, Any] = {}
        if device.type == "cuda":
            mem = measure_cuda_memory(part, before)
            fields.update(measured_peak_bytes=mem.peak_allocated_bytes,
                          measured_activation_peak_bytes=mem.activation_peak_bytes,
                          measured_reserved_bytes=mem.peak_reserved_bytes)
        reps, wu = repeats, max(warmup - 1, 0)
        if deadline is not None:
            left = deadline - time.perf_counter()
            per_run = first_ms / 1e3
            affordable = int(left / per_run) if per_run > 0 else reps + wu
            if affordable < reps + wu:
                wu = 0
                reps = min(reps, affordable)
        if reps >= 1:
            stats = time_component(part, before, warmup=wu, repeats=reps, label=f"{label}/{part.name}@{resolution}")
        else:  # no time left for more: the probe run is the only sample
            stats = TimingStats(first_ms, first_ms, first_ms, 1, device.type)
        fields.update(time_ms_mean=stats.mean_ms, time_ms_median=stats.median_ms, time_ms_p95=stats.p95_ms,
                      time_n=stats.n, time_device=stats.device)
        out[part.name] = fields
    del model, parts, states, state, image
    return out, pass_s


def run_study(
    cfg: StudyConfig,
    modules: dict[str, ModelSource] | None = None,
    progress: Progress | None = None,
) -> StudyResult:
    """Run the study described by ``cfg``, once per dtype of its precision axis.

    With one dtype this is the single study (``config["dtype"]`` is that dtype). With
    several, the results are concatenated in the order given and every row, fit, check,
    total, GPU limit and analytic point carries its ``dtype``; ``config["dtypes"]`` lists
    them and ``config["dtype"]`` holds the comma-joined names.

    Args: as :func:`_run_single`.
    """
    cfg.validate()  # a config changed after it was made
    dtypes = cfg.dtypes
    if len(dtypes) == 1:
        result = _run_single(replace(cfg, dtype=dtypes[0]), modules, progress)
        result.config["dtypes"] = list(dtypes)
        return result
    say = progress or (lambda _msg: None)
    # Check every dtype's input first (cheap, meta device) so a bad one fails before any timing.
    for d in dtypes:
        _run_single(replace(cfg, dtype=d, timing=False, exact_limits=False, target=cfg.target), modules,
                    None, validate_only=True)
    share = None if cfg.time_budget_s is None else cfg.time_budget_s / len(dtypes)
    parts: list[StudyResult] = []
    for d in dtypes:
        sub = replace(cfg, dtype=d, time_budget_s=share)
        parts.append(_run_single(sub, modules, (lambda m, d=d: say(f"[{d}] {m}"))))
    first = parts[0]
    config = dict(first.config)
    budget = first.config.get("time_budget_s")
    config.update(dtype=",".join(dtypes), dtypes=list(dtypes),
                  time_budget_s=None if budget is None else budget * len(dtypes))
    merged = StudyResult(config=config, environment=first.environment, rows=[], fits=[], gpu_limits=[], checks=[],
                         totals=[], analytic_points=[], sensors=first.sensors)
    for d, part in zip(dtypes, parts):
        for key in ("rows", "fits", "gpu_limits", "checks", "totals", "analytic_points", "tile_plans"):
            getattr(merged, key).extend(getattr(part, key))
    return merged


def _run_single(
    cfg: StudyConfig,
    modules: dict[str, ModelSource] | None = None,
    progress: Progress | None = None,
    validate_only: bool = False,
) -> StudyResult:
    """Run the study described by ``cfg`` for its single dtype.

    Args:
        cfg: What to measure.
        modules: Extra models by name (``nn.Module`` or ``resolution -> nn.Module``);
            when given, ``cfg.models`` may name them as well as registered models.
        progress: Called with a short text before each step (the CLI shows it).
        validate_only: Only check the input (names, sizes, dtype), return an empty result.
    """
    say = progress or (lambda _msg: None)
    modules = modules or {}
    resolutions = tuple(sorted(cfg.resolutions))
    device = cfg.resolved_device()

    # 1. Everything that can be wrong with the input, before any work.
    sources = {n: _Source(n, modules.get(n), cfg.model_kwargs.get(n, {})) for n in cfg.models}
    dtype = torch_dtype(cfg.dtype)
    for name, src in sources.items():
        for r in resolutions:
            _validate(src.build(r, "meta", dtype), name, r)
    warmup, repeats, budget = _timing_defaults(cfg, device)
    if validate_only:
        return StudyResult(config={}, environment={}, rows=[], fits=[], gpu_limits=[], checks=[], totals=[],
                           analytic_points=[], sensors=[])

    rows: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []
    limits: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []  # every analytic pass the GPU-limit search made

    # 2. Analytic memory at every resolution (meta device: no memory, no time).
    totals: dict[str, dict[int, dict[str, int]]] = {}
    for name, src in sources.items():
        totals[name] = {}
        for r in resolutions:
            say(f"analytic memory  {name} @ {r}x{r}")
            estimates, parts = analytic(src, cfg, r)
            totals[name][r] = _totals_of(estimates, parts)
            for part in parts:
                e = estimates[part.name]
                rows.append(dict(
                    model=name, component=part.name, resolution=r, height=r, width=r, batch_size=cfg.batch_size,
                    dtype=cfg.dtype, device=device.type, repeats=part.repeats,
                    params_bytes=e.params_bytes, input_bytes=e.input_bytes,
                    activation_sum_bytes=e.activation_sum_bytes, activation_peak_bytes=e.activation_peak_bytes,
                    total_sum_bytes=e.total_sum_bytes, total_peak_bytes=e.total_peak_bytes,
                    measured_peak_bytes=None, measured_activation_peak_bytes=None, measured_reserved_bytes=None,
                    time_ms_mean=None, time_ms_median=None, time_ms_p95=None, time_n=0, time_device=None,
                    status="analytic",
                ))

    # 3. Measured runtime (and CUDA memory), cheapest first and resolution by resolution
    # across models, so a time budget leaves every model its smallest size measured. The
    # next size's cost is predicted from the last one as growing with side**4 (PatchCore's
    # search and DDAD's attention grow that fast): conservative, so it skips, not overruns.
    if cfg.timing:
        deadline = None if budget is None else time.perf_counter() + budget
        last: dict[str, tuple[int, float]] = {}
        for r in resolutions:
            for name, src in sources.items():
                status, fields = "ok", {}
                need = cfg.cuda_context_bytes + totals[name][r]["total_peak_bytes"]
                over = False
                if device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(device)
                    over = need > free + torch.cuda.memory_reserved(device)
                prev = last.get(name)
                predicted = None if prev is None else prev[1] * (r / prev[0]) ** 4
                if over:
                    status = "over_limit_predicted"
                elif deadline is not None and predicted is not None and time.perf_counter() + predicted > deadline:
                    # (a model's smallest size is always measured, at least by one run)
                    status = "skipped_time_budget"
                else:
                    say(f"timing on {device.type}  {name} @ {r}x{r}")
                    try:
                        fields, pass_s = _measure(src, cfg, r, device, warmup, repeats, deadline, name)
                        last[name] = (r, pass_s)
                    except Exception as exc:  # noqa: BLE001 - only OOM is expected here
                        if not is_oom(exc):
                            raise
                        status = "oom"
                        say(f"out of memory: {name} @ {r}x{r}; recorded as over the limit")
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                for row in rows:
                    if row["model"] == name and row["resolution"] == r:
                        row.update(fields.get(row["component"], {}))
                        row["status"] = status

    # 4. Fits per model, component and metric, and totals per model.
    component_names: dict[str, list[str]] = {}
    for row in rows:
        component_names.setdefault(row["model"], [])
        if row["component"] not in component_names[row["model"]]:
            component_names[row["model"]].append(row["component"])
    fitted: dict[tuple[str, str, str], QuadraticFit] = {}

    def add_fit(model: str, component: str, metric: str, xs: list[int], ys: list[float]) -> None:
        if len(set(xs)) < 3:
            return
        f = fit_quadratic(xs, ys)
        fitted[(model, component, metric)] = f
        fits.append(dict(model=model, component=component, metric=metric, dtype=cfg.dtype, beta0=f.beta0, beta1=f.beta1,
                         beta2=f.beta2, r2=f.r2, n=f.n, x="resolution_px",
                         prediction_at_target=float(f(cfg.target)), target=cfg.target))

    for name in sources:
        for comp in component_names[name]:
            sel = [row for row in rows if row["model"] == name and row["component"] == comp]
            xs = [row["resolution"] for row in sel]
            for metric in MEMORY_METRICS:
                add_fit(name, comp, metric, xs, [row[metric] for row in sel])
            timed = [row for row in sel if row["time_ms_mean"] is not None]
            add_fit(name, comp, "time_ms_mean", [row["resolution"] for row in timed],
                    [row["time_ms_mean"] for row in timed])
        for metric in ("params_bytes", "activation_sum_bytes", "total_sum_bytes", "total_peak_bytes"):
            add_fit(name, "total", metric, list(resolutions), [totals[name][r][metric] for r in resolutions])
        timed_res = [r for r in resolutions if all(
            row["time_ms_mean"] is not None for row in rows if row["model"] == name and row["resolution"] == r)]
        add_fit(name, "total", "time_ms_mean", timed_res, [sum(
            row["time_ms_mean"] for row in rows if row["model"] == name and row["resolution"] == r) for r in timed_res])

    # 5. The fit checked against the analytic pass at the extrapolation target.
    for name, src in sources.items():
        target = _nearest_supported(lambda r, s=src: s.build(r, "meta", dtype), name, cfg.target)
        if target is None:
            continue
        say(f"analytic check   {name} @ {target}x{target}")
        at_target = _totals(src, cfg, target)
        for metric in ("total_sum_bytes", "total_peak_bytes"):
            f = fitted.get((name, "total", metric))
            if f is None:
                continue
            predicted = float(f(target))
            actual = at_target[metric]
            checks.append(dict(model=name, metric=metric, dtype=cfg.dtype, resolution=target, fitted_bytes=predicted,
                               analytic_bytes=actual, relative_error=(predicted - actual) / actual if actual else None))

    # 6. The largest square resolution each model fits into on each GPU, and from it the
    # tile that fits and the tiles (and time) a native-resolution sensor image needs.
    tile_plans: list[dict[str, Any]] = []
    for name, src in sources.items():
        passes: dict[int, int | None] = {}
        floor = resolutions[0]
        info = model_info(src.build(resolutions[0], "meta", dtype))
        time_fit = fitted.get((name, "total", "time_ms_mean")) or _area_scaling(rows, name)
        accepted: dict[int, bool] = {}

        def accepts(side: int, src: _Source = src, accepted: dict[int, bool] = accepted) -> bool:
            if side not in accepted:
                try:
                    accepted[side] = input_size_problem(src.build(side, "meta", dtype), side, side) is None
                except (StudyError, ValueError, RuntimeError):  # a factory that refuses the size itself
                    accepted[side] = False
            return accepted[side]
        for gpu in sorted(cfg.gpus, key=lambda g: g.vram_bytes):
            budget_bytes = gpu.vram_bytes - cfg.cuda_context_bytes
            entry: dict[str, Any] = dict(model=name, gpu=gpu.name, dtype=cfg.dtype, vram_bytes=gpu.vram_bytes,
                                         cuda_context_bytes=cfg.cuda_context_bytes)
            for metric, key in (("total_peak_bytes", "max_resolution"), ("total_sum_bytes", "max_resolution_seed_sum")):
                f = fitted.get((name, "total", metric))
                x = f.solve(budget_bytes) if f is not None else None
                entry[key] = None if x is None else int(math.floor(x))
            if cfg.exact_limits:
                say(f"exact GPU limit  {name} on {gpu.name}")
                found = exact_limit(src, cfg, gpu.vram_bytes, lo=floor, cache=passes, guess=entry["max_resolution"])
                entry["max_resolution_analytic"] = found
                entry["capped"] = is_capped(cfg, found)
                floor = found or floor  # a bigger card holds at least as much
            limits.append(entry)
            tile_limit, tile_source = _tile_limit(src, cfg, gpu, entry, resolutions[0], passes)
            capped = tile_limit is not None and tile_limit == entry.get("max_resolution_analytic") and entry["capped"]
            tile_plans += tile_plan_rows(name, gpu, cfg, tile_limit, tile_source, info, time_fit, device.type, accepts,
                                         capped)
        points += [dict(model=name, dtype=cfg.dtype, resolution=r, total_peak_bytes=b) for r, b in sorted(passes.items()) if b is not None]

    sensors = [dict(megapixels=mp, side_px=sensor_side(mp)) for mp in SENSORS_MP]
    config = asdict(cfg)
    config.update(resolutions=list(resolutions), device=device.type, warmup=warmup if cfg.timing else None,
                  repeats=repeats if cfg.timing else None, time_budget_s=budget if cfg.timing else None,
                  gpus=[asdict(g) for g in cfg.gpus], models=list(cfg.models))
    total_rows = [dict(model=n, dtype=cfg.dtype, resolution=r, **totals[n][r]) for n in sources for r in resolutions]
    return StudyResult(config=config, environment=_environment(device), rows=rows, fits=fits,
                       gpu_limits=limits, checks=checks, totals=total_rows, analytic_points=points,
                       sensors=sensors, tile_plans=tile_plans)


def _tile_limit(source: _Source, cfg: StudyConfig, gpu: GPU, entry: dict[str, Any], smallest: int,
                cache: dict[int, int | None]) -> tuple[int | None, str | None]:
    """The largest square tile that fits ``gpu`` at the study's batch, and where it comes from.

    With exact limits it is the analytic limit of the GPU table (``"analytic"``), searched
    further down to :data:`~visionscale.study.tiles.MIN_TILE` px when not even the study's
    smallest resolution fits; without, the quadratic fit's limit rounded down to the limit
    step (``"peak fit"``). ``(None, None)`` when no tile fits.
    """
    if cfg.exact_limits:
        found = entry.get("max_resolution_analytic")
        if found is None and smallest > MIN_TILE:
            found = exact_limit(source, cfg, gpu.vram_bytes, lo=MIN_TILE, hi=smallest - 1, cache=cache)
        return found, ("analytic" if found is not None else None)
    fitted = entry.get("max_resolution")
    if fitted is None or fitted < cfg.limit_step:
        return None, None
    return fitted // cfg.limit_step * cfg.limit_step, "peak fit"


class AreaScaling:
    """Runtime at side ``x`` as ``ms * (x / side) ** 2``: the largest timed resolution's time scaled
    by the pixel count, which a convolutional model follows once its layers are large. Used for
    the tile plans when fewer than three resolutions were timed (no quadratic fit)."""

    def __init__(self, side: int, ms: float):
        self.side, self.ms = side, ms

    def __call__(self, x: float) -> float:
        return self.ms * (float(x) / self.side) ** 2

    @property
    def rule(self) -> str:
        return f"area scaling from {self.side} px"


def _area_scaling(rows: list[dict[str, Any]], name: str) -> AreaScaling | None:
    """:class:`AreaScaling` from the largest resolution at which every component of ``name`` was timed."""
    by_res: dict[int, list] = {}
    for row in rows:
        if row["model"] == name:
            by_res.setdefault(row["resolution"], []).append(row["time_ms_mean"])
    timed = [r for r, ms in by_res.items() if ms and all(v is not None for v in ms)]
    if not timed:
        return None
    r = max(timed)
    return AreaScaling(r, float(sum(by_res[r])))


def tile_plan_rows(
    name: str, gpu: GPU, cfg: StudyConfig, tile_limit: int | None, tile_source: str | None, info: ModelInfo,
    time_fit: QuadraticFit | AreaScaling | None, time_device: str, accepts: Callable[[int], bool], capped: bool = False,
) -> list[dict[str, Any]]:
    """One row per sensor of :data:`~visionscale.study.gpus.TILE_SENSORS_MP`: how a square image of
    that many megapixels runs at native resolution on ``gpu`` with the tile that fits.

    The *tile that fits* is ``tile_limit``, the largest square tile whose analytic peak plus the
    CUDA context allowance fits the GPU, capped at the image side: a whole image that fits (and
    that the model accepts at its size) is one tile. Otherwise tiles overlap by
    :func:`~visionscale.tiling.default_overlap` (``2 * tile_margin + tile / 8`` rounded up to
    ``tile_align``, both from the model's ModelInfo) and are counted by
    :func:`~visionscale.tiling.tile_count` (:func:`~visionscale.study.tiles.square_tiles`).
    ``seconds_per_image`` is the number of forward passes, ``ceil(tiles / batch_size)`` (``tiles``
    at the default batch of 1), times the model total's runtime fit at the tile side
    (``ms_per_tile``; the fit is of a whole forward at the study's batch size): times on
    ``time_device``, the device that ran the study, not on ``gpu``. With fewer than three timed
    resolutions there is no fit, and ``time_fit`` is an :class:`AreaScaling` of the largest timed
    one (``time_rule`` says which). None with timing off or where the fit is not positive.
    ``tile_limit_capped``: the limit is the search's cap (the model fits at least there).
    """
    rows = []
    for mp in TILE_SENSORS_MP:
        side = sensor_side(mp)
        row: dict[str, Any] = dict(
            model=name, gpu=gpu.name, dtype=cfg.dtype, vram_bytes=gpu.vram_bytes, cuda_context_bytes=cfg.cuda_context_bytes,
            megapixels=mp, image_side_px=side, tile_limit_px=tile_limit, tile_limit_source=tile_source,
            tile_limit_capped=bool(capped),
            tile_align=info.tile_align, tile_margin=info.tile_margin, tile_px=None, overlap_px=None, tiles=None,
            whole_image=None, ms_per_tile=None, seconds_per_image=None, time_device=None, time_rule=None)
        limit = tile_limit
        if limit is not None and limit >= side and not accepts(side):
            # The model does not take the image at its own size: tile it with the largest step multiple below.
            limit = side // cfg.limit_step * cfg.limit_step or None
        if limit is not None:
            tile, overlap, count = square_tiles(side, limit, info.tile_margin, info.tile_align)
            ms = float(time_fit(tile)) if time_fit is not None else None
            ms = ms if ms is not None and ms > 0 else None
            row.update(tile_px=tile, overlap_px=overlap, tiles=count, whole_image=count == 1, ms_per_tile=ms,
                       seconds_per_image=None if ms is None else -(-count // cfg.batch_size) * ms / 1e3,
                       time_device=time_device if ms is not None else None,
                       time_rule=None if ms is None else getattr(time_fit, "rule", "quadratic runtime fit"))
        rows.append(row)
    return rows

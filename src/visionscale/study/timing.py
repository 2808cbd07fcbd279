"""Runtime and measured memory of one component on a real device.

GPU protocol (seed 000 and CONVENTIONS "Measuring"): warm-up at every resolution (cuDNN
autotunes per shape), then CUDA events around each run inside an NVTX range named
``model/component@HxW`` so an Nsight Systems trace shows the same parts; peak memory from
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU, host
timers, and the results are labelled as CPU timings.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from visionscale.components import Component, State


@dataclass
class TimingStats:
    """Per-run milliseconds of one component (already multiplied by its ``repeats``)."""

    mean_ms: float
    median_ms: float
    p95_ms: float
    n: int
    device: str


@dataclass
class MeasuredMemory:
    """CUDA allocator numbers for one run of one component."""

    peak_allocated_bytes: int  # absolute, includes everything resident (whole model, state)
    activation_peak_bytes: int  # peak minus what was allocated before the run
    peak_reserved_bytes: int


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples_ms: list[float], device: str) -> TimingStats:
    return TimingStats(
        mean_ms=statistics.fmean(samples_ms),
        median_ms=statistics.median(samples_ms),
        p95_ms=percentile(samples_ms, 95),
        n=len(samples_ms),
        device=device,
    )


@contextmanager
def nvtx_range(name: str, enabled: bool):
    if enabled:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if enabled:
            torch.cuda.nvtx.range_pop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_component(
    part: Component,
    state: State,
    *,
    warmup: int,
    repeats: int,
    label: str = "",
) -> TimingStats:
    """Time ``part.run(state)``: ``warmup`` untimed runs, then ``repeats`` timed ones.

    Times are per image: one run of the part times ``part.repeats``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = next((t.device for t in state.values()), torch.device("cpu"))
    cuda = device.type == "cuda"
    samples: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            part.run(state)
        _sync(device)
        for _ in range(repeats):
            with nvtx_range(label or part.name, cuda):
                if cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    part.run(state)
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    part.run(state)
                    ms = (time.perf_counter() - t0) * 1e3
            samples.append(ms * part.repeats)
    return summarize(samples, "cuda" if cuda else "cpu")


def measure_cuda_memory(part: Component, state: State) -> MeasuredMemory:
    """Peak CUDA memory of one run of ``part`` (state and module already on the GPU)."""
    device = next(t.device for t in state.values())
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        part.run(state)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return MeasuredMemory(
        peak_allocated_bytes=peak,
        activation_peak_bytes=peak - before,
        peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
    )


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors from CUDA, the CPU allocator or Python."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    # CUDA: "CUDA out of memory"; CPU allocator: "DefaultCPUAllocator: can't allocate memory".
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)

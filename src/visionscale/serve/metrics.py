"""Prometheus text-format metrics, kept by hand (no client library): request counts by endpoint
and status, a latency histogram per endpoint, batch sizes per model, queue depth and the
process's resident memory.

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (text format 0.0.4).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

__all__ = ["Metrics", "LATENCY_BUCKETS", "BATCH_BUCKETS", "rss_bytes", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets + (float("inf"),), self.counts):
            cum += c
            le = "+Inf" if b == float("inf") else f"{b:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cum}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {self.sum:.6f}")
        out.append(f"{name}_count{lab} {self.n}")
        return out


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters and histograms; :meth:`render` gives the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.batches: dict[str, _Histogram] = {}
        self.queue_depth: dict[str, callable] = {}

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, method, status)] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, model: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault(model, _Histogram(BATCH_BUCKETS)).observe(size)

    def count(self, status_class: str) -> int:
        """Requests answered so far with a status of this class (``"5xx"``...)."""
        with self._lock:
            return sum(n for (_, _, s), n in self.requests.items() if f"{s // 100}xx" == status_class)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP visionscale_http_requests_total HTTP requests answered, by endpoint, method and status.",
                     "# TYPE visionscale_http_requests_total counter"]
            for (ep, m, s), n in sorted(self.requests.items()):
                lines.append(f'visionscale_http_requests_total{{endpoint="{_esc(ep)}",method="{m}",status="{s}"}} {n}')
            lines += ["# HELP visionscale_http_request_duration_seconds Time from request to response, by endpoint.",
                      "# TYPE visionscale_http_request_duration_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                lines += h.lines("visionscale_http_request_duration_seconds", f'endpoint="{_esc(ep)}"')
            lines += ["# HELP visionscale_batch_size Requests run together in one model call, by model queue.",
                      "# TYPE visionscale_batch_size histogram"]
            for model, h in sorted(self.batches.items()):
                lines += h.lines("visionscale_batch_size", f'model="{_esc(model)}"')
            depth = dict(self.queue_depth)
        lines += ["# HELP visionscale_queue_depth Requests waiting for their model.", "# TYPE visionscale_queue_depth gauge"]
        for model, fn in sorted(depth.items()):
            lines.append(f'visionscale_queue_depth{{model="{_esc(model)}"}} {fn()}')
        rss = rss_bytes()
        if rss is not None:
            lines += ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
                      "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]
        return "\n".join(lines) + "\n"

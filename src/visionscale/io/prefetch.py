"""Parallel decoding with bounded memory: :func:`ordered_map` applies a function to items in a
thread pool and yields the results in input order.

Threads, not processes: Pillow, tifffile, OpenCV, zlib and torch release the GIL while they
decode, resize and compute, so a few threads keep several cores busy without pickling images
between processes.

API::

    ordered_map(fn, items, workers, lookahead=None, *, return_exceptions=False) -> Iterator

* ``workers`` <= 1 runs ``fn`` inline in the caller's thread, one item at a time, when the
  next result is asked for (no threads at all: the reference behaviour).
* ``workers`` >= 2: at most ``lookahead`` items (default ``2 * workers``) are *in flight*,
  submitted to the pool or finished but not yet taken by the caller, and the result the caller
  is holding counts among them; the next item is submitted only after the caller took one.
  Memory is therefore bounded by ``lookahead`` results, however long ``items`` is, and
  ``items`` is consumed lazily (a generator of a million paths is fine).
* Errors: by default the exception ``fn`` raised for item ``i`` is raised by the generator
  when result ``i`` would have been yielded, after results ``0 .. i-1``, exactly where the
  inline loop would raise it; items after ``i`` that were already in flight are discarded
  and the pool is shut down. With ``return_exceptions=True`` the exception (an
  ``Exception``, never ``KeyboardInterrupt``) is *yielded* in place of the result and the
  map goes on, so a caller can skip a bad file: pair results with items by ``zip`` when
  ``items`` is a sequence.
* Closing the generator early (``break``, garbage collection) cancels the items not yet
  started and waits for the running ones, so no thread outlives it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from visionscale.errors import check_int

__all__ = ["ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, lookahead: int | None = None, *,
                return_exceptions: bool = False) -> Iterator[R | Exception]:
    """``fn(item)`` for each item, computed by ``workers`` threads, yielded in input order.

    Args:
        fn: Called once per item, from a pool thread (``workers`` >= 2) or inline.
        items: Any iterable; consumed lazily, at most ``lookahead`` items ahead of the caller.
        workers: Threads; 0 or 1 runs inline without threads.
        lookahead: Most results in flight (submitted, running, done but not yet taken, or held
            by the caller); default ``2 * workers``; ignored inline (1 by construction).
        return_exceptions: Yield an ``Exception`` raised by ``fn`` in place of its result
            instead of raising it.

    Yields:
        ``fn(item)`` (or the exception it raised, with ``return_exceptions``), in input order.

    Raises:
        InvalidValueError: ``workers`` < 0 or ``lookahead`` < 1 (raised at the first ``next``).
        Exception: Whatever ``fn`` raised for the first failing item, at its position.
    """
    check_int("workers", workers, minimum=0)
    if lookahead is not None:
        check_int("lookahead", lookahead, minimum=1)
    if workers <= 1:
        yield from _inline(fn, items, return_exceptions)
        return
    limit = lookahead if lookahead is not None else 2 * workers
    source = iter(items)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="visionscale-prefetch")
    try:
        exhausted = _fill(pool, fn, source, pending, limit)
        while pending:
            fut = pending.popleft()
            exc = fut.exception()  # waits for it
            if exc is None:
                value = fut.result()
            elif return_exceptions and isinstance(exc, Exception):
                value = exc
            else:
                raise exc
            del fut
            # The caller now holds `value`: it counts as in flight until the next call, so
            # the pool is topped up to `limit` only after the caller comes back for more.
            yield value
            del value
            if not exhausted:
                exhausted = _fill(pool, fn, source, pending, limit)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _fill(pool: ThreadPoolExecutor, fn, source: Iterator, pending: deque, limit: int) -> bool:
    """Submit items until ``limit`` are pending; True when ``source`` is exhausted."""
    while len(pending) < limit:
        try:
            item = next(source)
        except StopIteration:
            return True
        pending.append(pool.submit(fn, item))
    return False


def _inline(fn, items: Iterable, return_exceptions: bool) -> Iterator:
    for item in items:
        if not return_exceptions:
            yield fn(item)
            continue
        try:
            value = fn(item)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, as the threaded path does
            value = exc
        yield value

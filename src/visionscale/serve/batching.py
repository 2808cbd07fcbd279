"""Dynamic batching: concurrent requests to one model are gathered and run in one call.

A :class:`Batcher` holds a queue in the event loop. Its collector takes the first waiting
request, then waits at most ``max_wait_s`` for more, up to ``max_batch``, and runs the whole
batch in the model's own worker thread (one thread per model: the model and, for faces, the
SQLite gallery connection are only ever used from that thread, which also serialises gallery
writes). While a batch runs, new requests queue up, so under load batches fill by themselves
and ``max_wait_s`` only matters when the model is idle.

A request that waits longer than its timeout is answered 504 and dropped from the queue if it
has not started; a full queue answers 503 at once (back-pressure, instead of unbounded
memory and latency).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from visionscale.serve.errors import ApiError

__all__ = ["Batcher"]

log = logging.getLogger(__name__)


class Batcher:
    """Gathers items for ``fn(items) -> results`` (one result, or an Exception, per item).

    Args:
        name: The model queue's name (metrics label).
        fn: Runs in ``executor``; returns a list as long as its input.
        executor: The model's single worker thread.
        max_batch: Most items per call.
        max_wait_s: Longest wait for more items after the first one.
        max_queue: Most items waiting; more are refused with 503.
        on_batch: Called with each batch size (metrics).
    """

    def __init__(self, name: str, fn: Callable[[list], Sequence], executor: Executor, *, max_batch: int = 8,
                 max_wait_s: float = 0.002, max_queue: int = 256, on_batch: Callable[[int], None] | None = None):
        self.name = name
        self.fn = fn
        self.executor = executor
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.max_queue = max(1, int(max_queue))
        self.on_batch = on_batch
        self._items: collections.deque = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        for _, fut in self._items:
            if not fut.done():
                fut.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))
        self._items.clear()

    async def submit(self, item, timeout_s: float):
        """The result for ``item``; raises what ``fn`` gave for it, or :class:`ApiError` 503/504."""
        if self._task is None or self._task.done():
            raise ApiError(503, "not_ready", f"the {self.name} model is not running")
        if len(self._items) >= self.max_queue:
            raise ApiError(503, "overloaded", f"{len(self._items)} requests are waiting for the {self.name} model; "
                                              f"retry later")
        fut = asyncio.get_running_loop().create_future()
        self._items.append((item, fut))
        self._arrived.set()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer from the {self.name} model within {timeout_s:g} s") from None

    async def _next_batch(self) -> list:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._items.popleft()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if self._items:
                batch.append(self._items.popleft())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:  # waiting on an Event never loses an item, unlike wait_for(queue.get())
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return [(item, fut) for item, fut in batch if not fut.done()]  # timed out while queued: dropped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - answered per request, the loop keeps serving
                log.exception("batch of %d for %s failed", len(batch), self.name)
                results = [exc] * len(batch)
            for (_, fut), r in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

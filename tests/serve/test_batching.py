"""Dynamic batching without HTTP: what gets gathered, timeouts, back-pressure, per-item errors."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from visionscale.serve.batching import Batcher
from visionscale.serve.errors import ApiError


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_items_run_in_one_call_up_to_max_batch():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [i * 10 for i in items]

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher("m", fn, ex, max_batch=4, max_wait_s=5.0)  # long wait: full batches close it, not time
            b.start()
            got = await asyncio.gather(*(b.submit(i, 10) for i in range(8)))
            await b.stop()
        return got

    assert _run(main()) == [i * 10 for i in range(8)]
    assert [len(c) for c in calls] == [4, 4]  # 8 waiting at once: two full batches, nothing run alone
    assert sorted(sum(calls, [])) == list(range(8))


def test_per_item_errors_reach_only_their_request():
    def fn(items):
        return [ValueError(f"bad {i}") if i == 2 else i for i in items]

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher("m", fn, ex, max_batch=8, max_wait_s=1.0)
            b.start()
            got = await asyncio.gather(*(b.submit(i, 10) for i in range(4)), return_exceptions=True)
            await b.stop()
        return got

    got = _run(main())
    assert got[:2] == [0, 1] and got[3] == 3
    assert isinstance(got[2], ValueError) and str(got[2]) == "bad 2"


def test_a_failing_call_fails_its_batch_and_the_next_batch_still_runs():
    state = {"n": 0}

    def fn(items):
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("boom")
        return list(items)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher("m", fn, ex, max_batch=8, max_wait_s=0.0)
            b.start()
            with pytest.raises(RuntimeError, match="boom"):
                await b.submit(1, 10)
            ok = await b.submit(2, 10)
            await b.stop()
        return ok

    assert _run(main()) == 2


def test_timeout_gives_504_and_a_full_queue_503():
    release = threading.Event()

    def slow(items):
        release.wait(10)
        return list(items)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher("m", slow, ex, max_batch=1, max_wait_s=0.0, max_queue=1)
            b.start()
            first = asyncio.ensure_future(b.submit(1, 10))  # runs, blocked in slow()
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(b.submit(2, 0.1))  # queued; times out
            await asyncio.sleep(0)
            with pytest.raises(ApiError) as full:
                await b.submit(3, 10)  # the queue holds one already
            with pytest.raises(ApiError) as late:
                await second
            release.set()
            assert await first == 1
            await b.stop()
        return full.value, late.value

    full, late = _run(main())
    assert (full.status, full.code) == (503, "overloaded")
    assert (late.status, late.code) == (504, "timeout")

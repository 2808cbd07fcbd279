"""visionscale.io.prefetch.ordered_map: input order, bounded look-ahead, errors at their item."""

from __future__ import annotations

import random
import threading
import time

import pytest

from visionscale.errors import InvalidValueError
from visionscale.io.prefetch import ordered_map


def _jittered(x: int) -> int:
    # Later items often finish first, so an unordered map would be caught.
    time.sleep(random.Random(x).uniform(0, 0.004))
    return x * x


@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_results_come_in_input_order(workers):
    assert list(ordered_map(_jittered, range(40), workers)) == [x * x for x in range(40)]


def test_threaded_equals_inline_and_items_are_consumed_lazily():
    inline = list(ordered_map(_jittered, iter(range(25)), 0))
    threaded = list(ordered_map(_jittered, iter(range(25)), 3, lookahead=5))
    assert threaded == inline
    # An endless generator works: only what the caller asks for (plus the look-ahead) is read.
    taken = []

    def endless():
        n = 0
        while True:
            taken.append(n)
            yield n
            n += 1

    gen = ordered_map(lambda x: x + 1, endless(), 2, lookahead=3)
    assert [next(gen) for _ in range(5)] == [1, 2, 3, 4, 5]
    gen.close()
    assert len(taken) <= 5 + 3


@pytest.mark.parametrize("workers,lookahead", [(2, None), (3, 2), (4, 6), (2, 1)])
def test_at_most_lookahead_results_are_in_flight(workers, lookahead):
    limit = lookahead if lookahead is not None else 2 * workers
    lock = threading.Lock()
    started: set[int] = set()
    consumed: set[int] = set()
    worst = [0]

    def fn(x):
        with lock:
            started.add(x)
            # In flight: fn called for it, and the caller has not moved past it yet.
            worst[0] = max(worst[0], len(started - consumed))
        time.sleep(0.001)
        return x

    for x in ordered_map(fn, range(30), workers, lookahead):
        time.sleep(0.002)  # a slow consumer: the pool would run ahead if nothing stopped it
        with lock:
            # The value we hold still counts; it is released when we ask for the next one.
            worst[0] = max(worst[0], len(started - consumed))
            consumed.add(x)
    assert started == set(range(30))
    assert 1 <= worst[0] <= limit


class Bad(Exception):
    pass


def _fails_on_3(x):
    if x == 3:
        raise Bad(f"item {x}")
    return x


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_an_error_is_raised_at_its_item(workers):
    got = []
    with pytest.raises(Bad, match="item 3"):
        for v in ordered_map(_fails_on_3, range(10), workers):
            got.append(v)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_return_exceptions_yields_the_error_in_place_and_goes_on(workers):
    out = list(ordered_map(_fails_on_3, range(8), workers, return_exceptions=True))
    assert [type(v) for v in out] == [int, int, int, Bad, int, int, int, int]
    assert [v for v in out if not isinstance(v, Exception)] == [0, 1, 2, 4, 5, 6, 7]


def test_threads_are_used_and_released():
    names = set()

    def fn(x):
        names.add(threading.current_thread().name)
        time.sleep(0.002)
        return x

    before = threading.active_count()
    assert list(ordered_map(fn, range(12), 3)) == list(range(12))
    assert any(n.startswith("visionscale-prefetch") for n in names)
    names.clear()
    list(ordered_map(fn, range(3), 1))
    assert names == {threading.current_thread().name}  # inline: the caller's thread only
    gen = ordered_map(fn, range(100), 3)
    next(gen)
    gen.close()  # an early stop waits for the running items and leaves no thread behind
    assert threading.active_count() == before


def test_bad_arguments():
    with pytest.raises(InvalidValueError, match="workers"):
        next(ordered_map(abs, [1], -1))
    with pytest.raises(InvalidValueError, match="lookahead"):
        next(ordered_map(abs, [1], 2, lookahead=0))

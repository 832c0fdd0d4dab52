"""The read-ahead thread of a replay: order, errors, early stop, bounded memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from dynoai_daemon.logs.prefetch import Prefetch


def test_items_arrive_in_order() -> None:
    assert list(Prefetch(range(1000), depth=3)) == list(range(1000))


def test_reader_error_reaches_the_consumer_after_the_good_items() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("bad line 3")

    got: list[int] = []
    with pytest.raises(ValueError, match="bad line 3"):
        for x in Prefetch(source()):
            got.append(x)
    assert got == [1, 2]


def test_stopping_early_ends_the_thread_and_reads_at_most_depth_ahead() -> None:
    produced: list[int] = []
    ahead = threading.Event()

    def source() -> Iterator[int]:
        for i in range(10_000):
            produced.append(i)
            if i == 3:
                ahead.set()
            yield i

    p = Prefetch(source(), depth=2)
    it = iter(p)
    assert next(it) == 0
    # The reader runs ahead until the queue is full: 1, 2 queued and 3 waiting to be put.
    assert ahead.wait(5.0)
    assert len(produced) <= 1 + 2 + 1  # an unbounded reader would be thousands ahead
    it.close()  # the generator's finally closes the Prefetch
    assert not p._thread.is_alive()

"""Read ahead: run a reader's iterator in a thread, a bounded number of chunks ahead.

A replay parses with pyarrow, which releases the GIL while it reads and converts, and
then feeds the core, which is numpy work on the calling thread. Running the reader one or
two chunks ahead in its own thread overlaps the two on the machine's second core instead
of leaving it idle. The queue is bounded, so memory stays at ``depth`` chunks however
long the log is; an exception in the reader is re-raised in the consumer at the point
where its chunk would have come; closing the consumer early (``break``, an error) stops
the thread at its next chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar, cast

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetch(Generic[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead.

    Use as an iterator; call :meth:`close` (or use ``with``) when stopping early.
    """

    def __init__(self, source: Iterable[T], *, depth: int = 2, name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, never lost in the thread
            self._put(_Failure(exc))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                item = self._q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield cast(T, item)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader thread and wait for it."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Prefetch"]

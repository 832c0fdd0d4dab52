"""The driver contract every protocol module follows (docs/architecture.md, "Conventions").

A driver is built with keyword-only options and does no I/O in its constructor.
``await open()`` acquires the port/bus/socket, ``await close()`` releases it (idempotent),
and ``samples()`` is an async iterator of sample batches that ends after ``close()``.
Drivers that own a physical link use :meth:`Driver.run_with_reconnect` so that a vanished
USB adapter, bus or socket is retried with capped exponential backoff plus jitter while the
rest of the daemon keeps running; availability changes are reported through
``on_availability`` and counted in :class:`DriverStats`.

Error policy (the same for every driver): content the codec cannot make sense of, even
an exception raised inside a codec, is a decode error (counted, the decoder resyncs,
reading goes on); a failure of the link itself (open refused, read error, EOF, hang-up)
closes it and reopens it after a :class:`~dynoai_daemon.backoff.Backoff` wait that grows
while the link keeps failing and resets only after it stayed up for a healthy period.
Every failure reaches ``on_availability`` with its reason the first time and whenever
the reason changes, and the last one is kept in ``stats.last_error``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from dynoai_daemon.backoff import Backoff, RetryState
from dynoai_daemon.channels import Sample, screen_samples
from dynoai_daemon.errors import DriverError, DriverOperationError, InputError

AvailabilityCallback = Callable[[str, bool, str], None]
"""Called as ``cb(source_name, online, reason)`` when a source comes or goes."""


@dataclass
class DriverStats:
    """Counters a driver keeps for the health topic."""

    messages: int = 0
    bad_frames: int = 0
    skipped_bytes: int = 0
    reconnects: int = 0
    drops: int = 0
    samples: int = 0
    last_seen: float | None = None  # monotonic seconds of the last good message
    online: bool = False
    last_error: str | None = None  # why the link last failed or would not open
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the counters as a JSON-ready dict."""
        return asdict(self)


class Driver(abc.ABC):
    """Base class of all drivers.

    Subclasses set ``name`` (registry name) and ``kind`` (``"serial"``, ``"can"`` or
    ``"udp"``) and implement :meth:`_open`, :meth:`_close` and :meth:`_read`.

    Args:
        source: the configured source name, stamped on every Sample.
        channel_map: overrides of the driver's default channel names
            (protocol name -> canonical channel).
        on_availability: callback for online/offline changes.
        clock: monotonic clock in seconds (injectable for tests and simulators).
        reconnect: keep retrying after the link fails (False: raise instead).
        backoff: the retry schedule.
        queue_size: bound of the internal batch queue; live data drops oldest when full.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __init__(
        self,
        *,
        source: str = "",
        channel_map: Mapping[str, str] | None = None,
        on_availability: AvailabilityCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        queue_size: int = 1024,
    ) -> None:
        self.source = source or self.name
        self.channel_map: dict[str, str] = dict(channel_map or {})
        self.on_availability = on_availability
        self.clock = clock
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.stats = DriverStats()
        #: channel -> values dropped as physically implausible (see :meth:`screen`)
        self.implausible: dict[str, int] = {}
        self._queue: asyncio.Queue[list[Sample] | BaseException | None] | None = None
        self._queue_size = queue_size
        self._task: asyncio.Task[None] | None = None
        self._closed = True
        self._opened_once = False
        self._reason: str | None = None
        self.retry = RetryState(self.backoff)

    # --- public API -------------------------------------------------------------------

    async def open(self) -> None:
        """Open the link and start reading in the background.

        Raises:
            DriverOpenError: the first open failed and ``reconnect`` is False.
        """
        if not self._closed:
            return
        self._closed = False
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        if not self.reconnect:
            await self._open()
            self._set_online(True, "opened")
        self._task = asyncio.create_task(self._pump(), name=f"driver:{self.source}")

    async def close(self) -> None:
        """Stop reading and release the link; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            await self._close()
        self._set_online(False, "closed")
        if self._queue is not None:
            self._put_nowait(None)

    async def __aenter__(self) -> Driver:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def samples(self) -> AsyncIterator[list[Sample]]:
        """Yield batches of samples as they arrive; ends after :meth:`close`.

        Raises:
            DriverError: the link failed and ``reconnect`` is False.
        """
        if self._queue is None:
            raise DriverError(f"{self.source}: samples() before open()")
        q = self._queue
        while True:
            item = await q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    @classmethod
    def decode_capture(
        cls, capture: str | Path, /, **options: Any
    ) -> tuple[list[Sample], DriverStats]:
        """Decode a recorded capture offline with this driver's codec (``dynoai decode``).

        The serial, CAN and JetDrive bases override it; a driver without a capture format
        keeps this one.

        Raises:
            InputError: always, naming the driver.
        """
        raise InputError(f"driver {cls.name!r} cannot decode captures")

    def map_channel(self, name: str) -> str:
        """Return the channel name for protocol name ``name`` after the user's overrides."""
        return self.channel_map.get(name, name)

    # --- for subclasses ---------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None:
        """Acquire the port, bus or socket (raise DriverOpenError on failure)."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Release the link; must tolerate a half-open state."""

    @abc.abstractmethod
    async def _read(self) -> None:
        """Read until the link fails (raise DriverOperationError) or is cancelled.

        Call :meth:`emit` with each decoded batch.
        """

    def emit(self, samples: list[Sample]) -> None:
        """Hand a decoded batch to readers; drops the oldest batch if the queue is full."""
        if not samples:
            return
        self.stats.messages += 1
        self.stats.samples += len(samples)
        self.stats.last_seen = self.clock()
        self._put_nowait(samples)

    def screen(self, samples: list[Sample]) -> list[Sample]:
        """Drop values outside their channel's plausible range, counting them per channel.

        Every batch a driver hands on passes through here (from :meth:`emit` or a
        subclass's own flush), so a wrong scale, a wrong driver or a CAN id collision
        never reaches the core; the counts appear in the health counters as
        ``stats.extra["implausible_<channel>"]``.
        """
        kept = screen_samples(samples, self.implausible)
        if len(kept) != len(samples):
            self.stats.extra.update(self.implausible_counters())
        return kept

    def implausible_counters(self) -> dict[str, int]:
        """``{"implausible_<channel>": n}`` for the health counters."""
        return {f"implausible_{ch}": n for ch, n in self.implausible.items()}

    # --- internals --------------------------------------------------------------------

    def _put_nowait(self, item: list[Sample] | BaseException | None) -> None:
        q = self._queue
        if q is None:
            return
        if isinstance(item, list):
            item = self.screen(item)
            if not item:
                return
        while True:
            try:
                q.put_nowait(item)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                    self.stats.drops += 1

    @property
    def link(self) -> str:
        """The port, interface or socket this driver reads (for log lines and health)."""
        return ""

    def _set_online(self, online: bool, reason: str) -> None:
        # A source starts offline, so the first open failure is a change of *reason*, not
        # of state: report it (and every new reason), not only online/offline flips.
        if self.stats.online == online and (online or reason == self._reason):
            return
        self.stats.online = online
        self._reason = reason
        if not online and reason != "closed":
            self.stats.last_error = reason
        if self.on_availability is not None:
            self.on_availability(self.source, online, reason)

    async def _pump(self) -> None:
        first = True
        retry = self.retry
        while not self._closed:
            if not (first and not self.reconnect):
                try:
                    await self._open()
                except DriverError as exc:
                    if not self.reconnect:
                        self._put_nowait(exc)
                        return
                    self._set_online(False, str(exc))
                    await asyncio.sleep(retry.failed(time.monotonic()))
                    continue
                except Exception as exc:  # a vendor library raising something unexpected
                    if not self.reconnect:
                        self._put_nowait(DriverError(f"{self.source}: {exc!r}"))
                        return
                    self._set_online(False, f"{self.source}: cannot open: {exc!r}")
                    await asyncio.sleep(retry.failed(time.monotonic()))
                    continue
                if not first:
                    self.stats.reconnects += 1
                self._set_online(True, "opened")
            first = False
            retry.up(time.monotonic())
            try:
                await self._read()
                raise DriverOperationError(f"{self.source}: link closed")
            except Exception as exc:
                err = exc
                if not isinstance(exc, DriverError):
                    err = DriverError(f"{self.source}: {exc!r}")
                self._set_online(False, str(err))
                with contextlib.suppress(Exception):
                    await self._close()
                if not self.reconnect:
                    self._put_nowait(err)
                    return
                await asyncio.sleep(retry.failed(time.monotonic()))


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait for them to end, ignoring how they ended.

    Unlike ``task.cancel(); with suppress(CancelledError): await task`` this never
    swallows a cancel aimed at the *caller* while it waits: that one is re-raised.
    """
    me = asyncio.current_task()
    before = me.cancelling() if me is not None else 0
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            # A cancel of the caller that arrived while waiting raised the count.
            if me is not None and me.cancelling() > before:
                raise
        except Exception:  # the task's own failure is not the caller's business here
            pass

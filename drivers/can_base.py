"""Shared CAN driver plumbing: codec shape, bus life cycle, arrival stamping, capture decode.

A CAN protocol module supplies a pure *codec* (no I/O) with
``decode(arbitration_id, data, is_extended) -> list[(channel, value)] | None``: ``None`` means
"not one of my frames", a list (possibly empty) means "mine, here are the values", and
:class:`~dynoai_daemon.errors.ProtocolError` means "mine but malformed" (wrong DLC, unknown
version). :class:`CanDriver` opens a python-can bus from the source options, reads it with
:class:`_BusReader` so the event loop never blocks (an fd reader draining every ready frame
for socketcan and udp_multicast, a reader thread otherwise, one loop wake-up per batch),
stamps each frame with the driver clock as it is received (the bus timestamp is kept as
``device_t``), counts good, bad, foreign and echoed
frames, and turns bus failures into :class:`~dynoai_daemon.errors.DriverOperationError` so
the base class reconnects. :meth:`CanDriver.decode_capture` runs the same codec over a
python-can log file (candump ``.log``, ``.asc``, ``.blf``, ...) for ``dynoai decode``.

Acceptance filters: a codec may state the frames it wants with ``can_filters()`` (python-can
``{"can_id", "can_mask", "extended"}`` dicts, None = everything); :meth:`CanDriver.can_filters`
hands them to ``can.Bus(can_filters=...)`` so that on a shared socketcan bus the kernel drops
the other sources' frames before they wake this socket (other interfaces filter in hardware or
in python-can's ``BusABC.recv``). :func:`id_filters` gives one exact filter per id (the
protocols use tens of ids, far under SocketCAN's 512 per socket) and :func:`filters_match` is
the matching rule (``(id ^ can_id) & mask == 0`` plus the extended flag).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

import can

from drivers.base import Driver, DriverStats
from dynoai_daemon.channels import Sample
from dynoai_daemon.errors import (
    ConfigError,
    DriverError,
    DriverOpenError,
    DriverOperationError,
    InputError,
    LogFormatError,
    ProtocolError,
)

ByteLike = bytes | bytearray | memoryview
CanFrame = tuple[int, bytes, bool]
"""A frame as encoders return it: ``(arbitration_id, data, is_extended)``."""
Decoded = list[tuple[str, float]]
CanFilter = dict[str, Any]
"""A python-can acceptance filter: ``{"can_id": int, "can_mask": int, "extended": bool}``."""

STD_ID_MASK: Final = 0x7FF
EXT_ID_MASK: Final = 0x1FFFFFFF
#: Most filters one socket takes (Linux CAN_RAW_FILTER_MAX); beyond that we filter nothing.
MAX_FILTERS: Final = 512

#: Option names the :class:`Driver` base consumes; every other unknown option is handed to
#: ``can.Bus`` (e.g. ``port`` for udp_multicast, ``fd``, ``tty_baudrate`` for slcan).
_BASE_OPTIONS = frozenset(inspect.signature(Driver.__init__).parameters) - {"self"}


@runtime_checkable
class CanCodec(Protocol):
    """What a CAN codec offers the driver (pure, no I/O)."""

    def decode(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Decoded | None:
        """Return the frame's values, None when the frame is not ours.

        Raises:
            ProtocolError: the frame is ours but malformed.
        """
        ...


def parse_int(value: int | str, *, what: str) -> int:
    """Parse an integer option that may be written as ``"0x180"`` or ``"384"``.

    Raises:
        ConfigError: not an integer.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not an integer", field=what)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip(), 0)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an integer", field=what) from None


def id_filters(ids: Iterable[int], *, extended: bool) -> list[CanFilter]:
    """Return one exact filter per id (full mask), sorted by id.

    Every filter carries ``extended`` so 11-bit and 29-bit frames never match each other's
    filters.

    Raises:
        ValueError: an id outside the 11-bit (``extended=False``) or 29-bit range.
    """
    full = EXT_ID_MASK if extended else STD_ID_MASK
    wanted = sorted(set(ids))
    for i in wanted:
        if not 0 <= i <= full:
            raise ValueError(f"CAN id {i:#x} outside the {'29' if extended else '11'}-bit range")
    return [{"can_id": i, "can_mask": full, "extended": extended} for i in wanted]


def frame_filters(frames: Iterable[tuple[int, bool]]) -> list[CanFilter] | None:
    """Return exact filters for ``(arbitration_id, extended)`` pairs.

    None (receive everything) when there is no frame to ask for (an empty filter list means
    "no filter" to python-can) or when more than :data:`MAX_FILTERS` filters would be needed.
    """
    std: set[int] = set()
    ext: set[int] = set()
    for arb, is_ext in frames:
        (ext if is_ext else std).add(arb)
    out = id_filters(std, extended=False) + id_filters(ext, extended=True)
    if not out or len(out) > MAX_FILTERS:
        return None
    return out


def filters_match(
    filters: Sequence[Mapping[str, Any]] | None, arbitration_id: int, is_extended: bool
) -> bool:
    """Return True when a frame passes ``filters`` (python-can's rule; None passes all)."""
    if not filters:
        return True
    for f in filters:
        if "extended" in f and bool(f["extended"]) != is_extended:
            continue
        if (int(f["can_id"]) ^ arbitration_id) & int(f["can_mask"]) == 0:
            return True
    return False


def frame_to_message(frame: CanFrame, timestamp: float = 0.0) -> can.Message:
    """Wrap an encoder's ``(id, data, extended)`` tuple in a ``can.Message``."""
    arb, data, ext = frame
    return can.Message(
        timestamp=timestamp,
        arbitration_id=arb,
        is_extended_id=ext,
        data=data,
        dlc=len(data),
    )


class _BusReader:
    """Reads a python-can bus off the event loop and hands frames over in batches.

    python-can's ``Notifier`` calls ``loop.call_soon_threadsafe`` once per frame (a
    self-pipe write and a loop wake-up each: 15 % of the simulated cell's CPU at 16,000
    frames/s) and, on the fd path, reads one frame per readiness event. This reader
    stamps each frame with ``clock()`` as it is received, queues it, and wakes the loop
    once per batch: when the loop is busy the frames of that time arrive together, each
    with its own receive time.

    Buses with a file descriptor (socketcan) are read on the loop with ``add_reader``,
    draining every frame that is ready; others (virtual, udp_multicast, vendor adapters)
    by a daemon thread polling ``recv(timeout)``. A read error is passed to ``on_error``
    once, on the loop, and reading stops.
    """

    def __init__(
        self,
        bus: can.BusABC,
        *,
        loop: asyncio.AbstractEventLoop,
        clock: Any,
        on_frames: Any,
        on_error: Any,
        timeout: float,
    ) -> None:
        self._bus = bus
        self._loop = loop
        self._clock = clock
        self._on_frames = on_frames
        self._on_error = on_error
        self._timeout = timeout
        self._lock = threading.Lock()
        self._buf: list[tuple[float, can.Message]] = []
        self._scheduled = False
        self._stopped = False
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        try:
            fd = bus.fileno()
        except (NotImplementedError, AttributeError, OSError, ValueError):
            fd = -1
        if isinstance(fd, int) and fd >= 0:
            self._fd = fd
            loop.add_reader(fd, self._on_readable)
        else:
            self._thread = threading.Thread(
                target=self._run, name=f"can-rx-{getattr(bus, 'channel_info', '')}", daemon=True
            )
            self._thread.start()

    def _on_readable(self) -> None:
        items: list[tuple[float, can.Message]] = []
        try:
            while (msg := self._bus.recv(0.0)) is not None:
                items.append((self._clock(), msg))
        except Exception as exc:
            self._remove_reader()
            if items:
                self._on_frames(items)
            self._on_error(exc)
            return
        if items:
            self._on_frames(items)

    def _run(self) -> None:
        bus, clock, lock = self._bus, self._clock, self._lock
        while not self._stopped:
            try:
                msg = bus.recv(self._timeout)
            except Exception as exc:
                if not self._stopped:
                    self._call(self._on_error, exc)
                return
            if msg is None:
                continue
            t = clock()
            with lock:
                self._buf.append((t, msg))
                if self._scheduled:
                    continue
                self._scheduled = True
            self._call(self._drain)

    def _call(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(fn, *args)

    def _drain(self) -> None:
        with self._lock:
            items, self._buf = self._buf, []
            self._scheduled = False
        if items and not self._stopped:
            self._on_frames(items)

    def _remove_reader(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            self._fd = None

    def stop(self, timeout: float) -> None:
        """Stop reading; joins the reader thread (it wakes every ``timeout`` seconds)."""
        self._stopped = True
        self._remove_reader()
        if self._thread is not None:
            self._thread.join(timeout)


class CanDriver(Driver):
    """Base of the CAN drivers: a python-can bus plus a pure codec.

    Subclasses set ``name`` and assign ``self.codec`` in their constructor.

    Args:
        interface: python-can interface name (``socketcan``, ``virtual``, ``udp_multicast``,
            ``pcan``, ``slcan``, ...).
        channel: the interface's channel (``can0``, a virtual channel name, a multicast
            group, ...).
        bitrate: bit rate passed to the interface; None leaves it to the interface.
        receive_own_messages: passed to ``can.Bus`` only when given (udp_multicast rejects
            True: it always receives its own frames).
        ignore_own_echo: drop received frames identical to ones this driver sent within
            ``echo_window_s`` (udp_multicast echoes every frame back to its sender).
        echo_window_s: how long a sent frame may come back as an echo.
        send_timeout_s: timeout of ``bus.send``.
        notifier_timeout_s: poll period of the bus reader thread (bounds close time).
        bus_options: extra keyword arguments for ``can.Bus``; a ``can_filters`` entry here
            (or as a top-level option) replaces the driver's own filters, None included.
        bus_filters: open the bus with the driver's acceptance filters (:meth:`can_filters`),
            so that frames of other sources sharing the bus are dropped by the kernel
            (socketcan), the adapter or python-can instead of waking this driver. False
            receives every frame (foreign frames are then counted as ``other_frames``). On
            interfaces that filter in software (``virtual``, ``udp_multicast``) error frames
            are filtered out too; socketcan delivers them regardless.
        **kwargs: the :class:`Driver` options (source, channel_map, clock, reconnect, ...);
            any other keyword goes to ``can.Bus`` too (e.g. ``port`` for udp_multicast).

    Raises:
        ConfigError: an option is invalid.
    """

    kind: ClassVar[str] = "can"
    codec: CanCodec

    def __init__(
        self,
        *,
        interface: str = "socketcan",
        channel: str | int = "can0",
        bitrate: int | None = 500_000,
        receive_own_messages: bool | None = None,
        ignore_own_echo: bool = True,
        echo_window_s: float = 1.0,
        send_timeout_s: float = 0.05,
        notifier_timeout_s: float = 0.05,
        bus_options: Mapping[str, Any] | None = None,
        bus_filters: bool = True,
        **kwargs: Any,
    ) -> None:
        base = {k: v for k, v in kwargs.items() if k in _BASE_OPTIONS}
        extra = {k: v for k, v in kwargs.items() if k not in _BASE_OPTIONS}
        super().__init__(**base)
        if not isinstance(interface, str) or not interface:
            raise ConfigError(
                f"{self.name}: interface must be a non-empty string", field="interface"
            )
        if isinstance(bitrate, str) and bitrate.strip().isdigit():
            bitrate = int(bitrate)
        if bitrate is not None and (
            isinstance(bitrate, bool) or not isinstance(bitrate, int) or bitrate <= 0
        ):
            raise ConfigError(
                f"{self.name}: bitrate must be a positive integer (bit/s), not {bitrate!r}",
                field="bitrate",
            )
        if echo_window_s < 0 or send_timeout_s < 0 or notifier_timeout_s <= 0:
            raise ConfigError(f"{self.name}: timeouts must be positive", field="echo_window_s")
        self.interface = interface
        self.channel = channel
        self.bitrate = int(bitrate) if bitrate is not None else None
        self.receive_own_messages = receive_own_messages
        self.ignore_own_echo = bool(ignore_own_echo)
        self.echo_window_s = float(echo_window_s)
        self.send_timeout_s = float(send_timeout_s)
        self.notifier_timeout_s = float(notifier_timeout_s)
        self.bus_options: dict[str, Any] = {**dict(bus_options or {}), **extra}
        self.bus_filters = bool(bus_filters)
        self._bus: can.BusABC | None = None
        self._reader: _BusReader | None = None
        self._generation = 0
        self._pending: list[Sample] = []
        self._wake: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._sent: deque[tuple[float, int, bool, bytes]] = deque(maxlen=64)
        self._counters: dict[str, int] = {
            "other_frames": 0,
            "error_frames": 0,
            "remote_frames": 0,
            "own_echoes": 0,
            "sent": 0,
        }

    # --- decoding (shared by the live path, capture decode and benchmarks) -------------------

    def ingest(self, msg: can.Message, t: float, out: list[Sample]) -> None:
        """Decode one frame received at time ``t`` and append its samples to ``out``.

        Error frames, remote frames and frames of other protocols are counted and skipped;
        a malformed frame of ours is counted in ``stats.bad_frames``. Never raises for
        frame content.
        """
        if msg.is_error_frame:
            self._counters["error_frames"] += 1
            return
        if msg.is_remote_frame:
            self._counters["remote_frames"] += 1
            return
        try:
            values = self.codec.decode(msg.arbitration_id, msg.data, msg.is_extended_id)
        except ProtocolError:
            self.stats.bad_frames += 1
            return
        if values is None:
            self._counters["other_frames"] += 1
            return
        self.stats.messages += 1
        self.stats.last_seen = t
        src = self.source
        dev_t = msg.timestamp
        for ch, v in values:
            out.append(Sample(t, ch, v, src, dev_t))

    def decode_frames(self, msgs: list[can.Message], *, t: float | None = None) -> list[Sample]:
        """Decode a list of frames, each stamped with ``t`` or else its own timestamp."""
        out: list[Sample] = []
        for m in msgs:
            self.ingest(m, m.timestamp if t is None else t, out)
        return out

    def sync_stats(self) -> DriverStats:
        """Copy frame and codec counters into ``stats.extra`` and return the stats."""
        extra = dict(self._counters)
        counters = getattr(self.codec, "counters", None)
        if isinstance(counters, dict):
            extra.update(counters)
        extra.update(self.implausible_counters())
        self.stats.extra = extra
        return self.stats

    # --- sending ---------------------------------------------------------------------------

    def send(self, msg: can.Message) -> None:
        """Transmit a frame on the open bus.

        Raises:
            DriverOperationError: the bus is not open or refused the frame.
        """
        bus = self._bus
        if bus is None:
            raise DriverOperationError(f"{self.source}: send on a closed bus")
        try:
            bus.send(msg, timeout=self.send_timeout_s)
        except can.CanError as exc:
            raise DriverOperationError(f"{self.source}: CAN send failed: {exc}") from exc
        self._counters["sent"] += 1
        if self.ignore_own_echo:
            self._sent.append(
                (self.clock(), msg.arbitration_id, msg.is_extended_id, bytes(msg.data))
            )

    def _is_own_echo(self, msg: can.Message) -> bool:
        sent = self._sent
        horizon = self.clock() - self.echo_window_s
        while sent and sent[0][0] < horizon:
            sent.popleft()
        key = (msg.arbitration_id, msg.is_extended_id, bytes(msg.data))
        for i, rec in enumerate(sent):
            if rec[1:] == key:
                del sent[i]
                return True
        return False

    # --- Driver hooks ------------------------------------------------------------------------

    def can_filters(self) -> list[CanFilter] | None:
        """Return the acceptance filters of the frames this driver decodes (None: all frames).

        The default asks the codec (``codec.can_filters()`` when it has one). Filters are
        python-can dicts ``{"can_id", "can_mask", "extended"}``; a frame passes when
        ``(arbitration_id ^ can_id) & can_mask == 0`` for one of them (see
        :func:`filters_match`). They must never reject a frame the codec decodes.
        """
        fn = getattr(self.codec, "can_filters", None)
        return fn() if callable(fn) else None

    @property
    def link(self) -> str:
        """``interface:channel`` of the bus."""
        return f"{self.interface}:{self.channel}"

    def _bus_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"interface": self.interface, "channel": self.channel}
        if self.bitrate is not None:
            kw["bitrate"] = self.bitrate
        if self.receive_own_messages is not None:
            kw["receive_own_messages"] = self.receive_own_messages
        kw.update(self.bus_options)
        if self.bus_filters and "can_filters" not in kw:  # the user's own filters win
            filters = self.can_filters()
            if filters is not None:
                kw["can_filters"] = filters
        return kw

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._generation += 1
        try:
            # Opening a bus can block (a USB adapter's driver, a socket's bind): a thread.
            bus = await asyncio.to_thread(can.Bus, **self._bus_kwargs())
        except (
            can.CanError,
            OSError,
            ValueError,
            TypeError,
            ImportError,
            NotImplementedError,
        ) as exc:
            raise DriverOpenError(
                f"{self.source}: cannot open CAN bus {self.interface}:{self.channel}: {exc}"
            ) from exc
        self._pending = []
        self._error = None
        self._wake = asyncio.Event()
        self._sent.clear()
        generation = self._generation
        try:
            reader = _BusReader(
                bus,
                loop=loop,
                clock=self.clock,
                on_frames=lambda items: self._on_frames(generation, items),
                on_error=lambda exc: self._on_bus_error(generation, exc),
                timeout=self.notifier_timeout_s,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                bus.shutdown()
            raise DriverOpenError(f"{self.source}: cannot read CAN bus: {exc}") from exc
        self._bus = bus
        self._reader = reader

    async def _close(self) -> None:
        self._generation += 1  # frames still queued for the loop are dropped
        reader, self._reader = self._reader, None
        bus, self._bus = self._bus, None
        if reader is not None:
            # The reader thread wakes every notifier_timeout_s; joining it (and shutting a
            # vendor bus down) can still take a while: not on the loop.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(reader.stop, max(1.0, 4 * self.notifier_timeout_s))
        if bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(bus.shutdown)
        self.sync_stats()

    async def _read(self) -> None:
        if self._bus is None:
            await self._open()
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            self._flush()
            if self._error is not None:
                err, self._error = self._error, None
                if isinstance(err, DriverError):
                    raise err
                raise DriverOperationError(f"{self.source}: CAN bus failed: {err}") from err

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self.stats.samples += len(batch)
            self._put_nowait(batch)
        self.sync_stats()

    # --- listener callbacks (always on the loop thread) -----------------------------------

    def _on_frames(self, generation: int, items: list[tuple[float, can.Message]]) -> None:
        if generation != self._generation or self._wake is None:
            return
        out = self._pending
        for t, msg in items:
            if self._sent and self._is_own_echo(msg):
                self._counters["own_echoes"] += 1
                continue
            try:
                self.handle_frame(msg, t, out)
            except Exception:  # a codec bug on one frame is a decode error, not a dead link
                self.stats.bad_frames += 1
                self._counters["codec_errors"] = self._counters.get("codec_errors", 0) + 1
        if not self._wake.is_set():
            self._wake.set()

    def handle_frame(self, msg: can.Message, t: float, out: list[Sample]) -> None:
        """Process one live frame (subclasses with request/response state override this)."""
        self.ingest(msg, t, out)

    def _on_bus_error(self, generation: int, exc: Exception) -> None:
        if generation != self._generation or self._wake is None:
            return
        self._error = exc
        self._wake.set()

    # --- offline ---------------------------------------------------------------------------

    @classmethod
    def decode_capture(
        cls, path: str | Path, /, **options: Any
    ) -> tuple[list[Sample], DriverStats]:
        """Decode a python-can log file (candump ``.log``, ``.asc``, ``.blf``, ``.trc``, ...).

        Each sample's ``t`` and ``device_t`` are the log's timestamp of its frame.

        Args:
            path: the capture; the format follows the file suffix, as in ``can.LogReader``.
            **options: the driver's options (codec options, channel_map, source, ...).

        Returns:
            ``(samples, stats)``: stats count decoded messages, bad frames and (in
            ``extra``) foreign, error and remote frames plus ``records``.

        Raises:
            InputError: the file is missing or its format is not supported.
            LogFormatError: a record cannot be parsed (names file and line when known).
            ConfigError: a bad driver option.
        """
        drv = cls(**options)
        p = Path(path)
        if not p.is_file():
            raise InputError("no such capture file", path=str(p))
        try:
            reader = can.LogReader(p)
        except OSError as exc:
            raise InputError(
                f"cannot read CAN capture: {exc.strerror or exc}", path=str(p)
            ) from exc
        except Exception as exc:  # python-can's readers raise struct.error, BLFParseException...
            raise InputError(f"not a readable CAN capture: {exc}", path=str(p)) from exc
        samples: list[Sample] = []
        records = 0
        try:
            it: Iterator[can.Message] = iter(reader)
            while True:
                try:
                    msg = next(it)
                except StopIteration:
                    break
                except Exception as exc:
                    raise LogFormatError(
                        f"unreadable CAN record #{records + 1}: {exc}",
                        path=str(p),
                        line=_text_line_of_record(p, records),
                    ) from exc
                records += 1
                drv.handle_capture_frame(msg, samples)
        finally:
            with contextlib.suppress(Exception):
                reader.stop()
        stats = drv.sync_stats()
        stats.samples = len(samples)
        stats.extra["records"] = records
        return samples, stats

    def handle_capture_frame(self, msg: can.Message, out: list[Sample]) -> None:
        """Decode one frame of a capture, timed by the log (overridden by obd2)."""
        self.ingest(msg, msg.timestamp, out)


def _text_line_of_record(path: Path, index: int) -> int | None:
    """Return the 1-based line of record ``index`` in a candump ``.log`` (one per line)."""
    if path.suffix.lower() != ".log":
        return None
    seen = 0
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                if seen == index:
                    return lineno
                seen += 1
    return None

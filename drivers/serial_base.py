"""Shared machinery of the serial drivers: a pyserial port read through the event loop.

:class:`SerialDriver` opens a pyserial port (a device path such as ``/dev/ttyUSB0`` or a udev
symlink, or any pyserial URL) non-blocking, registers ``loop.add_reader`` on its file
descriptor and feeds every chunk of bytes to the subclass's pure stream decoder; each decoded
message is time-stamped with the driver clock when its last byte arrives. A read error, EOF
or hang-up (USB adapter unplugged, pty master closed) raises
:class:`~dynoai_daemon.errors.DriverOperationError`, so the :class:`~drivers.base.Driver`
reconnect loop reopens the port with capped backoff once it is back. pyserial-asyncio-fast
is deliberately not used (its write path can spin a CPU, see docs/architecture.md). The same decoder
serves ``dynoai decode`` through :meth:`SerialDriver.decode_capture`, which times a raw
capture by the protocol's nominal message period. :class:`LineSplitter` frames the ASCII
line protocols (AEM gauge, CSV controllers).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import os
import stat
from pathlib import Path
from typing import Any, ClassVar, Protocol

from drivers.base import Driver, DriverStats
from dynoai_daemon.channels import Sample
from dynoai_daemon.errors import (
    ConfigError,
    DriverOpenError,
    DriverOperationError,
    InputError,
)

#: Option names the :class:`Driver` base consumes.
BASE_OPTIONS = frozenset(inspect.signature(Driver.__init__).parameters) - {"self"}

#: Most bytes taken from the port per readiness callback (a few seconds of 19200 baud).
READ_CHUNK = 65536


class StreamDecoder(Protocol):
    """What a serial driver needs from its codec: incremental, pure, never raising on junk."""

    @property
    def bad_frames(self) -> int:
        """Broken packets or bad lines so far."""
        ...

    @property
    def skipped_bytes(self) -> int:
        """Bytes dropped so far."""
        ...

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return the messages completed by it."""
        ...

    def flush(self) -> list[Any]:
        """End of stream: return what a final partial unit still yields, count the rest."""
        ...


class LineCounters:
    """Bad-line and skipped-byte counters shared by the line-based decoders.

    Subclasses set ``_lines`` (a :class:`LineSplitter`), ``_bad`` and ``_skipped``.
    """

    _lines: LineSplitter
    _bad: int
    _skipped: int

    @property
    def bad_frames(self) -> int:
        """Bad lines so far (including over-long ones)."""
        return self._bad + self._lines.overlong

    @property
    def skipped_bytes(self) -> int:
        """Bytes of bad lines so far."""
        return self._skipped + self._lines.overlong_bytes


class LineSplitter:
    """Frame an ASCII byte stream into lines (``\\n``, ``\\r\\n`` or a lone ``\\r`` end one).

    Empty lines are ignored. A line longer than ``max_line`` bytes is dropped whole (one bad
    line; all its bytes counted as skipped), so a device streaming junk without line ends
    cannot grow the buffer.

    Args:
        max_line: longest accepted line in bytes, terminator excluded.
    """

    def __init__(self, max_line: int = 256) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False
        self.overlong = 0
        self.overlong_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete, non-empty lines that ``data`` finishes (terminators removed)."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        start = 0
        n = len(buf)
        i = 0
        while i < n:
            c = buf[i]
            if c == 0x0A or c == 0x0D:
                if self._discarding:
                    self.overlong_bytes += i - start
                    self._discarding = False
                elif i > start:
                    if i - start > self.max_line:
                        self.overlong += 1
                        self.overlong_bytes += i - start
                    else:
                        out.append(bytes(buf[start:i]))
                start = i + 1
            i += 1
        del buf[:start]
        if len(buf) > self.max_line:
            # No terminator in sight: drop what we hold and the rest of this line.
            if not self._discarding:
                self.overlong += 1
            self._discarding = True
            self.overlong_bytes += len(buf)
            buf.clear()
        return out

    def flush(self) -> list[bytes]:
        """Return the unterminated last line, if any (end of a capture)."""
        rest = bytes(self._buf)
        self._buf.clear()
        if self._discarding:
            self._discarding = False
            self.overlong_bytes += len(rest)
            return []
        return [rest] if rest else []

    @property
    def pending(self) -> int:
        """Bytes held waiting for a line end."""
        return len(self._buf)


class SerialDriver(Driver):
    """Base of the serial drivers: a pyserial port plus a pure stream decoder.

    Subclasses set ``name``, ``nominal_period_s`` and implement :meth:`new_decoder` and
    :meth:`message_samples`.

    Args:
        port: a pyserial port name or URL (``/dev/ttyUSB0``, ``/dev/dynoai-lm2``,
            ``socket://host:port``, ``loop://``).
        baudrate: line speed; 8N1 framing is fixed.
        exclusive: take an exclusive lock on a device port so two daemons cannot share it.
        poll_interval_s: read period for pyserial URL ports that have no file descriptor.
        **kwargs: the :class:`Driver` options (source, channel_map, on_availability, clock,
            reconnect, backoff, queue_size).

    Raises:
        ConfigError: an option is invalid.
    """

    kind: ClassVar[str] = "serial"
    #: Nominal time between two messages, used to time raw captures.
    nominal_period_s: float = 0.1

    def __init__(
        self,
        *,
        port: str = "",
        baudrate: int = 9600,
        exclusive: bool = True,
        poll_interval_s: float = 0.02,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - BASE_OPTIONS)
        if unknown:
            raise ConfigError(
                f"{self.name}: unknown option(s) {', '.join(unknown)}", field=unknown[0]
            )
        super().__init__(**kwargs)
        if not isinstance(port, str):
            raise ConfigError(f"{self.name}: port must be a string", field="port")
        if isinstance(baudrate, bool) or not isinstance(baudrate, int) or baudrate <= 0:
            raise ConfigError(f"{self.name}: baudrate must be a positive integer", field="baudrate")
        self.port = port
        self.baudrate = baudrate
        self.exclusive = bool(exclusive)
        self.poll_interval_s = check_positive("poll_interval_s", self.name, poll_interval_s)
        self._serial: Any = None
        self._fd: int | None = None
        self._decoder: StreamDecoder | None = None
        # Counters of decoders from earlier connections (each open starts a fresh decoder
        # so a half packet from before an unplug is never glued to new data).
        self._bad_before = 0
        self._skipped_before = 0
        self.counters: dict[str, int] = {"bytes": 0, "codec_errors": 0}
        self._last_rx: float | None = None

    # --- for subclasses ---------------------------------------------------------------------

    @abc.abstractmethod
    def new_decoder(self) -> StreamDecoder:
        """Return a fresh decoder for this driver's options."""

    @abc.abstractmethod
    def message_samples(self, msg: Any, t: float, out: list[Sample]) -> bool:
        """Append the samples of one decoded message at time ``t`` to ``out``.

        Returns:
            True when ``msg`` counts as a data message (False for e.g. command replies).
        """

    def capture_time(self, msg: Any, index: int) -> float:
        """Time of data message number ``index`` in a raw capture (nominal period)."""
        return index * self.nominal_period_s

    # --- decoding shared by the live path, captures and benchmarks ------------------------

    def ingest(
        self, data: bytes, t: float, out: list[Sample], *, t_prev: float | None = None
    ) -> int:
        """Feed received bytes to the current decoder; append their samples to ``out``.

        Each message gets its own stamp: with ``t_prev`` (when the previous chunk
        arrived) the messages completed by one chunk are spread back from ``t`` at the
        protocol's nominal period, never reaching ``t_prev``, so readings that piled up
        while the reader was held up (a stalled loop, a stopped process) stay distinct
        readings at plausible times; without it they are all stamped ``t``. A codec that
        raises is a decode error: counted, the decoder replaced (resync), never fatal.

        Returns:
            The number of data messages decoded.
        """
        dec = self._decoder
        if dec is None:
            dec = self._decoder = self.new_decoder()
        self.counters["bytes"] += len(data)
        n = 0
        try:
            msgs = dec.feed(data)
            k = len(msgs)
            step = 0.0
            if t_prev is not None and k > 1:
                step = min(self.nominal_period_s, max(0.0, t - t_prev) / k)
            for i, msg in enumerate(msgs):
                if self.message_samples(msg, t - (k - 1 - i) * step, out):
                    n += 1
        except Exception:
            self._codec_failed(dec)
        if n:
            self.stats.messages += n
            self.stats.last_seen = t
        self.sync_stats()
        return n

    def _codec_failed(self, dec: StreamDecoder) -> None:
        # Resync with a fresh decoder; the bytes the broken one held are lost, counted once.
        self.counters["codec_errors"] = self.counters.get("codec_errors", 0) + 1
        with contextlib.suppress(Exception):
            self._bad_before += int(dec.bad_frames)
            self._skipped_before += int(dec.skipped_bytes)
        self._bad_before += 1
        self._decoder = self.new_decoder()

    def sync_stats(self) -> DriverStats:
        """Copy decoder counters into ``stats`` and ``stats.extra``; return the stats."""
        dec = self._decoder
        bad = self._bad_before + (dec.bad_frames if dec is not None else 0)
        skipped = self._skipped_before + (dec.skipped_bytes if dec is not None else 0)
        self.stats.bad_frames = bad
        self.stats.skipped_bytes = skipped
        self.stats.extra = {**self.counters, **self.implausible_counters()}
        return self.stats

    def _retire_decoder(self) -> None:
        dec, self._decoder = self._decoder, None
        if dec is not None:
            with contextlib.suppress(Exception):
                dec.flush()  # a cut-off partial packet counts as skipped bytes
            self._bad_before += dec.bad_frames
            self._skipped_before += dec.skipped_bytes
        self.sync_stats()

    @property
    def link(self) -> str:
        """The serial port or URL."""
        return self.port

    # --- sending ----------------------------------------------------------------------------

    def write(self, data: bytes) -> int:
        """Write ``data`` to the open port (non-blocking on device ports).

        Device ports are written with one ``os.write`` on their non-blocking descriptor;
        pyserial URL ports without a descriptor go through their own ``write``.

        Returns:
            The number of bytes the port accepted (may be fewer than ``len(data)``).

        Raises:
            DriverOperationError: the port is not open or the write failed.
        """
        ser = self._serial
        if ser is None:
            raise DriverOperationError(f"{self.source}: write on a closed port")
        try:
            if self._fd is not None:
                return os.write(self._fd, data)
            return int(ser.write(data) or 0)
        except BlockingIOError:
            return 0
        except Exception as exc:
            raise DriverOperationError(
                f"{self.source}: write to {self.port} failed: {exc}"
            ) from exc

    # --- Driver hooks -----------------------------------------------------------------------

    async def _open(self) -> None:
        import serial  # pyserial; imported here so a missing package fails only this driver

        if not self.port:
            raise DriverOpenError(f"{self.source}: no serial port configured")
        if "://" not in self.port:
            # pyserial opens a regular file or a directory without complaint (and then
            # reads EOF forever): say what is wrong instead.
            try:
                mode = os.stat(self.port).st_mode
            except OSError as exc:
                raise DriverOpenError(
                    f"{self.source}: cannot open {self.port}: {exc.strerror or exc}"
                ) from exc
            if not stat.S_ISCHR(mode):
                raise DriverOpenError(
                    f"{self.source}: cannot open {self.port}: not a serial device"
                )

        def do_open() -> Any:
            return serial.serial_for_url(
                self.port,
                baudrate=self.baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=0,
                exclusive=self.exclusive,
            )

        try:
            if "://" in self.port:
                # Network URL handlers connect synchronously: keep that off the loop.
                ser = await asyncio.to_thread(do_open)
            else:
                ser = do_open()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DriverOpenError(f"{self.source}: cannot open {self.port}: {exc}") from exc
        fd: int | None = None
        with contextlib.suppress(Exception):
            fd = int(ser.fileno())
        self._retire_decoder()
        self._serial = ser
        self._fd = fd
        self._decoder = self.new_decoder()
        self._last_rx = self.clock()

    async def _close(self) -> None:
        ser, self._serial = self._serial, None
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
        if ser is not None:
            with contextlib.suppress(Exception):
                ser.close()
        self._retire_decoder()

    async def _read(self) -> None:
        if self._serial is None:
            await self._open()
        if self._fd is None:
            await self._poll_loop()
            return
        loop = asyncio.get_running_loop()
        fd = self._fd
        failed: asyncio.Future[None] = loop.create_future()

        def fail(exc: BaseException) -> None:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            if not failed.done():
                failed.set_exception(exc)

        def on_readable() -> None:
            try:
                data = os.read(fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EIO: pty master closed / USB adapter gone
                fail(DriverOperationError(f"{self.source}: {self.port} read failed: {exc}"))
                return
            if not data:
                fail(DriverOperationError(f"{self.source}: {self.port} closed (EOF)"))
                return
            self._deliver(data)  # never raises for content: see ingest()

        try:
            loop.add_reader(fd, on_readable)
        except (OSError, ValueError) as exc:
            raise DriverOperationError(f"{self.source}: cannot watch {self.port}: {exc}") from exc
        try:
            await failed
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)

    async def _poll_loop(self) -> None:
        import serial

        while True:
            ser = self._serial
            if ser is None:
                raise DriverOperationError(f"{self.source}: port closed")
            try:
                n = ser.in_waiting
                data = ser.read(n) if n else b""
            except (serial.SerialException, OSError) as exc:
                raise DriverOperationError(
                    f"{self.source}: {self.port} read failed: {exc}"
                ) from exc
            if data:
                self._deliver(bytes(data))
            await asyncio.sleep(self.poll_interval_s)

    def _deliver(self, data: bytes) -> None:
        batch: list[Sample] = []
        t = self.clock()
        prev, self._last_rx = self._last_rx, t
        self.ingest(data, t, batch, t_prev=prev)
        if batch:
            self.stats.samples += len(batch)
            self._put_nowait(batch)

    # --- offline ----------------------------------------------------------------------------

    @classmethod
    def decode_capture(
        cls, capture: str | Path | bytes | bytearray, /, **options: Any
    ) -> tuple[list[Sample], DriverStats]:
        """Decode a raw byte capture of this driver's port, as ``dynoai decode`` does.

        Message ``i`` is timed by :meth:`capture_time` (the protocol's nominal period unless
        the protocol carries its own clock); ``t`` starts at 0.

        Args:
            capture: a file path, or the captured bytes.
            **options: the driver's options (channel map, stoich, columns, ...); ``port``
                is not needed.

        Returns:
            The samples in message order and the counters (messages, bad frames, skipped
            bytes).

        Raises:
            InputError: the file cannot be read.
            ConfigError: an option is invalid.
        """
        if isinstance(capture, bytes | bytearray):
            data = bytes(capture)
        else:
            try:
                data = Path(capture).read_bytes()
            except OSError as exc:
                raise InputError(f"cannot read capture: {exc.strerror}", path=str(capture)) from exc
        drv = cls(**options)
        dec = drv._decoder = drv.new_decoder()
        out: list[Sample] = []
        index = 0
        msgs = dec.feed(data)
        msgs.extend(dec.flush())
        for msg in msgs:
            t = drv.capture_time(msg, index)
            if drv.message_samples(msg, t, out):
                index += 1
        drv.counters["bytes"] = len(data)
        drv.stats.messages = index
        drv.stats.samples = len(out)
        drv.stats.last_seen = out[-1].t if out else None
        return out, drv.sync_stats()


def check_positive(name: str, driver: str, value: float) -> float:
    """Return ``value`` as float, or raise ConfigError naming ``name`` if it is not > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{driver}: {name} must be a number", field=name) from None
    if not v > 0 or v == float("inf"):
        raise ConfigError(f"{driver}: {name} must be positive and finite", field=name)
    return v


__all__ = [
    "BASE_OPTIONS",
    "LineSplitter",
    "SerialDriver",
    "StreamDecoder",
    "check_positive",
]

"""The serial drivers on real pseudo-terminals: bytes written to the pty master come out of
``driver.samples()``; closing the master is an unplugged USB adapter (the driver goes
offline and keeps retrying); re-pointing a udev-style symlink to a fresh pty is the replug
(the driver comes back, counts a reconnect, and samples flow again)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.aem_serial import AemSerialDriver, encode_line
from drivers.base import Backoff, Driver
from drivers.innovate_mts import InnovateMtsDriver, encode_packet, lambda_item, status_item
from drivers.serial_csv import SerialCsvDriver, encode_row
from dynoai_daemon.channels import Sample, SensorStatus
from dynoai_daemon.errors import DriverOpenError, DriverOperationError

FAST = Backoff(initial_s=0.01, max_s=0.05)
TIMEOUT = 5.0


class Pty:
    """One pseudo-terminal pair; ``close()`` is the unplug and is idempotent."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        self.path = os.ttyname(self.slave)
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.master], [], [], TIMEOUT)
        assert ready, "nothing arrived on the pty master"
        return os.read(self.master, n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)
            os.close(self.slave)


def _open_fds() -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


@pytest.fixture(autouse=True)
def _no_tty_leaks() -> Iterator[None]:
    """Fail a test that leaves a pty or serial port descriptor open."""
    before = _open_fds()
    yield
    left = {
        fd: target
        for fd, target in _open_fds().items()
        if before.get(fd) != target and (target.startswith("/dev/pts") or target == "/dev/ptmx")
    }
    assert not left, f"descriptors left open: {left}"


@pytest.fixture
def make_pty() -> Iterator[Callable[[], Pty]]:
    ptys: list[Pty] = []

    def make() -> Pty:
        p = Pty()
        ptys.append(p)
        return p

    yield make
    for p in ptys:
        p.close()


class Availability:
    """Records availability callbacks; waits for a state with a timeout."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()
        self.history: list[tuple[bool, str]] = []

    def __call__(self, source: str, online: bool, reason: str) -> None:
        self.history.append((online, reason))
        self.events.put_nowait((online, reason))

    async def wait(self, online: bool) -> str:
        async with asyncio.timeout(TIMEOUT):
            while True:
                state, reason = await self.events.get()
                if state == online:
                    return reason


@contextlib.asynccontextmanager
async def running(driver: Driver) -> AsyncIterator[AsyncIterator[list[Sample]]]:
    """Open ``driver``, yield its sample iterator, and always close both."""
    await driver.open()
    it = driver.samples()
    try:
        yield it
    finally:
        await driver.close()
        await it.aclose()  # type: ignore[attr-defined]


async def collect(
    it: AsyncIterator[list[Sample]], done: Callable[[list[Sample]], bool]
) -> list[Sample]:
    """Read batches until ``done(all samples so far)`` holds (or time out)."""
    got: list[Sample] = []
    async with asyncio.timeout(TIMEOUT):
        async for batch in it:
            got.extend(batch)
            if done(got):
                return got
    raise AssertionError(f"samples ended early: {got}")


def has(channel: str, value: float | None = None) -> Callable[[list[Sample]], bool]:
    return lambda got: any(
        s.channel == channel and (value is None or abs(s.value - value) < 1e-9) for s in got
    )


class CountingMts(InnovateMtsDriver):
    """The real driver, counting open attempts so a test can await "it kept retrying"."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attempts = 0
        self.failed_attempts = 0
        self.retried = asyncio.Event()
        self.retry_target = 0

    async def _open(self) -> None:
        self.attempts += 1
        try:
            await super()._open()
        except DriverOpenError:
            self.failed_attempts += 1
            if self.retry_target and self.failed_attempts >= self.retry_target:
                self.retried.set()
            raise


async def test_mts_samples_over_pty(make_pty: Callable[[], Pty]) -> None:
    pty = make_pty()
    avail = Availability()
    drv = InnovateMtsDriver(source="wb", port=pty.path, backoff=FAST, on_availability=avail)
    async with running(drv) as it:
        await avail.wait(True)
        garbage = b"\x01\x02\x81"
        pty.write(garbage + encode_packet([lambda_item(0.9), lambda_item(1.0)]))
        pty.write(encode_packet([status_item(SensorStatus.WARMING_UP, 450), lambda_item(1.1)]))
        got = await collect(it, has("afr_front_detail"))
        vals = [(s.channel, round(s.value, 6)) for s in got]
        assert vals == [
            ("afr_front", round(0.9 * 14.7, 6)),
            ("afr_front_status", 0.0),
            ("afr_rear", 14.7),
            ("afr_rear_status", 0.0),
            ("afr_front_detail", 450.0),
            ("afr_front_status", float(SensorStatus.WARMING_UP)),
            ("afr_rear", round(1.1 * 14.7, 6)),
            ("afr_rear_status", 0.0),
        ]
        assert all(s.source == "wb" for s in got)
        # Each packet is stamped on arrival with the driver's monotonic clock.
        assert got[0].t <= got[-1].t <= drv.clock()
        assert drv.stats.messages == 2 and drv.stats.skipped_bytes == len(garbage)
        assert drv.stats.online and drv.stats.last_seen == got[-1].t
    assert not drv.stats.online
    assert avail.history[-1] == (False, "closed")


async def test_unplug_then_replug_through_symlink(
    make_pty: Callable[[], Pty], tmp_path: Path
) -> None:
    link = tmp_path / "dynoai-lm2"  # what a udev rule would create
    first = make_pty()
    os.symlink(first.path, link)
    avail = Availability()
    drv = CountingMts(source="wb", port=str(link), backoff=FAST, on_availability=avail)
    async with running(drv) as it:
        await avail.wait(True)
        first.write(encode_packet([lambda_item(0.95)]))
        await collect(it, has("afr_front", 0.95 * 14.7))

        # Unplug: the device node goes away and the adapter's end is closed.
        drv.retry_target = 3
        os.unlink(link)
        first.close()
        reason = await avail.wait(False)
        assert "wb" in reason and ("EOF" in reason or "failed" in reason)
        # It keeps trying to reopen (each attempt fails: no device) without giving up.
        async with asyncio.timeout(TIMEOUT):
            await drv.retried.wait()
        assert drv.failed_attempts >= 3 and not drv.stats.online

        # Replug: udev points the same name at the new tty (atomically).
        second = make_pty()
        tmp_link = tmp_path / "dynoai-lm2.new"
        os.symlink(second.path, tmp_link)
        os.replace(tmp_link, link)
        await avail.wait(True)
        second.write(encode_packet([lambda_item(1.05), lambda_item(0.85)]))
        got = await collect(it, has("afr_rear", 0.85 * 14.7))
        assert has("afr_front", 1.05 * 14.7)(got)
        assert drv.stats.reconnects >= 1
        assert drv.stats.messages == 2 and drv.stats.online


async def test_unplug_without_reconnect_raises(make_pty: Callable[[], Pty]) -> None:
    pty = make_pty()
    drv = InnovateMtsDriver(port=pty.path, reconnect=False)
    async with running(drv) as it:
        pty.write(encode_packet([lambda_item(1.0)]))
        await collect(it, has("afr_front"))
        pty.close()
        with pytest.raises(DriverOperationError):
            async with asyncio.timeout(TIMEOUT):
                async for _ in it:
                    pass


async def test_open_missing_port_without_reconnect(tmp_path: Path) -> None:
    drv = InnovateMtsDriver(port=str(tmp_path / "no-such-tty"), reconnect=False)
    with pytest.raises(DriverOpenError):
        await drv.open()
    await drv.close()
    with pytest.raises(DriverOpenError):
        await InnovateMtsDriver(reconnect=False).open()  # no port configured


async def test_port_is_exclusive(make_pty: Callable[[], Pty]) -> None:
    pty = make_pty()
    avail = Availability()
    first = InnovateMtsDriver(port=pty.path, backoff=FAST, on_availability=avail)
    async with running(first):
        await avail.wait(True)
        second = InnovateMtsDriver(port=pty.path, reconnect=False)
        with pytest.raises(DriverOpenError, match="lock"):
            await second.open()
        await second.close()


async def test_write_reaches_the_device(make_pty: Callable[[], Pty]) -> None:
    pty = make_pty()
    avail = Availability()
    drv = InnovateMtsDriver(port=pty.path, backoff=FAST, on_availability=avail)
    with pytest.raises(DriverOperationError):
        drv.write(b"x")  # not open yet
    async with running(drv):
        await avail.wait(True)
        assert drv.write(b"\x00\x01\x02") == 3
        got = b""
        while len(got) < 3:
            got += pty.read(16)
        assert got == b"\x00\x01\x02"


async def test_aem_gauge_over_pty(make_pty: Callable[[], Pty]) -> None:
    pty = make_pty()
    avail = Availability()
    drv = AemSerialDriver(
        source="aem", port=pty.path, channel="afr_rear", backoff=FAST, on_availability=avail
    )
    async with running(drv) as it:
        await avail.wait(True)
        pty.write(encode_line(14.7) + b"#junk\r\n" + encode_line(12.3))
        got = await collect(it, has("afr_rear", 12.3))
        assert [(s.channel, s.value) for s in got] == [("afr_rear", 14.7), ("afr_rear", 12.3)]
        assert drv.stats.bad_frames == 1 and drv.stats.messages == 2


async def test_serial_csv_over_pty(make_pty: Callable[[], Pty]) -> None:
    pty = make_pty()
    avail = Availability()
    drv = SerialCsvDriver(
        source="diy",
        port=pty.path,
        columns=["ms", "rpm", "torque_ftlb"],
        time_column="ms",
        backoff=FAST,
        on_availability=avail,
    )
    async with running(drv) as it:
        await avail.wait(True)
        pty.write(b"ms,rpm,torque_ftlb\r\n" + encode_row([2500, 4000, 91.5], 1) + b"1,2\r\n")
        pty.write(encode_row([2510, 4010, 92.0], 1))
        got = await collect(it, has("rpm", 4010.0))
        assert [(s.channel, s.value, s.device_t) for s in got] == [
            ("rpm", 4000.0, 2.5),
            ("torque_ftlb", 91.5, 2.5),
            ("rpm", 4010.0, 2.51),
            ("torque_ftlb", 92.0, 2.51),
        ]
        assert drv.stats.bad_frames == 1


async def test_loop_url_without_file_descriptor() -> None:
    # pyserial's loop:// has no fd: the driver falls back to polling in_waiting.
    avail = Availability()
    drv = AemSerialDriver(
        port="loop://", backoff=FAST, on_availability=avail, poll_interval_s=0.005
    )
    async with running(drv) as it:
        await avail.wait(True)
        assert drv.write(b"13.7\r\n") == 6  # loopback: what we send comes back
        got = await collect(it, has("afr_front"))
        assert got[0].value == 13.7

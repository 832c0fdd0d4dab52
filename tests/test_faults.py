"""Faults a dyno room produces, in process: garbage on the port, a codec that raises, a port
or CAN interface that is not there, a flapping link, readings that arrive together.

Everything runs against real parts: a pseudo-terminal for the serial port, python-can's
own bus construction for the missing interface. The one injected fault is a codec that
raises (a bug cannot be produced on demand); it is injected by wrapping the real decoder.
The process-level faults (a stopped daemon, a full disk) are in ``test_faults_process.py``;
bad command lines in ``test_faults_cli.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tty
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from drivers.base import Backoff
from drivers.innovate_mts import InnovateMtsDriver, MtsDecoder, encode_packet, lambda_item
from drivers.megasquirt import MegasquirtDriver
from dynoai_daemon.alerts import Alert
from dynoai_daemon.backoff import RetryState
from dynoai_daemon.channels import Sample, samples_to_frame
from dynoai_daemon.config import Settings
from dynoai_daemon.service.daemon import Daemon

FAST = Backoff(initial_s=0.01, max_s=0.05)


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


async def opened(drv: InnovateMtsDriver) -> None:
    """Open and wait until the port is open (pyserial flushes input on open)."""
    up = asyncio.Event()
    chained = drv.on_availability

    def note(source: str, online: bool, why: str) -> None:
        if online:
            up.set()
        if chained is not None:
            chained(source, online, why)

    drv.on_availability = note
    await drv.open()
    await asyncio.wait_for(up.wait(), 10)


async def collect(drv: InnovateMtsDriver, n: int, within: float = 10.0) -> list[Sample]:
    """The first ``n`` afr_front samples the driver yields."""
    out: list[Sample] = []
    async with asyncio.timeout(within):
        async for batch in drv.samples():
            out.extend(s for s in batch if s.channel == "afr_front")
            if len(out) >= n:
                return out
    return out


# --------------------------------------------------------------------------- serial port


async def test_pty_garbage_then_valid_packets() -> None:
    """Junk on the line is counted and skipped; the decoder resyncs on the next packets."""
    rng = random.Random(11)
    with pty_pair() as (master, path):
        drv = InnovateMtsDriver(port=path, source="wb", backoff=FAST)
        await opened(drv)
        try:
            os.write(master, bytes(rng.randrange(256) for _ in range(400)))
            lambdas = [0.85 + 0.01 * i for i in range(10)]
            packets = b"".join(encode_packet([lambda_item(x), lambda_item(1.0)]) for x in lambdas)
            # Random junk may look like a packet header and swallow what follows it:
            # the packets are sent until the decoder has locked on again.
            got: list[Sample] = []
            async with asyncio.timeout(10):
                while not any(round(s.value, 3) == round(lambdas[-1] * 14.7, 3) for s in got):
                    os.write(master, packets)
                    got.extend(await collect(drv, 1))
        finally:
            await drv.close()
    values = [round(s.value, 3) for s in got]
    tail = values[values.index(round(lambdas[0] * 14.7, 3)) :][: len(lambdas)]
    assert tail == [round(x * 14.7, 3) for x in lambdas]  # in order, none lost once locked
    st = drv.sync_stats()
    assert st.skipped_bytes > 0 and st.reconnects == 0 and drv.stats.online is False


async def test_a_codec_that_raises_is_a_decode_error_not_the_end_of_the_source() -> None:
    """One exception inside the codec: counted, the decoder replaced, reading goes on."""
    raised = 0
    boom = asyncio.Event()

    class Flaky(MtsDecoder):
        def feed(self, data: bytes) -> list[Any]:
            nonlocal raised
            if b"\xff\xfe" in data and raised == 0:
                raised += 1
                boom.set()
                raise RuntimeError("codec bug")
            return list(super().feed(data))

    class FlakyDriver(InnovateMtsDriver):
        def new_decoder(self) -> MtsDecoder:
            return Flaky()

    seen: list[tuple[bool, str]] = []
    with pty_pair() as (master, path):
        drv = FlakyDriver(
            port=path,
            source="wb",
            backoff=FAST,
            on_availability=lambda _s, online, why: seen.append((online, why)),
        )
        await opened(drv)
        try:
            os.write(master, b"\xff\xfe junk")
            await asyncio.wait_for(boom.wait(), 10)  # the raise happens on its own read
            os.write(master, encode_packet([lambda_item(0.9), lambda_item(0.9)]) * 2)
            got = await collect(drv, 1)
        finally:
            await drv.close()
    assert raised == 1 and drv.counters["codec_errors"] == 1
    assert round(got[0].value, 2) == round(0.9 * 14.7, 2)
    assert drv.stats.reconnects == 0
    assert seen[0] == (True, "opened") and all(online for online, _ in seen[:-1])


async def test_readings_read_together_keep_their_own_stamps() -> None:
    """Packets that pile up while the reader is held (a stalled loop) stay distinct readings."""
    with pty_pair() as (master, path):
        drv = InnovateMtsDriver(port=path, source="wb", backoff=FAST)
        await opened(drv)
        try:
            lambdas = [0.80 + 0.005 * i for i in range(19)]
            # All 19 written at once: one read gets them all, as after a 1.5 s stall.
            os.write(
                master,
                b"".join(encode_packet([lambda_item(x), lambda_item(1.0)]) for x in lambdas),
            )
            got = await collect(drv, len(lambdas))
        finally:
            await drv.close()
    ts = [s.t for s in got]
    assert len(set(ts)) == len(lambdas) and ts == sorted(ts)
    frame = samples_to_frame(got)
    assert len(frame) == len(lambdas)  # no two readings merged into one row


def test_samples_to_frame_never_merges_two_values_of_one_channel() -> None:
    s = [
        Sample(1.0, "afr_front", 13.0, "a"),
        Sample(1.0, "rpm", 3000.0, "b"),
        Sample(1.0, "afr_front", 13.5, "a"),
        Sample(1.0, "afr_front", 14.0, "a"),
        Sample(0.5, "rpm", 2900.0, "b"),
    ]
    f = samples_to_frame(s)
    assert f.t.tolist() == [0.5, 1.0, 1.0, 1.0]
    assert [v for v in f.columns["afr_front"].tolist() if v == v] == [13.0, 13.5, 14.0]
    assert [v for v in f.columns["rpm"].tolist() if v == v] == [2900.0, 3000.0]


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_while_a_link_flaps_and_resets_after_a_healthy_period() -> None:
    b = Backoff(initial_s=0.1, max_s=10.0, healthy_s=5.0)
    r = RetryState(b)
    now = 0.0
    steps = []
    for _ in range(6):  # opens, sends for 0.5 s, drops: again and again
        r.up(now)
        now += 0.5
        steps.append(r.failed(now))
    assert all(steps[i] <= 0.1 * 2**i for i in range(6))
    assert steps[-1] >= 0.1 * 2**5 / 2  # grew: at least half of the 6th step
    r.up(now)
    now += 6.0  # stayed up longer than healthy_s
    assert r.failed(now) <= 0.1


# --------------------------------------------------------------------------- missing sources


def _settings(tmp_path: Path, sources: list[dict[str, Any]]) -> Settings:
    return Settings(
        station="faults",
        data_dir=str(tmp_path / "data"),
        mqtt={"enabled": False},
        sources=sources,
    )


async def test_missing_port_and_can_interface_are_reported_with_the_os_reason(
    tmp_path: Path,
) -> None:
    settings = _settings(
        tmp_path,
        [
            {"name": "widebands", "driver": "innovate_mts", "port": str(tmp_path / "no-tty")},
            {"name": "as_file", "driver": "innovate_mts", "port": str(tmp_path)},
            {"name": "ecu", "driver": "megasquirt", "interface": "socketcan", "channel": "can0"},
        ],
    )
    daemon = Daemon(settings)
    down: set[str] = set()
    all_down = asyncio.Event()
    report = daemon._on_availability

    def note(source: str, online: bool, why: str) -> None:
        report(source, online, why)
        if not online:
            down.add(source)
            if len(down) == 3:
                all_down.set()

    daemon._on_availability = note  # type: ignore[method-assign,assignment]
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(all_down.wait(), 10)
        health = daemon.health()
        daemon.request_stop()
        await task
    warned = {e["source"]: e for e in logs if e["event"] == "source unavailable"}
    assert all(e["log_level"] == "warning" for e in warned.values())
    assert "No such file or directory" in warned["widebands"]["reason"]
    assert warned["widebands"]["link"] == str(tmp_path / "no-tty")
    assert "not a serial device" in warned["as_file"]["reason"]
    assert warned["ecu"]["link"] == "socketcan:can0"
    assert "socketcan:can0" in warned["ecu"]["reason"]
    for name in ("widebands", "as_file", "ecu"):
        src = health["sources"][name]
        assert src["online"] is False and src["last_error"] == warned[name]["reason"]
    assert health["storage"] == "ok" and health["loop_lag_ms_max"] >= 0


async def test_an_unchanged_open_failure_is_reported_once(tmp_path: Path) -> None:
    calls: list[tuple[bool, str]] = []
    drv = MegasquirtDriver(
        interface="socketcan",
        channel="can0",
        source="ecu",
        backoff=FAST,
        on_availability=lambda _s, online, why: calls.append((online, why)),
    )
    await drv.open()
    try:
        while drv.retry.failures < 4:  # noqa: ASYNC110 (nothing signals a retry)
            await asyncio.sleep(0.01)
    finally:
        await drv.close()
    assert len([c for c in calls if c[1] != "closed"]) == 1
    assert drv.stats.last_error is not None and "can0" in drv.stats.last_error


# --------------------------------------------------------------------------- payloads


def test_alert_payload_carries_wall_clock_utc_and_run_time() -> None:
    a = Alert(
        kind="lean",
        severity="critical",
        station="s",
        run_id="r1",
        cylinder="front",
        rpm=3000.0,
        map_kpa=90.0,
        value=14.5,
        threshold=13.8,
        t=1234.5,
        run_t=2.5,
    )
    p = a.payload()
    assert p["ts"].endswith("Z") and datetime.fromisoformat(p["ts"].replace("Z", "+00:00"))
    assert p["run_t"] == 2.5 and p["t"] == 1234.5

"""Tests of the CAN drivers on real python-can buses and of offline capture decoding.

Each live test gets its own ``virtual`` channel (or its own udp_multicast port) and a second
Bus object that plays the other node; samples are received through ``driver.samples()``.
Faults are real: the driver's own bus is shut down underneath it. Captures are written with
python-can's loggers into ``tmp_path`` and decoded with ``decode_capture``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import can
import pytest

from drivers import aemnet, haltech, megasquirt, rusefi, rusefi_wbo
from drivers.base import Backoff, Driver
from drivers.can_base import CanDriver, CanFrame, frame_to_message
from drivers.dbc_driver import DbcDriver
from drivers.registry import create_driver
from dynoai_daemon.channels import Sample, SensorStatus
from dynoai_daemon.errors import (
    DriverOpenError,
    DriverOperationError,
    InputError,
    LogFormatError,
)
from simulators.ports import free_port

CLOCK_OFFSET = 1.0e6  # the driver clock is visibly not the bus clock


def driver_clock() -> float:
    return time.monotonic() + CLOCK_OFFSET


@contextlib.asynccontextmanager
async def running(driver: Driver) -> AsyncIterator[Driver]:
    await driver.open()
    try:
        yield driver
    finally:
        await driver.close()


async def collect(
    driver: Driver, done: Callable[[list[Sample]], bool], limit_s: float = 5.0
) -> list[Sample]:
    """Gather sample batches until ``done`` says so (or fail after ``limit_s``)."""
    got: list[Sample] = []

    async def run() -> None:
        async with contextlib.aclosing(driver.samples()) as it:
            async for batch in it:
                got.extend(batch)
                if done(got):
                    return

    await asyncio.wait_for(run(), limit_s)
    return got


def has(channel: str, value: float | None = None) -> Callable[[list[Sample]], bool]:
    def pred(samples: list[Sample]) -> bool:
        return any(
            s.channel == channel and (value is None or abs(s.value - value) < 1e-6) for s in samples
        )

    return pred


def send(bus: can.BusABC, frame: CanFrame) -> None:
    bus.send(frame_to_message(frame))


# --- live decoding on the virtual bus ------------------------------------------------------------


async def test_aemnet_driver_decodes_counts_and_stamps_on_arrival(
    channel: str, peer: can.BusABC
) -> None:
    # bus_filters off: the foreign and error frames must reach the driver to be counted
    # (with filters, virtual drops both; test_can_filters.py covers the filtered bus).
    drv = aemnet.AemNetDriver(
        interface="virtual",
        channel=channel,
        source="wb",
        clock=driver_clock,
        reconnect=False,
        bus_filters=False,
    )
    async with running(drv):
        send(peer, (0x180, bytes(7), True))  # ours, wrong DLC -> bad frame
        send(peer, (0x123, bytes(8), False))  # someone else's frame
        peer.send(can.Message(is_error_frame=True, arbitration_id=0, data=b""))
        send(peer, aemnet.encode(1, 1.0, valid=False))
        before = time.time()
        send(peer, aemnet.encode(0, 0.9))
        got = await collect(drv, has("afr_front"))
    by = {s.channel: s for s in got}
    assert by["afr_front"].value == pytest.approx(0.9 * 14.7)
    assert by["afr_front_status"].value == float(SensorStatus.NORMAL)
    assert by["afr_rear_status"].value == float(SensorStatus.INVALID)
    assert "afr_rear" not in by
    s = by["afr_front"]
    assert s.source == "wb"
    assert s.t > CLOCK_OFFSET  # stamped with the driver clock on arrival
    assert s.device_t is not None and abs(s.device_t - before) < 5.0  # the bus's timestamp
    st = drv.stats
    assert (st.messages, st.bad_frames) == (2, 1)
    assert st.extra["other_frames"] == 1
    assert st.extra["error_frames"] == 1
    assert st.extra["lambda_invalid"] == 1
    assert st.samples == 3
    assert st.online is False  # closed


BROADCASTS: list[tuple[str, dict[str, Any], list[CanFrame], dict[str, float]]] = [
    (
        "megasquirt",
        {"base_id": "0x600", "knock_cylinder": "both"},
        [
            megasquirt.encode_group(0, {"rpm": 4200}, base_id=0x600),
            megasquirt.encode_group(2, {"map": 92.5, "mat": 88.0, "clt": 190.0}, base_id=0x600),
            megasquirt.encode_group(52, {"knock_retard": 1.5}, base_id=0x600),
            megasquirt.encode_group(0, {"rpm": 9999}),  # default base id: not ours now
        ],
        {
            "rpm": 4200.0,
            "map_kpa": 92.5,
            "iat_f": 88.0,
            "ect_f": 190.0,
            "knock_front_deg": 1.5,
            "knock_rear_deg": 1.5,
        },
    ),
    (
        "rusefi",
        {},
        [
            rusefi.encode(1, {"rpm": 3500, "timing": 30.0}),
            rusefi.encode(3, {"map": 75.0, "clt": 90, "iat": 25}),
            rusefi.encode(7, {"lambda1": 0.85, "lambda2": 0.86}),
        ],
        {
            "rpm": 3500.0,
            "spark_front_deg": 30.0,
            "map_kpa": 75.0,
            "ect_f": 194.0,
            "iat_f": 77.0,
            "afr_front": 0.85 * 14.7,
            "afr_rear": 0.86 * 14.7,
        },
    ),
    ("haltech", {}, [haltech.encode(2500, 60.5, 20.0)], {"rpm": 2500, "map_kpa": 60.5}),
    (
        "rusefi_wbo",
        {"channel_map": {"0": "afr_rear", "1": "afr_front"}},
        [rusefi_wbo.encode(0, 0.95), rusefi_wbo.encode(1, 1.05)],
        {"afr_rear": 0.95 * 14.7, "afr_front": 1.05 * 14.7},
    ),
    (
        "dbc",
        {
            "dbc_file": str(Path(megasquirt.__file__).parent / "dbc" / "megasquirt.dbc"),
            "signals": {"rpm": "rpm", "afr1": "afr_front"},
        },
        [
            megasquirt.encode_group(0, {"rpm": 3100}),
            megasquirt.encode_group(3, {"afr1": 12.9, "tps": 80}),
        ],
        {"rpm": 3100.0, "afr_front": 12.9},
    ),
]


@pytest.mark.parametrize(("name", "options", "frames", "expected"), BROADCASTS)
async def test_broadcast_drivers_on_virtual_bus(
    channel: str,
    peer: can.BusABC,
    name: str,
    options: dict[str, Any],
    frames: list[CanFrame],
    expected: dict[str, float],
) -> None:
    drv = create_driver(
        name, interface="virtual", channel=channel, source="ecu", reconnect=False, **options
    )
    assert isinstance(drv, CanDriver)
    async with running(drv):
        for f in frames:
            send(peer, f)
        got = await collect(drv, lambda ss: set(expected) <= {s.channel for s in ss})
    values = {s.channel: s.value for s in got}
    for ch, v in expected.items():
        assert values[ch] == pytest.approx(v), ch
    assert all(s.source == "ecu" for s in got)
    assert "tps_pct" not in values or name != "dbc"  # unmapped DBC signals are ignored


# --- failures ------------------------------------------------------------------------------------


async def test_bus_failure_reconnects(channel: str, peer: can.BusABC) -> None:
    events: list[tuple[bool, str]] = []
    changed = asyncio.Event()

    def on_availability(source: str, online: bool, reason: str) -> None:
        events.append((online, reason))
        changed.set()

    drv = aemnet.AemNetDriver(
        interface="virtual",
        channel=channel,
        on_availability=on_availability,
        backoff=Backoff(initial_s=0.01, max_s=0.05),
    )
    async with running(drv):
        # with reconnect on, open() returns at once and the bus opens in the background
        await asyncio.wait_for(changed.wait(), 5.0)
        assert drv.stats.online
        send(peer, aemnet.encode(0, 1.0))
        await collect(drv, has("afr_front", 14.7))
        first_bus = drv._bus
        assert first_bus is not None
        first_bus.shutdown()  # the adapter vanishes under the driver
        # the driver notices, goes offline, reopens the channel and comes back online
        while not (events and events[-1][0] and drv.stats.reconnects == 1):
            changed.clear()
            await asyncio.wait_for(changed.wait(), 5.0)
        assert [e[0] for e in events][-3:] == [True, False, True]
        assert drv._bus is not None and drv._bus is not first_bus
        send(peer, aemnet.encode(0, 1.1))
        got = await collect(drv, has("afr_front", 1.1 * 14.7))
    assert any(abs(s.value - 16.17) < 1e-6 for s in got)
    assert drv.stats.reconnects == 1


async def test_bus_failure_without_reconnect_raises(channel: str, peer: can.BusABC) -> None:
    drv = haltech.HaltechDriver(interface="virtual", channel=channel, reconnect=False)
    async with running(drv):
        send(peer, haltech.encode(1000, 50, 10))
        await collect(drv, has("rpm"))
        assert drv._bus is not None
        drv._bus.shutdown()
        with pytest.raises(DriverOperationError):
            await collect(drv, lambda _: False)


async def test_open_failure_is_a_driver_open_error() -> None:
    drv = aemnet.AemNetDriver(interface="no_such_interface", channel="x", reconnect=False)
    with pytest.raises(DriverOpenError, match="no_such_interface"):
        await drv.open()
    await drv.close()


async def test_send_needs_an_open_bus(channel: str) -> None:
    drv = aemnet.AemNetDriver(interface="virtual", channel=channel)
    with pytest.raises(DriverOperationError):
        drv.send(frame_to_message(aemnet.encode(0, 1.0)))


async def test_close_ends_samples_and_is_idempotent(channel: str) -> None:
    drv = haltech.HaltechDriver(interface="virtual", channel=channel, reconnect=False)
    await drv.open()
    reader = asyncio.create_task(collect(drv, lambda _: False))
    await asyncio.sleep(0)  # let the reader start waiting
    await drv.close()
    await drv.close()
    assert await asyncio.wait_for(reader, 5.0) == []


def test_unknown_options_go_to_the_bus() -> None:
    drv = aemnet.AemNetDriver(
        interface="udp_multicast", channel="239.74.163.2", port=50000, bitrate=None, source="x"
    )
    kw = drv._bus_kwargs()
    assert kw.pop("can_filters") == drv.can_filters()
    assert kw == {"interface": "udp_multicast", "channel": "239.74.163.2", "port": 50000}
    assert drv.source == "x"


# --- udp_multicast between two bus objects -------------------------------------------------------


async def test_udp_multicast_two_buses_and_own_echo_ignored() -> None:
    group = "239.74.163.2"
    port = free_port("udp")
    try:
        sender = can.Bus(interface="udp_multicast", channel=group, port=port)
    except OSError as exc:  # no multicast route in this sandbox; anything else fails
        pytest.skip(f"udp_multicast unavailable here: {exc}")
    try:
        drv = aemnet.AemNetDriver(
            interface="udp_multicast", channel=group, port=port, bitrate=None, reconnect=False
        )
        try:
            await drv.open()
        except DriverOpenError as exc:
            if not isinstance(exc.__cause__, OSError):  # a broken driver, not the network
                raise
            pytest.skip(f"udp_multicast unavailable here: {exc}")
        try:
            # Our own frame comes back to us on udp_multicast; it must not become data.
            drv.send(frame_to_message(aemnet.encode(0, 0.8)))
            got: list[Sample] = []
            deadline = time.monotonic() + 5.0
            while not has("afr_front", 14.7)(got):
                assert time.monotonic() < deadline, "no multicast frame arrived"
                send(sender, aemnet.encode(0, 1.0))  # resent: multicast may drop
                with contextlib.suppress(TimeoutError):
                    got += await collect(drv, has("afr_front", 14.7), limit_s=0.2)
            assert not has("afr_front", 0.8 * 14.7)(got)
            assert drv.stats.extra["own_echoes"] == 1
            assert drv.stats.extra["sent"] == 1
        finally:
            await drv.close()
    finally:
        sender.shutdown()


# --- offline capture decode ----------------------------------------------------------------------


def _capture_frames() -> list[can.Message]:
    t0 = 1_700_000_000.0
    frames = [
        megasquirt.encode_group(0, {"rpm": 3000}),
        megasquirt.encode_group(2, {"map": 85.3, "mat": 95.0, "clt": 180.2}),
        (0x5F3, bytes(4), False),  # ours, DLC 4 -> bad frame
        (0x7E8, bytes(8), False),  # foreign
        megasquirt.encode_group(3, {"tps": 55.5, "afr1": 13.2, "afr2": 13.5}),
    ]
    out = []
    for i, f in enumerate(frames):
        m = frame_to_message(f, timestamp=t0 + 0.01 * i)
        m.channel = "can0"
        out.append(m)
    return out


@pytest.mark.parametrize("suffix", [".log", ".asc", ".blf"])
def test_decode_capture_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"capture{suffix}"
    msgs = _capture_frames()
    with can.Logger(str(path)) as writer:
        for m in msgs:
            writer.on_message_received(m)
    samples, stats = megasquirt.MegasquirtDriver.decode_capture(path, source="ecu")
    assert stats.messages == 3
    assert stats.bad_frames == 1
    assert stats.extra["other_frames"] == 1
    assert stats.extra["records"] == 5
    assert stats.samples == len(samples) == 1 + 4 + 4
    by_ch: dict[str, list[Sample]] = {}
    for s in samples:
        by_ch.setdefault(s.channel, []).append(s)
    assert by_ch["rpm"][0].value == 3000.0
    assert by_ch["map_kpa"][0].value == pytest.approx(85.3)
    assert by_ch["afr_rear"][0].value == pytest.approx(13.5)
    # time comes from the log: 10 ms per record, the bad and foreign frames in between
    t_rpm, t_map, t_afr = by_ch["rpm"][0].t, by_ch["map_kpa"][0].t, by_ch["afr_front"][0].t
    assert t_map - t_rpm == pytest.approx(0.01, abs=1e-5)
    assert t_afr - t_rpm == pytest.approx(0.04, abs=1e-5)
    if suffix == ".log":
        assert t_rpm == pytest.approx(msgs[0].timestamp)
    assert all(s.device_t == s.t for s in samples)


def test_decode_capture_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such"):
        aemnet.AemNetDriver.decode_capture(tmp_path / "missing.log")
    odd = tmp_path / "capture.xyz"
    odd.write_text("x")
    with pytest.raises(InputError):
        aemnet.AemNetDriver.decode_capture(odd)
    log = tmp_path / "broken.log"
    log.write_text(
        "(1700000000.000000) can0 00000180#2710000082008200\n"
        "\n"
        "(1700000000.010000) can0 this-is-not-a-frame\n"
    )
    with pytest.raises(LogFormatError) as info:
        aemnet.AemNetDriver.decode_capture(log)
    assert info.value.line == 3 and info.value.path == str(log)
    assert "broken.log:3" in str(info.value)


def test_decode_capture_candump_golden(tmp_path: Path) -> None:
    # candump -L lines written by hand: 29-bit 0x180 with lambda 0x2710 (14.7 AFR), valid;
    # then 0x181 with the valid bit clear.
    log = tmp_path / "aem.log"
    log.write_text(
        "(1700000000.000000) can0 00000180#271000D18A008200\n"
        "(1700000000.010000) can0 00000181#271000D18A000200\n"
    )
    samples, stats = aemnet.AemNetDriver.decode_capture(log, source="wb")
    assert [(s.t, s.channel, s.value) for s in samples] == [
        (1700000000.0, "afr_front", pytest.approx(14.7)),
        (1700000000.0, "afr_front_status", 0.0),
        (1700000000.01, "afr_rear_status", float(SensorStatus.INVALID)),
    ]
    assert stats.messages == 2 and stats.bad_frames == 0


def test_dbc_driver_capture(tmp_path: Path) -> None:
    log = tmp_path / "ms.log"
    # MegaSquirt group 0 at 0x5F0: rpm 0x0BB8 = 3000 in bytes 6-7.
    log.write_text("(1.500000) can0 5F0#006403E804B00BB8\n")
    samples, _ = DbcDriver.decode_capture(
        log,
        dbc_file=str(Path(megasquirt.__file__).parent / "dbc" / "megasquirt.dbc"),
        signals={"rpm": "rpm", "pw1": "pw1_ms"},
    )
    assert [(s.t, s.channel, s.value) for s in samples] == [
        (1.5, "pw1_ms", pytest.approx(1.0)),
        (1.5, "rpm", 3000.0),
    ]

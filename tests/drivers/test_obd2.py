"""Tests of OBD-II Mode 01: golden frames, the PID scheduler, and the poller against an ECU.

Golden request/reply bytes are written out by hand from the SAE J1979 Mode 01 PID formulas as
published in public PID tables (e.g. CSS Electronics' "OBD2 PID table", which also shows the
7DF request / 7E8 reply frame layout; see docs/protocols.md). The scheduler is
tested with injected time. The driver polls a real :class:`Obd2Responder` on the other end
of a python-can ``virtual`` bus (own channel per test); the responder leaves some PIDs
unanswered (or refuses them) so that the driver must time out and drop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import can
import pytest

from drivers.can_base import frame_to_message
from drivers.obd2 import (
    Obd2Codec,
    Obd2Driver,
    Obd2Responder,
    PidScheduler,
    Reply,
    encode_request,
    encode_response,
    parse_pid,
    parse_reply,
)
from dynoai_daemon.channels import Sample
from dynoai_daemon.errors import ConfigError, ProtocolError

# --- golden frames ----------------------------------------------------------------------------


def test_request_frames() -> None:
    # single frame, 2 bytes: service 01, PID 0x0C; padded with zeros to 8 bytes
    assert encode_request(0x0C) == (0x7DF, bytes.fromhex("02 01 0C 00 00 00 00 00"), False)
    assert encode_request(0x0B, extended=True) == (
        0x18DB33F1,
        bytes.fromhex("02 01 0B 00 00 00 00 00"),
        True,
    )


GOLDEN_REPLIES = [
    # 0x0C rpm: A=0x1A, B=0xF8 -> (256 * 26 + 248) / 4 = 6904 / 4 = 1726 rpm
    ("04 41 0C 1A F8 55 55 55", "rpm", 1726.0),
    # 0x0B MAP: A = 0x64 = 100 kPa
    ("03 41 0B 64 55 55 55 55", "map_kpa", 100.0),
    # 0x11 TPS: A = 0x80 = 128 -> 128 * 100 / 255 = 50.196 %
    ("03 41 11 80 55 55 55 55", "tps_pct", 128 * 100 / 255),
    # 0x0F IAT: A = 0x46 = 70 -> 30 degC -> 86 degF
    ("03 41 0F 46 55 55 55 55", "iat_f", 86.0),
    # 0x05 coolant: A = 0x7B = 123 -> 83 degC -> 181.4 degF
    ("03 41 05 7B 55 55 55 55", "ect_f", 181.4),
    # 0x0E timing: A = 0x8C = 140 -> 140 / 2 - 64 = 6.0 deg
    ("03 41 0E 8C 55 55 55 55", "spark_front_deg", 6.0),
    # no padding: a 4-byte frame is fine as long as the length byte fits
    ("03 41 0B 28", "map_kpa", 40.0),
]


@pytest.mark.parametrize(("hexdata", "channel", "value"), GOLDEN_REPLIES)
def test_golden_replies(hexdata: str, channel: str, value: float) -> None:
    codec = Obd2Codec()
    out = codec.decode(0x7E8, bytes.fromhex(hexdata), False)
    assert out is not None and len(out) == 1
    assert out[0][0] == channel and out[0][1] == pytest.approx(value)
    # any of the eight ECU reply ids, but not the request id or another addressing
    assert codec.decode(0x7EF, bytes.fromhex(hexdata), False) == out
    assert codec.decode(0x7DF, bytes.fromhex(hexdata), False) is None
    assert codec.decode(0x7E8, bytes.fromhex(hexdata), True) is None
    ext = Obd2Codec(extended=True)
    assert ext.decode(0x18DAF110, bytes.fromhex(hexdata), True) == out
    assert ext.decode(0x18DAF210, bytes.fromhex(hexdata), True) is None


def test_encoder_matches_golden_replies() -> None:
    assert encode_response(0x0C, 1726.0) == (0x7E8, bytes.fromhex("04 41 0C 1A F8 55 55 55"), False)
    assert encode_response(0x0F, 30.0, ecu=1)[:2] == (0x7E9, bytes.fromhex("03410F4655555555"))
    assert encode_response(0x0E, 6.0, ecu=0x10, extended=True) == (
        0x18DAF110,
        bytes.fromhex("03 41 0E 8C 55 55 55 55"),
        True,
    )
    with pytest.raises(ValueError):
        encode_response(0x0B, 300.0)  # MAP is one byte
    with pytest.raises(ValueError):
        encode_response(0x42, 12.0)  # not a PID we scale


def test_malformed_and_other_replies() -> None:
    with pytest.raises(ProtocolError):
        parse_reply(bytes.fromhex("05 41 0C 1A"))  # length byte 5, only 3 bytes follow
    with pytest.raises(ProtocolError):
        parse_reply(bytes.fromhex("02 41 0C 55 55 55 55 55"))  # rpm without its 2 bytes
    with pytest.raises(ProtocolError):
        parse_reply(bytes.fromhex("00 41 0C"))
    with pytest.raises(ProtocolError):
        parse_reply(b"")
    assert parse_reply(bytes.fromhex("10 14 49 02 01 31 47 31")) is None  # first frame (VIN)
    assert parse_reply(bytes.fromhex("03 7F 01 12 55 55 55 55")) == Reply(-1, None, negative=True)
    assert parse_reply(bytes.fromhex("03 7F 09 12 55 55 55 55")) is None  # another service
    assert parse_reply(bytes.fromhex("06 41 00 BE 3F A8 13 55")) == Reply(0x00, None)
    codec = Obd2Codec()
    assert codec.decode(0x7E8, bytes.fromhex("06 41 00 BE 3F A8 13 55"), False) == []
    assert codec.decode(0x7E8, bytes.fromhex("03 7F 01 12 55 55 55 55"), False) == []
    assert codec.counters == {"negative_replies": 1, "unknown_pid_replies": 1}


def test_parse_pid() -> None:
    assert parse_pid("rpm") == 0x0C
    assert parse_pid("0x0b") == 0x0B
    assert parse_pid(17) == 0x11
    with pytest.raises(ConfigError):
        parse_pid("0x42")
    with pytest.raises(ConfigError):
        parse_pid("boost")


# --- scheduler (injected time) -------------------------------------------------------------------


def run_schedule(
    sch: PidScheduler, seconds: float, rtt: float, answers: Callable[[int], bool]
) -> list[int]:
    """Simulate a poll loop: each request takes ``rtt`` (answered) or is a timeout."""
    now = 0.0
    order: list[int] = []
    while now < seconds:
        pid, wait = sch.next(now)
        if pid is None:
            assert wait > 0
            now += min(wait, seconds)
            continue
        sch.sent(pid, now)
        order.append(pid)
        if answers(pid):
            now += rtt
            sch.answered(pid)
        else:
            now += 0.1
            sch.missed(pid, now)
    return order


def test_scheduler_polls_by_rate() -> None:
    sch = PidScheduler({0x0C: 0.0, 0x0B: 0.0, 0x11: 0.05, 0x0F: 1.0, 0x05: 1.0})
    order = run_schedule(sch, 2.0, 0.005, lambda _: True)
    counts = {p: order.count(p) for p in (0x0C, 0x0B, 0x11, 0x0F, 0x05)}
    # fast PIDs share the bus round-robin; the slow ones come about once a second
    assert abs(counts[0x0C] - counts[0x0B]) <= 1
    assert counts[0x0C] > 5 * counts[0x11] / 2
    assert counts[0x11] >= 30
    assert 2 <= counts[0x0F] <= 3 and 2 <= counts[0x05] <= 3
    assert order[:2] == [0x0C, 0x0B]  # first round follows the configured order
    assert sch.drops == 0 and sch.timeouts == 0


def test_scheduler_drops_unanswered_pid_and_probes_it_later() -> None:
    sch = PidScheduler({0x0C: 0.0, 0x0E: 0.1}, max_misses=3, retry_dropped_s=5.0)
    order = run_schedule(sch, 4.0, 0.01, lambda p: p != 0x0E)
    assert order.count(0x0E) == 3  # three misses, then dropped
    assert sch.dropped() == [0x0E] and sch.active() == [0x0C]
    assert sch.drops == 1 and sch.timeouts == 3
    # after retry_dropped_s a single probe goes out; this time the ECU answers: revived
    order2 = run_schedule_from(sch, 4.0, 7.0, 0.01)
    assert order2.count(0x0E) >= 2
    assert sch.revivals == 1 and sch.dropped() == []


def run_schedule_from(sch: PidScheduler, start: float, stop: float, rtt: float) -> list[int]:
    now = start
    order: list[int] = []
    while now < stop:
        pid, wait = sch.next(now)
        if pid is None:
            now += wait
            continue
        sch.sent(pid, now)
        order.append(pid)
        now += rtt
        sch.answered(pid)
    return order


def test_scheduler_validation() -> None:
    with pytest.raises(ConfigError):
        PidScheduler({})
    with pytest.raises(ConfigError):
        PidScheduler({0x0C: -1.0})
    with pytest.raises(ConfigError):
        PidScheduler({0x0C: 0.0}, max_misses=0)
    sch = PidScheduler({0x0E: 0.0}, max_misses=1, retry_dropped_s=0.0)
    sch.sent(0x0E, 0.0)
    assert sch.missed(0x0E, 0.1) is True
    assert sch.next(1000.0) == (None, math.inf)  # dropped for good


# --- driver against an ECU on a virtual bus -------------------------------------------------------


@pytest.fixture
def ecu_bus(peer: can.BusABC) -> can.BusABC:
    """The ECU's end of the virtual channel (conftest's peer)."""
    return peer


@contextlib.asynccontextmanager
async def responding(responder: Obd2Responder) -> AsyncIterator[Obd2Responder]:
    responder.start()
    try:
        yield responder
    finally:
        responder.stop()


async def gather_until(
    drv: Obd2Driver, done: Callable[[list[Sample]], bool], limit_s: float = 10.0
) -> list[Sample]:
    got: list[Sample] = []

    async def run() -> None:
        async with contextlib.aclosing(drv.samples()) as it:
            async for batch in it:
                got.extend(batch)
                if done(got):
                    return

    await asyncio.wait_for(run(), limit_s)
    return got


ECU_VALUES = {0x0C: 3000.0, 0x0B: 85.0, 0x11: 40.0, 0x0F: 30.0, 0x05: 90.0}  # no 0x0E


async def test_poller_reads_answered_pids_and_drops_the_silent_one(
    channel: str, ecu_bus: can.BusABC
) -> None:
    drv = Obd2Driver(
        interface="virtual",
        channel=channel,
        source="obd",
        timeout_s=0.05,
        max_misses=3,
        retry_dropped_s=0.0,
        reconnect=False,
    )
    async with responding(Obd2Responder(ecu_bus, ECU_VALUES)) as ecu:
        await drv.open()
        try:
            start = drv.clock()

            def enough(ss: list[Sample]) -> bool:
                chans = [s.channel for s in ss]
                return (
                    drv.scheduler.drops == 1
                    and chans.count("rpm") >= 30
                    and {"map_kpa", "tps_pct", "iat_f", "ect_f"} <= set(chans)
                )

            got = await gather_until(drv, enough)
            end = drv.clock()
        finally:
            await drv.close()
    by: dict[str, list[Sample]] = {}
    for s in got:
        by.setdefault(s.channel, []).append(s)
    assert by["rpm"][0].value == 3000.0
    assert by["map_kpa"][0].value == 85.0
    assert by["tps_pct"][0].value == pytest.approx(round(40 * 2.55) / 2.55)
    assert by["iat_f"][0].value == pytest.approx(86.0)
    assert by["ect_f"][0].value == pytest.approx(194.0)
    assert "spark_front_deg" not in by
    # the silent PID was asked exactly max_misses times, then dropped and counted
    assert ecu.requests[0x0E] == 3
    assert drv.scheduler.dropped() == [0x0E]
    extra = drv.stats.extra
    assert extra["pids_dropped"] == 1 and extra["dropped_pid_0x0e"] == 1
    assert extra["timeouts"] == 3
    # every answer was matched to its request (one may still be in flight at close)
    answered = sum(ecu.answered.values()) - extra["late_replies"]
    assert answered - 1 <= extra["replies"] <= answered
    # rate: rpm and map are polled far more often than iat/coolant
    assert ecu.requests[0x0C] >= 30
    assert ecu.requests[0x0C] > 5 * ecu.requests[0x0F]
    assert abs(ecu.requests[0x0C] - ecu.requests[0x0B]) <= 2
    # each value is stamped when its reply arrived, in order, on the driver clock
    times = [s.t for s in got]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert start <= times[0] and times[-1] <= end
    assert all(s.device_t is not None for s in got)


async def test_poller_29bit_and_negative_reply(channel: str, ecu_bus: can.BusABC) -> None:
    drv = Obd2Driver(
        interface="virtual",
        channel=channel,
        extended=True,
        pids={"rpm": 0.0, "timing": 0.0, "coolant": 0.5},
        timing_channel="spark_rear_deg",
        channel_map={"coolant": "ect2_f"},
        timeout_s=0.05,
        max_misses=2,
        reconnect=False,
    )
    ecu = Obd2Responder(
        ecu_bus,
        {0x0C: 2500.0, 0x0E: 12.5, 0x05: 80.0},
        extended=True,
        ecu=0x10,
        negative_for=frozenset({0x05}),
    )
    async with responding(ecu):
        await drv.open()
        try:
            got = await gather_until(
                drv,
                lambda ss: (
                    drv.scheduler.drops == 1
                    and {"rpm", "spark_rear_deg"} <= {s.channel for s in ss}
                ),
            )
        finally:
            await drv.close()
    values = {s.channel: s.value for s in got}
    assert values["rpm"] == 2500.0 and values["spark_rear_deg"] == 12.5
    assert "ect2_f" not in values and "ect_f" not in values
    assert drv.scheduler.dropped() == [0x05]  # refused twice -> dropped
    assert ecu.requests[0x05] == 2
    assert drv.codec.counters["negative_replies"] == 2


async def test_obd2_capture_decode(tmp_path: Path) -> None:
    log = tmp_path / "obd.log"
    msgs = [
        frame_to_message(encode_request(0x0C), timestamp=10.0),
        frame_to_message(encode_response(0x0C, 1726.0), timestamp=10.002),
        frame_to_message(encode_request(0x0F), timestamp=10.01),
        frame_to_message(encode_response(0x0F, 30.0), timestamp=10.013),
    ]
    with can.Logger(str(log)) as w:
        for m in msgs:
            w.on_message_received(m)
    samples, stats = Obd2Driver.decode_capture(log)
    assert [(s.t, s.channel, s.value) for s in samples] == [
        (10.002, "rpm", 1726.0),
        (10.013, "iat_f", pytest.approx(86.0)),
    ]
    assert stats.messages == 2 and stats.extra["other_frames"] == 2  # the two requests


def test_driver_option_errors() -> None:
    with pytest.raises(ConfigError):
        Obd2Driver(interface="virtual", pids={"boost": 0.1})
    with pytest.raises(ConfigError):
        Obd2Driver(interface="virtual", timeout_s=0)
    with pytest.raises(ConfigError):
        Obd2Driver(interface="virtual", channel_map={"nope": "rpm"})


async def test_responder_ignores_other_traffic(ecu_bus: can.BusABC) -> None:
    ecu = Obd2Responder(ecu_bus, {0x0C: 1000.0})
    assert ecu.respond(0x7E0, bytes.fromhex("02010C0000000000"), False) is None  # physical id
    assert ecu.respond(0x7DF, bytes.fromhex("0209020000000000"), False) is None  # service 09
    assert ecu.respond(0x7DF, bytes.fromhex("02010B0000000000"), False) is None  # no value
    assert ecu.respond(0x7DF, bytes.fromhex("02010C0000000000"), False) == encode_response(
        0x0C, 1000.0
    )
    assert ecu.requests == {0x0B: 1, 0x0C: 1}

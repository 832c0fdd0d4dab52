"""Tests of the JetDrive codec, receiver state machine, UDP driver, provider and pcap decode.

Golden vectors are written out with explicit struct layouts (never through the encoder under
test): header, ChannelInfo and ChannelValues as in the public client rob9206/DynoAI_3,
api/services/jetdrive_client.py; Ping/Pong and the logging keys are our reading (see
docs/protocols.md, "Dynojet JetDrive"); socket tests use real UDP on loopback, multicast when the
machine delivers it there (it does on Linux with the group joined on 127.0.0.1) and the
unicast fallback otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.jetdrive import JetDriveDriver, random_host_id
from drivers.jetdrive_codec import (
    ChannelDef,
    ChannelInfo,
    ChannelValue,
    ChannelValues,
    ClearChannelInfo,
    Logging,
    Opaque,
    Ping,
    Pong,
    RequestChannelInfo,
    Unit,
    chunk_channel_defs,
    convert_unit,
    decode_datagram,
    decode_header,
    encode_message,
)
from drivers.jetdrive_receiver import RUN_CANCEL, RUN_MARKER, JetDriveReceiver
from drivers.pcap import PcapWriter, ipv4_udp
from dynoai_daemon.errors import ConfigError, DriverOpenError, ProtocolError
from simulators.jetdrive_provider import JetDriveProvider
from simulators.ports import free_port

DYNO = 0x1234
HOST = 0x0BCD
NM = 0.737562149
KW = 1.34102209


# --- hand-written wire layouts (sources above), independent of the codec -------------------------


def hdr(key: int, length: int, source: int, seq: int, dest: int = 0xFFFF) -> bytes:
    """key u8, value length u16, source u16, sequence u8, destination u16, little-endian."""
    return struct.pack("<BHHBH", key, length, source, seq, dest)


def info_msg(
    provider: str, recs: list[tuple[int, str, int]], *, source: int = DYNO, seq: int = 0
) -> bytes:
    value = provider.encode().ljust(50, b"\0")
    for cid, name, unit in recs:
        value += struct.pack("<H", cid) + b"\0" + name.encode().ljust(30, b"\0") + bytes([unit])
    return hdr(0x01, len(value), source, seq) + value


def values_msg(
    recs: list[tuple[int, int, float]], *, source: int = DYNO, seq: int = 1, dest: int = 0xFFFF
) -> bytes:
    value = b"".join(
        struct.pack("<H", c) + struct.pack("<I", t) + struct.pack("<f", v) for c, t, v in recs
    )
    return hdr(0x02, len(value), source, seq, dest) + value


def clear_msg(*, source: int = DYNO, seq: int = 0) -> bytes:
    return hdr(0x03, 0, source, seq)


def pong_msg(
    host_ts: int, remote_ts: int, *, source: int = DYNO, seq: int = 0, dest: int = HOST
) -> bytes:
    value = bytes([1]) + struct.pack("<I", host_ts) + struct.pack("<I", remote_ts)
    return hdr(0x05, len(value), source, seq, dest) + value


def logging_resp(cmd: int, *, source: int = DYNO, seq: int = 0) -> bytes:
    return hdr(0x20, 1, source, seq) + bytes([cmd])


def dyno_info(seq: int = 0) -> bytes:
    return info_msg("Dyno", [(0, "RPM", 8), (1, "Torque", 5)], seq=seq)


# --- codec ----------------------------------------------------------------------------------


def test_header_golden_bytes() -> None:
    # ChannelValues, 10 value bytes, source 0x1234, seq 7, to all hosts; then one record:
    # channel 1, t = 1000 ms, value 100.0 (float32 0x42C80000).
    raw = bytes.fromhex("02 0a00 3412 07 ffff" + "0100 e8030000 0000c842")
    h = decode_header(raw)
    assert (h.key, h.length, h.source, h.seq, h.dest) == (2, 10, 0x1234, 7, 0xFFFF)
    msg = decode_datagram(raw)
    assert msg.body == ChannelValues((ChannelValue(1, 1000, 100.0),))
    assert encode_message(msg.body, source=0x1234, seq=7) == raw


def test_channel_info_golden() -> None:
    raw = dyno_info()
    assert len(raw) == 8 + 50 + 2 * 34
    msg = decode_datagram(raw)
    assert msg.body == ChannelInfo(
        "Dyno", (ChannelDef(0, "RPM", Unit.RPM), ChannelDef(1, "Torque", Unit.NEWTON_METER))
    )
    assert encode_message(msg.body, source=DYNO, seq=0) == raw


def test_small_messages_golden() -> None:
    ping = hdr(0x04, 7, HOST, 3) + bytes([1]) + struct.pack("<I", 123456) + b"ab"
    assert decode_datagram(ping).body == Ping(123456, b"ab", 1)
    assert encode_message(Ping(123456, b"ab"), source=HOST, seq=3) == ping
    pong = pong_msg(123456, 777)
    assert decode_datagram(pong).body == Pong(123456, 777, b"", 1)
    assert encode_message(Pong(123456, 777), source=DYNO, seq=0, dest=HOST) == pong
    assert decode_datagram(hdr(0x03, 0, DYNO, 0)).body == ClearChannelInfo()
    assert encode_message(RequestChannelInfo(), source=HOST, seq=9) == hdr(0x06, 0, HOST, 9)
    assert decode_datagram(logging_resp(1)).body == Logging(True, 1)
    req = hdr(0x10, 1, HOST, 0) + b"\x03"
    assert decode_datagram(req).body == Logging(False, 3)
    assert encode_message(Logging(False, 3), source=HOST, seq=0) == req
    brake = hdr(0x12, 2, HOST, 0) + b"\x01\x02"
    assert decode_datagram(brake).body == Opaque(0x12, b"\x01\x02")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x02\x0a\x00",  # shorter than the header
        values_msg([(1, 1000, 1.0)])[:-1],  # length field larger than what arrived
        hdr(0x02, 9, DYNO, 0) + b"\0" * 9,  # partial value record
        hdr(0x01, 50 + 33, DYNO, 0) + b"\0" * 83,  # partial channel record
        hdr(0x01, 49, DYNO, 0) + b"\0" * 49,  # no room for the provider name
        hdr(0x04, 4, DYNO, 0) + b"\0" * 4,  # short ping
        hdr(0x05, 8, DYNO, 0) + b"\0" * 8,  # short pong
        hdr(0x20, 0, DYNO, 0),  # logging without command
    ],
)
def test_bad_datagrams_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_datagram(raw)


def test_trailing_bytes_are_tolerated_and_counted() -> None:
    msg = decode_datagram(clear_msg() + b"xyz")
    assert msg.trailing == 3
    rx = JetDriveReceiver()
    rx.feed(clear_msg() + b"xyz", 1.0)
    assert rx.stats.trailing_bytes == 3 and rx.stats.bad_frames == 0


def test_encoder_limits() -> None:
    with pytest.raises(ValueError):
        encode_message(ChannelInfo("x" * 51, ()), source=1, seq=0)
    with pytest.raises(ValueError):
        encode_message(ChannelInfo("Dyno", (ChannelDef(0, "n" * 31, 8),)), source=1, seq=0)
    many = tuple(ChannelDef(i, f"ch{i}", 255) for i in range(60))
    with pytest.raises(ValueError, match="MTU"):
        encode_message(ChannelInfo("Dyno", many), source=1, seq=0)
    chunks = list(chunk_channel_defs(many))
    assert [len(c) for c in chunks] == [39, 21]  # (1400 - 8 - 50) // 34 = 39 per datagram
    for c in chunks:
        assert len(encode_message(ChannelInfo("Dyno", c), source=1, seq=0)) <= 1400


def test_unit_conversions() -> None:
    assert convert_unit(100.0, Unit.NEWTON_METER) == pytest.approx(73.7562149)
    assert convert_unit(10.0, Unit.KILOWATT) == pytest.approx(13.4102209)
    assert convert_unit(100.0, Unit.DEG_C) == pytest.approx(212.0)
    assert convert_unit(0.9, Unit.LAMBDA, 14.7) == pytest.approx(13.23)
    for unit in (Unit.KMH, Unit.KPA, Unit.RPM, Unit.AFR, Unit.PERCENT, Unit.NONE):
        assert convert_unit(42.5, unit) == 42.5


# --- receiver -------------------------------------------------------------------------------


def by_channel(samples: list) -> dict[str, float]:  # type: ignore[type-arg]
    return {s.channel: s.value for s in samples}


def test_receiver_golden_rpm_and_torque() -> None:
    rx = JetDriveReceiver(source="dyno", host_id=HOST)
    assert rx.feed(dyno_info(0), 10.0, ("127.0.0.1", 22344)) == []
    out = rx.feed(values_msg([(0, 5000, 3000.0), (1, 5000, 100.0)], seq=1), 10.5)
    assert by_channel(out) == {"rpm": 3000.0, "torque_ftlb": pytest.approx(100.0 * NM)}
    assert all(s.t == 10.5 and s.device_t == 5.0 and s.source == "dyno" for s in out)
    assert rx.stats.messages == 2 and rx.stats.seq_gaps == 0
    assert rx.providers[DYNO].name == "Dyno"
    assert rx.providers[DYNO].addr == ("127.0.0.1", 22344)


def test_default_map_case_units_and_priority() -> None:
    rx = JetDriveReceiver(stoich=14.7)
    recs = [
        (0, "engine rpm", 8),
        (1, "RPM", 8),
        (2, "POWER", 4),
        (3, "AFR 1", 11),
        (4, "afr 2", 13),
        (5, "Map", 7),
        (6, "Throttle", 16),
        (7, "Air Temp", 6),
        (8, "Speed", 2),
    ]
    rx.feed(info_msg("Dyno", recs), 1.0)
    vals = [(0, 10, 2500.0), (1, 10, 2490.0), (2, 10, 50.0), (3, 10, 13.1), (4, 10, 0.9)]
    vals += [(5, 10, 80.0), (6, 10, 55.0), (7, 10, 30.0), (8, 10, 100.0)]
    out = by_channel(rx.feed(values_msg(vals), 1.1))
    assert out["rpm"] == 2500.0  # "Engine RPM" outranks "RPM", which keeps its own name
    assert out["RPM"] == 2490.0
    assert out["power_hp"] == pytest.approx(50.0 * KW)
    assert out["afr_front"] == pytest.approx(13.1)
    assert out["afr_rear"] == pytest.approx(0.9 * 14.7, rel=1e-6)
    assert out["map_kpa"] == 80.0 and out["tps_pct"] == 55.0
    assert out["Air Temp"] == pytest.approx(86.0)
    assert out["Speed"] == 100.0  # km/h kept


def test_channel_map_override() -> None:
    rx = JetDriveReceiver(channel_map={"TORQUE": "torque_raw", "dyno:Engine RPM": "rpm_dyno"})
    rx.feed(info_msg("Dyno", [(0, "Engine RPM", 8), (1, "Torque", 5), (2, "RPM", 8)]), 1.0)
    out = by_channel(rx.feed(values_msg([(0, 1, 1.0), (1, 1, 10.0), (2, 1, 3.0)]), 1.1))
    # Overrides win; with "Engine RPM" taken, the default rpm binding falls to "RPM".
    assert out == {"rpm_dyno": 1.0, "torque_raw": pytest.approx(10.0 * NM), "rpm": 3.0}


def test_multi_packet_channel_info_merges() -> None:
    rx = JetDriveReceiver()
    rx.feed(info_msg("Dyno", [(0, "RPM", 8)], seq=0), 1.0)
    rx.feed(info_msg("Dyno", [(1, "Torque", 5), (2, "Power", 4)], seq=1), 1.0)
    out = by_channel(rx.feed(values_msg([(0, 1, 1.0), (1, 1, 2.0), (2, 1, 3.0)], seq=2), 1.1))
    assert set(out) == {"rpm", "torque_ftlb", "power_hp"}
    assert rx.stats.channel_info_packets == 2 and rx.stats.unknown_channel_values == 0


def test_provider_splits_long_lists_and_receiver_merges() -> None:
    prov = JetDriveProvider(
        name="Dyno", channels=[(f"ch{i}", 255) for i in range(100)], host_id=DYNO
    )
    dgs = prov.channel_info_datagrams()
    assert len(dgs) == 3 and all(len(d) <= 1400 for d in dgs)
    rx = JetDriveReceiver()
    for d in dgs:
        rx.feed(d, 1.0)
    assert len(rx.providers[DYNO].channels) == 100
    out = rx.feed(prov.values_datagrams({"ch99": 7.0, "ch0": 1.0}, ts_ms=5)[0], 1.1)
    assert by_channel(out) == {"ch99": 7.0, "ch0": 1.0}
    assert rx.stats.seq_gaps == 0


def test_unknown_channel_values_held_counted_and_released() -> None:
    rx = JetDriveReceiver(request_interval_s=1.0)
    assert rx.wants_channel_info(0.0)  # nothing known yet: ask
    out = rx.feed(values_msg([(0, 100, 3000.0), (1, 100, 50.0)], seq=0), 0.2)
    assert out == [] and rx.stats.unknown_channel_values == 2 and rx.pending_values() == 2
    assert not rx.wants_channel_info(0.5)  # rate-limited
    assert rx.wants_channel_info(1.1)
    assert not rx.wants_channel_info(1.2)  # consumed
    released = rx.feed(dyno_info(seq=1), 1.3)
    assert by_channel(released) == {"rpm": 3000.0, "torque_ftlb": pytest.approx(50.0 * NM)}
    assert all(s.t == 0.2 for s in released)  # keeps its arrival time
    assert rx.pending_values() == 0 and rx.stats.released_values == 2


def test_held_values_are_bounded() -> None:
    rx = JetDriveReceiver(hold_limit=3)
    for i in range(5):
        rx.feed(values_msg([(9, i, float(i))], seq=i), 0.1 * i)
    assert rx.pending_values() == 3 and rx.stats.held_dropped == 2


def test_info_refresh_after_30s() -> None:
    rx = JetDriveReceiver(info_refresh_s=30.0)
    rx.note_request_sent(0.0)
    rx.feed(dyno_info(), 0.1)
    assert not rx.wants_channel_info(20.0)
    rx.feed(values_msg([(0, 1, 1.0)]), 29.0)
    assert not rx.wants_channel_info(29.0)
    assert rx.wants_channel_info(30.5)
    assert not rx.wants_channel_info(31.0)


def test_clear_channel_info_and_fresh_list() -> None:
    rx = JetDriveReceiver()
    rx.feed(dyno_info(seq=0), 1.0)
    assert rx.feed(clear_msg(seq=1), 1.1) == []
    assert rx.providers[DYNO].channels == {}
    assert rx.feed(values_msg([(0, 1200, 2000.0)], seq=2), 1.2) == []  # unknown after Clear
    assert rx.stats.unknown_channel_values == 1
    # The new list swaps the ids: id 0 is now Torque.
    out = rx.feed(info_msg("Dyno", [(0, "Torque", 5), (1, "RPM", 8)], seq=3), 1.3)
    assert by_channel(out) == {"torque_ftlb": pytest.approx(2000.0 * NM)}
    assert rx.stats.provider_reboots == 1 and rx.stats.clears == 1


def test_ignored_sources_and_destinations() -> None:
    rx = JetDriveReceiver(host_id=HOST)
    assert rx.feed(info_msg("Ghost", [(0, "RPM", 8)], source=0xFFFF), 1.0) == []
    assert rx.stats.ignored_source == 1 and rx.providers == {}
    assert rx.feed(info_msg("Me", [(0, "RPM", 8)], source=HOST), 1.0) == []
    assert rx.stats.own_messages == 1
    rx.feed(dyno_info(seq=0), 1.0)
    assert rx.feed(values_msg([(0, 1, 1.0)], seq=1, dest=0x7777), 1.1) == []
    assert rx.stats.not_for_us == 1
    assert by_channel(rx.feed(values_msg([(0, 1, 2.0)], seq=2, dest=HOST), 1.2)) == {"rpm": 2.0}
    assert rx.stats.seq_gaps == 0


def test_sequence_gaps_out_of_order_and_wrap() -> None:
    rx = JetDriveReceiver()
    rx.feed(dyno_info(seq=250), 1.0)
    for seq in (251, 255, 0, 1):  # 252..254 missing (3); 255 -> 0 wraps cleanly
        rx.feed(values_msg([(0, 10, 1.0)], seq=seq), 1.0)
    assert rx.stats.seq_gaps == 3 and rx.stats.out_of_order == 0
    rx.feed(values_msg([(0, 10, 1.0)], seq=253), 1.0)  # a late one
    rx.feed(values_msg([(0, 10, 1.0)], seq=1), 1.0)  # a duplicate
    assert rx.stats.out_of_order == 2
    rx.feed(values_msg([(0, 10, 1.0)], seq=2), 1.0)
    assert rx.stats.seq_gaps == 3


def test_truncated_datagram_is_counted_not_raised() -> None:
    rx = JetDriveReceiver()
    rx.feed(dyno_info(), 1.0)
    assert rx.feed(values_msg([(0, 1, 1.0), (1, 1, 2.0)])[:-3], 1.1) == []
    assert rx.stats.bad_frames == 1 and rx.last_error is not None and "truncated" in rx.last_error
    assert rx.feed(values_msg([(0, 1, 1.0)], seq=2), 1.2)  # keeps going


def test_reboot_by_timestamp_jump_back() -> None:
    rx = JetDriveReceiver(host_id=HOST, reboot_margin_ms=2000)
    rx.feed(dyno_info(seq=0), 100.0)
    rx.feed(pong_msg(100_000, 50_000, seq=1), 100.01)
    assert rx.clock_offset(DYNO) is not None
    rx.feed(values_msg([(0, 50_000, 1.0)], seq=57), 100.1)
    rx.feed(values_msg([(0, 49_000, 1.0)], seq=58), 100.2)  # within the margin: jitter
    assert rx.stats.provider_reboots == 0
    out = rx.feed(values_msg([(0, 300, 2.0)], seq=0), 101.0)  # clock and seq restarted
    assert by_channel(out) == {"rpm": 2.0}  # keeps going with the old channel table
    assert rx.stats.provider_reboots == 1
    assert rx.clock_offset(DYNO) is None  # alignment reset
    seq_gaps, ooo = rx.stats.seq_gaps, rx.stats.out_of_order
    rx.feed(values_msg([(0, 400, 2.0)], seq=1), 101.1)
    assert (rx.stats.seq_gaps, rx.stats.out_of_order) == (seq_gaps, ooo)
    assert rx.stats.provider_reboots == 1


def test_device_clock_wrap_is_not_a_reboot() -> None:
    rx = JetDriveReceiver()
    rx.feed(dyno_info(seq=0), 1.0)
    rx.feed(values_msg([(0, 2**32 - 500, 1.0)], seq=1), 1.0)
    rx.feed(values_msg([(0, 300, 1.0)], seq=2), 1.8)
    assert rx.stats.provider_reboots == 0


def test_forward_jump_far_beyond_elapsed_time_is_a_reboot() -> None:
    rx = JetDriveReceiver()
    rx.feed(dyno_info(seq=0), 1.0)
    rx.feed(values_msg([(0, 3_000_000_000, 1.0)], seq=1), 1.0)
    rx.feed(values_msg([(0, 100, 1.0)], seq=2), 2.0)  # boot after > 24.8 days of uptime
    assert rx.stats.provider_reboots == 1


def test_ping_pong_offset_uses_smallest_rtt() -> None:
    rx = JetDriveReceiver(host_id=HOST, use_device_time=True)
    rx.feed(dyno_info(seq=0), 100.0)
    # Ping at 100.000 s (host ts 100000 ms), Pong back at 100.040: rtt 40 ms.
    rx.feed(pong_msg(100_000, 5_000, seq=1), 100.040)
    assert rx.clock_offset(DYNO) == pytest.approx(100.040 - 5.0 - 0.020)
    # A faster round trip replaces it ...
    rx.feed(pong_msg(102_000, 7_030, seq=2), 102.010)
    best = 102.010 - 7.030 - 0.005
    assert rx.clock_offset(DYNO) == pytest.approx(best)
    # ... a slower one does not.
    rx.feed(pong_msg(104_000, 9_000, seq=3), 104.080)
    assert rx.clock_offset(DYNO) == pytest.approx(best)
    assert rx.providers[DYNO].rtt_ms == 10.0
    # A Pong for a Ping older than 10 s is stale; a Pong for another host is ignored.
    rx.feed(pong_msg(50_000, 9_000, seq=4), 104.1)
    rx.feed(pong_msg(104_050, 1, seq=5, dest=0x4444), 104.1)
    assert rx.stats.stale_pongs == 1 and rx.stats.not_for_us == 1
    assert rx.clock_offset(DYNO) == pytest.approx(best)
    # With device time on, t is the aligned device time (never after arrival).
    out = rx.feed(values_msg([(0, 10_000, 3000.0)], seq=6), 105.5)
    assert out[0].t == pytest.approx(10.0 + best) and out[0].t <= 105.5
    assert out[0].device_t == 10.0
    assert rx.aligned_time(DYNO, 10.0) == pytest.approx(10.0 + best)


def test_logging_responses_become_run_markers() -> None:
    rx = JetDriveReceiver(source="dyno")
    assert by_channel(rx.feed(logging_resp(1, seq=0), 5.0)) == {RUN_MARKER: 1.0}
    assert by_channel(rx.feed(logging_resp(0, seq=1), 9.0)) == {RUN_MARKER: 0.0}
    assert by_channel(rx.feed(logging_resp(2, seq=2), 9.5)) == {RUN_MARKER: 0.0, RUN_CANCEL: 1.0}
    assert rx.feed(logging_resp(3, seq=3), 9.6) == []  # query
    assert rx.feed(hdr(0x10, 1, DYNO, 4) + b"\x01", 9.7) == []  # a request is not a marker
    assert rx.stats.run_markers == 3


def test_provider_answers_request_and_ping() -> None:
    now = [50.0]
    prov = JetDriveProvider(name="Dyno", channels=[("RPM", 8)], host_id=DYNO, clock=lambda: now[0])
    now[0] = 52.5
    replies = prov.handle(hdr(0x06, 0, HOST, 0))
    assert len(replies) == 1 and replies[0][1] is False
    assert decode_datagram(replies[0][0]).body == ChannelInfo("Dyno", (ChannelDef(0, "RPM", 8),))
    ((pong, to_sender),) = prov.handle(hdr(0x04, 5, HOST, 1) + b"\x01" + struct.pack("<I", 777))
    msg = decode_datagram(pong)
    assert to_sender and msg.header.dest == HOST and msg.header.source == DYNO
    assert msg.body == Pong(777, 2500)
    assert prov.handle(b"\x01\x02") == [] and prov.bad_datagrams == 1
    assert prov.handle(hdr(0x06, 0, DYNO, 0)) == []  # its own request looped back
    assert [decode_header(d).seq for d in prov.values_datagrams({"rpm": 1.0})] == [2]


def test_host_ids_and_option_validation() -> None:
    ids = {random_host_id() for _ in range(2000)}
    assert 0 not in ids and 0xFFFF not in ids
    with pytest.raises(ConfigError):
        JetDriveDriver(host_id=0xFFFF)
    with pytest.raises(ConfigError):
        JetDriveDriver(group="not-an-ip")
    with pytest.raises(ConfigError):
        JetDriveDriver(port=70000)
    with pytest.raises(ConfigError):
        JetDriveDriver(peers=["127.0.0.1:0"])
    drv = JetDriveDriver()
    assert 0 < drv.host_id < 0xFFFF and drv.name == "jetdrive" and drv.kind == "udp"


# --- fuzz -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_any_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_datagram(data)
    rx = JetDriveReceiver(host_id=HOST)
    rx.feed(data, 1.0)
    assert rx.stats.datagrams == 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 4, 5, 6, 0x10, 0x20, 0x11, 0x77]),
            st.integers(0, 0xFFFF),
            st.integers(0, 255),
            st.binary(max_size=120),
            st.integers(-3, 3),
        ),
        max_size=25,
    )
)
def test_fuzz_receiver_with_plausible_headers(
    msgs: list[tuple[int, int, int, bytes, int]],
) -> None:
    rx = JetDriveReceiver(host_id=HOST, hold_limit=16)
    t = 0.0
    for key, source, seq, value, skew in msgs:
        raw = hdr(key, max(0, len(value) + skew), source, seq) + value
        t += 0.01
        for s in rx.feed(raw, t):
            assert isinstance(s.value, float)
        rx.wants_channel_info(t)
    assert rx.stats.datagrams == len(msgs)
    assert rx.pending_values() <= 16 * max(1, len(rx.providers))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.floats(width=32)),
        max_size=139,
    )
)
def test_values_round_trip(recs: list[tuple[int, int, float]]) -> None:
    body = ChannelValues(tuple(ChannelValue(*r) for r in recs))
    raw = encode_message(body, source=DYNO, seq=5)
    assert len(raw) <= 1400
    got = decode_datagram(raw).body
    assert isinstance(got, ChannelValues)
    for a, b in zip(got.values, body.values, strict=True):
        assert (a.id, a.ts_ms) == (b.id, b.ts_ms)
        assert (math.isnan(a.value) and math.isnan(b.value)) or a.value == b.value


# --- real UDP on loopback -------------------------------------------------------------------


def loopback_multicast_works(group: str, port: int) -> bool:
    """Probe: can a socket joined on 127.0.0.1 receive a group datagram sent out of lo?"""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", port))
        rx.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            socket.inet_aton(group) + socket.inet_aton("127.0.0.1"),
        )
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)  # never leaves the host
        tx.sendto(b"probe", (group, port))
        rx.settimeout(1.0)
        return rx.recv(16) == b"probe"
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


async def next_batch(it: AsyncIterator[list], limit_s: float = 5.0) -> list:  # type: ignore[type-arg]
    async with asyncio.timeout(limit_s):
        return await anext(it)


async def collect_until(it: AsyncIterator[list], channel: str, feed=None) -> list:  # type: ignore[no-untyped-def,type-arg]
    got: list = []  # type: ignore[type-arg]
    for _ in range(200):
        if feed is not None:
            feed()
        batch = await next_batch(it)
        got.extend(batch)
        if any(s.channel == channel for s in batch):
            return got
    raise AssertionError(f"no {channel} sample")


@contextlib.asynccontextmanager
async def running(*objs):  # type: ignore[no-untyped-def]
    try:
        yield
    finally:
        for o in reversed(objs):
            await o.close()


MC_GROUP = "224.0.2.10"


async def test_multicast_loopback_provider_and_driver() -> None:
    port = free_port("udp")
    if not loopback_multicast_works(MC_GROUP, port):
        pytest.skip("multicast is not delivered on loopback here (the unicast tests cover it)")
    prov = JetDriveProvider(name="Dyno", channels=[("RPM", 8), ("Torque", 5)], host_id=DYNO)
    drv = JetDriveDriver(
        source="dyno",
        group=MC_GROUP,
        port=port,
        interface_address="127.0.0.1",
        ttl=0,
        host_id=HOST,
        reconnect=False,
        ping_interval_s=0.05,
    )
    other = JetDriveDriver(
        source="dyno2",
        group=MC_GROUP,
        port=port,
        interface_address="127.0.0.1",
        ttl=0,
        reconnect=False,
    )
    async with running(prov, drv, other):
        await prov.start(group=MC_GROUP, port=port, interface_address="127.0.0.1", ttl=0)
        await drv.open()
        await other.open()
        assert drv.mode == "multicast" and other.mode == "multicast"
        it = aiter(drv.samples())
        send = lambda: prov.send_values({"RPM": 3000.0, "Torque": 100.0})  # noqa: E731
        got = await collect_until(it, "torque_ftlb", send)
        vals = {s.channel: s.value for s in got}
        assert vals["rpm"] == 3000.0 and vals["torque_ftlb"] == pytest.approx(100.0 * NM)
        assert prov.requests_answered >= 1  # the driver asked and the provider answered
        # Keep the values flowing until a Pong has aligned the clock.
        for _ in range(200):
            if drv.receiver.clock_offset(DYNO) is not None:
                break
            send()
            await next_batch(it)
        off = drv.receiver.clock_offset(DYNO)
        assert off is not None and prov.pings_answered >= 1
        # Both share time.monotonic: monotonic - device seconds = the provider's boot time,
        # to within what one round trip can tell: half the best round trip seen (the
        # unknown split of out and back) plus the 1 ms steps of both timestamps. The
        # bound comes from the measured round trip, not from a guess at host speed.
        rtt_ms = drv.receiver.providers[DYNO].rtt_ms
        assert rtt_ms is not None
        assert off == pytest.approx(prov.boot, abs=rtt_ms / 2000.0 + 0.003)
        # A second program on the same port hears the same multicast stream.
        it2 = aiter(other.samples())
        got2 = await collect_until(it2, "rpm", send)
        assert any(s.source == "dyno2" for s in got2)
        # Run markers from logging responses.
        prov.send_logging(1)  # type: ignore[arg-type]
        markers = await collect_until(it, RUN_MARKER)
        assert [s.value for s in markers if s.channel == RUN_MARKER] == [1.0]
        assert drv.stats.extra["sent"] >= 2 and drv.stats.bad_frames == 0
        assert drv.stats.messages >= 3 and drv.stats.online


async def test_unicast_mode_with_peer() -> None:
    port = free_port("udp")
    opened = asyncio.Event()
    prov = JetDriveProvider(name="Dyno", channels=[("Engine RPM", 8), ("Power", 4)], host_id=DYNO)
    await prov.start(group="127.0.0.1", target=("127.0.0.1", port), interface_address="127.0.0.1")
    assert prov.local_address is not None
    drv = JetDriveDriver(
        group="127.0.0.1",
        port=port,
        interface_address="127.0.0.1",
        host_id=HOST,
        peers=[f"127.0.0.1:{prov.local_address[1]}"],
        ping_interval_s=0.05,
        on_availability=lambda _src, online, _why: online and opened.set(),  # type: ignore[func-returns-value]
    )
    async with running(prov, drv):
        await drv.open()  # default reconnect=True: the socket opens in the background
        async with asyncio.timeout(5):
            await opened.wait()
        it = aiter(drv.samples())
        got = await collect_until(it, "power_hp", lambda: prov.send_values({"Power": 10.0}))
        assert drv.mode == "unicast" and drv.stats.online
        assert {s.channel: s.value for s in got}["power_hp"] == pytest.approx(10.0 * KW)
        assert prov.requests_answered >= 1  # the start request reached the configured peer
        for _ in range(200):
            if drv.receiver.clock_offset(DYNO) is not None:
                break
            prov.send_values({"Engine RPM": 1000.0})
            await next_batch(it)
        assert drv.receiver.clock_offset(DYNO) is not None


async def test_unicast_fallback_when_join_fails() -> None:
    port = free_port("udp")
    # 203.0.113.7 (TEST-NET-3) is no interface of this host: the kernel refuses the join
    # with ENODEV before anything is sent, a real failure rather than a mock.
    drv = JetDriveDriver(
        group=MC_GROUP,
        port=port,
        interface_address="203.0.113.7",
        host_id=HOST,
        unicast_fallback=True,
        reconnect=False,
    )
    prov = JetDriveProvider(name="Dyno", channels=[("RPM", 8), ("Torque", 5)], host_id=DYNO)
    async with running(prov, drv):
        await drv.open()
        assert drv.mode == "unicast" and drv.stats.extra["multicast_join_failures"] == 1
        # The provider announces on start, then streams; the driver learns its address.
        await prov.start(group="127.0.0.1", target=("127.0.0.1", port))
        it = aiter(drv.samples())
        got = await collect_until(it, "rpm", lambda: prov.send_values({"RPM": 1234.0}))
        assert {s.channel: s.value for s in got}["rpm"] == 1234.0
        assert drv.receiver.providers[DYNO].addr == prov.local_address
        # Unknown values trigger a RequestChannelInfo to the learned unicast address.
        before = prov.requests_answered
        prov.send([prov.clear_datagram()])
        prov.send_values({"RPM": 1.0})  # held: the list was cleared
        batch = await next_batch(it)  # released once the re-requested list arrives
        assert [(s.channel, s.value) for s in batch] == [("rpm", 1.0)]
        assert prov.requests_answered > before
        assert drv.stats.extra["unknown_channel_values"] >= 1


async def test_open_fails_without_fallback() -> None:
    drv = JetDriveDriver(
        group=MC_GROUP,
        port=free_port("udp"),
        interface_address="203.0.113.7",
        unicast_fallback=False,
        reconnect=False,
    )
    with pytest.raises(DriverOpenError, match=r"203\.0\.113\.7"):
        await drv.open()
    await drv.close()


# --- offline capture ------------------------------------------------------------------------


def test_decode_capture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "dyno.pcap"
    t0 = 1_700_000_000.0
    with PcapWriter(path) as w:
        w.write_udp(values_msg([(0, 900, 2900.0)], seq=0), t0)  # before ChannelInfo: held
        w.write_udp(dyno_info(seq=1), t0 + 0.1)
        w.write_udp(values_msg([(0, 1000, 3000.0), (1, 1000, 100.0)], seq=2), t0 + 0.2)
        w.write_udp(values_msg([(0, 1050, 3050.0)], seq=3)[:-2], t0 + 0.25)  # truncated
        w.write_udp(values_msg([(0, 1100, 3100.0)], seq=5), t0 + 0.3)  # seq 4 missing
        w.write_udp(b"not jetdrive", t0 + 0.35, sport=53, dport=53)
        w.write_record(w.frame(ipv4_udp(b"x", flags_frag=0x2000)), t0 + 0.4)  # fragment
        w.write_udp(logging_resp(0, seq=6), t0 + 0.5)
        w.write_record(w.frame(ipv4_udp(values_msg([(0, 1200, 1.0)], seq=7))), t0 + 0.6)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the last record is cut short
    samples, stats = JetDriveDriver.decode_capture(
        path, source="cap", port=22344, group="224.0.2.10"
    )
    rows = [(round(s.t - t0, 3), s.channel, round(s.value, 4)) for s in samples]
    assert rows == [
        (0.0, "rpm", 2900.0),
        (0.2, "rpm", 3000.0),
        (0.2, "torque_ftlb", round(100.0 * NM, 4)),
        (0.3, "rpm", 3100.0),
        (0.5, RUN_MARKER, 0.0),
    ]
    assert samples[1].device_t == 1.0 and samples[0].source == "cap"
    assert stats.bad_frames == 1 and stats.samples == 5
    assert stats.extra["seq_gaps"] == 2  # seq 3 (the truncated one, unreadable) and seq 4
    assert stats.extra["other_ports"] == 1
    assert stats.extra["pcap_fragments"] == 1
    assert stats.extra["pcap_truncated_records"] == 1
    assert stats.extra["unknown_channel_values"] == 1 and stats.extra["held_values"] == 0


def test_decode_capture_reads_pcapng(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "dyno.pcapng"
    with PcapWriter(path, pcapng=True) as w:
        w.write_udp(dyno_info(seq=0), 10.0)
        w.write_udp(values_msg([(0, 1000, 3000.0)], seq=1), 10.5)
    samples, stats = JetDriveDriver.decode_capture(path, source="cap")
    assert [(s.t, s.channel, s.value) for s in samples] == [(10.5, "rpm", 3000.0)]
    assert stats.extra["pcap_records"] == 2 and stats.extra["pcap_truncated_records"] == 0

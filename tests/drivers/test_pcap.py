"""Tests of the pcap/pcapng adapter over dpkt used by ``dynoai decode`` for UDP drivers.

Classic captures are laid out by hand with struct (global header, record headers, link-layer
headers, IPv4 and UDP) so the reader is checked against the file format itself, not against
the library; pcapng files are written by the library and read back, whole and cut short.
"""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.pcap import (
    PcapReader,
    PcapWriter,
    UdpDatagram,
    ipv4_udp,
    read_udp,
)
from dynoai_daemon.errors import InputError

PAYLOAD = b"\x02\x0a\x00\x34\x12\x07\xff\xff" + b"\x01\x00\xe8\x03\x00\x00\x00\x00\xc8\x42"


def ip_udp_by_hand(
    payload: bytes,
    src: bytes = bytes([10, 0, 0, 5]),
    dst: bytes = bytes([224, 0, 2, 10]),
    sport: int = 22344,
    dport: int = 22344,
    *,
    options: bytes = b"",
    flags_frag: int = 0,
    proto: int = 17,
) -> bytes:
    """IPv4 header (no checksum; readers do not verify it) + UDP header + payload."""
    ihl = 5 + len(options) // 4
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    total = ihl * 4 + len(udp)
    ip = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, flags_frag, 64, proto, 0, src, dst)
    return ip + options + udp


def pcap_by_hand(
    records: list[tuple[int, int, bytes]],
    *,
    linktype: int,
    order: str = "<",
    nanos: bool = False,
    cut: int = 0,
) -> bytes:
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, data in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), len(data)) + data
    return out[: len(out) - cut] if cut else out


ETH = b"\x01\x00\x5e\x00\x02\x0a" + b"\x02\x00\x00\x00\x00\x07"


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nanos", [False, True])
@pytest.mark.parametrize(
    ("linktype", "prefix"),
    [
        (1, ETH + b"\x08\x00"),
        (1, ETH + b"\x81\x00\x00\x05" + b"\x08\x00"),  # 802.1Q tag
        (101, b""),
        (228, b""),
        (113, struct.pack(">HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x07\0\0", 0x0800)),
        (276, struct.pack(">HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\0" * 8)),
        (0, struct.pack("<I", 2)),
        (0, struct.pack(">I", 2)),
        (108, struct.pack(">I", 2)),
    ],
)
def test_link_types_orders_and_resolutions(
    order: str, nanos: bool, linktype: int, prefix: bytes
) -> None:
    frac = 123_456_789 if nanos else 123_456
    raw = pcap_by_hand(
        [(1_700_000_000, frac, prefix + ip_udp_by_hand(PAYLOAD))],
        linktype=linktype,
        order=order,
        nanos=nanos,
    )
    dgs, stats = read_udp(raw)
    assert dgs == [
        UdpDatagram(
            pytest.approx(1_700_000_000.123456789 if nanos else 1_700_000_000.123456, abs=1e-6),  # type: ignore[arg-type]
            "10.0.0.5",
            22344,
            "224.0.2.10",
            22344,
            PAYLOAD,
        )
    ]
    assert stats.records == 1 and stats.udp == 1 and stats.truncated_records == 0


def test_ihl_options_padding_fragments_and_non_udp() -> None:
    recs = [
        (1, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"opts", options=b"\x01\x01\x01\x00")),
        (2, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"pad") + b"\0" * 20),  # Ethernet padding
        (3, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"frag", flags_frag=0x2000)),  # MF set
        (4, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"tail", flags_frag=0x0010)),  # offset
        (5, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"tcp!", proto=6)),
        (6, 0, ETH + b"\x86\xdd" + b"\0" * 40),  # IPv6
        (7, 0, ETH + b"\x08\x00" + b"\x45\x00"),  # too short for IPv4
        (8, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"ok")),
    ]
    dgs, stats = read_udp(pcap_by_hand(recs, linktype=1))
    assert [(d.t, d.payload) for d in dgs] == [(1.0, b"opts"), (2.0, b"pad"), (8.0, b"ok")]
    assert (stats.fragments, stats.non_udp, stats.non_ipv4, stats.bad_ip) == (2, 1, 1, 1)
    assert stats.records == 8


@pytest.mark.parametrize("cut", [1, 10, 16 + 5, 16 + len(ETH) + 30])
def test_truncated_final_record_is_reported(cut: int) -> None:
    recs = [
        (1, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"one")),
        (2, 0, ETH + b"\x08\x00" + ip_udp_by_hand(b"two")),
    ]
    raw = pcap_by_hand(recs, linktype=1, cut=cut)
    with PcapReader(io.BytesIO(raw)) as r:
        got = [d.payload for d in r.udp_datagrams()]
        assert r.truncated and r.stats.truncated_records == 1
    assert got == [b"one"]


def test_snapped_udp_payload_is_counted() -> None:
    pkt = ETH + b"\x08\x00" + ip_udp_by_hand(b"0123456789")
    dgs, stats = read_udp(pcap_by_hand([(1, 0, pkt[:-4])], linktype=1))
    assert dgs[0].payload == b"012345" and stats.snapped_udp == 1


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "too short"),
        (b"\x0a\x0d\x0d\x0a" + b"\0" * 40, "pcapng"),
        (b"GIF89a" + b"\0" * 30, "not a pcap"),
        (struct.pack("<I", 0xA1B2C3D4) + b"\0" * 4, "truncated pcap global header"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 147), "link type 147"),
    ],
)
def test_bad_files_raise_input_error(raw: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        read_udp(raw)


def test_missing_file_names_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError) as ei:
        PcapReader(tmp_path / "nope.pcap")
    assert "nope.pcap" in str(ei.value)


def test_writer_golden_header_and_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    w = PcapWriter(buf, linktype=101)
    w.write_record(b"\x45abc", 12.5)
    w.close()
    assert buf.getvalue() == (
        struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
        + struct.pack("<IIII", 12, 500_000, 4, 4)
        + b"\x45abc"
    )


def test_ipv4_udp_checksums_and_fields() -> None:
    pkt = ipv4_udp(b"hi", src="127.0.0.1", dst="224.0.2.10", sport=1000, dport=22344)

    def fold(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        s = sum(struct.unpack(f">{len(data) // 2}H", data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return s

    assert fold(pkt[:20]) == 0xFFFF  # a valid IPv4 header sums to all ones
    pseudo = pkt[12:20] + struct.pack(">BBH", 0, 17, len(pkt) - 20)
    assert fold(pseudo + pkt[20:]) == 0xFFFF
    assert struct.unpack(">HHH", pkt[20:26]) == (1000, 22344, 10)
    assert pkt[28:] == b"hi"


@pytest.mark.parametrize("linktype", [0, 1, 101, 108, 113, 228, 276])
@pytest.mark.parametrize(("nanosecond", "pcapng"), [(False, False), (True, False), (False, True)])
def test_writer_round_trip(tmp_path, linktype: int, nanosecond: bool, pcapng: bool) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / ("x.pcapng" if pcapng else "x.pcap")
    with PcapWriter(path, linktype=linktype, nanosecond=nanosecond, pcapng=pcapng) as w:
        w.write_udp(b"first", 100.25, src="127.0.0.1", sport=40000)
        w.write_udp(b"second", 100.5, dst="127.0.0.1", dport=22345)
    assert (path.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a") == pcapng  # the library wrote it
    dgs, stats = read_udp(path)
    assert stats.records == 2 and stats.truncated_records == 0
    assert [(d.t, d.src, d.sport, d.dst, d.dport, d.payload) for d in dgs] == [
        (100.25, "127.0.0.1", 40000, "224.0.2.10", 22344, b"first"),
        (100.5, "127.0.0.1", 22344, "127.0.0.1", 22345, b"second"),
    ]


def test_writer_snaplen_cuts_records() -> None:
    buf = io.BytesIO()
    with PcapWriter(buf, linktype=101, snaplen=30) as w:
        w.write_udp(b"x" * 40, 1.0)
    buf.seek(0)
    with PcapReader(buf) as r:
        (rec,) = list(r.records())
    assert len(rec.data) == 30
    buf.seek(0)
    assert read_udp(buf)[1].snapped_udp == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0, 1, 101, 113, 276]))
def test_fuzz_records_never_crash(body: bytes, linktype: int) -> None:
    raw = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype) + body
    dgs, stats = read_udp(raw)
    assert stats.udp == len(dgs)


@pytest.mark.parametrize("cut", [1, 6, 20])
def test_pcapng_truncated_final_block_is_reported(cut: int) -> None:
    buf = io.BytesIO()
    with PcapWriter(buf, pcapng=True) as w:
        w.write_udp(b"one", 1.0)
        w.write_udp(b"two", 2.0)
    raw = buf.getvalue()
    with PcapReader(io.BytesIO(raw[:-cut])) as r:
        got = [d.payload for d in r.udp_datagrams()]
        assert r.pcapng and r.truncated and r.stats.truncated_records == 1
    assert got == [b"one"]
    whole, stats = read_udp(raw)
    assert [(d.t, d.payload) for d in whole] == [(1.0, b"one"), (2.0, b"two")]
    assert stats.truncated_records == 0


def _empty_pcapng(linktype: int) -> bytes:
    buf = io.BytesIO()
    PcapWriter(buf, linktype=linktype, pcapng=True).close()
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([1, 101, 113]), st.data())
def test_fuzz_pcapng_blocks_never_crash(body: bytes, linktype: int, data: st.DataObject) -> None:
    head = _empty_pcapng(linktype)
    # half the cases start with a plausible block header so the block parsers get exercised
    if data.draw(st.booleans()):
        blk_type = data.draw(st.sampled_from([1, 2, 3, 5, 6, 0x0A0D0D0A]))
        body = struct.pack("<II", blk_type, data.draw(st.integers(0, 400))) + body
    dgs, stats = read_udp(head + body)
    assert stats.udp == len(dgs)

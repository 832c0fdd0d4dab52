"""AEM UEGO gauge serial codec and driver decoding: golden lines from AEM's 30-0300 manual
(doc 10-0300, "Serial (RS-232) Output": the value then CR LF, e.g. "14.7\r\n"), line
framing under any chunking, bad lines counted (never fatal), hypothesis fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.aem_serial import AemDecoder, AemSerialDriver, encode_line, parse_line
from dynoai_daemon.errors import ConfigError, ProtocolError

# The protocol text's example: the gauge prints "14.7\r\n" (ASCII, CR LF).
GOLDEN = b"14.7\r\n"


def test_golden_line() -> None:
    dec = AemDecoder()
    assert dec.feed(GOLDEN) == [14.7]
    assert dec.bad_frames == 0 and dec.skipped_bytes == 0 and dec.lines == 1
    assert encode_line(14.7) == GOLDEN
    assert encode_line(0.998, decimals=3) == b"0.998\r\n"


@pytest.mark.parametrize(
    ("line", "value"),
    [(b"14.7", 14.7), (b" 9.8 ", 9.8), (b"0.85", 0.85), (b"12", 12.0), (b".9", 0.9)],
)
def test_parse_line_accepts_plain_decimals(line: bytes, value: float) -> None:
    assert parse_line(line) == pytest.approx(value)


@pytest.mark.parametrize(
    "line", [b"nan", b"inf", b"1e3", b"1_4.7", b"LEAN", b"-14.7", b"14.7x", b""]
)
def test_parse_line_rejects_junk(line: bytes) -> None:
    assert parse_line(line) is None


def test_split_and_byte_by_byte() -> None:
    stream = b"14.7\r\n13.2\r\n12.9\r\n"
    for cut in range(1, len(stream)):
        dec = AemDecoder()
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == [14.7, 13.2, 12.9], cut
    dec = AemDecoder()
    got: list[float] = []
    for b in stream:
        got += dec.feed(bytes([b]))
    assert got == [14.7, 13.2, 12.9]


def test_bare_cr_and_lf_terminators() -> None:
    dec = AemDecoder()
    assert dec.feed(b"14.7\r13.1\n\r\n\n12.5\r") == [14.7, 13.1, 12.5]
    assert dec.bad_frames == 0


def test_junk_lines_counted_not_fatal() -> None:
    dec = AemDecoder((5.0, 30.0))
    got = dec.feed(b"14.7\r\n\x00\xffgarbage\r\n13.0\r\n1.02\r\n99.0\r\n12.0\r\n")
    assert got == [14.7, 13.0, 12.0]
    # "\x00\xffgarbage" does not parse; 1.02 and 99.0 parse but are out of the AFR range.
    assert dec.bad_frames == 3 and dec.out_of_range == 2
    assert dec.skipped_bytes == len(b"\x00\xffgarbage") + len(b"1.02") + len(b"99.0")


def test_overlong_line_is_dropped_whole() -> None:
    dec = AemDecoder()
    junk = b"7" * 100
    got = dec.feed(junk[:50]) + dec.feed(junk[50:] + b"\r\n14.7\r\n")
    assert got == [14.7]
    assert dec.bad_frames == 1 and dec.skipped_bytes == 100


def test_flush_decodes_unterminated_last_line() -> None:
    dec = AemDecoder()
    assert dec.feed(b"14.7\r\n13.9") == [14.7]
    assert dec.flush() == [13.9]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(1, 40), max_size=20))
def test_fuzz_any_bytes(data: bytes, cuts: list[int]) -> None:
    """Any bytes, any chunking: the same readings, all positive, or a ProtocolError."""
    try:
        whole_dec = AemDecoder()
        whole = whole_dec.feed(data)
        dec = AemDecoder()
        got: list[float] = []
        pos = 0
        for c in cuts:
            got += dec.feed(data[pos : pos + c])
            pos += c
        got += dec.feed(data[pos:])
    except ProtocolError:
        return
    assert got == whole
    assert dec.bad_frames == whole_dec.bad_frames
    assert all(v > 0 for v in got)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(5.0, 30.0), max_size=20), noise=st.binary(max_size=30))
def test_fuzz_roundtrip_after_noise(values: list[float], noise: bytes) -> None:
    dec = AemDecoder((5.0, 30.0))
    stream = noise + b"\r\n" + b"".join(encode_line(v, 2) for v in values)
    got = dec.feed(stream)
    assert got[len(got) - len(values) :] == [round(v, 2) for v in values]


def test_driver_modes() -> None:
    afr = AemSerialDriver(source="g")
    out: list = []
    assert afr.ingest(b"14.7\r\n1.0\r\n", 2.0, out) == 1
    assert [(s.channel, s.value, s.t, s.source) for s in out] == [("afr_front", 14.7, 2.0, "g")]
    assert afr.sync_stats().bad_frames == 1  # 1.0 is no AFR: a gauge left in lambda mode
    lam = AemSerialDriver(mode="lambda", channel="afr_rear", stoich=14.7)
    out = []
    lam.ingest(b"0.85\r\n", 1.0, out)
    assert [(s.channel, s.value) for s in out] == [("afr_rear", pytest.approx(12.495))]


def test_driver_options_validated() -> None:
    with pytest.raises(ConfigError):
        AemSerialDriver(mode="volts")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        AemSerialDriver(channel="")
    with pytest.raises(ConfigError):
        AemSerialDriver(valid_range=(3.0, 1.0))


def test_decode_capture_nominal_timing() -> None:
    samples, stats = AemSerialDriver.decode_capture(b"14.7\r\nxx\r\n13.5\r\n12.25", source="g")
    assert [(s.t, s.value) for s in samples] == [(0.0, 14.7), (0.1, 13.5), (0.2, 12.25)]
    assert stats.messages == 3 and stats.bad_frames == 1 and stats.skipped_bytes == 2
    samples, _ = AemSerialDriver.decode_capture(b"14.7\n13.5\n", nominal_period_s=0.05)
    assert [s.t for s in samples] == [0.0, 0.05]

"""Serial CSV codec and driver decoding: column mapping, device time, bad lines counted,
header repeats skipped, chunking invariance and a hypothesis fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.serial_csv import CsvRow, SerialCsvDecoder, SerialCsvDriver, encode_row
from dynoai_daemon.errors import ConfigError, ProtocolError

COLUMNS = ["time_ms", "rpm", "", "torque_ftlb"]


def test_rows_with_ignored_column_and_device_time() -> None:
    dec = SerialCsvDecoder(COLUMNS, "time_ms", "ms")
    rows = dec.feed(b"1500,3512,foo,87.25\r\n1510,3520,,88\r\n")
    assert rows == [
        CsvRow((("rpm", 3512.0), ("torque_ftlb", 87.25)), 1.5),
        CsvRow((("rpm", 3520.0), ("torque_ftlb", 88.0)), 1.51),
    ]
    assert dec.bad_frames == 0 and dec.rows == 2


def test_empty_fields_trailing_comma_and_seconds() -> None:
    dec = SerialCsvDecoder(["t", "rpm", "map_kpa"], "t", "s")
    assert dec.feed(b"2.5,,55.5,\r\n") == [CsvRow((("map_kpa", 55.5),), 2.5)]
    assert dec.feed(b",1000,\n") == [CsvRow((("rpm", 1000.0),), None)]


def test_bad_lines_counted_and_header_skipped() -> None:
    dec = SerialCsvDecoder(COLUMNS, "time_ms")
    stream = (
        b"time_ms,rpm,,torque_ftlb\r\n"  # header printed at boot: skipped, not bad
        b"1,2\r\n"  # too few fields
        b"1,2,3,4,5\r\n"  # too many
        b"1,abc,x,4\r\n"  # non-numeric channel field
        b"1,nan,x,4\r\n"  # nan is not a number a controller means
        b"1,1e999,x,4\r\n"  # overflows to inf
        b"1,2,\xff,4\r\n"  # not ASCII
        b"100,3000,ok,50\r\n"
    )
    rows = dec.feed(stream)
    assert rows == [CsvRow((("rpm", 3000.0), ("torque_ftlb", 50.0)), 0.1)]
    assert dec.header_lines == 1
    assert dec.bad_frames == 6
    bad = [b"1,2", b"1,2,3,4,5", b"1,abc,x,4", b"1,nan,x,4", b"1,1e999,x,4", b"1,2,\xff,4"]
    assert dec.skipped_bytes == sum(len(b) for b in bad)


def test_chunking_invariance() -> None:
    stream = b"1,2,x,3\r\n4,5,y,6\r\n7,8,z,9\r\n"
    whole = SerialCsvDecoder(COLUMNS).feed(stream)
    assert len(whole) == 3
    for cut in range(1, len(stream)):
        dec = SerialCsvDecoder(COLUMNS)
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == whole


def test_encode_row() -> None:
    assert encode_row([1.0, None, 2.5], decimals=1) == b"1.0,,2.5\r\n"
    with pytest.raises(ValueError):
        encode_row([float("nan")])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=800), cuts=st.lists(st.integers(1, 50), max_size=20))
def test_fuzz_any_bytes(data: bytes, cuts: list[int]) -> None:
    try:
        whole_dec = SerialCsvDecoder(COLUMNS, "time_ms")
        whole = whole_dec.feed(data)
        dec = SerialCsvDecoder(COLUMNS, "time_ms")
        got: list[CsvRow] = []
        pos = 0
        for c in cuts:
            got += dec.feed(data[pos : pos + c])
            pos += c
        got += dec.feed(data[pos:])
    except ProtocolError:
        return
    assert got == whole
    assert dec.bad_frames == whole_dec.bad_frames


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 10**6), st.floats(0, 20000), st.floats(-100, 1000)),
        max_size=15,
    )
)
def test_fuzz_roundtrip(rows: list[tuple[int, float, float]]) -> None:
    dec = SerialCsvDecoder(COLUMNS, "time_ms")
    stream = b"".join(encode_row([t, rpm, 0.0, tq], decimals=2) for t, rpm, tq in rows)
    got = dec.feed(stream)
    assert got == [
        CsvRow((("rpm", round(rpm, 2)), ("torque_ftlb", round(tq, 2) + 0.0)), t / 1000.0)
        for t, rpm, tq in rows
    ]


def test_driver_samples_and_channel_map() -> None:
    drv = SerialCsvDriver(
        source="dyno", columns=COLUMNS, time_column="time_ms", channel_map={"rpm": "drum_rpm"}
    )
    out: list = []
    assert drv.ingest(b"2000,3512,x,87.5\r\n,,,\r\n", 7.0, out) == 1
    assert [(s.t, s.channel, s.value, s.source, s.device_t) for s in out] == [
        (7.0, "drum_rpm", 3512.0, "dyno", 2.0),
        (7.0, "torque_ftlb", 87.5, "dyno", 2.0),
    ]


def test_driver_options_validated() -> None:
    with pytest.raises(ConfigError):
        SerialCsvDriver(columns=[])
    with pytest.raises(ConfigError):
        SerialCsvDriver(columns=["t"], time_column="t")  # nothing but time
    with pytest.raises(ConfigError):
        SerialCsvDriver(columns=["rpm", "rpm"])
    with pytest.raises(ConfigError):
        SerialCsvDriver(columns=["rpm"], time_column="t")
    with pytest.raises(ConfigError):
        SerialCsvDriver(columns="rpm")
    with pytest.raises(ConfigError):
        SerialCsvDriver(columns=["rpm"], time_unit="min")  # type: ignore[arg-type]


def test_decode_capture_uses_time_column_else_nominal() -> None:
    cap = b"1000,3000,,50\r\nbad\r\n1100,3100,,51\r\n"
    samples, stats = SerialCsvDriver.decode_capture(cap, columns=COLUMNS, time_column="time_ms")
    assert sorted({s.t for s in samples}) == [1.0, 1.1]
    assert stats.messages == 2 and stats.bad_frames == 1 and stats.skipped_bytes == 3
    samples, _ = SerialCsvDriver.decode_capture(
        cap, columns=["", "rpm", "", ""], nominal_period_s=0.25
    )
    assert [(s.t, s.value) for s in samples] == [(0.0, 3000.0), (0.25, 3100.0)]

"""Recorded-log readers (canonical, Power Vision, WinPEP, MegaLogViewer) and the writer.

Sample files under tests/data/logs/ are shaped like the real tools' output; error cases
are small files written per test so that the expected line number is visible in the test.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from drivers.pcap import PcapWriter
from dynoai_daemon.channels import CANONICAL_CHANNELS, Frame, Sample, concat_frames
from dynoai_daemon.errors import InputError, LogFormatError
from dynoai_daemon.logs import (
    DEFAULT_COLUMNS,
    CanonicalWriter,
    LogReader,
    read_log,
    register_reader,
    sniff_format,
    write_canonical,
)
from dynoai_daemon.logs import readers as readers_mod
from dynoai_daemon.store import SessionStore

DATA = Path(__file__).parent / "data" / "logs"
PV = DATA / "powervision_sample.csv"
WINPEP = DATA / "winpep_sample.csv"
MSL = DATA / "megalogviewer_sample.msl"
CANON = DATA / "canonical_sample.csv"
SAMPLES = {"canonical": CANON, "powervision": PV, "winpep": WINPEP, "msl": MSL}


def read_all(path: Path, **kw: object) -> Frame:
    return concat_frames(list(read_log(path, **kw)))  # type: ignore[arg-type]


def assert_frames_equal(a: Frame, b: Frame) -> None:
    np.testing.assert_array_equal(a.t, b.t)
    assert list(a.columns) == list(b.columns)
    for name in a.columns:
        np.testing.assert_array_equal(a.columns[name], b.columns[name], err_msg=name)


def bad_line(path: Path, fmt: str = "auto") -> LogFormatError:
    with pytest.raises(LogFormatError) as info:
        for _ in read_log(path, format=fmt, chunk_rows=4):
            pass
    err = info.value
    assert err.path == str(path)
    return err


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# -- sniffing ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_sniff_samples(fmt: str) -> None:
    assert sniff_format(SAMPLES[fmt]) == fmt
    reader = read_log(SAMPLES[fmt])
    assert reader.format == fmt
    assert reader.path == SAMPLES[fmt]


def test_sniff_can_and_capture_formats(tmp_path: Path) -> None:
    cd = write(tmp_path / "a.log", "(1715432731.123456) can0 180#0DAC000089008000\n")
    asc = write(
        tmp_path / "b.asc", "date Sat May 11 14:05:31.000 2024\nbase hex  timestamps absolute\n"
    )
    blf = tmp_path / "c.blf"
    blf.write_bytes(b"LOGG" + bytes(140))
    pcap = tmp_path / "d.pcap"
    pcap.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    assert [sniff_format(p) for p in (cd, asc, blf, pcap)] == ["candump", "asc", "blf", "jetdrive"]
    pcapng = tmp_path / "e.pcapng"
    with PcapWriter(pcapng, pcapng=True) as w:
        w.write_udp(b"x", 1.0)
    assert sniff_format(pcapng) == "jetdrive"


def test_sniff_unknown_and_empty(tmp_path: Path) -> None:
    for name, text in (("x.txt", "hello world\nsecond line\n"), ("e.csv", "")):
        p = write(tmp_path / name, text)
        with pytest.raises(LogFormatError) as info:
            sniff_format(p)
        assert info.value.line == 1
        assert "--format" in str(info.value) or "empty" in str(info.value)


def test_sniff_canonical_with_bom_and_winpep_vs_canonical(tmp_path: Path) -> None:
    p = write(tmp_path / "c.csv", "\ufefftime_s,rpm\n0,1000\n")
    assert sniff_format(p) == "canonical"
    assert read_all(p).columns["rpm"].tolist() == [1000.0]
    w = write(tmp_path / "w.csv", "Time,RPM,Torque\n0.00,1000,20\n")
    assert sniff_format(w) == "winpep"


def test_read_log_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such log file"):
        read_log(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="unknown log format"):
        read_log(CANON, format="excel")
    cd = write(tmp_path / "a.log", "(1715432731.123456) can0 180#0DAC000089008000\n")
    with pytest.raises(InputError, match="no log reader installed"):
        read_log(cd)
    with pytest.raises(ValueError):
        read_log(CANON, chunk_rows=0)


def test_register_reader_plugs_a_format(tmp_path: Path) -> None:
    cd = write(tmp_path / "a.log", "(1715432731.123456) can0 180#0DAC000089008000\n")

    class Fake(LogReader):
        format = "candump"

        def _prepare(self) -> None:
            self.prepared = True

        def _frames(self):  # type: ignore[no-untyped-def]
            yield Frame.from_columns([1.0, 2.0], {"rpm": [1.0, 2.0]})

    saved = dict(readers_mod._READERS)
    try:
        register_reader("candump", Fake)
        r = read_log(cd, chunk_rows=10)
        assert r.format == "candump"
        assert [len(f) for f in r] == [2]
        assert r.rows_read == 2
    finally:
        readers_mod._READERS.clear()
        readers_mod._READERS.update(saved)


# -- canonical ---------------------------------------------------------------------------


def test_canonical_values_missing_and_extra_columns() -> None:
    reader = read_log(CANON)
    f = concat_frames(list(reader))
    assert reader.rows_read == 25 == len(f)
    assert f.t[0] == 100.0 and f.t[-1] == 100.24
    assert list(f.columns)[:3] == ["rpm", "map_kpa", "tps_pct"]
    assert np.isnan(f.columns["afr_front"][3]) and np.isnan(f.columns["afr_front"][4])
    assert f.columns["afr_front"][5] == 13.1
    tgt = f.columns["afr_target"]
    assert np.isnan(tgt[1]) and tgt[0] == 13.2 and tgt[5] == 13.2
    assert f.columns["afr_front_status"][:3].tolist() == [4.0, 4.0, 0.0]
    det = f.columns["afr_front_detail"]
    assert det[:2].tolist() == [730.0, 730.0] and bool(np.isnan(det[2:]).all())
    for col in f.columns.values():
        assert col.dtype == np.float64 and col.shape == f.t.shape


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_reading_equals_one_chunk(fmt: str, chunk: int) -> None:
    whole = list(read_log(SAMPLES[fmt], chunk_rows=1_000_000))
    assert len(whole) == 1
    parts = list(read_log(SAMPLES[fmt], chunk_rows=chunk))
    assert all(0 < len(p) <= chunk for p in parts)
    assert len(parts) >= len(whole[0]) // chunk
    assert_frames_equal(concat_frames(parts), whole[0])


def test_reader_iterates_again_from_the_start() -> None:
    r = read_log(CANON, chunk_rows=10)
    first = [len(f) for f in r]
    assert r.rows_read == 25
    assert [len(f) for f in r] == first
    assert r.rows_read == 25


def test_canonical_header_errors(tmp_path: Path) -> None:
    for text, why in (
        ("rpm,time_s\n1,2\n", "must start with"),
        ("time_s,rpm,rpm\n0,1,2\n", "twice"),
        ("time_s,,rpm\n0,1,2\n", "no name"),
        ("", "empty file"),
    ):
        p = write(tmp_path / "h.csv", text)
        with pytest.raises(LogFormatError, match=why) as info:
            read_log(p, format="canonical")
        assert info.value.line == 1


def test_canonical_header_only_gives_no_rows(tmp_path: Path) -> None:
    r = read_log(write(tmp_path / "h.csv", "time_s,rpm\n"))
    assert list(r) == [] and r.rows_read == 0


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        # line numbers are physical: header is line 1, blank lines count
        ("0,1000,50\n0.01,1010,abc\n", 3, "not a number: 'abc'"),
        ("0,1000,50\n\n0.01,1010\n", 4, "expected 3 fields, got 2"),
        ("0,1000,50\n0.01,1010,50,7\n", 3, "expected 3 fields, got 4"),
        ("0,1000,50\n0.02,1,1\n\n0.01,1010,50\n", 5, "time goes backwards"),
        ("0,1000,50\n,1010,50\n", 3, "time ('time_s') is missing"),
        ("0,1000,50\ninf,1010,50\n", 3, "not finite"),
        ("0,1000,50\n0.01,NA,50\n", 3, "not a number: 'NA'"),
        ("0,1000,50\n0.01,1_000,50\n", 3, "not a number: '1_000'"),
    ],
)
def test_canonical_bad_lines(tmp_path: Path, body: str, line: int, why: str) -> None:
    p = write(tmp_path / "bad.csv", "time_s,rpm,map_kpa\n" + body)
    err = bad_line(p, "canonical")
    assert err.line == line
    assert why in str(err)
    assert str(err).startswith(f"{p}:{line}: ")


def test_canonical_200k_rows_in_chunks(tmp_path: Path) -> None:
    n = 200_000
    t = np.arange(n) / 100.0
    rpm = 1000.0 + (np.arange(n) % 5000)
    afr = np.where(np.arange(n) % 9 == 0, np.nan, 12.0 + (np.arange(n) % 300) / 100.0)
    p = tmp_path / "big.csv"
    with CanonicalWriter(p, ["rpm", "afr_front", "afr_front_status"]) as w:
        for i in range(0, n, 40_000):
            s = slice(i, i + 40_000)
            status = np.zeros(min(40_000, n - i))
            w.write_frame(
                Frame(t[s], {"rpm": rpm[s], "afr_front": afr[s], "afr_front_status": status})
            )
    reader = read_log(p, chunk_rows=50_000)
    sizes = []
    total = 0
    for f in reader:
        sizes.append(len(f))
        np.testing.assert_array_equal(f.t, t[total : total + len(f)])
        np.testing.assert_array_equal(f.columns["rpm"], rpm[total : total + len(f)])
        np.testing.assert_array_equal(f.columns["afr_front"], afr[total : total + len(f)])
        total += len(f)
    assert total == n == reader.rows_read
    assert max(sizes) <= 50_000 and len(sizes) >= 4


def test_canonical_error_deep_in_a_large_file(tmp_path: Path) -> None:
    # The error lies in a later pyarrow block; blank lines before it shift the numbering.
    lines = ["time_s,rpm"]
    for i in range(150_000):
        lines.append(f"{i / 100},{1000 + i % 100}")
        if i in (10, 20_000):
            lines.append("")
    bad_at = 120_000 + 3  # index in `lines` (0-based) -> physical line = index + 1
    lines[bad_at] = lines[bad_at].replace(",", ",x")
    p = write(tmp_path / "big.csv", "\n".join(lines) + "\n")
    with pytest.raises(LogFormatError) as info:
        for _ in read_log(p, chunk_rows=10_000):
            pass
    assert info.value.line == bad_at + 1
    assert "not a number" in str(info.value)


def test_canonical_time_backwards_across_chunks(tmp_path: Path) -> None:
    lines = ["time_s,rpm"] + [f"{i},{i}" for i in range(100)]
    lines[51] = "10,1"  # the 51st data row goes back in time
    p = write(tmp_path / "b.csv", "\r\n".join(lines) + "\r\n")
    err = bad_line(p)
    assert err.line == 52 and "backwards" in str(err)


# -- Power Vision --------------------------------------------------------------------------


def test_powervision_pivot_hex_and_units() -> None:
    reader = read_log(PV)
    f = concat_frames(list(reader))
    assert reader.format == "powervision"
    assert len(f) == 12  # one row per distinct time
    np.testing.assert_allclose(f.t, np.arange(12) * 0.05)
    assert f.t[3] == 0.15  # ms divided exactly
    assert f.columns["rpm"].tolist() == [1000.0 + 250 * k for k in range(12)]  # 0x03E8...
    assert f.columns["gear"][0] == 1.0 and f.columns["gear"][6] == 2.0  # 0x1 / 0x2
    assert np.isnan(f.columns["gear"][1])
    kf = f.columns["knock_front_deg"]
    assert kf[0] == 0.0 and kf[7] == 2.5  # "0x0" and a decimal in the same signal
    assert f.columns["ect_f"][0] == pytest.approx(85 * 1.8 + 32)  # degC -> degF
    iat = f.columns["iat_f"]
    assert iat[0] == pytest.approx(86.0) and iat[4] == pytest.approx(34 * 1.8 + 32)
    assert bool(np.isnan(iat[[1, 2, 3, 5]]).all())  # logged every 4th sample only
    assert f.columns["afr_front"][0] == pytest.approx(0.88 * 14.7)  # lambda x stoich
    assert f.columns["afr_rear"][2] == pytest.approx(0.92 * 14.7)
    assert f.columns["afr_target"][0] == pytest.approx(0.9 * 14.7)
    assert f.columns["ve_front"][1] == 61.0 and f.columns["ve_rear"][1] == 62.0
    assert f.columns["spark_front_deg"][2] == 26.0 and f.columns["spark_rear_deg"][2] == 25.0
    assert f.columns["vbatt_v"][0] == 14.1 and np.isnan(f.columns["vbatt_v"][1])
    assert f.columns["map_kpa"][0] == 35.0 and f.columns["tps_pct"][1] == 12.5
    assert reader.source_of["vbatt_v"] == "B+"
    assert reader.signals[3] == ("ET", "°C")  # type: ignore[attr-defined]
    assert ["Log Version", "3"] in reader.metadata  # type: ignore[attr-defined]


def test_powervision_stoich_parameter() -> None:
    f = read_all(PV, stoich=14.6)
    assert f.columns["afr_front"][0] == pytest.approx(0.88 * 14.6)


PV_HEAD = (
    "Dynojet Power Vision Log File\n"
    '0,"ECM","19","RPM","rpm","Engine Speed","#FF0000"\n'
    '1,"ECM","22","MAP","psi","Manifold","#00FF00"\n'
    '2,"ECM","23","WBO2 F","AFR","Front","#0000FF"\n'
    '"Time(ms)","Signal","Value"\n'
)  # the first data line is line 6


def test_powervision_units_and_duplicates(tmp_path: Path) -> None:
    p = write(tmp_path / "pv.csv", PV_HEAD + "0,0,0x7D0\n0,1,10\n0,2,13.1\n0,2,13.3\n20,0,-0x10\n")
    f = read_all(p)
    assert f.t.tolist() == [0.0, 0.02]
    assert f.columns["rpm"].tolist() == [2000.0, -16.0]
    assert f.columns["map_kpa"][0] == pytest.approx(68.94757293168361)  # psi -> kPa
    assert f.columns["afr_front"][0] == 13.3  # AFR unit: no stoich; later duplicate wins


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        ("0,0,1000\n0,1,0xZZ\n", 7, "value is not a number: '0xZZ'"),
        ("0,0,1000\n\n10,7,1\n", 8, "signal 7 is not defined"),
        ("0,0,1000\n10,0,1\n5,0,1\n", 8, "time goes backwards"),
        ("0,0,1000\n10,0\n", 7, "expected 3 fields"),
        ("0,0,1000\nabc,0,1\n", 7, "time is not a number"),
        ("0,0,1000\n10,x,1\n", 7, "signal index is not a number"),
        ("0,0,1000\n10,0,\n", 7, "value is not a number: ''"),
    ],
)
def test_powervision_bad_lines(tmp_path: Path, body: str, line: int, why: str) -> None:
    err = bad_line(write(tmp_path / "pv.csv", PV_HEAD + body))
    assert err.line == line
    assert why in str(err)


def test_powervision_bad_header(tmp_path: Path) -> None:
    cases = (
        (PV_HEAD.replace('1,"ECM","22","MAP","psi","Manifold","#00FF00"', '1,"ECM","22"'), 3),
        (PV_HEAD.replace('1,"ECM"', '0,"ECM"'), 3),
        (PV_HEAD.replace('"Time(ms)","Signal","Value"\n', ""), 4),
        ("Some Other Log\n", 1),
    )
    for text, line in cases:
        p = write(tmp_path / "pv.csv", text)
        with pytest.raises(LogFormatError) as info:
            read_log(p, format="powervision")
        assert info.value.line == line, text


def test_powervision_chunks_never_split_a_time(tmp_path: Path) -> None:
    body = "".join(f"{t * 10},0,{1000 + t}\n{t * 10},1,{t}\n" for t in range(10))
    p = write(tmp_path / "pv.csv", PV_HEAD + body)
    parts = list(read_log(p, chunk_rows=3))
    assert [len(x) for x in parts] == [3, 3, 3, 1]
    f = concat_frames(parts)
    assert f.columns["rpm"].tolist() == [1000.0 + t for t in range(10)]
    assert f.columns["map_kpa"][1] == pytest.approx(6.894757293168361)


# -- WinPEP ------------------------------------------------------------------------------


def test_winpep_aliases_and_ms_detection() -> None:
    reader = read_log(WINPEP)
    f = concat_frames(list(reader))
    assert len(f) == 40
    assert f.t[0] == 1.0 and f.t[1] == 1.01  # ms detected from the 10-unit step
    assert any("milliseconds" in w for w in reader.warnings)
    assert reader.source_of["afr_target"] == "AFR Cmd F"
    assert f.columns["afr_target"][0] == 12.8
    assert f.columns["afr_cmd_r"][0] == 12.8  # no canonical home: kept, sanitized
    assert f.columns["afr_front"][0] == 12.9 and np.isnan(f.columns["afr_front"][5])
    assert f.columns["afr_rear"][1] == 12.71
    assert f.columns["knock_front_deg"][30] == 1.5
    assert f.columns["spark_front_deg"][0] == 30.0 and f.columns["spark_rear_deg"][0] == 29.0
    assert f.columns["ve_front"][0] == 85.0 and f.columns["ve_rear"][0] == 86.0
    assert f.columns["vbatt_v"][0] == 13.9 and f.columns["tps_pct"][0] == 98.0
    assert f.columns["torque_ftlb"][1] == 80.75 and f.columns["map_kpa"][0] == 90.0
    assert f.columns["iat_f"][0] == 95.0


def test_winpep_seconds_and_header_units(tmp_path: Path) -> None:
    p = write(
        tmp_path / "w.csv",
        "Run 12,Street Glide\ntime,RPM,Torque (N-m),MAP [psi],IAT (C)\n"
        "0.00,2000,100,10,20\n0.01,2010,100,10,20\n0.02,2020,100,10,20\n",
    )
    r = read_log(p, format="winpep")
    f = concat_frames(list(r))
    assert f.t.tolist() == [0.0, 0.01, 0.02] and not r.warnings
    assert f.columns["torque_ftlb"][0] == pytest.approx(73.75621492772654)
    assert f.columns["map_kpa"][0] == pytest.approx(68.94757293168361)
    assert f.columns["iat_f"][0] == pytest.approx(68.0)
    assert r.metadata == ["Run 12,Street Glide"]  # type: ignore[attr-defined]
    q = write(tmp_path / "m.csv", "Time (ms),RPM\n0.5,2000\n0.75,2000\n")
    assert read_all(q, format="winpep").t.tolist() == [0.0005, 0.00075]


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        ("0, 2000, 13.0\n10, 2010, 13,1\n", 3, "expected 3 fields, got 4"),
        ("0, 2000, 13.0\n10, 2010, n/a\n", 3, "not a number: 'n/a'"),
        ("0, 2000, 13.0\n20, 2010, 13\n10, 2010, 13\n", 4, "time goes backwards"),
    ],
)
def test_winpep_bad_lines(tmp_path: Path, body: str, line: int, why: str) -> None:
    err = bad_line(write(tmp_path / "w.csv", "timestamp, rpm, measured afr f\n" + body), "winpep")
    assert err.line == line
    assert why in str(err)


# -- MegaLogViewer -----------------------------------------------------------------------


def test_msl_units_markers_and_aliases() -> None:
    reader = read_log(MSL)
    f = concat_frames(list(reader))
    assert len(f) == 30
    assert reader.markers == 1  # type: ignore[attr-defined]
    assert f.t[1] == 0.04 and f.t[15] == pytest.approx(0.6)  # the MARK line is not a row
    assert f.columns["iat_f"][0] == pytest.approx(77.0)  # 25 degC (cp1252 units row)
    assert f.columns["ect_f"][0] == pytest.approx(176.0)
    assert f.columns["afr_front"][0] == 14.6 and f.columns["afr_rear"][0] == 14.8
    assert f.columns["afr_target"][0] == 13.5
    assert f.columns["knock_front_deg"][20] == 3.0
    np.testing.assert_array_equal(f.columns["spark_front_deg"], f.columns["spark_rear_deg"])
    assert f.columns["ve_front"][2] == 63.0 and f.columns["ve_rear"][2] == 64.0
    assert f.columns["vbatt_v"][0] == 13.8 and f.columns["map_kpa"][1] == 32.0
    assert f.columns["ego_cor1"][0] == 100.0 and "secl" in f.columns
    assert reader.title[1] == '"Capture Date: Sat May 11 14:05:31 BST 2024"'  # type: ignore[attr-defined]


def test_msl_lambda_and_unconvertible_units(tmp_path: Path) -> None:
    p = write(
        tmp_path / "l.msl",
        '"TunerStudio log"\nTime\tRPM\tLambda\tKnock\tMAP\n'
        "s\tRPM\tλ\t%\tpsi\n0\t900\t1.0\t12\t5\n0.1\t950\t0.9\t0\t6\n",
    )
    r = read_log(p)
    f = concat_frames(list(r))
    assert r.format == "msl"
    assert f.columns["afr_front"].tolist() == pytest.approx([14.7, 0.9 * 14.7])
    assert "knock_front_deg" not in f.columns and f.columns["knock"].tolist() == [12.0, 0.0]
    assert any("'Knock'" in w for w in r.warnings)
    assert f.columns["map_kpa"][1] == pytest.approx(6 * 6.894757293168361)


def test_msl_without_units_row(tmp_path: Path) -> None:
    p = write(tmp_path / "n.msl", '"title"\nTime\tRPM\n0.0\t900\n0.5\t950\n')
    f = read_all(p)
    assert f.t.tolist() == [0.0, 0.5] and f.columns["rpm"].tolist() == [900.0, 950.0]


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        ("0\t900\t14.7\nMARK 000 - x\n0.1\t9x0\t14.7\n", 6, "not a number: '9x0'"),
        ("0\t900\t14.7\n0.1\t900\n", 5, "expected 3 fields, got 2"),
        ("0\t900\t14.7\nMARK 1\n\n0.2\t900\t14.7\n0.1\t900\t14.7\n", 8, "backwards"),
    ],
)
def test_msl_bad_lines(tmp_path: Path, body: str, line: int, why: str) -> None:
    head = '"MS2Extra log"\nTime\tRPM\tAFR\ns\tRPM\tAFR\n'
    err = bad_line(write(tmp_path / "b.msl", head + body), "msl")
    assert err.line == line
    assert why in str(err)


def test_msl_missing_names_row(tmp_path: Path) -> None:
    p = write(tmp_path / "b.msl", '"title"\nRPM\tAFR\n900\t14\n')
    with pytest.raises(LogFormatError, match="Time column") as info:
        read_log(p, format="msl")
    assert info.value.line == 1


# -- writer ------------------------------------------------------------------------------


def test_writer_round_trip_preserves_nan_extras_and_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 500
    t = np.cumsum(rng.uniform(0.001, 0.02, n))
    bits = rng.integers(0, 2**64, n, dtype=np.uint64).view(np.float64)
    bits = np.where(np.isfinite(bits), bits, 1.5)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 5e-324, 1.7976931348623157e308, 1e22, 0.1])
    bits[: special.size] = special
    afr = rng.uniform(10, 16, n)
    afr[::3] = np.nan
    frame = Frame(
        t,
        {
            "afr_front_status": np.zeros(n),
            "rpm": np.round(rng.uniform(800, 6500, n)),
            "afr_front": afr,
            "torque_ftlb": bits,
            "afr_front_detail": np.full(n, np.nan),
        },
    )
    p = write_canonical(tmp_path / "rt.csv", [frame.slice(0, 200), frame.slice(200, n)])
    header = p.read_text().splitlines()[0]
    assert header == "time_s,rpm,afr_front,torque_ftlb,afr_front_status,afr_front_detail"
    back = read_all(p, chunk_rows=64)
    np.testing.assert_array_equal(back.t, t)
    for name, col in frame.columns.items():
        np.testing.assert_array_equal(back.columns[name], col, err_msg=name)
    # -0.0 keeps its sign
    assert np.signbit(back.columns["torque_ftlb"][1])
    assert not any(x.name.endswith(".tmp") for x in tmp_path.iterdir())


def test_writer_compact_numbers(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    with CanonicalWriter(p, ["rpm", "afr_front"]) as w:
        w.write_frame(
            Frame.from_columns([0.0, 0.01], {"rpm": [3000.0, 3010.5], "afr_front": [np.nan, 13.1]})
        )
    assert p.read_text().splitlines() == ["time_s,rpm,afr_front", "0,3000,", "0.01,3010.5,13.1"]


def test_writer_default_header_and_sidecar(tmp_path: Path) -> None:
    p = tmp_path / "run.csv"
    w = CanonicalWriter(p)
    assert w.columns == list(DEFAULT_COLUMNS)
    header = p.read_text().splitlines()[0].split(",")
    assert header[0] == "time_s" and header[1:19] == list(CANONICAL_CHANNELS)
    assert header[19:] == ["afr_front_status", "afr_rear_status"]
    w.write_samples(
        [
            Sample(1.0, "rpm", 2000.0, "ecu"),
            Sample(1.0, "afr_front", 13.2, "wb"),
            Sample(1.0, "afr_front_detail", 209.0, "wb"),
            Sample(1.5, "Engine Load", 55.5, "dyno"),
        ]
    )
    w.flush()
    live = read_all(p)  # a live file reads back while the writer is open
    assert live.t.tolist() == [1.0, 1.5]
    assert live.columns["rpm"][0] == 2000.0 and np.isnan(live.columns["rpm"][1])
    # a late row must not break the main file's time order: it goes to the sidecar
    w.write_frame(Frame.from_columns([0.5, 2.0], {"rpm": [1900.0, 2100.0]}))
    w.close()
    w.close()  # idempotent
    assert w.late_rows == 1 and w.extra_values == 3 and w.rows_written == 3
    assert read_all(p).t.tolist() == [1.0, 1.5, 2.0]
    assert w.sidecar_path == tmp_path / "run.extra.csv"
    assert w.sidecar_path.read_text().splitlines() == [
        "time_s,channel,value",
        "1,afr_front_detail,209",
        "1.5,Engine Load,55.5",
        "0.5,rpm,1900",
    ]
    with pytest.raises(ValueError, match="closed"):
        w.write_frame(Frame.from_columns([3.0], {"rpm": [1.0]}))


def test_writer_no_sidecar_when_not_needed_and_bad_input(tmp_path: Path) -> None:
    p = tmp_path / "ok.csv"
    with CanonicalWriter(p, ["rpm"]) as w:
        w.write_frame(Frame.from_columns([0.0], {"rpm": [1.0]}))
        w.write_frame(Frame.empty())
        with pytest.raises(ValueError, match="finite"):
            w.write_frame(Frame(np.array([np.nan]), {"rpm": np.array([1.0])}))
    assert not w.sidecar_path.exists()
    with pytest.raises(ValueError, match="header"):
        CanonicalWriter(tmp_path / "x.csv", ["a,b"])
    with pytest.raises(ValueError, match="backwards"):
        write_canonical(
            tmp_path / "y.csv",
            [Frame.from_columns([1.0], {"rpm": [1]}), Frame.from_columns([0.5], {"rpm": [1]})],
        )
    assert not (tmp_path / "y.csv").exists()
    assert [x.name for x in tmp_path.iterdir() if x.name.endswith(".tmp")] == []


# --- real-ECU quirks: units decided per log, foreign delimited logs, plausibility ------------

MS2_X100 = DATA / "ms2extra_x100_target.msl"
SPEEDUINO_C = DATA / "speeduino_blank_degc.msl"
ROMRAIDER = DATA / "romraider_semicolon.csv"
ROMRAIDER_COLUMNS = (
    "rpm=PLX Engine Speed,map_kpa=PLX Manifold Absolute Pressure,"
    "afr_front=PLX O2 - Wideband,tps_pct=Throttle Opening Angle,ect_f=Coolant Temperature"
)


def _learned(res: object) -> list[float]:
    """AFR targets of the learned cells of a ReplayResult's sessions."""
    out: list[float] = []
    for s in res.sessions:  # type: ignore[attr-defined]
        for cyl in (s.grid.front, s.grid.rear):
            for trow, crow in zip(cyl.afr_target_mean, cyl.ve_correction_pct, strict=True):
                out += [t for t, c in zip(trow, crow, strict=True) if c is not None]
    return out


def test_ms2_afr_x100_target_is_rescaled_and_degf_kept(tmp_path: Path) -> None:
    from dynoai_daemon.config import Settings
    from dynoai_daemon.logs.replay import replay_logs

    res = replay_logs([MS2_X100], Settings(data_dir=tmp_path))
    (rep,) = res.reports
    assert any("AFR x 100" in n for n in rep.notes), rep.notes
    assert any("degF (firmware ms2extra" in n for n in rep.notes), rep.notes
    targets = _learned(res)
    assert targets and all(12.0 <= t <= 15.0 for t in targets)
    assert not res.errors


def test_blank_temperature_units_are_decided_per_log(tmp_path: Path) -> None:
    from dynoai_daemon.config import ReplayConfig, Settings
    from dynoai_daemon.logs.replay import replay_logs

    res = replay_logs([SPEEDUINO_C], Settings(data_dir=tmp_path / "a"))
    (rep,) = res.reports
    assert any("degC (firmware speeduino" in n for n in rep.notes), rep.notes
    assert _learned(res)
    # Forced to degF (flag or config key), 88 is a cold engine: nothing learned, and why.
    for forced in (
        replay_logs([SPEEDUINO_C], Settings(data_dir=tmp_path / "b"), temp_unit="F"),
        replay_logs(
            [SPEEDUINO_C], Settings(data_dir=tmp_path / "c", replay=ReplayConfig(temp_unit="F"))
        ),
    ):
        (rep,) = forced.reports
        assert not _learned(forced)
        (gates,) = rep.rejected.values()
        assert max(gates, key=lambda g: gates[g]) == "warm-up"


def test_title_is_checked_against_the_coolant(tmp_path: Path) -> None:
    from dynoai_daemon.config import Settings
    from dynoai_daemon.logs.replay import replay_logs

    text = SPEEDUINO_C.read_text().replace("\t35\t88\t", "\t95\t190\t")
    p = tmp_path / "speeduino_but_f.msl"
    p.write_text(text)
    (rep,) = replay_logs([p], Settings(data_dir=tmp_path / "d"), store=False).reports
    assert any("is degF" in n for n in rep.notes), rep.notes


def test_replay_cli_prints_decisions_and_the_dominant_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynoai_daemon.cli.main import main

    assert main(["replay", str(SPEEDUINO_C), "--no-store", "--temp-unit", "F"]) == 0
    out = capsys.readouterr().out
    assert "decided: temperatures (IAT, CLT) have no unit: read as degF (forced)" in out
    assert "0 cells, most readings rejected by warm-up" in out


def test_semicolon_decimal_comma_csv_with_a_column_map(tmp_path: Path) -> None:
    from dynoai_daemon.logs.delimited import DelimitedReader, parse_column_map

    assert sniff_format(ROMRAIDER) == "csv"
    r = DelimitedReader(ROMRAIDER, columns=parse_column_map(ROMRAIDER_COLUMNS), chunk_rows=64)
    assert r.delimiter == ";" and r.decimal_comma and r.time_scale == 0.001
    f = concat_frames(list(r))
    assert len(f) == 300 and f.t[1] == pytest.approx(0.05)
    assert f.columns["map_kpa"][0] == pytest.approx(35.0)  # 0,350 bar
    assert f.columns["afr_front"][0] == pytest.approx(1.011 * 14.7)  # lambda
    assert f.columns["ect_f"][0] == pytest.approx(194.0)  # (C) in the name
    assert set(f.columns) == {"rpm", "map_kpa", "afr_front", "tps_pct", "ect_f"}


def test_column_map_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dynoai_daemon.cli.main import main

    for cols, what in (
        ("rpm=No Such Column", "no column 'No Such Column'"),
        ("map_kpa=PLX Engine Speed", "does not convert to map_kpa"),
        ("rpm", "is not CHANNEL=COLUMN"),
    ):
        rc = main(["replay", str(ROMRAIDER), "--no-store", "--columns", cols])
        err = capsys.readouterr().err
        assert rc == 2 and what in err, err
    rc = main(["replay", str(ROMRAIDER), "--no-store", "--columns", "rpm=X", "--format", "msl"])
    assert rc == 2 and "--columns needs --format csv" in capsys.readouterr().err


def test_pcan_trc_is_sniffed_decoded_and_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import can

    from drivers import haltech
    from dynoai_daemon.cli.main import main

    p = tmp_path / "bus.trc"
    with can.TRCWriter(p) as w:
        for k in range(50):
            fid, data, ext = haltech.encode(3000 + k, 60.0, 30.0)
            w.on_message_received(
                can.Message(timestamp=1.0 + k * 0.02, arbitration_id=fid, data=data,
                            is_extended_id=ext)
            )  # fmt: skip
    assert sniff_format(p) == "trc"
    assert main(["decode", "--driver", "haltech", str(p)]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert rows[0] == "time_s,rpm,map_kpa,tps_pct" and len(rows) == 51
    assert "messages=50" in err
    rc = main(["replay", str(p), "--no-store", "--format", "trc"])
    assert rc == 0 and "format trc" in capsys.readouterr().out


def test_plausibility_screen_blanks_and_counts() -> None:
    from dynoai_daemon.channels import PLAUSIBLE_RANGES, screen_frame

    assert set(PLAUSIBLE_RANGES) == set(CANONICAL_CHANNELS)
    f = Frame.from_columns(
        [0.0, 1.0, 2.0],
        {"rpm": [3000, 65283, 2000], "tps_pct": [1261, 50, np.nan], "afr_front": [96.34, 13, 5]},
    )
    counts: dict[str, int] = {}
    g = screen_frame(f, counts)
    assert counts == {"rpm": 1, "tps_pct": 1, "afr_front": 2}
    assert np.isnan(g.columns["rpm"][1]) and g.columns["rpm"][0] == 3000
    assert f.columns["rpm"][1] == 65283  # the input is not modified
    assert screen_frame(g, counts) is g


def test_every_driver_batch_is_screened_into_health_counters() -> None:
    from drivers.haltech import HaltechDriver

    drv = HaltechDriver(source="ecu")
    kept = drv.screen(
        [Sample(0.0, "rpm", 65283.0), Sample(0.0, "tps_pct", 40.0), Sample(0.0, "map_kpa", 2.0)]
    )
    assert [s.channel for s in kept] == ["tps_pct"]
    extra = drv.sync_stats().extra
    assert extra["implausible_rpm"] == 1 and extra["implausible_map_kpa"] == 1
    from drivers.innovate_mts import InnovateMtsDriver

    mts = InnovateMtsDriver(source="wb", port="loop://")
    assert mts.screen([Sample(0.0, "afr_front", 96.3), Sample(0.0, "afr_front", 13.0)])
    assert mts.sync_stats().extra["implausible_afr_front"] == 1


def test_aem_free_air_word_with_valid_bit_is_invalid() -> None:
    from drivers import aemnet
    from dynoai_daemon.channels import SensorStatus

    c = aemnet.AemNetCodec()
    _, data, _ = aemnet.encode(0, 6.5535, o2_pct=20.9)  # 0xFFFF, valid bit set
    assert dict(c.decode(0x180, data, True) or []) == {"afr_front_status": SensorStatus.INVALID}
    assert c.counters["lambda_no_reading"] == 1


def test_decel_pop_range_is_never_inverted() -> None:
    from dynoai_daemon.core.runs import DecelEvent
    from dynoai_daemon.models import DecelPoppingPattern
    from dynoai_daemon.patterns import decel

    ev = DecelEvent(10.0, 2236.0, 10.2, end_t=11.0, rpm_end=2272.0, tps_min=0.0)
    ev.spikes, ev.afr_max, ev.afr_samples = 4, 16.9, 10
    fields = decel.extract([ev], 3.0)
    assert fields is not None
    lo, hi = fields["pop_rpm_range"]
    assert lo <= hi and (lo, hi) == (2236.0, 2272.0)
    DecelPoppingPattern(session_id="x", **fields)


def test_a_failing_session_is_reported_and_the_rest_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:

    from dynoai_daemon.cli.main import main
    from dynoai_daemon.models import DecelPoppingPattern
    from dynoai_daemon.patterns.session import SessionBuilder

    real = SessionBuilder.build
    calls = {"n": 0}

    def build(self: SessionBuilder, run: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:  # what an inverted range used to do
            DecelPoppingPattern(session_id="x", pop_rpm_range=(2272.0, 2236.0))
        return real(self, run)  # type: ignore[arg-type]

    monkeypatch.setattr(SessionBuilder, "build", build)
    data = tmp_path / "d"
    rc = main(["replay", str(MS2_X100), str(SPEEDUINO_C), "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {MS2_X100}: run cell1-" in err and "pop_rpm_range" in err
    ds = SessionStore(data).load_dataset()
    assert len(ds.sessions) == 1  # the Speeduino log's run


def test_replay_ids_come_from_the_log(tmp_path: Path) -> None:
    import shutil

    from dynoai_daemon.config import Settings
    from dynoai_daemon.logs.replay import replay_logs

    a = replay_logs([SPEEDUINO_C], Settings(data_dir=tmp_path / "a"))
    b = replay_logs([SPEEDUINO_C], Settings(data_dir=tmp_path / "a"))
    ids = [s.session_id for s in a.sessions]
    assert ids == [s.session_id for s in b.sessions] and b.already_stored == len(ids)
    note = a.sessions[0].notes or ""
    assert note.startswith("replayed from speeduino_blank_degc.msl (sha256 ") and "degC" in note
    assert ids[0].startswith("cell1-20220907T0854") and a.sessions[0].timestamp_utc.startswith(
        "2022-09-07T08:54"
    )
    # Another log (one value differs) never collides, even with the same capture date.
    other = tmp_path / "other.msl"
    shutil.copy(SPEEDUINO_C, other)
    other.write_text(other.read_text().replace("\t35\t88\t", "\t36\t88\t", 1))
    c = replay_logs([other], Settings(data_dir=tmp_path / "a"))
    assert not set(ids) & {s.session_id for s in c.sessions}
    # Without a capture date in the log, the file's modification time is used.
    ms2 = replay_logs([MS2_X100], Settings(data_dir=tmp_path / "b"), store=False)
    (rep,) = ms2.reports
    assert rep.capture_from == "file modification time"


def test_forcing_a_text_format_on_a_binary_log_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynoai_daemon.cli.main import main
    from tests.mlg_writer import Field, write_mlg

    p = write_mlg(tmp_path / "x.mlg", [Field("Time", 7, "s"), Field("RPM", 2)], [[0.0, 900.0]])
    for fmt in ("csv", "msl", "canonical", "winpep", "powervision"):
        rc = main(["replay", "--format", fmt, str(p), "--no-store"])
        err = capsys.readouterr().err
        assert rc == 2 and f"error: {p}" in err, (fmt, err)

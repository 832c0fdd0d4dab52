"""The MLVLG (.mlg) reader against files written by our own writer (tests/mlg_writer.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynoai_daemon.channels import Frame
from dynoai_daemon.cli.main import main
from dynoai_daemon.config import Settings
from dynoai_daemon.logs import read_log, sniff_format, write_canonical
from dynoai_daemon.logs.mlg import MlgReader
from dynoai_daemon.logs.replay import replay_logs
from dynoai_daemon.store import SessionStore
from tests.mlg_writer import Field, frame_to_mlg, write_mlg
from tests.synth import Plan, make_log

ALL_TYPES = [
    Field("Time", 7, "s", digits=3),
    Field("RPM", 2, "rpm", digits=0),
    Field("MAP", 2, "kpa", scale=0.1, digits=1),
    Field("TPS", 0, "%", scale=0.5, digits=1),
    Field("CLT", 3, "", scale=0.1, transform=-400.0, digits=1),
    Field("IAT", 1, "", digits=0),
    Field("Counter32", 4, "", digits=0),
    Field("Signed32", 5, "", digits=0),
    Field("Big", 6, "", digits=0),
    Field("AFR", 7, "O2", digits=3),
    Field("Status", 10, "bits", bits=3, bit_names=("a", "b", "c")),
    Field("Flags16", 11, "bits", bits=12),
    Field("Flags32", 12, "bits", bits=20),
]
ROW = [
    0.0,
    3000.0,
    85.5,
    40.5,
    90.0,
    30.0,
    4_000_000_000.0,
    -5.0,
    -(2**40),
    13.25,
    5.0,
    4095.0,
    1 << 19,
]


def rows(n: int) -> list[list[float]]:
    out = []
    for k in range(n):
        r = list(ROW)
        r[0] = k * 0.01
        r[1] = 3000.0 + k
        out.append(r)
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_every_field_type_scale_and_transform(tmp_path: Path, version: int) -> None:
    path = write_mlg(tmp_path / f"all_v{version}.mlg", ALL_TYPES, rows(5), version=version)
    assert sniff_format(path) == "mlg"
    r = MlgReader(path)
    assert r.header.version == version
    assert [f.name for f in r.header.fields] == [f.name for f in ALL_TYPES]
    assert r.header.bit_names == ["a", "b", "c"]
    assert r.title[0].startswith("speeduino 202207")
    assert r.capture_utc is not None and r.capture_utc.year == 2022
    (rec,) = list(r.records())
    got = [r.values(rec, i)[2] for i in range(len(ALL_TYPES))]
    want = list(ROW)
    want[0], want[1] = 0.02, 3002.0
    assert got == pytest.approx(want, rel=1e-6)
    # Canonical channels: CLT/IAT degC per the Speeduino title (decided in replay), AFR as is.
    (frame,) = list(r)
    assert frame.columns["rpm"].tolist() == [3000.0, 3001.0, 3002.0, 3003.0, 3004.0]
    assert frame.columns["afr_front"][0] == pytest.approx(13.25)
    assert frame.columns["map_kpa"][0] == pytest.approx(85.5)
    assert frame.t.tolist() == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])


def test_v2_unknown_bit_type_is_sized_by_its_bits(tmp_path: Path) -> None:
    # Speeduino 202207 writes a nameless bit field of type 16 with 2 bits: one byte.
    fields = [Field("Time", 7, "s"), Field("", 16, "bits", bits=2), Field("RPM", 2, "rpm")]
    path = write_mlg(tmp_path / "t16.mlg", fields, [[0.0, 3, 900.0], [0.1, 1, 950.0]], version=2)
    r = MlgReader(path)
    assert r.header.record_length == 4 + 1 + 2
    (frame,) = list(r)
    assert frame.columns["rpm"].tolist() == [900.0, 950.0]


def test_block_timestamps_unwrap_when_there_is_no_time_field(tmp_path: Path) -> None:
    fields = [Field("RPM", 2, "rpm")]
    stamps = [65000, 65500, 200, 700]  # 10 us units, wrapping at 65536
    path = write_mlg(tmp_path / "nt.mlg", fields, [[1000.0]] * 4, stamps=stamps)
    (frame,) = list(read_log(path))
    steps = np.diff(frame.t)
    assert steps == pytest.approx([0.005, 0.00236, 0.005])


def test_markers_corrupt_records_and_garbage_are_counted(tmp_path: Path) -> None:
    path = write_mlg(
        tmp_path / "m.mlg",
        ALL_TYPES,
        rows(20),
        markers=[(5, "MARK 000 - pull 1"), (12, "MARK 001 - pull 2")],
        corrupt_rows=[3],
        garbage_after=[8],
    )
    r = MlgReader(path, chunk_rows=4)
    frames = list(r)
    assert sum(len(f) for f in frames) == 19
    assert r.crc_errors == 1 and r.skipped_bytes == 3
    assert [m[1] for m in r.marker_list] == ["MARK 000 - pull 1", "MARK 001 - pull 2"]
    assert r.marker_list[0][0] == pytest.approx(0.05)


def test_chunk_size_does_not_change_the_data(tmp_path: Path) -> None:
    path = write_mlg(tmp_path / "c.mlg", ALL_TYPES, rows(50))
    big = list(MlgReader(path))
    small = list(MlgReader(path, chunk_rows=7))
    assert len(big) == 1 and len(small) > 5
    for ch in big[0].columns:
        assert (
            np.concatenate([f.columns[ch] for f in small]).tolist() == big[0].columns[ch].tolist()
        )


def test_time_base_restart_continues_forward(tmp_path: Path) -> None:
    data = rows(6)
    for k in (3, 4, 5):
        data[k][0] = (k - 3) * 0.01  # TunerStudio reconnected: Time starts again
    (frame,) = list(MlgReader(write_mlg(tmp_path / "r.mlg", ALL_TYPES, data)))
    assert bool(np.all(np.diff(frame.t) > 0))


@pytest.mark.parametrize(
    ("blob", "what"),
    [
        (b"MLVLG\x00\x00\x03" + b"\x00" * 40, "version 3"),
        (b"MLVLG\x00\x00\x01\x00", "cut short"),
    ],
)
def test_bad_headers_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], blob: bytes, what: str
) -> None:
    p = tmp_path / "bad.mlg"
    p.write_bytes(blob)
    rc = main(["replay", str(p), "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {p}:1:" in err and what in err


def _synth() -> tuple[Frame, np.ndarray, np.ndarray]:
    shape = (19, 18)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    rf = 1.0 + 0.05 * np.sin(i / 3.0) + 0.03 * np.cos(j / 4.0)
    rr = rf + 0.01
    steps: list[tuple[object, ...]] = [("idle", 2)]
    steps += [("hold", r, k, 2.5) for r in (2000, 2500, 3000, 3500) for k in (50, 65, 80)]
    steps += [("pull", 2000, 5500, 8), ("idle", 7)]
    frame = make_log(Plan(steps), rf, rr, seed=3, noise=0.05)
    return frame, rf, rr


def _errors(sessions: list, rf: np.ndarray, rr: np.ndarray) -> dict[tuple[str, int, int], float]:  # type: ignore[type-arg]
    out: dict[tuple[str, int, int], float] = {}
    for s in sessions:
        for cyl, t in (("front", rf), ("rear", rr)):
            corr = np.array(getattr(s.grid, cyl).ve_correction_pct, dtype=float)
            for a, b in zip(*np.nonzero(~np.isnan(corr)), strict=True):
                out[(cyl, int(a), int(b))] = float(corr[a, b] - (t[a, b] - 1) * 100)
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_mlg_learns_like_the_canonical_log(tmp_path: Path, version: int) -> None:
    frame, rf, rr = _synth()
    csv = write_canonical(tmp_path / "truth.csv", [frame])
    mlg = frame_to_mlg(tmp_path / f"truth_v{version}.mlg", frame, version=version)
    a = replay_logs([csv], Settings(data_dir=tmp_path / "a"))
    b = replay_logs([mlg], Settings(data_dir=tmp_path / "b"))
    (rep,) = b.reports
    assert any("degC" in n for n in rep.notes)  # blank-unit temperatures, Speeduino title
    ea, eb = _errors(a.sessions, rf, rr), _errors(b.sessions, rf, rr)
    assert len(ea) > 40 and set(ea) == set(eb)
    rms_a = float(np.sqrt(np.mean(np.square(list(ea.values())))))
    rms_b = float(np.sqrt(np.mean(np.square(list(eb.values())))))
    assert rms_b <= rms_a + 0.05 and rms_b < 1.0
    assert max(abs(ea[k] - eb[k]) for k in ea) < 0.2


def test_replaying_an_mlg_twice_adds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame, _, _ = _synth()
    mlg = frame_to_mlg(tmp_path / "twice.mlg", frame)
    data = tmp_path / "data"
    assert main(["replay", str(mlg), "--data-dir", str(data)]) == 0
    first = SessionStore(data).load_dataset().model_dump(mode="json")
    out1 = capsys.readouterr()
    assert main(["replay", str(mlg), "--data-dir", str(data)]) == 0
    second = SessionStore(data).load_dataset().model_dump(mode="json")
    out2 = capsys.readouterr()
    ids = [s["session_id"] for s in first["sessions"]]
    assert ids and ids == [s["session_id"] for s in second["sessions"]]
    assert all("-20221113T" in i for i in ids)  # from the header's capture time
    assert "already there" not in out1.err and f"{len(ids)} already there" in out2.err


def test_all_records_corrupt_or_cut_short_never_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_mlg(tmp_path / "bad.mlg", ALL_TYPES, rows(10), corrupt_rows=range(10))
    r = MlgReader(bad)
    assert list(r) == [] and r.crc_errors == 10
    cut = write_mlg(tmp_path / "cut.mlg", ALL_TYPES, rows(10))
    cut.write_bytes(cut.read_bytes()[:-30])
    r = MlgReader(cut)
    assert sum(len(f) for f in r) == 9 and r.skipped_bytes > 0
    assert main(["replay", str(bad), str(cut), "--no-store"]) == 0
    out = capsys.readouterr().out
    assert "note: crc errors: 10" in out and "note: skipped bytes:" in out

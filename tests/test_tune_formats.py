"""Tune file formats: each reads back what it wrote, the five agree on one table, the real
public tunes read with the right shapes and axes and round-trip byte-identical, a changed
cell changes only its own number, and bad files exit 2 with ``error: <what>, <file>``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dynoai_daemon.cli.main import main
from dynoai_daemon.tune import FORMATS, load_tune, read_tune, save_tune, tune_bytes
from dynoai_daemon.tune.model import TuneFormatError, TuneTable, TuneTables

#: public real tunes beside the repository (``<repo>/../shared/real-tunes``), or where
#: ``DYNOAI_REAL_TUNES`` points; the tests that need them skip when they are absent
REAL = Path(
    os.environ.get("DYNOAI_REAL_TUNES")
    or Path(__file__).resolve().parents[1] / ".." / "shared" / "real-tunes"
)
RPM = np.array([750.0, 1000.0, 1500.0, 2000.0, 3000.0, 4500.0, 6000.0])
KPA = np.array([20.0, 30.0, 45.0, 60.0, 80.0, 100.0])


def _grid(offset: float, res: float) -> np.ndarray:
    rr, mm = np.meshgrid(RPM, KPA, indexing="ij")
    v = 35.0 + 0.45 * mm + 6.0 * np.sin(rr / 1500.0) + offset
    return np.round(v / res) * res


def _tables(*, shared: bool) -> TuneTables:
    res = 0.5
    t: dict[str, TuneTable] = {
        "ve_front": TuneTable("ve_front", RPM, KPA, "kPa", _grid(0.0, res), resolution=res)
    }
    aliases = {"spark_rear": "spark_front"}
    if shared:
        aliases["ve_rear"] = "ve_front"
    else:
        t["ve_rear"] = TuneTable("ve_rear", RPM, KPA, "kPa", _grid(-2.5, res), resolution=res)
    t["spark_front"] = TuneTable(
        "spark_front", RPM, KPA, "kPa", np.round(40.0 - 0.3 * _grid(0, 1) / 2, 1), resolution=0.1
    )
    t["afr_target"] = TuneTable(
        "afr_target", RPM, KPA, "kPa", np.full((RPM.size, KPA.size), 13.2), resolution=0.1
    )
    return TuneTables(format="new", tables=t, aliases=aliases)


@pytest.mark.parametrize("fmt", ["msq", "vex", "pvv", "csv"])
def test_each_format_reads_back_what_it_wrote(fmt: str) -> None:
    src = _tables(shared=False)
    data = tune_bytes(src, fmt)
    back = read_tune(data, f"x.{fmt}")
    assert back.format == fmt
    for name in ("ve_front", "ve_rear"):
        got, want = back.get(name), src.get(name)
        assert got is not None and want is not None
        assert got is not back.get("ve_front") or name == "ve_front"
        assert np.array_equal(got.rpm_axis, RPM) and np.array_equal(got.load_axis, KPA)
        assert got.load_unit == "kPa"
        assert np.allclose(got.values, want.values)
    if fmt != "vex":  # VEX holds VE tables only
        spark = back.get("spark_front")
        assert spark is not None and np.allclose(spark.values, src.tables["spark_front"].values)
        assert back.get("spark_rear") is not None
    # Written back with nothing changed: the same bytes.
    assert tune_bytes(back, fmt) == data


def test_table_export_reads_back_and_refuses_two_tables() -> None:
    src = _tables(shared=True)
    back = read_tune(tune_bytes(src, "table"), "x.table")
    assert back.is_shared("ve_rear")
    assert np.allclose(back.tables["ve_front"].values, src.tables["ve_front"].values)
    with pytest.raises(TuneFormatError, match="holds one table"):
        tune_bytes(_tables(shared=False), "table")


def test_the_five_formats_agree_on_one_table() -> None:
    src = _tables(shared=True)
    reads = {fmt: read_tune(tune_bytes(src, fmt), f"x.{fmt}") for fmt in FORMATS}
    ref = src.tables["ve_front"]
    for fmt, tune in reads.items():
        t = tune.get("ve_rear")
        assert t is not None, fmt
        assert np.array_equal(t.rpm_axis, ref.rpm_axis), fmt
        assert np.array_equal(t.load_axis, ref.load_axis), fmt
        assert np.allclose(t.values, ref.values), fmt
        # one table for both cylinders everywhere except Power Vision, which always
        # stores two (identical) cylinder tables
        assert tune.is_shared("ve_rear") or fmt == "pvv", fmt


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_changed_cell_changes_only_its_number(fmt: str) -> None:
    src = _tables(shared=True)
    data = tune_bytes(src, fmt)
    tune = read_tune(data, f"x.{fmt}")
    t = tune.tables["ve_front"]
    new = t.values.copy()
    new[2, 3] += 3.5
    tune.replace("ve_front", t.with_values(new))
    out = tune_bytes(tune, fmt)
    assert out != data
    back = read_tune(out, f"x.{fmt}")
    assert np.allclose(back.tables["ve_front"].values, new)
    # Everything else is the same text: the difference is one number.
    a, b = data.decode("latin-1"), out.decode("latin-1")
    head = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    tail = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y)
    changed_old = a[head : len(a) - tail]
    assert len(changed_old) <= 6 and changed_old.replace(".", "").isdigit(), changed_old


def test_vex_alpha_n_scale_and_descending_load(tmp_path: Path) -> None:
    text = (
        "EVEME 1.0\nUserRev: 1.00\nUserComment: test\nDate: 01-01-2026\nTime: 10:00\n"
        "Page 0\nScale 0.5\nVE Table RPM Range              [ 3]\n"
        "   [  0] =   5\n   [  1] =  20\n   [  2] =  45\n"
        "VE Table Load Range (TP)        [ 2]\n   [  0] =  80\n   [  1] =  10\n"
        "VE Table                        [  3][  2]\n"
        "           [  0] [  1] [  2]\n"
        "   [  0] =  160   170   180\n"
        "   [  1] =   60    70    80\n"
    )
    p = tmp_path / "a.vex"
    p.write_text(text)
    tune = load_tune(p)
    t = tune.tables["ve_front"]
    assert t.load_unit == "%" and tune.is_shared("ve_rear")
    assert t.rpm_axis.tolist() == [500.0, 2000.0, 4500.0]
    assert t.load_axis.tolist() == [10.0, 80.0]  # made ascending
    assert t.values.tolist() == [[30.0, 80.0], [35.0, 85.0], [40.0, 90.0]]
    assert t.resolution == 0.5
    new = t.values.copy()
    new[1, 1] = 86.5
    tune.replace("ve_front", t.with_values(new))
    out = tmp_path / "b.vex"
    save_tune(tune, out)
    assert "   [  0] =  160   173   180\n" in out.read_text()
    assert load_tune(out).tables["ve_front"].values[1, 1] == 86.5


# ------------------------------------------------------------------------- real tunes


def _real(name: str) -> Path:
    p = REAL / name
    if not p.exists():
        pytest.skip(f"{name} not available")
    return p


@pytest.mark.parametrize("name", ["speeduino_base_tune.msq", "speeduino_na6_pnp_base_tune.msq"])
def test_real_speeduino_tunes(name: str, tmp_path: Path) -> None:
    p = _real(name)
    tune = load_tune(p)
    ve = tune.tables["ve_front"]
    assert ve.source == "veTable" and tune.is_shared("ve_rear")
    assert ve.shape == (16, 16) and ve.load_unit == "kPa" and ve.resolution == 1.0
    assert ve.rpm_axis[0] == 500.0 and ve.load_axis[0] == 16.0 and ve.load_axis[-1] == 100.0
    # Rows of the text are load: the first text row (16 kPa) holds the leanest VE.
    assert ve.values[:, 0].mean() < ve.values[:, -1].mean()
    assert tune.tables["spark_front"].source == "advTable1"
    assert tune.tables["afr_target"].resolution == pytest.approx(0.1)
    assert tune_bytes(tune, "msq") == p.read_bytes()
    out = tmp_path / name
    save_tune(tune, out)
    assert out.read_bytes() == p.read_bytes()


def test_real_power_vision_tune(tmp_path: Path) -> None:
    p = _real("powervision_16D110002401.pvv")
    tune = load_tune(p)
    f, r = tune.tables["ve_front"], tune.tables["ve_rear"]
    assert f.shape == r.shape == (27, 17)
    assert f.rpm_axis[0] == 750.0 and f.rpm_axis[-1] == 8000.0
    assert f.load_axis[0] == pytest.approx(10.3) and f.load_axis[-1] == pytest.approx(104.4)
    assert f.load_unit == "kPa" and not np.array_equal(f.values, r.values)
    assert tune.tables["ve_tps_front"].load_unit == "%"
    assert tune.tables["spark_front"].shape == (21, 17)
    assert tune.tables["afr_target"].shape == (17, 17)
    assert tune_bytes(tune, "pvv") == p.read_bytes()
    # One changed cell: one value attribute differs.
    new = f.values.copy()
    new[10, 8] += 1.0
    tune.replace("ve_front", f.with_values(new))
    out = tmp_path / "c.pvv"
    save_tune(tune, out)
    old_lines = p.read_text().splitlines()
    new_lines = out.read_text().splitlines()
    diff = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert len(diff) == 1 and "Cell value" in diff[0][0]


# --------------------------------------------------------------------- CLI and errors


def test_show_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "t.csv"
    save_tune(_tables(shared=True), p)
    assert main(["tune", "show", str(p), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ve = doc["tables"]["ve_rear"]
    assert set(ve) == {"rpm_axis", "load_axis", "load_unit", "values"}
    assert ve["load_unit"] == "kPa" and len(ve["values"]) == RPM.size
    assert len(ve["values"][0]) == KPA.size
    assert main(["tune", "show", str(p)]) == 0
    out = capsys.readouterr().out
    assert "ve_rear: the same table as ve_front" in out


BAD = {
    "garbage.msq": b"this is not xml",
    "short.msq": (
        b'<msq xmlns="http://www.msefi.com/:msq"><page>'
        b'<constant cols="2" digits="0" name="veTable" rows="2" units="%">1 2 3</constant>'
        b'<constant cols="1" name="rpmBins" rows="2" units="RPM">1000 2000</constant>'
        b'<constant cols="1" name="fuelLoadBins" rows="2" units="kPa">30 60</constant>'
        b"</page></msq>"
    ),
    "empty.msq": b'<msq xmlns="http://www.msefi.com/:msq"></msq>',
    "noheader.vex": b"VE Table RPM Range [1]\n [0] = 10\n",
    "novetable.pvv": b'<PVV><Item name="Injector Size" units="x"></Item></PVV>',
    "ragged.csv": b"rpm\\kPa,20,40\n1000,50,60\n2000,55\n",
    "words.csv": b"rpm\\kPa,20,40\n1000,fifty,60\n",
    "notable.table": b"<tableData><table></table></tableData>",
    "unknown.tun": b"whatever",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_exit_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / name
    p.write_bytes(BAD[name])
    assert main(["tune", "show", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith(f", {p}"), err
    assert "Traceback" not in err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "nope.msq"
    assert main(["tune", "show", str(p)]) == 2
    assert capsys.readouterr().err.strip().endswith(f", {p}")

"""Every public real-ECU log replays or decodes without a traceback (skipped without them).

The logs live outside the repository: ``<repo>/../shared/real-logs`` or the folder named
by ``DYNOAI_REAL_LOGS``. Run in-process through the CLI entry point to stay fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dynoai_daemon.cli.main import main
from dynoai_daemon.logs.mlg import MlgReader

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("DYNOAI_REAL_LOGS") or REPO.parent / "shared" / "real-logs")
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"no real logs at {REAL}")

LEARNS = ("ms2extra_210p_freeems.msl", "speeduino_dyno1_mlgcli.mlg", "mlgconv_long.mlg")


def _logs() -> list[Path]:
    if not REAL.is_dir():
        return []
    return sorted(p for p in REAL.iterdir() if p.is_file() and p.suffix.lower() != ".md")


def _cells(data: Path) -> dict[str, list[float]]:
    """session id -> AFR targets of its learned cells."""
    out: dict[str, list[float]] = {}
    for f in sorted((data / "sessions").glob("*.json")):
        s = json.loads(f.read_text())
        g = s["grid"]
        out[s["session_id"]] = [
            t
            for cyl in ("front", "rear")
            for trow, crow in zip(
                g[cyl]["afr_target_mean"], g[cyl]["ve_correction_pct"], strict=True
            )
            for t, c in zip(trow, crow, strict=True)
            if c is not None
        ]
    return out


def test_every_real_log_replays_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    learned: dict[str, int] = {}
    for log in _logs():
        data = tmp_path / log.name
        rc = main(["replay", str(log), "--data-dir", str(data)])
        out, err = capsys.readouterr()
        assert rc in (0, 2), (log.name, err)
        assert "Traceback" not in err
        if rc == 2:
            assert f"error: {log}" in err, err
        cells = _cells(data) if data.is_dir() else {}
        learned[log.name] = sum(len(v) for v in cells.values())
        if log.name in LEARNS:
            targets = [t for v in cells.values() for t in v]
            assert targets, (log.name, out)
            assert min(targets) >= 10.0 and max(targets) <= 17.0, log.name
    for name in LEARNS:
        assert learned.get(name, 0) > 0, learned


def test_every_capture_decodes_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    caps = [p for p in _logs() if p.suffix.lower() in (".log", ".trc")]
    for cap in caps:
        for driver in ("aemnet", "haltech", "megasquirt", "rusefi_wbo"):
            rc = main(["decode", "--driver", driver, str(cap)])
            _, err = capsys.readouterr()
            assert rc in (0, 2), (cap.name, driver, err)
            assert "Traceback" not in err


def test_aem_free_air_is_never_an_afr(capsys: pytest.CaptureFixture[str]) -> None:
    cap = REAL / "can_forte_aemnet_gauge.log"
    if not cap.is_file():
        pytest.skip("capture absent")
    assert main(["decode", "--driver", "aemnet", str(cap)]) == 0
    out, err = capsys.readouterr()
    header = out.splitlines()[0].split(",")
    assert "afr_front" not in header  # 331 x 0xFFFF with the valid bit set: all invalid
    assert "lambda_no_reading=331" in err


def test_foreign_ids_on_0x360_show_as_implausible(capsys: pytest.CaptureFixture[str]) -> None:
    cap = REAL / "can_subaru_wrx_revrev.log"
    if not cap.is_file():
        pytest.skip("capture absent")
    assert main(["decode", "--driver", "haltech", str(cap)]) == 0
    out, err = capsys.readouterr()
    assert "warning: tps_pct:" in err and "implausible_tps_pct=" in err
    rows = [ln.split(",") for ln in out.splitlines()[1:]]
    assert all(float(r[1]) <= 15000 for r in rows if len(r) > 1 and r[1])


def test_mlg_matches_its_text_twin_cell_for_cell_and_learns_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mlg, twin = REAL / "speeduino_dyno1_mlgcli.mlg", REAL / "speeduino_dyno1_mlgcli.csv"
    if not (mlg.is_file() and twin.is_file()):
        pytest.skip("pair absent")
    r = MlgReader(mlg)
    recs = np.concatenate(list(r.records()))
    lines = twin.read_text(encoding="latin-1").splitlines()
    assert lines[0].split("\t") == [f.name for f in r.header.fields]
    cols = []
    for i, f in enumerate(r.header.fields):
        v = r.values(recs, i)
        cols.append([str(int(x)) if f.is_bits else f"{x:.{f.digits}f}" for x in v.tolist()])
    body = lines[2:]
    assert len(body) == len(recs) == 6779
    diff = sum(
        1
        for k, line in enumerate(body)
        for i, cell in enumerate(line.split("\t"))
        if cols[i][k] != cell
    )
    assert diff == 0
    assert main(["replay", str(mlg), "--data-dir", str(tmp_path / "a")]) == 0
    assert main(["replay", str(twin), "--data-dir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a, b = _cells(tmp_path / "a"), _cells(tmp_path / "b")
    assert [len(v) for v in a.values()] == [len(v) for v in b.values()]
    assert sum(len(v) for v in a.values()) > 0
    assert [sorted(v) for v in a.values()] == [sorted(v) for v in b.values()]

"""Pooling sessions and applying the pooled correction to a tune's own tables.

Pooling is exact (two halves of a sample set pool to what the whole set gives); the
correction respects the per-cell change limit, the table's resolution, soundness of every
surrounding cell, shared tables, alpha-N tables, the tune's own AFR target, and smoothing
never reaches into cells left unchanged; knock retards go onto the spark table, retard
only, per cylinder; ``dynoai tune apply`` pools the newest build's sessions by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynoai_daemon.cli.main import main
from dynoai_daemon.config import TuningConfig
from dynoai_daemon.models import (
    BuildConfiguration,
    CylinderGrid,
    KnockTimingPattern,
    SessionGrid,
    SessionPatterns,
    TuningSession,
)
from dynoai_daemon.patterns.pooled import PoolError, pool_sessions
from dynoai_daemon.store.files import SessionStore
from dynoai_daemon.tune import load_tune, save_tune
from dynoai_daemon.tune.apply import apply_correction
from dynoai_daemon.tune.model import TuneTable, TuneTables

RPM = [1000.0, 2000.0, 3000.0, 4000.0, 5000.0]
KPA = [30.0, 50.0, 70.0, 90.0]
SHAPE = (len(RPM), len(KPA))
TUNING = TuningConfig(min_weight=3.0)


def _nested(a: np.ndarray, has: np.ndarray) -> list[list[float | None]]:
    return [
        [float(v) if h else None for v, h in zip(r, hr, strict=True)]
        for r, hr in zip(a, has, strict=True)
    ]


def _cyl(
    w: np.ndarray, ww: np.ndarray, mean: np.ndarray, std: np.ndarray, target: float = 13.0
) -> CylinderGrid:
    has = w > 0
    zeros = np.zeros(w.shape)
    return CylinderGrid(
        weight=w.tolist(),
        afr_mean=_nested(mean * target, has),
        afr_target_mean=_nested(np.full(w.shape, target), has),
        ve_correction_pct=_nested(zeros, np.zeros(w.shape, dtype=bool)),
        afr_std=_nested(std * target, has),
        knock_count=zeros.astype(int).tolist(),
        knock_max_deg=zeros.tolist(),
        ratio_mean=_nested(mean, has),
        ratio_std=np.where(has, std, 0.0).tolist(),
        weight_sq=ww.tolist(),
    )


def _stats(samples: list[list[list[tuple[float, float]]]]) -> tuple[np.ndarray, ...]:
    """Per cell ``[(weight, ratio), ...]`` -> W, sum w^2, weighted mean, population std."""
    w = np.zeros(SHAPE)
    ww = np.zeros(SHAPE)
    mean = np.ones(SHAPE)
    std = np.zeros(SHAPE)
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            cell = samples[i][j]
            if not cell:
                continue
            ws = np.array([c[0] for c in cell])
            xs = np.array([c[1] for c in cell])
            w[i, j] = ws.sum()
            ww[i, j] = (ws * ws).sum()
            mean[i, j] = (ws * xs).sum() / ws.sum()
            std[i, j] = np.sqrt((ws * (xs - mean[i, j]) ** 2).sum() / ws.sum())
    return w, ww, mean, std


def _session(
    sid: str,
    front: tuple[np.ndarray, ...],
    rear: tuple[np.ndarray, ...] | None = None,
    *,
    target_source: str = "ecu",
    target: float = 13.0,
    rpm: list[float] = RPM,
    build: BuildConfiguration | None = None,
    stamp: str = "2026-12-01T10:00:00Z",
    patterns: SessionPatterns | None = None,
) -> TuningSession:
    rear = front if rear is None else rear
    return TuningSession(
        session_id=sid,
        timestamp_utc=stamp,
        build_config=build,
        target_source=target_source,  # type: ignore[arg-type]
        grid=SessionGrid(
            rpm_axis=rpm,
            map_axis=KPA,
            front=_cyl(*front, target=target),
            rear=_cyl(*rear, target=target),
        ),
        patterns=patterns or SessionPatterns(),
    )


def _uniform(
    ratio: np.ndarray | float, *, w: float = 20.0, std: float = 0.002
) -> tuple[np.ndarray, ...]:
    """Sound cells: weight ``w`` from ``w`` unit samples, ratio ``ratio``, spread ``std``."""
    r = np.broadcast_to(np.asarray(ratio, dtype=float), SHAPE).copy()
    return np.full(SHAPE, w), np.full(SHAPE, w), r, np.full(SHAPE, std)


def _tune(values: np.ndarray | None = None, *, res: float = 0.1, unit: str = "kPa") -> TuneTables:
    v = np.full(SHAPE, 60.0) if values is None else values
    t = TuneTable("ve_front", np.array(RPM), np.array(KPA), unit, v, resolution=res)  # type: ignore[arg-type]
    return TuneTables(format="csv", tables={"ve_front": t}, aliases={"ve_rear": "ve_front"})


# ------------------------------------------------------------------------------ pooling


def test_pooling_two_halves_equals_one_set() -> None:
    rng = np.random.default_rng(7)
    cells = [
        [
            [
                (float(rng.uniform(0.05, 1.0)), float(rng.normal(1.03, 0.02)))
                for _ in range(int(rng.integers(0, 30)))
            ]
            for _ in KPA
        ]
        for _ in RPM
    ]
    half_a = [[c[::2] for c in row] for row in cells]
    half_b = [[c[1::2] for c in row] for row in cells]
    whole = pool_sessions([_session("all", _stats(cells))], TUNING)
    halves = pool_sessions([_session("a", _stats(half_a)), _session("b", _stats(half_b))], TUNING)
    assert halves.runs == 2 and whole.runs == 1
    for name in ("weight", "weight_sq", "mean", "m2", "ci_pct", "ratio"):
        assert np.allclose(
            getattr(halves.front, name),
            getattr(whole.front, name),
            equal_nan=True,
            rtol=1e-9,
            atol=1e-12,
        ), name
    assert np.array_equal(halves.front.sound, whole.front.sound)
    assert whole.front.sound.any() and not whole.front.sound.all()


def test_pooling_refuses_other_grids_and_skips_sessions_without_statistics() -> None:
    s1 = _session("s1", _uniform(1.02))
    s2 = _session("s2", _uniform(1.02), rpm=[1000.0, 2000.0, 3000.0, 4000.0, 5500.0])
    with pytest.raises(PoolError, match="different grid"):
        pool_sessions([s1, s2], TUNING)
    old = s1.model_copy(
        update={
            "session_id": "old",
            "grid": s1.grid.model_copy(
                update={"front": s1.grid.front.model_copy(update={"weight_sq": None})}
            ),
        }
    )  # type: ignore[union-attr]
    pooled = pool_sessions([old, s1], TUNING)
    assert pooled.runs == 1 and pooled.session_ids == ["s1"] and "old" in pooled.skipped
    with pytest.raises(PoolError, match="no session with pooling statistics"):
        pool_sessions([old], TUNING)


def test_criterion_uses_config_limits() -> None:
    noisy = _uniform(1.05, w=4.0, std=0.03)  # n_eff 4: CI ~ 3.4 pp
    assert not pool_sessions([_session("n", noisy)], TUNING).front.sound.any()
    loose = TuningConfig(min_weight=3.0, max_correction_pct=3.0)
    p = pool_sessions([_session("s", _uniform(1.05))], loose)
    assert p.front.clamped.all() and np.allclose(p.front.ratio, 1.03)


# ------------------------------------------------------------------------------ apply


def test_new_is_base_times_ratio_limited_and_rounded() -> None:
    ratio = np.linspace(0.85, 1.2, SHAPE[0] * SHAPE[1]).reshape(SHAPE)
    pooled = pool_sessions(
        [_session("s", _uniform(ratio))], TuningConfig(min_weight=3, max_correction_pct=25)
    )
    base = np.full(SHAPE, 61.3)
    res = apply_correction(_tune(base, res=0.5), pooled, TUNING, max_change_pct=10.0)
    new = res.tune.tables["ve_front"].values
    assert np.allclose(new / 0.5, np.round(new / 0.5))  # the table's resolution
    assert (new <= base * 1.10 + 1e-9).all() and (new >= base * 0.90 - 1e-9).all()
    inside = (ratio > 0.91) & (ratio < 1.09)
    assert np.allclose(new[inside], np.round(base[inside] * ratio[inside] / 0.5) * 0.5)
    ch = res.changes[0]
    assert ch.limited == int(np.count_nonzero((ratio > 1.1) | (ratio < 0.9)))
    assert ch.changed == int(np.count_nonzero(new != base))


def test_bilinear_between_cells_only_where_every_neighbour_is_sound() -> None:
    ratio = np.ones(SHAPE)
    ratio[1, 1], ratio[2, 1], ratio[1, 2], ratio[2, 2] = 1.02, 1.04, 1.06, 1.08
    front = _uniform(ratio)
    front[0][3, 3] = 0.0  # no data at (4000, 90)
    front[1][3, 3] = 0.0
    pooled = pool_sessions([_session("s", front)], TUNING)
    # a tune whose breakpoints sit between ours: (2500, 60) and (3500, 80)
    t = TuneTable(
        "ve_front",
        np.array([2500.0, 3500.0]),
        np.array([60.0, 80.0]),
        "kPa",
        np.full((2, 2), 50.0),
        resolution=0.01,
    )
    tune = TuneTables(format="csv", tables={"ve_front": t}, aliases={"ve_rear": "ve_front"})
    out = apply_correction(tune, pooled, TUNING).tune.tables["ve_front"].values
    assert out[0, 0] == pytest.approx(50.0 * 1.05, abs=0.006)  # mean of the four
    assert out[1, 1] == 50.0  # (4000, 90) has no data: unchanged
    assert out[0, 1] == pytest.approx(50.0 * (1.06 + 1.08 + 1.0 + 1.0) / 4, abs=0.006)


def test_smoothing_never_touches_unchanged_cells() -> None:
    rng = np.random.default_rng(3)
    ratio = 1.0 + rng.normal(0.0, 0.04, SHAPE)
    front = _uniform(ratio)
    gap = np.zeros(SHAPE, dtype=bool)
    gap[2, :2] = True
    gap[4, 3] = True
    for k in (0, 1):
        front[k][gap] = 0.0
    pooled = pool_sessions([_session("s", front)], TUNING)
    base = np.full(SHAPE, 70.0)
    plain = apply_correction(_tune(base), pooled, TUNING).tune.tables["ve_front"].values
    smooth_res = apply_correction(_tune(base), pooled, TUNING, smooth=True)
    smooth = smooth_res.tune.tables["ve_front"].values
    assert (plain[gap] == 70.0).all() and (smooth[gap] == 70.0).all()
    assert ((smooth != 70.0) == (plain != 70.0)).all()
    assert not np.allclose(smooth, plain)  # it did smooth
    assert smooth_res.changes[0].smoothed > 0
    assert np.ptp(smooth[~gap]) < np.ptp(plain[~gap])


def test_shared_table_takes_both_cylinders_and_tps_tables_stay() -> None:
    pooled = pool_sessions([_session("s", _uniform(1.04), _uniform(1.00))], TUNING)
    out = apply_correction(_tune(np.full(SHAPE, 50.0), res=0.01), pooled, TUNING)
    assert np.allclose(out.tune.tables["ve_front"].values, 51.0)
    assert out.changes[0].shared and "one table for both cylinders" in out.changes[0].line()
    tps = apply_correction(_tune(np.full(SHAPE, 50.0), unit="%"), pooled, TUNING)
    assert (tps.tune.tables["ve_front"].values == 50.0).all()
    assert "TPS" in tps.changes[0].line() and tps.cells_changed == 0


def test_separate_tables_take_their_own_cylinder() -> None:
    pooled = pool_sessions([_session("s", _uniform(1.04), _uniform(0.98))], TUNING)
    tune = _tune(np.full(SHAPE, 50.0), res=0.01)
    tune.aliases.clear()
    tune.tables["ve_rear"] = TuneTable(
        "ve_rear", np.array(RPM), np.array(KPA), "kPa", np.full(SHAPE, 40.0), resolution=0.01
    )
    out = apply_correction(tune, pooled, TUNING).tune
    assert np.allclose(out.tables["ve_front"].values, 52.0)
    assert np.allclose(out.tables["ve_rear"].values, 39.2)


def test_tune_target_re_references_config_target_sessions() -> None:
    # Measured AFR = 13.0 = the config target (ratio 1.0); the tune's own target is 12.5:
    # against it the cylinder is 4 % lean, so VE goes up 4 %.
    s = _session("s", _uniform(1.0), target_source="table", target=13.0)
    pooled = pool_sessions([s], TUNING)
    tune = _tune(np.full(SHAPE, 50.0), res=0.01)
    tune.tables["afr_target"] = TuneTable(
        "afr_target", np.array(RPM), np.array(KPA), "kPa", np.full(SHAPE, 12.5), resolution=0.1
    )
    out = apply_correction(tune, pooled, TUNING)
    assert np.allclose(out.tune.tables["ve_front"].values, 52.0)
    assert "own" in out.target
    ecu = apply_correction(tune, pool_sessions([_session("e", _uniform(1.0))], TUNING), TUNING)
    assert ecu.cells_changed == 0 and "ECU" in ecu.target


def test_knock_retards_spark_per_cylinder_and_never_advances() -> None:
    pat = KnockTimingPattern(
        knock_cells=[(2, 3, 4)],
        knock_cells_rear=[(2, 3, 4)],
        timing_retards=[(2, 3, -4.0)],
        timing_advances=[(4, 3, 1.0)],
    )
    s = _session("s", _uniform(1.0), patterns=SessionPatterns(knock_timing=[pat]))
    pooled = pool_sessions([s], TUNING)
    tune = _tune(np.full(SHAPE, 50.0))
    spark = np.full(SHAPE, 30.0)
    for name in ("spark_front", "spark_rear"):
        tune.tables[name] = TuneTable(
            name, np.array(RPM), np.array(KPA), "kPa", spark, resolution=0.25
        )
    out = apply_correction(tune, pooled, TUNING, sessions=[s], max_retard_deg=3.0).tune
    rear = out.tables["spark_rear"].values
    assert rear[2, 3] == 27.0 and np.count_nonzero(rear != 30.0) == 1  # bounded to 3 deg
    assert (out.tables["spark_front"].values == 30.0).all()
    assert (rear <= 30.0).all()  # no advance anywhere


# --------------------------------------------------------------------------------- CLI


def _build(stage: str) -> BuildConfiguration:
    return BuildConfiguration(engine_family="twin_cam", displacement_ci=103, stage=stage)  # type: ignore[arg-type]


def test_cli_apply_pools_the_newest_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SessionStore(tmp_path / "data")
    store.save_session(
        _session("old1", _uniform(1.08), build=_build("stock"), stamp="2026-11-01T10:00:00Z")
    )
    store.save_session(
        _session("new1", _uniform(1.03), build=_build("stage_2"), stamp="2026-12-01T10:00:00Z")
    )
    store.save_session(
        _session("new2", _uniform(1.03), build=_build("stage_2"), stamp="2026-12-01T11:00:00Z")
    )
    base = tmp_path / "base.csv"
    save_tune(_tune(np.full(SHAPE, 50.0)), base)
    out = tmp_path / "out.csv"
    rc = main(
        ["tune", "apply", "--base", str(base), "--data-dir", str(tmp_path / "data"), "-o", str(out)]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "2 of 3 sessions" in text and "2 pooled" in text
    assert (
        "ve_front (csv block ve_front, one table for both cylinders)" in text
        and "20 of 20 cells changed" in text
    )
    assert f"wrote {out}" in text
    assert np.allclose(load_tune(out).tables["ve_front"].values, 51.5)
    # explicit sessions, and the base untouched
    rc = main(
        [
            "tune",
            "apply",
            "--base",
            str(base),
            "--sessions",
            str(store.session_path("old1")),
            "-o",
            str(tmp_path / "o2.msq"),
        ]
    )
    assert rc == 0
    assert np.allclose(load_tune(tmp_path / "o2.msq").tables["ve_front"].values, 54.0)
    assert np.allclose(load_tune(base).tables["ve_front"].values, 50.0)


def test_cli_apply_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.csv"
    save_tune(_tune(), base)
    assert main(["tune", "apply", "--base", str(base), "--max-change", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-change")
    bad = tmp_path / "bad.json"
    bad.write_text('{"session_id": 5}')
    assert main(["tune", "apply", "--base", str(base), "--sessions", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid session") and err.endswith(str(bad))
    assert main(["tune", "apply", "--base", str(base), "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no sessions" in capsys.readouterr().err

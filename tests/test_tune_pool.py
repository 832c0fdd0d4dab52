"""The live tuner's loop: runs of one build pooled into ``tune/current``, kept across restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS, Settings, TuningConfig
from dynoai_daemon.core import Core
from dynoai_daemon.models import BuildConfiguration, TuningSession
from dynoai_daemon.patterns.session import SessionBuilder
from dynoai_daemon.service.tunepool import TunePool, build_key
from dynoai_daemon.store import SessionStore
from dynoai_daemon.tune import save_tune
from dynoai_daemon.tune.model import TuneTable, TuneTables
from tests.mosquitto import Subscriber
from tests.test_core import _FRAME, closed, feed_all
from tests.test_daemon import Cell, messages_until, pull, running

__all__ = ["running"]  # the daemon fixture, shared with test_daemon

BUILD = BuildConfiguration(engine_family="milwaukee_8", displacement_ci=114)


def sessions(n: int, settings: Settings) -> list[TuningSession]:
    out: list[TuningSession] = []
    builder = SessionBuilder.from_settings(settings)
    builder.build_config = BUILD
    for _ in range(n):
        c = Core(tuning=settings.tuning, station=f"p{len(out)}")
        out += [builder.build(e.run) for e in closed(feed_all(c, _FRAME))]
    return out


def test_pool_survives_a_restart_and_resets_on_a_new_build(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    store = SessionStore(tmp_path)
    pool = TunePool(tmp_path, settings.tuning, store)
    assert pool.set_build(BUILD)
    made = sessions(2, settings)
    for s in made:
        store.save_session(s)
        assert pool.add(s)
    assert not pool.add(made[0])  # once per session
    body = pool.payload()
    assert body["runs"] == len(made) >= 2
    assert body["front"]["cells_with_suggestion"] > 0

    again = TunePool(tmp_path, settings.tuning, store)
    again.load()
    assert again.build_id == build_key(BUILD) and again.session_ids == pool.session_ids
    assert again.payload()["front"] == body["front"]
    # Same build: the pool continues. Another build: a new, empty pool.
    assert not again.set_build(BUILD)
    assert again.set_build(BuildConfiguration(engine_family="twin_cam", displacement_ci=96))
    assert again.payload()["runs"] == 0 and again.reason == "build changed"
    # A session of another build does not join.
    assert not again.add(made[0])


def test_pooled_correction_equals_one_run_of_all_samples(tmp_path: Path) -> None:
    # Pooling sessions is exact: the pooled mean and interval are those of the union.
    tuning = TuningConfig()
    settings = Settings(data_dir=tmp_path, tuning=tuning.model_dump())
    store = SessionStore(tmp_path)
    pool = TunePool(tmp_path, tuning, store)
    pool.set_build(BUILD)
    one = sessions(1, settings)
    for s in one:
        store.save_session(s)
        pool.add(s)
    single = pool.payload()
    twice = TunePool(tmp_path / "b", tuning, store)
    twice.set_build(BUILD)
    for s in one:
        twice.add(s)
        twice.add(s.model_copy(update={"session_id": s.session_id + "-again"}))
    doubled = twice.payload()
    # The same samples twice: the same mean correction, a narrower interval.
    f1, f2 = single["front"], doubled["front"]
    for r1, r2 in zip(f1["ve_correction_pct"], f2["ve_correction_pct"], strict=True):
        for a, b in zip(r1, r2, strict=True):
            if a is not None:
                assert b == pytest.approx(a, abs=1e-3)
    ci1 = [v for row in f1["ve_correction_ci_pct"] for v in row if v]
    ci2 = [v for row in f2["ve_correction_ci_pct"] for v in row if v]
    assert ci1 and sum(ci2) < sum(ci1)


async def _tune_current(sub: Subscriber, st: str, pred: Any) -> dict[str, Any]:
    got = await messages_until(
        sub,
        lambda m, _: m.topic == f"dynoai/{st}/tune/current" and pred(json.loads(m.payload)),
        within=20.0,
    )
    body: dict[str, Any] = json.loads(got[-1].payload)
    return body


async def test_tune_current_over_mqtt(running: dict[str, Any]) -> None:
    cell: Cell = running["cell"]
    sub: Subscriber = running["sub"]
    st = running["station"]
    port = running["broker"].port
    first = await _tune_current(sub, st, lambda b: b["runs"] == 0)
    assert first["build_id"] == build_key(BUILD)

    async def one_pull() -> None:
        for _ in range(10):
            cell.tick(900, 30, 2, 1.0)
            await asyncio.sleep(0.02)
        await pull(cell, 2.0)
        for _ in range(60):
            cell.tick(900, 30, 2, 1.0)
            await asyncio.sleep(0.02)

    await one_pull()
    b1 = await _tune_current(sub, st, lambda b: b["runs"] == 1)
    await one_pull()
    b2 = await _tune_current(sub, st, lambda b: b["runs"] == 2)
    assert b2["session_ids"][0] == b1["session_ids"][0]
    assert b2["front"]["cells_with_suggestion"] >= 1
    async with aiomqtt.Client("127.0.0.1", port) as c:
        await c.publish(f"dynoai/{st}/request/tune/reset", b'{"transaction": "r1"}', qos=1)
        reset = await _tune_current(sub, st, lambda b: b["runs"] == 0)
        assert reset["reason"] == "operator"
        other = {"build": {"engine_family": "twin_cam", "displacement_ci": 96}}
        await one_pull()
        await _tune_current(sub, st, lambda b: b["runs"] == 1)
        await c.publish(f"dynoai/{st}/request/build/set", json.dumps(other).encode(), qos=1)
        changed = await _tune_current(sub, st, lambda b: b["reason"] == "build changed")
        assert changed["runs"] == 0 and changed["build_id"] != first["build_id"]


def test_sessions_record_base_and_corrected_tables_on_the_tunes_axes(tmp_path: Path) -> None:
    # A base tune on the default grid, padded at the top the way Delphi tables are: the
    # session records it once per breakpoint, and the corrected table moves where the
    # pooled correction is sound.
    rpm = np.array([*DEFAULT_RPM_AXIS, DEFAULT_RPM_AXIS[-1]], dtype=float)
    kpa = np.array(DEFAULT_MAP_AXIS, dtype=float)
    table = TuneTable("ve_front", rpm, kpa, "kPa", np.full((rpm.size, kpa.size), 60.0), 0.1)
    base = tmp_path / "base.csv"
    save_tune(
        TuneTables(format="csv", tables={"ve_front": table}, aliases={"ve_rear": "ve_front"}), base
    )
    settings = Settings(data_dir=tmp_path, tune={"base": str(base)})
    store = SessionStore(tmp_path)
    pool = TunePool(tmp_path, settings.tuning, store)
    pool.set_build(BUILD)
    pool.set_base_tune(str(base))
    s = sessions(1, settings)[0]
    assert pool.attach_tables(s)
    assert s.table_rpm_axis == list(DEFAULT_RPM_AXIS) and s.table_map_axis == list(DEFAULT_MAP_AXIS)
    init = np.array(s.initial_ve_table_front)
    final = np.array(s.final_ve_table_front)
    assert init.shape == (len(DEFAULT_RPM_AXIS), len(DEFAULT_MAP_AXIS)) and (init == 60.0).all()
    changed = final != init
    assert changed.any() and (np.abs(final / init - 1) <= 0.10 + 1e-9).all()
    assert TuningSession.model_validate_json(s.model_dump_json()) == s
    # An unreadable base: no tables, no crash.
    bad = tmp_path / "bad.msq"
    bad.write_text("not xml")
    pool.set_base_tune(str(bad))
    s2 = sessions(1, settings)[0]
    assert not pool.attach_tables(s2) and s2.initial_ve_table_front is None

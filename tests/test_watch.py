"""``dynoai watch``: the state model on its own, and the Textual app against a real broker.

The app test runs a real mosquitto, a real Daemon publishing through its own MQTT
publisher (the project's publish path, as ``replay --publish`` does), and the app in
Textual's headless pilot at 80x24: cells appear, the live highlight follows the engine
from one cell to another, a broker restart shows ``reconnecting`` and then recovers, and
``q`` quits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from dynoai_daemon.channels import Frame
from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS, load_settings
from dynoai_daemon.watch.render import render_grid, render_live
from dynoai_daemon.watch.state import WatchState
from tests.mosquitto import MosquittoBroker


def _state(station: str | None = "s1") -> WatchState:
    return WatchState(
        base="dynoai",
        station=station,
        rpm_axis=[float(v) for v in DEFAULT_RPM_AXIS],
        map_axis=[float(v) for v in DEFAULT_MAP_AXIS],
    )


def _msg(payload: object) -> bytes:
    return json.dumps(payload).encode()


def _cells(run: str, *cells: tuple[int, int, float | None, float]) -> bytes:
    return _msg(
        {
            "run_id": run,
            "cells": [
                {
                    "rpm_index": i,
                    "map_index": j,
                    "rpm": DEFAULT_RPM_AXIS[i],
                    "map_kpa": DEFAULT_MAP_AXIS[j],
                    "front": {
                        "weight": w,
                        "afr_mean": 13.0,
                        "ve_correction_pct": corr,
                        "knock_count": 0,
                    },
                    "rear": {
                        "weight": w,
                        "afr_mean": 13.5,
                        "ve_correction_pct": corr,
                        "knock_count": 2,
                    },
                }
                for i, j, corr, w in cells
            ],
        }
    )


# ----------------------------------------------------------------------------- state model


def test_cells_run_change_and_clamp() -> None:
    st = _state()
    assert st.apply("dynoai/s1/run/current", _msg({"run_id": "r1", "start_s": 1.0})) >= {"run"}
    assert st.apply("dynoai/s1/run/r1/cells", _cells("r1", (4, 6, 3.5, 20), (5, 6, 15.0, 40)))
    front = st.cells["front"]
    assert front[(4, 6)].correction_pct == 3.5 and not front[(4, 6)].clamped
    assert front[(5, 6)].clamped  # at the 15 % limit
    assert st.cells["rear"][(4, 6)].knock_count == 2
    assert st.covered("front") == 2
    # the run closes: the grid keeps its cells; a new run clears them
    st.apply("dynoai/s1/run/current", b"")
    assert st.run_id is None and st.covered("front") == 2
    st.apply("dynoai/s1/run/current", _msg({"run_id": "r2", "start_s": 9.0}))
    assert st.run_id == "r2" and st.cells["front"] == {}


def test_alerts_deduplicated_and_bad_payloads_counted() -> None:
    st = _state()
    alert = {
        "id": "a1",
        "kind": "knock",
        "severity": "high",
        "cylinder": "rear",
        "rpm": 3000,
        "map_kpa": 90,
        "value": 2.5,
        "threshold": 0.0,
        "t": 12.0,
    }
    assert st.apply("dynoai/s1/alert/knock", _msg(alert)) == {"alerts"}
    assert st.apply("dynoai/s1/alert/knock", _msg(alert)) == set()  # at-least-once repeat
    assert len(st.alerts) == 1
    assert "knock rear @ 3000 rpm/90 kPa 2.5" in st.alerts[0].text()
    assert st.apply("dynoai/s1/live", b"{not json") == set()
    assert st.apply("dynoai/s1/run/r1/cells", _msg({"cells": [{"rpm_index": "x"}]})) == set()
    assert st.bad_messages == 2
    assert st.apply("dynoai/other/live", _msg({"values": {}})) == set()  # another station


def test_follows_first_station_and_live_cell() -> None:
    st = _state(station=None)
    assert st.subscriptions() == ["dynoai/+/#"]
    live = {
        "t": 3.0,
        "values": {"rpm": 2010.0, "map_kpa": 51.0},
        "cell": {"rpm_index": 5, "map_index": 6, "rpm": 2000.0, "map_kpa": 50.0},
        "run_id": "r1",
    }
    assert st.apply("dynoai/cellA/live", _msg(live)) == {"station", "live"}
    assert st.station == "cellA" and st.live_cell == (5, 6)
    assert st.apply("dynoai/cellB/live", _msg(live)) == set()


def test_follows_a_live_station_not_a_retained_ghost() -> None:
    st = _state(station=None)
    offline = _msg({"state": "offline", "version": "0.1", "since": None})
    # a dead station's retained messages do not choose the station
    assert st.apply("dynoai/old/state", offline, retained=True) == set()
    assert st.apply("dynoai/old/run/current", _msg({"run_id": "x"}), retained=True) == set()
    assert st.apply("dynoai/new/run/current", _msg({"run_id": "r7"}), retained=True) == set()
    assert st.station is None
    online = _msg({"state": "online", "version": "0.1", "since": "2026-01-01T00:00:00Z"})
    changed = st.apply("dynoai/new/state", online, retained=True)
    assert st.station == "new" and {"station", "run", "state"} <= changed
    assert st.run_id == "r7" and st.daemon_state == "online"  # its held message applied
    assert st.apply("dynoai/old/live", _msg({"values": {}})) == set()


def test_session_grid_and_tune_shapes() -> None:
    st = _state()
    rpm, kpa = [1000.0, 2000.0], [50.0, 100.0]
    grid = {
        "weight": [[0, 12], [30, 0]],
        "afr_mean": [[None, 13.1], [12.9, None]],
        "ve_correction_pct": [[None, 2.0], [-15.0, None]],
        "ve_correction_ci_pct": [[None, 1.5], [0.8, None]],
        "clamped": [[False, False], [True, False]],
        "knock_count": [[0, 0], [1, 0]],
    }
    session = {
        "session_id": "x",
        "run": {"run_id": "r9"},
        "grid": {"rpm_axis": rpm, "map_axis": kpa, "front": grid, "rear": grid},
    }
    assert "cells" in st.apply("dynoai/s1/session/x", _msg(session))
    c = st.cells["front"][(1, 0)]
    assert c.clamped and c.ci_pct == 0.8 and c.knock_count == 1
    assert (0, 0) not in st.cells["front"] and st.grid_source == "session r9"
    # a session of an older run arriving while the next run fills the grid leaves it alone
    st.apply("dynoai/s1/run/current", _msg({"run_id": "r10", "start_s": 1.0}))
    st.apply("dynoai/s1/run/r10/cells", _cells("r10", (4, 6, 3.5, 20)))
    assert st.apply("dynoai/s1/session/x", _msg(session)) == {"session"}
    assert list(st.cells["front"]) == [(4, 6)] and st.grid_source == "live"
    # tune/current as a per-cylinder grid, then as a cell list; junk shapes are ignored
    st.apply("dynoai/s1/tune/current", _msg({"runs": ["a", "b"], "front": grid}))
    assert st.tune["front"][(0, 1)].correction_pct == 2.0 and st.tune_info["runs"] == 2
    cells = {
        "cells": [{"rpm_index": 1, "map_index": 1, "front": {"suggestion_pct": 4.0, "ci_pct": 1.0}}]
    }
    st.apply("dynoai/s1/tune/current", _msg(cells))
    assert st.tune["front"][(1, 1)].correction_pct == 4.0 and "rear" not in st.tune
    assert st.apply("dynoai/s1/tune/current", _msg([1, 2])) == {"tune"} and st.tune == {}


def test_render_marks_live_cell_and_fits_80_columns() -> None:
    st = _state()
    st.apply("dynoai/s1/run/r1/cells", _cells("r1", (4, 6, 3.5, 20), (5, 6, 15.0, 40)))
    st.apply(
        "dynoai/s1/live",
        _msg(
            {
                "values": {"rpm": 2000, "afr_front": 14.2, "afr_target": 13.2},
                "cell": {"rpm_index": 5, "map_index": 6},
            }
        ),
    )
    text = render_grid(st, "front", "correction")
    lines = text.plain.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) == len(DEFAULT_MAP_AXIS) + 2
    row = lines[1 + len(DEFAULT_MAP_AXIS) - 1 - 6]
    assert row.startswith(" 50") and "+15!" in row and " +4 " in row
    highlighted = [s for s in text.spans if "yellow" in str(s.style)]
    assert len(highlighted) == 1 and text.plain[highlighted[0].start : highlighted[0].end] == "+15!"
    live = render_live(st, compact=True)
    assert "RPM 2000" in live.plain and len(live.plain) <= 80
    lean = [s for s in live.spans if "red" in str(s.style)]
    assert lean and live.plain[lean[0].start : lean[0].end] == "14.20"


# ----------------------------------------------------------------------------- the app


def _screen(app: object) -> str:
    """The app's screen as text (from its SVG screenshot: entities and NBSPs decoded)."""
    import html

    svg = app.export_screenshot()  # type: ignore[attr-defined]
    return html.unescape(svg).replace("\xa0", " ")


def _frame(t0: float, rpm: float, kpa: float, n: int = 20, rate: float = 100.0) -> Frame:
    t = t0 + np.arange(n) / rate
    rng = np.random.default_rng(int(t0 * 100))
    cols = {
        "rpm": np.full(n, rpm),
        "map_kpa": np.full(n, kpa),
        "tps_pct": np.full(n, 15 + kpa * 0.8),
        "afr_target": np.full(n, 13.2),
        "afr_front": 13.2 * 1.04 + rng.normal(0, 0.05, n),
        "afr_rear": 13.2 * 0.97 + rng.normal(0, 0.05, n),
        "iat_f": np.full(n, 95.0),
        "ect_f": np.full(n, 200.0),
    }
    return Frame.from_columns(t, cols)


class Feeder:
    """Feeds the daemon 20 rows per 40 ms wall (5x real time) at the current cell."""

    def __init__(self, daemon: object) -> None:
        self.daemon = daemon
        self.cell = (2000.0, 50.0)
        self.t = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.daemon._feed(_frame(self.t, *self.cell))  # type: ignore[attr-defined]
            self.t += 0.2
            await asyncio.sleep(0.04)  # pacing: live and cells are throttled on wall time


@pytest.fixture
async def station(mosquitto: MosquittoBroker, tmp_path: Path) -> AsyncIterator[Feeder]:
    from dynoai_daemon.service.daemon import Daemon

    cfg = tmp_path / "dynoai.toml"
    cfg.write_text(
        f'station = "w1"\ndata_dir = "{tmp_path}"\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\nreconnect_max_s = 0.3\n'
    )
    daemon = Daemon(load_settings(cfg), drivers={})
    task = asyncio.create_task(daemon.run(), name="daemon")
    await asyncio.wait_for(daemon.ready.wait(), 10)
    feeder = Feeder(daemon)
    feeder.task = asyncio.create_task(feeder._run(), name="feeder")
    try:
        yield feeder
    finally:
        feeder.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder.task
        daemon.request_stop()
        await asyncio.wait_for(task, 15)


async def test_watch_app_live_grid_reconnect_and_quit(
    mosquitto: MosquittoBroker, station: Feeder
) -> None:
    from dynoai_daemon.watch.app import Broker, WatchApp

    state = _state("w1")
    app = WatchApp(
        state, Broker("127.0.0.1", mosquitto.port, backoff_initial=0.05, backoff_max=0.2)
    )
    i_a, j_a = DEFAULT_RPM_AXIS.index(2000), DEFAULT_MAP_AXIS.index(50)
    i_b, j_b = DEFAULT_RPM_AXIS.index(3500), DEFAULT_MAP_AXIS.index(80)
    async with app.run_test(size=(80, 24)) as pilot:
        async with asyncio.timeout(20):
            await app.wait_until(lambda: app.connection == "connected")
            await app.wait_until(
                lambda: state.live_cell == (i_a, j_a) and state.covered("front") > 0
            )
        cell = state.cells["front"][(i_a, j_a)]
        assert cell.correction_pct is not None and cell.correction_pct > 2  # ran lean
        assert state.cells["rear"][(i_a, j_a)].correction_pct < -1  # type: ignore[operator]
        await pilot.pause()
        app._repaint()
        shot = _screen(app)
        assert "krpm" in shot and "+4" in shot and "connected" in shot

        station.cell = (3500.0, 80.0)  # the engine moves: the highlight follows
        async with asyncio.timeout(20):
            await app.wait_until(lambda: state.live_cell == (i_b, j_b))
            await app.wait_until(lambda: (i_b, j_b) in state.cells["front"])
        assert (i_a, j_a) in state.cells["front"]  # the earlier cell stays on the grid

        await pilot.press("r")
        assert app.cylinder == "rear"
        await pilot.press("tab")
        assert app.view == "alerts"
        async with asyncio.timeout(20):
            await app.wait_until(lambda: bool(state.health))
        await pilot.pause()
        app._repaint()
        assert "outbox 0" in _screen(app)  # the daemon's retained health
        await pilot.press("tab")
        assert app.view == "tune"
        await pilot.pause()
        assert "no pooled correction of the build yet" in _screen(app)
        # the build's pooled correction arrives (retained, as the tune helper publishes it)
        tune = {"runs": ["r1", "r2"], "rear": {"ve_correction_pct": [[None] * 18] * 5
                + [[None] * 6 + [7.5] + [None] * 11]}}  # fmt: skip
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as pub:
            await pub.publish("dynoai/w1/tune/current", json.dumps(tune), qos=1, retain=True)
        async with asyncio.timeout(20):
            await app.wait_until(lambda: "rear" in state.tune)
        await pilot.pause()
        app._repaint()
        shot = _screen(app)
        assert "pooled correction of the build" in shot and "+8" in shot
        await pilot.press("tab")
        assert app.view == "grid"

        await asyncio.to_thread(mosquitto.stop)
        async with asyncio.timeout(20):
            await app.wait_until(lambda: app.connection.startswith("reconnecting"))
        await pilot.pause()
        assert "reconnecting" in _screen(app)
        seen = state.messages
        await asyncio.to_thread(mosquitto.start)
        async with asyncio.timeout(30):
            await app.wait_until(lambda: app.connection == "connected" and app.connections == 2)
            await app.wait_until(lambda: state.messages > seen + 5)  # live flows again
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0

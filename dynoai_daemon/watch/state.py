"""What ``dynoai watch`` knows about a station, built from its MQTT messages only.

:class:`WatchState` is the view's model, kept apart from the Textual widgets so that it
can be tested (and benchmarked) without a terminal: :meth:`WatchState.apply` takes one
MQTT message (topic and raw payload) and returns the names of the parts it changed
(``live``, ``cells``, ``run``, ``alerts``, ``health``, ``state``, ``session``, ``tune``,
``station``). It follows the contract's topics: ``live`` (channel values and current cell),
``run/<id>/cells`` (changed cells), retained ``run/current`` (a new run id clears the
grid; an empty payload means no run), ``alert/<kind>`` (deduplicated by ``id``: alerts are
at-least-once), retained ``health``, ``state`` and ``source/<name>/availability``,
``session/<id>`` (the closed run's full grid replaces the live cells, with confidence
intervals and clamp marks when the session carries them, unless a newer run is already
open), ``session/last`` and retained
``tune/current`` (the pooled correction of the build; any shape it does not understand is
ignored). With no station given, it follows the first station that shows it is alive
(retained messages of stations long gone do not count). Malformed
payloads are counted in ``bad_messages`` and otherwise ignored.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

CYLINDERS: tuple[str, str] = ("front", "rear")
ALERT_HISTORY = 200


@dataclass
class Cell:
    """One RPM x MAP cell of one cylinder as last reported."""

    weight: float = 0.0
    afr_mean: float | None = None
    correction_pct: float | None = None
    ci_pct: float | None = None
    knock_count: int = 0
    clamped: bool = False


@dataclass
class TuneCell:
    """One cell of the build's pooled correction (``tune/current``)."""

    correction_pct: float | None
    ci_pct: float | None = None


@dataclass
class AlertLine:
    """One alert, as shown in the feed."""

    id: str
    kind: str
    severity: str
    cylinder: str | None
    rpm: float | None
    map_kpa: float | None
    value: float | None
    threshold: float | None
    t: float | None
    run_id: str | None

    def text(self) -> str:
        """One line for people: kind, cylinder, cell, value against its threshold."""
        where = ""
        if self.rpm is not None and self.map_kpa is not None:
            where = f" @ {self.rpm:.0f} rpm/{self.map_kpa:.0f} kPa"
        val = ""
        if self.value is not None:
            val = f" {self.value:.4g}"
            if self.threshold is not None:
                val += f" (limit {self.threshold:.4g})"
        t = f"t={self.t:.1f}s " if self.t is not None else ""
        return f"{t}{self.severity.upper()} {self.kind} {self.cylinder or '-'}{where}{val}"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    f = _num(v)
    return None if f is None else int(f)


@dataclass
class WatchState:
    """The station as seen over MQTT.

    Args:
        base: the base topic (``dynoai``).
        station: the station id to follow, or None for the first one seen.
        rpm_axis / map_axis: the grid axes to start with (the config's); cells and live
            messages name each index's value, and the axes grow if the daemon's grid is
            larger.
        max_correction_pct: a correction at this limit is marked clamped when the
            message does not say.
    """

    base: str = "dynoai"
    station: str | None = None
    rpm_axis: list[float] = field(default_factory=list)
    map_axis: list[float] = field(default_factory=list)
    max_correction_pct: float = 15.0
    min_weight: float = 10.0

    live: dict[str, float | None] = field(default_factory=dict)
    live_t: float | None = None
    live_cell: tuple[int, int] | None = None
    live_run: str | None = None
    run_id: str | None = None
    run_start_s: float | None = None
    cells_covered: int | None = None
    cells: dict[str, dict[tuple[int, int], Cell]] = field(
        default_factory=lambda: {c: {} for c in CYLINDERS}
    )
    grid_source: str = "none"
    alerts: deque[AlertLine] = field(default_factory=lambda: deque(maxlen=ALERT_HISTORY))
    daemon_state: str | None = None
    daemon_version: str | None = None
    health: dict[str, Any] = field(default_factory=dict)
    availability: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_session: dict[str, Any] | None = None
    tune: dict[str, dict[tuple[int, int], TuneCell]] = field(default_factory=dict)
    tune_info: dict[str, Any] = field(default_factory=dict)
    messages: int = 0
    bad_messages: int = 0
    _held: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    _seen_alerts: set[str] = field(default_factory=set)
    _alert_order: deque[str] = field(default_factory=lambda: deque(maxlen=4 * ALERT_HISTORY))

    # ------------------------------------------------------------------ topics

    def subscriptions(self) -> list[str]:
        """MQTT filters to subscribe to (one station, or every station of the base)."""
        return [f"{self.base}/{self.station or '+'}/#"]

    def _suffix(self, topic: str) -> tuple[str | None, str | None]:
        base_parts = self.base.split("/")
        n = len(base_parts)
        parts = topic.split("/")
        if parts[:n] != base_parts or len(parts) < n + 2:
            return None, None
        return parts[n], "/".join(parts[n + 1 :])

    # ------------------------------------------------------------------ apply

    def apply(self, topic: str, payload: bytes, retained: bool = False) -> set[str]:
        """Take one MQTT message; return the parts of the state it changed.

        With no station chosen, retained messages are held per station (a broker keeps
        those of stations long gone) until one station shows it is alive: a message that
        is not retained, or a retained ``state`` of ``online``. That station is followed
        and its held messages applied first.
        """
        station, suffix = self._suffix(topic)
        if station is None or suffix is None:
            return set()
        changed: set[str] = set()
        if self.station is None:
            alive = not retained or (suffix == "state" and b'"online"' in payload)
            if not alive:
                held = self._held.setdefault(station, [])
                if len(held) < 1000:
                    held.append((topic, payload))
                return set()
            self.station = station
            changed.add("station")
            for old_topic, old_payload in self._held.pop(station, []):
                changed |= self.apply(old_topic, old_payload)
            self._held.clear()
        elif station != self.station:
            return set()
        self.messages += 1
        data: Any = None
        if payload:
            try:
                data = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                self.bad_messages += 1
                return changed
        try:
            changed |= self._dispatch(suffix, data)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            self.bad_messages += 1
        return changed

    def _dispatch(self, suffix: str, data: Any) -> set[str]:
        if suffix == "live":
            return self._on_live(data)
        if suffix.startswith("run/") and suffix.endswith("/cells"):
            return self._on_cells(data)
        if suffix == "run/current":
            return self._on_run(data)
        if suffix.startswith("alert/"):
            return self._on_alert(data)
        if suffix == "health":
            if isinstance(data, dict):
                self.health = data
                return {"health"}
            return set()
        if suffix == "state":
            if isinstance(data, dict):
                self.daemon_state = str(data.get("state") or "") or None
                self.daemon_version = data.get("version")
            else:
                self.daemon_state = None
            return {"state"}
        if suffix.startswith("source/") and suffix.endswith("/availability"):
            name = suffix[len("source/") : -len("/availability")]
            if isinstance(data, dict):
                self.availability[name] = data
            else:
                self.availability.pop(name, None)
            return {"health"}
        if suffix == "session/last":
            self.last_session = data if isinstance(data, dict) else None
            return {"session"}
        if suffix.startswith("session/"):
            return self._on_session(data)
        if suffix == "tune/current":
            return self._on_tune(data)
        return set()

    def _axis_value(self, axis: list[float], idx: int, value: Any) -> None:
        v = _num(value)
        if idx < 0 or idx > 10_000:
            raise ValueError("cell index out of range")
        while len(axis) <= idx:
            axis.append(math.nan)
        if v is not None:
            axis[idx] = v

    def _index(self, entry: dict[str, Any]) -> tuple[int, int]:
        i, j = _int(entry.get("rpm_index")), _int(entry.get("map_index"))
        if i is None or j is None:
            raise ValueError("cell without indices")
        self._axis_value(self.rpm_axis, i, entry.get("rpm"))
        self._axis_value(self.map_axis, j, entry.get("map_kpa"))
        return i, j

    def _on_live(self, data: Any) -> set[str]:
        if not isinstance(data, dict):
            return set()
        values = data.get("values")
        if isinstance(values, dict):
            self.live = {str(k): _num(v) for k, v in values.items()}
        self.live_t = _num(data.get("t"))
        cell = data.get("cell")
        self.live_cell = self._index(cell) if isinstance(cell, dict) else None
        run = data.get("run_id")
        self.live_run = str(run) if run else None
        return {"live"}

    def _new_run(self, run_id: str | None) -> None:
        if run_id is not None and run_id != self.run_id:
            self.run_id = run_id
            for c in CYLINDERS:
                self.cells[c] = {}
            self.grid_source = "live"

    def _on_run(self, data: Any) -> set[str]:
        if not isinstance(data, dict) or not data.get("run_id"):
            # empty retained payload: no run open; the grid keeps the last run's cells
            self.run_start_s = None
            self.cells_covered = None
            self.run_id = None
            return {"run"}
        self._new_run(str(data["run_id"]))
        self.run_start_s = _num(data.get("start_s"))
        self.cells_covered = _int(data.get("cells_covered"))
        return {"run", "cells"}

    def _on_cells(self, data: Any) -> set[str]:
        if not isinstance(data, dict):
            return set()
        run = data.get("run_id")
        if run:
            self._new_run(str(run))
        self.grid_source = "live"
        for entry in data.get("cells") or []:
            if not isinstance(entry, dict):
                continue
            key = self._index(entry)
            for cyl in CYLINDERS:
                c = entry.get(cyl)
                if not isinstance(c, dict):
                    continue
                corr = _num(c.get("ve_correction_pct"))
                clamped = c.get("clamped")
                self.cells[cyl][key] = Cell(
                    weight=_num(c.get("weight")) or 0.0,
                    afr_mean=_num(c.get("afr_mean")),
                    correction_pct=corr,
                    ci_pct=_num(c.get("ve_correction_ci_pct")),
                    knock_count=_int(c.get("knock_count")) or 0,
                    clamped=bool(clamped)
                    if clamped is not None
                    else (corr is not None and abs(corr) >= self.max_correction_pct - 1e-9),
                )
        return {"cells"}

    def _on_alert(self, data: Any) -> set[str]:
        if not isinstance(data, dict):
            return set()
        aid = str(data.get("id") or "")
        if aid:
            if aid in self._seen_alerts:
                return set()  # at-least-once delivery: a repeat of one already shown
            if len(self._alert_order) == self._alert_order.maxlen:
                self._seen_alerts.discard(self._alert_order[0])
            self._alert_order.append(aid)
            self._seen_alerts.add(aid)
        self.alerts.append(
            AlertLine(
                id=aid,
                kind=str(data.get("kind") or "?"),
                severity=str(data.get("severity") or "info"),
                cylinder=data.get("cylinder") or None,
                rpm=_num(data.get("rpm")),
                map_kpa=_num(data.get("map_kpa")),
                value=_num(data.get("value")),
                threshold=_num(data.get("threshold")),
                t=_num(data.get("t")),
                run_id=data.get("run_id") or None,
            )
        )
        return {"alerts"}

    def _on_session(self, data: Any) -> set[str]:
        if not isinstance(data, dict):
            return set()
        grid = data.get("grid")
        if not isinstance(grid, dict):
            return {"session"}
        rpm = [float(v) for v in grid.get("rpm_axis") or []]
        kpa = [float(v) for v in grid.get("map_axis") or []]
        if not rpm or not kpa:
            return {"session"}
        run = data.get("run") or {}
        run_id = run.get("run_id") or data.get("session_id")
        if self.run_id is not None and run_id != self.run_id:
            return {"session"}  # a newer run is already filling the grid: keep it
        self.rpm_axis, self.map_axis = rpm, kpa
        for cyl in CYLINDERS:
            g = grid.get(cyl)
            if not isinstance(g, dict):
                continue
            out: dict[tuple[int, int], Cell] = {}
            weight = g.get("weight") or []
            for i, row in enumerate(weight):
                for j, w in enumerate(row):
                    wt = _num(w) or 0.0
                    if wt <= 0:
                        continue
                    out[(i, j)] = Cell(
                        weight=wt,
                        afr_mean=_num(_at(g, "afr_mean", i, j)),
                        correction_pct=_num(_at(g, "ve_correction_pct", i, j)),
                        ci_pct=_num(_at(g, "ve_correction_ci_pct", i, j)),
                        knock_count=_int(_at(g, "knock_count", i, j)) or 0,
                        clamped=bool(_at(g, "clamped", i, j) or False),
                    )
            self.cells[cyl] = out
        self.grid_source = f"session {run_id or '?'}"
        return {"session", "cells"}

    def _on_tune(self, data: Any) -> set[str]:
        self.tune = {}
        self.tune_info = {}
        if not isinstance(data, dict):
            return {"tune"}
        self.tune_info = {
            k: v for k, v in data.items() if isinstance(v, str | int | float) or v is None
        }
        runs = data.get("runs")
        if isinstance(runs, list):
            self.tune_info["runs"] = len(runs)
        cells = data.get("cells")
        if isinstance(cells, list):  # a list of cells with per-cylinder suggestions
            for entry in cells:
                if not isinstance(entry, dict):
                    continue
                key = self._index(entry)
                for cyl in CYLINDERS:
                    c = entry.get(cyl)
                    if isinstance(c, dict):
                        corr = _tune_value(c)
                        if corr is not None:
                            self.tune.setdefault(cyl, {})[key] = TuneCell(corr, _ci(c))
        for cyl in CYLINDERS:  # or a grid per cylinder, [rpm][map]
            g = data.get(cyl)
            if not isinstance(g, dict):
                continue
            rows = next(
                (
                    g[k]
                    for k in ("ve_correction_pct", "suggestion_pct", "correction_pct")
                    if isinstance(g.get(k), list)
                ),
                None,
            )
            if rows is None:
                continue
            for i, row in enumerate(rows):
                for j, v in enumerate(row or []):
                    corr = _num(v)
                    if corr is not None:
                        ci = _num(_at(g, "ve_correction_ci_pct", i, j))
                        self.tune.setdefault(cyl, {})[(i, j)] = TuneCell(corr, ci)
        for name, axis in (("rpm_axis", self.rpm_axis), ("map_axis", self.map_axis)):
            values = data.get(name)
            if isinstance(values, list):
                for idx, v in enumerate(values):
                    self._axis_value(axis, idx, v)
        return {"tune"}

    # ------------------------------------------------------------------ queries

    def sources(self) -> dict[str, dict[str, Any]]:
        """Each source's health joined with its availability."""
        out: dict[str, dict[str, Any]] = {}
        hs = self.health.get("sources")
        if isinstance(hs, dict):
            for name, d in hs.items():
                if isinstance(d, dict):
                    out[str(name)] = dict(d)
        for name, av in self.availability.items():
            out.setdefault(name, {})["availability"] = av.get("state")
            if av.get("reason"):
                out[name]["reason"] = av.get("reason")
        return out

    def covered(self, cylinder: str) -> int:
        """Cells of a cylinder with a correction (reached the minimum weight)."""
        return sum(1 for c in self.cells[cylinder].values() if c.correction_pct is not None)


def _at(g: dict[str, Any], key: str, i: int, j: int) -> Any:
    rows = g.get(key)
    if not isinstance(rows, list) or i >= len(rows):
        return None
    row = rows[i]
    if not isinstance(row, list) or j >= len(row):
        return None
    return row[j]


def _tune_value(c: dict[str, Any]) -> float | None:
    for k in ("ve_correction_pct", "suggestion_pct", "correction_pct", "suggestion"):
        v = _num(c.get(k))
        if v is not None:
            return v
    return None


def _ci(c: dict[str, Any]) -> float | None:
    for k in ("ve_correction_ci_pct", "ci_pct", "ci"):
        v = _num(c.get(k))
        if v is not None:
            return v
    return None

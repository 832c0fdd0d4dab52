"""Live alerts from each core batch: knock, lean at high load, imbalance, heat soak, sensor.

The engine reads a :class:`~dynoai_daemon.core.FeedResult` right after the core produced
it, so an alert leaves within one micro-batch of the reading that caused it. Every alert
names station, run, cylinder, cell (the centre of the nearest cell), value and threshold.
A condition that stays true is not re-sent more often than once per ``alert_repeat_s`` per
(kind, cylinder, cell) key, measured on the core's clock.

Each payload carries ``ts`` (wall-clock UTC, ISO 8601, when the alert was raised: what a
subscriber can show) beside ``t`` (the daemon's clock, for ordering) and ``run_t``
(seconds since the open run started, None outside a run). The engine's memory is
bounded: rate-limit keys older than the repeat interval and the previous run's cells are
forgotten when a new run starts.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from dynoai_daemon.channels import SensorStatus
from dynoai_daemon.config import AlertConfig
from dynoai_daemon.core import Core, FeedResult
from dynoai_daemon.core.load import low_load

SEVERITY = {
    "lean": "critical",
    "knock": "high",
    "imbalance": "medium",
    "heat_soak": "warning",
    "sensor": "warning",
}


@dataclass(frozen=True)
class Alert:
    """One alert as published on ``<base>/<station>/alert/<kind>``."""

    kind: str
    severity: str
    station: str
    run_id: str | None
    cylinder: str | None
    rpm: float | None
    map_kpa: float | None
    value: float
    threshold: float
    t: float
    message: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    run_t: float | None = None
    ts: str = field(default_factory=lambda: utc_iso())

    def payload(self) -> dict[str, Any]:
        """Return the JSON-ready payload (NaN as None)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out


def utc_iso(epoch_s: float | None = None) -> str:
    """Wall-clock UTC as ISO 8601 with milliseconds and ``Z`` (now when ``epoch_s`` is None)."""
    when = datetime.now(UTC) if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AlertEngine:
    """Turns core batches into rate-limited alerts.

    Args:
        config: limits and repeat interval.
        station: station id named in every alert.
    """

    def __init__(self, config: AlertConfig, *, station: str) -> None:
        self.config = config
        self.station = station
        self._last_sent: dict[tuple[str, ...], float] = {}
        self._lean_since: dict[str, float | None] = {"front": None, "rear": None}
        self._imbalanced: set[tuple[str, int]] = set()
        self._status: dict[str, float] = {}
        self.counts: dict[str, int] = dict.fromkeys(SEVERITY, 0)
        self.suppressed = 0
        self._run_id: str | None = None
        self._run_start: float | None = None

    def _new_run(self, run_id: str | None, start: float | None, now: float) -> None:
        # Per-run memory ends with its run; rate-limit keys only matter for one interval.
        self._run_id, self._run_start = run_id, start
        self._imbalanced.clear()
        horizon = now - self.config.alert_repeat_s
        self._last_sent = {k: v for k, v in self._last_sent.items() if v >= horizon}

    def reload(self, config: AlertConfig) -> None:
        """Swap in new limits (SIGHUP); rate-limit memory is kept."""
        self.config = config

    def _emit(
        self,
        out: list[Alert],
        key: tuple[str, ...],
        t: float,
        **fields: Any,
    ) -> None:
        last = self._last_sent.get(key)
        if last is not None and t - last < self.config.alert_repeat_s:
            self.suppressed += 1
            return
        self._last_sent[key] = t
        kind = key[0]
        self.counts[kind] += 1
        start = self._run_start if fields.get("run_id") is not None else None
        run_t = round(t - start, 3) if start is not None and math.isfinite(t) else None
        out.append(
            Alert(kind=kind, severity=SEVERITY[kind], station=self.station, t=t, run_t=run_t,
                  **fields)
        )  # fmt: skip

    def evaluate(self, result: FeedResult, core: Core) -> list[Alert]:
        """Return the alerts caused by one batch, in time order."""
        out: list[Alert] = []
        cfg = self.config
        run = core.run
        run_id = run.run_id if run is not None else None
        if run_id != self._run_id:
            now = float(result.t[-1]) if result.t.size else -math.inf
            self._new_run(run_id, run.start_t if run is not None else None, now)
        grid = core.grid
        # Knock: any retard > 0, immediate, per cylinder and cell.
        for cyl, (t, val, rpm, kpa) in result.knock.items():
            hit = np.flatnonzero(val > 0)
            if hit.size == 0:
                continue
            cells, valid = grid.nearest(rpm[hit], kpa[hit])
            for i, cell, ok in zip(hit.tolist(), cells.tolist(), valid.tolist(), strict=True):
                crpm, ckpa = grid.centre(cell) if ok else (float(rpm[i]), float(kpa[i]))
                self._emit(
                    out, ("knock", cyl, str(cell)), float(t[i]),
                    run_id=run_id, cylinder=cyl, rpm=crpm, map_kpa=ckpa,
                    value=float(val[i]), threshold=0.0,
                    message=f"{cyl} cylinder knock retard {val[i]:.1f} deg",
                )  # fmt: skip
        # Lean at high load, held for lean_hold_ms.
        for cyl, ev in result.afr.items():
            if ev.t.size == 0:
                continue
            with np.errstate(invalid="ignore"):
                cond = (ev.afr > cfg.lean_limit_afr) & (ev.map_kpa >= cfg.lean_map_kpa)
            since = self._lean_since[cyl]
            for i in range(ev.t.size):
                ti = float(ev.t[i])
                if not cond[i]:
                    since = None
                    continue
                if since is None:
                    since = ti
                if (ti - since) * 1000.0 >= cfg.lean_hold_ms:
                    cells, valid = grid.nearest(ev.rpm[i : i + 1], ev.map_kpa[i : i + 1])
                    crpm_l: float | None = None
                    ckpa_l: float | None = None
                    if valid[0]:
                        crpm_l, ckpa_l = grid.centre(int(cells[0]))
                    self._emit(
                        out, ("lean", cyl), ti,
                        run_id=run_id, cylinder=cyl, rpm=crpm_l, map_kpa=ckpa_l,
                        value=float(ev.afr[i]), threshold=cfg.lean_limit_afr,
                        message=f"{cyl} cylinder lean {ev.afr[i]:.2f} AFR at high load",
                    )  # fmt: skip
            self._lean_since[cyl] = since
        # Imbalance: a cell of the open run crosses the threshold with enough weight.
        if run is not None and result.t.size:
            fw, rw = run.front.weight, run.rear.weight
            both = (fw >= cfg.imbalance_min_weight) & (rw >= cfg.imbalance_min_weight)
            if both.any():
                fa = np.divide(run.front.afr_sum, fw, out=np.zeros_like(fw), where=fw > 0)
                ra = np.divide(run.rear.afr_sum, rw, out=np.zeros_like(rw), where=rw > 0)
                delta = ra - fa
                crossing = np.flatnonzero(both & (np.abs(delta) >= cfg.imbalance_afr))
                t_last = float(result.t[-1])
                for cell in crossing.tolist():
                    key = (run.run_id, cell)
                    if key in self._imbalanced:
                        continue
                    self._imbalanced.add(key)
                    crpm, ckpa = grid.centre(cell)
                    self._emit(
                        out, ("imbalance", str(cell), run.run_id), t_last,
                        run_id=run_id, cylinder="rear" if delta[cell] > 0 else "front",
                        rpm=crpm, map_kpa=ckpa, value=float(delta[cell]),
                        threshold=cfg.imbalance_afr,
                        message=f"rear-front AFR {delta[cell]:+.2f} at {crpm:.0f}/{ckpa:.0f}",
                    )  # fmt: skip
        # Heat soak: IAT above the limit at low load.
        if result.t.size:
            with np.errstate(invalid="ignore"):
                hot = result.iat_f > cfg.iat_limit_f
            hot &= low_load(
                result.rpm,
                result.map_kpa,
                result.tps_pct,
                rpm_max=cfg.heat_soak_rpm,
                map_max_kpa=cfg.heat_soak_map_kpa,
                tps_max_pct=cfg.heat_soak_tps_pct,
            )
            idx = np.flatnonzero(hot)
            if idx.size:
                i = int(idx[-1])
                self._emit(
                    out, ("heat_soak",), float(result.t[i]),
                    run_id=run_id, cylinder=None, rpm=float(result.rpm[i]),
                    map_kpa=float(result.map_kpa[i]), value=float(result.iat_f[i]),
                    threshold=cfg.iat_limit_f,
                    message=f"intake air {result.iat_f[i]:.0f} F at low load",
                )  # fmt: skip
        # Sensor: a wideband reporting a non-normal state (sent on change, then rate-limited).
        for cyl, (t, codes) in result.status.items():
            for ti, code in zip(t.tolist(), codes.tolist(), strict=True):
                prev = self._status.get(cyl)
                self._status[cyl] = code
                if code == SensorStatus.NORMAL:
                    continue
                if prev == code and ("sensor", cyl, str(int(code))) in self._last_sent:
                    key_t = self._last_sent[("sensor", cyl, str(int(code)))]
                    if ti - key_t < cfg.alert_repeat_s:
                        continue
                try:
                    label = SensorStatus(int(code)).name.lower()
                except ValueError:
                    label = f"code {int(code)}"
                self._emit(
                    out, ("sensor", cyl, str(int(code))), ti,
                    run_id=run_id, cylinder=cyl, rpm=None, map_kpa=None,
                    value=float(code), threshold=0.0,
                    message=f"{cyl} wideband reports {label}",
                )  # fmt: skip
        out.sort(key=lambda a: a.t)
        return out

    def source_stale(self, source: str, age_s: float, t: float, run_id: str | None) -> Alert | None:
        """Return a sensor alert for a source that stopped sending (rate-limited)."""
        out: list[Alert] = []
        self._emit(
            out, ("sensor", "source", source), t,
            run_id=run_id, cylinder=None, rpm=None, map_kpa=None,
            value=round(age_s, 3), threshold=0.0,
            message=f"source {source} silent for {age_s:.1f} s",
        )  # fmt: skip
        return out[0] if out else None

"""The streaming core: frames in, cell statistics and run boundaries out.

``Core.feed(frame)`` takes any number of rows. For each batch it forward-fills the
engine channels (with staleness), detects run boundaries and decel events, matches each
wideband reading to the engine state one transport delay earlier, applies the learning
gates of docs/tuning.md, and merges what passes into the open run's per-cell, per-cylinder
statistics. Knock and heat-soak statistics use their own gates. The core is synchronous,
pure numpy and does no I/O; feeding a log row by row or all at once gives the same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt

from dynoai_daemon.channels import (
    AFR_CHANNELS,
    CYLINDERS,
    KNOCK_CHANNELS,
    Frame,
    SensorStatus,
    status_channel,
)
from dynoai_daemon.config import GridConfig, TuningConfig
from dynoai_daemon.core.grid import Grid
from dynoai_daemon.core.load import low_load
from dynoai_daemon.core.runs import (
    AfrEvents,
    CoreEvent,
    DecelEvent,
    FeedResult,
    OpenRun,
    RunClosed,
    RunDiscarded,
    RunStarted,
)
from dynoai_daemon.core.timeline import Timeline, Window

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

DECEL_ARM_TPS = 10.0
DECEL_MIN_RPM = 1500.0
DECEL_END_RPM = 1200.0
SPIKE_AFR = 15.5
RUN_MARKER = "run_marker"
#: Learning gates in the order a reading is checked; a rejected reading is counted under
#: the first that rejects it (``OpenRun.rejected``; ``Core.outside_runs`` for the first).
GATES: tuple[str, ...] = (
    "outside run", "sensor invalid", "no rpm/map", "warm-up", "decel", "transients",
    "AFR range",
)  # fmt: skip

_TRACKED = (
    "rpm", "map_kpa", "tps_pct", "afr_target", "ect_f", "iat_f",
    status_channel("afr_front"), status_channel("afr_rear"), "ve_front", "ve_rear",
)  # fmt: skip


def transport_delay_s(rpm: FloatArray, tuning: TuningConfig) -> FloatArray:
    """Return the wideband transport delay in seconds for each RPM (docs/tuning.md).

    ``delay = base_ms + k_ms_krpm / (rpm / 1000)``, capped at ``delay_max_ms``; zero when
    both constants are zero. Non-positive or missing RPM gives the cap.
    """
    base = tuning.delay_base_ms
    k = tuning.delay_k_ms_krpm
    cap = tuning.delay_max_ms
    with np.errstate(divide="ignore", invalid="ignore"):
        ms = base + k / (rpm / 1000.0)
    ms = np.where(np.isfinite(ms) & (rpm > 0), ms, cap)
    return np.minimum(ms, cap) / 1000.0


def target_from_table(map_kpa: FloatArray, tuning: TuningConfig) -> FloatArray:
    """Return the configured AFR target by MAP, linear between points, flat beyond."""
    kpa = np.array([p[0] for p in tuning.target_table], dtype=np.float64)
    afr = np.array([p[1] for p in tuning.target_table], dtype=np.float64)
    return np.interp(map_kpa, kpa, afr)


def _segments(code: npt.NDArray[np.int8], extra: IntArray | None = None) -> IntArray:
    """Row indexes where ``code`` changes (row 0 always), merged with ``extra`` rows."""
    n = code.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.intp)
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(code[1:], code[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    if extra is not None and extra.size:
        starts = np.union1d(starts, extra)
    return starts.astype(np.intp)


@dataclass
class _DelayedState:
    """Engine state matched to a set of AFR readings (see ``Core._engine_state``)."""

    idx: IntArray
    ts: FloatArray
    k: IntArray
    rpm: FloatArray
    map_kpa: FloatArray
    target: FloatArray
    from_ecu: BoolArray
    ok: BoolArray
    span_of: IntArray
    why: IntArray
    located: tuple[IntArray, FloatArray, IntArray, BoolArray] | None = None


class Core:
    """The streaming tuning core of one station.

    Args:
        grid: axes of the cell grid.
        tuning: gates, delay, run detection.
        station: station id used in run ids.
        utc_now: wall clock for run ids and session timestamps (injectable).
    """

    def __init__(
        self,
        *,
        grid: GridConfig | None = None,
        tuning: TuningConfig | None = None,
        station: str = "cell1",
        utc_now: Callable[[], datetime] | None = None,
    ) -> None:
        self.grid_config = grid or GridConfig()
        self.tuning = tuning or TuningConfig()
        self.station = station
        self.grid = Grid(self.grid_config.rpm_axis, self.grid_config.map_axis)
        self._utc_now = utc_now or (lambda: datetime.now(UTC))
        t = self.tuning
        keep = t.delay_max_ms / 1000 + t.rate_window_ms / 1000 + t.stale_ms / 1000 + 0.5
        self.timeline = Timeline(_TRACKED, stale_s=t.stale_ms / 1000, keep_s=max(1.5, keep))
        self.run: OpenRun | None = None
        self.runs_started = 0
        self.runs_discarded = 0
        self.rows_seen = 0
        #: AFR readings that fell in no run (engine below the run start rpm/throttle)
        self.outside_runs = 0
        self._armed = True
        self._low_since: float | None = None
        self._marker_mode = False
        self._tps_seen = False
        self._decel_armed = False
        self._decel: DecelEvent | None = None
        self._recent_decels: list[DecelEvent] = []
        self._hot_since: float | None = None
        self._last_t = -math.inf
        self._utc_origin: tuple[float, datetime] | None = None
        self._state_cache: _DelayedState | None = None

    # ------------------------------------------------------------------ public API

    @property
    def last_t(self) -> float:
        """Time of the newest row fed (``-inf`` before any)."""
        return self._last_t

    def feed(self, frame: Frame) -> FeedResult:
        """Process a batch of rows.

        Args:
            frame: rows with non-decreasing time, starting no earlier than the last batch.

        Returns:
            Run events in order, plus the batch's engine state and readings for alerts.

        Raises:
            ValueError: the frame goes back in time.
        """
        win = self.timeline.window(frame)
        self._state_cache = None
        n = len(frame)
        rows = win.batch_rows()
        t = frame.t
        rpm = win.value("rpm", rows)
        tps = win.value("tps_pct", rows)
        mapk = win.value("map_kpa", rows)
        iat = win.value("iat_f", rows)
        events: list[CoreEvent] = []
        spans: list[tuple[int, int, OpenRun]] = []
        if n:
            if self._utc_origin is None:
                self._utc_origin = (float(t[0]), self._utc_now())
            self._detect_decels(t, rpm, tps)
            spans = self._detect_runs(frame, t, rpm, tps, events)
        afr_out: dict[str, AfrEvents] = {}
        knock_out: dict[str, tuple[FloatArray, FloatArray, FloatArray, FloatArray]] = {}
        status_out: dict[str, tuple[FloatArray, FloatArray]] = {}
        span_start = np.array([s[0] for s in spans], dtype=np.intp)
        span_end = np.array([s[1] for s in spans], dtype=np.intp)
        for cyl, afr_ch, knock_ch in zip(CYLINDERS, AFR_CHANNELS, KNOCK_CHANNELS, strict=True):
            afr_out[cyl] = self._learn(win, frame, rpm, cyl, afr_ch, spans, span_start, span_end)
            knock_out[cyl] = self._knock(
                frame, t, rpm, mapk, cyl, knock_ch, spans, span_start, span_end
            )
            st = frame.columns.get(status_channel(afr_ch))
            if st is not None:
                m = ~np.isnan(st)
                status_out[cyl] = (t[m], st[m])
        if n:
            self._heat(t, rpm, tps, mapk, iat, spans)
            self._power(frame, t, rpm, iat, spans)
            self._last_t = float(t[-1])
            self.rows_seen += n
            for a, b, run in spans:
                run.rows += b - a
                run.last_t = float(t[b - 1])
            self._prune_decels()
        return FeedResult(events, t, rpm, mapk, tps, iat, afr_out, knock_out, status_out)

    def start_run(self, *, run_id: str | None = None, t: float | None = None) -> list[CoreEvent]:
        """Open a run now on the operator's command (closing any open one first).

        The run stays open until :meth:`stop_run`, a dyno run marker, or shutdown.

        Args:
            run_id: force the run id (recovering a run recorded by an earlier process).
            t: start time; defaults to the newest row fed.
        """
        events: list[CoreEvent] = []
        if t is None:
            t = self._last_t if math.isfinite(self._last_t) else 0.0
        if self.run is not None:
            self._close(t, "operator", events)
        self._open(t, events, run_id=run_id)
        assert self.run is not None
        self.run.manual = True
        return events

    def stop_run(self, reason: str = "operator", *, aborted: bool = False) -> list[CoreEvent]:
        """Close the open run now (operator command, shutdown or recovery)."""
        events: list[CoreEvent] = []
        if self.run is not None:
            t = self.run.last_t if not math.isnan(self.run.last_t) else self.run.start_t
            self._close(t, reason, events, aborted=aborted)
            self._armed = False
        return events

    def run_snapshot(self) -> OpenRun | None:
        """The open run, if any (live object: read, do not modify)."""
        return self.run

    # ------------------------------------------------------------------ runs

    def _run_id(self, t: float, seq: int) -> tuple[str, datetime]:
        assert self._utc_origin is not None
        t0, utc0 = self._utc_origin
        utc = utc0 + timedelta(seconds=max(0.0, t - t0))
        return f"{self.station}-{utc.strftime('%Y%m%dT%H%M%S')}-{seq}", utc

    def _open(self, t: float, events: list[CoreEvent], *, run_id: str | None = None) -> None:
        if self._utc_origin is None:
            self._utc_origin = (t, self._utc_now())
        self.runs_started += 1
        made_id, utc = self._run_id(t, self.runs_started)
        run_id = run_id or made_id
        self.run = OpenRun(run_id, self.runs_started, self.station, t, utc, self.grid.size)
        self._low_since = None
        events.append(RunStarted(run_id, t))

    def _close(
        self, t: float, reason: str, events: list[CoreEvent], *, aborted: bool = False
    ) -> None:
        run = self.run
        assert run is not None
        self.run = None
        run.end_t = t
        run.reason = reason
        run.aborted = aborted
        run.decels = [d for d in self._recent_decels if run.start_t <= d.start_t <= t]
        if run.duration_s < self.tuning.min_run_s:
            self.runs_discarded += 1
            events.append(RunDiscarded(run.run_id, run.duration_s))
        else:
            events.append(RunClosed(run))

    def _detect_runs(
        self,
        frame: Frame,
        t: FloatArray,
        rpm: FloatArray,
        tps: FloatArray,
        events: list[CoreEvent],
    ) -> list[tuple[int, int, OpenRun]]:
        cfg = self.tuning
        n = t.shape[0]
        # Without any TPS source the throttle is unknown and runs follow RPM alone (100);
        # once TPS has been seen, a NaN is a stale TPS (an ECU dropout): it neither opens
        # a run nor counts as closed throttle (NaN compares False both ways).
        if not self._tps_seen and not np.isnan(tps).all():
            self._tps_seen = True
        tps_eff = tps if self._tps_seen else np.where(np.isnan(tps), 100.0, tps)
        with np.errstate(invalid="ignore"):
            s = (rpm > cfg.run_start_rpm) & (tps_eff > cfg.run_start_tps)
            e = rpm < cfg.run_end_rpm
            lo = tps_eff < cfg.run_start_tps
        code = s.astype(np.int8) | (e.astype(np.int8) << 1) | (lo.astype(np.int8) << 2)
        marker = frame.columns.get(RUN_MARKER)
        marker_rows = None if marker is None else np.flatnonzero(~np.isnan(marker))
        starts = _segments(code, marker_rows)
        spans: list[tuple[int, int, OpenRun]] = []
        span_from = 0
        bounds = np.append(starts, n)

        def close_at(r: int, reason: str) -> None:
            nonlocal span_from
            assert self.run is not None
            if r > span_from:
                spans.append((span_from, r, self.run))
            end_t = float(t[r - 1]) if r > 0 else self.run.last_t
            if math.isnan(end_t):
                end_t = self.run.start_t
            self._close(end_t, reason, events)

        def open_at(r: int) -> None:
            nonlocal span_from
            self._open(float(t[r]), events)
            span_from = r

        for k in range(starts.shape[0]):
            a, b = int(bounds[k]), int(bounds[k + 1])
            if marker is not None and not math.isnan(marker[a]):
                self._marker_mode = True
                if self.run is not None:
                    close_at(a, "marker")
                if marker[a] >= 0.5:
                    open_at(a)
                continue
            if self._marker_mode or (self.run is not None and self.run.manual):
                continue
            ca = int(code[a])
            s_a, e_a, lo_a = bool(ca & 1), bool(ca & 2), bool(ca & 4)
            if self.run is None:
                if not s_a:
                    self._armed = True
                    continue
                if not self._armed:
                    continue
                open_at(a)
            if e_a:
                close_at(a, "rpm")
                self._armed = True
                continue
            if lo_a:
                if self._low_since is None:
                    self._low_since = float(t[a])
                deadline = self._low_since + cfg.run_end_idle_s
                r = a + int(np.searchsorted(t[a:b], deadline, side="left"))
                if r < b:
                    close_at(r, "idle")
                    self._low_since = None
                    self._armed = True
            else:
                self._low_since = None
        if self.run is not None and span_from < n:
            spans.append((span_from, n, self.run))
        return spans

    # ------------------------------------------------------------------ decel

    def _detect_decels(self, t: FloatArray, rpm: FloatArray, tps: FloatArray) -> None:
        cfg = self.tuning
        with np.errstate(invalid="ignore"):
            hi = tps >= DECEL_ARM_TPS
            lo = tps <= cfg.decel_tps_pct
            rpm_ok = rpm >= DECEL_MIN_RPM
            rpm_low = rpm < DECEL_END_RPM
        code = (
            hi.astype(np.int8) | (lo.astype(np.int8) << 1) | (rpm_ok.astype(np.int8) << 2)
            | (rpm_low.astype(np.int8) << 3)
        )  # fmt: skip
        for a in _segments(code).tolist():
            c = int(code[a])
            is_hi, is_lo, ok, low = bool(c & 1), bool(c & 2), bool(c & 4), bool(c & 8)
            d = self._decel
            if d is not None:
                if not is_lo or low:
                    d.end_t = float(t[a])
                    d.rpm_end = float(rpm[a])
                    d.window_end = d.end_t + float(transport_delay_s(np.array([rpm[a]]), cfg)[0])
                    self._decel = None
                    self._decel_armed = is_hi
                else:
                    continue
            if is_hi:
                self._decel_armed = True
            elif is_lo:
                if self._decel_armed and ok:
                    r0 = float(rpm[a])
                    delay = float(transport_delay_s(np.array([r0]), cfg)[0])
                    ev = DecelEvent(float(t[a]), r0, float(t[a]) + delay, tps_min=float(tps[a]))
                    self._decel = ev
                    self._recent_decels.append(ev)
                self._decel_armed = False

    def _prune_decels(self) -> None:
        # Keep what the open run may still claim, and what the learning gate can reach.
        horizon = self._last_t - 30.0
        if self.run is not None:
            horizon = min(horizon, self.run.start_t)
        self._recent_decels = [d for d in self._recent_decels if d.open or d.window_end > horizon]

    def _in_decel(self, q: FloatArray) -> BoolArray:
        out = np.zeros(q.shape[0], dtype=bool)
        for d in self._recent_decels:
            out |= (q >= d.start_t) & (q < d.end_t)
        return out

    # ------------------------------------------------------------------ learning

    def _assign(self, rows: IntArray, span_start: IntArray, span_end: IntArray) -> IntArray:
        """Span index of each batch row (-1 when the row is in no run)."""
        if span_start.shape[0] == 0:
            return np.full(rows.shape[0], -1, dtype=np.intp)
        si = (np.searchsorted(span_start, rows, side="right") - 1).astype(np.intp)
        inside = (si >= 0) & (rows < span_end[np.maximum(si, 0)])
        return np.where(inside, si, -1)

    def _engine_state(
        self,
        win: Window,
        idx: IntArray,
        te: FloatArray,
        rpm_rows: FloatArray,
        span_start: IntArray,
        span_end: IntArray,
    ) -> _DelayedState:
        """Engine state one transport delay before each reading, and the engine gates.

        Front and rear readings usually arrive on the same rows (one MTS packet, one log
        row), so the result is kept for the batch and reused when the rows are the same.
        """
        cached = self._state_cache
        if cached is not None and np.array_equal(cached.idx, idx):
            return cached
        cfg = self.tuning
        ts = te - transport_delay_s(rpm_rows[idx], cfg)
        k = win.rows_at(ts)
        rpm = win.value("rpm", k, ts)
        mapk = win.value("map_kpa", k, ts)
        tps = win.value("tps_pct", k, ts)
        ect = win.value("ect_f", k, ts)
        ecu_target = win.value("afr_target", k, ts) if cfg.use_ecu_target else None
        w_s = cfg.rate_window_ms / 1000.0
        tb = ts - w_s
        kb = win.rows_at(tb)
        tps_b = win.value("tps_pct", kb, tb)
        map_b = win.value("map_kpa", kb, tb)
        rpm_b = win.value("rpm", kb, tb)
        table = target_from_table(mapk, cfg)
        if ecu_target is not None:
            from_ecu = ~np.isnan(ecu_target)
            target = np.where(from_ecu, ecu_target, table)
        else:
            from_ecu = np.zeros(idx.size, dtype=bool)
            target = table
        with np.errstate(invalid="ignore"):
            tps_rate = np.abs(tps - tps_b) / w_s
            map_rate = np.abs(mapk - map_b) / w_s
            rpm_rate = (rpm - rpm_b) / w_s
            no_state = np.isnan(rpm) | np.isnan(mapk) | ~(target >= 5.0)
            cold = ect < cfg.ect_min_f
            transient = (tps_rate > cfg.max_tps_rate_pct_s) | (map_rate > cfg.max_map_rate_kpa_s)
            closed = (tps <= cfg.decel_tps_pct) & (rpm_rate < -cfg.decel_rpm_rate)
        if self._recent_decels:
            closed |= self._in_decel(ts)
        span_of = self._assign(idx, span_start, span_end)
        # The first gate that rejects each reading (0 = none), in GATES order.
        why = np.select([span_of < 0, no_state, cold, closed, transient], [1, 3, 4, 5, 6], 0)
        ok = why == 0
        state = _DelayedState(idx, ts, k, rpm, mapk, target, from_ecu, ok, span_of, why)
        self._state_cache = state
        return state

    def _learn(
        self,
        win: Window,
        frame: Frame,
        rpm_rows: FloatArray,
        cyl: str,
        afr_ch: str,
        spans: list[tuple[int, int, OpenRun]],
        span_start: IntArray,
        span_end: IntArray,
    ) -> AfrEvents:
        cfg = self.tuning
        col = frame.columns.get(afr_ch)
        if col is None:
            return AfrEvents.empty()
        idx = np.flatnonzero(~np.isnan(col))
        if idx.size == 0:
            return AfrEvents.empty()
        te = frame.t[idx]
        afr = col[idx]
        status = win.value(status_channel(afr_ch), idx + win.batch_start)
        status_ok = np.isnan(status) | (status == SensorStatus.NORMAL)
        st = self._engine_state(win, idx, te, rpm_rows, span_start, span_end)
        with np.errstate(invalid="ignore"):
            in_range = (afr >= cfg.afr_min) & (afr <= cfg.afr_max)
            learned = st.ok & status_ok & in_range
        self._count_rejects(st, status_ok, in_range, spans)
        if learned.any():
            if st.located is None:
                st.located = self.grid.locate(st.rpm, st.map_kpa)
            cells, weights, nearest, on_grid = st.located
            # A sample beyond half a step outside the axes belongs to no cell: it is
            # counted apart, never binned into an edge cell or the AFR error.
            off = learned & ~on_grid
            if off.any():
                for si, (_, _, run) in enumerate(spans):
                    run.out_of_grid += int(np.count_nonzero(off & (st.span_of == si)))
                learned = learned & on_grid
            ve = None
            if win.has("ve_" + cyl):
                ve = win.value("ve_" + cyl, st.k, st.ts)
            for si, (_, _, run) in enumerate(spans):
                m = learned & (st.span_of == si)
                if not m.any():
                    continue
                run.cylinder(cyl).add_afr(
                    cells[:, m],
                    weights[:, m],
                    nearest[m],
                    afr[m],
                    st.target[m],
                    None if ve is None else ve[m],
                )
                ne = int(np.count_nonzero(st.from_ecu[m]))
                run.target_from_ecu += ne
                run.target_from_table += int(np.count_nonzero(m)) - ne
        # Decel windows see every valid reading in a run, learned or not.
        if self._recent_decels:
            self._decel_afr(te, afr, status_ok, st.span_of)
        return AfrEvents(te, afr, st.rpm, st.map_kpa, learned)

    def _count_rejects(
        self,
        st: _DelayedState,
        status_ok: BoolArray,
        in_range: BoolArray,
        spans: list[tuple[int, int, OpenRun]],
    ) -> None:
        """Count each rejected reading under the first gate that rejected it."""
        why = np.where((st.why != 1) & ~status_ok, 2, st.why)
        why = np.where((why == 0) & ~in_range, 7, why)
        self.outside_runs += int(np.count_nonzero(why == 1))
        for si, (_, _, run) in enumerate(spans):
            counts = np.bincount(why[st.span_of == si], minlength=len(GATES) + 1)
            for code in np.flatnonzero(counts[1:]).tolist():
                gate = GATES[code]
                run.rejected[gate] = run.rejected.get(gate, 0) + int(counts[code + 1])

    def _decel_afr(
        self, te: FloatArray, afr: FloatArray, status_ok: BoolArray, span_of: IntArray
    ) -> None:
        valid = status_ok & (span_of >= 0) & np.isfinite(afr)
        for d in self._recent_decels:
            m = valid & (te >= d.window_start) & (te < d.window_end)
            if not m.any():
                continue
            vals = afr[m]
            d.afr_samples += int(vals.size)
            vmax = float(vals.max())
            d.afr_max = vmax if math.isnan(d.afr_max) else max(d.afr_max, vmax)
            spike = vals > SPIKE_AFR
            d.spikes += int(np.count_nonzero(spike))
            d.spike_excess_sum += float(np.sum(vals[spike] - SPIKE_AFR))

    def _knock(
        self,
        frame: Frame,
        t: FloatArray,
        rpm: FloatArray,
        mapk: FloatArray,
        cyl: str,
        knock_ch: str,
        spans: list[tuple[int, int, OpenRun]],
        span_start: IntArray,
        span_end: IntArray,
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        col = frame.columns.get(knock_ch)
        e = np.empty(0)
        if col is None:
            return e, e, e, e
        with np.errstate(invalid="ignore"):
            idx = np.flatnonzero(col >= 0)
        if idx.size == 0:
            return e, e, e, e
        r, m, v = rpm[idx], mapk[idx], col[idx]
        if not spans:
            return t[idx], v, r, m
        nearest, valid = self.grid.nearest(r, m)
        span_of = self._assign(idx, span_start, span_end)
        for si, (_, _, run) in enumerate(spans):
            sel = valid & (span_of == si)
            if sel.any():
                run.cylinder(cyl).add_knock(nearest[sel], v[sel])
        return t[idx], v, r, m

    def _heat(
        self,
        t: FloatArray,
        rpm: FloatArray,
        tps: FloatArray,
        mapk: FloatArray,
        iat: FloatArray,
        spans: list[tuple[int, int, OpenRun]],
    ) -> None:
        cfg = self.tuning
        n = t.shape[0]
        with np.errstate(invalid="ignore"):
            cond = iat > cfg.heat_soak_iat_f
        cond &= low_load(
            rpm,
            mapk,
            tps,
            rpm_max=cfg.heat_soak_rpm,
            map_max_kpa=cfg.heat_soak_map_kpa,
            tps_max_pct=cfg.heat_soak_tps_pct,
        )
        # Time each streak started, carried across batches.
        prev = np.empty(n, dtype=bool)
        prev[0] = self._hot_since is not None
        prev[1:] = cond[:-1]
        starts = cond & ~prev
        since = np.where(starts, t, np.nan)
        if self._hot_since is not None and cond[0]:
            since[0] = self._hot_since
        pos = np.where(~np.isnan(since), np.arange(n), 0)
        np.maximum.accumulate(pos, out=pos)
        streak_t = since[pos]
        hot = cond & ~np.isnan(streak_t) & (t - streak_t > cfg.heat_soak_min_s)
        self._hot_since = float(streak_t[-1]) if cond[-1] else None
        dt = np.diff(t, prepend=t[0] if self._last_t == -math.inf else self._last_t)
        for a, b, run in spans:
            seg_iat = iat[a:b]
            fin = seg_iat[~np.isnan(seg_iat)]
            if fin.size:
                if math.isnan(run.iat_start):
                    run.iat_start = float(fin[0])
                pk = float(fin.max())
                run.iat_peak = pk if math.isnan(run.iat_peak) else max(run.iat_peak, pk)
                run.iat_end = float(fin[-1])
            h = hot[a:b]
            if h.any():
                nearest, valid = self.grid.nearest(rpm[a:b][h], mapk[a:b][h])
                run.heat.add(nearest[valid], seg_iat[h][valid])
                run.heat.hot_seconds += float(np.sum(dt[a:b][h]))

    def _power(
        self,
        frame: Frame,
        t: FloatArray,
        rpm: FloatArray,
        iat: FloatArray,
        spans: list[tuple[int, int, OpenRun]],
    ) -> None:
        torque = frame.columns.get("torque_ftlb")
        power = frame.columns.get("power_hp")
        if torque is None and power is None:
            return
        del t, iat
        for a, b, run in spans:
            if torque is not None:
                tq = torque[a:b]
                if not np.all(np.isnan(tq)):
                    i = int(np.nanargmax(tq))
                    if math.isnan(run.peak_torque) or tq[i] > run.peak_torque:
                        run.peak_torque = float(tq[i])
                        run.peak_torque_rpm = float(rpm[a + i])
            if power is not None:
                pw = power[a:b]
            elif torque is not None:
                pw = torque[a:b] * rpm[a:b] / 5252.0
            else:  # pragma: no cover - guarded above
                continue
            if not np.all(np.isnan(pw)):
                i = int(np.nanargmax(pw))
                if math.isnan(run.peak_power) or pw[i] > run.peak_power:
                    run.peak_power = float(pw[i])
                    run.peak_power_rpm = float(rpm[a + i])

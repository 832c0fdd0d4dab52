"""The simulated dyno cell: drum mechanics, the operator's run plan, and the Simulation.

:class:`DynoModel` is the chassis dyno's mechanics: the drum's inertia reflected to the
crank through roll, tyre and gearing, an eddy-current absorber that holds rpm, and a drum
brake for decels. :class:`Simulation` runs a scenario's plan in fixed steps of simulated
time (2 ms physics; knock, spark and temperatures every 20 ms ECU tick), never reading a
wall clock: the same scenario and seed give the same numbers. After the mechanical loop
the exhaust AFRs and decel pops are computed over the whole trace, and each instrument
samples it at its own rate. ``run()`` yields the reports in time order, ``to_frame()``
returns them as one :class:`~dynoai_daemon.channels.Frame` for replay through the core.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dynoai_daemon.channels import Frame
from simulators.engine import (
    MODE_APPROACH,
    MODE_DECEL,
    MODE_HOLD,
    MODE_IDLE,
    MODE_PULL,
    MODE_SOAK,
    NM_PER_FTLB,
    EngineModel,
    PhysicsTrace,
    PopEvent,
    exhaust_afr,
    spark_torque_factor,
)
from simulators.scenario import (
    DecelStep,
    DynoSpec,
    HoldStep,
    IdleStep,
    MarkerStep,
    PullStep,
    Scenario,
    SoakStep,
)
from simulators.sensors import (
    DYNO_PERIOD_S,
    ECU_PERIOD_S,
    SOURCES,
    WIDEBAND_PERIOD_S,
    SimEvent,
    SourceStream,
    dyno_stream,
    ecu_stream,
    wideband_stream,
)

PHYSICS_DT_S = 0.002
TICK_STEPS = 10  # ECU tick = 20 ms
IDLE_TPS = 1.5
MAX_SIM_S = 3600.0
MODE_MARKER = -1  # a zero-length phase: the operator's run marker (never in the trace)
RAD_S_PER_RPM = 2.0 * math.pi / 60.0
IN_TO_M = 0.0254


class DynoModel:
    """Chassis dyno mechanics referred to the crank.

    Args:
        spec: the scenario's dyno section.
    """

    def __init__(self, spec: DynoSpec) -> None:
        self.spec = spec
        r_tire = spec.tire_diameter_in * IN_TO_M / 2.0
        r_roll = spec.roll_diameter_in * IN_TO_M / 2.0
        # Drum speed per crank speed, so drum inertia reflects by its square.
        self.drum_per_crank = r_tire / (r_roll * spec.gear_ratio)
        self.j_crank = spec.drum_inertia_kgm2 * self.drum_per_crank**2 + spec.engine_inertia_kgm2
        self.eff = spec.drivetrain_efficiency

    def accel_rpm_s(self, engine_ftlb: float, rpm: float, brake_ftlb: float = 0.0) -> float:
        """Crank acceleration (rpm/s) with the drum coupled: engine torque through the
        drivetrain against drum inertia, roll windage and an optional brake."""
        windage = 2.0e-7 * rpm * rpm  # ft-lb at the crank
        net_ftlb = engine_ftlb * self.eff - windage - brake_ftlb
        return net_ftlb * NM_PER_FTLB / self.j_crank / RAD_S_PER_RPM

    def drum_mph(self, rpm: float) -> float:
        """Roll surface speed (mph) at an engine speed."""
        r_roll = self.spec.roll_diameter_in * IN_TO_M / 2.0
        return rpm * RAD_S_PER_RPM * self.drum_per_crank * r_roll * 2.236936


@dataclass(frozen=True, slots=True)
class KnockEvent:
    """One knock the model produced (before the ECU pulled timing)."""

    t: float
    cylinder: str
    rpm: float
    map_kpa: float
    excess_deg: float
    retard_deg: float


@dataclass(frozen=True, slots=True)
class _Phase:
    mode: int
    seconds: float = 0.0  # for time-bounded phases
    rpm: float = 0.0  # target rpm (hold/approach) or end rpm (pull/decel)
    map_kpa: float = 0.0
    min_tps: float = 0.0
    fan_cfm: float | None = None


def _phases(step: object) -> list[_Phase]:
    if isinstance(step, MarkerStep):
        return [_Phase(MODE_MARKER, rpm=float(step.value))]
    if isinstance(step, IdleStep):
        return [_Phase(MODE_IDLE, seconds=step.seconds)]
    if isinstance(step, SoakStep):
        return [_Phase(MODE_SOAK, seconds=step.seconds, fan_cfm=step.fan_cfm)]
    if isinstance(step, HoldStep):
        return [_Phase(MODE_HOLD, step.seconds, r, m) for r, m in step.points()]
    if isinstance(step, PullStep):
        return [
            _Phase(MODE_APPROACH, seconds=0.6, rpm=step.from_rpm, map_kpa=45.0),
            _Phase(MODE_PULL, rpm=step.to_rpm),
        ]
    if isinstance(step, DecelStep):
        out = []
        if step.from_rpm is not None:
            out.append(_Phase(MODE_APPROACH, 0.6, step.from_rpm, 60.0, min_tps=15.0))
        out.append(_Phase(MODE_DECEL, rpm=step.to_rpm))
        return out
    raise TypeError(f"unknown plan step {step!r}")


class Simulation:
    """A scenario run on the simulated dyno, deterministic from a seed.

    Args:
        scenario: the validated scenario.
        seed: overrides the scenario's seed when given.
        transport_delay: False makes the widebands see the exhaust with no delay.
        pulls: when given, the plan is rebuilt with exactly this many pulls
            (see :meth:`Scenario.with_pulls`).

    The model is computed lazily on first use and cached; all outputs are in simulated
    seconds from 0.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int | None = None,
        transport_delay: bool = True,
        pulls: int | None = None,
    ) -> None:
        self.scenario = scenario if pulls is None else scenario.with_pulls(pulls)
        self.seed = scenario.seed if seed is None else int(seed)
        self.transport_delay = transport_delay
        ss = np.random.SeedSequence(self.seed)
        (
            self._rng_ecu_err,
            self._rng_knock,
            self._rng_pops,
            self._rng_wb,
            self._rng_ecu,
            self._rng_dyno,
            self._rng_phase,
        ) = (np.random.default_rng(s) for s in ss.spawn(7))
        self.engine = EngineModel(self.scenario, self._rng_ecu_err)
        self.dyno = DynoModel(self.scenario.dyno)
        self._knock_events: list[KnockEvent] = []
        self._pops: list[PopEvent] = []
        self._markers: list[tuple[float, float]] = []

    # -- physics --------------------------------------------------------------------

    @cached_property
    def trace(self) -> PhysicsTrace:
        """The physics trace of the whole plan (computed on first access)."""
        tr = self._simulate()
        self._pops = exhaust_afr(self.engine, tr, self._rng_pops)
        return tr

    @property
    def knock_events(self) -> list[KnockEvent]:
        """Every knock the model produced, in time order (runs the model if needed)."""
        self.trace  # noqa: B018 - computes the model on first use
        return self._knock_events

    @property
    def pops(self) -> list[PopEvent]:
        """Every decel lean spike generated, per cylinder (runs the model if needed)."""
        self.trace  # noqa: B018 - computes the model on first use
        return self._pops

    @property
    def markers(self) -> list[tuple[float, float]]:
        """The plan's run markers as ``(t, value)`` (1 begin, 0 end), in time order."""
        self.trace  # noqa: B018 - computes the model on first use
        return self._markers

    def _simulate(self) -> PhysicsTrace:
        eng, dyn, sc = self.engine, self.dyno, self.scenario
        ecu = sc.ecu
        lk = eng.lookup
        locate, at = lk.locate, lk.at
        l_torque, l_spark, l_mbt = eng.l_torque, eng.l_spark, eng.l_mbt
        l_kf, l_kr = eng.l_kls_front, eng.l_kls_rear
        dt = PHYSICS_DT_S
        tick_dt = dt * TICK_STEPS
        a_map = 1.0 - math.exp(-dt / 0.04)
        rng = self._rng_knock
        draws = rng.random((4096, 4))
        draw_i = 0

        rpm = eng.idle_rpm
        tps = IDLE_TPS
        kpa = eng.map_for_tps(tps, rpm)
        iat = eng.iat_ref_f
        ect = sc.conditions.engine_temp_start_f
        kr = [0.0, 0.0]
        last_knock = [-1e9, -1e9]
        spark_fac = 1.0
        dens = 1.0
        fan_default = sc.dyno.fan_airflow_cfm
        t = 0.0
        step_i = 0
        out_t: list[float] = []
        out_rpm: list[float] = []
        out_map: list[float] = []
        out_tps: list[float] = []
        out_tq: list[float] = []
        out_iat: list[float] = []
        out_ect: list[float] = []
        out_kf: list[float] = []
        out_kr: list[float] = []
        out_mode: list[int] = []
        knock_events = self._knock_events
        kr_max, kr_rec, kr_hold = (
            ecu.knock_retard_max_deg,
            ecu.knock_recover_deg_s,
            ecu.knock_hold_s,
        )
        kr_step = ecu.knock_retard_step_deg

        phases = [p for s in sc.plan for p in _phases(s)]
        for ph in phases:
            mode = ph.mode
            if mode == MODE_MARKER:
                self._markers.append((t, ph.rpm))
                continue
            fan = fan_default if ph.fan_cfm is None else ph.fan_cfm
            t_phase = 0.0
            settle = 0.0
            while True:
                # -- end of phase ---------------------------------------------------
                if mode in (MODE_IDLE, MODE_SOAK, MODE_HOLD):
                    if t_phase >= ph.seconds:
                        break
                elif mode == MODE_APPROACH:
                    settle = settle + dt if abs(rpm - ph.rpm) < 25.0 else 0.0
                    if settle >= ph.seconds or t_phase > 30.0:
                        break
                elif mode == MODE_PULL:
                    if rpm >= ph.rpm or t_phase > 60.0:
                        break
                elif rpm <= ph.rpm or t_phase > 60.0:  # decel
                    break
                if t > MAX_SIM_S:
                    break
                loc = locate(rpm, kpa)
                tq = at(l_torque, loc) * dens * spark_fac - eng.friction_ftlb(rpm, kpa)
                # -- operator, absorber and drum ------------------------------------
                if mode in (MODE_IDLE, MODE_SOAK):
                    tps_cmd = IDLE_TPS
                    slew = 300.0
                    rpm += (eng.idle_rpm - rpm) * (dt / 0.6)
                elif mode in (MODE_HOLD, MODE_APPROACH):
                    tps_cmd = max(eng.tps_for_map(ph.map_kpa, rpm), ph.min_tps)
                    slew = 300.0
                    rate = (ph.rpm - rpm) / 0.3
                    rate = 1500.0 if rate > 1500.0 else (-1500.0 if rate < -1500.0 else rate)
                    rpm += rate * dt
                elif mode == MODE_PULL:
                    tps_cmd = 100.0
                    slew = 1000.0
                    rpm += dyn.accel_rpm_s(tq, rpm) * dt
                else:
                    tps_cmd = 0.0
                    slew = 1000.0
                    rpm += dyn.accel_rpm_s(tq, rpm, sc.dyno.brake_ftlb) * dt
                    if rpm < 700.0:
                        rpm = 700.0
                d = tps_cmd - tps
                lim = slew * dt
                tps += lim if d > lim else (-lim if d < -lim else d)
                kpa += (eng.map_for_tps(tps, rpm) - kpa) * a_map
                # -- ECU tick: temperatures, knock, timing --------------------------
                if step_i % TICK_STEPS == 0:
                    ect_eq, ect_tau, iat_eq, iat_tau = eng.thermal_equilibrium(rpm, kpa, fan, ect)
                    ect += (ect_eq - ect) * (tick_dt / ect_tau)
                    iat += (iat_eq - iat) * (tick_dt / iat_tau)
                    dens = eng.density_ratio(iat)
                    spark = at(l_spark, loc)
                    mbt = at(l_mbt, loc)
                    temp_term = 0.06 * (iat - 100.0) + 0.03 * (ect - 300.0)
                    if draw_i >= draws.shape[0]:
                        draws = rng.random((4096, 4))
                        draw_i = 0
                    dr = draws[draw_i]
                    draw_i += 1
                    for c, l_k in ((0, l_kf), (1, l_kr)):
                        # Cycle-to-cycle spread of the knock limit (about 0.4 deg).
                        jitter = (
                            0.4
                            * math.sqrt(-2.0 * math.log(max(dr[2 * c], 1e-12)))
                            * (math.cos(2.0 * math.pi * dr[2 * c + 1]))
                        )
                        excess = spark - kr[c] - (at(l_k, loc) - temp_term + jitter)
                        knocked = False
                        if excess > 0.0 and rpm > 1200.0 and mode != MODE_DECEL:
                            lam = (3.0 + 6.0 * excess) * rpm / 3000.0
                            p = 1.0 - math.exp(-lam * tick_dt)
                            # Reuse the other cylinder's uniform: independent enough and
                            # keeps the draw count fixed per tick.
                            if dr[(2 * c + 2) % 4] < p:
                                knocked = True
                                kr[c] = min(kr_max, kr[c] + kr_step * (1.0 + 0.25 * excess))
                                last_knock[c] = t
                                knock_events.append(
                                    KnockEvent(t, ("front", "rear")[c], rpm, kpa, excess, kr[c])
                                )
                        if not knocked and kr[c] > 0.0 and t - last_knock[c] >= kr_hold:
                            kr[c] = max(0.0, kr[c] - kr_rec * tick_dt)
                    base_fac = spark_torque_factor(mbt - spark)
                    spark_fac = (
                        0.5
                        * (
                            spark_torque_factor(mbt - spark + kr[0])
                            + spark_torque_factor(mbt - spark + kr[1])
                        )
                        / base_fac
                    )
                out_t.append(t)
                out_rpm.append(rpm)
                out_map.append(kpa)
                out_tps.append(tps)
                out_tq.append(tq)
                out_iat.append(iat)
                out_ect.append(ect)
                out_kf.append(kr[0])
                out_kr.append(kr[1])
                out_mode.append(mode)
                t = (step_i + 1) * dt
                step_i += 1
                t_phase += dt
        f64 = np.float64
        return PhysicsTrace(
            t=np.array(out_t, dtype=f64),
            rpm=np.array(out_rpm, dtype=f64),
            map_kpa=np.array(out_map, dtype=f64),
            tps=np.array(out_tps, dtype=f64),
            iat_f=np.array(out_iat, dtype=f64),
            ect_f=np.array(out_ect, dtype=f64),
            torque_ftlb=np.array(out_tq, dtype=f64),
            knock_front=np.array(out_kf, dtype=f64),
            knock_rear=np.array(out_kr, dtype=f64),
            mode=np.array(out_mode, dtype=np.int8),
        )

    # -- instruments ----------------------------------------------------------------

    @cached_property
    def streams(self) -> dict[str, SourceStream]:
        """Each source's samples, keyed ``wideband``, ``ecu``, ``dyno``."""
        tr = self.trace
        spec = self.scenario.sensors
        ph = self._rng_phase.random(3)
        return {
            "wideband": wideband_stream(
                tr,
                spec,
                self._rng_wb,
                transport_delay=self.transport_delay,
                phase=float(ph[0]) * WIDEBAND_PERIOD_S,
            ),
            "ecu": ecu_stream(
                tr, self.engine, spec, self._rng_ecu, phase=float(ph[1]) * ECU_PERIOD_S
            ),
            "dyno": dyno_stream(
                tr, self.dyno.eff, spec, self._rng_dyno, phase=float(ph[2]) * DYNO_PERIOD_S
            ),
        }

    @property
    def duration_s(self) -> float:
        """Simulated length of the run in seconds."""
        tr = self.trace
        return float(tr.t[-1]) if len(tr) else 0.0

    def _merged_order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        st = self.streams
        ts = np.concatenate([st[s].t for s in SOURCES])
        src = np.concatenate([np.full(len(st[s]), i, dtype=np.int8) for i, s in enumerate(SOURCES)])
        row = np.concatenate([np.arange(len(st[s])) for s in SOURCES])
        order = np.lexsort((src, ts))
        return ts[order], src[order], row[order]

    def run(self) -> Iterator[SimEvent]:
        """Yield every source report in time order (ties: wideband, ecu, dyno).

        Each event's values hold only the channels that source sent at that instant
        (a warming-up wideband sends its status and detail but no AFR).
        """
        st = self.streams
        ts, src, row = self._merged_order()
        per_source = []
        for s in SOURCES:
            names = list(st[s].columns)
            per_source.append((s, names, [st[s].columns[n].tolist() for n in names]))
        markers = list(self.markers)
        mi = 0
        for t, si, ri in zip(ts.tolist(), src.tolist(), row.tolist(), strict=True):
            while mi < len(markers) and markers[mi][0] <= t:
                yield SimEvent(markers[mi][0], "dyno", {"run_marker": markers[mi][1]})
                mi += 1
            name, names, cols = per_source[si]
            vals = {n: c[ri] for n, c in zip(names, cols, strict=True) if c[ri] == c[ri]}
            yield SimEvent(t, name, vals)
        for mt, mv in markers[mi:]:
            yield SimEvent(mt, "dyno", {"run_marker": mv})

    def to_frame(self) -> Frame:
        """The whole run as the sensors reported it: one row per report, NaN elsewhere."""
        st = self.streams
        ts, src, row = self._merged_order()
        names: dict[str, None] = {}
        for s in SOURCES:
            names.update(dict.fromkeys(st[s].columns))
        cols = {}
        for n in names:
            col = np.full(ts.size, np.nan)
            for i, s in enumerate(SOURCES):
                c = st[s].columns.get(n)
                if c is not None:
                    sel = src == i
                    col[sel] = c[row[sel]]
            cols[n] = col
        if self.markers:
            # One extra row per marker (the dyno's logging begin/end), stable in time.
            mt = np.array([m[0] for m in self.markers], dtype=np.float64)
            mv = np.array([m[1] for m in self.markers], dtype=np.float64)
            all_t = np.concatenate([ts.astype(np.float64), mt])
            order = np.argsort(all_t, kind="stable")
            cols = {
                n: np.concatenate([c, np.full(mt.size, np.nan)])[order] for n, c in cols.items()
            }
            cols["run_marker"] = np.concatenate([np.full(ts.size, np.nan), mv])[order]
            return Frame(all_t[order], cols)
        return Frame(ts.astype(np.float64), cols)

"""The simulated instruments: widebands, ECU data stream and dyno channels.

Each source samples the physics trace at its own rate and phase and reports what the
real device would: the widebands (MTS, 81.92 ms) see each cylinder's exhaust after the
transport delay of docs/tuning.md (``base + k / krpm``, switchable to zero), through a
first-order sensor lag, with gaussian noise, quantised to MTS lambda steps of 0.001,
and report ``WARMING_UP`` without an AFR until their heater is up; the ECU (50 Hz)
reports rpm, MAP, TPS, temperatures, its AFR target, spark, knock retard and VE per
cylinder at its own resolutions; the dyno (100 Hz) reports rpm, torque and power.
A :class:`SourceStream` is one source's rows (NaN = not sent); :class:`SimEvent` is one
row as the simulator's generator yields it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from dynoai_daemon.channels import SensorStatus, detail_channel, status_channel
from simulators.engine import (
    MODE_IDLE,
    MODE_SOAK,
    EngineModel,
    PhysicsTrace,
    interp2,
    target_afr,
)
from simulators.scenario import SensorSpec

FloatArray = npt.NDArray[np.float64]

WIDEBAND_PERIOD_S = 0.08192
ECU_PERIOD_S = 0.02
DYNO_PERIOD_S = 0.01
SOURCES = ("wideband", "ecu", "dyno")
MTS_LAMBDA_STEP = 0.001


class SimEvent(NamedTuple):
    """One report of one simulated source: time (s), source name, channel values."""

    t: float
    source: str
    values: dict[str, float]


@dataclass
class SourceStream:
    """One source's samples: times and one column per channel (NaN = not sent)."""

    source: str
    t: FloatArray
    columns: dict[str, FloatArray]

    def __len__(self) -> int:
        return int(self.t.shape[0])


def transport_delay_s(rpm: FloatArray, base_ms: float, k_ms_krpm: float) -> FloatArray:
    """Exhaust transport delay in seconds: ``(base + k / (rpm / 1000)) / 1000``."""
    krpm = np.maximum(np.asarray(rpm, dtype=np.float64), 300.0) / 1000.0
    out: FloatArray = (base_ms + k_ms_krpm / krpm) / 1000.0
    return out


def first_order_lag(x: FloatArray, dt: float, tau_s: float) -> FloatArray:
    """Discrete first-order lag of ``x`` sampled every ``dt`` seconds."""
    if tau_s <= 0 or x.size == 0:
        return x.copy()
    a = 1.0 - math.exp(-dt / tau_s)
    out = np.empty_like(x)
    y = float(x[0])
    xs = x.tolist()
    for i, v in enumerate(xs):
        y += a * (v - y)
        out[i] = y
    return out


def sample_times(t_end: float, period: float, phase: float) -> FloatArray:
    """Sample instants ``phase + k * period`` up to ``t_end``."""
    n = math.floor((t_end - phase) / period) + 1 if t_end >= phase else 0
    out: FloatArray = phase + period * np.arange(max(n, 0), dtype=np.float64)
    return out


def _hold_index(trace_t: FloatArray, ts: FloatArray) -> npt.NDArray[np.intp]:
    idx = np.searchsorted(trace_t, ts, side="right") - 1
    out: npt.NDArray[np.intp] = np.clip(idx, 0, trace_t.size - 1)
    return out


def wideband_stream(
    trace: PhysicsTrace,
    spec: SensorSpec,
    rng: np.random.Generator,
    *,
    transport_delay: bool = True,
    phase: float = 0.0,
) -> SourceStream:
    """Sample both widebands (one chained MTS packet carries front and rear).

    Args:
        trace: physics trace with the exhaust AFR arrays filled.
        spec: the scenario's sensor spec (delay, lag, noise, warm-up).
        rng: generator for the noise.
        transport_delay: False sets the exhaust transport delay to zero.
        phase: time of the first packet.

    Returns:
        The stream with ``afr_front``/``afr_rear`` (NaN while warming up) and their
        ``_status`` and ``_detail`` channels.
    """
    tt = trace.t
    dt = float(tt[1] - tt[0]) if len(trace) > 1 else 0.002
    ts = sample_times(float(tt[-1]), WIDEBAND_PERIOD_S, phase)
    cols: dict[str, FloatArray] = {}
    if transport_delay:
        delay = transport_delay_s(trace.rpm, spec.delay_base_ms, spec.delay_k_ms_krpm)
    else:
        delay = np.zeros(len(trace))
    warming = ts < spec.warmup_s
    stoich = spec.stoich_afr
    for name, exhaust in (("afr_front", trace.afr_front), ("afr_rear", trace.afr_rear)):
        # The sensor at time t sees the gas burnt `delay(t)` earlier.
        seen = np.interp(tt - delay, tt, exhaust)
        lagged = first_order_lag(seen, dt, spec.lag_ms / 1000.0)
        afr = np.interp(ts, tt, lagged) + rng.normal(0.0, spec.afr_noise, ts.size)
        lam = np.clip(np.round(afr / stoich / MTS_LAMBDA_STEP) * MTS_LAMBDA_STEP, 0.5, 8.691)
        word = np.round(lam * 1000.0 - 500.0)
        reported = lam * stoich
        warm_pct = np.minimum(999.0, np.floor(1000.0 * ts / max(spec.warmup_s, 1e-9)))
        cols[name] = np.where(warming, np.nan, reported)
        cols[status_channel(name)] = np.where(
            warming, float(SensorStatus.WARMING_UP), float(SensorStatus.NORMAL)
        )
        cols[detail_channel(name)] = np.where(warming, warm_pct, word)
    return SourceStream("wideband", ts, cols)


def ecu_stream(
    trace: PhysicsTrace,
    engine: EngineModel,
    spec: SensorSpec,
    rng: np.random.Generator,
    *,
    phase: float = 0.0,
) -> SourceStream:
    """Sample the ECU's data stream at 50 Hz, at the resolutions an ECU logs."""
    ts = sample_times(float(trace.t[-1]), ECU_PERIOD_S, phase)
    k = _hold_index(trace.t, ts)
    n = ts.size
    rpm = np.maximum(0.0, np.round(trace.rpm[k] + rng.normal(0.0, spec.rpm_noise, n)))
    kpa = np.round(trace.map_kpa[k] + rng.normal(0.0, spec.map_noise_kpa, n), 1)
    tab = engine.tables
    ra, ma = tab.rpm_axis, tab.map_axis
    # The ECU looks its tables up at the rpm and MAP it measured.
    spark = interp2(tab.spark, ra, ma, rpm, kpa)
    kr_f = np.round(trace.knock_front[k], 1)
    kr_r = np.round(trace.knock_rear[k], 1)
    cols = {
        "rpm": rpm,
        "map_kpa": kpa,
        "tps_pct": np.round(np.clip(trace.tps[k], 0.0, 100.0), 1),
        "iat_f": np.round(trace.iat_f[k], 1),
        "ect_f": np.round(trace.ect_f[k], 1),
        "afr_target": np.round(target_afr(kpa, engine.scenario.ecu.target_table), 2),
        "spark_front_deg": np.round(spark - kr_f, 1),
        "spark_rear_deg": np.round(spark - kr_r, 1),
        "knock_front_deg": kr_f,
        "knock_rear_deg": kr_r,
        "ve_front": np.round(interp2(tab.ve_ecu_front, ra, ma, rpm, kpa), 1),
        "ve_rear": np.round(interp2(tab.ve_ecu_rear, ra, ma, rpm, kpa), 1),
        "baro_kpa": np.full(n, round(engine.baro_kpa, 1)),
    }
    return SourceStream("ecu", ts, cols)


def dyno_stream(
    trace: PhysicsTrace,
    efficiency: float,
    spec: SensorSpec,
    rng: np.random.Generator,
    *,
    phase: float = 0.0,
) -> SourceStream:
    """Sample the dyno at 100 Hz: engine rpm (plug-wire pickup), torque and power.

    Torque is what reaches the roll, referred to engine speed (engine torque times the
    drivetrain efficiency); with the clutch in (idle, soak) the roll sees none.
    """
    ts = sample_times(float(trace.t[-1]), DYNO_PERIOD_S, phase)
    k = _hold_index(trace.t, ts)
    n = ts.size
    rpm = np.maximum(0.0, np.round(trace.rpm[k] + rng.normal(0.0, spec.rpm_noise, n)))
    mode = trace.mode[k]
    engaged = (mode != MODE_IDLE) & (mode != MODE_SOAK)
    tq = np.where(engaged, trace.torque_ftlb[k] * efficiency, 0.0)
    tq = np.round(tq + rng.normal(0.0, spec.torque_noise_ftlb, n), 2)
    hp = np.round(tq * rpm / 5252.0, 2)
    return SourceStream("dyno", ts, {"rpm": rpm, "torque_ftlb": tq, "power_hp": hp})

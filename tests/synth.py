"""Synthetic dyno logs with known truth, for core and replay tests.

A run plan of steady holds, WOT pulls and throttle snaps is turned into 100 Hz engine
state; each cylinder's AFR is the target times the true VE ratio of the cell (bilinear
between breakpoints), seen by the wideband one transport delay later, plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dynoai_daemon.channels import Frame
from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS, TuningConfig
from dynoai_daemon.core import target_from_table, transport_delay_s


@dataclass
class Plan:
    """Steps: ("hold", rpm, kpa, seconds[, tps]), ("pull", rpm0, rpm1, seconds),
    ("snap", rpm, seconds), ("idle", seconds)."""

    steps: list[tuple[object, ...]] = field(default_factory=list)
    rate_hz: float = 100.0


def bilinear_truth(ratio: np.ndarray, rpm: np.ndarray, kpa: np.ndarray) -> np.ndarray:
    ra = np.asarray(DEFAULT_RPM_AXIS, float)
    ma = np.asarray(DEFAULT_MAP_AXIS, float)
    rc = np.clip(rpm, ra[0], ra[-1])
    mc = np.clip(kpa, ma[0], ma[-1])
    i = np.clip(np.searchsorted(ra, rc, "right") - 1, 0, ra.size - 2)
    j = np.clip(np.searchsorted(ma, mc, "right") - 1, 0, ma.size - 2)
    fr = (rc - ra[i]) / (ra[i + 1] - ra[i])
    fm = (mc - ma[j]) / (ma[j + 1] - ma[j])
    return (
        ratio[i, j] * (1 - fr) * (1 - fm)
        + ratio[i + 1, j] * fr * (1 - fm)
        + ratio[i, j + 1] * (1 - fr) * fm
        + ratio[i + 1, j + 1] * fr * fm
    )


def make_log(
    plan: Plan,
    ratio_front: np.ndarray,
    ratio_rear: np.ndarray,
    *,
    seed: int = 1,
    noise: float = 0.08,
    delay: bool = True,
    tuning: TuningConfig | None = None,
    knock_rear: list[tuple[float, float, float]] | None = None,
    iat: float | tuple[float, float] = 90.0,
    pop_afr: float | None = None,
) -> Frame:
    """Return a canonical-style frame (every channel on every row)."""
    tuning = tuning or TuningConfig()
    rng = np.random.default_rng(seed)
    dt = 1.0 / plan.rate_hz
    rpm_parts, kpa_parts, tps_parts = [], [], []
    for step in plan.steps:
        kind = step[0]
        if kind == "hold":
            r, k, s = step[1], step[2], step[3]
            n = int(float(s) / dt)
            rpm_parts.append(np.full(n, float(r)))
            kpa_parts.append(np.full(n, float(k)))
            tps = float(step[4]) if len(step) > 4 else 15.0 + 85.0 * (float(k) - 20) / 85.0
            tps_parts.append(np.full(n, tps))
        elif kind == "pull":
            _, r0, r1, s = step
            n = int(float(s) / dt)
            rpm_parts.append(np.linspace(float(r0), float(r1), n))
            kpa_parts.append(np.full(n, 100.0))
            tps_parts.append(np.full(n, 100.0))
        elif kind == "snap":
            _, r, s = step
            n = int(float(s) / dt)
            rpm_parts.append(np.linspace(float(r), max(1300.0, float(r) - 400 * float(s)), n))
            kpa_parts.append(np.full(n, 22.0))
            tps_parts.append(np.full(n, 0.0))
        elif kind == "idle":
            _, s = step
            n = int(float(s) / dt)
            rpm_parts.append(np.full(n, 900.0))
            kpa_parts.append(np.full(n, 35.0))
            tps_parts.append(np.full(n, 2.0))
        else:
            raise ValueError(kind)
    rpm = np.concatenate(rpm_parts)
    kpa = np.concatenate(kpa_parts)
    tps = np.concatenate(tps_parts)
    n = rpm.size
    t = np.arange(n) * dt
    target = target_from_table(kpa, tuning)
    d = transport_delay_s(rpm, tuning) if delay else np.zeros(n)
    cols: dict[str, np.ndarray] = {"rpm": rpm, "map_kpa": kpa, "tps_pct": tps}
    for name, ratio in (("afr_front", ratio_front), ("afr_rear", ratio_rear)):
        true_afr = target * bilinear_truth(ratio, rpm, kpa)
        if pop_afr is not None:
            # lean pops only on the closed-throttle overrun of a snap, not at idle
            true_afr = np.where((tps <= 3.0) & (rpm >= 1500.0), pop_afr, true_afr)
        seen = np.interp(t - d, t, true_afr)
        cols[name] = seen + rng.normal(0, noise, n)
    cols["afr_target"] = target
    if isinstance(iat, tuple):
        cols["iat_f"] = np.linspace(iat[0], iat[1], n)
    else:
        cols["iat_f"] = np.full(n, float(iat))
    cols["ect_f"] = np.full(n, 200.0)
    kr = np.zeros(n)
    for r_lo, r_hi, deg in knock_rear or []:
        m = (rpm >= r_lo) & (rpm <= r_hi) & (kpa >= 90) & (rng.random(n) < 0.3)
        kr[m] = deg
    cols["knock_rear_deg"] = kr
    cols["knock_front_deg"] = np.zeros(n)
    cols["torque_ftlb"] = np.where(tps > 50, 90 + 10 * np.sin(rpm / 2000.0), 20.0)
    return Frame.from_columns(t, cols)

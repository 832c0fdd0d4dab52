"""Ground truth of a simulated session, in the schema of docs/contract.md (``truth/<name>.json``).

The simulator knows what a perfect tuner would find: the true/ECU VE ratio of every cell
per cylinder (heat-soak-free), the cells visited by clean wideband samples (the exhaust
the sensor read was the steady AFR the cell's VE ratio gives: no transient excursion, no
decel pop, over the whole transport-delay look-back), among those the cells where the
cylinders' true AFRs differ by at least 0.5, the cells where the model really knocked,
the peak intake temperature, whether a heat soak happened (intake above 130 F, the
seed's definition, at low airflow for > 2 s), and the RPM bands where decel pops went
over 15.5 AFR. Every one of these comes from what the engine model did, never from the
daemon's gates (warm-up, rate limits, TPS or MAP thresholds), so the truth can catch a
wrong gate. Tests and the end-to-end checks compare the daemon's sessions against this.

Heat soak does not change the engine's VE, but it does change what a wideband reads: the
scenario's ECU corrects only part of the density loss of hot intake air, so hot samples
read rich (``EngineModel.heat_afr_factor``). ``heat_soak_cells`` are the visited cells
where clean samples taken during a heat soak carry weight, and ``ve_heat_factor`` is, per
cell, the clean-sample-weighted mean of that AFR factor (1 where no clean sample fell).
In a soaked cell the correction a perfect *measurement* finds is
``ve_ratio * ve_heat_factor``; the heat-free ``ve_ratio`` stays the correction a perfect
tuner applies once the intake is back at its reference temperature.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from dynoai_daemon.store import atomic_write_json
from simulators.dyno import Simulation

FloatArray = npt.NDArray[np.float64]

#: Decel enrichment bands of docs/tuning.md.
POP_BANDS: tuple[tuple[float, float], ...] = (
    (1500, 2500),
    (2500, 3500),
    (3500, 4500),
    (4500, 5500),
)
POP_SPIKE_AFR = 15.5


class Truth(BaseModel):
    """The ground truth document (docs/contract.md keys first, then extras)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: str
    seed: int
    rpm_axis: list[float]
    map_axis: list[float]
    ve_ratio_front: list[list[float]]
    ve_ratio_rear: list[list[float]]
    imbalance_cells: list[list[float]]
    knock_cells: list[list[float]]
    iat_peak_f: float
    pop_zones: list[list[float]]
    heat_soak: bool
    visited_cells: list[list[float]]
    knock_retard_cells: list[list[float]]
    knock_events: int
    pop_events: int
    duration_s: float
    build: dict[str, Any]
    heat_soak_cells: list[list[float]]
    ve_heat_factor: list[list[float]]
    #: per cell, the clean-sample-weighted mean of the true ratio where the samples
    #: really were: what a perfect bilinear measurement finds (it differs from the
    #: breakpoint ratio where the VE surface curves between breakpoints)
    ve_ratio_sampled_front: list[list[float]]
    ve_ratio_sampled_rear: list[list[float]]


def _axis_weights(axis: FloatArray, x: FloatArray) -> tuple[Any, FloatArray, Any]:
    """Lower index, fraction and validity per value (edges clamp within half a step)."""
    n = axis.size
    lo_half = (axis[1] - axis[0]) / 2.0
    hi_half = (axis[-1] - axis[-2]) / 2.0
    valid = (x >= axis[0] - lo_half) & (x <= axis[-1] + hi_half)
    xc = np.clip(x, axis[0], axis[-1])
    i = np.clip(np.searchsorted(axis, xc, side="right") - 1, 0, n - 2)
    f = (xc - axis[i]) / (axis[i + 1] - axis[i])
    return i, f, valid


#: a wideband sample is clean when the exhaust it reads was within this fraction of the
#: steady AFR the cell's VE ratio predicts (no transient excursion, no decel pop)
CLEAN_TOL = 0.005
#: how far back the exhaust a sample reads may come from (transport delay + sensor lag)
LOOKBACK_S = 0.3
#: a heat soak is intake air above this (the seed's definition) at low airflow ...
SOAK_IAT_F = 130.0
#: ... where airflow is the engine's share of its maximum air mass flow (rpm/6000 x
#: MAP/baro, as the thermal model uses it): below this the intake keeps the heat
SOAK_FLOW_MAX = 0.3
#: ... for longer than this, in one stretch
SOAK_MIN_S = 2.0
#: steady weight a cell needs in the truth to count as visited (a measurement
#: sufficiency, fixed here; not the daemon's configured criterion)
VISITED_WEIGHT = 3.0


def _clean(sim: Simulation) -> Any:
    """Per trace step: both cylinders' exhaust AFR equals the steady VE-ratio AFR (heat
    aside) within :data:`CLEAN_TOL`: what the engine model itself did, not a gate."""
    tr = sim.trace
    heat = sim.engine.heat_afr_factor(tr.iat_f)
    ok = np.ones(len(tr), dtype=bool)
    for afr, true in ((tr.afr_front, tr.afr_true_front), (tr.afr_rear, tr.afr_true_rear)):
        ok &= np.abs(afr / (true * heat) - 1.0) <= CLEAN_TOL
    return ok


def _steady_samples(sim: Simulation) -> Any:
    """Trace indices of the valid wideband samples that read a clean exhaust over the
    whole look-back window (so transport delay and sensor lag cannot smear a transient
    into them)."""
    tr = sim.trace
    wb = sim.streams["wideband"]
    status = wb.columns["afr_front_status"]
    ts = wb.t[status == 0]
    k = np.clip(np.searchsorted(tr.t, ts, side="right") - 1, 0, len(tr) - 1)
    clean = _clean(sim)
    back = max(1, round(LOOKBACK_S / float(tr.t[1] - tr.t[0]))) if len(tr) > 1 else 1
    # clean over [k - back, k]: a running count of unclean steps
    bad = np.concatenate(([0], np.cumsum(~clean)))
    kb = np.maximum(k - back, 0)
    ok = bad[k + 1] - bad[kb] == 0
    return k[ok]


def _bin(sim: Simulation, k: Any, values: FloatArray | None = None) -> FloatArray:
    """Bilinear cell sums of ``values`` (or of 1) at trace indices ``k``."""
    tr = sim.trace
    tab = sim.engine.tables
    rpm, kpa = tr.rpm[k], tr.map_kpa[k]
    vals = np.ones(rpm.size) if values is None else np.asarray(values, dtype=np.float64)
    ra, ma = tab.rpm_axis, tab.map_axis
    i, fx, vi = _axis_weights(ra, rpm)
    j, fy, vj = _axis_weights(ma, kpa)
    v = vi & vj
    i, j, fx, fy, vals = i[v], j[v], fx[v], fy[v], vals[v]
    nm = ma.size
    flat = np.concatenate([i * nm + j, (i + 1) * nm + j, i * nm + j + 1, (i + 1) * nm + j + 1])
    wts = np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    wts = wts * np.tile(vals, 4)
    w: FloatArray = np.bincount(flat, weights=wts, minlength=ra.size * nm).astype(np.float64)
    return w.reshape(ra.size, nm)


def steady_weights(sim: Simulation) -> FloatArray:
    """Bilinear cell weights of the clean wideband samples (see :func:`_steady_samples`)."""
    return _bin(sim, _steady_samples(sim))


def _soak_streaks(sim: Simulation) -> list[tuple[int, int]]:
    """Trace index ranges [a, b) where the intake sat above :data:`SOAK_IAT_F` at low
    airflow (below :data:`SOAK_FLOW_MAX` of the engine's maximum)."""
    tr = sim.trace
    flow = (tr.rpm / 6000.0) * (tr.map_kpa / sim.engine.baro_kpa)
    hot = (tr.iat_f > SOAK_IAT_F) & (flow < SOAK_FLOW_MAX)
    edges = np.diff(np.concatenate(([0], hot.astype(np.int8), [0])))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


def soak_mask(sim: Simulation) -> Any:
    """Per trace step: inside a heat-soak streak, more than :data:`SOAK_MIN_S` seconds
    after it began."""
    tr = sim.trace
    out = np.zeros(len(tr), dtype=bool)
    for a, b in _soak_streaks(sim):
        out[a:b] = tr.t[a:b] - tr.t[a] > SOAK_MIN_S
    return out


def heat_factor_grid(sim: Simulation, k: Any) -> tuple[FloatArray, FloatArray]:
    """Per cell: the steady-weighted mean of the heat-soak AFR factor of the samples at
    trace indices ``k`` (1 where none fell), and the weight of the soaked ones."""
    tr = sim.trace
    w = _bin(sim, k)
    factor = sim.engine.heat_afr_factor(tr.iat_f[k])
    wf = _bin(sim, k, factor)
    mean: FloatArray = np.divide(wf, w, out=np.ones_like(w), where=w > 0)
    hot_k = k[soak_mask(sim)[k]]
    return mean, _bin(sim, hot_k)


def _nearest_cells(sim: Simulation, rpm: FloatArray, kpa: FloatArray) -> list[list[float]]:
    tab = sim.engine.tables
    if rpm.size == 0:
        return []
    i = np.abs(rpm[:, None] - tab.rpm_axis[None, :]).argmin(axis=1)
    j = np.abs(kpa[:, None] - tab.map_axis[None, :]).argmin(axis=1)
    cells = sorted(set(zip(i.tolist(), j.tolist(), strict=True)))
    return [[float(tab.rpm_axis[a]), float(tab.map_axis[b])] for a, b in cells]


def knock_retard_cells(sim: Simulation, hold_s: float = 0.0) -> list[list[float]]:
    """The cells the ECU's own reports put the engine in while it reported knock retard,
    or within ``hold_s`` seconds of such a report.

    With ``hold_s`` > 0 this is the set a live reader may legitimately attribute knock to
    when its sources are not time-aligned to the sample: a knock report that reaches the
    daemon ``hold_s`` earlier or later than the dyno's RPM (scheduling skew, which
    ``--speed`` multiplies) is binned with the RPM and MAP of another moment.
    """
    ecu = sim.streams["ecu"]
    kr = (ecu.columns["knock_front_deg"] > 0) | (ecu.columns["knock_rear_deg"] > 0)
    if hold_s > 0 and kr.any():
        t = np.asarray(ecu.t, dtype=float)
        last = np.maximum.accumulate(np.where(kr, t, -np.inf))
        nxt = np.minimum.accumulate(np.where(kr, t, np.inf)[::-1])[::-1]
        kr = (t - last <= hold_s) | (nxt - t <= hold_s)
    return _nearest_cells(sim, ecu.columns["rpm"][kr], ecu.columns["map_kpa"][kr])


def heat_soaked(sim: Simulation) -> bool:
    """True when one heat-soak streak lasted longer than :data:`SOAK_MIN_S` seconds."""
    return bool(soak_mask(sim).any())


def build_truth(sim: Simulation, *, min_weight: float = VISITED_WEIGHT) -> Truth:
    """Compute the ground truth of a simulation (runs the simulation if needed).

    Everything here comes from what the engine model did (its exhaust AFR, intake
    temperature and airflow), never from the daemon's gates.

    Args:
        sim: the simulation.
        min_weight: clean-sample weight a cell needs to count as visited.
    """
    tab = sim.engine.tables
    tr = sim.trace
    steady = _steady_samples(sim)
    weights = _bin(sim, steady)
    visited = weights >= min_weight
    heat_factor, soak_weight = heat_factor_grid(sim, steady)
    sampled = {}
    for cyl, true, ratio in (
        ("front", tr.afr_true_front, tab.ratio_front),
        ("rear", tr.afr_true_rear, tab.ratio_rear),
    ):
        wr = _bin(sim, steady, true[steady] / tr.afr_target[steady])
        sampled[cyl] = np.round(np.divide(wr, weights, out=ratio.copy(), where=weights > 0), 4)
    # A cell is soaked where at least one hot steady sample's worth of weight fell.
    soak = np.argwhere(visited & (soak_weight >= 1.0))
    delta = np.abs(tab.afr_target * (sampled["rear"] - sampled["front"]))
    imb = np.argwhere(visited & (delta >= 0.5))
    ra, ma = tab.rpm_axis, tab.map_axis
    ev = sim.knock_events
    knock = _nearest_cells(
        sim,
        np.array([e.rpm for e in ev], dtype=float),
        np.array([e.map_kpa for e in ev], dtype=float),
    )
    retard_cells = knock_retard_cells(sim)
    spikes = [p for p in sim.pops if p.peak_afr > POP_SPIKE_AFR]
    zones = [
        [float(lo), float(hi)] for lo, hi in POP_BANDS if any(lo <= p.rpm < hi for p in spikes)
    ]
    return Truth(
        scenario=sim.scenario.name,
        seed=sim.seed,
        rpm_axis=[float(x) for x in ra],
        map_axis=[float(x) for x in ma],
        ve_ratio_front=np.round(tab.ratio_front, 4).tolist(),
        ve_ratio_rear=np.round(tab.ratio_rear, 4).tolist(),
        imbalance_cells=[[float(ra[a]), float(ma[b])] for a, b in imb.tolist()],
        knock_cells=knock,
        iat_peak_f=round(float(np.max(tr.iat_f)), 1),
        pop_zones=zones,
        heat_soak=heat_soaked(sim),
        visited_cells=[[float(ra[a]), float(ma[b])] for a, b in np.argwhere(visited).tolist()],
        knock_retard_cells=retard_cells,
        knock_events=len(ev),
        pop_events=len(spikes),
        duration_s=round(sim.duration_s, 3),
        build=sim.scenario.build.to_build_config(),
        heat_soak_cells=[[float(ra[a]), float(ma[b])] for a, b in soak.tolist()],
        ve_heat_factor=np.round(heat_factor, 5).tolist(),
        ve_ratio_sampled_front=sampled["front"].tolist(),
        ve_ratio_sampled_rear=sampled["rear"].tolist(),
    )


def export_truth(sim: Simulation, *, min_weight: float = VISITED_WEIGHT) -> dict[str, Any]:
    """The ground truth as a JSON-ready dict (see :func:`build_truth`)."""
    return build_truth(sim, min_weight=min_weight).model_dump()


def write_truth(truth: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a truth dict as JSON atomically, through the store's :func:`atomic_write_json`.

    Returns:
        The path written.

    Raises:
        StoreFileError: the directory cannot be created or written, or a value is NaN.
    """
    return atomic_write_json(path, dict(truth), indent=1)

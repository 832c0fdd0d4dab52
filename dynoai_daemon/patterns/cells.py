"""Per-cylinder cell results derived from a closed run's statistics.

Turns the accumulator's sums into what tuners read: mean AFR and target, the VE
correction (null unless the cell passes the statistical criterion of
:mod:`dynoai_daemon.core.criterion`, clamped to the maximum correction, with its 95 %
interval), the sufficient statistics that let runs be pooled exactly, the spread, knock
counts and, when the ECU's VE was logged, the suggested new VE. Also the operating regions
of docs/tuning.md, defined in RPM and kPa rather than table indexes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dynoai_daemon.config import TuningConfig
from dynoai_daemon.core.accumulator import CylinderStats
from dynoai_daemon.core.criterion import cell_suggestion
from dynoai_daemon.core.grid import Grid

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: name -> (rpm_min, rpm_max, kpa_min, kpa_max), inclusive, on cell centres.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "idle": (750.0, 1250.0, 20.0, 40.0),
    "cruise": (2000.0, 3000.0, 30.0, 60.0),
    "midrange": (3000.0, 4500.0, 60.0, 85.0),
    "wot": (3000.0, float("inf"), 90.0, float("inf")),
}


@dataclass
class CylinderCells:
    """2-D ``[rpm_index, map_index]`` results of one cylinder; NaN = no data."""

    weight: FloatArray
    ratio: FloatArray  # weighted mean of afr/target where weight > 0
    ve_correction_pct: FloatArray  # NaN unless statistically sound; clamped
    ve_correction_ci_pct: FloatArray  # 95 % half-width in pp; NaN without an interval
    clamped: BoolArray
    weight_sq: FloatArray
    ratio_std: FloatArray  # weighted std of afr/target (population form); NaN = no data
    afr_mean: FloatArray
    target_mean: FloatArray
    afr_std: FloatArray  # spread of afr/target, expressed in AFR at the cell's target
    samples: FloatArray
    knock_samples: FloatArray
    knock_count: FloatArray
    knock_max: FloatArray
    new_ve: FloatArray  # logged VE x ratio where VE was logged and the cell qualifies
    qualified: BoolArray


def cylinder_cells(stats: CylinderStats, grid: Grid, tuning: TuningConfig) -> CylinderCells:
    """Derive one cylinder's cell results from its accumulated statistics."""
    shape = grid.shape
    w = stats.weight.reshape(shape)
    has = w > 0
    nan = np.full(shape, np.nan)
    ratio = np.where(has, stats.ratio_mean.reshape(shape), np.nan)
    afr = np.divide(stats.afr_sum.reshape(shape), w, out=nan.copy(), where=has)
    tgt = np.divide(stats.target_sum.reshape(shape), w, out=nan.copy(), where=has)
    var = np.divide(stats.ratio_m2.reshape(shape), w, out=nan.copy(), where=has)
    ratio_std = np.sqrt(np.maximum(var, 0.0))
    std = ratio_std * tgt
    wsq = stats.weight_sq.reshape(shape)
    sug = cell_suggestion(
        w,
        wsq,
        stats.ratio_mean.reshape(shape),
        stats.ratio_m2.reshape(shape),
        min_weight=tuning.min_weight,
        max_ci_pct=tuning.max_ci_pct,
        max_correction_pct=tuning.max_correction_pct,
    )
    qualified = sug.sound
    corr = sug.pct
    vw = stats.ve_weight.reshape(shape)
    ve_mean = np.divide(stats.ve_sum.reshape(shape), vw, out=nan.copy(), where=vw > 0)
    new_ve = np.where(qualified & (vw > 0), ve_mean * (1.0 + corr / 100.0), np.nan)
    return CylinderCells(
        weight=w.copy(),
        ratio=ratio,
        ve_correction_pct=corr,
        ve_correction_ci_pct=sug.ci_pct,
        clamped=sug.clamped,
        weight_sq=wsq.copy(),
        ratio_std=ratio_std,
        afr_mean=afr,
        target_mean=tgt,
        afr_std=std,
        samples=stats.samples.reshape(shape).copy(),
        knock_samples=stats.knock_samples.reshape(shape).copy(),
        knock_count=stats.knock_count.reshape(shape).copy(),
        knock_max=stats.knock_max.reshape(shape).copy(),
        new_ve=new_ve,
        qualified=qualified,
    )


def region_mask(grid: Grid, region: str) -> BoolArray:
    """Return the cells whose centres lie in ``region`` (see :data:`REGIONS`)."""
    r0, r1, k0, k1 = REGIONS[region]
    rpm = grid.rpm_axis[:, None]
    kpa = grid.map_axis[None, :]
    return np.asarray((rpm >= r0) & (rpm <= r1) & (kpa >= k0) & (kpa <= k1))


def to_nested(a: FloatArray, *, digits: int = 4) -> list[list[float | None]]:
    """Return a 2-D array as nested lists with NaN as None, rounded for JSON."""
    rounded = np.round(a, digits)
    finite = np.isfinite(rounded)
    if finite.all():
        rows: list[list[float | None]] = rounded.tolist()
        return rows
    # An object array takes None in one vectorised assignment (a Python loop over the
    # empty cells of a mostly empty grid was the slowest part of building a session).
    obj = rounded.astype(object)
    obj[~finite] = None
    out: list[list[float | None]] = obj.tolist()
    return out


def nan_to_none(x: float, digits: int = 4) -> float | None:
    """Return ``x`` rounded, or None when it is NaN/inf."""
    if not np.isfinite(x):
        return None
    return round(float(x), digits)

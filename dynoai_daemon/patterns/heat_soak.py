"""Heat soak pattern: VE inflation from hot intake air at low load (docs/tuning.md).

Only samples taken while IAT stayed above the limit at low load for longer than the
minimum streak count (the core marks them). The inflation of a cell is
``1 - (T_ref + 459.67) / (T + 459.67)`` with ``T_ref`` the run's starting IAT and ``T``
the cell's mean hot IAT; the overlay carries ``-inflation`` in percent, clamped to
[-10, 0], in exactly the cells the hot samples fell into and None elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynoai_daemon.core.grid import Grid
from dynoai_daemon.core.runs import OpenRun
from dynoai_daemon.patterns.cells import to_nested

RANKINE = 459.67


def extract(
    run: OpenRun,
    grid: Grid,
    *,
    ambient_temp_f: float | None,
    airflow_cfm: float | None,
    peak_hp_history: Sequence[float] = (),
) -> dict[str, Any] | None:
    """Return HeatSoakPattern fields, or None when the run never heat-soaked."""
    hot = run.heat.hot_samples.reshape(grid.shape)
    if not hot.any() or math.isnan(run.iat_start):
        return None
    t_cell = np.divide(
        run.heat.hot_iat_sum.reshape(grid.shape),
        hot,
        out=np.full(grid.shape, np.nan),
        where=hot > 0,
    )
    t_ref = run.iat_start
    inflation = np.where(hot > 0, 1.0 - (t_ref + RANKINE) / (t_cell + RANKINE), np.nan) * 100.0
    overlay = np.clip(-inflation, -10.0, 0.0)
    idx = np.nonzero(hot > 0)
    rpm_cells = grid.rpm_axis[idx[0]]
    kpa_cells = grid.map_axis[idx[1]]
    weights = hot[idx]
    mean_infl = float(np.sum(inflation[idx] * weights) / np.sum(weights))
    hp = [h for h in peak_hp_history if math.isfinite(h)]
    return {
        "ambient_temp_f": ambient_temp_f,
        "airflow_cfm": airflow_cfm,
        "iat_initial_f": round(t_ref, 2),
        "iat_peak_f": round(run.iat_peak, 2),
        "iat_soak_time_min": round(run.heat.hot_seconds / 60.0, 3),
        "ve_inflation_pct": round(max(0.0, mean_infl), 3),
        "affected_rpm_range": (float(rpm_cells.min()), float(rpm_cells.max())),
        "affected_load_range": (float(kpa_cells.min()), float(kpa_cells.max())),
        "heat_correction_overlay": to_nested(overlay, digits=3),
        "hp_variation_before": round(max(hp) - min(hp), 3) if len(hp) >= 2 else None,
        "hp_variation_after": None,
    }

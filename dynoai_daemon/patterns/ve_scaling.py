"""VE scaling pattern: region means of the per-cell VE correction (docs/tuning.md).

The regions are fixed operating areas in RPM and kPa (idle, cruise, midrange, WOT). A
region mean pools both cylinders' qualifying cells; a region without any qualifying cell
is None, never 0. The front/rear difference is the mean over cells where both cylinders
qualify of ``(front ratio - rear ratio) * 100``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynoai_daemon.core.grid import Grid
from dynoai_daemon.patterns.cells import REGIONS, CylinderCells, nan_to_none, region_mask


def region_means(front: CylinderCells, rear: CylinderCells, grid: Grid) -> dict[str, float | None]:
    """Return ``{region: mean VE correction %}`` pooling both cylinders' qualifying cells."""
    out: dict[str, float | None] = {}
    for region in REGIONS:
        mask = region_mask(grid, region)
        vals = np.concatenate(
            [
                front.ve_correction_pct[mask & front.qualified],
                rear.ve_correction_pct[mask & rear.qualified],
            ]
        )
        out[region] = nan_to_none(float(vals.mean())) if vals.size else None
    return out


def front_rear_difference(front: CylinderCells, rear: CylinderCells) -> float | None:
    """Mean over cells where both qualify of (front ratio - rear ratio) * 100."""
    both = front.qualified & rear.qualified
    if not both.any():
        return None
    return nan_to_none(float(np.mean(front.ratio[both] - rear.ratio[both]) * 100.0))


def extract(front: CylinderCells, rear: CylinderCells, grid: Grid) -> dict[str, Any] | None:
    """Return the VEScalingPattern fields learned from the cells, or None without data."""
    if not (front.qualified.any() or rear.qualified.any()):
        return None
    means = region_means(front, rear, grid)
    return {
        "ve_delta_idle": means["idle"],
        "ve_delta_cruise": means["cruise"],
        "ve_delta_midrange": means["midrange"],
        "ve_delta_wot": means["wot"],
        "front_rear_ve_difference_pct": front_rear_difference(front, rear),
        "sessions_observed": 1,
    }

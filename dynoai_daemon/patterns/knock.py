"""Knock timing pattern: where each cylinder knocked and what to do about it (docs/tuning.md).

Knock cells are cells where a cylinder reported retard > 0, with counts and the largest
retard. Suggested retard is -2 deg for any knock and -4 deg where knock samples exceed 10 %
of the cell's knock-channel samples. An advance of +1 deg is suggested only where the
config allows advancing and a high-load cell (>= ``HIGH_LOAD_KPA``) has at least 20
knock-free samples on both cylinders.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynoai_daemon.core.grid import Grid
from dynoai_daemon.patterns.cells import CylinderCells

HIGH_LOAD_KPA = 80.0
MIN_CLEAN_SAMPLES = 20
HEAVY_RATE = 0.10


def knock_cells(cells: CylinderCells) -> list[tuple[int, int, int]]:
    """Return ``(rpm_idx, kpa_idx, count)`` of cells where this cylinder knocked."""
    idx = np.nonzero(cells.knock_count > 0)
    return [(int(i), int(j), int(cells.knock_count[i, j])) for i, j in zip(*idx, strict=True)]


def extract(
    front: CylinderCells, rear: CylinderCells, grid: Grid, *, allow_advance: bool
) -> dict[str, Any] | None:
    """Return KnockTimingPattern fields, or None when nothing knocked (and no advance)."""
    count = front.knock_count + rear.knock_count
    samples = np.maximum(front.knock_samples, rear.knock_samples)
    knocked = count > 0
    advances: list[tuple[int, int, float]] = []
    if allow_advance:
        clean = (
            (front.knock_samples >= MIN_CLEAN_SAMPLES)
            & (rear.knock_samples >= MIN_CLEAN_SAMPLES)
            & ~knocked
            & (grid.map_axis[None, :] >= HIGH_LOAD_KPA)
        )
        advances = [(int(i), int(j), 1.0) for i, j in zip(*np.nonzero(clean), strict=True)]
    if not knocked.any() and not advances:
        return None
    cells = [(int(i), int(j), int(count[i, j])) for i, j in zip(*np.nonzero(knocked), strict=True)]
    rate_f = np.divide(
        front.knock_count,
        front.knock_samples,
        out=np.zeros(grid.shape),
        where=front.knock_samples > 0,
    )
    rate_r = np.divide(
        rear.knock_count, rear.knock_samples, out=np.zeros(grid.shape), where=rear.knock_samples > 0
    )
    rate = np.maximum(rate_f, rate_r)
    retards = [(i, j, -4.0 if rate[i, j] > HEAVY_RATE else -2.0) for i, j, _ in cells]
    kmax = float(np.max(np.maximum(front.knock_max, rear.knock_max)))
    return {
        "knock_cells": cells,
        "knock_cells_front": knock_cells(front),
        "knock_cells_rear": knock_cells(rear),
        "knock_severity_max": round(kmax, 3) if knocked.any() else 0.0,
        "timing_retards": retards,
        "timing_advances": advances,
        "knock_free": not bool(knocked.any()),
        "total_samples": int(samples.sum()),
    }

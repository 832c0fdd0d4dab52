"""Cylinder imbalance pattern: cells where front and rear AFR disagree (docs/tuning.md).

A cell counts when both cylinders reached the minimum weight and
``|afr_front - afr_rear| >= threshold`` (0.5 AFR by default). ``afr_delta`` is
``afr_rear - afr_front``, so positive means the rear runs leaner. Severity: >= 1.0 high,
>= 0.7 medium, else low.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynoai_daemon.patterns.cells import CylinderCells, to_nested


def severity(max_delta: float) -> str:
    """Return ``"high"``, ``"medium"`` or ``"low"`` for the largest |AFR delta|."""
    if max_delta >= 1.0:
        return "high"
    if max_delta >= 0.7:
        return "medium"
    return "low"


def imbalance_mask(front: CylinderCells, rear: CylinderCells, threshold: float) -> np.ndarray:
    """Cells where both cylinders qualify and |afr_front - afr_rear| >= threshold."""
    both = front.qualified & rear.qualified
    delta = np.where(both, rear.afr_mean - front.afr_mean, 0.0)
    return np.asarray(both & (np.abs(delta) >= threshold))


def max_cylinder_delta(front: CylinderCells, rear: CylinderCells) -> float | None:
    """Largest |afr_front - afr_rear| over cells where both cylinders qualify."""
    both = front.qualified & rear.qualified
    if not both.any():
        return None
    return round(float(np.max(np.abs(rear.afr_mean[both] - front.afr_mean[both]))), 4)


def extract(front: CylinderCells, rear: CylinderCells, threshold: float) -> dict[str, Any] | None:
    """Return CylinderImbalancePattern fields, or None when no cell is imbalanced."""
    mask = imbalance_mask(front, rear, threshold)
    if not mask.any():
        return None
    delta = rear.afr_mean - front.afr_mean
    cells = [
        (int(i), int(j), round(float(delta[i, j]), 3))
        for i, j in zip(*np.nonzero(mask), strict=True)
    ]
    worst = max(abs(c[2]) for c in cells)
    fcorr = np.where(mask, front.ve_correction_pct, np.nan)
    rcorr = np.where(mask, rear.ve_correction_pct, np.nan)
    return {
        "imbalance_cells": cells,
        "front_ve_corrections": to_nested(fcorr),
        "rear_ve_corrections": to_nested(rcorr),
        "imbalance_before_max": round(worst, 3),
        "severity": severity(worst),
    }

"""The RPM x MAP cell grid and its bilinear weights.

Axis values are cell centres, the breakpoints of the ECU's VE table. A sample between
breakpoints spreads one unit of weight over the (up to) four surrounding cells; a sample
on a breakpoint gives all of it to that cell. Samples beyond the outer breakpoints are
clamped to the edge when within half a step of it, and dropped beyond that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class AxisWeights:
    """Per-sample lower index, fraction towards the upper index, and validity."""

    index: IntArray
    frac: FloatArray
    valid: BoolArray


def axis_weights(axis: FloatArray, x: FloatArray) -> AxisWeights:
    """Locate ``x`` on a strictly increasing axis.

    Returns:
        For each value: the lower breakpoint index ``i`` (0..len-2), the fraction
        ``f`` in [0, 1] towards ``i + 1``, and whether the value is usable (finite and
        within half a step beyond the outer breakpoints).
    """
    lo_edge = axis[0] - 0.5 * (axis[1] - axis[0])
    hi_edge = axis[-1] + 0.5 * (axis[-1] - axis[-2])
    with np.errstate(invalid="ignore"):
        valid = (x >= lo_edge) & (x <= hi_edge)
    # np.minimum/np.maximum: np.clip's dispatch costs more than the work on small batches.
    xc = np.minimum(np.maximum(np.where(valid, x, axis[0]), axis[0]), axis[-1])
    i = np.searchsorted(axis, xc, side="right") - 1
    i = np.minimum(np.maximum(i, 0), axis.shape[0] - 2)
    lo = axis[i]
    f = (xc - lo) / (axis[i + 1] - lo)
    return AxisWeights(i.astype(np.intp), f, valid)


class Grid:
    """An RPM x MAP grid. Cells are indexed ``[rpm_index, map_index]``."""

    def __init__(self, rpm_axis: Sequence[float], map_axis: Sequence[float]) -> None:
        self.rpm_axis: FloatArray = np.asarray(rpm_axis, dtype=np.float64)
        self.map_axis: FloatArray = np.asarray(map_axis, dtype=np.float64)
        if self.rpm_axis.size < 2 or self.map_axis.size < 2:
            raise ValueError("each axis needs at least two breakpoints")
        if np.any(np.diff(self.rpm_axis) <= 0) or np.any(np.diff(self.map_axis) <= 0):
            raise ValueError("axes must be strictly increasing")
        self.shape: tuple[int, int] = (self.rpm_axis.size, self.map_axis.size)
        self.size = self.shape[0] * self.shape[1]

    def locate(
        self, rpm: FloatArray, map_kpa: FloatArray
    ) -> tuple[IntArray, FloatArray, IntArray, BoolArray]:
        """Return bilinear ``(cells, weights)``, the nearest cell and validity in one pass."""
        r = axis_weights(self.rpm_axis, rpm)
        m = axis_weights(self.map_axis, map_kpa)
        valid = r.valid & m.valid
        nm = self.shape[1]
        base = r.index * nm + m.index
        cells = np.stack([base, base + nm, base + 1, base + nm + 1])
        fr, fm = r.frac, m.frac
        weights = np.stack([(1 - fr) * (1 - fm), fr * (1 - fm), (1 - fr) * fm, fr * fm])
        weights *= valid
        nearest = ((r.index + (fr > 0.5)) * nm + m.index + (fm > 0.5)).astype(np.intp)
        return cells, weights, nearest, valid

    def nearest(self, rpm: FloatArray, map_kpa: FloatArray) -> tuple[IntArray, BoolArray]:
        """Return the flat index of the nearest cell and whether the sample is usable."""
        r = axis_weights(self.rpm_axis, rpm)
        m = axis_weights(self.map_axis, map_kpa)
        ri = r.index + (r.frac > 0.5)
        mi = m.index + (m.frac > 0.5)
        return (ri * self.shape[1] + mi).astype(np.intp), r.valid & m.valid

    def cell_of(self, flat: int) -> tuple[int, int]:
        """Return ``(rpm_index, map_index)`` of a flat index."""
        return divmod(int(flat), self.shape[1])

    def centre(self, flat: int) -> tuple[float, float]:
        """Return ``(rpm, map_kpa)`` at the centre of a flat cell index."""
        i, j = self.cell_of(flat)
        return float(self.rpm_axis[i]), float(self.map_axis[j])

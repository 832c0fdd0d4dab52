"""Per-cell, per-cylinder statistics, merged batch by batch.

For every cell the accumulator keeps the bilinear weight and the sum of squared weights
(for the effective sample size of the statistical cell criterion), the weighted mean and the
weighted sum of squared deviations (M2) of ``afr / target`` (merged across batches with
Chan's parallel formula, so the variance stays accurate however the stream is split),
weighted AFR and target sums, the count of learned samples whose nearest cell it is,
knock sample and event counts with the largest retard, and the hot-intake (heat-soak)
sample counts with their IAT sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


def _zeros(n: int) -> FloatArray:
    return np.zeros(n, dtype=np.float64)


@dataclass
class CylinderStats:
    """Flat (``rpm_index * n_map + map_index``) statistics of one cylinder."""

    size: int
    weight: FloatArray = field(init=False)
    weight_sq: FloatArray = field(init=False)
    ratio_mean: FloatArray = field(init=False)
    ratio_m2: FloatArray = field(init=False)
    afr_sum: FloatArray = field(init=False)
    target_sum: FloatArray = field(init=False)
    samples: FloatArray = field(init=False)
    knock_samples: FloatArray = field(init=False)
    knock_count: FloatArray = field(init=False)
    knock_max: FloatArray = field(init=False)
    ve_sum: FloatArray = field(init=False)
    ve_weight: FloatArray = field(init=False)
    sq_err: float = 0.0
    sq_n: float = 0.0

    def __post_init__(self) -> None:
        n = self.size
        self.weight = _zeros(n)
        self.weight_sq = _zeros(n)
        self.ratio_mean = _zeros(n)
        self.ratio_m2 = _zeros(n)
        self.afr_sum = _zeros(n)
        self.target_sum = _zeros(n)
        self.samples = _zeros(n)
        self.knock_samples = _zeros(n)
        self.knock_count = _zeros(n)
        self.knock_max = _zeros(n)
        self.ve_sum = _zeros(n)
        self.ve_weight = _zeros(n)

    def add_afr(
        self,
        cells: IntArray,
        weights: FloatArray,
        nearest: IntArray,
        afr: FloatArray,
        target: FloatArray,
        ve: FloatArray | None = None,
    ) -> None:
        """Merge learned samples.

        Args:
            cells: ``(4, n)`` flat cell indexes of each sample's corners.
            weights: ``(4, n)`` bilinear weights.
            nearest: ``(n,)`` nearest cell of each sample.
            afr: ``(n,)`` measured AFR.
            target: ``(n,)`` target AFR.
            ve: ``(n,)`` the ECU's current VE at each sample when logged (NaN = unknown).
        """
        if afr.shape[0] == 0:
            return
        n = self.size
        ratio = afr / target
        c = cells.ravel()
        w = weights.ravel()
        r4 = np.broadcast_to(ratio, weights.shape).ravel()
        wb = np.bincount(c, w, n)
        wr = np.bincount(c, w * r4, n)
        touched = wb > 0
        mean_b = np.divide(wr, wb, out=np.zeros(n), where=touched)
        dev = r4 - mean_b[c]
        m2_b = np.bincount(c, w * dev * dev, n)
        # Chan et al.: merge (W_a, mean_a, M2_a) with the batch's (W_b, mean_b, M2_b).
        wa = self.weight
        wt = wa + wb
        delta = mean_b - self.ratio_mean
        frac = np.divide(wb, wt, out=np.zeros(n), where=wt > 0)
        self.ratio_mean = self.ratio_mean + delta * frac
        self.ratio_m2 = self.ratio_m2 + m2_b + delta * delta * wa * frac
        self.weight = wt
        self.weight_sq += np.bincount(c, w * w, n)
        self.afr_sum += np.bincount(c, w * np.broadcast_to(afr, weights.shape).ravel(), n)
        self.target_sum += np.bincount(c, w * np.broadcast_to(target, weights.shape).ravel(), n)
        self.samples += np.bincount(nearest, None, n)
        if ve is not None:
            known = ~np.isnan(ve)
            if known.any():
                wk = weights[:, known]
                ck = cells[:, known]
                self.ve_weight += np.bincount(ck.ravel(), wk.ravel(), n)
                self.ve_sum += np.bincount(ck.ravel(), (wk * ve[known]).ravel(), n)
        err = afr - target
        self.sq_err += float(np.dot(err, err))
        self.sq_n += float(afr.shape[0])

    def add_knock(self, nearest: IntArray, retard: FloatArray) -> None:
        """Merge knock-retard readings (each counted in its nearest cell)."""
        if retard.shape[0] == 0:
            return
        n = self.size
        self.knock_samples += np.bincount(nearest, None, n)
        hit = retard > 0
        if hit.any():
            self.knock_count += np.bincount(nearest[hit], None, n)
            np.maximum.at(self.knock_max, nearest[hit], retard[hit])

    def copy(self) -> CylinderStats:
        """Return an independent copy."""
        out = CylinderStats(self.size)
        for name in (
            "weight", "weight_sq", "ratio_mean", "ratio_m2", "afr_sum", "target_sum", "samples",
            "knock_samples", "knock_count", "knock_max", "ve_sum", "ve_weight",
        ):  # fmt: skip
            setattr(out, name, getattr(self, name).copy())
        out.sq_err, out.sq_n = self.sq_err, self.sq_n
        return out


@dataclass
class HeatStats:
    """Hot low-load samples per cell (engine-wide, not per cylinder)."""

    size: int
    hot_samples: FloatArray = field(init=False)
    hot_iat_sum: FloatArray = field(init=False)
    hot_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.hot_samples = _zeros(self.size)
        self.hot_iat_sum = _zeros(self.size)

    def add(self, nearest: IntArray, iat: FloatArray) -> None:
        """Merge hot samples: their nearest cells and IAT values."""
        if iat.shape[0] == 0:
            return
        self.hot_samples += np.bincount(nearest, None, self.size)
        self.hot_iat_sum += np.bincount(nearest, iat, self.size)

"""The statistical cell criterion: when a cell's mean AFR/target ratio is a sound VE suggestion.

One function for the whole project, so the live core, a closed run's session and a pool of
several runs (the tuner's loop) decide the same way (tuning.md, "VE correction"): a cell
gives a suggestion when its bilinear weight reaches ``min_weight`` and the half-width of the
95 % interval of its weighted mean ratio is at most ``max_ci_pct`` percentage points. The
interval uses the weighted standard deviation (with the small-sample correction
``n_eff / (n_eff - 1)``) and the effective sample size ``n_eff = (sum w)^2 / sum w^2``; a
cell with ``n_eff <= 1`` has no interval and no suggestion. The suggestion
``(ratio - 1) * 100`` is clamped to +/- ``max_correction_pct`` and clamped cells are marked.

Everything here is pure numpy on arrays of any shape (flat or ``[rpm][map]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


@dataclass(frozen=True)
class CellSuggestion:
    """Per-cell outcome of the criterion; NaN where a value does not exist."""

    pct: FloatArray  # clamped (ratio - 1) * 100 where sound, else NaN
    ci_pct: FloatArray  # 95 % half-width in pp where n_eff > 1, else NaN
    sound: BoolArray
    clamped: BoolArray  # sound and |raw correction| > max_correction_pct


def cell_suggestion(
    weight: FloatArray,
    weight_sq: FloatArray,
    ratio_mean: FloatArray,
    ratio_m2: FloatArray,
    *,
    min_weight: float,
    max_ci_pct: float,
    max_correction_pct: float,
) -> CellSuggestion:
    """Apply the criterion to cell statistics.

    Args:
        weight: sum of bilinear weights per cell.
        weight_sq: sum of squared weights per cell.
        ratio_mean: weighted mean of afr/target per cell (any value where weight is 0).
        ratio_m2: weighted sum of squared deviations from the mean (``sum w (x - m)^2``).
        min_weight: least weight for a suggestion.
        max_ci_pct: widest 95 % half-width (pp) for a suggestion.
        max_correction_pct: clamp of the suggestion (pp).

    Returns:
        The per-cell suggestion, CI, soundness and clamp flags (same shape as ``weight``).
    """
    w = np.asarray(weight, dtype=np.float64)
    ww = np.asarray(weight_sq, dtype=np.float64)
    has = (w > 0) & (ww > 0)
    n_eff = np.divide(w * w, ww, out=np.zeros_like(w), where=has)
    multi = n_eff > 1.0 + 1e-9
    var = np.divide(ratio_m2, w, out=np.zeros_like(w), where=has)
    corr = np.divide(n_eff, n_eff - 1.0, out=np.zeros_like(w), where=multi)
    sd = np.sqrt(np.maximum(var, 0.0) * corr)
    half = np.divide(Z95 * sd, np.sqrt(n_eff), out=np.zeros_like(w), where=multi) * 100.0
    ci = np.where(multi, half, np.nan)
    sound = np.asarray(multi & (w >= min_weight) & (half <= max_ci_pct))
    raw = (np.asarray(ratio_mean, dtype=np.float64) - 1.0) * 100.0
    clamped = np.asarray(sound & (np.abs(raw) > max_correction_pct))
    pct = np.where(sound, np.clip(raw, -max_correction_pct, max_correction_pct), np.nan)
    return CellSuggestion(pct=pct, ci_pct=ci, sound=sound, clamped=clamped)


__all__ = ["Z95", "CellSuggestion", "cell_suggestion"]

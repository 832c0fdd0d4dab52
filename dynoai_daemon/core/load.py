"""Low load, as the heat-soak pattern and the heat-soak alert both decide it.

tuning.md ("Heat soak"): low load is ``rpm < rpm_max`` and, when manifold pressure is
known, ``MAP < map_max_kpa``; only where MAP is missing does throttle decide
(``TPS < tps_max_pct``). MAP decides first because the throttle opening at a given load
differs by throttle body and cable: a 2000 rpm / 35 kPa cruise can sit at 18 % TPS.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def low_load(
    rpm: FloatArray,
    map_kpa: FloatArray,
    tps_pct: FloatArray,
    *,
    rpm_max: float,
    map_max_kpa: float,
    tps_max_pct: float,
) -> BoolArray:
    """Return per sample whether the engine is at low load (NaN inputs are not low load).

    Args:
        rpm: engine speed per sample.
        map_kpa: manifold pressure per sample (NaN = not known).
        tps_pct: throttle per sample (NaN = not known).
        rpm_max: low load needs rpm below this.
        map_max_kpa: ... and MAP below this when MAP is known.
        tps_max_pct: ... or, without MAP, TPS below this.
    """
    with np.errstate(invalid="ignore"):
        by_map = map_kpa < map_max_kpa
        by_tps = np.isnan(map_kpa) & (tps_pct < tps_max_pct)
        return np.asarray((rpm < rpm_max) & (by_map | by_tps))


__all__ = ["low_load"]

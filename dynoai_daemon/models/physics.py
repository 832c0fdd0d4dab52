"""Power correction (SAE J1349, STD / SAE J607, DIN 70020) and the unit conversions it needs.

Pure functions, exactly the formulas of docs/tuning.md: corrected power = observed x CF.
"""

from __future__ import annotations

import math

from dynoai_daemon.models.enums import CorrectionMethod

#: hPa per inHg (at 0 degC, the barometer standard): 3386.389 Pa / 100.
HPA_PER_INHG = 33.86389


def inhg_to_hpa(inhg: float) -> float:
    """Convert inches of mercury to hectopascal."""
    return inhg * HPA_PER_INHG


def f_to_c(temp_f: float) -> float:
    """Convert degrees Fahrenheit to Celsius."""
    return (temp_f - 32.0) * 5.0 / 9.0


def vapor_pressure_hpa(temp_c: float, humidity_pct: float) -> float:
    """Water vapour partial pressure by the Magnus formula (docs/tuning.md).

    ``Pv = RH x 6.1078 x 10^(7.5 T / (237.3 + T))`` hPa, with RH as a fraction.
    """
    return float((humidity_pct / 100.0) * 6.1078 * 10.0 ** (7.5 * temp_c / (237.3 + temp_c)))


def correction_factor(
    *,
    temp_f: float,
    baro_inhg: float,
    humidity_pct: float | None = None,
    method: CorrectionMethod | str = CorrectionMethod.SAE_J1349,
) -> float:
    """Return the power correction factor: corrected = observed x CF.

    Args:
        temp_f: ambient (intake) air temperature, degF.
        baro_inhg: absolute barometric pressure, inHg (not sea-level corrected).
        humidity_pct: relative humidity 0..100; None is taken as dry air.
        method: ``sae_j1349`` (default), ``std`` (SAE J607) or ``din_70020``.

    Returns:
        The factor, by exactly the formulas of docs/tuning.md:
        J1349 ``1.180 x (990/Pd) x sqrt((T+273)/298) - 0.18``;
        STD ``(1013.25/Pd) x sqrt((T+273.15)/288.7)``;
        DIN ``(1013/P) x sqrt((T+273)/293)``; Pd = P - Pv (dry air), P absolute, hPa.

    Raises:
        ValueError: an unknown method, or a vapour pressure not below the barometer.
    """
    m = CorrectionMethod(method)
    t = f_to_c(temp_f)
    p = inhg_to_hpa(baro_inhg)
    pv = vapor_pressure_hpa(t, humidity_pct or 0.0)
    pd = p - pv
    if pd <= 0:
        raise ValueError("vapour pressure exceeds barometric pressure")
    if m is CorrectionMethod.SAE_J1349:
        return 1.180 * (990.0 / pd) * math.sqrt((t + 273.0) / 298.0) - 0.18
    if m is CorrectionMethod.STD:
        return (1013.25 / pd) * math.sqrt((t + 273.15) / 288.7)
    return (1013.0 / p) * math.sqrt((t + 273.0) / 293.0)

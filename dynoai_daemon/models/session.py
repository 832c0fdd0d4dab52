"""The user's data model: the seed's build, session, pattern and dataset structures.

Every structure of ``AI_TRAINING_DATA_GUIDE.md`` lives here as a pydantic 2 model with the
seed's field names (BuildConfiguration, TuningSession, the five pattern kinds,
TrainingDataset), plus the contract.md extras a live run carries (``run``, ``grid``,
``patterns``). Values are validated to physically sensible ranges and errors name the
field. A value without data is None, never 0; NaN given for an optional number becomes
None and NaN is never serialised. Models reject unknown keys (a typo in a build file is
an error, not silently dropped) and computed fields that appear in their own JSON output
(``overlap_category``, ``power_correction_factor``, the dataset ``summary``) are accepted
back and recomputed, so ``model_validate_json(model_dump_json())`` restores equal objects.
Grids and tables are indexed ``[rpm_index][map_index]``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)

from dynoai_daemon.errors import InputError

# --------------------------------------------------------------------------- helpers


def _nan_to_none(v: Any) -> Any:
    """NaN is the project's in-memory "absent" (channels.Frame); in the model it is None."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


_NanNone = BeforeValidator(_nan_to_none)

#: an optional float where NaN means "no data" and becomes None
OptFloat = Annotated[float | None, _NanNone]
Temperature = Annotated[float, Field(ge=-40.0, le=300.0)]
OptTemperature = Annotated[Temperature | None, _NanNone]
Afr = Annotated[Annotated[float, Field(ge=5.0, le=25.0)] | None, _NanNone]
_Pct = Annotated[float, Field(ge=-100.0, le=100.0)]
Percent = Annotated[_Pct | None, _NanNone]
NonNeg = Annotated[Annotated[float, Field(ge=0.0)] | None, _NanNone]


def _rectangular(name: str, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        raise ValueError(f"{name} must have at least one row")
    width = len(rows[0])
    if width == 0:
        raise ValueError(f"{name} rows must not be empty")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"{name} must be rectangular: row {i} has {len(row)} values, row 0 has {width}"
            )


def _shape(rows: Sequence[Sequence[Any]]) -> tuple[int, int]:
    return (len(rows), len(rows[0]) if rows else 0)


def _check_table(rows: list[list[float]]) -> list[list[float]]:
    _rectangular("table", rows)
    return rows


def _check_nested(rows: list[list[Any]]) -> list[list[Any]]:
    _rectangular("grid", rows)
    return rows


#: an ECU VE table, rows = RPM breakpoints, columns = MAP breakpoints, values 0..200 %
VETable = Annotated[
    list[list[Annotated[float, Field(ge=0.0, le=200.0)]]], AfterValidator(_check_table)
]
#: an ECU spark advance table in degrees BTDC (negative = ATDC)
SparkTable = Annotated[
    list[list[Annotated[float, Field(ge=-20.0, le=80.0)]]], AfterValidator(_check_table)
]
#: a per-cell overlay (corrections in %), None where a cell has no value
Overlay = Annotated[
    list[list[Percent]],
    AfterValidator(_check_nested),
]

RpmIdx = Annotated[int, Field(ge=0, le=255)]
KpaIdx = Annotated[int, Field(ge=0, le=255)]


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normalise_utc(v: Any) -> Any:
    """Accept an ISO-8601 string or datetime; return ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``.

    A naive time is taken as UTC (the seed writes UTC without always saying so).
    """
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v.strip())
        except ValueError as exc:
            raise ValueError(f"not an ISO-8601 time: {v!r}") from exc
    if isinstance(v, datetime):
        dt = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
        spec = "microseconds" if dt.microsecond else "seconds"
        return dt.replace(tzinfo=None).isoformat(timespec=spec) + "Z"
    return v


UtcTime = Annotated[str, BeforeValidator(_normalise_utc)]


class _Model(BaseModel):
    """Common config: unknown keys rejected, no NaN/inf, assignments validated."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        validate_assignment=True,
        use_enum_values=False,
        populate_by_name=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: Any) -> Any:
        # Our own JSON carries computed fields; they are recomputed, not inputs.
        if isinstance(data, dict) and cls.model_computed_fields:
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data


# --------------------------------------------------------------------------- enums


class EngineFamily(StrEnum):
    """Harley-Davidson engine families (and ``other`` for anything else)."""

    TWIN_CAM = "twin_cam"
    MILWAUKEE_8 = "milwaukee_8"
    EVOLUTION = "evolution"
    SPORTSTER = "sportster"
    REVOLUTION_MAX = "revolution_max"
    OTHER = "other"


class StageLevel(StrEnum):
    """Build stage, stock to stage 4."""

    STOCK = "stock"
    STAGE_1 = "stage_1"
    STAGE_2 = "stage_2"
    STAGE_3 = "stage_3"
    STAGE_4 = "stage_4"


class CamProfile(StrEnum):
    """Common V-twin cams; ``other`` for one not listed (give its numbers in CamSpecification)."""

    STOCK = "stock"
    S_AND_S_475 = "s_and_s_475"
    S_AND_S_509 = "s_and_s_509"
    S_AND_S_510 = "s_and_s_510"
    S_AND_S_550 = "s_and_s_550"
    S_AND_S_585 = "s_and_s_585"
    S_AND_S_640 = "s_and_s_640"
    WOOD_TW_222 = "wood_tw_222"
    WOOD_TW_555 = "wood_tw_555"
    WOOD_TW_777 = "wood_tw_777"
    FUELING_465 = "fueling_465"
    FUELING_508 = "fueling_508"
    FUELING_574 = "fueling_574"
    FUELING_592 = "fueling_592"
    ANDREWS_21 = "andrews_21"
    ANDREWS_26 = "andrews_26"
    ANDREWS_37 = "andrews_37"
    ANDREWS_48 = "andrews_48"
    SE_204 = "se_204"
    SE_211 = "se_211"
    SE_255 = "se_255"
    SE8_462 = "se8_462"
    SE8_517 = "se8_517"
    SE8_550 = "se8_550"
    OTHER = "other"


class TuningObjective(StrEnum):
    """What a tuning session set out to do."""

    VE_OPTIMIZATION = "ve_optimization"
    CYLINDER_BALANCE = "cylinder_balance"
    DECEL_FIX = "decel_fix"
    TIMING_OPTIMIZATION = "timing_optimization"
    HEAT_SOAK_COMPENSATION = "heat_soak_compensation"
    FULL_TUNE = "full_tune"


class CorrectionMethod(StrEnum):
    """Power correction standard (tuning.md, Power correction)."""

    SAE_J1349 = "sae_j1349"
    STD = "std"  # SAE J607
    DIN_70020 = "din_70020"


OverlapCategory = Literal["low", "moderate", "high"]

#: Cam overlap category thresholds in degrees, applied to the larger of front/rear
#: overlap: ``low`` below 15, ``moderate`` from 15 to 30 inclusive, ``high`` above 30.
OVERLAP_LOW_BELOW_DEG = 15.0
OVERLAP_HIGH_ABOVE_DEG = 30.0

PATTERN_KINDS: tuple[str, ...] = (
    "ve_scaling",
    "cylinder_imbalance",
    "decel_popping",
    "heat_soak",
    "knock_timing",
)


def overlap_category(overlap_deg: float | None) -> OverlapCategory | None:
    """Return the overlap category of an overlap in degrees (None when unknown)."""
    if overlap_deg is None:
        return None
    if overlap_deg < OVERLAP_LOW_BELOW_DEG:
        return "low"
    if overlap_deg <= OVERLAP_HIGH_ABOVE_DEG:
        return "moderate"
    return "high"


# --------------------------------------------------------------------------- power correction

#: hPa per inHg (at 0 degC, the barometer standard): 3386.389 Pa / 100.
HPA_PER_INHG = 33.86389


def inhg_to_hpa(inhg: float) -> float:
    """Convert inches of mercury to hectopascal."""
    return inhg * HPA_PER_INHG


def f_to_c(temp_f: float) -> float:
    """Convert degrees Fahrenheit to Celsius."""
    return (temp_f - 32.0) * 5.0 / 9.0


def vapor_pressure_hpa(temp_c: float, humidity_pct: float) -> float:
    """Water vapour partial pressure by the Magnus formula (tuning.md).

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
        The factor, by exactly the formulas of tuning.md:
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


# --------------------------------------------------------------------------- build


class CamSpecification(_Model):
    """Cam timing numbers; overlap is what drives idle VE, reversion and decel popping."""

    profile: CamProfile = CamProfile.OTHER

    @field_validator("profile", mode="before")
    @classmethod
    def _profile_spelling(cls, v: Any) -> Any:
        # Tuners write "S&S 585" or "Wood TW-222"; the enum spells it s_and_s_585.
        if isinstance(v, str) and not isinstance(v, CamProfile):
            key = re.sub(r"[^a-z0-9]+", "_", v.lower().replace("&", "_and_")).strip("_")
            if key in CamProfile._value2member_map_:
                return key
        return v

    intake_duration_deg: OptFloat = Field(None, ge=100.0, le=360.0)
    exhaust_duration_deg: OptFloat = Field(None, ge=100.0, le=360.0)
    intake_lift_in: OptFloat = Field(None, ge=0.1, le=1.0)
    exhaust_lift_in: OptFloat = Field(None, ge=0.1, le=1.0)
    lobe_separation_angle_deg: OptFloat = Field(None, ge=90.0, le=130.0)
    overlap_deg_front: OptFloat = Field(None, ge=-60.0, le=120.0)
    overlap_deg_rear: OptFloat = Field(None, ge=-60.0, le=120.0)
    idle_rpm_target: OptFloat = Field(None, ge=400.0, le=2500.0)

    @property
    def max_overlap_deg(self) -> float | None:
        """The larger of front and rear overlap, None when neither is known."""
        vals = [v for v in (self.overlap_deg_front, self.overlap_deg_rear) if v is not None]
        return max(vals) if vals else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def overlap_category(self) -> OverlapCategory | None:
        """``low`` (< 15 deg), ``moderate`` (15-30 deg) or ``high`` (> 30 deg), from the max
        of front/rear overlap; None when no overlap is given."""
        return overlap_category(self.max_overlap_deg)

    def get_overlap_category(self) -> OverlapCategory | None:
        """Seed spelling of :attr:`overlap_category`."""
        return self.overlap_category


class BuildConfiguration(_Model):
    """The engine build that determines tuning requirements (seed section 1).

    ``exhaust_type`` is the layout (e.g. ``"2-into-1"``, ``"true_dual"``, ``"2-into-2"``);
    ``header_type`` the product or style; ``header_length_delta_in`` rear minus front header
    length; ``pair_valve_present`` whether the PAIR (air injection) valve is still fitted.
    """

    engine_family: EngineFamily
    displacement_ci: float = Field(ge=45.0, le=200.0)
    compression_ratio: OptFloat = Field(None, ge=7.0, le=15.0)
    stage: StageLevel | None = None
    cam_spec: CamSpecification | None = None
    air_cleaner: str | None = None
    throttle_body_mm: OptFloat = Field(None, ge=20.0, le=90.0)
    header_type: str | None = None
    exhaust_type: str | None = None
    pair_valve_present: bool | None = None
    header_length_delta_in: OptFloat = Field(None, ge=-48.0, le=48.0)
    injector_flow_lb_hr: OptFloat = Field(None, gt=0.0, le=200.0)
    octane_requirement: int | None = Field(None, ge=80, le=120)
    fuel_type: str | None = None

    @field_validator("exhaust_type", "header_type", "air_cleaner", "fuel_type")
    @classmethod
    def _non_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank (leave it out instead)")
        return v.strip() if v is not None else None


# --------------------------------------------------------------------------- session parts


class EnvironmentalConditions(_Model):
    """Ambient conditions of a session and the power correction they imply."""

    ambient_temp_f: float = Field(ge=-40.0, le=300.0)
    barometric_pressure_inhg: float = Field(ge=20.0, le=35.0)
    humidity_percent: OptFloat = Field(None, ge=0.0, le=100.0)
    altitude_ft: OptFloat = Field(None, ge=-1500.0, le=20000.0)
    correction_method: CorrectionMethod = CorrectionMethod.SAE_J1349

    def correction_factor(self, method: CorrectionMethod | str | None = None) -> float:
        """Return the power correction factor for these conditions.

        Args:
            method: overrides :attr:`correction_method` when given.

        Returns:
            CF such that corrected = observed x CF (see :func:`correction_factor`);
            unknown humidity is taken as dry air.
        """
        return correction_factor(
            temp_f=self.ambient_temp_f,
            baro_inhg=self.barometric_pressure_inhg,
            humidity_pct=self.humidity_percent,
            method=method if method is not None else self.correction_method,
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def power_correction_factor(self) -> float:
        """CF by :attr:`correction_method`, rounded to 5 decimals (written to JSON)."""
        return round(self.correction_factor(), 5)

    @model_validator(mode="after")
    def _physical(self) -> Self:
        t = f_to_c(self.ambient_temp_f)
        if inhg_to_hpa(self.barometric_pressure_inhg) <= vapor_pressure_hpa(
            t, self.humidity_percent or 0.0
        ):
            raise ValueError("humidity_percent: vapour pressure would exceed the barometer")
        return self


class DynoSessionMetadata(_Model):
    """The dyno and how it was run (seed section 2)."""

    dyno_type: str | None = None
    load_type: str | None = None  # "inertia", "eddy_current", ...
    fan_airflow_cfm: OptFloat = Field(None, ge=0.0, le=100_000.0)
    warmup_time_min: OptFloat = Field(None, ge=0.0, le=600.0)
    runs_performed: int | None = Field(None, ge=0)


class RunInfo(_Model):
    """Where a session came from: one run of one station (contract.md)."""

    run_id: str = Field(min_length=1)
    station: str = Field(min_length=1)
    start_s: float
    end_s: float
    samples: int = Field(ge=0)

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.end_s < self.start_s:
            raise ValueError("end_s must not be before start_s")
        return self


class CylinderGrid(_Model):
    """One cylinder's cell results, ``[rpm_index][map_index]`` (contract.md)."""

    weight: list[list[Annotated[float, Field(ge=0.0)]]]
    afr_mean: list[list[Afr]]
    afr_target_mean: list[list[Afr]]
    ve_correction_pct: list[list[Percent]]
    afr_std: list[list[NonNeg]]
    knock_count: list[list[Annotated[int, Field(ge=0)]]]
    knock_max_deg: list[list[Annotated[float, Field(ge=0.0, le=90.0)]]]
    #: sufficient statistics of afr/target per cell, so runs can be pooled exactly
    #: (tuning.md "Tuning sessions"): weighted mean, weighted std (population form,
    #: sqrt(sum w (x - m)^2 / sum w)) and the sum of squared weights
    ratio_mean: list[list[OptFloat]] | None = None
    ratio_std: list[list[NonNeg]] | None = None
    weight_sq: list[list[Annotated[float, Field(ge=0.0)]]] | None = None
    #: 95 % half-width (pp) of the cell's mean ratio, where it has one
    ve_correction_ci_pct: list[list[NonNeg]] | None = None
    #: the suggestion hit +/- max_correction_pct
    clamped: list[list[bool]] | None = None
    #: suggested new VE (current VE x ratio) where the ECU's VE was logged; may exceed the
    #: 0..200 of a table because it is a suggestion, so only 0..300 is enforced
    new_ve: (
        list[list[Annotated[Annotated[float, Field(ge=0.0, le=300.0)] | None, _NanNone]]] | None
    ) = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rpm cells, map cells)."""
        return _shape(self.weight)

    @model_validator(mode="after")
    def _same_shape(self) -> Self:
        _rectangular("weight", self.weight)
        shape = self.shape
        for name in (
            "afr_mean",
            "afr_target_mean",
            "ve_correction_pct",
            "afr_std",
            "knock_count",
            "knock_max_deg",
            "new_ve",
            "ratio_mean",
            "ratio_std",
            "weight_sq",
            "ve_correction_ci_pct",
            "clamped",
        ):
            rows = getattr(self, name)
            if rows is None:
                continue
            _rectangular(name, rows)
            if _shape(rows) != shape:
                raise ValueError(f"{name}: shape {_shape(rows)} differs from weight {shape}")
        return self


def _increasing(name: str, axis: Sequence[float]) -> None:
    if len(axis) < 1:
        raise ValueError(f"{name} must not be empty")
    if any(b <= a for a, b in itertools.pairwise(axis)):
        raise ValueError(f"{name} must be strictly increasing")


class SessionGrid(_Model):
    """The run's RPM x MAP grid with both cylinders' cells (contract.md)."""

    rpm_axis: list[Annotated[float, Field(gt=0.0, le=20_000.0)]]
    map_axis: list[Annotated[float, Field(gt=0.0, le=400.0)]]
    front: CylinderGrid
    rear: CylinderGrid

    @model_validator(mode="after")
    def _axes(self) -> Self:
        _increasing("rpm_axis", self.rpm_axis)
        _increasing("map_axis", self.map_axis)
        want = (len(self.rpm_axis), len(self.map_axis))
        for cyl in ("front", "rear"):
            got = getattr(self, cyl).shape
            if got != want:
                raise ValueError(f"{cyl}: grid shape {got} does not match the axes {want}")
        return self


# --------------------------------------------------------------------------- patterns


class _Pattern(_Model):
    """Common to every pattern: the session it was learned from (None if entered by hand)."""

    session_id: str | None = None


class VEScalingPattern(_Pattern):
    """How VE changes with the build: mean VE correction % per operating region.

    Regions are those of tuning.md (idle, cruise, midrange, WOT, in RPM and kPa); a region
    without data is None. ``source`` says how it was derived: ``cells`` from the run's
    VE corrections (the normal case) or ``tables`` from final/initial VE tables only.
    """

    engine_family: EngineFamily | None = None
    stage: StageLevel | None = None
    cam_overlap_category: OverlapCategory | None = None
    displacement_ci: OptFloat = Field(None, ge=45.0, le=200.0)
    ve_delta_idle: Percent = None
    ve_delta_cruise: Percent = None
    ve_delta_midrange: Percent = None
    ve_delta_wot: Percent = None
    front_rear_ve_difference_pct: Percent = None
    sessions_observed: int = Field(1, ge=1)
    source: Literal["cells", "tables"] = "cells"


class CylinderImbalancePattern(_Pattern):
    """Cells where front and rear AFR disagree, and the corrections applied.

    ``imbalance_cells`` are ``(rpm_idx, kpa_idx, afr_delta)`` with afr_delta = rear - front
    (positive: rear leaner).
    """

    engine_family: EngineFamily | None = None
    cam_profile: CamProfile | None = None
    exhaust_type: str | None = None
    header_length_delta_in: OptFloat = Field(None, ge=-48.0, le=48.0)
    imbalance_cells: list[tuple[RpmIdx, KpaIdx, Annotated[float, Field(ge=-20.0, le=20.0)]]] = (
        Field(default_factory=list)
    )
    primary_cause: str | None = None
    front_ve_corrections: Overlay | None = None
    rear_ve_corrections: Overlay | None = None
    imbalance_before_max: OptFloat = Field(None, ge=0.0, le=20.0)
    imbalance_after_max: OptFloat = Field(None, ge=0.0, le=20.0)
    correction_success: bool | None = None
    severity: Literal["low", "medium", "high"] | None = None


EnrichmentZone = tuple[
    Annotated[float, Field(ge=0.0, le=20_000.0)],  # rpm_min
    Annotated[float, Field(ge=0.0, le=20_000.0)],  # rpm_max
    Annotated[float, Field(ge=0.0, le=100.0)],  # tps_min
    Annotated[float, Field(ge=0.0, le=100.0)],  # tps_max
    Annotated[float, Field(ge=0.0, le=1.0)],  # enrichment as a fraction (0.22 = +22 %)
]


def _range_pair(name: str, pair: tuple[float, float] | None) -> None:
    if pair is not None and pair[1] < pair[0]:
        raise ValueError(f"{name}: upper bound {pair[1]} is below lower bound {pair[0]}")


class DecelPoppingPattern(_Pattern):
    """Decel pop characteristics and the enrichment that fixes them.

    ``enrichment_zones`` are ``(rpm_min, rpm_max, tps_min, tps_max, enrichment)`` with the
    enrichment as a fraction (0.22 = +22 %), as in the seed.
    """

    engine_family: EngineFamily | None = None
    cam_overlap_deg: OptFloat = Field(None, ge=-60.0, le=120.0)
    exhaust_type: str | None = None
    pair_valve_present: bool | None = None
    pop_severity: int | None = Field(None, ge=0, le=10)
    pop_rpm_range: tuple[float, float] | None = None
    pop_throttle_position: OptFloat = Field(None, ge=0.0, le=100.0)
    decel_afr_spike_max: Afr = None
    enrichment_zones: list[EnrichmentZone] = Field(default_factory=list)
    pop_eliminated: bool | None = None
    fuel_economy_impact_pct: Percent = None
    customer_satisfaction: int | None = Field(None, ge=0, le=10)
    decel_events: int | None = Field(None, ge=0)
    popping_events: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        _range_pair("pop_rpm_range", self.pop_rpm_range)
        for i, z in enumerate(self.enrichment_zones):
            if z[1] <= z[0] or z[3] < z[2]:
                raise ValueError(
                    f"enrichment_zones[{i}]: need rpm_min < rpm_max, tps_min <= tps_max"
                )
        return self


class HeatSoakPattern(_Pattern):
    """Thermal drift: IAT rise, the VE inflation it causes and its correction overlay."""

    ambient_temp_f: OptTemperature = None
    airflow_cfm: OptFloat = Field(None, ge=0.0, le=100_000.0)
    iat_initial_f: OptTemperature = None
    iat_peak_f: OptTemperature = None
    iat_soak_time_min: OptFloat = Field(None, ge=0.0)
    ve_inflation_pct: Percent = None
    affected_rpm_range: tuple[float, float] | None = None
    affected_load_range: tuple[float, float] | None = None
    heat_correction_overlay: Overlay | None = None
    hp_variation_before: NonNeg = None
    hp_variation_after: NonNeg = None

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        _range_pair("affected_rpm_range", self.affected_rpm_range)
        _range_pair("affected_load_range", self.affected_load_range)
        return self


KnockCell = tuple[RpmIdx, KpaIdx, Annotated[int, Field(ge=0)]]
TimingCell = tuple[RpmIdx, KpaIdx, Annotated[float, Field(ge=-20.0, le=20.0)]]


class KnockTimingPattern(_Pattern):
    """Where the engine knocked and the timing changes that follow.

    ``knock_cells`` ``(rpm_idx, kpa_idx, count)`` pool both cylinders, ``knock_cells_front``
    / ``_rear`` per cylinder; ``timing_retards`` are <= 0 deg and ``timing_advances`` >= 0.
    """

    compression_ratio: OptFloat = Field(None, ge=7.0, le=15.0)
    fuel_octane: int | None = Field(None, ge=80, le=120)
    cam_profile: CamProfile | None = None
    altitude_ft: OptFloat = Field(None, ge=-1500.0, le=20000.0)
    knock_cells: list[KnockCell] = Field(default_factory=list)
    knock_cells_front: list[KnockCell] = Field(default_factory=list)
    knock_cells_rear: list[KnockCell] = Field(default_factory=list)
    knock_severity_max: OptFloat = Field(None, ge=0.0, le=90.0)
    timing_retards: list[TimingCell] = Field(default_factory=list)
    timing_advances: list[TimingCell] = Field(default_factory=list)
    mbt_achieved: bool | None = None
    torque_gain_pct: Percent = None
    knock_free: bool | None = None
    total_samples: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _signs(self) -> Self:
        for i, c in enumerate(self.timing_retards):
            if c[2] > 0:
                raise ValueError(f"timing_retards[{i}]: a retard must be <= 0 deg, got {c[2]}")
        for i, c in enumerate(self.timing_advances):
            if c[2] < 0:
                raise ValueError(f"timing_advances[{i}]: an advance must be >= 0 deg, got {c[2]}")
        return self


AnyPattern = (
    VEScalingPattern
    | CylinderImbalancePattern
    | DecelPoppingPattern
    | HeatSoakPattern
    | KnockTimingPattern
)


class SessionPatterns(_Model):
    """The patterns extracted from one session, by kind (contract.md)."""

    ve_scaling: list[VEScalingPattern] = Field(default_factory=list)
    cylinder_imbalance: list[CylinderImbalancePattern] = Field(default_factory=list)
    decel_popping: list[DecelPoppingPattern] = Field(default_factory=list)
    heat_soak: list[HeatSoakPattern] = Field(default_factory=list)
    knock_timing: list[KnockTimingPattern] = Field(default_factory=list)

    def of(self, kind: str) -> list[AnyPattern]:
        """Return the list of one kind (a name from :data:`PATTERN_KINDS`)."""
        if kind not in PATTERN_KINDS:
            raise KeyError(kind)
        out: list[AnyPattern] = getattr(self, kind)
        return out

    def counts(self) -> dict[str, int]:
        """Return ``{kind: number of patterns}``."""
        return {k: len(self.of(k)) for k in PATTERN_KINDS}

    def is_empty(self) -> bool:
        """True when no pattern of any kind is present."""
        return not any(self.counts().values())


# --------------------------------------------------------------------------- session

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class TuningSession(_Model):
    """A complete record of one tuning session or one closed run (seed section 2).

    Tables are ``[rpm_index][map_index]``; ``table_rpm_axis`` / ``table_map_axis`` give the
    tables' breakpoints when they differ from the project defaults. ``session_id`` is safe
    as a file name. ``build_config`` is optional because a live run may not have one yet.
    """

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    timestamp_utc: UtcTime = Field(default_factory=_utc_now)
    tuner_id: str | None = None
    build_config: BuildConfiguration | None = None
    objective: TuningObjective = TuningObjective.VE_OPTIMIZATION
    conditions: EnvironmentalConditions | None = None
    dyno_metadata: DynoSessionMetadata | None = None

    initial_ve_table_front: VETable | None = None
    initial_ve_table_rear: VETable | None = None
    final_ve_table_front: VETable | None = None
    final_ve_table_rear: VETable | None = None
    initial_spark_table_front: SparkTable | None = None
    initial_spark_table_rear: SparkTable | None = None
    final_spark_table_front: SparkTable | None = None
    final_spark_table_rear: SparkTable | None = None
    table_rpm_axis: list[Annotated[float, Field(gt=0.0, le=20_000.0)]] | None = None
    table_map_axis: list[Annotated[float, Field(gt=0.0, le=400.0)]] | None = None

    peak_hp: OptFloat = Field(None, ge=0.0, le=2000.0)
    peak_torque: OptFloat = Field(None, ge=0.0, le=2000.0)
    peak_hp_corrected: OptFloat = Field(None, ge=0.0, le=2000.0)
    peak_torque_corrected: OptFloat = Field(None, ge=0.0, le=2000.0)
    afr_accuracy_rms_error: OptFloat = Field(None, ge=0.0, le=20.0)
    max_cylinder_afr_delta: OptFloat = Field(None, ge=0.0, le=20.0)
    knock_events_total: int | None = Field(None, ge=0)
    iat_start_f: OptTemperature = None
    iat_peak_f: OptTemperature = None
    tuning_duration_hours: OptFloat = Field(None, ge=0.0, le=1000.0)
    notes: str | None = None
    target_source: Literal["ecu", "table"] | None = None
    aborted: bool = False

    run: RunInfo | None = None
    grid: SessionGrid | None = None
    patterns: SessionPatterns = Field(default_factory=SessionPatterns)

    @model_validator(mode="after")
    def _tables(self) -> Self:
        if self.table_rpm_axis is not None:
            _increasing("table_rpm_axis", self.table_rpm_axis)
        if self.table_map_axis is not None:
            _increasing("table_map_axis", self.table_map_axis)
        names = (
            "initial_ve_table_front",
            "initial_ve_table_rear",
            "final_ve_table_front",
            "final_ve_table_rear",
            "initial_spark_table_front",
            "initial_spark_table_rear",
            "final_spark_table_front",
            "final_spark_table_rear",
        )
        first: tuple[str, tuple[int, int]] | None = None
        for name in names:
            rows = getattr(self, name)
            if rows is None:
                continue
            shape = _shape(rows)
            if first is None:
                first = (name, shape)
            elif shape != first[1]:
                raise ValueError(f"{name}: shape {shape} differs from {first[0]} {first[1]}")
            if self.table_rpm_axis is not None and shape[0] != len(self.table_rpm_axis):
                raise ValueError(
                    f"{name}: {shape[0]} rows but table_rpm_axis has {len(self.table_rpm_axis)}"
                )
            if self.table_map_axis is not None and shape[1] != len(self.table_map_axis):
                raise ValueError(
                    f"{name}: {shape[1]} columns but table_map_axis has {len(self.table_map_axis)}"
                )
        if (
            self.iat_start_f is not None
            and self.iat_peak_f is not None
            and self.iat_peak_f < self.iat_start_f
        ):
            raise ValueError("iat_peak_f must not be below iat_start_f")
        return self


# --------------------------------------------------------------------------- dataset

_DATASET_LISTS: dict[str, str] = {k: f"{k}_patterns" for k in PATTERN_KINDS}


class TrainingDataset(_Model):
    """Every session and every extracted pattern, aggregated for model training.

    The pattern lists are ``ve_scaling_patterns``, ``cylinder_imbalance_patterns``,
    ``decel_popping_patterns``, ``heat_soak_patterns`` and ``knock_timing_patterns``.
    Statistics are never stored counters: :meth:`summary` computes them from the content.
    The JSON file also carries the summary (for people and dashboards); it is recomputed
    on load.
    """

    dataset_id: str = Field(min_length=1)
    version: str = "1.0"
    created_utc: UtcTime = Field(default_factory=_utc_now)
    sessions: list[TuningSession] = Field(default_factory=list)
    ve_scaling_patterns: list[VEScalingPattern] = Field(default_factory=list)
    cylinder_imbalance_patterns: list[CylinderImbalancePattern] = Field(default_factory=list)
    decel_popping_patterns: list[DecelPoppingPattern] = Field(default_factory=list)
    heat_soak_patterns: list[HeatSoakPattern] = Field(default_factory=list)
    knock_timing_patterns: list[KnockTimingPattern] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_summary(cls, data: Any) -> Any:
        if isinstance(data, dict) and "summary" in data:
            return {k: v for k, v in data.items() if k != "summary"}
        return data

    @model_validator(mode="after")
    def _unique_sessions(self) -> Self:
        seen: set[str] = set()
        for s in self.sessions:
            if s.session_id in seen:
                raise ValueError(f"sessions: duplicate session_id {s.session_id!r}")
            seen.add(s.session_id)
        return self

    def patterns_of(self, kind: str) -> list[AnyPattern]:
        """Return the dataset's list of one pattern kind (from :data:`PATTERN_KINDS`)."""
        if kind not in _DATASET_LISTS:
            raise KeyError(kind)
        out: list[AnyPattern] = getattr(self, _DATASET_LISTS[kind])
        return out

    def get_session(self, session_id: str) -> TuningSession | None:
        """Return the session with this id, or None."""
        for s in self.sessions:
            if s.session_id == session_id:
                return s
        return None

    def add_session(self, session: TuningSession) -> bool:
        """Add a session; a session with the same id is replaced.

        Replacing also drops the patterns learned from the old version (they are re-added
        by the next pattern extraction), so re-processing a run never duplicates it.

        Returns:
            True when an existing session was replaced.
        """
        for i, s in enumerate(self.sessions):
            if s.session_id == session.session_id:
                self.sessions[i] = session
                for kind in PATTERN_KINDS:
                    lst = self.patterns_of(kind)
                    lst[:] = [p for p in lst if p.session_id != session.session_id]
                return True
        self.sessions.append(session)
        return False

    def add_patterns(self, session_id: str, patterns: SessionPatterns) -> dict[str, int]:
        """Add one session's patterns, skipping kinds already present for that session.

        Patterns without a ``session_id`` are tagged with ``session_id``.

        Returns:
            ``{kind: number added}``.
        """
        added: dict[str, int] = {}
        for kind in PATTERN_KINDS:
            lst = self.patterns_of(kind)
            new = patterns.of(kind)
            if not new or any(p.session_id == session_id for p in lst):
                added[kind] = 0
                continue
            for p in new:
                tagged = (
                    p
                    if p.session_id == session_id
                    else p.model_copy(update={"session_id": session_id})
                )
                lst.append(tagged)
            added[kind] = len(new)
        return added

    def summary(self) -> dict[str, Any]:
        """Return statistics computed from the content (never stored counters).

        Keys: dataset_id, version, total_sessions, aborted_sessions, total_dyno_hours,
        engines_covered (count of engine families), tuners_contributed (count of tuner ids),
        engine_families, stages_covered, cam_profiles, exhaust_types, objectives (count per
        objective), pattern_counts ``{ve_scaling, cylinder_imbalance, decel_popping,
        heat_soak, knock_timing}``, sessions_with_patterns.
        """
        builds = [s.build_config for s in self.sessions if s.build_config is not None]
        families = sorted({b.engine_family.value for b in builds})
        stages = sorted({b.stage.value for b in builds if b.stage is not None})
        cams = sorted({b.cam_spec.profile.value for b in builds if b.cam_spec is not None})
        exhausts = sorted({b.exhaust_type for b in builds if b.exhaust_type is not None})
        tuners = {s.tuner_id for s in self.sessions if s.tuner_id}
        objectives: dict[str, int] = {}
        for s in self.sessions:
            objectives[s.objective.value] = objectives.get(s.objective.value, 0) + 1
        hours = sum(s.tuning_duration_hours or 0.0 for s in self.sessions)
        with_patterns = {
            p.session_id
            for kind in PATTERN_KINDS
            for p in self.patterns_of(kind)
            if p.session_id is not None
        }
        return {
            "dataset_id": self.dataset_id,
            "version": self.version,
            "total_sessions": len(self.sessions),
            "aborted_sessions": sum(1 for s in self.sessions if s.aborted),
            "total_dyno_hours": round(hours, 3),
            "engines_covered": len(families),
            "tuners_contributed": len(tuners),
            "engine_families": families,
            "stages_covered": stages,
            "cam_profiles": cams,
            "exhaust_types": exhausts,
            "objectives": dict(sorted(objectives.items())),
            "pattern_counts": {k: len(self.patterns_of(k)) for k in PATTERN_KINDS},
            "sessions_with_patterns": len(with_patterns),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """Return the dataset's JSON text with ``summary`` as its last key; never NaN.

        Serialised by pydantic's own (fast) encoder; the summary is spliced in before the
        closing brace because it is a method, not a field.
        """
        body = self.model_dump_json(indent=indent).rstrip()
        summary = json.dumps(self.summary(), indent=indent, allow_nan=False)
        sep = ",\n" + " " * indent if indent else ","
        return f'{body[:-1].rstrip()}{sep}"summary": {summary}' + ("\n}" if indent else "}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the dataset to ``path`` atomically (temporary file, fsync, rename).

        Returns:
            The path written.

        Raises:
            StoreError: the file could not be written; the message names the path.
        """
        from dynoai_daemon.store.files import atomic_write_text

        p = Path(path)
        atomic_write_text(p, self.to_json())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainingDataset:
        """Read a dataset written by :meth:`save`.

        Raises:
            InputError: missing or unreadable file, not JSON, or invalid content; the
                message names the path and each bad field.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise InputError("dataset file not found", path=str(p)) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read dataset: {exc}", path=str(p)) from exc
        return cls.from_json(text, source=str(p))

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str | None = None) -> TrainingDataset:
        """Validate dataset JSON text.

        Raises:
            InputError: not JSON or invalid content; names each bad field.
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InputError(f"invalid dataset: {format_errors(exc)}", path=source) from exc


def format_errors(err: ValidationError) -> str:
    """Render a pydantic error as ``field.path: message`` items joined by ``; ``."""
    parts = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else ("." if loc else "") + str(part)
        parts.append(f"{loc or '(root)'}: {e['msg']}")
    return "; ".join(parts)


__all__ = [
    "HPA_PER_INHG",
    "OVERLAP_HIGH_ABOVE_DEG",
    "OVERLAP_LOW_BELOW_DEG",
    "PATTERN_KINDS",
    "SESSION_ID_PATTERN",
    "AnyPattern",
    "BuildConfiguration",
    "CamProfile",
    "CamSpecification",
    "CorrectionMethod",
    "CylinderGrid",
    "CylinderImbalancePattern",
    "DecelPoppingPattern",
    "DynoSessionMetadata",
    "EngineFamily",
    "EnvironmentalConditions",
    "HeatSoakPattern",
    "KnockTimingPattern",
    "RunInfo",
    "SessionGrid",
    "SessionPatterns",
    "StageLevel",
    "TrainingDataset",
    "TuningObjective",
    "TuningSession",
    "VEScalingPattern",
    "correction_factor",
    "f_to_c",
    "format_errors",
    "inhg_to_hpa",
    "overlap_category",
    "vapor_pressure_hpa",
]

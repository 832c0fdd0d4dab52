"""The five pattern kinds a session teaches (seed section 3) and their per-session bundle.

VE scaling, cylinder imbalance, decel popping, heat soak and knock/timing, each tagged with
the session it was learned from; :class:`SessionPatterns` groups one session's patterns by kind.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from dynoai_daemon.models._base import (
    Afr,
    KpaIdx,
    NonNeg,
    OptFloat,
    OptTemperature,
    Overlay,
    Percent,
    RpmIdx,
    _Model,
)
from dynoai_daemon.models.enums import (
    PATTERN_KINDS,
    CamProfile,
    EngineFamily,
    OverlapCategory,
    StageLevel,
)


class _Pattern(_Model):
    """Common to every pattern: the session it was learned from (None if entered by hand)."""

    session_id: str | None = None


class VEScalingPattern(_Pattern):
    """How VE changes with the build: mean VE correction % per operating region.

    Regions are those of docs/tuning.md (idle, cruise, midrange, WOT, in RPM and kPa); a region
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
    """The patterns extracted from one session, by kind (docs/contract.md)."""

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

"""TuningSession: the complete record of one tuning session or one closed run (seed section 2).

It carries the build, the conditions, the ECU tables before and after, the results and,
for a live run, the run, its grid and the patterns found in it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from dynoai_daemon.models._base import (
    OptFloat,
    OptTemperature,
    SparkTable,
    UtcTime,
    VETable,
    _increasing,
    _Model,
    _shape,
    _utc_now,
)
from dynoai_daemon.models.build import (
    BuildConfiguration,
    DynoSessionMetadata,
    EnvironmentalConditions,
)
from dynoai_daemon.models.enums import TuningObjective
from dynoai_daemon.models.grid import RunInfo, SessionGrid
from dynoai_daemon.models.patterns import SessionPatterns

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

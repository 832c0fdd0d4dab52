"""The engine build and the conditions of a session (seed sections 1 and 2).

CamSpecification, BuildConfiguration, EnvironmentalConditions (with its power correction
factor) and DynoSessionMetadata.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Self

from pydantic import Field, computed_field, field_validator, model_validator

from dynoai_daemon.models._base import OptFloat, _Model
from dynoai_daemon.models.enums import (
    CamProfile,
    CorrectionMethod,
    EngineFamily,
    OverlapCategory,
    StageLevel,
    overlap_category,
)
from dynoai_daemon.models.physics import correction_factor, f_to_c, inhg_to_hpa, vapor_pressure_hpa


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


def build_id(build: BuildConfiguration | Mapping[str, Any] | None) -> str:
    """Stable 12-hex id of a build: sha256 of its canonical JSON (keys sorted, Nones and
    computed fields dropped, ``header_type`` folded into ``exhaust_type``); ``"unknown"``
    without a build. The one build identity of the project: model groups, the live
    tune pool, ``predict/<build_id>`` and the collector's ``build_id`` column."""
    if isinstance(build, BuildConfiguration):
        build = build.model_dump(mode="json")
    if not build:
        return "unknown"

    def clean(d: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if v is None or k in ("overlap_category",):
                continue
            out[k] = clean(v) if isinstance(v, Mapping) else v
        return out

    b = clean(build)
    if "exhaust_type" not in b and "header_type" in b:
        b["exhaust_type"] = b["header_type"]
    b.pop("header_type", None)
    for k, v in list(b.items()):
        if isinstance(v, int | float) and not isinstance(v, bool):
            b[k] = round(float(v), 4)
    cam = b.get("cam_spec")
    if isinstance(cam, dict):
        b["cam_spec"] = {
            k: round(float(v), 4) if isinstance(v, int | float) else v for k, v in cam.items()
        }
    text = json.dumps(b, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]

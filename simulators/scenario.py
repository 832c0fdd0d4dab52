"""Simulator scenarios: the build, the day, the dyno, the ECU's errors and the run plan.

A scenario is a TOML file (the built-in ones live in ``simulators/scenarios/``) validated
into a :class:`Scenario` pydantic model. It says which engine is on the dyno (fields named
as in the seed's BuildConfiguration), the weather, the dyno's mechanics, how wrong the
ECU's VE tables are, how the sensors behave, and the plan the operator runs: WOT pulls,
eddy-current steady-state holds over cells, throttle snaps (decels), idles and heat-soak
idles with the fan turned down. :func:`load_scenario` accepts a built-in name or a path
and turns every validation problem into a :class:`~dynoai_daemon.errors.ConfigError`
naming the bad field.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dynoai_daemon.config import DEFAULT_TARGET_TABLE, format_validation_error
from dynoai_daemon.errors import ConfigError
from simulators.parts import family_stock

BUILTIN_PACKAGE = "simulators.scenarios"

#: The seed's engine families (``dynoai_daemon.models.EngineFamily``).
EngineFamily = Literal[
    "twin_cam", "milwaukee_8", "evolution", "sportster", "revolution_max", "other"
]
#: Other spellings scenario files use for a family.
FAMILY_SPELLINGS = {"milwaukee_eight": "milwaukee_8", "m8": "milwaukee_8", "twincam": "twin_cam"}
StageLevel = Literal["stock", "stage_1", "stage_2", "stage_3", "stage_4"]
ExhaustType = Literal["2-into-1", "2-into-2", "true_dual"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CamSpec(_Model):
    """The seed's CamSpecification (overlap per cylinder is what the model uses)."""

    profile: str = "stock"
    intake_duration_deg: float = Field(210.0, gt=0, lt=360)
    exhaust_duration_deg: float = Field(210.0, gt=0, lt=360)
    intake_lift_in: float = Field(0.5, gt=0, lt=1.5)
    exhaust_lift_in: float = Field(0.5, gt=0, lt=1.5)
    lobe_separation_angle_deg: float = Field(108.0, gt=80, lt=130)
    overlap_deg_front: float = Field(12.0, ge=0, le=90)
    overlap_deg_rear: float = Field(12.0, ge=0, le=90)
    idle_rpm_target: float = Field(1000.0, ge=600, le=1500)


class BuildSpec(_Model):
    """The engine on the dyno, with the seed's BuildConfiguration field names."""

    engine_family: EngineFamily = "twin_cam"
    displacement_ci: float = Field(103.0, ge=45, le=150)
    compression_ratio: float = Field(9.7, ge=7.5, le=13.5)
    stage: StageLevel = "stock"
    cam_spec: CamSpec = CamSpec()
    air_cleaner: str = "stock"
    throttle_body_mm: float = Field(50.0, ge=30, le=80)
    exhaust_type: ExhaustType = Field(
        "2-into-1", validation_alias=AliasChoices("exhaust_type", "header_type")
    )
    header_length_delta_in: float = Field(0.0, ge=-20, le=20)
    pair_valve_present: bool = True
    injector_flow_lb_hr: float = Field(4.5, gt=0, le=20)
    octane_requirement: float = Field(91.0, ge=80, le=110)

    @field_validator("engine_family", mode="before")
    @classmethod
    def _family_spelling(cls, v: Any) -> Any:
        if isinstance(v, str):
            key = v.strip().lower().replace("-", "_").replace(" ", "_")
            return FAMILY_SPELLINGS.get(key, key)
        return v

    def to_build_config(self) -> dict[str, Any]:
        """Return the build as the seed's BuildConfiguration dict (``header_type`` key)."""
        d = self.model_dump()
        d["header_type"] = d.pop("exhaust_type")
        return d


class Conditions(_Model):
    """The seed's EnvironmentalConditions plus the fuel actually in the tank."""

    ambient_temp_f: float = Field(75.0, ge=-20, le=130)
    barometric_pressure_inhg: float = Field(29.92, ge=20, le=32)
    humidity_percent: float = Field(45.0, ge=0, le=100)
    altitude_ft: float = Field(500.0, ge=-1000, le=15000)
    fuel_octane: float | None = Field(None, ge=80, le=110)
    iat_start_f: float | None = Field(None, ge=-20, le=250)
    engine_temp_start_f: float = Field(200.0, ge=0, le=400)

    @property
    def baro_kpa(self) -> float:
        """Barometric pressure in kPa."""
        return self.barometric_pressure_inhg * 3.386389


class DynoSpec(_Model):
    """Dyno mechanics; defaults are a Dynojet 250i (inertia drum + eddy-current absorber)."""

    dyno_type: str = "Dynojet 250i"
    load_type: Literal["inertia", "eddy_current"] = "inertia"
    absorber: bool = True
    drum_inertia_kgm2: float = Field(11.5, gt=0, le=200)
    roll_diameter_in: float = Field(18.0, gt=0, le=60)
    tire_diameter_in: float = Field(26.0, gt=0, le=40)
    gear_ratio: float = Field(3.2, gt=0.5, le=20, description="engine revs per wheel rev")
    engine_inertia_kgm2: float = Field(0.12, ge=0, le=5)
    drivetrain_efficiency: float = Field(0.9, gt=0.5, le=1.0)
    brake_ftlb: float = Field(100.0, ge=0, le=500, description="drum brake on decel, at engine")
    fan_airflow_cfm: float = Field(5000.0, ge=0, le=50000)
    warmup_time_min: float = Field(10.0, ge=0)


class RegionBias(_Model):
    """An ECU VE offset over an RPM x MAP box (soft edges), per cylinder, in percent."""

    rpm: tuple[float, float]
    map_kpa: tuple[float, float]
    front_pct: float = Field(0.0, ge=-12, le=12)
    rear_pct: float = Field(0.0, ge=-12, le=12)

    @field_validator("rpm", "map_kpa")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("range must be [low, high] with low < high")
        return v


class EcuTable(_Model):
    """A table the simulated ECU runs instead of its generated one (``--ecu-tune``):
    ``values[rpm][load]`` on its own axes (MAP in kPa), resampled onto the engine grid."""

    rpm_axis: tuple[float, ...] = Field(min_length=1)
    map_axis: tuple[float, ...] = Field(min_length=1)
    values: tuple[tuple[float, ...], ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> EcuTable:
        if len(self.values) != len(self.rpm_axis) or any(
            len(r) != len(self.map_axis) for r in self.values
        ):
            raise ValueError("values must be [rpm][map] matching the axes")
        return self


class EcuSpec(_Model):
    """How wrong the ECU is. A positive percent means the ECU's VE is too high (rich)."""

    error_pct: float = Field(5.0, ge=0, le=12, description="shared smooth error amplitude")
    cylinder_error_pct: float = Field(1.0, ge=0, le=6, description="per-cylinder part")
    bias_front_pct: float = Field(0.0, ge=-12, le=12)
    bias_rear_pct: float = Field(0.0, ge=-12, le=12)
    region_bias: tuple[RegionBias, ...] = ()
    iat_compensation: float = Field(0.9, ge=0, le=1.2, description="share of density change")
    target_table: tuple[tuple[float, float], ...] = DEFAULT_TARGET_TABLE
    spark_margin_deg: float = Field(1.5, ge=0, le=10)
    knock_retard_step_deg: float = Field(2.0, gt=0, le=10)
    knock_retard_max_deg: float = Field(8.0, gt=0, le=20)
    knock_recover_deg_s: float = Field(6.0, gt=0, le=100)
    knock_hold_s: float = Field(0.3, ge=0, le=10)
    #: tables loaded from a tune file: the ECU fuels (and fires) from these instead
    ve_table_front: EcuTable | None = None
    ve_table_rear: EcuTable | None = None
    spark_table: EcuTable | None = None


class SensorSpec(_Model):
    """Wideband and data-channel behaviour."""

    warmup_s: float = Field(3.0, ge=0, le=120)
    delay_base_ms: float = Field(60.0, ge=0, le=1000)
    delay_k_ms_krpm: float = Field(240.0, ge=0, le=5000)
    lag_ms: float = Field(60.0, ge=0, le=1000)
    afr_noise: float = Field(0.07, ge=0, le=2)
    stoich_afr: float = Field(14.7, gt=5, lt=20)
    map_noise_kpa: float = Field(0.25, ge=0, le=5)
    rpm_noise: float = Field(4.0, ge=0, le=200)
    torque_noise_ftlb: float = Field(0.3, ge=0, le=20)


class PullStep(_Model):
    """A WOT sweep on the inertia drum from ``from_rpm`` to ``to_rpm``."""

    step: Literal["pull"]
    from_rpm: float = Field(ge=900, le=7000)
    to_rpm: float = Field(ge=1000, le=7500)

    @model_validator(mode="after")
    def _order(self) -> PullStep:
        if self.to_rpm <= self.from_rpm:
            raise ValueError("to_rpm must be above from_rpm")
        return self


class HoldStep(_Model):
    """Eddy-current holds at every (rpm, map) of the given lists, ``seconds`` each."""

    step: Literal["hold"]
    rpm: float | tuple[float, ...]
    map_kpa: float | tuple[float, ...] = Field(validation_alias=AliasChoices("map_kpa", "map"))
    seconds: float = Field(gt=0, le=600)

    @field_validator("rpm")
    @classmethod
    def _rpm(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        vals = v if isinstance(v, tuple) else (v,)
        if not vals or any(not 700 <= x <= 7000 for x in vals):
            raise ValueError("hold rpm must be within 700..7000")
        return v

    @field_validator("map_kpa")
    @classmethod
    def _map(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        vals = v if isinstance(v, tuple) else (v,)
        if not vals or any(not 15 <= x <= 110 for x in vals):
            raise ValueError("hold map_kpa must be within 15..110")
        return v

    def points(self) -> list[tuple[float, float]]:
        """The (rpm, kPa) holds in serpentine order (MAP sweeps up, then down, ...)."""
        rpms = self.rpm if isinstance(self.rpm, tuple) else (self.rpm,)
        maps = self.map_kpa if isinstance(self.map_kpa, tuple) else (self.map_kpa,)
        out: list[tuple[float, float]] = []
        for i, r in enumerate(rpms):
            seq = maps if i % 2 == 0 else tuple(reversed(maps))
            out.extend(itertools.product((r,), seq))
        return out


class DecelStep(_Model):
    """Throttle snapped closed at ``from_rpm`` (current rpm when omitted), coast down."""

    step: Literal["decel"]
    from_rpm: float | None = Field(None, ge=1500, le=7500)
    to_rpm: float = Field(1200.0, ge=800, le=3000)


class IdleStep(_Model):
    """Idle in neutral for ``seconds`` with the fan as configured."""

    step: Literal["idle"]
    seconds: float = Field(gt=0, le=3600)


class SoakStep(_Model):
    """Idle for ``seconds`` with the fan turned down to ``fan_cfm``: heat soak."""

    step: Literal["soak"]
    seconds: float = Field(gt=0, le=3600)
    fan_cfm: float = Field(300.0, ge=0, le=50000)


class MarkerStep(_Model):
    """The operator presses the dyno's logging button: ``value`` 1 begins a run, 0 ends
    it. Takes no time; the dyno reports it as a JetDrive logging begin/end."""

    step: Literal["marker"]
    value: Literal[0, 1]


Step = Annotated[
    PullStep | HoldStep | DecelStep | IdleStep | SoakStep | MarkerStep,
    Field(discriminator="step"),
]


class Scenario(_Model):
    """One simulated dyno session: engine, day, dyno, ECU errors, sensors and plan."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = Field(ge=0)
    build: BuildSpec = BuildSpec()
    conditions: Conditions = Conditions()
    dyno: DynoSpec = DynoSpec()
    ecu: EcuSpec = EcuSpec()
    sensors: SensorSpec = SensorSpec()
    plan: tuple[Step, ...] = Field(min_length=1)
    #: ``parts``: true VE from the build's parts, the ECU on the family's stock map
    #: (:mod:`simulators.parts`); ``ecu_error``: the ``[ecu]`` section's error field.
    ve_model: Literal["ecu_error", "parts"] = "ecu_error"

    @model_validator(mode="before")
    @classmethod
    def _parts_without_ecu(cls, data: Any) -> Any:
        # A scenario without an [ecu] error section: true VE from the parts, the ECU on
        # the family's stock map with its stock IAT compensation.
        if isinstance(data, dict) and "ecu" not in data and "ve_model" not in data:
            raw = data.get("build")
            build: dict[str, Any] = raw if isinstance(raw, dict) else {}
            fam = str(build.get("engine_family", "twin_cam")).strip().lower()
            fam = FAMILY_SPELLINGS.get(fam.replace("-", "_").replace(" ", "_"), fam)
            ecu = {"error_pct": 0.0, "cylinder_error_pct": 0.0}
            ecu["iat_compensation"] = family_stock(fam).iat_compensation
            data = {**data, "ve_model": "parts", "ecu": ecu}
        return data

    @model_validator(mode="after")
    def _plan_fits_dyno(self) -> Scenario:
        if not self.dyno.absorber and self.dyno.load_type == "inertia":
            for i, s in enumerate(self.plan):
                if isinstance(s, HoldStep):
                    raise ValueError(f"plan[{i}]: a hold needs a dyno with an absorber")
        return self

    @property
    def fuel_octane(self) -> float:
        """Octane of the fuel in the tank (the build's requirement when not given)."""
        c = self.conditions.fuel_octane
        return self.build.octane_requirement if c is None else c

    def with_pulls(self, n: int) -> Scenario:
        """Return a copy whose plan has exactly ``n`` pulls.

        The steps before the first pull are kept; each pull with the steps that follow it
        (up to the next pull) is a cycle, and cycles repeat in order until ``n`` pulls.

        Raises:
            ConfigError: ``n`` < 0, or ``n`` > 0 and the plan has no pull.
        """
        if n < 0:
            raise ConfigError("pulls must be >= 0", field="pulls")
        starts = [i for i, s in enumerate(self.plan) if isinstance(s, PullStep)]
        if not starts:
            if n == 0:
                return self
            raise ConfigError(f"scenario {self.name} has no pull to repeat", field="pulls")
        prologue = list(self.plan[: starts[0]])
        bounds = [*starts, len(self.plan)]
        cycles = [list(self.plan[a:b]) for a, b in itertools.pairwise(bounds)]
        plan = prologue + [s for k in range(n) for s in cycles[k % len(cycles)]]
        if not plan:
            plan = [IdleStep(step="idle", seconds=5.0)]
        return self.model_copy(update={"plan": tuple(plan)})


def list_scenarios() -> list[str]:
    """Names of the built-in scenarios, sorted."""
    root = resources.files(BUILTIN_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _first_field(err: ValidationError) -> str | None:
    errs = err.errors()
    if not errs:
        return None
    return ".".join(str(p) for p in errs[0]["loc"]) or None


def parse_scenario(data: dict[str, Any], *, where: str = "(scenario)") -> Scenario:
    """Validate a scenario mapping (a parsed TOML document).

    Raises:
        ConfigError: a field is invalid; the message names every bad field and
            ``.field`` the first one.
    """
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"{where}: {format_validation_error(exc)}", field=_first_field(exc)
        ) from exc


def load_scenario(name_or_path: str | os.PathLike[str]) -> Scenario:
    """Load a built-in scenario by name (``"stock"``) or a scenario TOML file by path.

    Raises:
        ConfigError: unknown name, missing or unreadable file, bad TOML, or an invalid
            field (named in the message).
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or os.sep in text or path.exists():
        where = text
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"scenario file not readable: {text}: {exc}") from exc
    else:
        names = list_scenarios()
        if text not in names:
            raise ConfigError(
                f"unknown scenario {text!r}; built-in: {', '.join(names)}", field="scenario"
            )
        where = f"{text}.toml"
        raw = resources.files(BUILTIN_PACKAGE).joinpath(where).read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    return parse_scenario(data, where=where)

"""Daemon configuration: TOML file plus ``DYNOAI_<SECTION>__<KEY>`` environment overrides.

One :class:`Settings` object describes a station: where data goes, the MQTT broker, the
sources (drivers) to read, the grid axes, the tuning gates and the alert limits. It is
validated completely before anything starts; :func:`load_settings` turns every pydantic
error into a :class:`~dynoai_daemon.errors.ConfigError` that names each bad field.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dynoai_daemon import models
from dynoai_daemon.errors import ConfigError

DEFAULT_RPM_AXIS: tuple[float, ...] = (
    750, 1000, 1250, 1500, 1750, 2000, 2250, 2500, 2750, 3000, 3250, 3500, 3750,
    4000, 4500, 5000, 5500, 6000, 6500,
)  # fmt: skip
DEFAULT_MAP_AXIS: tuple[float, ...] = (
    20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100, 105,
)  # fmt: skip
DEFAULT_TARGET_TABLE: tuple[tuple[float, float], ...] = (
    (20, 14.6), (40, 14.4), (60, 13.8), (80, 13.2), (95, 12.8), (105, 12.6),
)  # fmt: skip


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _strictly_increasing(name: str, axis: tuple[float, ...]) -> tuple[float, ...]:
    if len(axis) < 2:
        raise ValueError(f"{name} needs at least two breakpoints")
    if any(b <= a for a, b in itertools.pairwise(axis)):
        raise ValueError(f"{name} must be strictly increasing")
    return axis


class GridConfig(_Section):
    """RPM x MAP axes; values are cell centres (the ECU table's breakpoints)."""

    rpm_axis: tuple[float, ...] = DEFAULT_RPM_AXIS
    map_axis: tuple[float, ...] = DEFAULT_MAP_AXIS

    @field_validator("rpm_axis")
    @classmethod
    def _rpm(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 for x in v):
            raise ValueError("rpm breakpoints must be positive")
        return _strictly_increasing("rpm_axis", v)

    @field_validator("map_axis")
    @classmethod
    def _map(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 or x > 400 for x in v):
            raise ValueError("map breakpoints must be in (0, 400] kPa")
        return _strictly_increasing("map_axis", v)


class TuningConfig(_Section):
    """Learning gates, transport delay, VE correction and run detection (see docs/tuning.md)."""

    stoich_afr: float = Field(14.7, gt=5, lt=20)
    stale_ms: float = Field(250.0, gt=0, le=10_000)
    afr_min: float = Field(9.0, gt=0)
    afr_max: float = Field(20.0, gt=0)
    ect_min_f: float = Field(150.0, ge=-40, le=400)
    max_tps_rate_pct_s: float = Field(50.0, gt=0)
    max_map_rate_kpa_s: float = Field(40.0, gt=0)
    rate_window_ms: float = Field(200.0, gt=0, le=1000)
    decel_tps_pct: float = Field(3.0, ge=0, le=100)
    decel_rpm_rate: float = Field(100.0, gt=0)
    delay_base_ms: float = Field(60.0, ge=0, le=1000)
    delay_k_ms_krpm: float = Field(240.0, ge=0, le=5000)
    delay_max_ms: float = Field(600.0, ge=0, le=1400)
    min_weight: float = Field(3.0, gt=0)
    max_ci_pct: float = Field(1.0, gt=0, le=50)
    max_correction_pct: float = Field(15.0, gt=0, le=100)
    target_table: tuple[tuple[float, float], ...] = DEFAULT_TARGET_TABLE
    use_ecu_target: bool = True
    run_start_rpm: float = Field(1200.0, gt=0)
    run_start_tps: float = Field(10.0, ge=0, le=100)
    run_end_rpm: float = Field(1000.0, ge=0)
    run_end_idle_s: float = Field(5.0, gt=0)
    min_run_s: float = Field(2.0, ge=0)
    imbalance_afr: float = Field(0.5, gt=0)
    allow_timing_advance: bool = False
    heat_soak_iat_f: float = Field(130.0, gt=0)
    heat_soak_rpm: float = Field(3500.0, gt=0)
    heat_soak_tps_pct: float = Field(15.0, gt=0)
    heat_soak_map_kpa: float = Field(50.0, gt=0)
    heat_soak_min_s: float = Field(2.0, ge=0)

    @field_validator("target_table")
    @classmethod
    def _table(cls, v: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if len(v) < 1:
            raise ValueError("target_table needs at least one (map_kpa, afr) point")
        kpa = tuple(p[0] for p in v)
        if len(kpa) > 1:
            _strictly_increasing("target_table MAP points", kpa)
        if any(not 9.0 <= p[1] <= 20.0 for p in v):
            raise ValueError("target AFRs must be within 9..20")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> TuningConfig:
        if self.afr_min >= self.afr_max:
            raise ValueError("afr_min must be below afr_max")
        if self.run_end_rpm >= self.run_start_rpm:
            raise ValueError("run_end_rpm must be below run_start_rpm")
        return self


class ReplayConfig(_Section):
    """``[replay]``: how recorded logs are read.

    ``temp_unit``: the unit of temperature columns that a log leaves without a unit;
    ``auto`` decides per log from the firmware its title names and the coolant values.
    """

    temp_unit: Literal["auto", "C", "F"] = "auto"


class AlertConfig(_Section):
    """Live alert limits (see docs/tuning.md, Live alerts)."""

    lean_limit_afr: float = Field(13.8, gt=9, lt=20)
    lean_map_kpa: float = Field(80.0, gt=0)
    lean_hold_ms: float = Field(200.0, ge=0)
    iat_limit_f: float = Field(130.0, gt=0)
    heat_soak_rpm: float = Field(3500.0, gt=0)
    heat_soak_map_kpa: float = Field(50.0, gt=0)
    heat_soak_tps_pct: float = Field(15.0, gt=0)
    imbalance_afr: float = Field(0.5, gt=0)
    imbalance_min_weight: float = Field(10.0, gt=0)
    alert_repeat_s: float = Field(5.0, ge=0)
    source_stale_s: float = Field(2.0, gt=0)  # a source silent this long raises a sensor alert


class TuneConfig(_Section):
    """The base tune of the build on the dyno (docs/tuning.md, "Tuning sessions")."""

    #: the tune file the ECU runs (a new file starts a new pool of runs)
    base: str = ""


class ReportConfig(_Section):
    """``dynoai report`` settings: ``auto`` writes ``sessions/<id>.html`` after each run."""

    auto: bool = False


class MqttConfig(_Section):
    """Broker connection and topic root."""

    url: str = "mqtt://127.0.0.1:1883"
    base_topic: str = "dynoai"
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    client_id: str = ""
    keepalive_s: int = Field(10, ge=1, le=3600)
    reconnect_max_s: float = Field(30.0, ge=0.1, le=3600)
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("mqtt://") or v.startswith("mqtts://")):
            raise ValueError("url must start with mqtt:// or mqtts://")
        return v

    @field_validator("base_topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v or any(c in v for c in "+#") or v.startswith("/") or v.endswith("/"):
            raise ValueError("base_topic must be a plain topic prefix without wildcards")
        return v


class SourceConfig(BaseModel):
    """One source: a driver name plus that driver's own options (validated by the driver)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    driver: str = Field(min_length=1)
    enabled: bool = True
    channel_map: dict[str, str] = Field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Return the driver-specific options (everything but name/driver/enabled)."""
        extra = dict(self.model_extra or {})
        if self.channel_map:
            extra["channel_map"] = dict(self.channel_map)
        return extra


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """The whole station configuration."""

    model_config = SettingsConfigDict(
        env_prefix="DYNOAI_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    station: str = Field("cell1", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data_dir: Path = Path("/var/lib/dynoai")
    mqtt: MqttConfig = MqttConfig()
    sources: tuple[SourceConfig, ...] = ()
    grid: GridConfig = GridConfig()
    tuning: TuningConfig = TuningConfig()
    alerts: AlertConfig = AlertConfig()
    tune: TuneConfig = TuneConfig()
    replay: ReplayConfig = ReplayConfig()
    report: ReportConfig = ReportConfig()
    build: dict[str, Any] | None = None
    conditions: dict[str, Any] | None = None
    dyno: dict[str, Any] | None = None
    tuner_id: str | None = None
    objective: str = "ve_optimization"
    live_max_hz: float = Field(10.0, gt=0, le=100)
    cells_max_hz: float = Field(2.0, gt=0, le=100)
    health_interval_s: float = Field(5.0, gt=0)
    batch_ms: float = Field(20.0, gt=0, le=1000)

    @model_validator(mode="after")
    def _unique_sources(self) -> Settings:
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate source names: {sorted(dup)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; the file arrives as init kwargs.
        return (env_settings, init_settings)


@dataclass(frozen=True)
class SessionContext:
    """The validated build, conditions and dyno metadata attached to sessions."""

    build: Any
    conditions: Any
    dyno: Any
    tuner_id: str | None
    objective: Any


def session_context(settings: Settings) -> SessionContext:
    """Validate the ``build``, ``conditions``, ``dyno`` and ``objective`` sections.

    Raises:
        ConfigError: naming each bad field (e.g. ``build.displacement_ci``).
    """

    def one(section: str, cls: type[BaseModel], data: dict[str, Any] | None) -> Any:
        if not data:
            return None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            msg = "; ".join(
                f"{section}.{_field_path(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(msg, field=section) from exc

    try:
        objective = models.TuningObjective(settings.objective)
    except ValueError as exc:
        raise ConfigError(f"objective: unknown objective {settings.objective!r}") from exc
    return SessionContext(
        build=one("build", models.BuildConfiguration, settings.build),
        conditions=one("conditions", models.EnvironmentalConditions, settings.conditions),
        dyno=one("dyno", models.DynoSessionMetadata, settings.dyno),
        tuner_id=settings.tuner_id,
        objective=objective,
    )


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(root)"


def format_validation_error(err: ValidationError) -> str:
    """Render a pydantic error as one line per bad field: ``field: message``."""
    lines = []
    for e in err.errors():
        lines.append(f"{_field_path(tuple(e['loc']))}: {e['msg']}")
    return "; ".join(lines)


def _blame(err: ValidationError, where: str) -> str:
    """Name, for each bad field, where its value came from: an environment variable or the file."""
    from_env: list[str] = []
    from_file: list[str] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        line = f"{_field_path(loc)}: {e['msg']}"
        names = [str(p) for p in loc if not isinstance(p, int)]
        var = "DYNOAI_" + "__".join(names).upper()
        if names and var in os.environ:
            from_env.append(f"environment {var}: {line}")
        else:
            from_file.append(line)
    parts = list(from_env)
    if from_file:
        parts.append(f"{where}: " + "; ".join(from_file))
    return "; ".join(parts)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read a TOML config (optional), apply environment overrides, validate everything.

    Args:
        path: the TOML file; None for defaults plus environment only.
        overrides: top-level keys that replace the file's (used by the CLI, e.g. data_dir).

    Returns:
        The validated settings.

    Raises:
        ConfigError: the file is missing or not TOML, or any field is invalid; the
            message names every bad field.
    """
    data: dict[str, Any] = {}
    where = str(path) if path is not None else "(defaults)"
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason})") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_blame(exc, where)) from exc
    try:
        session_context(settings)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", field=exc.field) from exc
    return settings

"""What the collector accepts: a session message checked and turned into one database row.

:func:`check_message` is the single gate for everything that reaches the central store,
live from MQTT and from a backfill: the topic must be ``<base>/<station>/session/<id>``
(``session/last``, the station's retained summary, is ignored, not an error), the payload
UTF-8 JSON that validates as the project's :class:`~dynoai_daemon.models.TuningSession`,
its ``session_id`` the one in the topic, and its ``run.station`` (when the session names
one) the station of the topic: with per-station broker credentials the topic is what the
broker authenticated, so a payload claiming another station is refused. An accepted
message becomes a :class:`SessionRow`: the session as canonical JSON plus the columns the
models train on (build, conditions, outcome, pattern counts), flattened so that SQL can
select and group without opening the JSON. :func:`build_id` names a build by the content
of its BuildConfiguration, so sessions of one build from different stations group together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from dynoai_daemon.models import (
    PATTERN_KINDS,
    BuildConfiguration,
    TuningSession,
    format_errors,
)
from dynoai_daemon.models import build_id as model_build_id

#: Why a message was not stored; the health payload counts each.
REJECT_REASONS: Final[tuple[str, ...]] = (
    "topic",  # not <base>/<station>/session/<id>
    "encoding",  # not UTF-8
    "json",  # not a JSON object
    "schema",  # not a valid TuningSession
    "session_id",  # the payload's session_id differs from the topic's
    "station",  # the payload's run.station differs from the topic's station
    "database",  # valid, but PostgreSQL refuses a value (e.g. a NUL character in a text)
)

#: The retained per-station summary lives under the same filter and is skipped.
SUMMARY_LEAF: Final = "last"


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One row of the ``sessions`` table (see :mod:`dynoai_daemon.collect.db`).

    ``session_json`` is the validated session serialised by its model (canonical JSON);
    ``columns`` holds the flattened training columns by column name.
    """

    session_id: str
    station: str
    build_id: str | None
    source: str
    session_json: str
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that is not stored: ``reason`` is one of :data:`REJECT_REASONS`."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message under the filter that is not a session (``session/last``)."""

    detail: str


def build_id(build: BuildConfiguration | None) -> str | None:
    """The project's build id (:func:`dynoai_daemon.models.build_id`), None without a build.

    Two sessions carry the same id exactly when their build configurations are equal
    field for field (unset fields ignored), whichever station recorded them.
    """
    return None if build is None else model_build_id(build)


def split_topic(topic: str, base_topic: str) -> tuple[str, str] | None:
    """``<base>/<station>/session/<leaf>`` -> (station, leaf); None for any other shape."""
    prefix = base_topic.rstrip("/") + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != "session" or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[2]


def training_columns(session: TuningSession) -> dict[str, Any]:
    """The flattened columns of a session that the models train on (None where unknown)."""
    b = session.build_config
    cam = b.cam_spec if b is not None else None
    c = session.conditions
    d = session.dyno_metadata
    counts = session.patterns.counts()
    cols: dict[str, Any] = {
        "timestamp_utc": session.timestamp_utc,
        "run_id": session.run.run_id if session.run is not None else None,
        "objective": str(session.objective),
        "aborted": session.aborted,
        "engine_family": str(b.engine_family) if b is not None else None,
        "displacement_ci": b.displacement_ci if b is not None else None,
        "compression_ratio": b.compression_ratio if b is not None else None,
        "stage": str(b.stage) if b is not None and b.stage is not None else None,
        "cam_profile": str(cam.profile) if cam is not None else None,
        "cam_overlap_deg": cam.max_overlap_deg if cam is not None else None,
        "cam_overlap_category": (
            str(cam.overlap_category)
            if cam is not None and cam.overlap_category is not None
            else None
        ),
        "exhaust_type": b.exhaust_type if b is not None else None,
        "header_length_delta_in": b.header_length_delta_in if b is not None else None,
        "pair_valve_present": b.pair_valve_present if b is not None else None,
        "octane_requirement": b.octane_requirement if b is not None else None,
        "fuel_type": b.fuel_type if b is not None else None,
        "ambient_temp_f": c.ambient_temp_f if c is not None else None,
        "barometric_pressure_inhg": c.barometric_pressure_inhg if c is not None else None,
        "humidity_percent": c.humidity_percent if c is not None else None,
        "altitude_ft": c.altitude_ft if c is not None else None,
        "fan_airflow_cfm": d.fan_airflow_cfm if d is not None else None,
        "peak_hp": session.peak_hp,
        "peak_torque": session.peak_torque,
        "afr_accuracy_rms_error": session.afr_accuracy_rms_error,
        "max_cylinder_afr_delta": session.max_cylinder_afr_delta,
        "knock_events_total": session.knock_events_total,
        "iat_start_f": session.iat_start_f,
        "iat_peak_f": session.iat_peak_f,
        "has_grid": session.grid is not None,
    }
    for kind in PATTERN_KINDS:
        cols[f"n_{kind}"] = counts.get(kind, 0)
    return cols


#: Column order of :func:`training_columns` (the migration creates exactly these).
TRAINING_COLUMNS: Final[tuple[str, ...]] = (
    "timestamp_utc",
    "run_id",
    "objective",
    "aborted",
    "engine_family",
    "displacement_ci",
    "compression_ratio",
    "stage",
    "cam_profile",
    "cam_overlap_deg",
    "cam_overlap_category",
    "exhaust_type",
    "header_length_delta_in",
    "pair_valve_present",
    "octane_requirement",
    "fuel_type",
    "ambient_temp_f",
    "barometric_pressure_inhg",
    "humidity_percent",
    "altitude_ft",
    "fan_airflow_cfm",
    "peak_hp",
    "peak_torque",
    "afr_accuracy_rms_error",
    "max_cylinder_afr_delta",
    "knock_events_total",
    "iat_start_f",
    "iat_peak_f",
    "has_grid",
    *(f"n_{kind}" for kind in PATTERN_KINDS),
)


def session_row(session: TuningSession, *, station: str, source: str) -> SessionRow:
    """The row of an already validated session recorded by ``station``."""
    return SessionRow(
        session_id=session.session_id,
        station=station,
        build_id=build_id(session.build_config),
        source=source,
        session_json=session.model_dump_json(),
        columns=training_columns(session),
    )


def check_payload(
    payload: bytes,
    *,
    station: str | None,
    session_id: str | None,
    source: str,
) -> SessionRow | Rejected:
    """Validate a session payload; ``station`` / ``session_id`` are what its origin claims.

    ``station`` None (a backfill without ``--station``) takes the session's own
    ``run.station``; a session naming no station at all is then refused.
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("encoding", f"payload is not UTF-8 (byte {exc.start})")
    try:
        # pydantic's own JSON parser: one pass, no intermediate dicts (the hot path).
        session = TuningSession.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return Rejected("json", f"payload is not JSON: {first['msg']}")
        if first["type"] == "model_type" and not first["loc"]:
            return Rejected("json", "payload is not a JSON object")
        return Rejected("schema", f"not a valid session: {format_errors(exc)}")
    if session_id is not None and session.session_id != session_id:
        return Rejected(
            "session_id",
            f"payload session_id {session.session_id!r} differs from {session_id!r}",
        )
    claimed = session.run.station if session.run is not None else None
    if station is None:
        if claimed is None:
            return Rejected("station", "session names no run.station and no station was given")
        station = claimed
    elif claimed is not None and claimed != station:
        return Rejected(
            "station", f"session says station {claimed!r} but came from station {station!r}"
        )
    return session_row(session, station=station, source=source)


def check_message(
    topic: str, payload: bytes, *, base_topic: str = "dynoai"
) -> SessionRow | Rejected | Ignored:
    """Check one message from the session filter (see the module docstring)."""
    where = split_topic(topic, base_topic)
    if where is None:
        return Rejected("topic", f"not a session topic: {topic!r}")
    station, leaf = where
    if leaf == SUMMARY_LEAF:
        return Ignored(f"{topic}: a station's session summary, not a session")
    return check_payload(payload, station=station, session_id=leaf, source="mqtt")

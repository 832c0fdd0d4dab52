"""The training data collector of the seed's Usage Workflow.

:class:`TrainingDataCollector` builds TuningSessions from completed runs
(``create_session_from_run``), gathers them (``add_session``), pulls their patterns into
the :class:`~dynoai_daemon.models.TrainingDataset` (``extract_all_patterns``); the store
reads and writes it (:func:`dynoai_daemon.store.files.save_dataset`). Patterns normally
come with the session: the core computes them from the run's cells when the run closes
(``session.patterns``). For a session that has neither a grid nor patterns but carries
initial and final VE tables (a hand-entered or imported session), the **table-only
fallback** derives a VEScalingPattern from the final/initial VE ratio of every table cell,
averaged over the operating regions of docs/tuning.md (pooled over both cylinders); it is
marked ``source="tables"`` and is weaker than the cell-based pattern because untouched
cells count as "no change" and nothing says which cells were actually verified on the
dyno. Extraction is idempotent: a session's patterns are added once (keyed by session id),
whatever the number of calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS
from dynoai_daemon.errors import InputError
from dynoai_daemon.models import (
    PATTERN_KINDS,
    BuildConfiguration,
    DynoSessionMetadata,
    EnvironmentalConditions,
    SessionPatterns,
    TrainingDataset,
    TuningObjective,
    TuningSession,
    VEScalingPattern,
    format_errors,
)
from dynoai_daemon.patterns.cells import REGIONS

#: keys of ``results`` in :meth:`TrainingDataCollector.create_session_from_run`
RESULT_FIELDS: frozenset[str] = frozenset(
    {
        "peak_hp",
        "peak_torque",
        "peak_hp_corrected",
        "peak_torque_corrected",
        "afr_accuracy_rms_error",
        "max_cylinder_afr_delta",
        "knock_events_total",
        "iat_start_f",
        "iat_peak_f",
        "tuning_duration_hours",
        "notes",
        "target_source",
        "aborted",
    }
)

#: keys of ``initial_tables`` / ``final_tables`` -> the table's name suffix on the session
TABLE_KEYS: dict[str, str] = {
    "ve_front": "ve_table_front",
    "ve_rear": "ve_table_rear",
    "spark_front": "spark_table_front",
    "spark_rear": "spark_table_rear",
}
AXIS_KEYS: dict[str, str] = {"rpm_axis": "table_rpm_axis", "map_axis": "table_map_axis"}

_REGION_FIELDS: dict[str, str] = {
    "idle": "ve_delta_idle",
    "cruise": "ve_delta_cruise",
    "midrange": "ve_delta_midrange",
    "wot": "ve_delta_wot",
}


def _regions() -> dict[str, tuple[float, float, float, float]]:
    # One definition of the regions for the whole project: the pattern code's.
    return dict(REGIONS)


def _ratios(
    initial: Sequence[Sequence[float]] | None, final: Sequence[Sequence[float]] | None
) -> list[list[float | None]] | None:
    if initial is None or final is None:
        return None
    return [
        [f / i if i > 0 else None for i, f in zip(irow, frow, strict=True)]
        for irow, frow in zip(initial, final, strict=True)
    ]


def ve_scaling_from_tables(
    session: TuningSession,
    *,
    rpm_axis: Sequence[float] | None = None,
    map_axis: Sequence[float] | None = None,
) -> VEScalingPattern | None:
    """Derive the table-only VEScalingPattern of a session (see the module docstring).

    Region means are of ``(final / initial - 1) x 100`` over every cell whose breakpoints
    fall in the region (inclusive), pooling front and rear; a region without a cell is
    None. ``front_rear_ve_difference_pct`` is the mean of ``(front ratio - rear ratio) x
    100`` over cells with both ratios. Cells whose initial VE is 0 are skipped.

    Args:
        session: the session; its ``table_rpm_axis`` / ``table_map_axis`` win over the
            arguments, which default to the project's default axes.
        rpm_axis: breakpoints of the table rows.
        map_axis: breakpoints of the table columns.

    Returns:
        The pattern, or None when no cylinder has both tables.

    Raises:
        InputError: the tables' shape does not match the axes.
    """
    front = _ratios(session.initial_ve_table_front, session.final_ve_table_front)
    rear = _ratios(session.initial_ve_table_rear, session.final_ve_table_rear)
    if front is None and rear is None:
        return None
    rpm = list(session.table_rpm_axis or rpm_axis or DEFAULT_RPM_AXIS)
    kpa = list(session.table_map_axis or map_axis or DEFAULT_MAP_AXIS)
    for name, ratios in (("front", front), ("rear", rear)):
        if ratios is not None and (len(ratios), len(ratios[0])) != (len(rpm), len(kpa)):
            raise InputError(
                f"session {session.session_id}: {name} VE tables are "
                f"{len(ratios)}x{len(ratios[0])} but the axes are {len(rpm)}x{len(kpa)}; "
                "give rpm_axis/map_axis with the tables"
            )
    cyls = [r for r in (front, rear) if r is not None]
    means: dict[str, float | None] = {}
    for region, (r0, r1, k0, k1) in _regions().items():
        vals = [
            (ratio - 1.0) * 100.0
            for cyl in cyls
            for i, r in enumerate(rpm)
            for j, k in enumerate(kpa)
            if r0 <= r <= r1 and k0 <= k <= k1 and (ratio := cyl[i][j]) is not None
        ]
        means[region] = round(sum(vals) / len(vals), 4) if vals else None
    diff: float | None = None
    if front is not None and rear is not None:
        pairs = [
            (fv - rv) * 100.0
            for frow, rrow in zip(front, rear, strict=True)
            for fv, rv in zip(frow, rrow, strict=True)
            if fv is not None and rv is not None
        ]
        diff = round(sum(pairs) / len(pairs), 4) if pairs else None
    b = session.build_config
    cam = b.cam_spec if b is not None else None
    return VEScalingPattern(
        session_id=session.session_id,
        engine_family=b.engine_family if b else None,
        stage=b.stage if b else None,
        cam_overlap_category=cam.overlap_category if cam else None,
        displacement_ci=b.displacement_ci if b else None,
        front_rear_ve_difference_pct=diff,
        sessions_observed=1,
        source="tables",
        **{_REGION_FIELDS[k]: v for k, v in means.items()},
    )


class TrainingDataCollector:
    """Collects sessions and their patterns into a TrainingDataset (seed Usage Workflow).

    Args:
        dataset_id: id of the new dataset.
        version: dataset version string.
        rpm_axis: default row breakpoints of VE tables for the table-only fallback.
        map_axis: default column breakpoints of VE tables for the table-only fallback.
        dataset: start from an existing dataset instead of a new one.
    """

    def __init__(
        self,
        dataset_id: str = "dynoai",
        *,
        version: str = "1.0",
        rpm_axis: Sequence[float] | None = None,
        map_axis: Sequence[float] | None = None,
        dataset: TrainingDataset | None = None,
    ) -> None:
        self.dataset = (
            dataset
            if dataset is not None
            else TrainingDataset(dataset_id=dataset_id, version=version)
        )
        self.rpm_axis = tuple(rpm_axis) if rpm_axis is not None else DEFAULT_RPM_AXIS
        self.map_axis = tuple(map_axis) if map_axis is not None else DEFAULT_MAP_AXIS
        #: (session_id, reason) of sessions whose patterns could not be extracted
        self.skipped: list[tuple[str, str]] = []

    @classmethod
    def from_dataset(cls, dataset: TrainingDataset) -> TrainingDataCollector:
        """Return a collector that continues ``dataset``."""
        return cls(dataset.dataset_id, version=dataset.version, dataset=dataset)

    def create_session_from_run(
        self,
        run_id: str,
        build_config: BuildConfiguration | None = None,
        objective: TuningObjective | str = TuningObjective.VE_OPTIMIZATION,
        conditions: EnvironmentalConditions | None = None,
        dyno_metadata: DynoSessionMetadata | None = None,
        initial_tables: Mapping[str, Any] | None = None,
        final_tables: Mapping[str, Any] | None = None,
        results: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> TuningSession:
        """Build a TuningSession from a completed dyno run (not yet added to the dataset).

        Args:
            run_id: becomes ``session_id``; must be safe as a file name.
            build_config: the engine build (None when not known yet).
            objective: the session objective.
            conditions: ambient conditions; with them, missing ``peak_hp_corrected`` /
                ``peak_torque_corrected`` are computed from the observed peaks.
            dyno_metadata: the dyno.
            initial_tables: ``{"ve_front", "ve_rear", "spark_front", "spark_rear"}`` tables
                ``[rpm][map]`` before tuning, optionally with ``rpm_axis`` / ``map_axis``.
            final_tables: the same after tuning.
            results: outcome fields of the session (:data:`RESULT_FIELDS`).
            extra: any other TuningSession field (tuner_id, timestamp_utc, notes, run,
                grid, patterns, ...).

        Returns:
            The validated session.

        Raises:
            InputError: an unknown key, or a value out of range; names the field.
        """
        fields: dict[str, Any] = {
            "session_id": run_id,
            "build_config": build_config,
            "objective": objective,
            "conditions": conditions,
            "dyno_metadata": dyno_metadata,
        }
        for label, tables in (("initial", initial_tables), ("final", final_tables)):
            for key, value in (tables or {}).items():
                if key in TABLE_KEYS:
                    fields[f"{label}_{TABLE_KEYS[key]}"] = value
                elif key in AXIS_KEYS:
                    name = AXIS_KEYS[key]
                    if name in fields and list(fields[name]) != list(value):
                        raise InputError(f"run {run_id}: {key} of initial and final tables differ")
                    fields[name] = value
                else:
                    allowed = sorted([*TABLE_KEYS, *AXIS_KEYS])
                    raise InputError(
                        f"run {run_id}: unknown {label}_tables key {key!r} (expected {allowed})"
                    )
        for key, value in (results or {}).items():
            if key not in RESULT_FIELDS:
                raise InputError(
                    f"run {run_id}: unknown results key {key!r} (expected {sorted(RESULT_FIELDS)})"
                )
            fields[key] = value
        for key, value in extra.items():
            if key in fields or key == "session_id":
                raise InputError(f"run {run_id}: {key!r} given twice")
            fields[key] = value
        try:
            session = TuningSession(**fields)
        except ValidationError as exc:
            raise InputError(f"run {run_id}: {format_errors(exc)}") from exc
        if session.conditions is not None:
            cf = session.conditions.correction_factor()
            update: dict[str, float] = {}
            if session.peak_hp is not None and session.peak_hp_corrected is None:
                update["peak_hp_corrected"] = round(session.peak_hp * cf, 2)
            if session.peak_torque is not None and session.peak_torque_corrected is None:
                update["peak_torque_corrected"] = round(session.peak_torque * cf, 2)
            for k, v in update.items():
                setattr(session, k, v)
        return session

    def add_session(self, session: TuningSession) -> None:
        """Add a session to the dataset (replacing one with the same id)."""
        self.dataset.add_session(session)

    def patterns_for(self, session: TuningSession) -> SessionPatterns:
        """Return the patterns to learn from a session.

        The session's own ``patterns`` when it has any (or has a grid, i.e. came from the
        core, which then found nothing); else the table-only VE fallback when the session
        has initial and final VE tables; else nothing.

        Raises:
            InputError: the tables do not match the axes.
        """
        if not session.patterns.is_empty() or session.grid is not None:
            return session.patterns
        ve = ve_scaling_from_tables(session, rpm_axis=self.rpm_axis, map_axis=self.map_axis)
        return SessionPatterns(ve_scaling=[ve] if ve is not None else [])

    def extract_session_patterns(self, session: TuningSession) -> dict[str, int]:
        """Add one session's patterns to the dataset lists (once per session id).

        Returns:
            ``{kind: number added}``; a session whose tables do not fit the axes adds
            nothing and is recorded in :attr:`skipped`.
        """
        try:
            patterns = self.patterns_for(session)
        except InputError as exc:
            self.skipped.append((session.session_id, str(exc)))
            return dict.fromkeys(PATTERN_KINDS, 0)
        return self.dataset.add_patterns(session.session_id, patterns)

    def extract_all_patterns(self) -> dict[str, int]:
        """Add the patterns of every session to the dataset (idempotent).

        Returns:
            ``{kind: number of patterns added by this call}``.
        """
        total = dict.fromkeys(PATTERN_KINDS, 0)
        for session in self.dataset.sessions:
            for kind, n in self.extract_session_patterns(session).items():
                total[kind] += n
        return total


__all__ = [
    "AXIS_KEYS",
    "RESULT_FIELDS",
    "TABLE_KEYS",
    "TrainingDataCollector",
    "ve_scaling_from_tables",
]

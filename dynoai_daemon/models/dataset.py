"""TrainingDataset: every session and every extracted pattern, aggregated for model training.

Statistics are computed from the content, never stored. This module only converts to and
from JSON text; reading and writing files is the store's job
(:func:`dynoai_daemon.store.files.save_dataset` / ``load_dataset``).
"""

from __future__ import annotations

import json
from typing import Any, Self

from pydantic import Field, ValidationError, model_validator

from dynoai_daemon.errors import InputError
from dynoai_daemon.models._base import UtcTime, _Model, _utc_now, format_errors
from dynoai_daemon.models.enums import PATTERN_KINDS
from dynoai_daemon.models.patterns import (
    AnyPattern,
    CylinderImbalancePattern,
    DecelPoppingPattern,
    HeatSoakPattern,
    KnockTimingPattern,
    SessionPatterns,
    VEScalingPattern,
)
from dynoai_daemon.models.session import TuningSession

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

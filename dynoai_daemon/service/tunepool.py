"""The tuner's loop, live: every run of the current build pooled into one correction.

tuning.md ("Tuning sessions"): the cell statistics of every run of the same build, on the
same base table, are pooled into a cumulative correction (the math is
:func:`~dynoai_daemon.patterns.pooled.pool_sessions`). A new pool starts when
``build/set`` brings another build, when the base tune changes, or on the operator's
``tune/reset``. The pool's membership (build, base tune, session ids) is kept in
``<data_dir>/tune/pool.json`` (written atomically), so a restarted daemon continues the
same pool from the stored sessions. The correction is published retained on
``dynoai/<S>/tune/current``.

When the base tune is known, each new session records the base VE tables
(``initial_ve_table_*``) and the tables corrected by the pool including that session
(``final_ve_table_*``), on the tune's own axes (``table_rpm_axis`` / ``table_map_axis``;
MAP-based tables only: an alpha-N table has no MAP axis, and breakpoints a tune pads with
repeats are recorded once).

The pooling itself is CPU work over every pooled session: callers run :meth:`payload`
in an executor. Sessions are cached in memory while they are in the pool (a pool is a
build's pulls: tens of sessions, not thousands).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from dynoai_daemon.config import TuningConfig
from dynoai_daemon.errors import InputError
from dynoai_daemon.models import BuildConfiguration, TuningSession, build_id
from dynoai_daemon.patterns.cells import to_nested
from dynoai_daemon.patterns.pooled import CylinderPool, has_statistics, pool_sessions
from dynoai_daemon.store.files import SessionStore, atomic_write_text
from dynoai_daemon.tune import load_tune
from dynoai_daemon.tune.apply import apply_correction
from dynoai_daemon.tune.model import TuneFormatError, TuneTable, TuneTables

log = structlog.get_logger("dynoai.tune")

#: most sessions one pool keeps (oldest leave first): a build's pulls, with room
MAX_POOL = 200


def build_key(build: BuildConfiguration | None) -> str:
    """The pool's build identity: the project's build id, ``"none"`` without a build."""
    return "none" if build is None else build_id(build)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TunePool:
    """The pool of the current build.

    Args:
        data_dir: where ``tune/pool.json`` lives.
        tuning: the criterion's limits (min weight, CI, clamp).
        store: the session store the pooled sessions are read back from.
    """

    def __init__(self, data_dir: str | Path, tuning: TuningConfig, store: SessionStore) -> None:
        self.path = Path(data_dir) / "tune" / "pool.json"
        self.tuning = tuning
        self.store = store
        self.build_id = "none"
        self.base_tune: str | None = None
        self.session_ids: list[str] = []
        self.started_utc = _now()
        self.reason = "start"
        self._cache: dict[str, TuningSession] = {}
        self._lock = threading.Lock()
        self._base: tuple[str, TuneTables | None] | None = None

    # ------------------------------------------------------------------ state

    def load(self) -> None:
        """Continue the pool stored in ``tune/pool.json``; a missing or bad file starts
        an empty pool (a bad file is logged, never fatal)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            ids = [str(x) for x in data["session_ids"]]
            self.build_id = str(data.get("build_id", "none"))
            base = data.get("base_tune")
            self.base_tune = str(base) if base else None
            self.started_utc = str(data.get("started_utc", self.started_utc))
            self.reason = str(data.get("reason", "restored"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("tune pool file unreadable, starting a new pool", path=str(self.path),
                        error=str(exc))  # fmt: skip
            return
        self.session_ids = ids[-MAX_POOL:]

    def _save(self) -> None:
        body = {
            "build_id": self.build_id,
            "base_tune": self.base_tune,
            "started_utc": self.started_utc,
            "reason": self.reason,
            "session_ids": self.session_ids,
        }
        try:
            atomic_write_text(self.path, json.dumps(body, indent=1))
        except Exception as exc:  # a full disk must not stop the loop; memory keeps it
            log.warning("tune pool not saved", path=str(self.path), error=str(exc))

    def reset(self, reason: str, *, build_id: str | None = None, base_tune: str | None = None,
              keep_base: bool = True) -> None:  # fmt: skip
        """Start a new, empty pool (``reason`` is published with it)."""
        with self._lock:
            if build_id is not None:
                self.build_id = build_id
            if not keep_base:
                self.base_tune = base_tune
            self.session_ids = []
            self._cache.clear()
            self.started_utc = _now()
            self.reason = reason
            self._save()
        log.info("tune pool reset", reason=reason, build=self.build_id, base_tune=self.base_tune)

    def set_build(self, build: BuildConfiguration | None) -> bool:
        """Adopt the build of new sessions; another build starts a new pool.

        Returns:
            True when a new pool was started.
        """
        key = build_key(build)
        if key == self.build_id:
            return False
        first = self.build_id == "none" and not self.session_ids
        self.reset("start" if first else "build changed", build_id=key)
        return True

    def set_base_tune(self, base_tune: str | None) -> bool:
        """Adopt a base tune; another base table starts a new pool.

        Returns:
            True when a new pool was started.
        """
        if base_tune == self.base_tune:
            return False
        self.reset("base tune changed", base_tune=base_tune, keep_base=False)
        return True

    def add(self, session: TuningSession) -> bool:
        """Pool a stored session of the current build.

        Aborted runs, sessions without cell statistics and sessions of another build
        are not pooled.

        Returns:
            True when the session joined the pool.
        """
        if session.aborted or not has_statistics(session):
            return False
        if build_key(session.build_config) != self.build_id:
            return False
        with self._lock:
            if session.session_id in self.session_ids:
                return False
            self.session_ids.append(session.session_id)
            self._cache[session.session_id] = session
            while len(self.session_ids) > MAX_POOL:
                self._cache.pop(self.session_ids.pop(0), None)
            self._save()
        return True

    # ------------------------------------------------------------------ tables

    def _base_tables(self) -> TuneTables | None:
        """The base tune's tables, read once per base file (None when unknown/unreadable)."""
        if self.base_tune is None:
            return None
        if self._base is None or self._base[0] != self.base_tune:
            try:
                tables: TuneTables | None = load_tune(self.base_tune)
            except TuneFormatError as exc:
                log.warning("base tune unreadable: sessions carry no VE tables",
                            tune=self.base_tune, error=str(exc))  # fmt: skip
                tables = None
            self._base = (self.base_tune, tables)
        return self._base[1]

    def attach_tables(self, session: TuningSession) -> bool:
        """Record the base and corrected VE tables on a new session (before storing it).

        The corrected tables are the base corrected by the pool with this session in it.

        Returns:
            True when tables were recorded.
        """
        base = self._base_tables()
        if base is None or not has_statistics(session):
            return False
        front, rear = base.get("ve_front"), base.get("ve_rear")
        if front is None or front.load_unit != "kPa":
            return False
        rear = rear if rear is not None and rear.load_unit == "kPa" else front
        if front.shape != rear.shape or not (
            np.array_equal(front.rpm_axis, rear.rpm_axis)
            and np.array_equal(front.load_axis, rear.load_axis)
        ):
            return False
        with self._lock:
            sessions, _ = self._sessions()
        same_build = build_key(session.build_config) == self.build_id
        pooled = pool_sessions([*sessions, session] if same_build else [session], self.tuning)
        result = apply_correction(base, pooled, self.tuning)
        rows, cols = _unique(front.rpm_axis), _unique(front.load_axis)

        def pick(t: TuneTable | None) -> list[list[float]]:
            vals = (t or front).values[np.ix_(rows, cols)]
            return [[float(v) for v in row] for row in vals]

        corrected = result.tune
        session.table_rpm_axis = [float(front.rpm_axis[i]) for i in rows]
        session.table_map_axis = [float(front.load_axis[j]) for j in cols]
        session.initial_ve_table_front = pick(front)
        session.initial_ve_table_rear = pick(rear)
        session.final_ve_table_front = pick(corrected.get("ve_front"))
        session.final_ve_table_rear = pick(corrected.get("ve_rear") or corrected.get("ve_front"))
        return True

    # ------------------------------------------------------------------ payload

    def _sessions(self) -> tuple[list[TuningSession], list[str]]:
        out: list[TuningSession] = []
        missing: list[str] = []
        for sid in list(self.session_ids):
            s = self._cache.get(sid)
            if s is None:
                try:
                    s = self.store.load_session(sid)
                except (InputError, OSError) as exc:
                    log.warning("pooled session unreadable", session=sid, error=str(exc))
                    missing.append(sid)
                    continue
                self._cache[sid] = s
            out.append(s)
        return out, missing

    def payload(self) -> dict[str, Any]:
        """The retained ``tune/current`` body (CPU work: call it in an executor).

        Keys: build_id, base_tune, started_utc, reason, runs, session_ids, ts, and when
        the pool has runs: rpm_axis, map_axis and per cylinder (``front``, ``rear``)
        ``ve_correction_pct``, ``ve_correction_ci_pct``, ``weight``, ``clamped``,
        ``cells_with_suggestion``, ``ci_pct_median``.
        """
        with self._lock:
            sessions, missing = self._sessions()
            body: dict[str, Any] = {
                "build_id": self.build_id,
                "base_tune": self.base_tune,
                "started_utc": self.started_utc,
                "reason": self.reason,
                "runs": 0,
                "session_ids": [],
                "ts": _now(),
            }
            if missing:
                body["missing_sessions"] = missing
            if not sessions:
                return body
            pooled = pool_sessions(sessions, self.tuning)
        body["runs"] = pooled.runs
        body["session_ids"] = pooled.session_ids
        body["rpm_axis"] = pooled.rpm_axis.tolist()
        body["map_axis"] = pooled.map_axis.tolist()
        for name in ("front", "rear"):
            body[name] = _cylinder_body(pooled.cylinder(name))
        return body


def _unique(axis: np.ndarray[Any, Any]) -> list[int]:
    """Indexes of an ascending axis' first occurrences (tunes pad with repeats)."""
    return [i for i in range(len(axis)) if i == 0 or axis[i] > axis[i - 1]]


def _cylinder_body(c: CylinderPool) -> dict[str, Any]:
    ci = c.ci_pct[c.sound]
    return {
        "ve_correction_pct": to_nested(np.where(c.sound, c.pct, np.nan), digits=3),
        "ve_correction_ci_pct": to_nested(np.where(c.sound, c.ci_pct, np.nan), digits=3),
        "weight": np.round(c.weight, 3).tolist(),
        "clamped": c.clamped.tolist(),
        "cells_with_suggestion": int(np.count_nonzero(c.sound)),
        "ci_pct_median": round(float(np.median(ci)), 3) if ci.size else None,
    }


__all__ = ["MAX_POOL", "TunePool", "build_key"]

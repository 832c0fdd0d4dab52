"""What a report is made of: sessions resolved from the command line, their raw runs.

:func:`resolve` turns each ``SESSION_OR_RUN`` argument into session files: a session JSON
path, a session or run id (``<data_dir>/sessions/<id>.json``, or the session whose
``run.run_id`` it is), or a data directory (every session in it). :func:`load` reads one
session (as plain JSON, so fields added by newer daemons such as
``grid.<cyl>.ve_correction_ci_pct`` / ``clamped`` are kept, and their absence is fine)
and its raw run ``raw/<run_id>.csv`` through the project's canonical log reader, forward
filled onto one time axis (the recorder writes each sample on its own row). It also
replays the raw run through the core and the alert engine with the station's settings, to
list the alerts the run raised (alerts are published, not stored). Every bad input raises
:class:`~dynoai_daemon.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynoai_daemon.alerts import AlertEngine
from dynoai_daemon.channels import Frame
from dynoai_daemon.config import Settings
from dynoai_daemon.core import Core
from dynoai_daemon.errors import DynoError, InputError
from dynoai_daemon.logs import read_log
from dynoai_daemon.models import EnvironmentalConditions

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
REPLAY_BATCH_S = 0.1


@dataclass
class ReportRun:
    """One session and what goes with it."""

    path: Path
    session: dict[str, Any]
    raw_path: Path | None = None
    raw: dict[str, FloatArray] | None = None
    raw_note: str = ""
    alerts: list[dict[str, Any]] = field(default_factory=list)
    alerts_note: str = ""

    @property
    def session_id(self) -> str:
        """The session id."""
        return str(self.session.get("session_id"))

    @property
    def run_id(self) -> str:
        """The run id (the session id when the session has no run block)."""
        run = self.session.get("run") or {}
        return str(run.get("run_id") or self.session_id)

    @property
    def label(self) -> str:
        """Legend label: the run id and its time."""
        ts = str(self.session.get("timestamp_utc") or "")
        return f"{self.run_id} ({ts.replace('T', ' ').rstrip('Z')})" if ts else self.run_id

    def conditions(self) -> EnvironmentalConditions | None:
        """The session's weather, when it carries valid conditions."""
        c = self.session.get("conditions")
        if not isinstance(c, dict):
            return None
        try:
            return EnvironmentalConditions.model_validate(c)
        except ValueError:
            return None

    def column(self, name: str) -> FloatArray | None:
        """A forward-filled raw channel, or None when the run did not record it."""
        if self.raw is None:
            return None
        return self.raw.get(name)


def _is_session(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("session_id"), str)
        and (isinstance(data.get("grid"), dict) or isinstance(data.get("run"), dict))
    )


def _sessions_in(directory: Path) -> list[Path]:
    sessions = directory / "sessions" if (directory / "sessions").is_dir() else directory
    return sorted(p for p in sessions.glob("*.json") if not p.name.startswith("."))


def resolve(items: list[str], data_dir: Path) -> list[Path]:
    """Session files for the command line's ``SESSION_OR_RUN`` arguments, in order.

    Raises:
        InputError: an argument names nothing, or a directory without sessions.
    """
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = _sessions_in(p)
            if not found:
                raise InputError(f"no session JSON files in directory, {p}", path=str(p))
            out.extend(found)
            continue
        if p.is_file():
            out.append(p)
            continue
        if "/" in item or item.endswith(".json"):
            raise InputError(f"no such file, {item}", path=item)
        direct = data_dir / "sessions" / f"{item}.json"
        if direct.is_file():
            out.append(direct)
            continue
        match = None
        for cand in _sessions_in(data_dir):
            try:
                data = json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and (data.get("run") or {}).get("run_id") == item:
                match = cand
                break
        if match is None:
            raise InputError(
                f"no session or run {item!r}, {data_dir / 'sessions'}", path=str(data_dir)
            )
        out.append(match)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_session(path: Path) -> dict[str, Any]:
    """Read one session JSON.

    Raises:
        InputError: unreadable, not JSON, or not a session.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {exc.strerror or exc}, {path}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not a session JSON (not UTF-8 text), {path}", path=str(path)) from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise InputError(f"not a session JSON ({exc}), {path}", path=str(path), line=line) from exc
    if not _is_session(data):
        raise InputError(
            f"not a session (needs session_id and grid or run), {path}", path=str(path)
        )
    return data  # type: ignore[no-any-return]


def _ffill(col: FloatArray) -> FloatArray:
    ok = ~np.isnan(col)
    if ok.all() or not ok.any():
        return col
    idx = np.where(ok, np.arange(col.size), 0)
    np.maximum.accumulate(idx, out=idx)
    out = col[idx]
    first = int(np.argmax(ok))
    out[:first] = np.nan
    return out


def read_raw(path: Path, stoich: float) -> dict[str, FloatArray]:
    """A raw run CSV as forward-filled columns plus ``time_s``.

    Raises:
        InputError / DynoError: the log reader's errors (file and line).
    """
    ts: list[FloatArray] = []
    cols: dict[str, list[FloatArray]] = {}
    n = 0
    for frame in read_log(path, format="canonical", stoich=stoich):
        m = len(frame)
        if not m:
            continue
        ts.append(np.asarray(frame.t, dtype=float))
        for name in set(cols) | set(frame.columns):
            prev = cols.setdefault(name, [np.full(n, np.nan)] if n else [])
            col = frame.columns.get(name)
            prev.append(np.asarray(col, dtype=float) if col is not None else np.full(m, np.nan))
        n += m
    out: dict[str, FloatArray] = {"time_s": np.concatenate(ts) if ts else np.zeros(0)}
    for name, parts in cols.items():
        out[name] = _ffill(np.concatenate(parts))
    return out


def replay_alerts(raw: dict[str, FloatArray], settings: Settings) -> list[dict[str, Any]]:
    """The alerts the run raised: the raw run through the core and the alert engine.

    Fed with the station's thresholds in batches of ``REPLAY_BATCH_S`` (the alert engine
    works on sample times, so the list matches what the daemon's 20 ms micro-batches
    raised: identical on the simulator's runs, at a quarter of the CPU), so it is what a
    live subscriber got (source-stale alerts excepted: they come from drivers).
    """
    t = raw["time_s"]
    if t.size == 0:
        return []
    core = Core(grid=settings.grid, tuning=settings.tuning, station=settings.station)
    engine = AlertEngine(settings.alerts, station=settings.station)
    cols = {k: v for k, v in raw.items() if k != "time_s"}
    frame = Frame.from_columns(t, cols)
    step = max(settings.batch_ms / 1000.0, REPLAY_BATCH_S)
    edges = np.searchsorted(t, np.arange(t[0], t[-1] + step, step), side="left").tolist()
    edges.append(t.size)
    out: list[dict[str, Any]] = []
    lo = 0
    for hi in edges[1:]:
        if hi <= lo:
            continue
        res = core.feed(frame.slice(lo, hi))
        out.extend(a.payload() for a in engine.evaluate(res, core))
        lo = hi
    return out


def load(path: Path, settings: Settings, data_dir: Path | None = None) -> ReportRun:
    """One session with its raw run and alerts (what is missing is said in the notes).

    Raises:
        InputError: the session file is not a session.
    """
    run = ReportRun(path=path, session=read_session(path))
    roots = []
    if path.parent.name == "sessions":
        roots.append(path.parent.parent)
    if data_dir is not None:
        roots.append(data_dir)
    for root in roots:
        cand = root / "raw" / f"{run.run_id}.csv"
        if cand.is_file():
            run.raw_path = cand
            break
    if run.raw_path is None:
        run.raw_note = f"raw run {run.run_id}.csv not found: curves from the session only"
        run.alerts_note = "alerts not available without the raw run"
        return run
    try:
        run.raw = read_raw(run.raw_path, settings.tuning.stoich_afr)
    except DynoError as exc:
        run.raw_note = f"raw run unreadable ({exc}): curves from the session only"
        run.alerts_note = "alerts not available without the raw run"
        return run
    try:
        run.alerts = replay_alerts(run.raw, settings)
        run.alerts_note = (
            "replayed from the raw run through the alert engine, with this config's limits"
        )
    except (DynoError, ValueError) as exc:
        run.alerts_note = f"alerts could not be replayed: {exc}"
    return run


def finite(v: Any) -> float | None:
    """A float, or None for null / NaN / non-numbers."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None

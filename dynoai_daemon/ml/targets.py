"""Training tables per pattern kind, from session dicts (the contract's session JSON).

Sessions come as an iterable of dicts (``sessions/*.json`` of a data directory, a
dataset's ``sessions``, or any streaming reader), so a database reader can feed the same
code. A session without ``build_config`` teaches nothing and is counted as skipped. Each
kind's table holds feature rows (:mod:`dynoai_daemon.ml.features`), targets, the build id
of each row (the CV group) and the family (the baseline's key); targets as the seed names
them:

* ``ve_scaling``: ``ve_delta_idle/_cruise/_midrange/_wot`` of the session's VE-scaling
  pattern (rows with any region null are left out); ``ve_cells``: every cell's
  ``ve_correction_pct`` per cylinder (long format: rpm, kPa, cylinder are inputs);
* ``cylinder_imbalance``: per cell where both cylinders qualified, ``afr_delta`` = rear
  AFR - front AFR (the seed's sign: positive = rear leaner);
* ``decel_popping``: ``pops`` (the session has a decel-popping pattern, 0/1) and, for
  all sessions, ``pop_severity`` and the enrichment of the four bands (0 without pops);
* ``heat_soak``: ``ve_inflation_pct`` of sessions with a heat-soak pattern;
* ``knock_timing``: ``safe_advance_<region>`` = minus the largest knock retard (deg) the
  ECU pulled in the region's visited cells, 0 where the region ran knock-free (a
  censored target: knock-free says "at least 0", never how much more is safe).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynoai_daemon.errors import InputError
from dynoai_daemon.ml.features import build_row, day_row
from dynoai_daemon.models import build_id
from dynoai_daemon.patterns.cells import REGIONS
from dynoai_daemon.patterns.decel import BANDS

REGION_NAMES = ("idle", "cruise", "midrange", "wot")
VE_TARGETS = tuple(f"ve_delta_{r}" for r in REGION_NAMES)
DECEL_TARGETS = ("pop_severity", *(f"enrichment_{int(lo)}_{int(hi)}" for lo, hi, _ in BANDS))
KNOCK_TARGETS = tuple(f"safe_advance_{r}" for r in REGION_NAMES)
KINDS = ("ve_scaling", "cylinder_imbalance", "decel_popping", "heat_soak", "knock_timing")


@dataclass
class Table:
    """One model's training table."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    y: list[list[float]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    #: for long-format tables: the position of each row (rpm, kPa, cylinder) for the
    #: baseline's per-family-per-cell mean
    keys: list[tuple[float, float, int]] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)

    def add(
        self,
        row: dict[str, Any],
        y: list[float],
        session: Mapping[str, Any],
        key: tuple[float, float, int] = (0.0, 0.0, 0),
    ) -> None:
        """Append one row."""
        self.rows.append(row)
        self.y.append(y)
        self.groups.append(build_id(session.get("build_config")))
        self.families.append(str(row.get("engine_family", "missing")))
        self.keys.append(key)
        self.sessions.add(str(session.get("session_id")))


@dataclass
class TrainingTables:
    """All tables plus what was skipped."""

    tables: dict[str, Table] = field(default_factory=dict)
    sessions: int = 0
    skipped_no_build: int = 0
    session_ids: list[str] = field(default_factory=list)

    def table(self, name: str) -> Table:
        """The table called ``name`` (created empty)."""
        return self.tables.setdefault(name, Table())


def _f(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def _first(patterns: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    items = patterns.get(kind) or []
    return items[0] if items and isinstance(items[0], Mapping) else None


def _cell_regions(rpm_axis: list[float], map_axis: list[float]) -> dict[str, set[tuple[int, int]]]:
    out: dict[str, set[tuple[int, int]]] = {}
    for name, (r0, r1, k0, k1) in REGIONS.items():
        out[name] = {
            (i, j)
            for i, r in enumerate(rpm_axis)
            for j, k in enumerate(map_axis)
            if r0 <= r <= r1 and k0 <= k <= k1
        }
    return out


def add_session(tt: TrainingTables, s: Mapping[str, Any]) -> None:
    """Add one session's rows to every table it can teach."""
    tt.sessions += 1
    build = s.get("build_config")
    if not isinstance(build, Mapping):
        tt.skipped_no_build += 1
        return
    tt.session_ids.append(str(s.get("session_id")))
    b = build_row(build)
    day = day_row(s.get("conditions"), s.get("iat_peak_f"))
    patterns: Mapping[str, Any] = s.get("patterns") or {}
    ve = _first(patterns, "ve_scaling")
    if ve is not None:
        vals = [_f(ve.get(t)) for t in VE_TARGETS]
        if all(v is not None for v in vals):
            tt.table("ve_scaling").add({**b, **day}, [float(v or 0) for v in vals], s)
    grid = s.get("grid")
    if isinstance(grid, Mapping):
        _grid_rows(tt, s, b, day, grid)
    dec = _first(patterns, "decel_popping")
    y = [0.0] * len(DECEL_TARGETS)
    if dec is not None:
        y[0] = float(_f(dec.get("pop_severity")) or 0.0)
        for z in dec.get("enrichment_zones") or []:
            for k, (lo, hi, _) in enumerate(BANDS):
                if abs(float(z[0]) - lo) < 1 and abs(float(z[1]) - hi) < 1:
                    y[1 + k] = 100.0 * float(z[4])
    tt.table("decel_popping").add(dict(b), [1.0 if dec is not None else 0.0, *y], s)
    heat = _first(patterns, "heat_soak")
    if heat is not None and _f(heat.get("ve_inflation_pct")) is not None:
        row = {
            **b,
            **day,
            "ambient_temp_f": _f(heat.get("ambient_temp_f")) or day["ambient_temp_f"],
            "iat_peak_f": _f(heat.get("iat_peak_f")) or day["iat_peak_f"],
            "airflow_cfm": _f(heat.get("airflow_cfm")),
            "iat_initial_f": _f(heat.get("iat_initial_f")),
            "iat_soak_time_min": _f(heat.get("iat_soak_time_min")),
        }
        tt.table("heat_soak").add(row, [float(_f(heat.get("ve_inflation_pct")) or 0.0)], s)


def _grid_rows(
    tt: TrainingTables,
    s: Mapping[str, Any],
    b: dict[str, Any],
    day: dict[str, Any],
    grid: Mapping[str, Any],
) -> None:
    ra = [float(x) for x in grid.get("rpm_axis") or []]
    ma = [float(x) for x in grid.get("map_axis") or []]
    front, rear = grid.get("front") or {}, grid.get("rear") or {}
    if not ra or not ma:
        return
    cells = tt.table("ve_cells")
    imb = tt.table("cylinder_imbalance")
    corr = [front.get("ve_correction_pct") or [], rear.get("ve_correction_pct") or []]
    afr = [front.get("afr_mean") or [], rear.get("afr_mean") or []]
    for i, r in enumerate(ra):
        for j, k in enumerate(ma):
            both = True
            for c in (0, 1):
                v = _f(corr[c][i][j]) if i < len(corr[c]) and j < len(corr[c][i]) else None
                if v is None:
                    both = False
                    continue
                cells.add({**b, **day, "rpm": r, "map_kpa": k, "rear": float(c)}, [v], s, (r, k, c))
            if both:
                af, ar = _f(afr[0][i][j]), _f(afr[1][i][j])
                if af is not None and ar is not None:
                    imb.add({**b, "rpm": r, "map_kpa": k}, [ar - af], s, (r, k, 0))
    # Knock: safe advance per region from the ECU's knock retard in visited cells.
    regions = _cell_regions(ra, ma)
    wts = [front.get("weight") or [], rear.get("weight") or []]
    kmax = [front.get("knock_max_deg") or [], rear.get("knock_max_deg") or []]
    out: list[float] = []
    for name in REGION_NAMES:
        seen = False
        worst = 0.0
        for i, j in regions[name]:
            for c in (0, 1):
                try:
                    w = float(wts[c][i][j])
                    kr = float(kmax[c][i][j])
                except (IndexError, TypeError, ValueError):
                    continue
                if w > 0:
                    seen = True
                    worst = max(worst, kr)
        if not seen:
            return
        out.append(-worst)
    tt.table("knock_timing").add({**b, **day}, out, s)


def collect(sessions: Iterable[Mapping[str, Any]]) -> TrainingTables:
    """Training tables from an iterable of session dicts."""
    tt = TrainingTables()
    for s in sessions:
        add_session(tt, s)
    return tt


def iter_session_files(data_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Session dicts of ``<data_dir>/sessions/*.json`` in name order.

    Raises:
        InputError: the folder is missing, or a file is not a JSON object (names it).
    """
    folder = Path(data_dir) / "sessions"
    if not folder.is_dir():
        raise InputError(f"no sessions folder, {folder}")
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"session file not readable as JSON: {exc}, {path}") from exc
        if not isinstance(doc, dict):
            raise InputError(f"session file is not a JSON object, {path}")
        yield doc

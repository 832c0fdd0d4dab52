"""Hold the daemon's sessions against a simulation's ground truth.

:func:`compare_sessions` takes the sessions of a simulated test (TuningSession objects or
their JSON dicts) and the truth document of :mod:`simulators.truth` and measures how
right dynoai was: the VE correction error in every cell-cylinder that both the daemon
learned and the truth counts as steadily visited, the imbalance cells found against the
true ones (recall, false cells, and false cells whose true delta is not even near the
threshold), the knock cells, whether decel popping and heat soak were reported.

Heat soak: in the truth's ``heat_soak_cells`` the reference is what the engine really
did while hot, ``ve_ratio * ve_heat_factor`` (the scenario's ECU under-corrects the
density of hot air, so those cells really ran rich: the daemon must measure that, and
flag it with the heat-soak overlay, not hide it); everywhere else the heat-free ratio.
``ve_p95_abs_heat_free`` keeps the error against the heat-free ratio in every cell, so a
report shows how much the soak moved the cells.
:func:`compare_runs` compares two sets of sessions of the same scenario (repeatability).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _as_dict(session: Any) -> dict[str, Any]:
    if isinstance(session, Mapping):
        return dict(session)
    out: dict[str, Any] = session.model_dump(mode="json")
    return out


@dataclass
class Comparison:
    """Accuracy of one simulated test's sessions against the truth."""

    ve_errors: list[float] = field(default_factory=list)
    ve_p95_abs: float | None = None
    ve_cells: int = 0
    #: errors against the heat-free truth ratio in every cell (= ve_errors without soak)
    ve_errors_heat_free: list[float] = field(default_factory=list)
    ve_p95_abs_heat_free: float | None = None
    #: cell-cylinders held against the soak-inclusive reference (truth heat_soak_cells)
    ve_soak_cells: int = 0
    heat_soak_truth: set[tuple[float, float]] = field(default_factory=set)
    #: cells where a session's heat-soak overlay carries a correction
    heat_soak_overlay: set[tuple[float, float]] = field(default_factory=set)
    imbalance_truth: set[tuple[float, float]] = field(default_factory=set)
    imbalance_found: set[tuple[float, float]] = field(default_factory=set)
    imbalance_recall: float | None = None
    #: recall over the true imbalance cells where the daemon learned both cylinders
    imbalance_recall_learned: float | None = None
    learned_both: set[tuple[float, float]] = field(default_factory=set)
    imbalance_false: set[tuple[float, float]] = field(default_factory=set)
    #: false cells whose true |front-rear| delta is below 0.4 AFR (not a borderline cell)
    imbalance_false_clear: set[tuple[float, float]] = field(default_factory=set)
    knock_truth: set[tuple[float, float]] = field(default_factory=set)
    knock_found: set[tuple[float, float]] = field(default_factory=set)
    decel_popping: bool = False
    pop_severity_max: int = 0
    heat_soak: bool = False
    sessions: int = 0

    def summary(self) -> dict[str, Any]:
        """The numbers as a JSON-ready dict."""
        return {
            "sessions": self.sessions,
            "ve_cells": self.ve_cells,
            "ve_p95_abs_pp": None if self.ve_p95_abs is None else round(self.ve_p95_abs, 3),
            "ve_p95_abs_heat_free_pp": None
            if self.ve_p95_abs_heat_free is None
            else round(self.ve_p95_abs_heat_free, 3),
            "ve_soak_cells": self.ve_soak_cells,
            "imbalance_truth": len(self.imbalance_truth),
            "imbalance_found": len(self.imbalance_found),
            "imbalance_recall": self.imbalance_recall,
            "imbalance_recall_learned": self.imbalance_recall_learned,
            "imbalance_false": sorted(self.imbalance_false),
            "imbalance_false_clear": sorted(self.imbalance_false_clear),
            "knock_truth": len(self.knock_truth),
            "knock_found": len(self.knock_found),
            "knock_hit": len(self.knock_truth & self.knock_found),
            "decel_popping": self.decel_popping,
            "pop_severity_max": self.pop_severity_max,
            "heat_soak": self.heat_soak,
            "heat_soak_truth": len(self.heat_soak_truth),
            "heat_soak_overlay": len(self.heat_soak_overlay),
            "heat_soak_overlay_hit": len(self.heat_soak_truth & self.heat_soak_overlay),
        }


def compare_sessions(sessions: Iterable[Any], truth: Mapping[str, Any]) -> Comparison:
    """Compare sessions with a truth document (see module doc).

    Args:
        sessions: TuningSession objects or session JSON dicts.
        truth: :func:`simulators.truth.export_truth` output (or its JSON).
    """
    ra = [float(x) for x in truth["rpm_axis"]]
    ma = [float(x) for x in truth["map_axis"]]
    # A measurement is held to what a perfect bilinear measurement of the same samples
    # finds (the sampled ratio) when the truth has it; the breakpoint ratio otherwise.
    ratio = {
        cyl: np.asarray(
            truth.get(f"ve_ratio_sampled_{cyl}") or truth[f"ve_ratio_{cyl}"], dtype=float
        )
        for cyl in ("front", "rear")
    }
    visited = {(float(a), float(b)) for a, b in truth["visited_cells"]}
    # Older truth files carry no heat-soak reference: every cell is then heat-free.
    heat = np.asarray(truth.get("ve_heat_factor") or np.ones_like(ratio["front"]), dtype=float)
    out = Comparison()
    out.heat_soak_truth = {(float(a), float(b)) for a, b in truth.get("heat_soak_cells", [])}
    out.imbalance_truth = {(float(a), float(b)) for a, b in truth["imbalance_cells"]}
    out.knock_truth = {(float(a), float(b)) for a, b in truth["knock_cells"]}
    for raw in sessions:
        s = _as_dict(raw)
        out.sessions += 1
        grid = s.get("grid")
        if grid:
            sra, sma = grid["rpm_axis"], grid["map_axis"]
            fr, rr = grid["front"]["ve_correction_pct"], grid["rear"]["ve_correction_pct"]
            for i, row in enumerate(fr):
                for j, v in enumerate(row):
                    if v is not None and rr[i][j] is not None:
                        out.learned_both.add((float(sra[i]), float(sma[j])))
            for cyl in ("front", "rear"):
                pct = grid[cyl]["ve_correction_pct"]
                for i, row in enumerate(pct):
                    for j, v in enumerate(row):
                        cell = (float(sra[i]), float(sma[j]))
                        if v is None or cell not in visited or cell[0] not in ra:
                            continue
                        if cell[1] not in ma:
                            continue
                        ti, tj = ra.index(cell[0]), ma.index(cell[1])
                        free = ratio[cyl][ti, tj]
                        out.ve_errors_heat_free.append(float(v) - (free - 1.0) * 100.0)
                        # What the wideband read: hot intake moves every cell it
                        # touched (factor 1 where the intake stayed at its reference).
                        ref = free * heat[ti, tj]
                        if cell in out.heat_soak_truth:
                            out.ve_soak_cells += 1
                        out.ve_errors.append(float(v) - (ref - 1.0) * 100.0)
        else:
            sra, sma = ra, ma
        pats = s.get("patterns") or {}
        for p in pats.get("cylinder_imbalance", []):
            for i, j, _d in p.get("imbalance_cells", []):
                out.imbalance_found.add((float(sra[i]), float(sma[j])))
        for p in pats.get("knock_timing", []):
            for i, j, _n in p.get("knock_cells", []):
                out.knock_found.add((float(sra[i]), float(sma[j])))
        for p in pats.get("decel_popping", []):
            sev = p.get("pop_severity") or 0
            if (p.get("popping_events") or 0) > 0 or sev > 0:
                out.decel_popping = True
            out.pop_severity_max = max(out.pop_severity_max, int(sev))
        if pats.get("heat_soak"):
            out.heat_soak = True
        for p in pats.get("heat_soak", []):
            for i, row in enumerate(p.get("heat_correction_overlay") or []):
                for j, v in enumerate(row):
                    if v is not None:
                        out.heat_soak_overlay.add((float(sra[i]), float(sma[j])))
    out.ve_cells = len(out.ve_errors)
    if out.ve_errors:
        out.ve_p95_abs = float(np.percentile(np.abs(out.ve_errors), 95))
        out.ve_p95_abs_heat_free = float(np.percentile(np.abs(out.ve_errors_heat_free), 95))
    if out.imbalance_truth:
        out.imbalance_recall = len(out.imbalance_truth & out.imbalance_found) / len(
            out.imbalance_truth
        )
        seen = out.imbalance_truth & out.learned_both
        if seen:
            out.imbalance_recall_learned = len(seen & out.imbalance_found) / len(seen)
    out.imbalance_false = out.imbalance_found - out.imbalance_truth
    for cell in out.imbalance_false:
        if cell[0] in ra and cell[1] in ma:
            i, j = ra.index(cell[0]), ma.index(cell[1])
            # AFR delta of the true cylinders at this cell, from the VE ratios: the truth's
            # threshold is 0.5 AFR; below 0.4 the daemon's call cannot be noise at the edge.
            d = abs(ratio["rear"][i, j] - ratio["front"][i, j]) * 13.5
            if d < 0.4:
                out.imbalance_false_clear.add(cell)
    return out


def session_cells(sessions: Iterable[Any]) -> dict[tuple[str, float, float], float]:
    """Every learned cell-cylinder's VE correction, pooled over sessions by weight."""
    acc: dict[tuple[str, float, float], list[float]] = {}
    for raw in sessions:
        grid = _as_dict(raw).get("grid")
        if not grid:
            continue
        for cyl in ("front", "rear"):
            pct, w = grid[cyl]["ve_correction_pct"], grid[cyl]["weight"]
            for i, row in enumerate(pct):
                for j, v in enumerate(row):
                    if v is None:
                        continue
                    key = (cyl, float(grid["rpm_axis"][i]), float(grid["map_axis"][j]))
                    a = acc.setdefault(key, [0.0, 0.0])
                    a[0] += float(v) * w[i][j]
                    a[1] += w[i][j]
    return {k: a[0] / a[1] for k, a in acc.items() if a[1] > 0}


def compare_runs(a: Iterable[Any], b: Iterable[Any]) -> dict[str, Any]:
    """Compare two session sets: common cells, cells only in one, max |difference| (pp)."""
    ca, cb = session_cells(a), session_cells(b)
    common = set(ca) & set(cb)
    diffs = [abs(ca[k] - cb[k]) for k in common]
    return {
        "common": len(common),
        "only_a": sorted(set(ca) - set(cb)),
        "only_b": sorted(set(cb) - set(ca)),
        "max_abs_diff_pp": max(diffs) if diffs else None,
        "p95_abs_diff_pp": float(np.percentile(diffs, 95)) if diffs else None,
    }

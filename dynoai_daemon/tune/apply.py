"""Apply a pooled VE correction (and knock retard) to a tune's own tables, on its own axes.

tuning.md, "Tuning sessions": the cumulative correction is evaluated at each of the tune's
breakpoints, bilinear on our grid and only where every surrounding cell with weight is
sound (elsewhere the cell is unchanged, and the reason is counted: outside our grid, no
data, not sound); ``new = base x ratio``; each cell's change is limited to
``max_change_pct``; optionally the changed region is smoothed (3x3, weighted by each
cell's confidence, never reaching into unchanged cells); values are rounded to the table's
resolution. A table the ECU shares between the cylinders takes the correction of both
cylinders pooled. TPS-axis (alpha-N) tables are corrected only from samples binned by TPS;
the sessions bin by MAP, so those tables are left as they are and the result says so.
When the tune has its own AFR target table and the sessions were measured against the
config's target table, the pooled ratios are re-referenced to the tune's target (the ECU
fuels to its own target; the VE table must not absorb a target difference); with the ECU's
logged target they are used as they are. Spark: the knock pattern's retards (never an
advance) go onto the breakpoints around each knock cell, per cylinder, bounded by
``max_retard_deg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dynoai_daemon.config import TuningConfig
from dynoai_daemon.models import TuningSession
from dynoai_daemon.patterns.pooled import CylinderPool, PooledCorrection, decide
from dynoai_daemon.tune.model import (
    SPARK_NAMES,
    VE_NAMES,
    TuneTable,
    TuneTables,
    round_to,
)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_MAX_CHANGE_PCT = 10.0
DEFAULT_MAX_RETARD_DEG = 4.0
_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])


@dataclass
class TableChange:
    """What happened to one table."""

    name: str
    source: str
    cells: int
    changed: int = 0
    max_change_pct: float | None = None  # signed, the largest |change|
    mean_change_pct: float | None = None  # mean |change| over changed cells
    limited: int = 0
    smoothed: int = 0
    below_resolution: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    note: str = ""
    max_retard_deg: float | None = None
    shared: bool = False  # one table for both cylinders

    def line(self) -> str:
        """One summary line for the terminal."""
        what = [self.source] if self.source else []
        if self.shared:
            what.append("one table for both cylinders")
        head = f"{self.name} ({', '.join(what)})" if what else self.name
        if self.note:
            return f"{head}: {self.note}"
        if self.max_retard_deg is not None or self.name.startswith("spark"):
            if not self.changed:
                return f"{head}: unchanged (no knock retard suggested)"
            return (
                f"{head}: {self.changed} of {self.cells} cells retarded, "
                f"max {self.max_retard_deg:+.2f} deg"
            )
        parts = [f"{head}: {self.changed} of {self.cells} cells changed"]
        if self.changed:
            parts.append(f"max {self.max_change_pct:+.1f} %, mean |{self.mean_change_pct:.1f}| %")
        if self.limited:
            parts.append(f"{self.limited} limited by --max-change")
        if self.smoothed:
            parts.append(f"{self.smoothed} smoothed")
        if self.below_resolution:
            parts.append(f"{self.below_resolution} below the table's resolution")
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n)
        if skipped:
            parts.append(f"unchanged: {skipped}")
        return "; ".join(parts)


@dataclass
class ApplyResult:
    """The corrected tune and what changed."""

    tune: TuneTables
    changes: list[TableChange]
    target: str
    pooled: PooledCorrection

    @property
    def cells_changed(self) -> int:
        """Cells changed over every table."""
        return sum(c.changed for c in self.changes)


# ------------------------------------------------------------------------ axis helpers


def _bracket(axis: FloatArray, x: float, *, clamp_beyond: bool) -> list[tuple[int, float]]:
    """Indexes and bilinear weights of the breakpoints around ``x`` on a strictly
    increasing ``axis``. Beyond the ends: the edge breakpoint when within half a step (or
    always with ``clamp_beyond``), else nothing."""
    n = axis.size
    if n == 1:
        return [(0, 1.0)]
    lo = axis[0] - 0.5 * (axis[1] - axis[0])
    hi = axis[-1] + 0.5 * (axis[-1] - axis[-2])
    if not clamp_beyond and (x < lo - 1e-9 or x > hi + 1e-9):
        return []
    xc = min(max(x, float(axis[0])), float(axis[-1]))
    i = int(np.clip(np.searchsorted(axis, xc, side="right") - 1, 0, n - 2))
    f = (xc - axis[i]) / (axis[i + 1] - axis[i])
    return [(k, w) for k, w in ((i, 1.0 - f), (i + 1, f)) if w > 1e-9]


def _unique_axis(axis: FloatArray) -> tuple[FloatArray, list[list[int]]]:
    """Distinct breakpoints of a non-decreasing axis and, per distinct value, every index
    that holds it (Delphi tables repeat the last breakpoint)."""
    vals: list[float] = []
    idx: list[list[int]] = []
    for k, v in enumerate(axis.tolist()):
        if vals and abs(v - vals[-1]) < 1e-9:
            idx[-1].append(k)
        else:
            vals.append(v)
            idx.append([k])
    return np.asarray(vals, dtype=np.float64), idx


def _table_at(t: TuneTable, rpm: FloatArray, load: FloatArray) -> FloatArray:
    """Bilinear lookup of a tune table at points (clamped at its edges)."""
    ur, ir = _unique_axis(t.rpm_axis)
    ul, il = _unique_axis(t.load_axis)
    v = t.values[np.ix_([k[0] for k in ir], [k[0] for k in il])]
    out = np.empty(rpm.shape)
    for n, (r, m) in enumerate(zip(rpm.ravel(), load.ravel(), strict=True)):
        out.flat[n] = sum(
            wi * wj * v[i, j]
            for i, wi in _bracket(ur, float(r), clamp_beyond=True)
            for j, wj in _bracket(ul, float(m), clamp_beyond=True)
        )
    return out


# --------------------------------------------------------------------------- VE


def _evaluate(
    t: TuneTable, pool: CylinderPool, rpm_axis: FloatArray, map_axis: FloatArray
) -> tuple[FloatArray, FloatArray, dict[str, BoolArray]]:
    """The pooled ratio and confidence at each breakpoint of ``t`` (NaN where none), and
    per reason the breakpoints left alone."""
    shape = t.shape
    ratio = np.full(shape, np.nan)
    conf = np.zeros(shape)
    why = {k: np.zeros(shape, dtype=bool) for k in ("outside our grid", "no data", "not sound")}
    for a, r in enumerate(t.rpm_axis.tolist()):
        bi = _bracket(rpm_axis, r, clamp_beyond=False)
        for b, m in enumerate(t.load_axis.tolist()):
            bj = _bracket(map_axis, m, clamp_beyond=False)
            if not bi or not bj:
                why["outside our grid"][a, b] = True
                continue
            cells = [(i, j, wi * wj) for i, wi in bi for j, wj in bj]
            if all(pool.weight[i, j] <= 0 for i, j, _ in cells):
                why["no data"][a, b] = True
                continue
            if not all(pool.sound[i, j] for i, j, _ in cells):
                why["not sound"][a, b] = True
                continue
            ratio[a, b] = sum(w * pool.ratio[i, j] for i, j, w in cells)
            conf[a, b] = sum(w * pool.weight[i, j] for i, j, w in cells)
    return ratio, conf, why


def _smooth(ratio: FloatArray, conf: FloatArray, changed: BoolArray) -> FloatArray:
    """3x3 confidence-weighted mean of the ratio over changed neighbours only."""
    out = ratio.copy()
    n, m = ratio.shape
    for a, b in zip(*np.nonzero(changed), strict=True):
        num = den = 0.0
        for da in (-1, 0, 1):
            for db in (-1, 0, 1):
                i, j = a + da, b + db
                if 0 <= i < n and 0 <= j < m and changed[i, j]:
                    w = _KERNEL[da + 1, db + 1] * conf[i, j]
                    num += w * ratio[i, j]
                    den += w
        if den > 0:
            out[a, b] = num / den
    return out


def _within(new: FloatArray, base: FloatArray, lim: float, res: float) -> FloatArray:
    """``new`` rounded to the resolution without leaving ``base x (1 +/- lim)``."""
    hi = np.floor(np.round(base * (1.0 + lim) / res, 9)) * res
    lo = np.ceil(np.round(base * (1.0 - lim) / res, 9)) * res
    return round_to(np.clip(round_to(new, res), np.minimum(lo, base), np.maximum(hi, base)), res)


def correct_table(
    t: TuneTable,
    pool: CylinderPool,
    rpm_axis: FloatArray,
    map_axis: FloatArray,
    *,
    max_change_pct: float = DEFAULT_MAX_CHANGE_PCT,
    smooth: bool = False,
) -> tuple[TuneTable, TableChange]:
    """Correct one MAP-axis VE table from a cylinder's pooled correction."""
    ratio, conf, why = _evaluate(t, pool, rpm_axis, map_axis)
    has = np.isfinite(ratio) & (t.values > 0)
    lim = max_change_pct / 100.0
    r = np.where(has, ratio, 1.0)
    limited = has & ((r > 1.0 + lim + 1e-12) | (r < 1.0 - lim - 1e-12))
    r = np.clip(r, 1.0 - lim, 1.0 + lim)
    proposed = np.where(has, _within(t.values * r, t.values, lim, t.resolution), t.values)
    moved = has & (np.abs(proposed - t.values) > t.resolution * 1e-6)
    smoothed = 0
    if smooth and moved.any():
        r2 = np.clip(_smooth(r, conf, moved), 1.0 - lim, 1.0 + lim)
        after = np.where(moved, _within(t.values * r2, t.values, lim, t.resolution), proposed)
        smoothed = int(np.count_nonzero(moved & (np.abs(after - proposed) > 1e-9)))
        proposed = after
    new = t.with_values(np.where(has, proposed, t.values))
    changed = new.changed()
    pct = np.where(
        changed,
        (new.values - t.values) / np.where(t.values != 0, t.values, 1.0) * 100.0,
        np.nan,
    )
    ch = TableChange(
        name=t.name,
        source=t.source,
        cells=int(t.values.size),
        changed=int(np.count_nonzero(changed)),
        limited=int(np.count_nonzero(limited & changed)),
        smoothed=smoothed,
        below_resolution=int(np.count_nonzero(has & ~changed)),
        skipped={k: int(np.count_nonzero(v)) for k, v in why.items()},
    )
    if ch.changed:
        k = int(np.nanargmax(np.abs(pct)))
        ch.max_change_pct = round(float(pct.flat[k]), 2)
        ch.mean_change_pct = round(float(np.nanmean(np.abs(pct))), 2)
    return new, ch


# ------------------------------------------------------------------------- target


def _target_factor(tune: TuneTables, pooled: PooledCorrection) -> tuple[FloatArray | None, str]:
    target = tune.get("afr_target")
    src = pooled.target_sources
    if target is None:
        if src == ["ecu"]:
            return None, "the ECU's logged AFR target (the tune has no target table)"
        return None, "the target the sessions were measured against (the tune has none)"
    if src == ["ecu"]:
        return None, (
            f"the ECU's logged AFR target (the tune's {target.source or 'afr_target'} table "
            "is what the ECU ran)"
        )
    if src != ["table"]:
        return None, (
            "the sessions' own targets (they mix ECU-logged and config targets, so the "
            f"tune's {target.source or 'afr_target'} table was not used)"
        )
    rr, mm = np.meshgrid(pooled.rpm_axis, pooled.map_axis, indexing="ij")
    tune_t = _table_at(target, rr, mm)
    return tune_t, f"the tune's own {target.source or 'afr_target'} table (ratios re-referenced)"


def _rereference(c: CylinderPool, tune_target: FloatArray, tuning: TuningConfig) -> CylinderPool:
    f = np.divide(
        c.target_mean,
        tune_target,
        out=np.ones_like(tune_target),
        where=np.isfinite(c.target_mean) & (tune_target > 0),
    )
    return decide(
        c.weight, c.weight_sq, np.nan_to_num(c.mean, nan=1.0) * f, c.m2 * f * f,
        c.target_mean, tuning,
    )  # fmt: skip


# -------------------------------------------------------------------------- spark


def _retards(sessions: Sequence[TuningSession]) -> dict[str, dict[tuple[int, int], float]]:
    """Most negative suggested retard per grid cell, per cylinder (``front``/``rear``)."""
    out: dict[str, dict[tuple[int, int], float]] = {"front": {}, "rear": {}}
    for s in sessions:
        for p in s.patterns.knock_timing:
            fcells = {(c[0], c[1]) for c in p.knock_cells_front}
            rcells = {(c[0], c[1]) for c in p.knock_cells_rear}
            for i, j, deg in p.timing_retards:
                if deg >= 0:
                    continue
                cyls = [
                    cyl
                    for cyl, cells in (("front", fcells), ("rear", rcells))
                    if (i, j) in cells or not (fcells or rcells)
                ]
                for cyl in cyls:
                    out[cyl][(i, j)] = min(out[cyl].get((i, j), 0.0), float(deg))
    return out


def retard_table(
    t: TuneTable,
    retards: dict[tuple[int, int], float],
    rpm_axis: FloatArray,
    map_axis: FloatArray,
    *,
    max_retard_deg: float = DEFAULT_MAX_RETARD_DEG,
) -> tuple[TuneTable, TableChange]:
    """Retard the breakpoints around each knock cell (never advance), bounded."""
    delta = np.zeros(t.shape)
    ur, ir = _unique_axis(t.rpm_axis)
    ul, il = _unique_axis(t.load_axis)
    for (i, j), deg in retards.items():
        if not (0 <= i < rpm_axis.size and 0 <= j < map_axis.size):
            continue
        d = max(deg, -abs(max_retard_deg))
        for a, _ in _bracket(ur, float(rpm_axis[i]), clamp_beyond=True):
            for b, _ in _bracket(ul, float(map_axis[j]), clamp_beyond=True):
                for ka in ir[a]:
                    for kb in il[b]:
                        delta[ka, kb] = min(delta[ka, kb], d)
    new = t.with_values(t.values + delta)
    changed = new.changed()
    ch = TableChange(name=t.name, source=t.source, cells=int(t.values.size))
    ch.changed = int(np.count_nonzero(changed))
    if ch.changed:
        ch.max_retard_deg = round(float(np.min((new.values - t.values)[changed])), 2)
    return new, ch


# --------------------------------------------------------------------------- apply


def apply_correction(
    tune: TuneTables,
    pooled: PooledCorrection,
    tuning: TuningConfig,
    *,
    sessions: Sequence[TuningSession] = (),
    max_change_pct: float = DEFAULT_MAX_CHANGE_PCT,
    smooth: bool = False,
    max_retard_deg: float = DEFAULT_MAX_RETARD_DEG,
) -> ApplyResult:
    """Correct the tune's VE tables (and retard its spark where it knocked).

    Args:
        tune: the base tune (not modified).
        pooled: the cumulative correction of the sessions.
        tuning: the config whose criterion decided the cells (for re-referencing).
        sessions: the pooled sessions (their knock patterns drive the spark side).
        max_change_pct: largest change of one cell, percent.
        smooth: smooth the changed region.
        max_retard_deg: largest retard of one spark cell, degrees.
    """
    out = TuneTables(
        format=tune.format,
        tables=dict(tune.tables),
        aliases=dict(tune.aliases),
        text=tune.text,
        encoding=tune.encoding,
        path=tune.path,
        notes=list(tune.notes),
    )
    tune_target, target_note = _target_factor(tune, pooled)
    cyl: dict[str, CylinderPool] = {"front": pooled.front, "rear": pooled.rear, "both": pooled.both}
    if tune_target is not None:
        cyl = {k: _rereference(v, tune_target, tuning) for k, v in cyl.items()}
    changes: list[TableChange] = []
    done: set[str] = set()
    for name in VE_NAMES:
        t = tune.get(name)
        if t is None:
            continue
        real = tune.aliases.get(name, name)
        if real in done:
            continue
        done.add(real)
        shared = tune.is_shared(name)
        label = real
        if t.load_unit == "%":
            changes.append(
                TableChange(
                    name=label,
                    source=t.source,
                    cells=int(t.values.size),
                    note="left unchanged: a TPS-axis (alpha-N) table needs samples binned by "
                    "TPS, and these sessions bin by MAP",
                )
            )
            continue
        which = "both" if shared else ("rear" if name.endswith("rear") else "front")
        new, ch = correct_table(
            t,
            cyl[which],
            pooled.rpm_axis,
            pooled.map_axis,
            max_change_pct=max_change_pct,
            smooth=smooth,
        )
        ch.name = label
        ch.shared = tune.is_shared(name)
        out.replace(name, new)
        changes.append(ch)
    retards = _retards(sessions)
    done.clear()
    for name in SPARK_NAMES:
        t = tune.get(name)
        if t is None:
            continue
        real = tune.aliases.get(name, name)
        if real in done:
            continue
        done.add(real)
        if tune.is_shared(name):
            merged = dict(retards["front"])
            for k, v in retards["rear"].items():
                merged[k] = min(merged.get(k, 0.0), v)
            cells, label = merged, real
        else:
            cells, label = retards["rear" if name.endswith("rear") else "front"], name
        if t.load_unit == "%":
            changes.append(
                TableChange(
                    name=label,
                    source=t.source,
                    cells=int(t.values.size),
                    note="left unchanged: TPS-axis spark table",
                )
            )
            continue
        new, ch = retard_table(
            t, cells, pooled.rpm_axis, pooled.map_axis, max_retard_deg=max_retard_deg
        )
        ch.name = label
        ch.shared = tune.is_shared(name)
        out.replace(name, new)
        changes.append(ch)
    return ApplyResult(tune=out, changes=changes, target=target_note, pooled=pooled)


__all__ = [
    "DEFAULT_MAX_CHANGE_PCT",
    "DEFAULT_MAX_RETARD_DEG",
    "ApplyResult",
    "TableChange",
    "apply_correction",
    "correct_table",
    "retard_table",
]

"""Pooling runs into one cumulative VE correction (the tuner's loop, tuning.md).

Each session's grid carries, per cell and cylinder, the sufficient statistics of
``afr / target``: the bilinear weight ``W``, the sum of squared weights, the weighted mean
``m`` and the population standard deviation ``s``. Pooling is exact: ``W = sum W_i``,
``mean = sum W_i m_i / W``, ``M2 = sum W_i (s_i^2 + (m_i - mean)^2)`` and the squared
weights add, so pooling two halves of a sample set gives what one set gives. The pooled
statistics then go through the project's one cell criterion
(:func:`~dynoai_daemon.core.criterion.cell_suggestion`) with the config's ``min_weight``,
``max_ci_pct`` and ``max_correction_pct``. Sessions on different grids cannot be pooled;
sessions whose grid lacks the statistics (written before they existed) are skipped and
counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dynoai_daemon.config import TuningConfig
from dynoai_daemon.core.criterion import cell_suggestion
from dynoai_daemon.errors import InputError
from dynoai_daemon.models import CylinderGrid, TuningSession

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class PoolError(InputError):
    """Sessions that cannot be pooled (different grids, or none usable)."""


@dataclass
class CylinderPool:
    """Pooled statistics and the resulting suggestion of one cylinder, ``[rpm][map]``.

    ``ratio`` is the suggested VE multiplier (``1 + clamped pct / 100``) where ``sound``,
    NaN elsewhere; ``mean`` the raw pooled mean of afr/target (NaN where no weight).
    """

    weight: FloatArray
    weight_sq: FloatArray
    mean: FloatArray
    m2: FloatArray
    target_mean: FloatArray
    ratio: FloatArray
    ci_pct: FloatArray
    sound: BoolArray
    clamped: BoolArray

    @property
    def pct(self) -> FloatArray:
        """The suggestion in percent (NaN where not sound)."""
        out: FloatArray = (self.ratio - 1.0) * 100.0
        return out


def _limits(tuning: TuningConfig) -> tuple[float, float, float]:
    return (
        float(tuning.min_weight),
        float(tuning.max_ci_pct),
        float(tuning.max_correction_pct),
    )


def decide(
    weight: FloatArray,
    weight_sq: FloatArray,
    mean: FloatArray,
    m2: FloatArray,
    target_mean: FloatArray,
    tuning: TuningConfig,
) -> CylinderPool:
    """Apply the cell criterion to pooled statistics."""
    min_w, max_ci, max_corr = _limits(tuning)
    has = weight > 0
    s = cell_suggestion(
        weight,
        weight_sq,
        np.where(has, mean, 1.0),
        m2,
        min_weight=min_w,
        max_ci_pct=max_ci,
        max_correction_pct=max_corr,
    )
    return CylinderPool(
        weight=weight,
        weight_sq=weight_sq,
        mean=np.where(has, mean, np.nan),
        m2=m2,
        target_mean=target_mean,
        ratio=1.0 + s.pct / 100.0,
        ci_pct=s.ci_pct,
        sound=s.sound,
        clamped=s.clamped,
    )


def _arr(rows: list[list[float | None]] | list[list[float]]) -> FloatArray:
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)


@dataclass
class _Acc:
    w: FloatArray
    ww: FloatArray
    wm: FloatArray  # sum W_i m_i
    wq: FloatArray  # sum W_i (s_i^2 + m_i^2)
    wt: FloatArray  # sum W_i target_i

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> _Acc:
        z = np.zeros(shape)
        return cls(z.copy(), z.copy(), z.copy(), z.copy(), z.copy())

    def add(self, g: CylinderGrid) -> None:
        assert g.ratio_mean is not None and g.ratio_std is not None and g.weight_sq is not None
        w = _arr(g.weight)
        has = w > 0
        m = np.where(has, np.nan_to_num(_arr(g.ratio_mean), nan=0.0), 0.0)
        s = np.where(has, np.nan_to_num(_arr(g.ratio_std), nan=0.0), 0.0)
        t = np.where(has, np.nan_to_num(_arr(g.afr_target_mean), nan=0.0), 0.0)
        self.w += w
        self.ww += _arr(g.weight_sq)
        self.wm += w * m
        self.wq += w * (s * s + m * m)
        self.wt += w * t

    def pool(self, tuning: TuningConfig) -> CylinderPool:
        has = self.w > 0
        mean = np.divide(self.wm, self.w, out=np.zeros_like(self.w), where=has)
        # M2 = sum W_i (s_i^2 + (m_i - mean)^2) = sum W_i (s_i^2 + m_i^2) - W mean^2
        m2 = np.maximum(self.wq - self.w * mean * mean, 0.0)
        tgt = np.divide(self.wt, self.w, out=np.full_like(self.w, np.nan), where=has)
        return decide(self.w, self.ww, mean, m2, tgt, tuning)

    def merged(self, other: _Acc) -> _Acc:
        return _Acc(
            self.w + other.w,
            self.ww + other.ww,
            self.wm + other.wm,
            self.wq + other.wq,
            self.wt + other.wt,
        )


@dataclass
class PooledCorrection:
    """The cumulative correction of several runs on one grid.

    Attributes:
        rpm_axis / map_axis: the grid the sessions share.
        runs: sessions pooled.
        session_ids: their ids, in pooling order.
        skipped: ``{session_id: reason}`` of sessions left out.
        front / rear: per-cylinder pooled statistics and suggestions.
        both: both cylinders pooled together (for a table the ECU shares between them).
    """

    rpm_axis: FloatArray
    map_axis: FloatArray
    runs: int
    session_ids: list[str]
    front: CylinderPool
    rear: CylinderPool
    both: CylinderPool
    skipped: dict[str, str] = field(default_factory=dict)
    target_sources: list[str] = field(default_factory=list)

    def cylinder(self, name: str) -> CylinderPool:
        """``front``, ``rear`` or ``both``."""
        out: CylinderPool = getattr(self, name)
        return out

    def summary(self) -> dict[str, object]:
        """A JSON-ready digest: runs pooled, cells with a suggestion, median CI."""
        out: dict[str, object] = {"runs": self.runs, "session_ids": list(self.session_ids)}
        for name in ("front", "rear"):
            c = self.cylinder(name)
            ci = c.ci_pct[c.sound]
            out[name] = {
                "cells_with_suggestion": int(np.count_nonzero(c.sound)),
                "cells_clamped": int(np.count_nonzero(c.clamped)),
                "ci_pct_median": round(float(np.median(ci)), 3) if ci.size else None,
            }
        out["skipped"] = dict(self.skipped)
        return out


def has_statistics(session: TuningSession) -> bool:
    """True when the session's grid carries the pooling statistics for both cylinders."""
    g = session.grid
    if g is None:
        return False
    return all(
        c.ratio_mean is not None and c.ratio_std is not None and c.weight_sq is not None
        for c in (g.front, g.rear)
    )


def pool_sessions(sessions: Iterable[TuningSession], tuning: TuningConfig) -> PooledCorrection:
    """Pool the cell statistics of sessions into one correction (one session works too).

    Raises:
        PoolError: sessions on different grids, or no session with pooling statistics.
    """
    rpm: FloatArray | None = None
    mp: FloatArray | None = None
    front = rear = None
    ids: list[str] = []
    skipped: dict[str, str] = {}
    sources: list[str] = []
    for s in sessions:
        if s.grid is None:
            skipped[s.session_id] = "no grid"
            continue
        if not has_statistics(s):
            skipped[s.session_id] = "grid lacks ratio_mean/ratio_std/weight_sq"
            continue
        ra = np.asarray(s.grid.rpm_axis, dtype=np.float64)
        ma = np.asarray(s.grid.map_axis, dtype=np.float64)
        if rpm is None or mp is None:
            rpm, mp = ra, ma
            front = _Acc.zeros((ra.size, ma.size))
            rear = _Acc.zeros((ra.size, ma.size))
        elif (
            ra.shape != rpm.shape
            or ma.shape != mp.shape
            or not (np.allclose(ra, rpm) and np.allclose(ma, mp))
        ):
            raise PoolError(
                f"session {s.session_id} is on a different grid than {ids[0]}: "
                "sessions can only be pooled on one grid"
            )
        assert front is not None and rear is not None
        front.add(s.grid.front)
        rear.add(s.grid.rear)
        ids.append(s.session_id)
        if s.target_source is not None and s.target_source not in sources:
            sources.append(s.target_source)
    if rpm is None or mp is None or front is None or rear is None:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise PoolError(
            "no session with pooling statistics"
            + (f" ({len(skipped)} skipped: {why})" if skipped else " (none given)")
        )
    return PooledCorrection(
        rpm_axis=rpm,
        map_axis=mp,
        runs=len(ids),
        session_ids=ids,
        front=front.pool(tuning),
        rear=rear.pool(tuning),
        both=front.merged(rear).pool(tuning),
        skipped=skipped,
        target_sources=sources,
    )


__all__ = [
    "CylinderPool",
    "PoolError",
    "PooledCorrection",
    "decide",
    "has_statistics",
    "pool_sessions",
]

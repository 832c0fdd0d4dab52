"""Predictions of the five models for one build, each value with an uncertainty.

The uncertainty of a tree ensemble's output is the standard deviation of its trees' outputs
(how much the training builds disagree near this one); for the pop probability it is
the spread of the trees' votes. Per-cell models are evaluated on the project's grid
axes. Conditions default to a mild day (75 F, 29.92 inHg, 500 ft, IAT peak ambient +
25 F) and the heat-soak inputs to a 10-minute fan-down soak (IAT from ambient + 5 F to
150 F, 4000 cfm) unless given. The result's top-level keys are the kinds that have a
model; :func:`prediction_payload` wraps them for MQTT with the build id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS
from dynoai_daemon.ml.features import build_row, day_row, to_matrix
from dynoai_daemon.ml.targets import DECEL_TARGETS, KNOCK_TARGETS, VE_TARGETS
from dynoai_daemon.models import build_id
from dynoai_daemon.patterns.decel import BANDS

FloatArray = npt.NDArray[np.float64]
IMBALANCE_AFR = 0.5
DEFAULT_DAY = {"ambient_temp_f": 75.0, "barometric_pressure_inhg": 29.92, "altitude_ft": 500.0}


def _forest(part: Mapping[str, Any], x: Any) -> tuple[FloatArray, FloatArray]:
    """Mean and tree spread of a fitted pipeline's forest at rows ``x`` (n x outputs)."""
    pipe = part["estimator"]
    xt = pipe[:-1].transform(x)
    forest = pipe[-1]
    if part["metric"] == "brier":
        classes = list(forest.classes_)
        col = classes.index(1.0) if 1.0 in classes else None
        votes = np.stack(
            [
                t.predict_proba(xt)[:, col] if col is not None else np.zeros(len(x))
                for t in forest.estimators_
            ]
        )
        return votes.mean(axis=0).reshape(-1, 1), votes.std(axis=0).reshape(-1, 1)
    trees = np.stack([np.asarray(t.predict(xt)).reshape(len(x), -1) for t in forest.estimators_])
    mean = np.asarray(pipe.predict(x), dtype=np.float64).reshape(len(x), -1)
    return mean, trees.std(axis=0)


def _vu(v: float, u: float, nd: int = 2) -> dict[str, float]:
    return {"value": round(float(v), nd), "uncertainty": round(float(u), nd)}


def predict_build(
    models: Mapping[str, Mapping[str, Any]],
    build: Mapping[str, Any],
    *,
    conditions: Mapping[str, Any] | None = None,
    heat: Mapping[str, Any] | None = None,
    rpm_axis: Sequence[float] = DEFAULT_RPM_AXIS,
    map_axis: Sequence[float] = DEFAULT_MAP_AXIS,
) -> dict[str, Any]:
    """Predictions of every loaded model for ``build`` (a BuildConfiguration dict)."""
    cond = {**DEFAULT_DAY, **{k: v for k, v in (conditions or {}).items() if v is not None}}
    amb = float(cond["ambient_temp_f"])
    b = build_row(build)
    day = day_row(cond, cond.get("iat_peak_f", amb + 25.0))
    out: dict[str, Any] = {}
    ra, ma = [float(r) for r in rpm_axis], [float(k) for k in map_axis]
    if "ve_scaling" in models:
        parts = models["ve_scaling"]["parts"]
        res: dict[str, Any] = {}
        if "regions" in parts:
            m, u = _forest(parts["regions"], to_matrix([{**b, **day}], "ve_scaling"))
            res.update({t: _vu(m[0, i], u[0, i]) for i, t in enumerate(VE_TARGETS)})
        if "cells" in parts:
            rows = [
                {**b, **day, "rpm": r, "map_kpa": k, "rear": float(c)}
                for c in (0, 1)
                for r in ra
                for k in ma
            ]
            m, u = _forest(parts["cells"], to_matrix(rows, "ve_cells"))
            n = len(ra) * len(ma)
            shape = (len(ra), len(ma))
            res["cells"] = {
                "rpm_axis": ra,
                "map_axis": ma,
                "front": np.round(m[:n, 0].reshape(shape), 2).tolist(),
                "rear": np.round(m[n:, 0].reshape(shape), 2).tolist(),
                "front_uncertainty": np.round(u[:n, 0].reshape(shape), 2).tolist(),
                "rear_uncertainty": np.round(u[n:, 0].reshape(shape), 2).tolist(),
            }
        out["ve_scaling"] = res
    if "cylinder_imbalance" in models:
        part = models["cylinder_imbalance"]["parts"]["cells"]
        rows = [{**b, "rpm": r, "map_kpa": k} for r in ra for k in ma]
        m, u = _forest(part, to_matrix(rows, "cylinder_imbalance"))
        cells = [
            {
                "rpm": row["rpm"],
                "map_kpa": row["map_kpa"],
                "afr_delta": round(float(m[i, 0]), 3),
                "uncertainty": round(float(u[i, 0]), 3),
            }
            for i, row in enumerate(rows)
            if abs(float(m[i, 0])) >= IMBALANCE_AFR
        ]
        cells.sort(key=lambda c: -abs(c["afr_delta"]))
        out["cylinder_imbalance"] = {
            "threshold_afr": IMBALANCE_AFR,
            "sign": "afr_delta = rear - front (positive: rear leaner)",
            "imbalance_cells": cells,
            "max_abs_afr_delta": round(float(np.max(np.abs(m[:, 0]))), 3) if len(m) else None,
        }
    if "decel_popping" in models:
        parts = models["decel_popping"]["parts"]
        x = to_matrix([b], "decel_popping")
        res = {}
        if "pops" in parts:
            m, u = _forest(parts["pops"], x)
            res["pop_probability"] = _vu(m[0, 0], u[0, 0], 3)
        if "enrichment" in parts:
            m, u = _forest(parts["enrichment"], x)
            res["pop_severity"] = _vu(m[0, 0], u[0, 0])
            res["enrichment_zones"] = [
                {
                    "rpm_min": lo,
                    "rpm_max": hi,
                    "tps_min": 0.0,
                    "tps_max": 3.0,
                    "enrichment_pct": round(float(m[0, 1 + i]), 2),
                    "uncertainty": round(float(u[0, 1 + i]), 2),
                }
                for i, (lo, hi, _) in enumerate(BANDS)
            ]
            assert len(DECEL_TARGETS) == 1 + len(BANDS)
        out["decel_popping"] = res
    if "heat_soak" in models:
        h = {
            "airflow_cfm": 4000.0,
            "iat_initial_f": amb + 5.0,
            "iat_peak_f": 150.0,
            "iat_soak_time_min": 10.0,
            **{k: v for k, v in (heat or {}).items() if v is not None},
        }
        row = {**b, **day, **h}
        m, u = _forest(models["heat_soak"]["parts"]["inflation"], to_matrix([row], "heat_soak"))
        out["heat_soak"] = {
            "ve_inflation_pct": _vu(m[0, 0], u[0, 0]),
            "inputs": {"ambient_temp_f": amb, **h},
        }
    if "knock_timing" in models:
        m, u = _forest(
            models["knock_timing"]["parts"]["advance"], to_matrix([{**b, **day}], "knock_timing")
        )
        out["knock_timing"] = {
            **{t: _vu(m[0, i], u[0, i]) for i, t in enumerate(KNOCK_TARGETS)},
            "unit": "deg relative to the family's stock spark; <= 0 (knock-free never "
            "proves more advance is safe)",
        }
    return out


def prediction_payload(
    predictions: Mapping[str, Any], build: Mapping[str, Any], card: Mapping[str, Any]
) -> dict[str, Any]:
    """The MQTT payload: build id, the dataset the models learned from, the predictions."""
    return {
        "build_id": build_id(build),
        "dataset_digest": card.get("dataset_digest"),
        "predictions": dict(predictions),
    }


def first_guess_ve(
    cells: Mapping[str, Any],
    base: Sequence[Sequence[float]],
    rpm_axis: Sequence[float],
    map_axis: Sequence[float],
    cylinder: str = "front",
) -> list[list[float]]:
    """A first-guess VE table for a base tune: ``base x (1 + predicted correction / 100)``.

    ``cells`` is the ``ve_scaling.cells`` prediction (on its own grid); it is evaluated
    bilinearly (clamped at the edges) at each of the tune's breakpoints (``rpm_axis`` x
    ``map_axis`` in kPa, ``base[rpm_i][map_j]``), for ``cylinder`` ("front" or "rear").
    Values keep one decimal, as tune tables do.

    Raises:
        ValueError: the base table's shape does not match the axes.
    """
    grid = np.asarray(cells[cylinder], dtype=np.float64)
    gr = np.asarray(cells["rpm_axis"], dtype=np.float64)
    gm = np.asarray(cells["map_axis"], dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    if b.shape != (len(rpm_axis), len(map_axis)):
        raise ValueError(f"base table is {b.shape}, axes are {len(rpm_axis)} x {len(map_axis)}")
    r = np.clip(np.asarray(rpm_axis, dtype=np.float64), gr[0], gr[-1])
    m = np.clip(np.asarray(map_axis, dtype=np.float64), gm[0], gm[-1])
    # Interpolate along MAP for every grid row, then along rpm for every column.
    along_map = np.stack([np.interp(m, gm, row) for row in grid])
    pct = np.stack([np.interp(r, gr, along_map[:, j]) for j in range(m.size)], axis=1)
    out: list[list[float]] = np.round(b * (1.0 + pct / 100.0), 1).tolist()
    return out

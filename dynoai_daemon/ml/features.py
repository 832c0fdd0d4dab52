"""Model inputs: a build and its day as one flat row, and the preprocessing pipeline.

A row is built in plain Python from a BuildConfiguration-shaped dict (a session's
``build_config``, a ``build/set`` payload or a scenario's ``[build]`` table) plus the
session's conditions and, per kind, a few extra inputs. Derived cam numbers are computed
here, documented once: ``overlap_mean``, ``overlap_split`` (front minus rear) and
``ivc_deg`` (intake closing after BDC = LSA - 4 + intake duration / 2 - 180, the number
that moves the torque peak). Missing values are NaN (numeric) or ``"missing"``
(categorical). The scikit-learn side (``training.preprocessor``) one-hot encodes the categorical
columns and median-imputes the numeric ones. Rows are numpy object arrays in the column
order of :data:`KIND_COLUMNS`; this module needs no scikit-learn. :func:`build_id` is the
stable id of a build (also the MQTT ``predict/<build_id>`` topic level and the group of
the grouped cross-validation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

CATEGORICAL = ("engine_family", "stage", "exhaust_type", "cam_profile")
BUILD_NUMERIC = (
    "displacement_ci",
    "compression_ratio",
    "octane_requirement",
    "throttle_body_mm",
    "header_length_delta_in",
    "pair_valve_present",
    "injector_flow_lb_hr",
    "intake_duration_deg",
    "exhaust_duration_deg",
    "lift_in",
    "lobe_separation_angle_deg",
    "overlap_front",
    "overlap_rear",
    "overlap_mean",
    "overlap_split",
    "ivc_deg",
)
DAY = ("ambient_temp_f", "barometric_pressure_inhg", "altitude_ft", "iat_peak_f")
HEAT = ("airflow_cfm", "iat_initial_f", "iat_soak_time_min")
CELL = ("rpm", "map_kpa", "rear")

#: Columns per model (categorical first). ``ve_cells`` is the per-cell part of ve_scaling.
KIND_COLUMNS: dict[str, tuple[str, ...]] = {
    "ve_scaling": (*CATEGORICAL, *BUILD_NUMERIC, *DAY),
    "ve_cells": (*CATEGORICAL, *BUILD_NUMERIC, *DAY, *CELL),
    "cylinder_imbalance": (*CATEGORICAL, *BUILD_NUMERIC, "rpm", "map_kpa"),
    "decel_popping": (*CATEGORICAL, *BUILD_NUMERIC),
    "heat_soak": (*CATEGORICAL, *BUILD_NUMERIC, *DAY, *HEAT),
    "knock_timing": (*CATEGORICAL, *BUILD_NUMERIC, *DAY),
}
MISSING = "missing"
ObjArray = npt.NDArray[np.object_]


def _num(v: Any) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float) and math.isfinite(float(v)):
        return float(v)
    return math.nan


def _cat(v: Any) -> str:
    if v is None:
        return MISSING
    s = str(v).strip().lower()
    return s or MISSING


def build_row(build: Mapping[str, Any]) -> dict[str, Any]:
    """The build's part of a row (categorical and numeric columns, derived cam numbers)."""
    cam: Mapping[str, Any] = build.get("cam_spec") or {}
    exhaust = build.get("exhaust_type") or build.get("header_type")
    of, orr = _num(cam.get("overlap_deg_front")), _num(cam.get("overlap_deg_rear"))
    i_dur, lsa = _num(cam.get("intake_duration_deg")), _num(cam.get("lobe_separation_angle_deg"))
    lifts = [_num(cam.get("intake_lift_in")), _num(cam.get("exhaust_lift_in"))]
    lifts = [x for x in lifts if not math.isnan(x)]
    return {
        "engine_family": _cat(build.get("engine_family")),
        "stage": _cat(build.get("stage")),
        "exhaust_type": _cat(exhaust),
        "cam_profile": _cat(cam.get("profile")),
        "displacement_ci": _num(build.get("displacement_ci")),
        "compression_ratio": _num(build.get("compression_ratio")),
        "octane_requirement": _num(build.get("octane_requirement")),
        "throttle_body_mm": _num(build.get("throttle_body_mm")),
        "header_length_delta_in": _num(build.get("header_length_delta_in")),
        "pair_valve_present": _num(build.get("pair_valve_present")),
        "injector_flow_lb_hr": _num(build.get("injector_flow_lb_hr")),
        "intake_duration_deg": i_dur,
        "exhaust_duration_deg": _num(cam.get("exhaust_duration_deg")),
        "lift_in": sum(lifts) / len(lifts) if lifts else math.nan,
        "lobe_separation_angle_deg": lsa,
        "overlap_front": of,
        "overlap_rear": orr,
        "overlap_mean": (of + orr) / 2.0,
        "overlap_split": of - orr,
        "ivc_deg": lsa - 4.0 + i_dur / 2.0 - 180.0,
    }


def day_row(conditions: Mapping[str, Any] | None, iat_peak_f: Any = None) -> dict[str, Any]:
    """The day's part of a row (ambient, baro, altitude, the session's IAT peak)."""
    c = conditions or {}
    return {
        "ambient_temp_f": _num(c.get("ambient_temp_f")),
        "barometric_pressure_inhg": _num(c.get("barometric_pressure_inhg")),
        "altitude_ft": _num(c.get("altitude_ft")),
        "iat_peak_f": _num(iat_peak_f),
    }


def to_matrix(rows: Sequence[Mapping[str, Any]], kind: str) -> ObjArray:
    """Rows as an object array in the column order of ``kind`` (absent keys missing)."""
    cols = KIND_COLUMNS[kind]
    out: ObjArray = np.empty((len(rows), len(cols)), dtype=object)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = r.get(c)
            if j < len(CATEGORICAL):
                out[i, j] = _cat(v) if not isinstance(v, str) else v
            else:
                out[i, j] = _num(v)
    return out

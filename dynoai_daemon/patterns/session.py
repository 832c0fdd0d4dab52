"""Assemble a closed run into a TuningSession with its grid and extracted patterns.

This is where the core's numbers meet the seed's vocabulary: the per-cylinder cell
results become the session's ``grid`` (docs/contract.md), each pattern module contributes its
fields, and the build, conditions and dyno metadata of the station are attached. Peak
power and torque are reported observed and corrected (SAE J1349 / STD / DIN from the
conditions). A value without data is None, never 0.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from dynoai_daemon.config import Settings, TuningConfig, session_context
from dynoai_daemon.core.grid import Grid
from dynoai_daemon.core.runs import OpenRun
from dynoai_daemon.models import (
    BuildConfiguration,
    CylinderGrid,
    CylinderImbalancePattern,
    DecelPoppingPattern,
    DynoSessionMetadata,
    EnvironmentalConditions,
    HeatSoakPattern,
    KnockTimingPattern,
    RunInfo,
    SessionGrid,
    SessionPatterns,
    TuningObjective,
    TuningSession,
    VEScalingPattern,
)
from dynoai_daemon.patterns import decel, heat_soak, imbalance, knock, ve_scaling
from dynoai_daemon.patterns.cells import CylinderCells, cylinder_cells, nan_to_none, to_nested

#: Pulls of one build kept for the heat-soak pattern's hp_variation_before.
PEAK_HP_HISTORY = 20


def _within(a: np.ndarray[Any, Any], lo: float, hi: float) -> bool:
    """True when every finite value of ``a`` lies in [lo, hi] (NaN becomes None)."""
    fin = a[np.isfinite(a)]
    return bool(fin.size == 0 or (fin.min() >= lo and fin.max() <= hi)) and not np.isinf(a).any()


def _schema_ranges_hold(c: CylinderCells) -> bool:
    """The CylinderGrid field ranges, checked on whole arrays at once."""
    return (
        _within(c.weight, 0.0, math.inf)
        and _within(c.weight_sq, 0.0, math.inf)
        and _within(c.afr_mean, 5.0, 25.0)
        and _within(c.target_mean, 5.0, 25.0)
        and _within(c.ve_correction_pct, -100.0, 100.0)
        and _within(c.afr_std, 0.0, math.inf)
        and _within(c.ratio_std, 0.0, math.inf)
        and _within(c.ve_correction_ci_pct, 0.0, math.inf)
        and _within(c.knock_count, 0.0, math.inf)
        and _within(c.knock_max, 0.0, 90.0)
        and _within(c.new_ve, 0.0, 300.0)
        and _within(c.ratio, -math.inf, math.inf)
    )


def _cyl_grid(c: CylinderCells) -> CylinderGrid:
    """The session's grid of one cylinder.

    Validating ~20 nested 19 x 18 lists element by element was most of the cost of a
    session; the same ranges are checked here on whole arrays, and only when one fails
    does the validating constructor run (to raise its error naming the field).
    """
    has_ve = bool(np.isfinite(c.new_ve).any())
    make = CylinderGrid.model_construct if _schema_ranges_hold(c) else CylinderGrid
    return make(
        weight=np.round(c.weight, 4).tolist(),
        afr_mean=to_nested(c.afr_mean),
        afr_target_mean=to_nested(c.target_mean),
        ve_correction_pct=to_nested(c.ve_correction_pct, digits=3),
        afr_std=to_nested(c.afr_std),
        knock_count=c.knock_count.astype(np.int64).tolist(),
        knock_max_deg=np.round(c.knock_max, 3).tolist(),
        new_ve=to_nested(c.new_ve, digits=3) if has_ve else None,
        ratio_mean=to_nested(c.ratio, digits=6),
        ratio_std=to_nested(c.ratio_std, digits=6),
        weight_sq=np.round(c.weight_sq, 6).tolist(),
        ve_correction_ci_pct=to_nested(c.ve_correction_ci_pct, digits=3),
        clamped=c.clamped.tolist(),
    )


def _rms(run: OpenRun) -> float | None:
    n = run.front.sq_n + run.rear.sq_n
    if n <= 0:
        return None
    return round(math.sqrt((run.front.sq_err + run.rear.sq_err) / n), 4)


class SessionBuilder:
    """Builds TuningSessions from closed runs of one station.

    Args:
        grid: the cell grid the core used.
        tuning: the tuning config (min weight, clamp, thresholds).
        build: the engine build attached to sessions (None until known).
        conditions: ambient conditions for power correction.
        dyno: dyno metadata.
        tuner_id: who tuned.
        objective: the session objective.
    """

    def __init__(
        self,
        *,
        grid: Grid,
        tuning: TuningConfig,
        build: BuildConfiguration | None = None,
        conditions: EnvironmentalConditions | None = None,
        dyno: DynoSessionMetadata | None = None,
        tuner_id: str | None = None,
        objective: TuningObjective = TuningObjective.VE_OPTIMIZATION,
    ) -> None:
        self.grid = grid
        self.tuning = tuning
        self.build_config = build
        self.conditions = conditions
        self.dyno = dyno
        self.tuner_id = tuner_id
        self.objective = objective
        # Peak power of this bike's recent pulls (heat soak's hp_variation_before): bounded,
        # and restarted when another build is set, so it never spans bikes.
        self.peak_hp_history: collections.deque[float] = collections.deque(maxlen=PEAK_HP_HISTORY)
        self._history_build = build

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionBuilder:
        """Return a builder for the station described by ``settings``."""
        ctx = session_context(settings)
        return cls(
            grid=Grid(settings.grid.rpm_axis, settings.grid.map_axis),
            tuning=settings.tuning,
            build=ctx.build,
            conditions=ctx.conditions,
            dyno=ctx.dyno,
            tuner_id=ctx.tuner_id,
            objective=ctx.objective,
        )

    def build(self, run: OpenRun) -> TuningSession:
        """Return the TuningSession of a closed run (CPU work; run it in an executor)."""
        grid, tuning = self.grid, self.tuning
        front = cylinder_cells(run.front, grid, tuning)
        rear = cylinder_cells(run.rear, grid, tuning)
        cf = self.conditions.correction_factor() if self.conditions is not None else None
        peak_hp = nan_to_none(run.peak_power, 2)
        peak_tq = nan_to_none(run.peak_torque, 2)
        hp_corr = round(peak_hp * cf, 2) if peak_hp is not None and cf is not None else None
        tq_corr = round(peak_tq * cf, 2) if peak_tq is not None and cf is not None else None
        if self.build_config is not self._history_build:
            self.peak_hp_history.clear()
            self._history_build = self.build_config
        if hp_corr is not None or peak_hp is not None:
            self.peak_hp_history.append(hp_corr if hp_corr is not None else float(peak_hp or 0))
        b = self.build_config
        common: dict[str, Any] = {"session_id": run.run_id}
        patterns = SessionPatterns()
        ve = ve_scaling.extract(front, rear, grid)
        if ve is not None:
            patterns.ve_scaling.append(
                VEScalingPattern(
                    **common,
                    engine_family=b.engine_family if b else None,
                    stage=b.stage if b else None,
                    cam_overlap_category=b.cam_spec.overlap_category if b and b.cam_spec else None,
                    displacement_ci=b.displacement_ci if b else None,
                    **ve,
                )
            )
        imb = imbalance.extract(front, rear, tuning.imbalance_afr)
        if imb is not None:
            patterns.cylinder_imbalance.append(
                CylinderImbalancePattern(
                    **common,
                    engine_family=b.engine_family if b else None,
                    cam_profile=b.cam_spec.profile if b and b.cam_spec else None,
                    exhaust_type=b.exhaust_type if b else None,
                    header_length_delta_in=b.header_length_delta_in if b else None,
                    **imb,
                )
            )
        dec = decel.extract(run.decels, tuning.decel_tps_pct)
        if dec is not None:
            patterns.decel_popping.append(
                DecelPoppingPattern(
                    **common,
                    engine_family=b.engine_family if b else None,
                    cam_overlap_deg=b.cam_spec.max_overlap_deg if b and b.cam_spec else None,
                    exhaust_type=b.exhaust_type if b else None,
                    pair_valve_present=b.pair_valve_present if b else None,
                    **dec,
                )
            )
        heat = heat_soak.extract(
            run,
            grid,
            ambient_temp_f=self.conditions.ambient_temp_f if self.conditions else None,
            airflow_cfm=self.dyno.fan_airflow_cfm if self.dyno else None,
            peak_hp_history=self.peak_hp_history,
        )
        if heat is not None:
            patterns.heat_soak.append(HeatSoakPattern(**common, **heat))
        kn = knock.extract(front, rear, grid, allow_advance=tuning.allow_timing_advance)
        if kn is not None:
            patterns.knock_timing.append(
                KnockTimingPattern(
                    **common,
                    compression_ratio=b.compression_ratio if b else None,
                    fuel_octane=b.octane_requirement if b else None,
                    cam_profile=b.cam_spec.profile if b and b.cam_spec else None,
                    altitude_ft=self.conditions.altitude_ft if self.conditions else None,
                    **kn,
                )
            )
        knock_total = int(front.knock_count.sum() + rear.knock_count.sum())
        return TuningSession(
            session_id=run.run_id,
            timestamp_utc=run.start_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            tuner_id=self.tuner_id,
            build_config=b,
            objective=self.objective,
            conditions=self.conditions,
            dyno_metadata=self.dyno,
            peak_hp=peak_hp,
            peak_torque=peak_tq,
            peak_hp_corrected=hp_corr,
            peak_torque_corrected=tq_corr,
            afr_accuracy_rms_error=_rms(run),
            max_cylinder_afr_delta=imbalance.max_cylinder_delta(front, rear),
            knock_events_total=knock_total,
            iat_start_f=nan_to_none(run.iat_start, 2),
            iat_peak_f=nan_to_none(run.iat_peak, 2),
            tuning_duration_hours=round(run.duration_s / 3600.0, 5),
            target_source=run.target_source,
            aborted=run.aborted,
            run=RunInfo(
                run_id=run.run_id,
                station=run.station,
                start_s=round(run.start_t, 4),
                end_s=round(run.end_t, 4),
                samples=run.rows,
            ),
            grid=SessionGrid(
                rpm_axis=[float(x) for x in grid.rpm_axis],
                map_axis=[float(x) for x in grid.map_axis],
                front=_cyl_grid(front),
                rear=_cyl_grid(rear),
            ),
            patterns=patterns,
        )

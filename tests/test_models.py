"""The seed's data model and the collector: correction math, validation, round trips.

Expected correction factors are worked out by hand in the comments (not by calling the
code under test), the validation cases check that errors name the bad field, and the
seed's "Usage Workflow" runs nearly verbatim.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dynoai_daemon.collector import TrainingDataCollector, ve_scaling_from_tables
from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS
from dynoai_daemon.errors import InputError
from dynoai_daemon.models import (
    BuildConfiguration,
    CamProfile,
    CamSpecification,
    CorrectionMethod,
    CylinderGrid,
    CylinderImbalancePattern,
    DecelPoppingPattern,
    DynoSessionMetadata,
    EngineFamily,
    EnvironmentalConditions,
    HeatSoakPattern,
    KnockTimingPattern,
    RunInfo,
    SessionGrid,
    SessionPatterns,
    StageLevel,
    TrainingDataset,
    TuningObjective,
    TuningSession,
    VEScalingPattern,
    correction_factor,
)
from dynoai_daemon.store.files import load_dataset, save_dataset

# --------------------------------------------------------------------------- builders


def seed_build() -> BuildConfiguration:
    """The seed's section 1 example, verbatim, plus the exhaust fields."""
    return BuildConfiguration(
        engine_family=EngineFamily.TWIN_CAM,
        displacement_ci=103,
        compression_ratio=10.5,
        stage=StageLevel.STAGE_2,
        cam_spec=CamSpecification(
            profile=CamProfile.S_AND_S_475,
            intake_duration_deg=228,
            exhaust_duration_deg=228,
            intake_lift_in=0.475,
            exhaust_lift_in=0.475,
            lobe_separation_angle_deg=106,
            overlap_deg_front=34.7,
            overlap_deg_rear=22.4,
            idle_rpm_target=950,
        ),
        air_cleaner="S&S Stealth",
        throttle_body_mm=55,
        header_type="2-into-1",
        exhaust_type="2-into-1",
        pair_valve_present=True,
        injector_flow_lb_hr=5.2,
        octane_requirement=91,
    )


def seed_conditions() -> EnvironmentalConditions:
    return EnvironmentalConditions(
        ambient_temp_f=75.0, barometric_pressure_inhg=29.92, humidity_percent=45.0, altitude_ft=500
    )


def seed_dyno() -> DynoSessionMetadata:
    return DynoSessionMetadata(
        dyno_type="Dynojet 250i",
        load_type="inertia",
        fan_airflow_cfm=5000,
        warmup_time_min=10,
        runs_performed=6,
    )


def cyl_grid(rows: int, cols: int, afr: float) -> CylinderGrid:
    weight = [[float(i + j) for j in range(cols)] for i in range(rows)]
    return CylinderGrid(
        weight=weight,
        afr_mean=[[afr if w > 0 else None for w in row] for row in weight],
        afr_target_mean=[[13.2 if w > 0 else None for w in row] for row in weight],
        ve_correction_pct=[[3.5 if w >= 2 else None for w in row] for row in weight],
        afr_std=[[0.12 if w > 0 else None for w in row] for row in weight],
        knock_count=[[1 if (i, j) == (1, 2) else 0 for j in range(cols)] for i in range(rows)],
        knock_max_deg=[
            [2.5 if (i, j) == (1, 2) else 0.0 for j in range(cols)] for i in range(rows)
        ],
        new_ve=[[None, 61.5, 62.0, 63.25] for _ in range(rows)],
    )


def one_of_each(session_id: str | None = None) -> SessionPatterns:
    """One pattern of every kind, values from the seed's examples."""
    return SessionPatterns(
        ve_scaling=[
            VEScalingPattern(
                session_id=session_id,
                engine_family=EngineFamily.TWIN_CAM,
                stage=StageLevel.STAGE_2,
                cam_overlap_category="moderate",
                displacement_ci=103,
                ve_delta_idle=12.5,
                ve_delta_cruise=15.2,
                ve_delta_midrange=18.7,
                ve_delta_wot=None,  # no WOT data: None, never 0
                front_rear_ve_difference_pct=2.1,
            )
        ],
        cylinder_imbalance=[
            CylinderImbalancePattern(
                session_id=session_id,
                engine_family=EngineFamily.TWIN_CAM,
                cam_profile=CamProfile.S_AND_S_585,
                exhaust_type="true_dual",
                header_length_delta_in=2.5,
                imbalance_cells=[(4, 6, 0.8), (5, 7, 1.1), (6, 8, 0.9)],
                primary_cause="exhaust_scavenging",
                front_ve_corrections=[[1.0, None], [2.5, -1.0]],
                rear_ve_corrections=[[-1.0, None], [-2.5, 1.0]],
                imbalance_before_max=1.2,
                imbalance_after_max=0.3,
                correction_success=True,
                severity="high",
            )
        ],
        decel_popping=[
            DecelPoppingPattern(
                session_id=session_id,
                engine_family=EngineFamily.TWIN_CAM,
                cam_overlap_deg=28.6,
                exhaust_type="2-into-1",
                pair_valve_present=True,
                pop_severity=7,
                pop_rpm_range=(1500, 3200),
                pop_throttle_position=3.0,
                decel_afr_spike_max=16.5,
                enrichment_zones=[(1500, 2500, 0, 2, 0.22), (2500, 3500, 0, 2, 0.18)],
                pop_eliminated=True,
                fuel_economy_impact_pct=-0.8,
                customer_satisfaction=9,
            )
        ],
        heat_soak=[
            HeatSoakPattern(
                session_id=session_id,
                ambient_temp_f=95.0,
                airflow_cfm=4000,
                iat_initial_f=105.0,
                iat_peak_f=165.0,
                iat_soak_time_min=12.5,
                ve_inflation_pct=6.8,
                affected_rpm_range=(1000, 3000),
                affected_load_range=(20, 50),
                heat_correction_overlay=[[-6.8, None], [None, -3.0]],
                hp_variation_before=5.2,
                hp_variation_after=1.1,
            )
        ],
        knock_timing=[
            KnockTimingPattern(
                session_id=session_id,
                compression_ratio=10.5,
                fuel_octane=91,
                cam_profile=CamProfile.S_AND_S_475,
                altitude_ft=500,
                knock_cells=[(7, 10, 15), (8, 11, 8)],
                knock_severity_max=3.5,
                timing_retards=[(7, 10, -4.0), (8, 11, -2.0)],
                timing_advances=[(5, 8, 1.0)],
                mbt_achieved=True,
                torque_gain_pct=3.2,
                knock_free=True,
            )
        ],
    )


def full_session(session_id: str = "cell1-20250106T183000-1") -> TuningSession:
    """A session with every part filled: build, conditions, tables, run, grid, patterns."""
    ve = [[60.0 + i + 0.5 * j for j in range(4)] for i in range(3)]
    return TuningSession(
        session_id=session_id,
        timestamp_utc="2025-01-06T18:30:00Z",
        tuner_id="tuner_001",
        build_config=seed_build(),
        objective=TuningObjective.FULL_TUNE,
        conditions=seed_conditions(),
        dyno_metadata=seed_dyno(),
        initial_ve_table_front=ve,
        initial_ve_table_rear=ve,
        final_ve_table_front=[[v * 1.05 for v in row] for row in ve],
        final_ve_table_rear=[[v * 0.98 for v in row] for row in ve],
        initial_spark_table_front=[[30.0, 32.0, 28.5, 26.0] for _ in range(3)],
        table_rpm_axis=[1000, 2000, 3000],
        table_map_axis=[30, 50, 70, 90],
        peak_hp=92.5,
        peak_torque=98.2,
        peak_hp_corrected=93.1,
        peak_torque_corrected=98.9,
        afr_accuracy_rms_error=0.18,
        max_cylinder_afr_delta=0.7,
        knock_events_total=1,
        iat_start_f=95.0,
        iat_peak_f=131.5,
        tuning_duration_hours=4.5,
        notes="rear ran lean at cruise",
        target_source="ecu",
        run=RunInfo(run_id=session_id, station="cell1", start_s=10.0, end_s=22.5, samples=1250),
        grid=SessionGrid(
            rpm_axis=[1000, 2000, 3000],
            map_axis=[30, 50, 70, 90],
            front=cyl_grid(3, 4, 13.0),
            rear=cyl_grid(3, 4, 13.8),
        ),
        patterns=one_of_each(session_id),
    )


# --------------------------------------------------------------------------- power correction


def test_sae_j1349_at_77f_29_23_inhg_dry() -> None:
    # T = (77-32)*5/9 = 25 degC, so sqrt((25+273)/298) = 1.
    # P = 29.23 inHg * 33.86389 hPa/inHg = 982.05281 + 7.78869 = 989.84150 hPa; dry -> Pd = P.
    # CF = 1.180 * 990/989.84150 - 0.18 = 1.180 * 1.00016013 - 0.18 = 1.00018895.
    cond = EnvironmentalConditions(ambient_temp_f=77.0, barometric_pressure_inhg=29.23)
    assert cond.correction_factor() == pytest.approx(1.00018895, abs=2e-7)
    assert cond.correction_method is CorrectionMethod.SAE_J1349


def test_sae_j1349_with_humidity() -> None:
    # 77 F = 25 C; Magnus: 10^(7.5*25/262.3) = 10^0.714830 = 5.185663; *6.1078 = 31.6728 hPa
    # saturated, 50 % -> Pv = 15.8364 hPa. P = 29.92 * 33.86389 = 1013.2076 hPa.
    # Pd = 997.3712; CF = 1.18 * 990/997.3712 - 0.18 = 1.18 * 0.9926094 - 0.18 = 0.9912791.
    cf = correction_factor(temp_f=77.0, baro_inhg=29.92, humidity_pct=50.0)
    assert cf == pytest.approx(0.9912791, abs=2e-6)
    # Dry at the same barometer: 990/1013.2076 = 0.9770939; 1.18 * that - 0.18 = 0.9729708.
    # Water vapour displaces oxygen, so the humid day corrects upward more.
    dry = correction_factor(temp_f=77.0, baro_inhg=29.92)
    assert dry == pytest.approx(0.9729708, abs=2e-6)
    assert cf > dry


def test_std_j607_at_its_reference_is_one() -> None:
    # 60 F = 15.5556 C; (15.5556+273.15)/288.7 = 1.0000192 -> sqrt = 1.0000096
    # P = 1013.2076 hPa, dry: 1013.25/1013.2076 = 1.0000418; CF = 1.0000514.
    cf = correction_factor(temp_f=60.0, baro_inhg=29.92, method="std")
    assert cf == pytest.approx(1.0000514, abs=2e-6)


def test_din_70020_uses_total_pressure_and_ignores_humidity() -> None:
    # 95 F = 35 C: sqrt((35+273)/293) = sqrt(1.0511945) = 1.0252778
    # P = 28.5 * 33.86389 = 965.12087 hPa; 1013/965.12087 = 1.0496094; CF = 1.0761406.
    dry = correction_factor(temp_f=95.0, baro_inhg=28.5, method=CorrectionMethod.DIN_70020)
    humid = correction_factor(
        temp_f=95.0, baro_inhg=28.5, humidity_pct=80.0, method=CorrectionMethod.DIN_70020
    )
    assert dry == pytest.approx(1.0761406, abs=2e-6)
    assert humid == dry


def test_method_is_selectable_on_conditions_and_written_to_json() -> None:
    hot = EnvironmentalConditions(
        ambient_temp_f=95.0,
        barometric_pressure_inhg=28.5,
        humidity_percent=30.0,
        correction_method=CorrectionMethod.DIN_70020,
    )
    assert hot.correction_factor() == pytest.approx(1.0761406, abs=2e-6)
    assert hot.correction_factor("sae_j1349") != hot.correction_factor()
    data = json.loads(hot.model_dump_json())
    assert data["power_correction_factor"] == pytest.approx(1.07614, abs=1e-5)
    assert EnvironmentalConditions.model_validate_json(hot.model_dump_json()) == hot
    # hot, thin air always corrects upward with every method
    for m in CorrectionMethod:
        assert hot.correction_factor(m) > 1.0
    with pytest.raises(ValueError):
        hot.correction_factor("bogus")


# --------------------------------------------------------------------------- cam overlap


@pytest.mark.parametrize(
    ("front", "rear", "expected"),
    [
        (14.9, 10.0, "low"),
        (15.0, None, "moderate"),
        (10.0, 30.0, "moderate"),
        (30.1, 5.0, "high"),
        (22.4, 34.7, "high"),  # the max of front/rear decides
        (None, None, None),
    ],
)
def test_overlap_category_thresholds(
    front: float | None, rear: float | None, expected: str | None
) -> None:
    cam = CamSpecification(overlap_deg_front=front, overlap_deg_rear=rear)
    assert cam.overlap_category == expected


# --------------------------------------------------------------------------- validation


def bad(model: type[Any], **kwargs: Any) -> str:
    """Build ``model`` expecting a ValidationError; return its text."""
    with pytest.raises(ValidationError) as info:
        model(**kwargs)
    return str(info.value)


BUILD = {"engine_family": "twin_cam", "displacement_ci": 103}
COND = {"ambient_temp_f": 70.0, "barometric_pressure_inhg": 29.9}


@pytest.mark.parametrize(
    ("model", "kwargs", "field"),
    [
        (BuildConfiguration, {**BUILD, "displacement_ci": 300}, "displacement_ci"),
        (BuildConfiguration, {**BUILD, "displacement_ci": 40}, "displacement_ci"),
        (BuildConfiguration, {**BUILD, "compression_ratio": 18}, "compression_ratio"),
        (BuildConfiguration, {**BUILD, "engine_family": "flathead"}, "engine_family"),
        (BuildConfiguration, {**BUILD, "displacment_ci": 103}, "displacment_ci"),
        (BuildConfiguration, {**BUILD, "exhaust_type": "  "}, "exhaust_type"),
        (EnvironmentalConditions, {**COND, "humidity_percent": 120}, "humidity_percent"),
        (EnvironmentalConditions, {**COND, "barometric_pressure_inhg": 40}, "barometric"),
        (EnvironmentalConditions, {**COND, "ambient_temp_f": -60}, "ambient_temp_f"),
        (EnvironmentalConditions, {**COND, "ambient_temp_f": math.nan}, "ambient_temp_f"),
        (TuningSession, {"session_id": "../etc/passwd"}, "session_id"),
        (TuningSession, {"session_id": "s", "initial_ve_table_front": [[50, 250]]}, "ve_table"),
        (
            TuningSession,
            {"session_id": "s", "final_ve_table_rear": [[50.0, 60.0], [70.0]]},
            "final_ve_table_rear",
        ),
        (
            TuningSession,
            {
                "session_id": "s",
                "initial_ve_table_front": [[50.0, 60.0]],
                "final_ve_table_front": [[50.0, 60.0, 70.0]],
            },
            "final_ve_table_front",
        ),
        (TuningSession, {"session_id": "s", "iat_peak_f": 400}, "iat_peak_f"),
        (TuningSession, {"session_id": "s", "timestamp_utc": "yesterday"}, "timestamp_utc"),
        (TuningSession, {"session_id": "s", "target_source": "guess"}, "target_source"),
        (KnockTimingPattern, {"timing_retards": [(1, 2, 2.0)]}, "timing_retards"),
        (KnockTimingPattern, {"timing_advances": [(1, 2, -1.0)]}, "timing_advances"),
        (DecelPoppingPattern, {"pop_severity": 11}, "pop_severity"),
        (DecelPoppingPattern, {"decel_afr_spike_max": 30}, "decel_afr_spike_max"),
        (
            DecelPoppingPattern,
            {"enrichment_zones": [(2500, 1500, 0, 2, 0.2)]},
            "enrichment_zones",
        ),
        (HeatSoakPattern, {"affected_rpm_range": (3000, 1000)}, "affected_rpm_range"),
        (RunInfo, {"run_id": "r", "station": "s", "start_s": 5, "end_s": 1, "samples": 0}, "end_s"),
    ],
)
def test_validation_errors_name_the_field(
    model: type[Any], kwargs: dict[str, Any], field: str
) -> None:
    assert field in bad(model, **kwargs)


def test_grid_shapes_must_match_axes_and_afr_is_bounded() -> None:
    g = cyl_grid(3, 4, 13.0)
    msg = bad(SessionGrid, rpm_axis=[1000, 2000], map_axis=[30, 50, 70, 90], front=g, rear=g)
    assert "front" in msg and "(3, 4)" in msg
    msg = bad(SessionGrid, rpm_axis=[1000, 3000, 2000], map_axis=[30, 50, 70, 90], front=g, rear=g)
    assert "rpm_axis" in msg
    data = g.model_dump()
    data["afr_mean"][0][1] = 30.0
    assert "afr_mean" in bad(CylinderGrid, **data)
    data = g.model_dump()
    data["knock_count"] = data["knock_count"][:2]
    assert "knock_count" in bad(CylinderGrid, **data)


def test_nan_means_none_for_optional_values_and_is_never_written() -> None:
    s = TuningSession(
        session_id="nan-test",
        peak_hp=math.nan,
        iat_start_f=math.nan,
        grid=SessionGrid(
            rpm_axis=[1000, 2000, 3000],
            map_axis=[30, 50, 70, 90],
            front=cyl_grid(3, 4, math.nan),
            rear=cyl_grid(3, 4, 13.5),
        ),
    )
    assert s.peak_hp is None and s.iat_start_f is None
    assert s.grid is not None
    assert s.grid.front.afr_mean[1][1] is None
    text = s.model_dump_json()
    assert "NaN" not in text and "Infinity" not in text
    assert TuningSession.model_validate_json(text) == s
    with pytest.raises(ValidationError, match="peak_hp"):
        TuningSession(session_id="x", peak_hp=math.inf)
    # assignment is validated too
    with pytest.raises(ValidationError, match="peak_torque"):
        s.peak_torque = -5.0


def test_timestamp_is_normalised_to_utc_z() -> None:
    s = TuningSession(session_id="t", timestamp_utc="2025-01-06T13:30:00-05:00")
    assert s.timestamp_utc == "2025-01-06T18:30:00Z"
    assert TuningSession(session_id="t", timestamp_utc="2025-01-06T18:30:00").timestamp_utc == (
        "2025-01-06T18:30:00Z"
    )
    assert TuningSession(session_id="t").timestamp_utc.endswith("Z")


def test_live_run_session_needs_no_build() -> None:
    s = TuningSession(session_id="cell1-20260102T030405-1", aborted=True)
    assert s.build_config is None and s.patterns.is_empty() and s.peak_hp is None
    assert s.objective is TuningObjective.VE_OPTIMIZATION


# --------------------------------------------------------------------------- round trips


def test_session_json_round_trip_is_equal() -> None:
    s = full_session()
    text = s.model_dump_json()
    back = TuningSession.model_validate_json(text)
    assert back == s
    data = json.loads(text)
    # contract.md keys
    assert set(data["grid"]["front"]) >= {
        "weight",
        "afr_mean",
        "afr_target_mean",
        "ve_correction_pct",
        "afr_std",
        "knock_count",
        "knock_max_deg",
    }
    assert set(data["patterns"]) == {
        "ve_scaling",
        "cylinder_imbalance",
        "decel_popping",
        "heat_soak",
        "knock_timing",
    }
    assert data["build_config"]["cam_spec"]["overlap_category"] == "high"
    assert data["patterns"]["ve_scaling"][0]["ve_delta_wot"] is None
    assert data["patterns"]["cylinder_imbalance"][0]["imbalance_cells"][1] == [5, 7, 1.1]


def test_dataset_with_one_of_each_pattern_round_trips(tmp_path: Path) -> None:
    ds = TrainingDataset(dataset_id="rt", created_utc="2025-01-06T00:00:00Z")
    s = full_session()
    ds.add_session(s)
    assert ds.add_patterns(s.session_id, s.patterns) == dict.fromkeys(
        ds.summary()["pattern_counts"], 1
    )
    path = save_dataset(ds, tmp_path / "sub" / "dataset.json")
    back = load_dataset(path)
    assert back == ds
    assert back.knock_timing_patterns[0].knock_cells == [(7, 10, 15), (8, 11, 8)]
    on_disk = json.loads(path.read_text())
    assert on_disk["summary"]["pattern_counts"] == {
        "ve_scaling": 1,
        "cylinder_imbalance": 1,
        "decel_popping": 1,
        "heat_soak": 1,
        "knock_timing": 1,
    }
    assert [p.name for p in path.parent.iterdir()] == ["dataset.json"]
    pretty = ds.to_json(indent=2)
    assert json.loads(pretty)["summary"] == ds.summary()
    assert TrainingDataset.model_validate_json(pretty) == ds


def test_dataset_load_errors_name_path_and_field(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError, match=r"nope\.json"):
        load_dataset(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset_id": "x", "sessions": [')
    with pytest.raises(InputError, match=r"broken\.json"):
        load_dataset(broken)
    ds = TrainingDataset(dataset_id="x", sessions=[full_session()])
    data = json.loads(ds.to_json())
    data["sessions"][0]["build_config"]["displacement_ci"] = 900
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        load_dataset(bad_file)
    assert "sessions[0].build_config.displacement_ci" in str(info.value)
    assert info.value.path == str(bad_file)


def test_summary_is_computed_from_content() -> None:
    ds = TrainingDataset(dataset_id="sum")
    assert ds.summary()["total_sessions"] == 0
    assert ds.summary()["pattern_counts"] == dict.fromkeys(
        ["ve_scaling", "cylinder_imbalance", "decel_popping", "heat_soak", "knock_timing"], 0
    )
    a = full_session("a-1")
    b = TuningSession(
        session_id="b-1",
        tuner_id="tuner_002",
        build_config=BuildConfiguration(
            engine_family=EngineFamily.MILWAUKEE_8, displacement_ci=114, stage=StageLevel.STAGE_1
        ),
        tuning_duration_hours=1.25,
    )
    ds.add_session(a)
    ds.add_session(b)
    ds.add_patterns(a.session_id, a.patterns)
    summ = ds.summary()
    assert summ["total_sessions"] == 2
    assert summ["engines_covered"] == 2
    assert summ["engine_families"] == ["milwaukee_8", "twin_cam"]
    assert summ["tuners_contributed"] == 2
    assert summ["stages_covered"] == ["stage_1", "stage_2"]
    assert summ["cam_profiles"] == ["s_and_s_475"]
    assert summ["total_dyno_hours"] == pytest.approx(5.75)
    assert summ["objectives"] == {"full_tune": 1, "ve_optimization": 1}
    assert summ["sessions_with_patterns"] == 1
    # patterns are de-duplicated per session id
    assert ds.add_patterns(a.session_id, a.patterns)["ve_scaling"] == 0
    # replacing a session drops the patterns learned from its old version
    assert ds.add_session(full_session("a-1")) is True
    assert ds.summary()["pattern_counts"]["knock_timing"] == 0
    assert ds.summary()["total_sessions"] == 2
    with pytest.raises(ValidationError, match="duplicate session_id"):
        TrainingDataset(dataset_id="d", sessions=[b, b])


# --------------------------------------------------------------------------- collector


def region_tables() -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """Initial VE 60 everywhere; final = x1.10 in the idle region, x1.20 (front) / x1.16
    (rear) in the WOT region, unchanged elsewhere, on the default 19 x 18 axes."""
    initial = [[60.0] * len(DEFAULT_MAP_AXIS) for _ in DEFAULT_RPM_AXIS]
    front = [row[:] for row in initial]
    rear = [row[:] for row in initial]
    for i, rpm in enumerate(DEFAULT_RPM_AXIS):
        for j, kpa in enumerate(DEFAULT_MAP_AXIS):
            if rpm <= 1250 and kpa <= 40:
                front[i][j] = rear[i][j] = 66.0
            if rpm >= 3000 and kpa >= 90:
                front[i][j] = 72.0
                rear[i][j] = 69.6
    return initial, front, rear


def test_seed_usage_workflow(tmp_path: Path) -> None:
    # 1. Collect Training Data
    collector = TrainingDataCollector(dataset_id="dynoai_v1")
    build_config = seed_build()
    initial, front, rear = region_tables()
    session = collector.create_session_from_run(
        run_id="run_001",
        build_config=build_config,
        objective=TuningObjective.VE_OPTIMIZATION,
        conditions=seed_conditions(),
        dyno_metadata=seed_dyno(),
        initial_tables={"ve_front": initial, "ve_rear": initial},
        final_tables={"ve_front": front, "ve_rear": rear},
        results={
            "peak_hp": 92.5,
            "peak_torque": 98.2,
            "afr_accuracy_rms_error": 0.18,
            "max_cylinder_afr_delta": 0.7,
            "tuning_duration_hours": 4.5,
        },
        tuner_id="tuner_001",
    )
    collector.add_session(session)

    # 2. Extract Patterns
    collector.extract_all_patterns()
    summary = collector.dataset.summary()
    assert summary["pattern_counts"]["ve_scaling"] == 1
    assert summary["pattern_counts"]["cylinder_imbalance"] == 0

    ve = collector.dataset.ve_scaling_patterns[0]
    # idle: 15 cells (750/1000/1250 rpm x 20..40 kPa) of both cylinders at +10 %
    assert ve.ve_delta_idle == pytest.approx(10.0)
    # cruise and midrange cells were not changed in the tables
    assert ve.ve_delta_cruise == pytest.approx(0.0)
    assert ve.ve_delta_midrange == pytest.approx(0.0)
    # WOT: 10 rpm x 4 kPa cells per cylinder, front +20 %, rear +16 % -> pooled mean 18 %
    assert ve.ve_delta_wot == pytest.approx(18.0)
    # front - rear ratio: 0.04 in 40 of 342 cells -> 4 * 40 / 342 = 0.467836 %
    assert ve.front_rear_ve_difference_pct == pytest.approx(160 / 342, abs=1e-4)
    assert ve.session_id == "run_001" and ve.source == "tables"
    assert ve.engine_family is EngineFamily.TWIN_CAM and ve.cam_overlap_category == "high"
    # conditions given -> corrected peaks filled from the observed ones
    assert session.peak_hp_corrected == round(92.5 * seed_conditions().correction_factor(), 2)

    # extraction is idempotent
    assert collector.extract_all_patterns()["ve_scaling"] == 0
    assert collector.dataset.summary()["pattern_counts"]["ve_scaling"] == 1

    # 3. Save Training Dataset, then load it back
    path = tmp_path / "training_data" / "dataset_2025_v1.json"
    save_dataset(collector.dataset, path)
    loaded = TrainingDataCollector.from_dataset(load_dataset(path))
    assert loaded.dataset == collector.dataset
    assert loaded.dataset.summary() == summary


def test_collector_takes_patterns_the_core_computed() -> None:
    collector = TrainingDataCollector(dataset_id="live")
    s = full_session()
    # a hand-made pattern without a session id gets the session's id when collected
    s.patterns.heat_soak.append(HeatSoakPattern(ve_inflation_pct=1.5))
    collector.add_session(s)
    added = collector.extract_all_patterns()
    assert added == {
        "ve_scaling": 1,
        "cylinder_imbalance": 1,
        "decel_popping": 1,
        "heat_soak": 2,
        "knock_timing": 1,
    }
    assert {p.session_id for p in collector.dataset.heat_soak_patterns} == {s.session_id}
    # the carried VE pattern wins over the table fallback (the session has tables too)
    assert collector.dataset.ve_scaling_patterns[0].source == "cells"
    assert collector.extract_all_patterns() == dict.fromkeys(added, 0)


def test_collector_fallback_uses_table_axes_and_reports_misfits() -> None:
    collector = TrainingDataCollector(dataset_id="t")
    ok = collector.create_session_from_run(
        "small-1",
        initial_tables={"ve_front": [[50.0, 50.0], [50.0, 50.0]], "rpm_axis": [1000, 4000]},
        final_tables={
            "ve_front": [[55.0, 50.0], [50.0, 60.0]],
            "rpm_axis": [1000, 4000],
            "map_axis": [30, 95],
        },
    )
    pattern = ve_scaling_from_tables(ok)
    assert pattern is not None
    assert pattern.ve_delta_idle == pytest.approx(10.0)  # (1000, 30): 55/50
    assert pattern.ve_delta_wot == pytest.approx(20.0)  # (4000, 95): 60/50
    assert pattern.ve_delta_cruise is None and pattern.ve_delta_midrange is None
    assert pattern.front_rear_ve_difference_pct is None  # no rear tables
    misfit = collector.create_session_from_run(
        "misfit-1",
        initial_tables={"ve_front": [[50.0, 50.0]]},
        final_tables={"ve_front": [[51.0, 50.0]]},
    )
    collector.add_session(ok)
    collector.add_session(misfit)
    assert collector.extract_all_patterns()["ve_scaling"] == 1
    assert [sid for sid, _ in collector.skipped] == ["misfit-1"]
    assert "1x2" in collector.skipped[0][1]
    # a session with neither tables nor patterns contributes nothing
    assert collector.patterns_for(TuningSession(session_id="empty")).is_empty()


def test_create_session_from_run_rejects_bad_input_naming_it() -> None:
    collector = TrainingDataCollector()
    with pytest.raises(InputError, match="peak_power"):
        collector.create_session_from_run("r1", results={"peak_power": 90})
    with pytest.raises(InputError, match="ve_centre"):
        collector.create_session_from_run("r1", initial_tables={"ve_centre": [[1.0]]})
    with pytest.raises(InputError, match="peak_hp"):
        collector.create_session_from_run("r1", results={"peak_hp": -3})
    with pytest.raises(InputError, match="rpm_axis"):
        collector.create_session_from_run(
            "r1",
            initial_tables={"ve_front": [[50.0]], "rpm_axis": [1000]},
            final_tables={"ve_front": [[50.0]], "rpm_axis": [2000]},
        )
    with pytest.raises(InputError, match="given twice"):
        collector.create_session_from_run("r1", results={"notes": "a"}, notes="b")

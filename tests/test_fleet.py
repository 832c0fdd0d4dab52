"""The fleet generator and the parts -> true VE physics behind it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from simulators.dyno import Simulation
from simulators.fleet import build_scenario, generate_fleet, random_build, random_day, session_plan
from simulators.parts import Parts, cylinder_ve, stock_parts
from simulators.scenario import load_scenario, parse_scenario


def _peak_rpm(p: Parts) -> float:
    fine = np.linspace(1000, 6500, 111)
    ve = cylinder_ve(p, fine, np.full(fine.size, 100.0), "front")
    return float(fine[np.argmax(ve)])


def test_cam_timing_moves_the_torque_peak_and_overlap_costs_at_low_map() -> None:
    stock = stock_parts("twin_cam")
    big = replace(stock, intake_duration_deg=250.0, overlap_front=45.0)
    assert big.ivc_deg > stock.ivc_deg
    assert _peak_rpm(big) > _peak_rpm(stock) + 500
    low = np.array([1000.0]), np.array([30.0])
    assert cylinder_ve(big, *low, "front")[0] < cylinder_ve(stock, *low, "front")[0]
    # a bigger engine pulls the same cam's peak down
    bigger = replace(big, displacement_ci=124.0)
    assert _peak_rpm(bigger) < _peak_rpm(big)
    assert big.effective_cr < stock.effective_cr + (big.compression_ratio - stock.compression_ratio)


def test_rear_header_length_and_true_duals_split_the_cylinders() -> None:
    base = replace(stock_parts("milwaukee_8"), exhaust_type="true_dual")
    long_rear = replace(base, header_delta_in=8.0, overlap_front=40.0, overlap_rear=40.0)
    rpm, kpa = np.array([3000.0, 3500.0]), np.array([70.0, 70.0])
    d0 = cylinder_ve(base, rpm, kpa, "front") - cylinder_ve(base, rpm, kpa, "rear")
    d1 = cylinder_ve(long_rear, rpm, kpa, "front") - cylinder_ve(long_rear, rpm, kpa, "rear")
    assert np.all(np.abs(d1) > np.abs(d0) + 0.5)


def test_scenario_without_ecu_uses_the_parts_model() -> None:
    d = load_scenario("stock").model_dump(mode="json")
    assert load_scenario("stock").ve_model == "ecu_error"
    d.pop("ecu")
    d.pop("ve_model")
    sc = parse_scenario(d)
    assert sc.ve_model == "parts" and sc.ecu.error_pct == 0.0
    sim = Simulation(sc)
    t = sim.engine.tables
    # the stock scenario's build is a stage-1 twin cam, not the family's stock engine
    assert not np.allclose(t.ratio_front, 1.0, atol=0.002)
    stock_build = {
        "engine_family": "twin_cam",
        "displacement_ci": 96,
        "compression_ratio": 9.2,
        "throttle_body_mm": 46,
        "exhaust_type": "2-into-2",
        "cam_spec": {
            "intake_duration_deg": 210,
            "exhaust_duration_deg": 216,
            "lobe_separation_angle_deg": 108,
            "intake_lift_in": 0.47,
            "exhaust_lift_in": 0.47,
            "overlap_deg_front": 9.0,
            "overlap_deg_rear": 9.0,
        },
    }
    sc2 = parse_scenario({**d, "build": stock_build})
    t2 = Simulation(sc2).engine.tables
    # the family's stock engine on its stock map needs no correction (0.1 VE rounding)
    assert np.allclose(t2.ratio_front, 1.0, atol=0.002)
    assert np.allclose(t2.ratio_rear, 1.0, atol=0.002)


def test_fleet_is_deterministic_and_sessions_carry_build_and_patterns() -> None:
    a = list(generate_fleet(2, seed=11, sessions_per_build=2, short=True))
    b = list(generate_fleet(2, seed=11, sessions_per_build=2, short=True))
    assert [x.session.session_id for x in a] == [x.session.session_id for x in b]
    assert len({x.session.session_id for x in a}) == 4
    for x, y in zip(a, b, strict=True):
        assert x.session.build_config == y.session.build_config
        assert x.session.patterns.ve_scaling[0] == y.session.patterns.ve_scaling[0]
        assert x.scenario.ve_model == "parts"
        v = x.session.patterns.ve_scaling[0]
        assert v.ve_delta_cruise is not None and v.ve_delta_midrange is not None
    assert a[0].session.build_config == a[1].session.build_config
    assert a[0].session.conditions != a[1].session.conditions


def test_random_builds_are_valid_scenarios() -> None:
    rng = np.random.default_rng(5)
    fams = set()
    for i in range(60):
        build = random_build(rng)
        sc = build_scenario(
            build,
            random_day(rng, soak=True),
            session_plan(rng, soak=True, short=True),
            name=f"b{i}",
            seed=i,
        )
        fams.add(sc.build.engine_family)
    assert len(fams) >= 5

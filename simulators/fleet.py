"""A fleet of random builds on the simulated dyno, fed straight into the core, for training.

:func:`random_build` draws a build's parts over what the schema allows (family, stage,
displacement, compression, cam durations/lift/LSA and the overlap per cylinder, throttle
body, exhaust layout and header length difference, PAIR valve, octane); each build runs
several sessions on different days (ambient, altitude/baro, humidity, fan), one run
each: holds over the idle, cruise and midrange cells, a WOT pull, a throttle snap, and
on some days a fan-down heat soak followed by low-load holds. The engine is the
``parts`` model of :mod:`simulators.parts` (true VE from the parts, the ECU on the
family's stock map), so what a session measures is a function of the build and the day.

Nothing runs in real time and no wire protocol is involved: each session's
:class:`~simulators.dyno.Simulation` becomes one frame that :class:`~dynoai_daemon.core.Core`
consumes directly, and the closed run becomes a TuningSession exactly as the daemon
builds it. Deterministic from ``seed``; session ids are ``fleet<seed>-<utc>-<n>`` with a
synthetic, distinct UTC time per session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from dynoai_daemon.config import GridConfig, TuningConfig
from dynoai_daemon.core import Core, RunClosed
from dynoai_daemon.core.grid import Grid
from dynoai_daemon.models import (
    BuildConfiguration,
    DynoSessionMetadata,
    EnvironmentalConditions,
    TuningSession,
)
from dynoai_daemon.patterns.session import SessionBuilder
from simulators.dyno import Simulation
from simulators.parts import FAMILIES, cam_overlap, family_stock
from simulators.scenario import Scenario, parse_scenario

FAMILY_WEIGHTS = {
    "twin_cam": 0.3,
    "milwaukee_8": 0.3,
    "evolution": 0.1,
    "sportster": 0.15,
    "revolution_max": 0.1,
    "other": 0.05,
}
BIG_BORES = {
    "twin_cam": (96, 103, 107, 110, 117),
    "milwaukee_8": (107, 114, 117, 124, 131),
    "evolution": (80, 88, 96),
    "sportster": (73, 76, 88),
    "revolution_max": (76, 81),
    "other": (88, 100, 110, 120),
}
STAGES = ("stock", "stage_1", "stage_2", "stage_3", "stage_4")
EXHAUSTS = ("2-into-1", "2-into-2", "true_dual")
CAM_PROFILES = (
    "s_and_s_475",
    "s_and_s_509",
    "s_and_s_550",
    "s_and_s_585",
    "s_and_s_640",
    "wood_tw_222",
    "wood_tw_555",
    "wood_tw_777",
    "other",
)
AIR_CLEANERS = ("stock", "SE Stage 1", "S&S Stealth", "Arlen Ness Big Sucker", "RSD Venturi")
UTC_ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)


def _r(x: float, nd: int = 1) -> float:
    return round(float(x), nd)


def random_build(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one build as a scenario ``[build]`` table (the seed's field names)."""
    fams = list(FAMILY_WEIGHTS)
    fam = str(rng.choice(fams, p=np.array([FAMILY_WEIGHTS[f] for f in fams])))
    st = family_stock(fam)
    stage_i = int(rng.integers(0, len(STAGES)))
    bores = BIG_BORES[fam]
    disp = float(bores[min(len(bores) - 1, int(rng.integers(0, 1 + stage_i)))])
    if stage_i >= 2:
        i_dur = float(rng.uniform(st.intake_duration_deg + 6, 256))
        e_dur = i_dur + float(rng.uniform(-2, 12))
        lsa = float(rng.uniform(101, 112))
        lift = float(rng.uniform(0.48, 0.65))
        profile = str(rng.choice(CAM_PROFILES))
    else:
        i_dur, e_dur = st.intake_duration_deg, st.exhaust_duration_deg
        lsa, lift, profile = st.lobe_separation_angle_deg, st.lift_in, "stock"
    ov = cam_overlap(i_dur, e_dur, lsa)
    split = float(rng.uniform(-3, 9))  # front minus rear (cam timing, V angle, ports)
    cr = float(np.clip(st.compression_ratio + rng.uniform(-0.3, 0.5 * stage_i), 8.0, 13.4))
    exhaust = str(rng.choice(EXHAUSTS))
    hdelta = float(rng.uniform(-2, 3) if exhaust == "2-into-1" else rng.uniform(-3, 7))
    octane = 87 if cr < 9.0 else (89 if cr < 9.8 else (91 if cr < 10.8 else 93))
    octane = int(np.clip(octane + int(rng.integers(-1, 2)) * 2, 87, 93))
    return {
        "engine_family": fam,
        "displacement_ci": disp,
        "compression_ratio": _r(cr, 2),
        "stage": STAGES[stage_i],
        "air_cleaner": AIR_CLEANERS[min(stage_i, len(AIR_CLEANERS) - 1)],
        "throttle_body_mm": float(st.throttle_body_mm + 4 * int(rng.integers(0, 1 + stage_i))),
        "exhaust_type": exhaust,
        "header_length_delta_in": _r(hdelta),
        "pair_valve_present": bool(rng.random() < (0.9 if stage_i == 0 else 0.4)),
        "injector_flow_lb_hr": _r(4.2 * disp / 100.0 * (1.0 + 0.08 * stage_i), 2),
        "octane_requirement": float(octane),
        "cam_spec": {
            "profile": profile,
            "intake_duration_deg": _r(i_dur),
            "exhaust_duration_deg": _r(e_dur),
            "intake_lift_in": _r(lift, 3),
            "exhaust_lift_in": _r(lift * float(rng.uniform(0.95, 1.0)), 3),
            "lobe_separation_angle_deg": _r(lsa),
            "overlap_deg_front": _r(max(0.0, ov + split / 2.0)),
            "overlap_deg_rear": _r(max(0.0, ov - split / 2.0)),
            "idle_rpm_target": _r(min(1200.0, 950.0 + 4.0 * max(0.0, ov - 10.0)), 0),
        },
    }


def baro_inhg(altitude_ft: float) -> float:
    """Standard-atmosphere barometric pressure at an altitude."""
    return float(29.92 * (1.0 - 6.8756e-6 * altitude_ft) ** 5.2559)


def random_day(rng: np.random.Generator, *, soak: bool) -> dict[str, Any]:
    """Draw one session's conditions (a hotter day when it includes a soak)."""
    alt = float(rng.uniform(0, 1200))
    amb = float(rng.uniform(75, 108) if soak else rng.uniform(45, 100))
    return {
        "ambient_temp_f": _r(amb),
        "barometric_pressure_inhg": _r(baro_inhg(alt) + rng.normal(0, 0.15), 2),
        "humidity_percent": _r(rng.uniform(15, 85)),
        "altitude_ft": _r(alt, 0),
        "engine_temp_start_f": 210.0,
    }


def session_plan(rng: np.random.Generator, *, soak: bool, short: bool) -> list[dict[str, Any]]:
    """One session's run: holds over idle/cruise/midrange cells, a pull, a snap, and an
    optional fan-down soak with hot low-load holds; all inside one logged run."""
    hold_s = 1.6 if short else 2.2
    plan: list[dict[str, Any]] = [
        {"step": "idle", "seconds": 3.0},
        {"step": "marker", "value": 1},
        {"step": "hold", "rpm": [1000, 1250], "map_kpa": [35, 40], "seconds": hold_s},
        {"step": "hold", "rpm": [2000, 2500, 3000], "map_kpa": [40, 50], "seconds": hold_s},
        {"step": "hold", "rpm": [3500, 4000], "map_kpa": [65, 80], "seconds": hold_s},
    ]
    if not short:
        plan.append({"step": "hold", "rpm": [2250, 2750], "map_kpa": [35, 55], "seconds": hold_s})
    plan += [{"step": "pull", "from_rpm": 2000, "to_rpm": 5500}, {"step": "decel"}]
    if soak:
        plan += [
            {
                "step": "soak",
                "seconds": _r(rng.uniform(30, 80) if not short else rng.uniform(25, 45)),
                "fan_cfm": _r(rng.uniform(100, 600), 0),
            },
            {"step": "hold", "rpm": [1500, 2000, 2500], "map_kpa": [35, 40], "seconds": 2.0},
        ]
    plan.append({"step": "marker", "value": 0})
    return plan


@dataclass(frozen=True, slots=True)
class FleetSession:
    """One simulated session: its scenario, the session the core built, and the sim."""

    build_index: int
    scenario: Scenario
    session: TuningSession
    simulation: Simulation


def _conditions(day: dict[str, Any]) -> EnvironmentalConditions:
    return EnvironmentalConditions(
        ambient_temp_f=day["ambient_temp_f"],
        barometric_pressure_inhg=day["barometric_pressure_inhg"],
        humidity_percent=day["humidity_percent"],
        altitude_ft=day["altitude_ft"],
    )


def simulate_session(
    scenario: Scenario,
    *,
    station: str,
    utc: datetime,
    grid: GridConfig | None = None,
    tuning: TuningConfig | None = None,
) -> tuple[list[TuningSession], Simulation]:
    """Run one scenario through the core directly (no wire, no clock) into sessions."""
    grid = grid or GridConfig()
    tuning = tuning or TuningConfig()
    sim = Simulation(scenario)
    frame = sim.to_frame()
    core = Core(grid=grid, tuning=tuning, station=station, utc_now=lambda: utc)
    builder = SessionBuilder(
        grid=Grid(grid.rpm_axis, grid.map_axis),
        tuning=tuning,
        build=BuildConfiguration.model_validate(scenario.build.to_build_config()),
        conditions=_conditions(scenario.conditions.model_dump()),
        dyno=DynoSessionMetadata(
            dyno_type=scenario.dyno.dyno_type,
            load_type=scenario.dyno.load_type,
            fan_airflow_cfm=scenario.dyno.fan_airflow_cfm,
            warmup_time_min=scenario.dyno.warmup_time_min,
        ),
        tuner_id="fleet",
    )
    events = list(core.feed(frame).events) + list(core.stop_run("end_of_session"))
    sessions = [builder.build(ev.run) for ev in events if isinstance(ev, RunClosed)]
    return sessions, sim


def build_scenario(
    build: dict[str, Any],
    day: dict[str, Any],
    plan: list[dict[str, Any]],
    *,
    name: str,
    seed: int,
    fan_cfm: float = 4000.0,
) -> Scenario:
    """The ``[ecu]``-less scenario (parts model) of one build on one day; the tank holds
    the octane the build requires."""
    return parse_scenario(
        {
            "name": name,
            "seed": seed,
            "build": build,
            "conditions": {**day, "fuel_octane": build["octane_requirement"]},
            "dyno": {"fan_airflow_cfm": fan_cfm},
            "plan": plan,
        },
        where=name,
    )


def generate_fleet(
    n_builds: int,
    *,
    seed: int = 0,
    sessions_per_build: int = 3,
    short: bool = False,
    on_session: Callable[[FleetSession], None] | None = None,
) -> Iterator[FleetSession]:
    """Yield the sessions of ``n_builds`` random builds, ``sessions_per_build`` each.

    The first session of a build never soaks, the others soak with probability 1/2.
    """
    if n_builds < 0 or sessions_per_build < 1:
        raise ValueError("n_builds must be >= 0 and sessions_per_build >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x13F1EE7]))
    station = f"fleet{seed}"
    for b in range(n_builds):
        build = random_build(rng)
        for s in range(sessions_per_build):
            soak = s > 0 and bool(rng.random() < 0.5)
            day = random_day(rng, soak=soak)
            fan = float(rng.choice([3000.0, 4000.0, 5000.0]))
            plan = session_plan(rng, soak=soak, short=short)
            sc = build_scenario(
                build,
                day,
                plan,
                name=f"fleet{seed}-b{b:05d}-s{s}",
                seed=int(rng.integers(0, 2**31 - 1)),
                fan_cfm=fan,
            )
            utc = UTC_ORIGIN + timedelta(days=b, minutes=15 * s)
            sessions, sim = simulate_session(sc, station=station, utc=utc)
            for sess in sessions:
                fs = FleetSession(b, sc, sess, sim)
                if on_session is not None:
                    on_session(fs)
                yield fs


def families() -> list[str]:
    """The families the fleet draws from."""
    return list(FAMILIES)

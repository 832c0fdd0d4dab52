"""Benchmark: fleet generation, training and prediction time and memory (500 builds).

In one process: (1) the fleet generator (short session plans, 2 sessions per build, the
core fed directly) with CPU seconds per session; (2) building the training tables from
the session dicts; (3) ``train_all`` (grouped CV + final fit of every model) with CPU
seconds; (4) saving and loading the skops files with the trusted-type check; (5)
``predict_build`` for 20 unseen builds (ms per build), whose true VE (simulated after
training) is compared with the predictions and with the fleet mean. Peak memory is the process's max
RSS after each step (ru_maxrss, monotone). Also prints the CV table, so the models'
quality at this fleet size is seen next to their cost. As a ratio baseline it prints
the training time per session against the simulation time per session.

Run: .venv/bin/python bench/ml.py [--builds 500] [--sessions 2] [--full-plan]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any

import numpy as np
import numpy.typing as npt

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS
from dynoai_daemon.ml.predict import predict_build
from dynoai_daemon.ml.store import load_models, save_models
from dynoai_daemon.ml.targets import VE_TARGETS, collect
from dynoai_daemon.ml.training import model_card, train_all, trained_models
from dynoai_daemon.patterns.cells import REGIONS
from simulators.dyno import Simulation
from simulators.fleet import build_scenario, generate_fleet, random_build, random_day, session_plan
from simulators.truth import steady_weights

FloatArray = npt.NDArray[np.float64]


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--builds", type=int, default=500)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--full-plan", action="store_true", help="the CLI's full session plan")
    args = ap.parse_args()
    c0 = time.process_time()
    sessions = [
        fs.session.model_dump(mode="json")
        for fs in generate_fleet(
            args.builds, seed=500, sessions_per_build=args.sessions, short=not args.full_plan
        )
    ]
    c_fleet = time.process_time() - c0
    print(
        f"fleet: {args.builds} builds, {len(sessions)} sessions in {c_fleet:.1f} s CPU "
        f"({1000 * c_fleet / len(sessions):.0f} ms/session); peak RSS {rss_mb():.0f} MB"
    )
    c0 = time.process_time()
    tables = collect(sessions)
    c_tab = time.process_time() - c0
    rows = {k: len(t.rows) for k, t in tables.tables.items()}
    print(f"tables: {c_tab:.1f} s CPU, rows {rows}; peak RSS {rss_mb():.0f} MB")
    c0 = time.process_time()
    results = train_all(tables)
    c_train = time.process_time() - c0
    print(
        f"train (5-fold grouped CV + final fit, all models): {c_train:.1f} s CPU "
        f"({1000 * c_train / len(sessions):.0f} ms/session, "
        f"{c_train / c_fleet:.2f}x the fleet's simulation time); peak RSS {rss_mb():.0f} MB"
    )
    for r in results:
        for p in r.parts:
            cv = p.cv
            print(
                f"  {r.kind:20s} {p.name:11s} {cv['metric']:8s} model {cv['model']:.4f} "
                f"baseline {cv['baseline']:.4f} ({p.n_rows} rows, {r.n_builds} builds)"
            )
    with tempfile.TemporaryDirectory() as tmp:
        models = trained_models(results)
        w0 = time.perf_counter()
        save_models(tmp, models, model_card(results, tables))
        w_save = time.perf_counter() - w0
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6
        w0 = time.perf_counter()
        loaded, _ = load_models(tmp)
        w_load = time.perf_counter() - w0
        print(f"save {w_save:.1f} s, load (checked) {w_load:.1f} s, {size:.1f} MB on disk")
    rng = np.random.default_rng(4242)
    fleet_mean = np.asarray(tables.tables["ve_scaling"].y).mean(axis=0)
    err_model: list[list[float]] = []
    err_mean: list[list[float]] = []
    cell_model: list[float] = []
    cell_mean: list[float] = []
    mean_cells = _fleet_cell_mean(tables)
    w_pred = 0.0
    n_unseen = 20
    for i in range(n_unseen):
        b = random_build(rng)
        day = random_day(rng, soak=False)
        plan = session_plan(rng, soak=False, short=True)
        sc = build_scenario(b, day, plan, name=f"u{i}", seed=i)
        truth, cells, seen = true_deltas(Simulation(sc))
        bc = sc.build.to_build_config()
        bc["exhaust_type"] = sc.build.exhaust_type
        w0 = time.perf_counter()
        pred = predict_build(loaded, bc, conditions=day)
        w_pred += time.perf_counter() - w0
        ve = pred["ve_scaling"]
        err_model.append([abs(ve[t]["value"] - truth[t]) for t in VE_TARGETS])
        err_mean.append([abs(fleet_mean[j] - truth[t]) for j, t in enumerate(VE_TARGETS)])
        for c, name in ((0, "front"), (1, "rear")):
            pc = np.asarray(ve["cells"][name])
            cell_model.append(float(np.abs(pc - cells[c])[seen].mean()))
            cell_mean.append(float(np.abs(mean_cells[c] - cells[c])[seen].mean()))
    em, eb = np.asarray(err_model).mean(axis=0), np.asarray(err_mean).mean(axis=0)
    print(f"unseen builds ({n_unseen}, simulated after training, truth = true/ECU VE):")
    for j, t in enumerate(VE_TARGETS):
        print(f"  {t:18s} MAE model {em[j]:.2f} %  fleet mean {eb[j]:.2f} %")
    print(
        f"  per cell (the cells a session visits, both cylinders): MAE model "
        f"{np.mean(cell_model):.2f} %  fleet mean per cell {np.mean(cell_mean):.2f} %"
    )
    print(
        f"predict: {1000 * w_pred / n_unseen:.0f} ms per build (all five models, 684 cells); "
        f"peak RSS {rss_mb():.0f} MB"
    )


def true_deltas(sim: Simulation) -> tuple[dict[str, float], list[FloatArray], Any]:
    """True region deltas: the mean over both cylinders of (true/ECU - 1) x 100 in the
    region's cells a session of this build learns from (steady weight >= 3, as the
    core needs), clipped at the core's +/-15 %; the per-cell truth per cylinder; and the
    mask of those cells."""
    t = sim.engine.tables
    rpm, kpa = t.rpm_axis[:, None], t.map_axis[None, :]
    seen = steady_weights(sim) >= 3.0
    cells = [
        np.clip((t.ratio_front - 1) * 100, -15, 15),
        np.clip((t.ratio_rear - 1) * 100, -15, 15),
    ]
    out = {}
    for name, (r0, r1, k0, k1) in REGIONS.items():
        m = (rpm >= r0) & (rpm <= r1) & (kpa >= k0) & (kpa <= k1) & seen
        out[f"ve_delta_{name}"] = float(np.concatenate([cells[0][m], cells[1][m]]).mean())
    return out, cells, seen


def _fleet_cell_mean(tables: Any) -> list[FloatArray]:
    """The fleet's mean measured correction per cell and cylinder (0 where never seen)."""
    tab = tables.tables["ve_cells"]
    ra, ma = list(DEFAULT_RPM_AXIS), list(DEFAULT_MAP_AXIS)
    sums = [np.zeros((len(ra), len(ma))), np.zeros((len(ra), len(ma)))]
    counts = [np.zeros((len(ra), len(ma))), np.zeros((len(ra), len(ma)))]
    for (r, k, c), y in zip(tab.keys, tab.y, strict=True):
        i, j = ra.index(r), ma.index(k)
        sums[c][i, j] += y[0]
        counts[c][i, j] += 1
    return [
        np.divide(s, n, out=np.zeros_like(s), where=n > 0)
        for s, n in zip(sums, counts, strict=True)
    ]


if __name__ == "__main__":
    main()

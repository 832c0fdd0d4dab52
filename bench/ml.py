"""Benchmark: fleet generation, training and prediction time and memory (500 builds).

In one process: (1) the fleet generator (short session plans, 2 sessions per build, the
core fed directly) with CPU seconds per session; (2) building the training tables from
the session dicts; (3) ``train_all`` (grouped CV + final fit of every model) with CPU
seconds; (4) saving and loading the skops files with the trusted-type check; (5)
``predict_build`` for 20 unseen builds (ms per build). Peak memory is the process's max
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

import numpy as np

from dynoai_daemon.ml.predict import predict_build
from dynoai_daemon.ml.store import load_models, save_models
from dynoai_daemon.ml.targets import collect
from dynoai_daemon.ml.training import model_card, train_all
from simulators.fleet import generate_fleet, random_build


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
        models = {
            r.kind: {
                "kind": r.kind,
                "parts": {
                    p.name: {
                        "estimator": p.estimator,
                        "columns": list(p.columns),
                        "targets": list(p.targets),
                        "metric": p.cv["metric"],
                    }
                    for p in r.parts
                },
            }
            for r in results
            if r.skipped is None
        }
        w0 = time.perf_counter()
        save_models(tmp, models, model_card(results, tables))
        w_save = time.perf_counter() - w0
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6
        w0 = time.perf_counter()
        loaded, _ = load_models(tmp)
        w_load = time.perf_counter() - w0
        print(f"save {w_save:.1f} s, load (checked) {w_load:.1f} s, {size:.1f} MB on disk")
    rng = np.random.default_rng(4242)
    builds = []
    for _ in range(20):
        b = random_build(rng)
        builds.append(b)
    w0 = time.perf_counter()
    for b in builds:
        predict_build(loaded, b)
    w_pred = (time.perf_counter() - w0) / len(builds)
    print(
        f"predict: {1000 * w_pred:.0f} ms per build (all five models, 684 cells); "
        f"peak RSS {rss_mb():.0f} MB"
    )


if __name__ == "__main__":
    main()

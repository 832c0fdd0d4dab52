"""Benchmark: reading a TunerStudio binary .mlg against the same data as canonical CSV.

Writes one synthetic log (cached under bench/out/) both as canonical CSV and as an MLVLG v1
file with the tests' writer, then in one process times a full read of each (every chunk,
canonical channels) and a full replay of the .mlg (units decided, values screened, core,
sessions), and prints rows/s and the ratios mlg/csv. The MLVLG reader decodes records with
one numpy structured view per chunk, so it should read at least as fast as the pyarrow CSV
path.

Run: .venv/bin/python bench/mlg_read.py [--rows N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from dynoai_daemon.channels import Frame
from dynoai_daemon.config import Settings
from dynoai_daemon.logs import read_log, write_canonical
from dynoai_daemon.logs.replay import replay_logs
from tests.mlg_writer import frame_to_mlg
from tests.synth import Plan, make_log


def build(rows: int) -> Frame:
    steps: list[tuple[object, ...]] = [("idle", 2)]
    steps += [("hold", r, k, 2.0) for r in range(1500, 5001, 500) for k in (40, 60, 80, 100)]
    steps += [("pull", 2000, 6000, 8), ("idle", 7)]
    one = make_log(Plan(steps), np.ones((19, 18)), np.ones((19, 18)), seed=2)
    reps = max(1, rows // len(one) + 1)
    span = float(one.t[-1]) + 1.0
    t = np.concatenate([one.t + k * span for k in range(reps)])[:rows]
    cols = {c: np.tile(v, reps)[:rows] for c, v in one.columns.items()}
    return Frame(t, cols)


def timed_read(path: Path, fmt: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = sum(len(f) for f in read_log(path, format=fmt))
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300_000)
    args = ap.parse_args()
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    csv, mlg = out / f"mlg_bench_{args.rows}.csv", out / f"mlg_bench_{args.rows}.mlg"
    if not (csv.exists() and mlg.exists()):
        frame = build(args.rows)
        write_canonical(csv, [frame])
        frame_to_mlg(mlg, frame)
    n_csv, s_csv = timed_read(csv, "canonical")
    n_mlg, s_mlg = timed_read(mlg, "mlg")
    t0 = time.perf_counter()
    res = replay_logs([mlg], Settings(data_dir=out / "mlg_data"), store=False)
    s_rep = time.perf_counter() - t0
    print(f"csv read : {n_csv} rows in {s_csv:.3f} s = {n_csv / s_csv:,.0f} rows/s")
    print(f"mlg read : {n_mlg} rows in {s_mlg:.3f} s = {n_mlg / s_mlg:,.0f} rows/s")
    print(f"mlg replay (decide+screen+core+sessions): {res.rows} rows in {s_rep:.3f} s = "
          f"{res.rows / s_rep:,.0f} rows/s, {len(res.sessions)} sessions")  # fmt: skip
    print(f"ratio mlg read / csv read time: {s_mlg / s_csv:.2f}")


if __name__ == "__main__":
    main()

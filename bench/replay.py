"""Benchmark: replay of a >= 1,000,000-row canonical log, against the bare CSV parse.

Writes the log once (cached under bench/out/), then in one process times:
  1. parse: reading every chunk with the canonical reader (pyarrow), nothing else;
  2. full: the same read plus the core plus building and storing every session;
and prints rows/s for both and the ratio full/parse. It also feeds the core in
live-sized batches (20 ms of 100 Hz data = 2 rows) and prints samples/s.
Targets on one core: >= 1,000,000 rows/s end to end and full <= 2x parse.

Run: .venv/bin/python bench/replay.py [--rows N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow

from dynoai_daemon.channels import Frame
from dynoai_daemon.config import Settings
from dynoai_daemon.core import Core
from dynoai_daemon.logs import CanonicalWriter, read_log
from dynoai_daemon.logs.replay import replay_logs
from tests.synth import Plan, make_log

SHAPE = (19, 18)


def build_log(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    steps: list[tuple[object, ...]] = [("idle", 2)]
    for r in (1500, 2000, 2500, 3000, 3500, 4000, 4500):
        for k in (35, 50, 65, 80, 95):
            steps.append(("hold", r, k, 3.0))
    steps += [("pull", 2000, 6000, 8), ("snap", 6000, 2), ("idle", 7)]
    plan = Plan(steps)
    rf = 1 + rng.uniform(-0.1, 0.1, SHAPE)
    rr = 1 + rng.uniform(-0.1, 0.1, SHAPE)
    w = CanonicalWriter(path)
    written = 0
    offset = 0.0
    seed = 1
    while written < rows:
        f = make_log(plan, rf, rr, seed=seed, knock_rear=[(4000, 5000, 2.0)])
        seed += 1
        w.write_frame(Frame(f.t + offset, f.columns))
        offset += float(f.t[-1]) + 1.0
        written += len(f)
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    log = out / f"canonical_{args.rows}.csv"
    if not log.exists():
        t0 = time.perf_counter()
        build_log(log, args.rows)
        print(f"wrote {log} in {time.perf_counter() - t0:.1f} s")
    # 1. bare parse
    t0 = time.perf_counter()
    rows = sum(len(f) for f in read_log(log, format="canonical"))
    parse_s = time.perf_counter() - t0
    # 2. full replay to sessions
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        t0 = time.perf_counter()
        res = replay_logs([log], settings, fmt="canonical")
        full_s = time.perf_counter() - t0
    print(f"rows: {rows:,}  sessions: {len(res.sessions)}")
    print(f"parse only : {parse_s:7.3f} s  {rows / parse_s:12,.0f} rows/s")
    print(
        f"full replay: {full_s:7.3f} s  {rows / full_s:12,.0f} rows/s"
        f"  (core {res.core_s:.3f} s, sessions {res.session_s:.3f} s)"
    )
    print(f"ratio full/parse: {full_s / parse_s:.2f}  (target <= 2.0)")
    print(f"end to end >= 1M rows/s: {'yes' if rows / full_s >= 1e6 else 'NO'}")
    # 3. live-sized batches: 20 ms of 100 Hz data = 2 rows per feed.
    frame = next(iter(read_log(log, format="canonical", chunk_rows=200_000)))
    core = Core(station="bench")
    n = min(len(frame), 100_000)
    t0 = time.perf_counter()
    for i in range(0, n, 2):
        core.feed(frame.slice(i, i + 2))
    live_s = time.perf_counter() - t0
    print(f"live batches (2 rows/feed): {n / live_s:,.0f} rows/s, {n / 2 / live_s:,.0f} feeds/s")


if __name__ == "__main__":
    main()

"""Benchmark: sessions per second through the fleet collector, one and two collectors.

Everything real: its own mosquitto on a free loopback port, a fresh PostgreSQL database on
the test server (``DYNOAI_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/
postgres``; dropped at the end), ``dynoai collect`` as separate processes. Sessions are
full-size: the default 19 x 18 RPM x MAP grid for both cylinders (weights, AFR means,
targets, corrections, spreads, knock), 19 x 18 initial and final VE tables, and one
pattern of each kind, from ``--stations`` stations.

Rounds, in one run:

1. ``validate``: :func:`check_payload` alone (JSON parse + TuningSession validation +
   row building), in this process: the CPU cost per session.
2. ``validate+insert``: the same plus :meth:`SessionDb.insert` in batches of ``--batch``:
   the collector's work without MQTT, the baseline for the ratios below.
3. ``1 collector`` / ``2 collectors``: the collectors connect once (creating their
   persistent sessions), stop, all sessions are published (QoS 1) while they are away, so
   the broker holds a backlog split between them; then they start again and drain it.
   Throughput = stored sessions / (last commit - first commit), from the rows'
   ``received_at`` (transaction time), so process start-up is not counted. This is the
   catch-up rate after an outage, the number that matters for sizing.

Run: .venv/bin/python bench/collect.py [--sessions 2000] [--stations 10] [--batch 100]
     [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynoai_daemon.collect.db import SessionDb  # noqa: E402
from dynoai_daemon.collect.schema import SessionRow, check_payload  # noqa: E402
from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS  # noqa: E402
from dynoai_daemon.models import CylinderGrid, RunInfo, SessionGrid  # noqa: E402
from tests.mosquitto import MosquittoBroker  # noqa: E402
from tests.pg import TestDatabase, server_available  # noqa: E402
from tests.test_models import full_session  # noqa: E402


def _int(v: object) -> int:
    """A database count or size (psycopg types row values as object)."""
    return int(str(v))


def grid(rng: random.Random, base_afr: float) -> CylinderGrid:
    nr, nm = len(DEFAULT_RPM_AXIS), len(DEFAULT_MAP_AXIS)

    def table(f: Any) -> list[list[Any]]:
        return [[f() for _ in range(nm)] for _ in range(nr)]

    return CylinderGrid(
        weight=table(lambda: rng.uniform(0, 400)),
        afr_mean=table(lambda: rng.uniform(base_afr - 1, base_afr + 1)),
        afr_target_mean=table(lambda: rng.uniform(12.5, 14.7)),
        ve_correction_pct=table(lambda: rng.uniform(-12, 12)),
        afr_std=table(lambda: rng.uniform(0, 0.6)),
        knock_count=table(lambda: rng.choice((0, 0, 0, 0, 1, 2))),
        knock_max_deg=table(lambda: rng.choice((0.0, 0.0, 0.0, rng.uniform(0.5, 4)))),
    )


def make_payloads(n: int, stations: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """(topic, payload) of ``n`` full-size sessions spread over ``stations`` stations."""
    rng = random.Random(seed)
    nr, nm = len(DEFAULT_RPM_AXIS), len(DEFAULT_MAP_AXIS)
    template = full_session("tpl-1")
    ve = [[rng.uniform(40, 110) for _ in range(nm)] for _ in range(nr)]
    out = []
    for i in range(n):
        station = f"cell{i % stations + 1}"
        sid = f"{station}-{i:06d}"
        s = template.model_copy(
            update={
                "session_id": sid,
                "run": RunInfo(run_id=sid, station=station, start_s=0, end_s=60, samples=6000),
                "initial_ve_table_front": ve,
                "initial_ve_table_rear": ve,
                "final_ve_table_front": [[v * rng.uniform(0.9, 1.1) for v in r] for r in ve],
                "final_ve_table_rear": [[v * rng.uniform(0.9, 1.1) for v in r] for r in ve],
                "initial_spark_table_front": None,
                "table_rpm_axis": list(DEFAULT_RPM_AXIS),
                "table_map_axis": list(DEFAULT_MAP_AXIS),
                "grid": SessionGrid(
                    rpm_axis=list(DEFAULT_RPM_AXIS),
                    map_axis=list(DEFAULT_MAP_AXIS),
                    front=grid(rng, 13.2),
                    rear=grid(rng, 13.6),
                ),
            }
        )
        body = json.dumps(s.model_dump(mode="json"), separators=(",", ":")).encode()
        out.append((f"dynoai/{station}/session/{sid}", body))
    return out


# --------------------------------------------------------------------------- in process


def round_validate(payloads: list[tuple[str, bytes]]) -> tuple[float, list[SessionRow]]:
    rows: list[SessionRow] = []
    t0 = time.perf_counter()
    for topic, data in payloads:
        station, sid = topic.split("/")[1], topic.rsplit("/", 1)[1]
        row = check_payload(data, station=station, session_id=sid, source="mqtt")
        assert isinstance(row, SessionRow), row
        rows.append(row)
    return len(payloads) / (time.perf_counter() - t0), rows


async def round_insert(db_url: str, payloads: list[tuple[str, bytes]], batch: int) -> float:
    db = SessionDb(db_url)
    await db.open()
    try:
        await db.migrate()
        t0 = time.perf_counter()
        for i in range(0, len(payloads), batch):
            _, rows = round_validate(payloads[i : i + batch])
            result = await db.insert(rows)
            assert len(result.inserted) == len(rows)
        return len(payloads) / (time.perf_counter() - t0)
    finally:
        await db.close()


# --------------------------------------------------------------------------- processes


class Collectors:
    """``k`` collector processes of one group, started and stopped together."""

    def __init__(self, k: int, group: str, url: str, db_url: str, batch: int, logdir: Path):
        self.ids = [f"{group}-{i}" for i in range(k)]
        self.args = [
            [
                sys.executable, "-m", "dynoai_daemon.cli.main", "collect",
                "--url", url, "--db", db_url, "--group", group, "--id", cid,
                "--batch", str(batch), "--health-interval", "0.2", "--log-level", "warning",
            ]
            for cid in self.ids
        ]  # fmt: skip
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for cid, args in zip(self.ids, self.args, strict=True):
            with open(self.logdir / f"{cid}.log", "ab") as log:
                self.procs.append(
                    subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                )

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            if p.wait(30) != 0:
                raise RuntimeError(f"collector exited {p.returncode}; see {self.logdir}")
        self.procs = []


def wait_subscribed(port: int, ids: list[str], within: float = 30.0) -> None:
    """Block until every collector's health says connected and subscribed."""
    ready: set[str] = set()
    done = threading.Event()

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        if not m.payload:
            return
        h = json.loads(m.payload)
        if h.get("state") == "online" and h["mqtt"]["subscribed"]:
            ready.add(m.topic.split("/")[2])
            if ready >= set(ids):
                done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe("dynoai/collector/+/health", qos=0)
    c.loop_start()
    try:
        if not done.wait(within):
            raise RuntimeError(f"collectors not subscribed within {within} s: {ready}")
    finally:
        c.disconnect()
        c.loop_stop()


def publish_all(port: int, payloads: list[tuple[str, bytes]]) -> float:
    """Publish at QoS 1 (100 in flight) and wait for every PUBACK; returns sessions/s."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        t0 = time.perf_counter()
        infos = [c.publish(t, d, qos=1) for t, d in payloads]
        for info in infos:
            info.wait_for_publish(60)
        return len(payloads) / (time.perf_counter() - t0)
    finally:
        c.disconnect()
        c.loop_stop()


def wait_stored(db: TestDatabase, n: int, within: float) -> tuple[float, int]:
    """Wait for ``n`` rows; returns (sessions/s between first and last commit, first batch)."""
    deadline = time.monotonic() + within
    with db.connect() as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM sessions").fetchone()
            assert row is not None
            if _int(row[0]) >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {row[0]} of {n} sessions stored within {within} s")
            time.sleep(0.05)
        span = conn.execute(
            "SELECT extract(epoch FROM max(received_at) - min(received_at)), "
            "count(*) FILTER (WHERE received_at = (SELECT min(received_at) FROM sessions)) "
            "FROM sessions"
        ).fetchone()
        conn.execute("TRUNCATE sessions")
    assert span is not None
    seconds, first = float(str(span[0])), _int(span[1])
    return (n - first) / seconds if seconds > 0 else float("inf"), first


def round_collectors(
    k: int, broker: MosquittoBroker, db: TestDatabase, payloads: list[tuple[str, bytes]],
    batch: int, logdir: Path,
) -> tuple[float, float]:  # fmt: skip
    group = f"bench{k}"
    cols = Collectors(k, group, broker.url, db.url, batch, logdir)
    cols.start()
    try:
        wait_subscribed(broker.port, cols.ids)
    finally:
        cols.stop()  # the broker now queues their share while they are away
    pub_rate = publish_all(broker.port, payloads)
    cols.start()
    try:
        rate, _ = wait_stored(db, len(payloads), within=600)
    finally:
        cols.stop()
    return rate, pub_rate


def machine() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--stations", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="300 sessions")
    args = ap.parse_args()
    n = 300 if args.quick else args.sessions
    why = server_available()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    payloads = make_payloads(n, args.stations)
    size = sum(len(d) for _, d in payloads) / n
    print(f"{n} sessions from {args.stations} stations, {size / 1024:.1f} KiB JSON each")
    print(f"machine: {machine()}")

    v_rate, _ = round_validate(payloads)
    results: list[tuple[str, float]] = [("validate (no I/O)", v_rate)]
    db = TestDatabase()
    broker = MosquittoBroker()
    broker.conf.write_text(broker.conf.read_text() + "max_queued_messages 0\n")
    logdir = broker.workdir
    try:
        base = asyncio.run(round_insert(db.url, payloads, args.batch))
        with db.connect() as conn:
            conn.execute("VACUUM ANALYZE sessions")
            row = conn.execute(
                "SELECT pg_total_relation_size('sessions'), pg_relation_size('sessions'), "
                "count(*) FROM sessions"
            ).fetchone()
            assert row is not None
            total, heap, count = _int(row[0]), _int(row[1]), _int(row[2])
            print(
                f"stored: {total / count / 1024:.1f} KiB per session on disk "
                f"(table + TOAST + indexes; heap rows {heap / count:.0f} B)"
            )
            conn.execute("TRUNCATE sessions")
        results.append((f"validate+insert, batch {args.batch} (baseline)", base))
        broker.start()
        pub_rates = []
        for k in (1, 2):
            rate, pub = round_collectors(k, broker, db, payloads, args.batch, logdir)
            pub_rates.append(pub)
            results.append((f"{k} collector{'s' if k > 1 else ''}, backlog drain", rate))
    finally:
        broker.close()
        db.drop()
    print(f"publisher into mosquitto (QoS 1): {min(pub_rates):.0f}-{max(pub_rates):.0f} sessions/s")
    print(f"machine after: {machine()}")
    print(f"\n{'round':<42} {'sessions/s':>11} {'vs baseline':>12} {'MB/s':>7}")
    for name, rate in results:
        print(f"{name:<42} {rate:>11.0f} {rate / base:>11.2f}x {rate * size / 1e6:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

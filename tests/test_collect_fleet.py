"""Exactly once through failures: stations, collectors and a broker that die and come back.

Collectors run as real ``dynoai collect`` processes (so they can be SIGKILLed), stations
publish through the daemon's own MqttPublisher (durable outbox, at-least-once), the broker
is a mosquitto with persistence in a temp dir (queued QoS 1 messages of the collectors'
persistent sessions survive its restart), and the database is a fresh one on the test
server, reached directly or through a TCP proxy the test switches off to take the
database away (the server itself keeps running). Each test ends with the stored ids
compared to the published ones: every session present, none twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.collect_support import (
    CollectorProcess,
    HealthWatch,
    make_session,
    pg_db,
    session_body,
    up,
    wait_rows,
)
from tests.mosquitto import MosquittoBroker
from tests.pg import TcpProxy, TestDatabase

__all__ = ["pg_db"]  # the fixture, imported for pytest


@pytest.fixture
def collectors(tmp_path: Path) -> Iterator[list[CollectorProcess]]:
    """Collector processes a test starts; all gone at teardown."""
    made: list[CollectorProcess] = []
    yield made
    for c in made:
        c.close()
        print(f"--- collector {c.collector_id} ---\n{c.log()}")  # shown when the test fails


def exactly_once(db: TestDatabase, expected: set[str]) -> None:
    ids = db.session_ids()
    assert len(ids) == len(set(ids)), "a session stored twice"
    assert set(ids) == expected, (
        f"missing {sorted(expected - set(ids))}, extra {sorted(set(ids) - expected)}"
    )


async def publish(pubs: dict[str, Any], sessions: list[Any], *, summaries: bool = True) -> None:
    """Publish as the daemon does: the session, then its retained ``session/last`` summary.

    mosquitto hands shared-subscription messages out round-robin, one by one: with one
    station and two collectors, one collector would get every session and the other every
    summary. ``summaries=False`` leaves them out, so both collectors get sessions.
    """
    for s in sessions:
        assert s.run is not None
        pub = pubs[s.run.station]
        pub.publish_durable(pub.topic(f"session/{s.session_id}"), session_body(s))
        if summaries:
            summary = {"session_id": s.session_id, "peak_hp": s.peak_hp}
            pub.publish_durable(pub.topic("session/last"), summary, retain=True)
        await asyncio.sleep(0.005)  # a stream, not one burst: the kill lands mid-way


async def test_three_stations_two_collectors_kill_and_broker_restart(
    mosquitto_persistent: MosquittoBroker,
    pg_db: TestDatabase,
    start_publisher: Any,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    broker = mosquitto_persistent
    # A fills a batch for 2 s before it commits: the SIGKILL below, as soon as A says it
    # holds messages, hits them between receive and commit.
    a = CollectorProcess(tmp_path, "a", broker.url, pg_db.url, "--batch-wait", "2")
    b = CollectorProcess(tmp_path, "b", broker.url, pg_db.url, "--batch-wait", "0.3")
    collectors.extend([a, b])
    stations = ("cell1", "cell2", "cell3")
    expected: set[str] = set()
    async with HealthWatch(broker.port) as health:
        a.start()
        b.start()
        await health.wait("a", up)
        await health.wait("b", up)
        pubs = {s: start_publisher(broker.url, s) for s in stations}

        def wave(lo: int, hi: int) -> list[Any]:
            made = [make_session(st, n) for n in range(lo, hi) for st in stations]
            expected.update(s.session_id for s in made)
            return made

        # 1. Both collectors share the stream; A dies while it is flowing.
        await publish(pubs, wave(0, 12))
        ha = await health.wait("a", lambda h: h["in_flight"] > 0)
        a.kill()
        await publish(pubs, wave(12, 20))
        # 2. The broker restarts (clean stop: it saves A's queue and both sessions).
        await asyncio.gather(*(asyncio.wait_for(p.wait_flushed(), 20) for p in pubs.values()))
        broker.restart()
        # Wave 3 only once B has subscribed again: mosquitto does not restore shared
        # subscriptions from its persistence file, so a session published before that
        # would have no subscriber (docs/scale.md; --no-share covers that window, tested
        # in test_collect.py and test_collect_bridge.py).
        await health.wait("b", lambda h: up(h) and h["mqtt"]["connects"] >= 2)
        await publish(pubs, wave(20, 30))
        # 3. A comes back with the same id: its persistent session still holds what was in
        # flight when it died and its share of what came meanwhile.
        a.start()
        await asyncio.gather(*(asyncio.wait_for(p.wait_flushed(), 20) for p in pubs.values()))
        await wait_rows(pg_db, len(expected), within=30)
        ha2 = await health.wait("a", lambda h: up(h) and h["received"] > 0)
        hb = await health.wait("b", lambda h: h["in_flight"] == 0 and h["received"] > 0)
        assert ha2["mqtt"]["session_present"] is True, ha2
        assert a.terminate() == 0, a.log()
        assert b.terminate() == 0, b.log()
    exactly_once(pg_db, expected)
    assert len(expected) == 90
    # What the killed collector had received but not committed came again (DUP flag).
    assert ha["inserted"] == 0
    assert ha2["redelivered"] >= ha["in_flight"], (ha, ha2)
    assert hb["rejected_total"] == 0 and ha2["rejected_total"] == 0
    assert "Traceback" not in a.log() + b.log()


async def test_database_down_10s_one_collector_held_one_killed(
    mosquitto_persistent: MosquittoBroker,
    pg_db: TestDatabase,
    start_publisher: Any,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    broker = mosquitto_persistent
    proxy = TcpProxy(pg_db.host, pg_db.port)
    proxy.start()
    try:
        db_url = proxy.url_for(pg_db.url)
        a, b = (CollectorProcess(tmp_path, name, broker.url, db_url) for name in ("a", "b"))
        collectors.extend([a, b])
        async with HealthWatch(broker.port) as health:
            a.start()
            b.start()
            await health.wait("a", up)
            await health.wait("b", up)
            pub = start_publisher(broker.url, "cell1")
            first = [make_session("cell1", n) for n in range(6)]
            await publish({"cell1": pub}, first, summaries=False)
            await wait_rows(pg_db, 6)

            # The database goes away for 10 s.
            proxy.stop()
            t_down = asyncio.get_running_loop().time()
            held = [make_session("cell1", n) for n in range(6, 18)]
            await publish({"cell1": pub}, held, summaries=False)
            await asyncio.wait_for(pub.wait_flushed(), 10)
            # Both hold their share, uncommitted and unacknowledged, and say so.
            ha = await health.wait("a", lambda h: h["in_flight"] > 0 and not h["db"]["ok"])
            hb = await health.wait("b", lambda h: h["in_flight"] > 0 and not h["db"]["ok"])
            assert ha["inserted"] + hb["inserted"] == 6
            # A crashes with its batch uncommitted and restarts while the database is down.
            a.kill()
            a.start()
            late = [make_session("cell1", n) for n in range(18, 24)]
            await publish({"cell1": pub}, late, summaries=False)
            await asyncio.wait_for(pub.wait_flushed(), 10)
            await asyncio.sleep(max(0.0, 10.0 - (asyncio.get_running_loop().time() - t_down)))
            proxy.start()  # the 10 s are over

            await wait_rows(pg_db, 24, within=30)
            hb = await health.wait("b", lambda h: h["db"]["ok"] and h["in_flight"] == 0)
            ha = await health.wait("a", lambda h: up(h) and h["db"]["ok"] and h["received"] > 0)
            assert hb["db_retries"] >= 1, hb
            assert ha["redelivered"] >= 1, ha  # what A held when it died came again
            assert a.terminate() == 0, a.log()
            assert b.terminate() == 0, b.log()
        exactly_once(pg_db, {s.session_id for s in first + held + late})
    finally:
        proxy.close()


async def test_sigterm_drains_what_was_received_before_exiting(
    mosquitto_persistent: MosquittoBroker,
    pg_db: TestDatabase,
    start_publisher: Any,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    broker = mosquitto_persistent
    # A long batch wait: when SIGTERM comes, the sessions sit in an open batch.
    a = CollectorProcess(
        tmp_path, "d", broker.url, pg_db.url, "--batch-wait", "30", "--batch", "1000"
    )
    collectors.append(a)
    async with HealthWatch(broker.port) as health:
        a.start()
        await health.wait("d", up)
        pub = start_publisher(broker.url, "cell9")
        sessions = [make_session("cell9", n) for n in range(8)]
        await publish({"cell9": pub}, sessions, summaries=False)
        await health.wait("d", lambda h: h["in_flight"] == 8)
        assert pg_db.session_ids() == []
        assert a.terminate(timeout=15) == 0, a.log()
        final = await health.wait("d", lambda h: h["state"] == "offline" and "inserted" in h)
    assert final["inserted"] == 8 and final["acked"] == 8 and final["unacked"] == 0, final
    assert sorted(pg_db.session_ids()) == [s.session_id for s in sessions]
    assert "inserted 8" in a.log()

"""The collector against real services: PostgreSQL (a database per test) and mosquitto.

Message checks run without services; the store tests use a fresh database on the test
server (``DYNOAI_TEST_PG``, see ``tests/pg.py``); the live tests run a
:class:`~dynoai_daemon.collect.Collector` in this process against a mosquitto of the
test's own and publish with real MQTT clients. Failures of processes (SIGKILL, broker
restart, database outage) are in ``test_collect_fleet.py``, ACLs in ``test_collect_acl.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dynoai_daemon.cli.main import main
from dynoai_daemon.collect import (
    Collector,
    SessionDb,
    build_id,
    check_message,
    count_sessions,
    iter_sessions,
)
from dynoai_daemon.collect.db import MIGRATIONS
from dynoai_daemon.collect.schema import Ignored, Rejected, SessionRow
from dynoai_daemon.errors import ConfigError, StoreError
from dynoai_daemon.models import TuningSession
from dynoai_daemon.store import SessionStore
from tests.collect_support import make_session, pg_db, restore_logging, session_body
from tests.mosquitto import MosquittoBroker, Subscriber
from tests.pg import TestDatabase
from tests.test_models import region_tables

__all__ = ["pg_db", "restore_logging"]  # fixtures, imported for pytest


def payload(s: TuningSession) -> bytes:
    return json.dumps(session_body(s)).encode()


# --------------------------------------------------------------------------- message checks


def test_a_valid_session_becomes_a_row_with_training_columns() -> None:
    s = make_session("cell7", 1)
    row = check_message("dynoai/cell7/session/cell7-0001", payload(s))
    assert isinstance(row, SessionRow)
    assert (row.session_id, row.station, row.source) == ("cell7-0001", "cell7", "mqtt")
    assert row.build_id == build_id(s.build_config)
    assert row.build_id is not None and len(row.build_id) == 12
    c = row.columns
    assert (c["engine_family"], c["stage"], c["cam_profile"]) == (
        "twin_cam",
        "stage_2",
        "s_and_s_475",
    )
    assert c["cam_overlap_deg"] == 34.7 and c["cam_overlap_category"] == "high"
    assert c["peak_hp"] == 92.5 and c["max_cylinder_afr_delta"] == 0.7
    assert c["n_cylinder_imbalance"] == 1 and c["has_grid"] is True
    assert TuningSession.model_validate_json(row.session_json) == s


def test_build_id_groups_equal_builds_whatever_the_station() -> None:
    a, b = make_session("cell1", 1), make_session("cell2", 9)
    assert build_id(a.build_config) == build_id(b.build_config)
    assert build_id(make_session("cell1", 2, displacement=117).build_config) != build_id(
        a.build_config
    )
    assert build_id(None) is None


@pytest.mark.parametrize(
    ("topic", "body", "reason"),
    [
        ("dynoai/cell1/session/cell1-0001", b"\xff\xfe", "encoding"),
        ("dynoai/cell1/session/cell1-0001", b"{nope", "json"),
        ("dynoai/cell1/session/cell1-0001", b"[1, 2]", "json"),
        ("dynoai/cell1/session/cell1-0002", None, "session_id"),
        ("dynoai/cell2/session/cell1-0001", None, "station"),
        ("dynoai/cell1/session", None, "topic"),
        ("other/cell1/session/cell1-0001", None, "topic"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(
    topic: str, body: bytes | None, reason: str
) -> None:
    data = payload(make_session("cell1", 1)) if body is None else body
    got = check_message(topic, data)
    assert isinstance(got, Rejected)
    assert got.reason == reason, got.detail


def test_schema_errors_name_the_field() -> None:
    data = session_body(make_session("cell1", 1))
    data["conditions"]["humidity_percent"] = 140
    got = check_message("dynoai/cell1/session/cell1-0001", json.dumps(data).encode())
    assert isinstance(got, Rejected) and got.reason == "schema"
    assert "conditions.humidity_percent" in got.detail


def test_summary_topic_is_ignored_and_base_topic_is_honoured() -> None:
    assert isinstance(check_message("dynoai/cell1/session/last", b"{}"), Ignored)
    s = make_session("cell1", 1)
    row = check_message("shop/a/cell1/session/cell1-0001", payload(s), base_topic="shop/a")
    assert isinstance(row, SessionRow) and row.station == "cell1"


def test_a_session_without_run_takes_the_topic_station() -> None:
    initial, front, _ = region_tables()
    s = TuningSession(session_id="t-1", initial_ve_table_front=initial, final_ve_table_front=front)
    row = check_message("dynoai/cell3/session/t-1", s.model_dump_json().encode())
    assert isinstance(row, SessionRow) and row.station == "cell3"
    assert row.columns["engine_family"] is None and row.columns["has_grid"] is False


# --------------------------------------------------------------------------- the store


def rows(*sessions: TuningSession) -> list[SessionRow]:
    out = []
    for s in sessions:
        r = check_message(
            f"dynoai/{s.run.station if s.run else 'x'}/session/{s.session_id}", payload(s)
        )
        assert isinstance(r, SessionRow)
        out.append(r)
    return out


async def test_migration_is_idempotent_and_safe_to_run_concurrently(pg_db: TestDatabase) -> None:
    dbs = [SessionDb(pg_db.url) for _ in range(3)]
    for d in dbs:
        await d.open()
    try:
        applied = await asyncio.gather(*(d.migrate() for d in dbs))
        assert sorted(applied) == [[], [], [v for v, _, _ in MIGRATIONS]]
        assert await dbs[0].migrate() == []
    finally:
        for d in dbs:
            await d.close()
    with pg_db.connect() as conn:
        versions = conn.execute("SELECT version FROM dynoai_schema_migrations").fetchall()
        cols = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name='sessions'"
            )
        }
        lz4 = conn.execute(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).fetchone()
        compression = conn.execute(
            "SELECT attcompression FROM pg_attribute "
            "WHERE attrelid = 'sessions'::regclass AND attname = 'session'"
        ).fetchone()
    assert versions == [(1,)]
    if lz4 and lz4[0]:  # the server has lz4: the documents use it
        assert compression == ("l",)
    assert {"session_id", "station", "received_at", "build_id", "session", "peak_hp"} <= cols
    assert {"engine_family", "cam_profile", "iat_peak_f", "n_knock_timing"} <= cols


async def test_insert_is_idempotent_and_a_refused_row_spares_the_batch(
    pg_db: TestDatabase,
) -> None:
    db = SessionDb(pg_db.url)
    await db.open()
    never = asyncio.Event()
    try:
        await db.migrate()
        a, b = make_session("cell1", 1), make_session("cell2", 1)
        first = await db.insert(rows(a, b))
        assert sorted(first.inserted) == ["cell1-0001", "cell2-0001"] and first.duplicates == ()
        # PostgreSQL cannot store NUL in text or jsonb: valid to the schema, refused by the
        # database; the rest of the batch must still land.
        nul = make_session("cell1", 2).model_copy(update={"notes": "bad\u0000byte"})
        c = make_session("cell1", 3)
        again = await db.insert_retrying(rows(a, nul, c), never)
        assert again.inserted == ("cell1-0003",)
        assert again.duplicates == ("cell1-0001",)
        assert [sid for sid, _ in again.refused] == ["cell1-0002"]
        assert "0000" in again.refused[0][1] or "null" in again.refused[0][1].lower()
    finally:
        await db.close()
    with pg_db.connect() as conn:
        got = conn.execute(
            "SELECT session_id, station, source, build_id, session->'run'->>'station', "
            "engine_family FROM sessions ORDER BY session_id"
        ).fetchall()
    assert [g[0] for g in got] == ["cell1-0001", "cell1-0003", "cell2-0001"]
    assert got[2][1:] == ("cell2", "mqtt", build_id(a.build_config), "cell2", "twin_cam")


async def test_iter_sessions_streams_through_a_server_side_cursor(pg_db: TestDatabase) -> None:
    db = SessionDb(pg_db.url)
    await db.open()
    try:
        await db.migrate()
        made = [make_session(f"cell{i % 3}", i, displacement=103 + i % 2) for i in range(25)]
        await db.insert(rows(*made))
    finally:
        await db.close()

    def read() -> tuple[list[dict[str, Any]], str]:
        it = iter_sessions(pg_db.url, itersize=10)
        got = [next(it) for _ in range(3)]
        # While the reader is mid-way, its backend's last statement is a FETCH of 10 rows
        # from the cursor: the rows come in batches, not all at once.
        with pg_db.connect() as conn:
            row = conn.execute(
                "SELECT query FROM pg_stat_activity WHERE application_name = 'dynoai-reader'"
            ).fetchone()
        got.extend(it)
        return got, str(row[0]) if row else ""

    got, query = await asyncio.to_thread(read)
    assert query.upper().startswith("FETCH FORWARD 10"), query
    assert [d["session_id"] for d in got] == sorted(s.session_id for s in made)
    assert TuningSession.model_validate(got[0]) == made[0]
    only = list(iter_sessions(pg_db.url, stations=["cell1"]))
    assert {d["run"]["station"] for d in only} == {"cell1"} and len(only) == 8
    b104 = build_id(made[1].build_config)
    assert b104 is not None
    assert count_sessions(pg_db.url, build_ids=[b104]) == 12
    assert count_sessions(pg_db.url) == 25


def test_reader_errors_are_store_and_config_errors(pg_db: TestDatabase) -> None:
    with pytest.raises(StoreError, match="no sessions table"):
        list(iter_sessions(pg_db.url))
    with pytest.raises(StoreError, match="no sessions table"):
        count_sessions(pg_db.url)
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        list(iter_sessions("host=x =bad"))
    with pytest.raises(StoreError, match="cannot connect"):
        list(iter_sessions(pg_db.url.rsplit("/", 1)[0] + "/no_such_db_for_dynoai"))


# --------------------------------------------------------------------------- backfill


def station_dir(path: Path) -> SessionStore:
    store = SessionStore(path)
    for i in range(5):
        store.save_session(make_session("cell1", i))
    initial, front, _ = region_tables()
    table_only = TuningSession(
        session_id="tables-1", initial_ve_table_front=initial, final_ve_table_front=front
    )
    store.append_to_dataset(table_only)  # in dataset.json only, no file of its own
    store.append_to_dataset(make_session("cell1", 0))  # also a file: read once
    (store.sessions_dir / "broken-1.json").write_text('{"session_id": "broken-1", "peak_hp": -5}')
    store.save_session(make_session("cell2", 7))  # another station's session in cell1's dir
    return store


def test_backfill_loads_a_data_dir_once_and_names_what_it_rejects(
    pg_db: TestDatabase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    station_dir(tmp_path / "data")
    args = [
        "collect",
        "--backfill",
        str(tmp_path / "data"),
        "--db",
        pg_db.url,
        "--station",
        "cell1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: rejected (schema)" in err and "broken-1.json" in err and "peak_hp" in err
    assert "error: rejected (station)" in err and "cell2-0007.json" in err
    assert "8 sessions read, 6 inserted, 0 already in the store, 2 rejected" in err
    stored = sorted(pg_db.session_ids())
    assert stored == [*(f"cell1-{i:04d}" for i in range(5)), "tables-1"]
    with pg_db.connect() as conn:
        got = conn.execute("SELECT station, source FROM sessions WHERE session_id='tables-1'")
        assert got.fetchone() == ("cell1", "backfill")

    # Again: nothing new, nothing twice.
    assert main(args) == 2
    assert (
        "8 sessions read, 0 inserted, 6 already in the store, 2 rejected" in capsys.readouterr().err
    )
    assert sorted(pg_db.session_ids()) == stored

    # Without --station each session's own run.station counts: cell2's session is fine now,
    # the table-only one names no station.
    assert main(["collect", "--backfill", str(tmp_path / "data"), "--db", pg_db.url]) == 2
    err = capsys.readouterr().err
    assert "names no run.station" in err and "1 inserted" in err
    assert "cell2-0007" in pg_db.session_ids()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--db", "postgresql://x@127.0.0.1/x"], "give --url"),
        (["--db", "host=a =b", "--url", "mqtt://127.0.0.1:1"], "not a PostgreSQL URL"),
        (["--db", "postgresql:///x", "--url", "http://h"], "mqtt://"),
        (["--db", "postgresql:///x", "--url", "mqtt://h", "--group", "a/b"], "--group"),
        (["--db", "postgresql:///x", "--url", "mqtt://h", "--backfill", "d"], "not both"),
        (["--db", "postgresql:///x", "--backfill", "/nonexistent/dir"], "not a directory"),
        (
            ["--db", "postgresql:///x", "--url", "mqtt://h", "--password-file", "/no/file"],
            "password",
        ),
        (["--db", "postgresql:///x", "--url", "mqtt://h", "--batch", "0"], "--batch"),
    ],
)
def test_bad_options_exit_2_with_an_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    assert main(["collect", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


# --------------------------------------------------------------------------- live, in process


@pytest.fixture
async def running(
    mosquitto: MosquittoBroker, pg_db: TestDatabase
) -> AsyncIterator[tuple[Collector, MosquittoBroker, TestDatabase]]:
    c = Collector(
        mqtt_url=mosquitto.url,
        db=SessionDb(pg_db.url),
        collector_id="inproc",
        health_interval=0.1,
        batch_max=10,
    )
    task = asyncio.create_task(c.run(), name="collector-under-test")
    await asyncio.wait_for(c.ready.wait(), 10)
    try:
        yield c, mosquitto, pg_db
    finally:
        c.stop()
        await asyncio.wait_for(task, 15)


class RawPublisher:
    """A plain paho MQTT 5 client that publishes whatever bytes it is given (QoS 1)."""

    def __init__(self, port: int) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def send(self, topic: str, data: bytes) -> None:
        self.c.publish(topic, data, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def test_bad_payloads_are_counted_never_stored_and_do_not_stop_it(
    running: tuple[Collector, MosquittoBroker, TestDatabase],
) -> None:
    _, broker, db = running
    good = [make_session("cell1", i) for i in range(4)]
    bad_schema = session_body(make_session("cell1", 50))
    bad_schema["afr_accuracy_rms_error"] = -1
    nul = make_session("cell1", 51).model_copy(update={"notes": "a\u0000b"})
    spoof = make_session("cell2", 52)  # says cell2, arrives on cell1's topic
    sends = [
        ("dynoai/cell1/session/cell1-0000", payload(good[0])),
        ("dynoai/cell1/session/x-1", b"\xff\x00garbage"),
        ("dynoai/cell1/session/x-2", b"{not json"),
        ("dynoai/cell1/session/x-3", b'"a string"'),
        ("dynoai/cell1/session/cell1-0050", json.dumps(bad_schema).encode()),
        ("dynoai/cell1/session/cell1-0001", payload(good[1])),
        ("dynoai/cell1/session/cell1-0002", payload(good[0])),  # id differs from topic
        ("dynoai/cell1/session/cell2-0052", payload(spoof)),
        ("dynoai/cell1/session/cell1-0051", payload(nul)),
        ("dynoai/cell1/session/last", b'{"session_id": "cell1-0001"}'),
        ("dynoai/cell1/session/cell1-0002", payload(good[2])),
    ]
    async with Subscriber(broker.port, "dynoai/collector/inproc/health") as health:
        pub = RawPublisher(broker.port)
        try:
            await asyncio.to_thread(lambda: [pub.send(t, d) for t, d in sends])
            await health.wait_for(lambda m: (m.json() or {}).get("acked") == len(sends))
            # Still alive: a good session after all that is stored.
            await asyncio.to_thread(pub.send, "dynoai/cell1/session/cell1-0003", payload(good[3]))
            h = (await health.wait_for(lambda m: (m.json() or {}).get("inserted") == 4)).json()
        finally:
            await asyncio.to_thread(pub.close)
    assert sorted(db.session_ids()) == [s.session_id for s in good]
    assert h["rejected"] == {
        "database": 1,
        "encoding": 1,
        "json": 2,
        "schema": 1,
        "session_id": 1,
        "station": 1,
    }
    assert h["ignored"] == 1 and h["duplicates"] == 0 and h["received"] == len(sends) + 1
    assert h["mqtt"]["filter"] == "$share/dynoai/dynoai/+/session/+"
    assert h["db"]["ok"] is True and "password" not in json.dumps(h)


async def test_published_by_the_daemons_publisher_and_redelivery_is_a_duplicate(
    running: tuple[Collector, MosquittoBroker, TestDatabase], start_publisher: Any
) -> None:
    c, broker, db = running
    pub = start_publisher(broker.url, "cell4")
    sessions = [make_session("cell4", i) for i in range(6)]
    for s in sessions:
        pub.publish_durable(pub.topic(f"session/{s.session_id}"), session_body(s))
    # The same session twice (an outbox re-send after a lost PUBACK looks like this).
    pub.publish_durable(pub.topic("session/cell4-0000"), session_body(sessions[0]))
    await asyncio.wait_for(pub.wait_flushed(), 10)
    await wait_for_stats(c, lambda: c.stats.inserted == 6 and c.stats.duplicates == 1)
    assert sorted(db.session_ids()) == [s.session_id for s in sessions]


async def wait_for_stats(c: Collector, cond: Any, within: float = 10.0) -> None:
    # The in-process counters have no change event: poll them.
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_sigterm_style_stop_publishes_offline_health_and_keeps_the_session(
    mosquitto_persistent: MosquittoBroker, pg_db: TestDatabase
) -> None:
    broker = mosquitto_persistent
    async with Subscriber(broker.port, "dynoai/collector/keep/health") as health:
        c = Collector(
            mqtt_url=broker.url, db=SessionDb(pg_db.url), collector_id="keep", health_interval=5
        )
        task = asyncio.create_task(c.run())
        await asyncio.wait_for(c.ready.wait(), 10)
        c.stop()
        await asyncio.wait_for(task, 10)
        last = (await health.wait_for(lambda m: (m.json() or {}).get("state") == "offline")).json()
        assert last["collector"] == "keep" and last["inserted"] == 0
    # While it is away, the broker queues sessions for its persistent session...
    raw = RawPublisher(broker.port)
    try:
        s = make_session("cell5", 1)
        await asyncio.to_thread(raw.send, "dynoai/cell5/session/cell5-0001", payload(s))
    finally:
        await asyncio.to_thread(raw.close)
    # ...and delivers them when it is back.
    c2 = Collector(mqtt_url=broker.url, db=SessionDb(pg_db.url), collector_id="keep")
    task = asyncio.create_task(c2.run())
    try:
        await wait_for_stats(c2, lambda: c2.stats.inserted == 1)
        assert c2.mqtt.session_present is True
    finally:
        c2.stop()
        await asyncio.wait_for(task, 10)
    assert pg_db.session_ids() == ["cell5-0001"]


async def test_pool_connections_are_named_for_pg_stat_activity(pg_db: TestDatabase) -> None:
    db = SessionDb(pg_db.url, application_name="dynoai-collect-x")
    await db.open()
    try:
        await db.migrate()
        with pg_db.connect() as conn:
            got = conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = %s",
                (pg_db.name,),
            ).fetchall()
    finally:
        await db.close()
    assert "dynoai-collect-x" in [str(r[0]) for r in got]


async def test_a_broker_that_is_down_at_start_is_waited_for(
    mosquitto: MosquittoBroker, pg_db: TestDatabase
) -> None:
    mosquitto.stop()
    c = Collector(mqtt_url=mosquitto.url, db=SessionDb(pg_db.url), collector_id="early")
    task = asyncio.create_task(c.run())
    try:
        await wait_for_stats(c, lambda: c.mqtt.connect_failures >= 1)
        assert c.mqtt.last_error == f"cannot connect to {mosquitto.url}"
        assert json.loads(c.health())["mqtt"]["connected"] is False
        mosquitto.start()
        await asyncio.wait_for(c.ready.wait(), 10)  # paho's reconnect backoff starts at 1 s
        assert c.mqtt.last_error is None
    finally:
        c.stop()
        await asyncio.wait_for(task, 10)


async def test_no_share_survives_sessions_published_right_after_a_broker_restart(
    mosquitto_persistent: MosquittoBroker, pg_db: TestDatabase
) -> None:
    """mosquitto (2.0.11 measured) restores plain subscriptions from its persistence file
    but not shared ones: a session published after a restart and before the collectors
    resubscribe has no subscriber and is dropped. A plain subscription (``--no-share``)
    holds it for the collector, which gets it when its reconnect backoff (>= 1 s) is over.
    """
    broker = mosquitto_persistent
    c = Collector(mqtt_url=broker.url, db=SessionDb(pg_db.url), collector_id="plain", share=False)
    task = asyncio.create_task(c.run())
    try:
        await asyncio.wait_for(c.ready.wait(), 10)
        assert c.mqtt.subscription == "dynoai/+/session/+"
        broker.restart()
        raw = RawPublisher(broker.port)  # at once: the collector is still in its backoff
        try:
            s = make_session("cell6", 1)
            await asyncio.to_thread(raw.send, "dynoai/cell6/session/cell6-0001", payload(s))
        finally:
            await asyncio.to_thread(raw.close)
        assert c.mqtt.connects == 1  # it had not reconnected yet
        await wait_for_stats(c, lambda: c.stats.inserted == 1)
    finally:
        c.stop()
        await asyncio.wait_for(task, 10)
    assert pg_db.session_ids() == ["cell6-0001"]

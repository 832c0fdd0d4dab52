"""MqttPublisher against a real mosquitto: delivery, last will, outages, retained state, stop."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dynoai_daemon.errors import ConfigError, PublishError
from dynoai_daemon.publish.mqtt import MqttPublisher, backoff_delay, parse_url
from dynoai_daemon.publish.outbox import Outbox
from dynoai_daemon.publish.topics import TOPIC_TABLE, Topics, encode_payload, filter_matches
from tests.mosquitto import MosquittoBroker, Received, Subscriber

StartPublisher = Callable[..., MqttPublisher]
REPO = Path(__file__).resolve().parents[1]


def _station() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------- pure parts


def test_topics_cover_the_contract() -> None:
    t = Topics("dynoai", "cell1")
    assert t.state == "dynoai/cell1/state"
    assert t.health == "dynoai/cell1/health"
    assert t.source_availability("widebands") == "dynoai/cell1/source/widebands/availability"
    assert t.live == "dynoai/cell1/live"
    assert t.run_current == "dynoai/cell1/run/current"
    assert t.run_cells("r1") == "dynoai/cell1/run/r1/cells"
    assert t.alert("lean") == "dynoai/cell1/alert/lean"
    assert t.session("s1") == "dynoai/cell1/session/s1"
    assert t.session_last == "dynoai/cell1/session/last"
    assert t.request("run/start") == "dynoai/cell1/request/run/start"
    assert t.response("build/set") == "dynoai/cell1/response/build/set"
    assert t.request_filter == "dynoai/cell1/request/#"
    assert t.command_of("dynoai/cell1/request/run/stop") == "run/stop"
    assert t.command_of("dynoai/cell1/response/run/stop") is None
    assert t.command_of("dynoai/other/request/ping") is None
    assert t.topic("health") == t.health


@pytest.mark.parametrize(
    ("suffix", "retain", "qos"),
    [
        ("state", True, 1),
        ("health", True, 0),
        ("source/ecu/availability", True, 1),
        ("live", False, 0),
        ("run/current", True, 1),
        ("run/r9/cells", False, 0),
        ("alert/knock", False, 1),
        ("session/abc", False, 1),
        ("session/last", True, 1),
        ("request/ping", False, 1),
        ("response/ping", False, 1),
    ],
)
def test_topic_table(suffix: str, retain: bool, qos: int) -> None:
    spec = Topics("dynoai", "s").spec(f"dynoai/s/{suffix}")
    assert (spec.retain, spec.qos) == (retain, qos)
    assert spec.durable == suffix.startswith(("alert/", "session/"))


def test_topic_validation() -> None:
    with pytest.raises(PublishError):
        Topics("dynoai/", "s")
    with pytest.raises(PublishError):
        Topics("dynoai", "a/b")
    t = Topics("dynoai", "s")
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(PublishError):
            t.alert(bad)
    assert filter_matches("run/+/cells", "run/x/cells")
    assert not filter_matches("run/+/cells", "run/x/y/cells")
    assert filter_matches("request/#", "request/run/start")
    assert filter_matches("request/#", "request")  # '#' also matches the parent level
    assert not filter_matches("run/+/cells", "")  # not a concrete topic: matches nothing
    assert len({s.pattern for s in TOPIC_TABLE}) == len(TOPIC_TABLE)


def test_encode_payload_is_compact_json_without_nan() -> None:
    data = encode_payload(
        {
            "a": math.nan,
            "b": [1.5, math.inf],
            "c": np.float64("nan"),
            "d": np.arange(3),
            "e": np.int64(7),
            "f": "ü",
        }
    )
    assert data == '{"a":null,"b":[1.5,null],"c":null,"d":[0,1,2],"e":7,"f":"ü"}'.encode()
    assert encode_payload(None) == b""
    with pytest.raises(PublishError):
        encode_payload({"x": object()})


def test_parse_url_and_backoff() -> None:
    assert parse_url("mqtt://broker") == ("broker", 1883, False, None)
    assert parse_url("mqtts://user@broker:9999") == ("broker", 9999, True, "user")
    with pytest.raises(ConfigError):
        parse_url("http://x")
    with pytest.raises(ConfigError, match="password_file"):
        parse_url("mqtt://u:secret@x")
    for attempt in range(1, 20):
        d = backoff_delay(attempt, 0.5, 30.0)
        cap = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert cap / 2 <= d <= cap


def test_password_file_is_read_and_never_shown(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret-value\n")
    with Outbox(tmp_path / "o.sqlite") as box:
        pub = MqttPublisher(
            url="mqtt://127.0.0.1:1", station="s", outbox=box, username="u", password_file=pw
        )
        assert pub._password == "s3cret-value"
        assert "s3cret" not in json.dumps(pub.stats())
        with pytest.raises(ConfigError, match="password file"):
            MqttPublisher(url="mqtt://x", station="s", outbox=box, password_file=tmp_path / "no")


# ------------------------------------------------------------------------- with mosquitto


async def test_round_trip_durable_retained_live(
    mqtt_broker: MosquittoBroker, start_publisher: StartPublisher
) -> None:
    st = _station()
    async with Subscriber(mqtt_broker.port, f"dynoai/{st}/#") as sub:
        pub = start_publisher(mqtt_broker.url, st)
        await asyncio.wait_for(pub.connected.wait(), 10)
        online = await sub.wait_for(lambda m: m.topic.endswith("/state"))
        assert online.json()["state"] == "online"
        assert online.json()["version"]

        mid = pub.publish_durable(pub.topic("alert/lean"), {"id": "a1", "value": math.nan})
        alert = await sub.wait_for(lambda m: m.topic == f"dynoai/{st}/alert/lean")
        assert alert.json() == {"id": "a1", "value": None}
        assert alert.qos == 1
        await asyncio.wait_for(pub.wait_flushed(), 5)
        assert pub.outbox.depth() == 0 and pub.published == 1 and len(mid) == 32

        pub.publish_retained(pub.topic("source/widebands/availability"), {"state": "online"})
        m = await sub.wait_for(lambda m: m.topic.endswith("/availability"))
        assert m.json() == {"state": "online"}

        pub.publish_live(pub.topic("live"), {"values": {"rpm": 2500.0}})
        m = await sub.wait_for(lambda m: m.topic.endswith("/live"))
        assert m.json() == {"values": {"rpm": 2500.0}} and m.qos == 0

    # A late subscriber gets the retained ones, flagged retained; never the live or alert.
    async with Subscriber(mqtt_broker.port, f"dynoai/{st}/#") as late:
        got = {(await late.get()).topic for _ in range(2)}
        assert got == {f"dynoai/{st}/state", f"dynoai/{st}/source/widebands/availability"}
        assert late.drain() == []
    stats = pub.stats()
    assert stats["published_live"] == 1 and stats["dropped_live"] == 0
    assert stats["connected"] is True and stats["outbox_depth"] == 0


_KILLED_PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from dynoai_daemon.publish.mqtt import MqttPublisher

    async def main():
        pub = MqttPublisher(url=sys.argv[1], station=sys.argv[2], outbox=sys.argv[3])
        task = asyncio.create_task(pub.run())
        await pub.connected.wait()
        print("online", flush=True)
        await task

    asyncio.run(main())
    """
)


async def test_last_will_when_the_process_is_killed(
    mqtt_broker: MosquittoBroker, tmp_path: Path
) -> None:
    st = _station()
    state_topic = f"dynoai/{st}/state"
    async with Subscriber(mqtt_broker.port, state_topic) as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _KILLED_PUBLISHER, mqtt_broker.url, st,
            str(tmp_path / "o.sqlite"),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):  # structlog's default output shares stdout
                while (line := await proc.stdout.readline()).strip() != b"online":
                    assert line, "publisher process ended"
            m = await sub.wait_for(lambda m: m.topic == state_topic)
            assert m.json()["state"] == "online"
            proc.kill()  # SIGKILL: no DISCONNECT is ever sent
            await proc.wait()
            m = await sub.wait_for(lambda m: m.topic == state_topic, within=15)
            assert m.json() == {
                "state": "offline",
                "version": m.json()["version"],
                "since": None,
                "reason": "connection lost",
            }
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    async with Subscriber(mqtt_broker.port, state_topic) as late:
        m = await late.get()
        assert m.retain and m.json()["state"] == "offline"


async def test_outbox_survives_broker_outage_in_order(
    mosquitto_persistent: MosquittoBroker, start_publisher: StartPublisher
) -> None:
    broker = mosquitto_persistent
    st = _station()
    total = 70
    seen: list[int] = []
    all_seen = asyncio.Event()

    async with Subscriber(broker.port, f"dynoai/{st}/alert/#", persistent=True) as sub:

        async def collect() -> None:
            while True:
                m = await sub.queue.get()
                n = m.json()["n"]
                if n not in seen:
                    seen.append(n)
                if len(seen) == total:
                    all_seen.set()

        collector = asyncio.create_task(collect())
        try:
            pub = start_publisher(broker.url, st, keepalive=2, timeout=3.0)
            await asyncio.wait_for(pub.connected.wait(), 10)
            n = 0
            for _ in range(20):
                pub.publish_durable(pub.topic("alert/lean"), {"id": f"a{n}", "n": n})
                n += 1
                await asyncio.sleep(0)
            await asyncio.to_thread(broker.stop)
            await asyncio.wait_for(pub.disconnected.wait(), 10)
            failures_before = pub.connect_failures
            for _ in range(30):  # alerts keep coming for ~1 s while the broker is away
                pub.publish_durable(pub.topic("alert/lean"), {"id": f"a{n}", "n": n})
                n += 1
                await asyncio.sleep(0.03)
            assert pub.outbox.depth() >= 30
            assert pub.connect_failures > failures_before  # it kept retrying
            await asyncio.to_thread(broker.start)
            for _ in range(20):
                pub.publish_durable(pub.topic("alert/lean"), {"id": f"a{n}", "n": n})
                n += 1
                await asyncio.sleep(0)
            await asyncio.wait_for(all_seen.wait(), 30)
            await asyncio.wait_for(pub.wait_flushed(), 10)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
    assert seen == list(range(total))  # none lost, in order of first delivery
    assert pub.outbox.depth() == 0
    assert pub.reconnects >= 1


async def test_retained_state_republished_after_broker_restart(
    mosquitto: MosquittoBroker, start_publisher: StartPublisher
) -> None:
    st = _station()
    pub = start_publisher(mosquitto.url, st)
    await asyncio.wait_for(pub.connected.wait(), 10)
    pub.publish_retained(pub.topic("source/dyno/availability"), {"state": "online"})
    pub.publish_retained(pub.topic("run/current"), {"run_id": "r1"})
    pub.publish_retained(pub.topic("run/current"), None)  # the run closed: cleared
    pub.publish_retained(pub.topic("health"), {"ok": True})
    pub.publish_durable(pub.topic("session/last"), {"session_id": "s1"})
    await asyncio.wait_for(pub.wait_flushed(), 5)

    # The broker loses everything (no persistence) and comes back.
    await asyncio.to_thread(mosquitto.stop)
    await asyncio.wait_for(pub.disconnected.wait(), 10)
    await asyncio.to_thread(mosquitto.start)
    await asyncio.wait_for(pub.connected.wait(), 10)

    async with Subscriber(mosquitto.port, f"dynoai/{st}/#") as sub:
        want = {"state", "source/dyno/availability", "health", "session/last"}
        got: dict[str, Received] = {}
        async with asyncio.timeout(10):
            while not want <= set(got):
                m = await sub.get()
                got[m.topic.removeprefix(f"dynoai/{st}/")] = m
        assert got["state"].json()["state"] == "online"
        assert got["source/dyno/availability"].json() == {"state": "online"}
        assert got["health"].json() == {"ok": True}
        assert got["session/last"].json() == {"session_id": "s1"}
        # The cleared run/current never comes back with content.
        late = [got.get("run/current"), *sub.drain()]
        assert all(m.payload == b"" for m in late if m and m.topic.endswith("run/current"))
    assert pub.reconnects == 1


async def test_graceful_stop_flushes_then_goes_offline(
    mqtt_broker: MosquittoBroker, tmp_path: Path
) -> None:
    st = _station()
    pub = MqttPublisher(url=mqtt_broker.url, station=st, outbox=tmp_path / "o.sqlite")
    async with Subscriber(mqtt_broker.port, f"dynoai/{st}/#") as sub:
        task = asyncio.create_task(pub.run())
        try:
            await asyncio.wait_for(pub.connected.wait(), 10)
            for i in range(10):
                pub.publish_durable(pub.topic(f"session/s{i}"), {"i": i})
            await asyncio.wait_for(pub.stop(flush_timeout=5), 10)
            await asyncio.wait_for(task, 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        order: list[str] = []
        async with asyncio.timeout(10):
            while True:
                m = await sub.get()
                order.append(m.topic.rsplit("/", 1)[1])
                if m.topic.endswith("/state") and m.json()["state"] == "offline":
                    assert m.json()["reason"] == "shutdown"
                    break
    assert order == ["state", *[f"s{i}" for i in range(10)], "state"]
    assert pub.outbox.closed  # it opened the outbox, so it closed it
    with Outbox(tmp_path / "o.sqlite") as box:
        assert box.depth() == 0


async def test_stop_with_broker_down_keeps_the_outbox_for_the_next_start(
    mosquitto: MosquittoBroker, tmp_path: Path, start_publisher: StartPublisher
) -> None:
    st = _station()
    path = tmp_path / "o.sqlite"
    pub = MqttPublisher(url=mosquitto.url, station=st, outbox=path, backoff_initial=0.05,
                        backoff_max=0.2, timeout=3.0, keepalive=2)  # fmt: skip
    task = asyncio.create_task(pub.run())
    try:
        await asyncio.wait_for(pub.connected.wait(), 10)
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.wait_for(pub.disconnected.wait(), 10)
        ids = [pub.publish_durable(pub.topic("alert/knock"), {"n": i}) for i in range(5)]
        pub.publish_live(pub.topic("live"), {"x": 1})
        assert pub.dropped_live == 1
        await asyncio.wait_for(pub.stop(flush_timeout=0.2), 10)
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    with Outbox(path) as box:
        assert [m.msg_id for m in box.peek(10)] == ids

    await asyncio.to_thread(mosquitto.start)
    async with Subscriber(mosquitto.port, f"dynoai/{st}/alert/#") as sub:
        again = start_publisher(mosquitto.url, st, outbox=path)
        got = [(await sub.get()).json()["n"] for _ in range(5)]
        assert got == list(range(5))
        await asyncio.wait_for(again.wait_flushed(), 5)
        assert again.outbox.depth() == 0


async def test_requests_are_answered_through_the_handler(
    mqtt_broker: MosquittoBroker, start_publisher: StartPublisher
) -> None:
    st = _station()
    calls: list[tuple[str, bytes]] = []

    async def handler(topic: str, payload: bytes) -> tuple[str, dict[str, Any]] | None:
        calls.append((topic, payload))
        return topic.replace("/request/", "/response/"), {"status": "ok", "echo": len(calls)}

    pub = start_publisher(mqtt_broker.url, st, command_handler=handler)
    await asyncio.wait_for(pub.connected.wait(), 10)
    async with Subscriber(mqtt_broker.port, f"dynoai/{st}/response/#") as sub:
        import aiomqtt

        async with aiomqtt.Client("127.0.0.1", mqtt_broker.port) as c:
            for i in range(3):
                await c.publish(f"dynoai/{st}/request/ping", b"{}", qos=1)
                m = await sub.get()
                assert m.topic == f"dynoai/{st}/response/ping"
                assert m.json() == {"status": "ok", "echo": i + 1}
    assert [t for t, _ in calls] == [f"dynoai/{st}/request/ping"] * 3


async def test_publish_round_trip_latency(
    mqtt_broker: MosquittoBroker, start_publisher: StartPublisher
) -> None:
    """Measures (does not assert) the QoS 1 publish-to-PUBACK time through the outbox."""
    st = _station()
    pub = start_publisher(mqtt_broker.url, st)
    await asyncio.wait_for(pub.connected.wait(), 10)
    loop = asyncio.get_running_loop()
    n = 200
    t0 = loop.time()
    for i in range(n):
        pub.publish_durable(pub.topic("alert/x"), {"i": i})
        await asyncio.wait_for(pub.wait_flushed(), 5)
    per_msg_ms = (loop.time() - t0) / n * 1000
    print(f"\nQoS1 via outbox (put+fsync, publish, PUBACK, ack): {per_msg_ms:.2f} ms/message")
    assert pub.published == n


async def test_stop_is_bounded_when_the_broker_hangs(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A frozen broker (SIGSTOP: TCP open, nothing answers) cannot hold shutdown hostage."""
    st = _station()
    path = tmp_path / "o.sqlite"
    pub = MqttPublisher(url=mosquitto.url, station=st, outbox=path, timeout=30.0)
    task = asyncio.create_task(pub.run())
    assert mosquitto.proc is not None
    pid = mosquitto.proc.pid
    try:
        await asyncio.wait_for(pub.connected.wait(), 10)
        os.kill(pid, signal.SIGSTOP)
        mid = pub.publish_durable(pub.topic("alert/iat"), {"n": 1})
        # Both phases give up on their own; the publish timeout (30 s) is never reached.
        await asyncio.wait_for(pub.stop(flush_timeout=0.2, close_timeout=0.2), 5)
        assert not task.done()  # still stuck in the broker: the caller cancels it
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        os.kill(pid, signal.SIGCONT)
    assert pub.outbox.closed
    with Outbox(path) as box:
        assert [m.msg_id for m in box.peek(10)] == [mid]

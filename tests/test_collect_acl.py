"""Who may write what: the shipped mosquitto ACL and password examples, on a real broker.

The broker runs the repository's ``systemd/mosquitto-dynoai.conf.example`` (listener and
paths moved into a temp dir) with ``mosquitto-dynoai.acl.example`` and the password file
``mosquitto-passwd.example`` hashed by ``mosquitto_passwd -U``, plus one more station
added with ``mosquitto_passwd -b``, exactly as the files' instructions say. Stations are
plain paho MQTT 5 clients, so the broker's PUBACK reason code (135, not authorized) is
visible; the collector runs in process with its own credentials.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from dynoai_daemon.collect import Collector, SessionDb
from tests.collect_support import REPO, make_session, pg_db, session_body
from tests.mosquitto import MosquittoBroker, find_mosquitto
from tests.pg import TestDatabase

__all__ = ["pg_db"]  # the fixture, imported for pytest

EXAMPLES = REPO / "systemd"
NOT_AUTHORIZED = 135


@pytest.fixture
def acl_broker() -> Iterator[MosquittoBroker]:
    """mosquitto with the example config, ACL and password file."""
    passwd_tool = shutil.which("mosquitto_passwd")
    if find_mosquitto() is None or passwd_tool is None:
        pytest.skip("mosquitto / mosquitto_passwd not installed (apt-get install mosquitto)")
    broker = MosquittoBroker()  # its own dir under /tmp, reachable for the mosquitto user
    d = broker.workdir
    d.chmod(0o777)  # persistence: the broker saves its database here as user mosquitto
    shutil.copy(EXAMPLES / "mosquitto-passwd.example", d / "dynoai.passwd")
    subprocess.run([passwd_tool, "-U", str(d / "dynoai.passwd")], check=True)
    subprocess.run([passwd_tool, "-b", str(d / "dynoai.passwd"), "cell4", "s3cret"], check=True)
    shutil.copy(EXAMPLES / "mosquitto-dynoai.acl.example", d / "dynoai.acl")
    conf = (EXAMPLES / "mosquitto-dynoai.conf.example").read_text()
    for old, new in (
        ("listener 1883", f"listener {broker.port} 127.0.0.1"),
        ("/etc/mosquitto/dynoai.passwd", str(d / "dynoai.passwd")),
        ("/etc/mosquitto/dynoai.acl", str(d / "dynoai.acl")),
        ("/var/lib/mosquitto/", f"{d}/"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    broker.conf.write_text(conf + "log_dest stderr\nlog_type all\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


class Client:
    """A paho MQTT 5 client with a user name; records PUBACK reason codes and messages."""

    def __init__(self, port: int, user: str, password: str, client_id: str) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.c.username_pw_set(user, password)
        self.acks: dict[int, int] = {}
        self.received: list[str] = []
        self.connack: int | None = None
        self._cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_connect(
        self, c: paho.Client, u: object, f: object, rc: ReasonCode, p: Properties | None
    ) -> None:
        with self._cond:
            self.connack = rc.value
            self._cond.notify_all()

    def _on_publish(
        self, c: paho.Client, u: object, mid: int, rc: ReasonCode, p: Properties | None
    ) -> None:
        with self._cond:
            self.acks[mid] = rc.value
            self._cond.notify_all()

    def _on_subscribe(
        self, c: paho.Client, u: object, mid: int, rcs: list[ReasonCode], p: Properties | None
    ) -> None:
        with self._cond:
            self.acks[mid] = rcs[0].value
            self._cond.notify_all()

    def _on_message(self, c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        with self._cond:
            self.received.append(m.topic)
            self._cond.notify_all()

    def wait_connack(self) -> int:
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, 5)
            assert self.connack is not None
            return self.connack

    def publish(self, topic: str, data: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.c.publish(topic, data, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, 5), topic
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=1))
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.acks, 5), topic

    def wait_message(self, topic: str) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: topic in self.received, 5), topic
            return list(self.received)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
async def acl_collector(
    acl_broker: MosquittoBroker, pg_db: TestDatabase
) -> AsyncIterator[Collector]:
    c = Collector(
        mqtt_url=acl_broker.url,
        db=SessionDb(pg_db.url),
        collector_id="collector-a",
        username="collector-a",
        password="change-me-collector-a",
        health_interval=0.2,
    )
    task = asyncio.create_task(c.run(), name="acl-collector")
    try:
        await asyncio.wait_for(c.ready.wait(), 10)
        yield c
    finally:
        c.stop()
        await asyncio.wait_for(task, 10)


def body(station: str, n: int, claims: str | None = None) -> bytes:
    s = make_session(claims or station, n)
    data = session_body(s)
    data["session_id"] = f"{station}-{n:04d}"
    data["run"]["run_id"] = data["session_id"]
    return json.dumps(data).encode()


async def test_a_station_writes_only_under_its_own_id(
    acl_broker: MosquittoBroker, acl_collector: Collector, pg_db: TestDatabase
) -> None:
    port = acl_broker.port

    def stations() -> dict[str, int]:
        cell1 = Client(port, "cell1", "change-me-cell1", "st-cell1")
        cell4 = Client(port, "cell4", "s3cret", "st-cell4")  # added with mosquitto_passwd -b
        try:
            assert cell1.wait_connack() == 0 and cell4.wait_connack() == 0
            codes = {
                "own": cell1.publish("dynoai/cell1/session/cell1-0001", body("cell1", 1)),
                # cell1 pretends to be cell2, on cell2's topic: the broker refuses it.
                "other": cell1.publish("dynoai/cell2/session/cell2-0001", body("cell2", 1)),
                # cell1's own topic, but the session says cell2: the collector refuses it.
                "claims": cell1.publish(
                    "dynoai/cell1/session/cell1-0002", body("cell1", 2, claims="cell2")
                ),
                "cell4": cell4.publish("dynoai/cell4/session/cell4-0001", body("cell4", 1)),
                "outside": cell4.publish("elsewhere/x", b"{}"),
            }
        finally:
            cell1.close()
            cell4.close()
        collector = Client(port, "collector-a", "change-me-collector-a", "fake-a")
        try:
            assert collector.wait_connack() == 0
            codes["collector writes"] = collector.publish(
                "dynoai/cell1/session/cell1-0003", body("cell1", 3)
            )
        finally:
            collector.close()
        bad = Client(port, "cell1", "wrong", "st-bad")
        try:
            codes["wrong password"] = bad.wait_connack()
        finally:
            bad.close()
        return codes

    codes = await asyncio.to_thread(stations)
    assert codes["own"] < 128 and codes["cell4"] < 128 and codes["claims"] < 128, codes
    assert codes["other"] == NOT_AUTHORIZED, codes
    assert codes["outside"] == NOT_AUTHORIZED, codes
    assert codes["collector writes"] == NOT_AUTHORIZED, codes
    assert codes["wrong password"] >= 128, codes  # CONNACK refused

    c = acl_collector
    async with asyncio.timeout(10):
        while c.stats.received < 3:  # noqa: ASYNC110 - in-process counters have no event
            await asyncio.sleep(0.02)
    assert sorted(pg_db.session_ids()) == ["cell1-0001", "cell4-0001"]
    assert c.stats.received == 3 and c.stats.rejected == {"station": 1}, c.stats


def test_a_station_cannot_read_another_stations_sessions(acl_broker: MosquittoBroker) -> None:
    port = acl_broker.port
    cell2 = Client(port, "cell2", "change-me-cell2", "st-cell2")
    cell1 = Client(port, "cell1", "change-me-cell1", "st-cell1")
    console = Client(port, "console", "change-me-console", "console")
    try:
        assert cell2.wait_connack() == 0
        cell2.subscribe("dynoai/+/session/+")
        cell2.subscribe("dynoai/cell2/request/#")
        assert cell1.publish("dynoai/cell1/session/cell1-0009", body("cell1", 9)) < 128
        # The broker handles cell1's session before the console's request: if the session
        # were delivered to cell2, it would be there before the request.
        assert console.publish("dynoai/cell2/request/ping", b"{}") < 128
        got = cell2.wait_message("dynoai/cell2/request/ping")
        assert got == ["dynoai/cell2/request/ping"]
    finally:
        for c in (cell1, cell2, console):
            c.close()

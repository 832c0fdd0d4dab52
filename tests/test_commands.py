"""Command requests: every bad request gets an error reply, good ones reach the handler."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from dynoai_daemon.publish.commands import MAX_REQUEST_BYTES, CommandError, CommandRouter
from dynoai_daemon.publish.mqtt import MqttPublisher
from dynoai_daemon.publish.topics import Topics
from tests.mosquitto import MosquittoBroker, Subscriber

T = Topics("dynoai", "cell1")

GOOD_BUILD = {"engine_family": "milwaukee_8", "displacement_ci": 114, "stage": "stage_2"}


class Station:
    """A stand-in for the daemon's command side that records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def dispatch(self, cmd: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append((cmd, body))
        if cmd == "ping":
            return {"pong": True}
        if cmd == "run/start":
            return {"run_id": "r1"}
        if cmd == "run/stop":
            raise CommandError("no run is open")
        if cmd == "build/set":
            return {"build": body["build"]}
        raise AssertionError(cmd)


def _router(station: Station, **kw: Any) -> CommandRouter:
    return CommandRouter.for_dispatcher(station.dispatch, topics=T, **kw)


async def test_ping_ok_with_transaction() -> None:
    st = Station()
    topic, body = await _router(st).handle(T.request("ping"), b'{"transaction": "tx-1"}') or (
        "",
        {},
    )
    assert topic == T.response("ping")
    assert body == {"status": "ok", "data": {"pong": True}, "error": None, "transaction": "tx-1"}
    # An empty payload is an empty request.
    _, body = await _router(st).handle(T.request("ping"), b"") or ("", {})
    assert body["status"] == "ok" and body["transaction"] is None


@pytest.mark.parametrize(
    ("cmd", "payload", "error"),
    [
        ("ping", b"\xff\xfe garbage", "not valid JSON"),
        ("ping", b"{not json", "not valid JSON"),
        ("ping", b"[1, 2]", "must be a JSON object"),
        ("ping", b'"text"', "must be a JSON object"),
        ("ping", b" " + b"x" * MAX_REQUEST_BYTES, "too large"),
        ("reboot", b"{}", "unknown command 'reboot'"),
        ("run/start/now", b"{}", "unknown command"),
        ("ping", b'{"unexpected": 1}', "unexpected: Extra inputs are not permitted"),
        ("ping", b'{"transaction": 5}', "transaction"),
        ("build/set", b"{}", "build: Field required"),
        ("build/set", b'{"build": "M8"}', "build"),
        ("run/stop", b"{}", "no run is open"),
    ],
)
async def test_bad_requests_get_error_replies(cmd: str, payload: bytes, error: str) -> None:
    st = Station()
    router = _router(st)
    reply = await router.handle(T.request(cmd), payload)
    assert reply is not None
    topic, body = reply
    assert topic == T.response(cmd)
    assert body["status"] == "error" and body["data"] is None
    assert error in body["error"]
    assert router.errors == 1
    # The router keeps working after every kind of failure.
    _, ok = await router.handle(T.request("ping"), b"{}") or ("", {})
    assert ok["status"] == "ok"
    # Only valid requests reached the handler.
    expected = 1 if cmd in ("run/stop",) else 0
    assert len([c for c in st.calls if c[0] != "ping"]) == expected


async def test_transaction_is_echoed_on_errors() -> None:
    reply = await _router(Station()).handle(
        T.request("build/set"), b'{"transaction": "abc", "build": {"displacement_ci": 9}}'
    )
    assert reply is not None and reply[1]["transaction"] == "abc"
    assert reply[1]["status"] == "error"


async def test_size_limit_is_configurable() -> None:
    router = _router(Station(), max_bytes=16)
    reply = await router.handle(T.request("ping"), b'{"transaction": "0123456789"}')
    assert reply is not None and "too large" in reply[1]["error"]


async def test_not_a_request_topic_is_ignored() -> None:
    router = _router(Station())
    assert await router.handle("dynoai/cell1/response/ping", b"{}") is None
    assert await router.handle("dynoai/other/request/ping", b"{}") is None
    assert router.handled == 0


async def test_without_topics_any_request_prefix_works() -> None:
    router = CommandRouter.for_dispatcher(Station().dispatch)
    reply = await router.handle("x/y/request/ping", b"{}")
    assert reply is not None and reply[0] == "x/y/response/ping"
    assert await router.handle("x/y/other", b"{}") is None


async def test_handler_exceptions_and_timeouts_become_errors() -> None:
    async def boom(body: dict[str, Any]) -> dict[str, Any] | None:
        raise RuntimeError("kaput")

    async def slow(body: dict[str, Any]) -> dict[str, Any] | None:
        await asyncio.Event().wait()
        return None

    router = CommandRouter({"ping": boom, "run/start": slow}, topics=T, timeout_s=0.05)
    _, body = await router.handle(T.request("ping"), b"{}") or ("", {})
    assert body["status"] == "error" and body["error"] == "RuntimeError: kaput"
    _, body = await router.handle(T.request("run/start"), b"{}") or ("", {})
    assert body["status"] == "error" and "timed out" in body["error"]


async def test_build_set_uses_the_injected_validator() -> None:
    seen: list[dict[str, Any]] = []

    def validator(build: dict[str, Any]) -> dict[str, Any]:
        seen.append(build)
        if build.get("displacement_ci", 0) < 45:
            raise ValueError("displacement_ci too small")
        return {**build, "normalised": True}

    st = Station()
    router = _router(st, build_validator=validator)
    _, body = await router.handle(
        T.request("build/set"), b'{"build": {"displacement_ci": 10}}'
    ) or ("", {})
    assert body["status"] == "error" and "displacement_ci too small" in body["error"]
    assert st.calls == []
    _, body = await router.handle(
        T.request("build/set"), b'{"build": {"displacement_ci": 114}}'
    ) or ("", {})
    assert body["status"] == "ok"
    assert body["data"] == {"build": {"displacement_ci": 114, "normalised": True}}
    assert len(seen) == 2


async def test_build_set_with_the_project_model() -> None:
    # No skip when the models fail to import: build/set validates with them in production,
    # so a broken schema must fail here, not vanish from the run.
    st = Station()
    router = _router(st)
    bad = json.dumps({"build": {"engine_family": "milwaukee_8", "displacement_ci": 500}}).encode()
    _, body = await router.handle(T.request("build/set"), bad) or ("", {})
    assert body["status"] == "error" and "displacement_ci" in body["error"]
    good = json.dumps({"build": GOOD_BUILD, "transaction": "t9"}).encode()
    _, body = await router.handle(T.request("build/set"), good) or ("", {})
    assert body["status"] == "ok", body
    assert body["data"]["build"]["displacement_ci"] == 114
    assert body["transaction"] == "t9"


async def test_commands_over_a_real_broker(mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    station = f"t{uuid.uuid4().hex[:10]}"
    topics = Topics("dynoai", station)
    st = Station()
    router = CommandRouter.for_dispatcher(st.dispatch, topics=topics, build_validator=None)
    pub = MqttPublisher(url=mqtt_broker.url, station=station, outbox=tmp_path / "o.sqlite",
                        command_handler=router.handle)  # fmt: skip
    task = asyncio.create_task(pub.run())
    try:
        await asyncio.wait_for(pub.connected.wait(), 10)
        async with (
            Subscriber(mqtt_broker.port, f"dynoai/{station}/response/#") as sub,
            aiomqtt.Client("127.0.0.1", mqtt_broker.port) as client,
        ):
            requests = [
                ("ping", b"garbage"),
                ("ping", b"x" * (MAX_REQUEST_BYTES + 1)),
                ("selfdestruct", b"{}"),
                ("build/set", b'{"build": 1}'),
                ("ping", b'{"transaction": "last"}'),
            ]
            for cmd, payload in requests:
                await client.publish(topics.request(cmd), payload, qos=1)
            replies = [await sub.get() for _ in requests]
        assert [r.topic for r in replies] == [topics.response(c) for c, _ in requests]
        statuses = [r.json()["status"] for r in replies]
        assert statuses == ["error", "error", "error", "error", "ok"]
        assert replies[-1].json() == {
            "status": "ok",
            "data": {"pong": True},
            "error": None,
            "transaction": "last",
        }
        assert all(r.qos == 1 and not r.retain for r in replies)
        assert st.calls == [("ping", {"transaction": "last"})]
    finally:
        await pub.stop(flush_timeout=1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

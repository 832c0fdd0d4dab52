"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynoai_daemon.service.sdnotify import SdNotifier, watchdog_interval, watchdog_task


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def _pending(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5.0)
    return out


def test_ready_status_stopping(notify_socket: socket.socket) -> None:
    n = SdNotifier()
    assert n.enabled
    assert n.ready("2 sources\nok")
    assert _recv(notify_socket) == ["READY=1", "STATUS=2 sources ok"]
    assert n.status("running")
    assert _recv(notify_socket) == ["STATUS=running"]
    assert n.watchdog()
    assert _recv(notify_socket) == ["WATCHDOG=1"]
    assert n.stopping()
    assert _recv(notify_socket) == ["STOPPING=1"]
    assert n.sent == 4 and n.failed == 0


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dynoai-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SdNotifier().ready()
        assert _recv(sock) == ["READY=1"]
    finally:
        sock.close()


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SdNotifier()
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False


def test_missing_socket_counts_failure_without_raising(tmp_path: Path) -> None:
    n = SdNotifier(str(tmp_path / "nobody-listens"))
    assert n.enabled
    assert n.ready() is False
    assert n.failed == 1


def test_watchdog_interval_from_env() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_only_while_healthy(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SdNotifier()
    healthy = True
    calls_while_sick = 0
    sick_checked = asyncio.Event()

    def is_healthy() -> bool:
        nonlocal calls_while_sick
        if not healthy:
            calls_while_sick += 1
            if calls_while_sick >= 3:
                sick_checked.set()
        return healthy

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(watchdog_task(notifier, is_healthy))
    try:
        for _ in range(2):
            data = await loop.run_in_executor(None, notify_socket.recv, 4096)
            assert data == b"WATCHDOG=1"
        healthy = False
        _pending(notify_socket)  # a ping sent just before the switch may be queued
        await asyncio.wait_for(sick_checked.wait(), 5)
        # Three checks ran while unhealthy: none of them may have pinged.
        assert _pending(notify_socket) == []
        healthy = True
        data = await loop.run_in_executor(None, notify_socket.recv, 4096)
        assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_task_returns_without_watchdog(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(watchdog_task(SdNotifier(), lambda: True), 1)
    assert _pending(notify_socket) == []


async def test_health_check_exception_withholds_ping(notify_socket: socket.socket) -> None:
    checked = asyncio.Event()

    def broken() -> bool:
        checked.set()
        raise RuntimeError("core wedged")

    task = asyncio.create_task(watchdog_task(SdNotifier(), broken, interval=0.01))
    try:
        await asyncio.wait_for(checked.wait(), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert _pending(notify_socket) == []


# ----------------------------------------------------------------------------- logging
# (logs_setup is the other half of the service plumbing: what systemd's journal receives)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def test_json_logs_carry_station_and_route_stdlib(restore_logging: None) -> None:
    import io
    import json
    import logging
    import math

    import structlog

    from dynoai_daemon.logs_setup import configure_logging

    out = io.StringIO()  # not a TTY: JSON lines
    configure_logging("info", station="cell7", stream=out)
    structlog.get_logger("dynoai.test").info("hello", value=math.nan, run="r1")
    structlog.get_logger("dynoai.test").debug("below the level")
    logging.getLogger("some.library").warning("from stdlib %d", 42)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["hello", "from stdlib 42"]
    assert all(x["station"] == "cell7" for x in lines)
    assert lines[0]["value"] is None and lines[0]["run"] == "r1" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "some.library" and lines[1]["level"] == "warning"
    assert lines[0]["timestamp"].endswith("Z")


def test_console_logs_are_key_value(restore_logging: None) -> None:
    import io

    import structlog

    from dynoai_daemon.logs_setup import configure_logging

    out = io.StringIO()
    configure_logging("debug", station="cell8", json=False, stream=out)
    structlog.get_logger("x").debug("pretty", a=1)
    text = out.getvalue()
    # one line for people: the station is the same on every line and is left out
    assert "pretty" in text and "a=1" in text and "station" not in text
    assert not text.lstrip().startswith("{")
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", station="x", stream=out)

"""Shared test fixtures: a real mosquitto broker, and a leak check around every test.

Brokers: ``mqtt_broker`` is one mosquitto for the whole session (tests that only publish
and subscribe); ``mosquitto`` is a broker of the test's own (tests that stop, kill or
restart it). Both listen on a free 127.0.0.1 port, never 1883. Tests using them are
skipped, with the reason, when the ``mosquitto`` binary is not installed (CI installs it
with apt).

Leak check (autouse, every test): a test fails in teardown if, after its own fixtures are
torn down, it left behind

- asyncio tasks still pending in its event loop (async tests on the default
  function-scoped loop; checked just before the loop closes, after three loop turns of
  grace, and then cancelled so they do not spill into other tests);
- non-daemon threads that did not exist before the test (each joined for up to 1 s
  first);
- child processes that are still running (zombies count as ended), after up to 1 s;
- listening TCP sockets or bound UDP sockets owned by this process that were not open
  before the test (from ``/proc/self/fd`` inodes matched against ``/proc/net/{tcp,udp}*``;
  after one ``gc.collect()`` for sockets only the garbage collector would close).

Session-scoped fixtures (like ``mqtt_broker``) are set up before the snapshot and are not
leaks. A test may opt out of one check with ``@pytest.mark.leaks_ok("tasks", "threads",
"processes", "sockets")``, saying why in a comment. The check costs
well under a millisecond per test when nothing leaked.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import MosquittoBroker, find_mosquitto

LEAK_KINDS = ("tasks", "threads", "processes", "sockets")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leaks_ok(*kinds): skip the leak check for kinds among tasks, threads, processes, sockets",
    )


def _allowed(item: pytest.Item) -> set[str]:
    allowed: set[str] = set()
    for mark in item.iter_markers("leaks_ok"):
        allowed.update(mark.args or LEAK_KINDS)
    return allowed


def _loop_scope(item: pytest.Item) -> str:
    mark = item.get_closest_marker("asyncio")
    if mark is not None:
        return str(mark.kwargs.get("loop_scope") or mark.kwargs.get("scope") or "function")
    return "function"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Fixture order decides teardown order (last set up, first torn down). The task check
    # must run in the test's loop after every other fixture of the test is torn down, and
    # the thread check after the loop (and its executor threads) is gone. So: _leak_check,
    # then the loop runner (which _asyncio_task_check pulls in), then the task check,
    # then the test's own fixtures.
    for item in items:
        if not inspect.iscoroutinefunction(getattr(item, "obj", None)):
            continue
        if "tasks" in _allowed(item) or _loop_scope(item) != "function":
            continue
        names = getattr(item, "fixturenames", None)
        if not isinstance(names, list) or "_asyncio_task_check" in names:
            continue
        at = names.index("_leak_check") + 1 if "_leak_check" in names else 0
        names.insert(at, "_asyncio_task_check")


# ----------------------------------------------------------------------------- brokers


def _need_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed (apt-get install mosquitto)")


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[MosquittoBroker]:
    """One real broker for the whole test session; do not stop it."""
    _need_mosquitto()
    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A real broker of this test's own, free to stop, kill and restart."""
    _need_mosquitto()
    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mosquitto_persistent() -> Iterator[MosquittoBroker]:
    """A broker of this test's own that keeps sessions and queued messages across restarts."""
    _need_mosquitto()
    broker = MosquittoBroker(persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
async def start_publisher(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``start_publisher(url, station, **options)`` -> a running MqttPublisher.

    Short backoffs and timeouts for tests; the outbox is a fresh file in tmp_path unless
    ``outbox=`` is given. Every publisher is stopped and its task awaited at teardown.
    """
    from dynoai_daemon.publish.mqtt import MqttPublisher

    made: list[tuple[Any, asyncio.Task[None]]] = []

    def start(url: str, station: str, **options: Any) -> Any:
        opts: dict[str, Any] = {
            "outbox": tmp_path / f"outbox-{station}-{len(made)}.sqlite",
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "timeout": 5.0,
            "keepalive": 5,
        }
        opts.update(options)
        pub = MqttPublisher(url=url, station=station, **opts)
        task = asyncio.create_task(pub.run(), name=f"publisher-{station}-{len(made)}")
        made.append((pub, task))
        return pub

    yield start
    for pub, task in made:
        await pub.stop(flush_timeout=0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not pub.outbox.closed:
            pub.outbox.close()


# ----------------------------------------------------------------------------- leak check


def _children() -> set[int]:
    pids: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as fh:
                pids.update(int(p) for p in fh.read().split())
        except OSError:
            continue  # the thread ended meanwhile
    return pids


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    # The state follows the ")" that closes the command name.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _socket_inodes() -> set[str]:
    inodes: set[str] = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _ports(inodes: set[str]) -> dict[str, str]:
    """Map inode -> 'tcp 127.0.0.1:port' for listening TCP and bound UDP sockets of ours."""
    found: dict[str, str] = {}
    if not inodes:
        return found
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{name}") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[9] not in inodes:
                continue
            if name.startswith("tcp") and f[3] != "0A":  # 0A = LISTEN
                continue
            port = int(f[1].rsplit(":", 1)[1], 16)
            if name.startswith("udp") and port == 0:
                continue
            found[f[9]] = f"{name} port {port}"
    return found


@pytest.fixture
async def _asyncio_task_check() -> AsyncIterator[None]:
    """Runs in the test's (function-scoped) loop; fails on tasks the test left pending."""
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    for _ in range(3):  # let tasks that are just finishing (e.g. cancelled) complete
        await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if t is not me and t not in before and not t.done()]
    if not left:
        return
    names = [f"{t.get_name()}: {t.get_coro()!r}" for t in left]
    for t in left:
        t.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    pytest.fail(f"test left {len(left)} asyncio task(s) pending: {names}", pytrace=False)


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    allowed = _allowed(request.node)
    threads_before = set(threading.enumerate())
    children_before = _children()
    sockets_before = _socket_inodes()
    yield
    problems: list[str] = []

    if "threads" not in allowed:
        new = [
            t
            for t in threading.enumerate()
            if t not in threads_before and not t.daemon and t is not threading.current_thread()
        ]
        deadline = time.monotonic() + 1.0
        for t in new:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in new if t.is_alive()]
        if alive:
            problems.append(f"non-daemon threads still running: {alive}")

    if "processes" not in allowed:
        new_pids = [p for p in _children() - children_before if _running(p)]
        deadline = time.monotonic() + 1.0
        while new_pids and time.monotonic() < deadline:
            time.sleep(0.01)
            new_pids = [p for p in new_pids if _running(p)]
        if new_pids:
            problems.append(
                "child processes still running: "
                + ", ".join(f"{p} ({_cmdline(p)})" for p in new_pids)
            )

    if "sockets" not in allowed:
        opened = _socket_inodes() - sockets_before
        leaked = _ports(opened)
        if leaked:
            gc.collect()  # only on suspicion: a collectable socket is closed by its finaliser
            leaked = _ports(_socket_inodes() - sockets_before)
        if leaked:
            problems.append(f"sockets left open: {sorted(leaked.values())}")

    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)

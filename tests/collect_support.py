"""Helpers for the collector tests: sessions, a per-test database, collector processes, health.

``pg_db`` (fixture) is a fresh PostgreSQL database on the test server (``tests/pg.py``;
skipped with the reason when no server is usable). :func:`make_session` builds a valid
TuningSession of a station the way the daemon publishes it. :class:`CollectorProcess` runs
``dynoai collect`` as a child process (so a test can SIGKILL it), and :class:`HealthWatch`
follows every collector's retained health topic over MQTT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dynoai_daemon.models import BuildConfiguration, RunInfo, TuningSession
from tests.mosquitto import Subscriber
from tests.pg import TestDatabase, server_available
from tests.test_models import full_session

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pg_db() -> Iterator[TestDatabase]:
    """A database of this test's own on the test server, dropped afterwards."""
    why = server_available()
    if why is not None:
        pytest.skip(why)
    db = TestDatabase()
    try:
        yield db
    finally:
        db.drop()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what ``dynoai collect`` run in process does to logging (``configure_logging``
    binds a handler to the stderr of that moment, ``quiet_pool_logs`` a logger level)."""
    root = logging.getLogger()
    pool = logging.getLogger("psycopg.pool")
    handlers, level, pool_level = list(root.handlers), root.level, pool.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        pool.setLevel(pool_level)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def make_session(station: str, n: int, *, displacement: float = 103.0) -> TuningSession:
    """A complete session of ``station`` with id ``<station>-<n:04d>``."""
    sid = f"{station}-{n:04d}"
    base = full_session(sid)
    assert base.build_config is not None
    build = BuildConfiguration.model_validate(
        {**base.build_config.model_dump(mode="json"), "displacement_ci": displacement}
    )
    return base.model_copy(
        update={
            "run": RunInfo(run_id=sid, station=station, start_s=1.0, end_s=30.0, samples=3000),
            "build_config": build,
        }
    )


def session_body(session: TuningSession) -> dict[str, Any]:
    """The payload the daemon publishes on ``session/<id>``."""
    return session.model_dump(mode="json")


class CollectorProcess:
    """``dynoai collect`` as a child process, with its output in a file.

    Args:
        log_dir: where ``collector-<id>.log`` goes.
        collector_id: ``--id``.
        url: ``--url``.
        db: ``--db``.
        extra: more arguments.
    """

    def __init__(self, log_dir: Path, collector_id: str, url: str, db: str, *extra: str) -> None:
        self.collector_id = collector_id
        self.args = [
            sys.executable,
            "-m",
            "dynoai_daemon.cli.main",
            "collect",
            "--url",
            url,
            "--db",
            db,
            "--id",
            collector_id,
            "--group",
            "testgroup",
            "--health-interval",
            "0.2",
            *extra,
        ]
        self.log_path = log_dir / f"collector-{collector_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start (again)."""
        assert self.proc is None or self.proc.poll() is not None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.args, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no drain, no clean disconnect (the broker publishes the will)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        """Everything it printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class HealthWatch:
    """The latest health payload of each collector, from ``dynoai/collector/+/health``."""

    def __init__(self, port: int) -> None:
        self.sub = Subscriber(port, "dynoai/collector/+/health")
        self.latest: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> HealthWatch:
        await self.sub.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.__aexit__(*exc)

    async def wait(
        self, collector: str, pred: Callable[[dict[str, Any]], bool], within: float = 20.0
    ) -> dict[str, Any]:
        """Wait for a health payload of ``collector`` that satisfies ``pred``."""
        have = self.latest.get(collector)
        if have is not None and pred(have):
            return have
        try:
            return await asyncio.wait_for(self._wait(collector, pred), within)
        except TimeoutError:
            raise AssertionError(
                f"no matching health of {collector} within {within} s; "
                f"latest: {self.latest.get(collector)}"
            ) from None

    async def _wait(self, collector: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            m = await self.sub.queue.get()
            if not m.payload:
                continue
            body = json.loads(m.payload)
            name = m.topic.split("/")[2]
            self.latest[name] = body
            if name == collector and pred(body):
                return body


def up(h: dict[str, Any]) -> bool:
    """Health predicate: online, connected and subscribed."""
    return bool(h.get("state") == "online" and h["mqtt"]["connected"] and h["mqtt"]["subscribed"])


async def wait_rows(db: TestDatabase, n: int, within: float = 20.0) -> list[str]:
    """Poll the database (it has no push) until it holds at least ``n`` sessions."""
    async with asyncio.timeout(within):
        while True:
            ids = await asyncio.to_thread(db.session_ids)
            if len(ids) >= n:
                return ids
            await asyncio.sleep(0.1)  # polling PostgreSQL: no change notification here

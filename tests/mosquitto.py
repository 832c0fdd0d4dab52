"""A real mosquitto broker for tests, on a free loopback port, with its own config in a temp dir.

:class:`MosquittoBroker` writes a minimal config (one listener on 127.0.0.1, anonymous
access, no persistence, log to a file), starts the ``mosquitto`` binary as a child
process and returns once the port accepts TCP connections. ``stop()`` terminates it
(SIGTERM, then SIGKILL), ``restart()`` brings it back on the same port, so tests can cut
the broker away from a client and give it back. Port 1883 is never used: a system broker
may be listening there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from simulators.broker import find_mosquitto
from simulators.ports import free_port

SYSTEM_PORT = 1883


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connect to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One mosquitto process under test control.

    Args:
        port: TCP port on 127.0.0.1 (a free one when None); 1883 is refused.
        workdir: where config and log go (a new temp dir when None, removed by ``close``).
        binary: the mosquitto executable (found on PATH or /usr/sbin when None).
        persistence: keep sessions and queued messages across a clean restart (saved in
            the work dir at SIGTERM); off by default, as a broker that lost everything.

    Raises:
        FileNotFoundError: no mosquitto binary.
        ValueError: port 1883.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        persistence: bool = False,
    ) -> None:
        self.port = free_port() if port is None else port
        if self.port == SYSTEM_PORT:
            raise ValueError("port 1883 is reserved for a system broker")
        exe = binary or find_mosquitto()
        if exe is None:
            raise FileNotFoundError("mosquitto binary not found")
        self.binary = exe
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dynoai-mosq-"))
        # Mosquitto drops root privileges to its own user: the files must stay readable,
        # and the directory writable when it saves its database there.
        os.chmod(self.workdir, 0o777 if persistence else 0o755)
        self.conf = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        persist = (
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 0\n"
            if persistence
            else "persistence false\n"
        )
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            f"{persist}"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "max_keepalive 65535\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The broker's log so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and return once its port accepts connections.

        Raises:
            RuntimeError: it exited or did not listen within ``timeout``.
        """
        if self.running:
            return
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal must not hit it first
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not port_accepts(self.port):
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}")
            time.sleep(delay)  # polling the port: mosquitto has no readiness signal
            delay = min(0.05, delay * 2)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, SIGKILL after ``timeout``) and reap it; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        else:
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the broker (no clean shutdown) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop and remove the temp dir if it was made here."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    """One message a :class:`Subscriber` got."""

    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        """The payload parsed as JSON (None for an empty payload)."""
        return json.loads(self.payload) if self.payload else None


class Subscriber:
    """A real aiomqtt subscriber that keeps itself connected, for checking what arrives.

    Args:
        port: the broker's port on 127.0.0.1.
        filters: topic filters to subscribe to (QoS 1), in this order.
        persistent: a persistent session (clean_session False) with a fixed client id, so
            a broker with persistence queues messages for it while it is away.
        retry: delay between reconnect attempts.
    """

    def __init__(
        self,
        port: int,
        *filters: str,
        persistent: bool = False,
        retry: float = 0.05,
    ) -> None:
        self.port = port
        self.filters = filters
        self.persistent = persistent
        self.retry = retry
        self.client_id = f"test-sub-{uuid.uuid4().hex[:12]}"
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.subscribed = asyncio.Event()
        self.connections = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run(), name=f"subscriber-{self.client_id}")
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.client_id,
                    clean_session=not self.persistent,
                    keepalive=5,
                    timeout=5,
                ) as client:
                    self.connections += 1
                    for f in self.filters:
                        await client.subscribe(f, qos=1)
                    self.subscribed.set()
                    async for m in client.messages:
                        raw = m.payload
                        data = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
                        self.queue.put_nowait(Received(m.topic.value, data, bool(m.retain), m.qos))
            except aiomqtt.MqttError:
                self.subscribed.clear()
            await asyncio.sleep(self.retry)  # reconnect pacing while the broker is away

    async def get(self, within: float = 10.0) -> Received:
        """The next message, or TimeoutError after ``within`` seconds."""
        return await asyncio.wait_for(self.queue.get(), within)

    async def wait_for(self, pred: Callable[[Received], bool], within: float = 10.0) -> Received:
        """Skip messages until one matches ``pred``; TimeoutError if none ``within`` seconds."""
        async with asyncio.timeout(within):
            while True:
                m = await self.queue.get()
                if pred(m):
                    return m

    def drain(self) -> list[Received]:
        """Everything queued right now."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

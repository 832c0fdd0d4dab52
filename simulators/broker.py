"""A broker for ``dynoai simulate``: the configured one, or one of our own on loopback.

:func:`find_or_start_broker` first tries the configured broker (a TCP connect to its host
and port); if nothing answers it starts ``mosquitto`` on a free 127.0.0.1 port with a
temporary config (one loopback listener, anonymous, no persistence); without mosquitto it
starts ``amqtt`` (a pure-Python broker; limited per docs/architecture.md, enough for a demo) in a
separate process bound to 127.0.0.1 if it is importable; otherwise it reports that the
simulation runs without MQTT. :meth:`BrokerHandle.stop` ends only what it started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from simulators.ports import free_port


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


@dataclass
class BrokerHandle:
    """The broker simulate uses: ``url`` None means no MQTT; ``kind`` says which."""

    url: str | None
    kind: str  # "configured", "mosquitto", "amqtt" or "none"
    message: str
    process: subprocess.Popen[bytes] | None = None
    tmpdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the broker we started (never a configured one); safe to repeat."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        tmp, self.tmpdir = self.tmpdir, None
        if tmp is not None:
            tmp.cleanup()


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if port_accepts("127.0.0.1", port, timeout=0.2):
            return True
        time.sleep(0.05)  # a child process gives no readiness event to wait on
    return False


def _start_mosquitto(binary: str, timeout: float) -> BrokerHandle | None:
    tmp = tempfile.TemporaryDirectory(prefix="dynoai-broker-")
    port = free_port()
    conf = Path(tmp.name) / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        # Nagle on the broker's sockets delays each small alert by up to one round trip.
        "set_tcp_nodelay true\npersistence false\nlog_dest none\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if _wait_listening(proc, port, timeout):
        return BrokerHandle(
            f"mqtt://127.0.0.1:{port}",
            "mosquitto",
            f"started mosquitto on 127.0.0.1:{port}",
            proc,
            tmp,
        )
    BrokerHandle(None, "none", "", proc, tmp).stop()
    return None


_AMQTT_SCRIPT = """
import asyncio, sys
from amqtt.broker import Broker
async def main(port):
    cfg = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
           "auth": {"allow-anonymous": True}, "topic-check": {"enabled": False}}
    b = Broker(cfg)
    await b.start()
    await asyncio.Event().wait()
asyncio.run(main(int(sys.argv[1])))
"""


def _start_amqtt(timeout: float) -> BrokerHandle | None:
    try:
        if importlib.util.find_spec("amqtt") is None:
            return None
    except (ImportError, ValueError):
        return None
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _AMQTT_SCRIPT, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if _wait_listening(proc, port, timeout):
        return BrokerHandle(
            f"mqtt://127.0.0.1:{port}", "amqtt", f"started amqtt on 127.0.0.1:{port}", proc
        )
    BrokerHandle(None, "none", "", proc).stop()
    return None


def find_or_start_broker(url: str, *, timeout: float = 5.0) -> BrokerHandle:
    """The configured broker if it accepts a connection, else one started on loopback.

    Args:
        url: the configured broker URL (``mqtt://host:port`` or ``mqtts://``).
        timeout: seconds to wait for a started broker to listen.

    Returns:
        A handle; ``url`` is None when no broker could be found or started.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    if port_accepts(host, port):
        return BrokerHandle(url, "configured", f"using the configured broker {host}:{port}")
    binary = find_mosquitto()
    if binary is not None:
        started = _start_mosquitto(binary, timeout)
        if started is not None:
            return started
    with contextlib.suppress(OSError):
        started = _start_amqtt(timeout)
        if started is not None:
            return started
    return BrokerHandle(
        None,
        "none",
        f"no broker at {host}:{port}, mosquitto and amqtt unavailable: running without MQTT",
    )

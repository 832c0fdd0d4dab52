"""PostgreSQL for tests: a fresh database per test on a real server, and a TCP proxy to cut it.

The server is ``DYNOAI_TEST_PG`` (a libpq URL of a database the test user may connect to
with the right to ``CREATE DATABASE``), by default ``postgresql://postgres@127.0.0.1:5432/
postgres`` (the machine's server, trust auth). :class:`TestDatabase` creates
``dynoai_test_<random>`` on it and drops it again (``WITH (FORCE)``, so connections a
killed collector left are no obstacle); the server itself is never stopped, others use it.

:class:`TcpProxy` forwards a loopback port to the server in a thread of its own (so it
keeps working while the test's event loop is busy or blocked). ``stop()`` closes the
listener and every forwarded connection: to a client the database is down (connection
refused, open connections reset); ``start()`` brings it back on the same port.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    """The admin URL of the test server (``DYNOAI_TEST_PG`` or the default)."""
    return os.environ.get("DYNOAI_TEST_PG", DEFAULT_PG)


def server_available() -> str | None:
    """None when the server accepts us, else why not."""
    try:
        with psycopg.connect(server_url(), connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {server_url()} not usable: {str(exc).strip()}"
    return None


def with_database(url: str, dbname: str) -> str:
    """The same URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def with_port(url: str, host: str, port: int) -> str:
    """The same URL through another host and port (user, database and options kept)."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{user}{host}:{port}", parts.path, parts.query, ""))


class TestDatabase:
    """A database of its own for one test: ``url`` to use it, ``drop()`` at the end."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.name = f"dynoai_test_{uuid.uuid4().hex[:12]}"
        self.admin_url = server_url()
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = with_database(self.admin_url, self.name)
        info = conninfo_to_dict(self.url)
        self.host = str(info.get("host") or "127.0.0.1")
        self.port = int(info.get("port") or 5432)

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        """A plain autocommit connection for assertions."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def session_ids(self) -> list[str]:
        """Every stored session id, duplicates included (there must be none)."""
        with self.connect() as conn:
            try:
                rows = conn.execute("SELECT session_id FROM sessions").fetchall()
            except psycopg.errors.UndefinedTable:
                return []
        return [str(r[0]) for r in rows]

    def drop(self) -> None:
        """Drop the database, closing whatever is still connected to it."""
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class TcpProxy:
    """A loopback TCP forwarder to ``target`` that can be switched off and on.

    Args:
        host: the target host.
        port: the target port.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self.connections = 0

    def url_for(self, url: str) -> str:
        """``url`` redirected through this proxy."""
        return with_port(url, "127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        """True while the proxy forwards."""
        return self._thread is not None

    def start(self) -> None:
        """Listen (on the same port every time) and forward."""
        if self._thread is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._thread = threading.Thread(
            target=self._serve, args=(listener,), name="pg-proxy", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and reset every forwarded connection; returns when done."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop_w.send(b"x")
        thread.join(5)
        with contextlib.suppress(BlockingIOError):
            self._stop_r.recv(64)

    def close(self) -> None:
        """Stop and release the wake-up sockets."""
        self.stop()
        self._stop_r.close()
        self._stop_w.close()

    def _serve(self, listener: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "accept")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        peers: dict[socket.socket, socket.socket] = {}

        def drop(a: socket.socket) -> None:
            b = peers.pop(a, None)
            for s in (a, b):
                if s is None:
                    continue
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(s)
                peers.pop(s, None)
                with contextlib.suppress(OSError):
                    # RST instead of FIN: the client sees the database vanish, not close.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "accept":
                        try:
                            client, _ = listener.accept()
                        except BlockingIOError:
                            continue
                        try:
                            upstream = socket.create_connection(self.target, timeout=5)
                        except OSError:
                            client.close()
                            continue
                        self.connections += 1
                        for s in (client, upstream):
                            s.setblocking(False)
                        peers[client] = upstream
                        peers[upstream] = client
                        sel.register(client, selectors.EVENT_READ, "data")
                        sel.register(upstream, selectors.EVENT_READ, "data")
                        continue
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    try:
                        data = src.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    dst = peers.get(src)
                    if not data or dst is None:
                        drop(src)
                        continue
                    try:
                        dst.setblocking(True)
                        dst.sendall(data)
                        dst.setblocking(False)
                    except OSError:
                        drop(src)
        finally:
            for s in list(peers):
                drop(s)
            sel.close()
            listener.close()

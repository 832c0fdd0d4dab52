"""The durable outbox: alerts and sessions wait in SQLite until the broker has acknowledged them.

Messages are appended in order (an autoincrement ``seq``), each with a unique message id,
and deleted only after the broker's PUBACK. The file lives in the data directory
(``outbox.sqlite``), in WAL mode.

Durability choice: a :meth:`Outbox.put` commits with ``synchronous=FULL``, so a message
whose ``put`` has returned survives not only a SIGKILL of the daemon (which WAL with
``NORMAL`` would already give: the commit is in the WAL file in the OS page cache) but also
a power cut or kernel panic, which is what a dyno cell on a shared breaker sees. Durable
messages are rare (alerts are rate-limited, sessions are one per run), so one fsync per
message costs nothing that matters. An :meth:`Outbox.ack` commits with ``NORMAL``: losing
an ack to a power cut only re-sends a message, which at-least-once delivery allows
(subscribers drop duplicates by id), and it halves the fsyncs.

Threading: every call may come from any thread (the publisher runs puts, peeks and acks
in worker threads so that an fsync, or a disk that hangs, never stalls the event loop);
one lock serialises them on the single connection, which keeps put/peek/ack strictly
ordered. A full or failing disk raises :class:`StoreError`; the caller keeps the
message and tries again (see :mod:`dynoai_daemon.publish.mqtt`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dynoai_daemon.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id   TEXT    NOT NULL UNIQUE,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain   INTEGER NOT NULL CHECK (retain IN (0, 1)),
    created  REAL    NOT NULL
)
"""
_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message waiting for the broker.

    Attributes:
        seq: position in the outbox (increasing, never reused).
        msg_id: unique id (uuid4 hex unless the caller gave one).
        topic: full MQTT topic.
        payload: the bytes to publish.
        qos: MQTT QoS.
        retain: MQTT retain flag.
        created: Unix time of the put.
    """

    seq: int
    msg_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Outbox:
    """A SQLite-backed FIFO of messages not yet acknowledged by the broker.

    Args:
        path: the database file (created with its parent directory if missing).

    Raises:
        StoreError: the file cannot be opened or is not an outbox database.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit; every statement below is its own transaction.
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, isolation_level=None, timeout=5.0, check_same_thread=False
            )
            db = self._db
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch the outbox to WAL ({mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise StoreError(f"{self.path}: outbox schema version {version} is not supported")
            self._depth: int = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open outbox: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: outbox is closed")
        return self._db

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        msg_id: str | None = None,
    ) -> str:
        """Append a message; it is on disk (fsynced) when this returns.

        A ``msg_id`` that is already queued is not stored twice (the call is idempotent).

        Args:
            topic: full MQTT topic.
            payload: message bytes.
            qos: 0, 1 or 2.
            retain: MQTT retain flag.
            msg_id: the message id; a new uuid4 hex when None.

        Returns:
            The message id.

        Raises:
            StoreError: the database write failed or the outbox is closed.
            ValueError: qos out of range or an empty topic.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        if not topic:
            raise ValueError("empty topic")
        mid = msg_id or uuid.uuid4().hex
        self.put_many([(topic, bytes(payload), qos, retain, mid)])
        return mid

    def put_many(self, messages: list[tuple[str, bytes, int, bool, str]]) -> int:
        """Append ``(topic, payload, qos, retain, msg_id)`` messages in one transaction.

        All or none are stored (one fsync); ids already queued are skipped.

        Returns:
            How many were new.

        Raises:
            StoreError: the database write failed (nothing was stored) or it is closed.
        """
        if not messages:
            return 0
        now = time.time()
        rows = [(mid, t, bytes(p), q, int(r), now) for t, p, q, r, mid in messages]
        with self._lock:
            db = self._conn()
            try:
                db.execute("PRAGMA synchronous=FULL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    before = db.total_changes
                    db.executemany(
                        "INSERT OR IGNORE INTO outbox (msg_id, topic, payload, qos, retain,"
                        " created) VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    added = db.total_changes - before
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: outbox write failed: {exc}") from exc
            self._depth += added
            return added

    def peek(self, limit: int = 100) -> list[OutboxMessage]:
        """Return up to ``limit`` oldest messages, in the order they were put, without removing."""
        with self._lock:
            return self._peek(limit)

    def _peek(self, limit: int) -> list[OutboxMessage]:
        db = self._conn()
        try:
            rows = db.execute(
                "SELECT seq, msg_id, topic, payload, qos, retain, created FROM outbox"
                " ORDER BY seq LIMIT ?",
                (max(0, int(limit)),),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: outbox read failed: {exc}") from exc
        return [
            OutboxMessage(
                seq=r[0],
                msg_id=r[1],
                topic=r[2],
                payload=bytes(r[3]),
                qos=r[4],
                retain=bool(r[5]),
                created=r[6],
            )
            for r in rows
        ]

    def ack(self, msg_id: str) -> bool:
        """Remove a message the broker has acknowledged.

        Returns:
            True if it was queued, False if it was already gone.

        Raises:
            StoreError: the database write failed or the outbox is closed.
        """
        return self.ack_many([msg_id]) == 1

    def ack_many(self, msg_ids: list[str]) -> int:
        """Remove several acknowledged messages in one transaction; returns how many were queued."""
        if not msg_ids:
            return 0
        with self._lock:
            return self._ack_many(msg_ids)

    def _ack_many(self, msg_ids: list[str]) -> int:
        db = self._conn()
        try:
            # An ack lost to a power cut only re-sends the message: no fsync needed here.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            removed = 0
            try:
                for mid in msg_ids:
                    removed += db.execute("DELETE FROM outbox WHERE msg_id = ?", (mid,)).rowcount
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: outbox ack failed: {exc}") from exc
        self._depth -= removed
        return removed

    def depth(self) -> int:
        """Number of messages waiting (kept in memory, no query)."""
        return self._depth

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._db is None

    def close(self) -> None:
        """Checkpoint the WAL and close; idempotent."""
        with self._lock:
            db, self._db = self._db, None
        if db is None:
            return
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # the WAL is replayed at the next open; nothing is lost
        finally:
            db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

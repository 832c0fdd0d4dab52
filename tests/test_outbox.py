"""The SQLite outbox: order, ids, acks, reopen, and survival of a SIGKILL mid-stream."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dynoai_daemon.errors import StoreError
from dynoai_daemon.publish.outbox import Outbox


def test_put_peek_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        ids = [box.put(f"t/{i}", f"p{i}".encode(), qos=1, retain=i == 2) for i in range(5)]
        assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)
        assert box.depth() == 5
        msgs = box.peek(3)
        assert [m.msg_id for m in msgs] == ids[:3]
        assert [m.topic for m in msgs] == ["t/0", "t/1", "t/2"]
        assert [m.payload for m in msgs] == [b"p0", b"p1", b"p2"]
        assert [m.retain for m in msgs] == [False, False, True]
        assert msgs[0].seq < msgs[1].seq < msgs[2].seq
        # Acking out of order removes exactly that message; the rest keep their order.
        assert box.ack(ids[1]) is True
        assert box.ack(ids[1]) is False
        assert [m.msg_id for m in box.peek(10)] == [ids[0], *ids[2:]]
        assert box.ack_many([ids[0], ids[2], "nope"]) == 2
        assert box.depth() == 2
        assert [m.msg_id for m in box.peek(10)] == ids[3:]


def test_msg_id_is_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        assert box.put("a", b"1", msg_id="x1") == "x1"
        assert box.put("a", b"2", msg_id="x1") == "x1"
        assert box.depth() == 1
        assert box.peek(5)[0].payload == b"1"


def test_reopen_keeps_messages_and_order(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "o.sqlite"
    box = Outbox(path)
    ids = [box.put("x", bytes([i]) * 1000, qos=1) for i in range(50)]
    box.ack(ids[0])
    box.close()
    box.close()  # idempotent
    with pytest.raises(StoreError):
        box.put("x", b"")
    again = Outbox(path)
    try:
        assert again.depth() == 49
        assert [m.msg_id for m in again.peek(100)] == ids[1:]
        # seq keeps growing after a reopen (AUTOINCREMENT never reuses).
        last = again.peek(100)[-1].seq
        again.put("x", b"new")
        assert again.peek(100)[-1].seq > last
    finally:
        again.close()


def test_wal_mode_and_bad_args(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        with pytest.raises(ValueError):
            box.put("t", b"", qos=3)
        with pytest.raises(ValueError):
            box.put("", b"")
        assert box.depth() == 0
    con = sqlite3.connect(tmp_path / "o.sqlite")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "o.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="cannot open outbox"):
        Outbox(bad)


_WRITER = textwrap.dedent(
    """
    import sys
    from dynoai_daemon.publish.outbox import Outbox
    box = Outbox(sys.argv[1])
    i = 0
    while True:
        mid = box.put("dynoai/s/alert/x", b'{"n":%d}' % i)
        sys.stdout.write(mid + "\\n")
        sys.stdout.flush()
        i += 1
    """
)


def test_survives_sigkill_mid_stream(tmp_path: Path) -> None:
    """Every id a put() returned before the SIGKILL is in the reopened outbox, in order."""
    path = tmp_path / "o.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    returned: list[str] = []
    try:
        while len(returned) < 200:
            line = proc.stdout.readline()
            assert line, "writer died early"
            returned.append(line.decode().strip())
        proc.send_signal(signal.SIGKILL)  # while it is still putting
        proc.wait(10)
        # Ids written to the pipe before the kill are returned puts too.
        returned.extend(x.decode().strip() for x in proc.stdout.read().splitlines() if x.strip())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with Outbox(path) as box:
        stored = [m.msg_id for m in box.peek(10**6)]
        assert box.depth() == len(stored)
    assert len(stored) >= len(returned) >= 200
    # In order: the returned ids are a prefix of what is stored (at most one more put
    # may have committed without its id reaching the pipe).
    assert stored[: len(returned)] == returned
    assert len(stored) - len(returned) <= 1

"""Backfill: a station's existing data directory into the central store, once.

:func:`backfill` reads ``<data_dir>/sessions/*.json`` (one session per file, file name =
session id) and then the sessions of ``<data_dir>/dataset.json`` that have no file of
their own (hand-entered or imported sessions), passes each through the same check as a
live message (:func:`~dynoai_daemon.collect.schema.check_payload`: schema, session id =
file name, ``run.station`` = ``station`` when one is given) and inserts them in batches
with the same idempotent insert as the live collector. Running it twice, or while the
station's collector is live, stores nothing twice: the second time every session is a
counted duplicate. Files that fail the check are listed with the reason, never stored.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dynoai_daemon.collect.db import SessionDb
from dynoai_daemon.collect.schema import Rejected, SessionRow, check_payload
from dynoai_daemon.errors import InputError, StoreError
from dynoai_daemon.store import SessionStore


@dataclass
class BackfillReport:
    """What a backfill read, stored and refused (``rejected``: (where, reason, detail))."""

    data_dir: Path
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the terminal."""
        return (
            f"backfill {self.data_dir}: {self.read} sessions read, {self.inserted} inserted, "
            f"{self.duplicates} already in the store, {len(self.rejected)} rejected"
        )


def _iter_rows(
    data_dir: Path, station: str | None, report: BackfillReport
) -> Iterator[tuple[str, SessionRow]]:
    # One session at a time: a station's history need not fit in memory.
    store = SessionStore(data_dir)
    seen: set[str] = set()
    for sid in store.list_sessions():
        path = store.sessions_dir / f"{sid}.json"
        report.read += 1
        seen.add(sid)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            report.rejected.append((str(path), "read", exc.strerror or str(exc)))
            continue
        checked = check_payload(raw, station=station, session_id=sid, source="backfill")
        if isinstance(checked, Rejected):
            report.rejected.append((str(path), checked.reason, checked.detail))
        else:
            yield str(path), checked
    if store.dataset_path.is_file():
        try:
            dataset = store.load_dataset()
        except (InputError, StoreError) as exc:
            report.rejected.append((str(store.dataset_path), "schema", str(exc)))
            return
        for session in dataset.sessions:
            if session.session_id in seen:
                continue
            report.read += 1
            seen.add(session.session_id)
            where = f"{store.dataset_path}#{session.session_id}"
            checked = check_payload(
                session.model_dump_json().encode("utf-8"),
                station=station,
                session_id=session.session_id,
                source="backfill",
            )
            if isinstance(checked, Rejected):
                report.rejected.append((where, checked.reason, checked.detail))
            else:
                yield where, checked


def check_data_dir(root: Path) -> None:
    """Raise InputError unless ``root`` is a directory with sessions or a dataset."""
    if not root.is_dir():
        raise InputError("not a directory", path=str(root))
    if not (root / "sessions").is_dir() and not (root / "dataset.json").is_file():
        raise InputError("no sessions/ directory and no dataset.json", path=str(root))


def _chunk(it: Iterator[tuple[str, SessionRow]], n: int) -> list[tuple[str, SessionRow]]:
    return list(itertools.islice(it, n))


async def backfill(
    data_dir: str | os.PathLike[str],
    db: SessionDb,
    *,
    station: str | None = None,
    batch: int = 200,
    attempts: int = 3,
) -> BackfillReport:
    """Load a data directory's sessions into the store (the database must be migrated).

    Args:
        data_dir: the station's data directory.
        db: an opened :class:`SessionDb`.
        station: the station the sessions must come from (their ``run.station``); None
            takes each session's own and refuses sessions that name none.
        batch: sessions per transaction.
        attempts: tries per batch while the database is unreachable.

    Raises:
        InputError: ``data_dir`` is not a directory or holds no sessions at all.
        DatabaseUnavailable: the database stayed unreachable for ``attempts`` tries
            (batches committed before stay committed; running again completes the rest).
    """
    root = Path(data_dir)
    await asyncio.to_thread(check_data_dir, root)
    report = BackfillReport(data_dir=root)
    rows = _iter_rows(root, station, report)
    never = asyncio.Event()
    while part := await asyncio.to_thread(_chunk, rows, max(1, batch)):
        result = await db.insert_retrying([r for _, r in part], never, max_attempts=attempts)
        report.inserted += len(result.inserted)
        report.duplicates += len(result.duplicates)
        where = {r.session_id: w for w, r in part}
        for sid, error in result.refused:
            report.rejected.append((where.get(sid, sid), "database", error))
    return report

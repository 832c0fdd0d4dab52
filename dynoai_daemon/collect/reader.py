"""Streaming sessions out of the central store, for training (``dynoai train --db``).

:func:`iter_sessions` opens one plain (synchronous) psycopg connection and reads through a
server-side cursor (``DECLARE ... CURSOR``, fetched ``itersize`` rows at a time), so a
store of any size is read with memory for one batch of sessions, not the whole table. It
yields each session as the dict stored in the ``session`` jsonb column (the
:class:`~dynoai_daemon.models.TuningSession` JSON as validated by the collector; validate
it again with ``TuningSession.model_validate`` if the caller wants models), in
``session_id`` order, optionally restricted to stations, builds or a time window.
:func:`count_sessions` counts the same selection (for a progress bar).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from dynoai_daemon.collect.db import describe_db
from dynoai_daemon.errors import StoreError


def _where(
    stations: Sequence[str] | None,
    build_ids: Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[sql.Composable, dict[str, Any]]:
    conds: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if stations is not None:
        conds.append(sql.SQL("station = ANY(%(stations)s)"))
        params["stations"] = list(stations)
    if build_ids is not None:
        conds.append(sql.SQL("build_id = ANY(%(build_ids)s)"))
        params["build_ids"] = list(build_ids)
    if since is not None:
        conds.append(sql.SQL("received_at >= %(since)s"))
        params["since"] = since
    if until is not None:
        conds.append(sql.SQL("received_at < %(until)s"))
        params["until"] = until
    if not conds:
        return sql.SQL(""), params
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds), params


def _connect(db_url: str, connect_timeout: float) -> psycopg.Connection[Any]:
    target = describe_db(db_url)
    try:
        return psycopg.connect(
            db_url,
            connect_timeout=max(1, round(connect_timeout)),
            application_name="dynoai-reader",
        )
    except psycopg.OperationalError as exc:
        raise StoreError(f"cannot connect to {target}: {str(exc).strip()}") from exc


def _missing_table(exc: psycopg.Error, db_url: str) -> StoreError:
    return StoreError(
        f"{describe_db(db_url)} has no sessions table "
        "(run 'dynoai collect' or 'dynoai collect --backfill' against it first)"
    )


def iter_sessions(
    db_url: str,
    *,
    stations: Sequence[str] | None = None,
    build_ids: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    itersize: int = 200,
    connect_timeout: float = 10.0,
) -> Iterator[dict[str, Any]]:
    """Yield the stored sessions as dicts, streamed through a server-side cursor.

    Args:
        db_url: PostgreSQL URL or conninfo of the central store.
        stations: only these stations.
        build_ids: only these builds (see :func:`dynoai_daemon.collect.schema.build_id`).
        since: only sessions received at or after this time (timezone-aware).
        until: only sessions received before this time.
        itersize: rows fetched per round trip (memory bound: this many sessions).
        connect_timeout: seconds to wait for the connection.

    Raises:
        ConfigError: ``db_url`` is not a PostgreSQL URL.
        StoreError: the database is unreachable, has no sessions table, or the connection
            broke while reading.
    """
    where, params = _where(stations, build_ids, since, until)
    query = sql.SQL("SELECT session FROM sessions{} ORDER BY session_id").format(where)
    conn = _connect(db_url, connect_timeout)
    try:
        # A named cursor is a server-side cursor; it lives in the connection's transaction.
        with conn.cursor(name="dynoai_train_sessions") as cur:
            cur.itersize = max(1, itersize)
            try:
                cur.execute(query, params)
            except psycopg.errors.UndefinedTable as exc:
                raise _missing_table(exc, db_url) from exc
            for (doc,) in cur:
                yield doc
        conn.rollback()  # read-only: nothing to commit
    except psycopg.OperationalError as exc:
        raise StoreError(f"{describe_db(db_url)}: reading sessions failed: {exc}") from exc
    finally:
        conn.close()


def count_sessions(
    db_url: str,
    *,
    stations: Sequence[str] | None = None,
    build_ids: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    connect_timeout: float = 10.0,
) -> int:
    """How many sessions :func:`iter_sessions` would yield with the same selection.

    Raises:
        ConfigError: ``db_url`` is not a PostgreSQL URL.
        StoreError: unreachable database or no sessions table.
    """
    where, params = _where(stations, build_ids, since, until)
    query = sql.SQL("SELECT count(*) FROM sessions{}").format(where)
    with _connect(db_url, connect_timeout) as conn:
        try:
            row = conn.execute(query, params).fetchone()
        except psycopg.errors.UndefinedTable as exc:
            raise _missing_table(exc, db_url) from exc
    return int(row[0]) if row is not None else 0

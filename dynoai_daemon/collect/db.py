"""The central store: PostgreSQL schema migrations and idempotent batch inserts (psycopg 3).

:data:`MIGRATIONS` is the ordered list of schema versions; :func:`migrate` applies the
missing ones in one transaction under an advisory lock, so any number of collectors may
start at once against a fresh database. Version 1 creates ``sessions``: ``session_id``
primary key, ``station``, ``received_at``, ``build_id``, ``source`` (``mqtt`` or
``backfill``), the validated session as ``jsonb``, and the flattened training columns of
:func:`dynoai_daemon.collect.schema.training_columns`, with indexes for the usual
selections (station, build, time, engine family and cam).

:class:`SessionDb` owns an :class:`psycopg_pool.AsyncConnectionPool` (connections checked
on checkout, broken ones discarded). :meth:`SessionDb.insert` writes a batch in one
transaction with ``INSERT ... ON CONFLICT (session_id) DO NOTHING RETURNING session_id``,
so a redelivered session is a counted duplicate, never a second row, and reports which
ids were new. :meth:`SessionDb.insert_retrying` retries a batch through a database outage
with capped exponential backoff until it commits or the caller abandons it; a commit whose
outcome was lost with the connection is simply retried (the retry finds the rows and
counts them as duplicates). :func:`describe_db` is the URL without its password, for logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dynoai_daemon.collect.schema import TRAINING_COLUMNS, SessionRow
from dynoai_daemon.errors import ConfigError, StoreError
from dynoai_daemon.publish.mqtt import backoff_delay

log = structlog.get_logger("dynoai.collect.db")

#: pg_advisory_xact_lock key of the migration ("dynoai" in ASCII, fits a bigint).
MIGRATION_LOCK: Final = 0x64796E6F6169

#: Column name -> SQL type of every training column (order as TRAINING_COLUMNS).
_COLUMN_TYPES: Final[dict[str, str]] = {
    "timestamp_utc": "timestamptz",
    "run_id": "text",
    "objective": "text",
    "aborted": "boolean",
    "engine_family": "text",
    "displacement_ci": "double precision",
    "compression_ratio": "double precision",
    "stage": "text",
    "cam_profile": "text",
    "cam_overlap_deg": "double precision",
    "cam_overlap_category": "text",
    "exhaust_type": "text",
    "header_length_delta_in": "double precision",
    "pair_valve_present": "boolean",
    "octane_requirement": "integer",
    "fuel_type": "text",
    "ambient_temp_f": "double precision",
    "barometric_pressure_inhg": "double precision",
    "humidity_percent": "double precision",
    "altitude_ft": "double precision",
    "fan_airflow_cfm": "double precision",
    "peak_hp": "double precision",
    "peak_torque": "double precision",
    "afr_accuracy_rms_error": "double precision",
    "max_cylinder_afr_delta": "double precision",
    "knock_events_total": "integer",
    "iat_start_f": "double precision",
    "iat_peak_f": "double precision",
    "has_grid": "boolean",
}


def _column_type(name: str) -> str:
    return _COLUMN_TYPES.get(name, "integer" if name.startswith("n_") else "text")


def _v1() -> str:
    cols = ",\n    ".join(f"{c} {_column_type(c)}" for c in TRAINING_COLUMNS)
    return f"""
CREATE TABLE sessions (
    session_id text PRIMARY KEY,
    station text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    build_id text,
    source text NOT NULL,
    session jsonb NOT NULL,
    {cols}
);
CREATE INDEX sessions_station_idx ON sessions (station, received_at);
CREATE INDEX sessions_build_idx ON sessions (build_id);
CREATE INDEX sessions_received_idx ON sessions (received_at);
CREATE INDEX sessions_family_cam_idx ON sessions (engine_family, cam_profile);
-- lz4 compresses the ~100 kB documents about as well as the default pglz and inserts twice
-- as fast (bench/collect.py); servers built without lz4 keep pglz.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE sessions ALTER COLUMN session SET COMPRESSION lz4';
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'sessions.session keeps the default compression: %', SQLERRM;
END
$$;
"""


#: (version, name, SQL) in order; a released version is never edited, only appended to.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = ((1, "sessions table", _v1()),)

_INSERT_COLUMNS: Final = (
    "session_id",
    "station",
    "build_id",
    "source",
    "session",
    *TRAINING_COLUMNS,
)
_CASTS: Final = {"session": "::jsonb", "timestamp_utc": "::timestamptz"}


def _insert_sql() -> sql.Composed:
    names = sql.SQL(", ").join(sql.Identifier(c) for c in _INSERT_COLUMNS)
    values = sql.SQL(", ").join(
        sql.SQL("{}{}").format(sql.Placeholder(c), sql.SQL(_CASTS.get(c, "")))
        for c in _INSERT_COLUMNS
    )
    return sql.SQL(
        "INSERT INTO sessions ({}) VALUES ({}) ON CONFLICT (session_id) DO NOTHING "
        "RETURNING session_id"
    ).format(names, values)


INSERT_SQL: Final = _insert_sql()


def _params(row: SessionRow) -> dict[str, Any]:
    p: dict[str, Any] = {
        "session_id": row.session_id,
        "station": row.station,
        "build_id": row.build_id,
        "source": row.source,
        "session": row.session_json,
    }
    for c in TRAINING_COLUMNS:
        p[c] = row.columns.get(c)
    return p


class DatabaseUnavailable(StoreError):
    """The database could not be reached or a transaction failed with the connection."""


class RowsRefused(StoreError):
    """The database refused a value of the batch (data error); the batch was rolled back."""


def describe_db(url: str) -> str:
    """``postgresql://user@host:port/dbname`` of a URL or conninfo string, password left out.

    Raises:
        ConfigError: the string is not a valid PostgreSQL URL or conninfo.
    """
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"not a PostgreSQL URL: {exc}", field="--db") from exc
    user = str(d.get("user") or "")
    host = str(d.get("host") or "localhost")
    port = str(d.get("port") or "5432")
    dbname = str(d.get("dbname") or user or "postgres")
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{dbname}"


async def migrate(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Bring the schema up to date; returns the versions applied now (empty if current).

    Safe to run from several processes at once (advisory lock inside the transaction).
    """
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS dynoai_schema_migrations ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM dynoai_schema_migrations")
        done = {int(r[0]) for r in await cur.fetchall()}
        for version, name, statement in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(statement.encode("utf-8"))
            await conn.execute(
                "INSERT INTO dynoai_schema_migrations (version, name) VALUES (%s, %s)",
                (version, name),
            )
            applied_now.append(version)
    return applied_now


@dataclass(frozen=True, slots=True)
class InsertResult:
    """What one committed batch did: ids newly stored, rows whose id was already stored
    (or came earlier in the batch), and (session id, error) of rows the database refused
    (a value it cannot store)."""

    inserted: tuple[str, ...]
    duplicates: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = ()


@dataclass
class DbState:
    """The database side as the health payload reports it."""

    ok: bool = False
    error: str | None = None
    failures: int = 0
    commits: int = 0
    last_commit_s: float | None = field(default=None, repr=False)


class Abandoned(Exception):
    """An insert retry loop gave up because its caller asked it to (shutdown deadline)."""


class SessionDb:
    """A pooled connection to the central store.

    Args:
        url: PostgreSQL URL or conninfo (a password is better in ``PGPASSFILE``).
        pool_max: most connections held.
        connect_timeout: libpq connect timeout and how long one checkout may wait.
        backoff_initial: first retry delay after a failure, seconds.
        backoff_max: largest retry delay, seconds.
        application_name: shows in ``pg_stat_activity``.

    Raises:
        ConfigError: the URL is not valid.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_max: int = 4,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        application_name: str = "dynoai-collect",
    ) -> None:
        self.target = describe_db(url)
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.state = DbState()
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_max),
            open=False,
            check=AsyncConnectionPool.check_connection,
            timeout=connect_timeout,
            # A failed reconnect gives up quickly: the next checkout starts a fresh attempt
            # at once, so recovery follows our own backoff instead of the pool's doubling.
            reconnect_timeout=max(1.0, connect_timeout),
            kwargs={
                "connect_timeout": max(1, round(connect_timeout)),
                "application_name": application_name,
            },
            name="dynoai-collect",
        )
        self._opened = False

    async def open(self) -> None:
        """Start the pool without waiting for the database (it may be down)."""
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True

    async def close(self) -> None:
        """Close every connection; idempotent."""
        if self._opened:
            self._opened = False
            await self._pool.close(timeout=2.0)

    def _failed(self, exc: BaseException) -> DatabaseUnavailable:
        msg = _first_line(exc)
        self.state.ok = False
        self.state.error = msg
        self.state.failures += 1
        return DatabaseUnavailable(f"{self.target}: {msg}")

    async def migrate(self) -> list[int]:
        """Apply missing migrations.

        Raises:
            DatabaseUnavailable: no connection, or the migration failed with it.
        """
        try:
            async with self._pool.connection(timeout=self.connect_timeout) as conn:
                applied = await migrate(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._failed(exc) from exc
        self.state.ok = True
        self.state.error = None
        return applied

    async def migrate_retrying(self, abandon: asyncio.Event) -> list[int]:
        """:meth:`migrate` until it succeeds, backing off; :class:`Abandoned` once ``abandon``."""
        attempt = 0
        while True:
            if abandon.is_set():
                raise Abandoned
            try:
                return await self.migrate()
            except DatabaseUnavailable as exc:
                attempt += 1
                delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max)
                log.warning("database unavailable", error=str(exc), retry_in_s=round(delay, 2))
            await _wait(abandon, delay)

    async def insert(self, rows: Sequence[SessionRow]) -> InsertResult:
        """Insert a batch in one transaction; rows already present are left as they are.

        Raises:
            DatabaseUnavailable: no connection, or the transaction failed with it (nothing
                of the batch may be assumed committed; retrying is safe).
        """
        if not rows:
            return InsertResult((), ())
        try:
            async with self._pool.connection(timeout=self.connect_timeout) as conn:
                new: list[str] = []
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(INSERT_SQL, [_params(r) for r in rows], returning=True)
                    while True:
                        got = await cur.fetchone()
                        if got is not None:
                            new.append(str(got[0]))
                        if not cur.nextset():
                            break
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._failed(exc) from exc
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            detail = exc.diag.message_detail
            msg = _first_line(exc) + (f" ({detail})" if detail else "")
            raise RowsRefused(msg) from exc
        self.state.ok = True
        self.state.error = None
        self.state.commits += 1
        self.state.last_commit_s = time.time()
        # A session twice in one batch is inserted once: its second row is a duplicate too.
        fresh = set(new)
        dups: list[str] = []
        for r in rows:
            if r.session_id in fresh:
                fresh.discard(r.session_id)
            else:
                dups.append(r.session_id)
        return InsertResult(tuple(new), tuple(dups))

    async def insert_retrying(
        self,
        rows: Sequence[SessionRow],
        abandon: asyncio.Event,
        on_retry: Callable[[int, float, str], None] | None = None,
        *,
        max_attempts: int | None = None,
    ) -> InsertResult:
        """:meth:`insert` until it commits, backing off through outages.

        A batch the database refuses for a value is split: each row is inserted on its
        own, and the rows refused alone are reported in ``refused`` (never retried).

        Raises:
            Abandoned: ``abandon`` was set before the batch committed.
            DatabaseUnavailable: ``max_attempts`` attempts failed.
        """
        attempt = 0
        while True:
            if abandon.is_set():
                raise Abandoned
            try:
                return await self.insert(rows)
            except RowsRefused as exc:
                if len(rows) == 1:
                    return InsertResult((), (), ((rows[0].session_id, str(exc)),))
                parts = [
                    await self.insert_retrying([r], abandon, on_retry, max_attempts=max_attempts)
                    for r in rows
                ]
                return InsertResult(
                    tuple(i for p in parts for i in p.inserted),
                    tuple(i for p in parts for i in p.duplicates),
                    tuple(i for p in parts for i in p.refused),
                )
            except DatabaseUnavailable as exc:
                attempt += 1
                if max_attempts is not None and attempt >= max_attempts:
                    raise
                delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max)
                if on_retry is not None:
                    on_retry(attempt, delay, str(exc))
            await _wait(abandon, delay)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _wait(event: asyncio.Event, delay: float) -> None:
    # Sleep ``delay`` seconds, or less if ``event`` is set meanwhile.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), delay)


def quiet_pool_logs() -> None:
    """Keep only errors from psycopg_pool: it logs every failed reconnect attempt at WARNING,
    and the collector already logs each of its own retries with the delay."""
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

"""The fleet collector: many stations' sessions into one PostgreSQL store, exactly once.

``schema`` checks a session message and turns it into a row (the single gate, live and
backfill); ``db`` holds the migrations and the pooled idempotent insert (psycopg 3);
``mqtt`` is the persistent MQTT 5 shared subscription with manual acknowledgement (paho
2 bridged into asyncio); ``health`` the counters and the health payload; ``service`` the
:class:`Collector` that ties them together; ``backfill`` loads a station's data directory;
``reader`` streams sessions back out (:func:`iter_sessions`, for ``dynoai train --db``).
"""

from dynoai_daemon.collect.backfill import BackfillReport, backfill
from dynoai_daemon.collect.db import DatabaseUnavailable, SessionDb, describe_db, migrate
from dynoai_daemon.collect.reader import count_sessions, iter_sessions
from dynoai_daemon.collect.schema import build_id, check_message, check_payload
from dynoai_daemon.collect.service import Collector, session_filter

__all__ = [
    "BackfillReport",
    "Collector",
    "DatabaseUnavailable",
    "SessionDb",
    "backfill",
    "build_id",
    "check_message",
    "check_payload",
    "count_sessions",
    "describe_db",
    "iter_sessions",
    "migrate",
    "session_filter",
]

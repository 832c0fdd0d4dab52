"""The collector's counters and its health payload on ``dynoai/collector/<id>/health``.

:class:`CollectorStats` counts what happened to every message (received, inserted,
duplicate, rejected per reason, ignored, acknowledged, left for redelivery) and
:func:`health_payload` turns them, with the MQTT and database state, into the retained
JSON the collector publishes every few seconds (and ``{"state": "offline"}`` as its last
will and on a clean stop), so an operator sees from MQTT alone whether a collector is
connected to both sides, how far behind it is and what it refuses.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dynoai_daemon import __version__


def utc_iso(t: float | None = None) -> str:
    """A POSIX time (now when None) as ISO 8601 UTC with milliseconds and ``Z``."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def health_topic(base_topic: str, collector_id: str) -> str:
    """``<base>/collector/<id>/health``."""
    return f"{base_topic}/collector/{collector_id}/health"


@dataclass
class CollectorStats:
    """Counters of one collector process (messages unless said otherwise)."""

    received: int = 0
    redelivered: int = 0  # received with the DUP flag (the broker sent it before)
    inserted: int = 0  # sessions newly stored
    duplicates: int = 0  # sessions already in the store
    ignored: int = 0  # session/last summaries
    rejected: Counter[str] = field(default_factory=Counter)
    acked: int = 0
    unacked: int = 0  # left with the broker: connection gone, or shutdown deadline
    batches: int = 0
    db_retries: int = 0
    in_flight: int = 0  # received, not yet committed/acknowledged
    started_s: float = field(default_factory=time.time)

    @property
    def rejected_total(self) -> int:
        """Every rejected message, whatever the reason."""
        return sum(self.rejected.values())

    def summary(self) -> str:
        """One line for the log and the terminal."""
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
        return (
            f"received {self.received} ({self.redelivered} redelivered), "
            f"inserted {self.inserted}, duplicates {self.duplicates}, "
            f"rejected {self.rejected_total}{f' ({rej})' if rej else ''}, "
            f"ignored {self.ignored}, acknowledged {self.acked}, "
            f"left unacknowledged {self.unacked}"
        )


def health_payload(
    *,
    collector_id: str,
    group: str,
    stats: CollectorStats,
    mqtt: dict[str, Any],
    db: dict[str, Any],
    state: str = "online",
) -> bytes:
    """The health JSON as bytes."""
    body: dict[str, Any] = {
        "state": state,
        "collector": collector_id,
        "group": group,
        "version": __version__,
        "since": utc_iso(stats.started_s),
        "t": utc_iso(),
        "mqtt": mqtt,
        "db": db,
        "received": stats.received,
        "redelivered": stats.redelivered,
        "inserted": stats.inserted,
        "duplicates": stats.duplicates,
        "ignored": stats.ignored,
        "rejected": dict(sorted(stats.rejected.items())),
        "rejected_total": stats.rejected_total,
        "acked": stats.acked,
        "unacked": stats.unacked,
        "in_flight": stats.in_flight,
        "batches": stats.batches,
        "db_retries": stats.db_retries,
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def offline_payload(collector_id: str) -> bytes:
    """The last will / clean-stop health: ``{"state": "offline", "collector": id}``."""
    return json.dumps({"state": "offline", "collector": collector_id}).encode("utf-8")

"""The collector service: shared MQTT subscription in, idempotent PostgreSQL batches out.

:class:`Collector` subscribes to ``$share/<group>/<base>/+/session/+`` through an
:class:`~dynoai_daemon.collect.mqtt.MqttBridge` (persistent MQTT 5 session, manual acks),
so any number of collectors with the same group share the stations' sessions. One worker
task takes what arrived as a batch (up to ``batch_max`` messages, waiting at most
``batch_wait`` seconds after the first), checks each message
(:func:`~dynoai_daemon.collect.schema.check_message`: a bad payload is logged and counted,
never stored), inserts the good ones in one transaction (``ON CONFLICT DO NOTHING``) and,
only after the commit, acknowledges every message of the batch in the order received
(MQTT requires PUBACKs in order). A database outage holds the batch and retries with
backoff; meanwhile the broker stops sending at the Receive Maximum and queues the rest.
A crash anywhere before the acknowledgements means the broker sends the messages again:
at-least-once delivery plus an idempotent insert is exactly once in the store.

:meth:`Collector.stop` (SIGTERM) drains: no new message is taken, what was received is
committed and acknowledged within ``drain_timeout`` (what cannot be committed by then is
left unacknowledged for the broker to resend), the final health goes out as ``offline``,
and both connections close cleanly. Health is published retained every
``health_interval`` seconds on ``<base>/collector/<id>/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time

import structlog

from dynoai_daemon.collect.db import Abandoned, SessionDb
from dynoai_daemon.collect.health import (
    CollectorStats,
    health_payload,
    health_topic,
    offline_payload,
)
from dynoai_daemon.collect.mqtt import Delivery, MqttBridge
from dynoai_daemon.collect.schema import Ignored, Rejected, SessionRow, check_message
from dynoai_daemon.errors import ConfigError

log = structlog.get_logger("dynoai.collect")

_LEVEL = re.compile(r"^[^/+#\x00]+$")


def check_level(kind: str, value: str) -> str:
    """Return ``value`` if it can be one MQTT topic level, else raise ConfigError."""
    if not _LEVEL.fullmatch(value):
        raise ConfigError(
            f"must be one topic level without '/', '+' or '#': {value!r}, --{kind}",
            field=f"--{kind}",
        )
    return value


def default_collector_id() -> str:
    """``<hostname>`` reduced to characters safe in a topic level and a client id."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-")
    return host or "collector"


def session_filter(base_topic: str, group: str | None) -> str:
    """``$share/<group>/<base>/+/session/+``, or ``<base>/+/session/+`` without a group."""
    plain = f"{base_topic}/+/session/+"
    return plain if group is None else f"$share/{group}/{plain}"


class Collector:
    """One collector process.

    Args:
        mqtt_url: the broker (``mqtt://[user@]host[:port]`` or ``mqtts://``).
        db: the central store (not opened yet; :meth:`run` opens and closes it).
        group: the shared-subscription group; collectors of one group share the load.
        collector_id: stable id of this collector (topic level, MQTT client id suffix).
        base_topic: the stations' base topic.
        username: broker user name.
        password: broker password.
        ca_file: CA bundle for mqtts.
        session_expiry: seconds the broker keeps our session (and queues for it) while away.
        batch_max: most messages per transaction.
        batch_wait: seconds to wait for more messages after the first of a batch.
        health_interval: seconds between health messages.
        drain_timeout: seconds a stop may spend committing what was received.
        reconnect_max: largest MQTT reconnect delay, seconds.
        share: subscribe through the shared subscription of ``group`` (the load is split);
            False: a plain subscription, every collector gets every session and the store
            absorbs the copies (for mosquitto, which does not restore shared subscriptions
            from its persistence file when it restarts, so sessions published before the
            collectors resubscribe find no subscriber and are dropped).

    Raises:
        ConfigError: bad URL, group or id.
    """

    def __init__(
        self,
        *,
        mqtt_url: str,
        db: SessionDb,
        group: str = "dynoai",
        collector_id: str | None = None,
        base_topic: str = "dynoai",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        session_expiry: int = 7 * 24 * 3600,
        batch_max: int = 100,
        batch_wait: float = 0.05,
        health_interval: float = 5.0,
        drain_timeout: float = 10.0,
        reconnect_max: int = 30,
        share: bool = True,
    ) -> None:
        self.group = check_level("group", group)
        self.collector_id = check_level("id", collector_id or default_collector_id())
        if not base_topic or base_topic.startswith("/") or any(c in base_topic for c in "+#"):
            raise ConfigError(f"invalid base topic {base_topic!r}", field="--base-topic")
        self.base_topic = base_topic.rstrip("/")
        self.db = db
        self.batch_max = max(1, batch_max)
        self.batch_wait = max(0.0, batch_wait)
        self.health_interval = health_interval
        self.drain_timeout = drain_timeout
        self.stats = CollectorStats()
        self.health_topic = health_topic(self.base_topic, self.collector_id)
        self.mqtt = MqttBridge(
            url=mqtt_url,
            client_id=f"dynoai-collector-{self.collector_id}",
            subscription=session_filter(self.base_topic, self.group if share else None),
            username=username,
            password=password,
            ca_file=ca_file,
            session_expiry=session_expiry,
            # Two batches in flight: one being committed, the next one arriving.
            receive_maximum=2 * self.batch_max,
            reconnect_max=reconnect_max,
            will=(self.health_topic, offline_payload(self.collector_id)),
        )
        self._stopping = asyncio.Event()
        self._abandon = asyncio.Event()
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Begin a graceful stop (drain, final health, disconnect); safe to call twice."""
        if not self._stopping.is_set():
            log.info("collector stopping", collector=self.collector_id)
            self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; reconnects to broker and database on its own."""
        await self.db.open()
        try:
            applied = await self.db.migrate_retrying(self._stopping)
        except Abandoned:
            await self.db.close()
            return
        if applied:
            log.info("database schema migrated", db=self.db.target, versions=applied)
        self.mqtt.start()
        log.info(
            "collector started",
            collector=self.collector_id,
            filter=self.mqtt.subscription,
            broker=self.mqtt.url,
            db=self.db.target,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._health_loop(), name="collect-health")
                worker = tg.create_task(self._worker(), name="collect-worker")
                ready = tg.create_task(self._ready_when_connected(), name="collect-ready")
                await self._stopping.wait()
                ready.cancel()  # a stop before the first connection need not wait for it
                self.mqtt.stop_accepting()
                # The worker drains what is queued; a database still down at the
                # deadline leaves the batch unacknowledged for the broker to resend.
                done, _ = await asyncio.wait({worker}, timeout=self.drain_timeout)
                if not done:
                    self._abandon.set()
        finally:
            self._abandon.set()
            final = health_payload(
                collector_id=self.collector_id,
                group=self.group,
                stats=self.stats,
                mqtt=self._mqtt_state(),
                db=self._db_state(),
                state="offline",
            )
            await self.mqtt.close(final=(self.health_topic, final))
            await self.db.close()
            log.info("collector stopped", collector=self.collector_id, summary=self.stats.summary())

    # ------------------------------------------------------------------ tasks

    async def _ready_when_connected(self) -> None:
        while not self._stopping.is_set():
            if await self.mqtt.wait_connected(1.0):
                self.ready.set()
                # Say so at once instead of at the next health tick.
                self.mqtt.publish(self.health_topic, self.health(), qos=0, retain=True)
                return

    async def _get(self, within: float | None) -> Delivery | None:
        # The next message, or None when stopping (after what is queued) or after ``within``
        # seconds (None: no limit). A stop wakes the wait at once.
        q = self.mqtt.deliveries
        with contextlib.suppress(asyncio.QueueEmpty):
            return q.get_nowait()
        if self._stopping.is_set() or (within is not None and within <= 0):
            return None
        getter = asyncio.ensure_future(q.get())
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                {getter, stopper}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for f in (getter, stopper):
                if not f.done():
                    f.cancel()
            await asyncio.gather(getter, stopper, return_exceptions=True)
        if getter.cancelled():
            return None  # stopped or timed out (a cancelled get() leaves the queue intact)
        return getter.result()

    async def _next_batch(self) -> list[Delivery] | None:
        # Up to batch_max messages: the first one, then whatever comes within batch_wait.
        # None once stopping and nothing is left (the end of the drain).
        first = await self._get(None)
        while first is None and not self._stopping.is_set():
            first = await self._get(None)
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_max:
            self.stats.in_flight = len(batch)
            more = await self._get(deadline - time.monotonic())
            if more is None:
                break
            batch.append(more)
        return batch

    async def _worker(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return  # stopping and nothing left
            self.stats.in_flight = len(batch)
            try:
                await self._process(batch)
            except Abandoned:
                self.stats.unacked += len(batch)
                log.warning(
                    "batch left unacknowledged at shutdown (the broker resends it)",
                    messages=len(batch),
                )
                return
            finally:
                self.stats.in_flight = 0

    async def _process(self, batch: list[Delivery]) -> None:
        rows: list[SessionRow] = []
        for d in batch:
            self.stats.received += 1
            if d.dup:
                self.stats.redelivered += 1
            checked = check_message(d.topic, d.payload, base_topic=self.base_topic)
            if isinstance(checked, SessionRow):
                rows.append(checked)
            elif isinstance(checked, Rejected):
                self.stats.rejected[checked.reason] += 1
                log.warning(
                    "session rejected",
                    topic=d.topic,
                    reason=checked.reason,
                    detail=checked.detail,
                    bytes=len(d.payload),
                )
            elif isinstance(checked, Ignored):
                self.stats.ignored += 1
        if rows:
            result = await self.db.insert_retrying(rows, self._abandon, self._on_db_retry)
            self.stats.inserted += len(result.inserted)
            self.stats.duplicates += len(result.duplicates)
            for sid, error in result.refused:
                self.stats.rejected["database"] += 1
                log.warning("session refused by the database", session_id=sid, error=error)
            if result.duplicates:
                log.info("duplicates skipped", sessions=list(result.duplicates))
        self.stats.batches += 1
        # PUBACKs in the order the messages arrived, only now that the batch is committed.
        for d in batch:
            if self.mqtt.ack(d):
                self.stats.acked += 1
            elif d.qos > 0:
                self.stats.unacked += 1

    def _on_db_retry(self, attempt: int, delay: float, error: str) -> None:
        self.stats.db_retries += 1
        log.warning(
            "database unavailable, batch held",
            error=error,
            attempt=attempt,
            retry_in_s=round(delay, 2),
            in_flight=self.stats.in_flight,
        )

    # ------------------------------------------------------------------ health

    def _mqtt_state(self) -> dict[str, object]:
        return {
            "connected": self.mqtt.connected,
            "subscribed": self.mqtt.subscribed,
            "url": self.mqtt.url,
            "filter": self.mqtt.subscription,
            "connects": self.mqtt.connects,
            "connect_failures": self.mqtt.connect_failures,
            "session_present": self.mqtt.session_present,
            "error": self.mqtt.last_error,
            "queued": self.mqtt.deliveries.qsize(),
        }

    def _db_state(self) -> dict[str, object]:
        st = self.db.state
        return {"ok": st.ok, "target": self.db.target, "error": st.error, "commits": st.commits}

    def health(self) -> bytes:
        """The current health payload."""
        return health_payload(
            collector_id=self.collector_id,
            group=self.group,
            stats=self.stats,
            mqtt=self._mqtt_state(),
            db=self._db_state(),
        )

    async def _health_loop(self) -> None:
        while not self._stopping.is_set():
            self.mqtt.publish(self.health_topic, self.health(), qos=0, retain=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.health_interval)

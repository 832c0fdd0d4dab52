"""The MQTT side of the daemon: one reconnecting aiomqtt connection, the outbox drained in order.

:class:`MqttPublisher` keeps one connection to the broker for the whole life of the
daemon. Each connection attempt builds a fresh ``aiomqtt.Client`` (so no state of a dead
connection, such as paho's in-flight queue, leaks into the next) with a retained QoS 1
last will ``{"state": "offline"}`` on the state topic. Once connected it publishes the
retained ``online`` state, re-publishes every retained value it holds (source
availability, run/current, session/last, health: the broker may have restarted without
persistence), subscribes to the request topics and runs, in one TaskGroup:

- ``reader``: iterates ``client.messages``. A client that only publishes notices a dead
  broker only when a publish times out; the reader wakes as soon as paho sees the socket
  close, and its error tears the whole group down (docs/architecture.md).
- ``outbox``: publishes outbox messages oldest first at QoS 1, waits for each PUBACK
  (aiomqtt's ``publish`` returns after it), then deletes the message. A message whose
  PUBACK was lost is sent again after the reconnect: at-least-once, in order of first
  delivery.
- ``retained``: publishes retained updates, coalesced per topic (only the newest value
  of a topic matters).
- ``live``: publishes live telemetry at QoS 0 from a bounded queue (oldest dropped and
  counted when full; everything dropped and counted while disconnected).
- ``commands``: answers requests one at a time, in arrival order, through the command
  handler (normally :meth:`CommandRouter.handle`).

Durable messages are not written on the event loop: :meth:`MqttPublisher.publish_durable`
puts them in a bounded memory queue and a ``persist`` task writes them to the outbox in a
worker thread (one transaction, one fsync per batch). While the disk refuses (full, I/O
error) they stay in memory (beyond ``MAX_PENDING`` the oldest is dropped and counted),
``storage_error`` says why, and the write is retried every second; when it succeeds they
go out in order. Meanwhile the sender delivers the held messages straight from memory
(once each), so alerts keep flowing during the outage. The outbox is read and
acknowledged in worker threads too.

Connection failures back off exponentially with jitter, capped
(:mod:`dynoai_daemon.backoff`). :meth:`stop` flushes the outbox as far as the broker
allows within a timeout, publishes ``offline`` and disconnects cleanly (a clean DISCONNECT
suppresses the will).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

from dynoai_daemon import __version__
from dynoai_daemon.backoff import Backoff
from dynoai_daemon.errors import ConfigError, PublishError, StoreError
from dynoai_daemon.publish.commands import CommandRouter
from dynoai_daemon.publish.outbox import Outbox
from dynoai_daemon.publish.topics import Topics, check_topic, encode_payload

if TYPE_CHECKING:
    from dynoai_daemon.config import Settings

log = structlog.get_logger("dynoai.mqtt")

CommandHandler = Callable[[str, bytes], Awaitable[tuple[str, dict[str, Any]] | None]]


def _cancel_checkpoint() -> None:
    """Raise CancelledError if this task was cancelled but the cancel got swallowed.

    aiomqtt waits for PUBACK/SUBACK with ``asyncio.wait_for``, which on Python 3.11
    returns the result when the acknowledgement and a cancel land in the same loop
    iteration, dropping the cancel. A sender loop would then go back to waiting for work
    and its TaskGroup would wait for it forever (seen as a daemon that never exits after
    "mqtt stopped"). The task's ``cancelling()`` count still says it was cancelled.
    Only for tasks created per connection: a long-lived task's count may stay raised.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _publish(client: aiomqtt.Client, topic: str, payload: Any, **kwargs: Any) -> None:
    """``client.publish`` that never swallows a cancel (:func:`_cancel_checkpoint`)."""
    await client.publish(topic, payload, **kwargs)
    _cancel_checkpoint()


class _Closing(Exception):
    """Raised inside the connection's TaskGroup to leave it after a graceful stop."""


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _unwrap_group(eg: BaseExceptionGroup[BaseException]) -> None:
    # A graceful stop ends the TaskGroup with _Closing only: nothing to report. Otherwise
    # surface the connection's MQTT/store error as itself, so the reconnect loop sees it.
    leaves = _leaves(eg)
    if all(isinstance(e, _Closing) for e in leaves):
        return
    for e in leaves:
        if isinstance(e, aiomqtt.MqttError | StoreError):
            raise e
    raise eg


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_url(url: str) -> tuple[str, int, bool, str | None]:
    """Split ``mqtt://host[:port]`` / ``mqtts://host[:port]``.

    Returns:
        (host, port, tls, username from the URL or None).

    Raises:
        ConfigError: another scheme, no host, or a password inside the URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"MQTT url must start with mqtt:// or mqtts://: {url!r}", field="mqtt.url"
        )
    if parts.password:
        raise ConfigError(
            "put the MQTT password in password_file, not in the url", field="mqtt.url"
        )
    if not parts.hostname:
        raise ConfigError(f"MQTT url has no host: {url!r}", field="mqtt.url")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"bad port in MQTT url {url!r}", field="mqtt.url") from exc
    user = unquote(parts.username) if parts.username else None
    return parts.hostname, port, tls, user


MAX_PENDING = 10_000
PERSIST_RETRY_S = 1.0


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Capped exponential backoff with jitter for the ``attempt``-th failure (1-based).

    The project's one schedule (:class:`~dynoai_daemon.backoff.Backoff`): never less than
    half the step, so a flapping broker is not hammered.
    """
    return Backoff(initial_s=initial, max_s=maximum).delay(attempt - 1)


class MqttPublisher:
    """The daemon's MQTT connection.

    Args:
        url: ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS, port 8883 by default).
        station: station id (topic level and client id).
        outbox: the durable outbox, or a path to open one at (closed by :meth:`stop`
            only if opened here).
        base_topic: topic root, ``dynoai`` by default.
        username: broker user name ("" or None for anonymous).
        password_file: file holding the password (first line, whitespace stripped); it
            is read here and never logged.
        ca_file: CA bundle for mqtts (system CAs when empty).
        client_id: MQTT client id; ``dynoai-<station>`` by default.
        keepalive: MQTT keepalive in seconds.
        command_handler: ``async (topic, payload) -> (response topic, body) | None`` for
            requests; normally :meth:`CommandRouter.handle`. None: requests are ignored.
        backoff_initial: first reconnect delay in seconds.
        backoff_max: largest reconnect delay in seconds.
        timeout: connect, subscribe and PUBACK timeout in seconds.
        live_queue: how many live messages may wait while connected before the oldest drop.
        batch: outbox messages read per query.
        version: reported in the state payload.

    Raises:
        ConfigError: bad url, unreadable password file or CA file.
    """

    def __init__(
        self,
        *,
        url: str,
        station: str,
        outbox: Outbox | str | os.PathLike[str],
        base_topic: str = "dynoai",
        username: str | None = None,
        password_file: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        client_id: str | None = None,
        keepalive: int = 10,
        command_handler: CommandHandler | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 10.0,
        live_queue: int = 1000,
        batch: int = 100,
        version: str = __version__,
    ) -> None:
        self.host, self.port, self.tls, url_user = parse_url(url)
        self.url = f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
        self.topics = Topics(base_topic, station)
        self.username = username or url_user or None
        self._password: str | None = None
        if password_file:
            try:
                text = Path(password_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read MQTT password file {password_file}: {exc.strerror}",
                    field="mqtt.password_file",
                ) from exc
            lines = text.splitlines()
            self._password = lines[0].strip() if lines else ""
        self._tls_context: ssl.SSLContext | None = None
        if self.tls:
            try:
                self._tls_context = ssl.create_default_context(
                    cafile=str(ca_file) if ca_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load CA file {ca_file}: {exc}", field="mqtt.ca_file"
                ) from exc
        self.client_id = client_id or f"dynoai-{station}"
        self.keepalive = int(keepalive)
        self.command_handler = command_handler
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.timeout = float(timeout)
        self.batch = int(batch)
        self.version = version
        if isinstance(outbox, Outbox):
            self.outbox = outbox
            self._owns_outbox = False
        else:
            self.outbox = Outbox(outbox)
            self._owns_outbox = True

        #: Set while a connection is up (after the online state was published).
        self.connected = asyncio.Event()
        #: Set while there is no connection (the complement of ``connected``).
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self._since = _now_iso()
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._retained_dirty: dict[str, None] = {}  # insertion-ordered set
        self._retained_wake = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._live: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=live_queue)
        self._live_wake = asyncio.Event()
        self._requests: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=100)
        self._closing = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self.published = 0
        self.published_retained = 0
        self.published_live = 0
        self.dropped_live = 0
        self.dropped_requests = 0
        self.rejected = 0
        self.connections = 0
        self.connect_failures = 0
        self.last_error: str | None = None
        # Durable messages not yet in the outbox: (seq, (topic, payload, qos, retain, id)).
        self._pending: collections.deque[tuple[int, tuple[str, bytes, int, bool, str]]] = (
            collections.deque()
        )
        self._pending_seq = 0
        self._pending_wake = asyncio.Event()
        self._persist_lock = asyncio.Lock()
        self.dropped_durable = 0
        self.storage_error: str | None = None
        self._sent_held: set[str] = set()  # held message ids already acknowledged

    # ------------------------------------------------------------- daemon API

    def topic(self, suffix: str) -> str:
        """Return ``<base>/<station>/<suffix>``."""
        return self.topics.topic(suffix)

    @property
    def outbox_depth(self) -> int:
        """Messages waiting in the outbox."""
        return self.outbox.depth()

    @property
    def reconnects(self) -> int:
        """Connections made after the first one."""
        return max(0, self.connections - 1)

    def publish_durable(
        self,
        topic: str,
        payload: dict[str, Any] | bytes,
        *,
        retain: bool | None = None,
        qos: int | None = None,
        msg_id: str | None = None,
    ) -> str:
        """Queue a message in the outbox (on disk when this returns) and wake the sender.

        Args:
            topic: full topic (see :meth:`topic`).
            payload: JSON-ready dict, or its JSON already encoded (bytes).
            retain: retain flag; the topic table's when None. A retained durable message
                is also remembered and re-published after every reconnect.
            qos: 1 or 2; the topic table's (at least 1) when None.
            msg_id: message id for idempotent puts; a new uuid4 hex when None.

        Returns:
            The message id.

        Raises:
            PublishError: invalid topic or payload.
            StoreError: the outbox could not be written.
        """
        spec = self.topics.spec(check_topic(topic))
        data = encode_payload(payload)
        keep = spec.retain if retain is None else retain
        level = max(1, spec.qos) if qos is None else qos
        if level not in (1, 2):
            raise PublishError(f"durable messages need QoS 1 or 2, not {level}")
        mid = msg_id or uuid.uuid4().hex
        self._pending_seq += 1
        self._pending.append((self._pending_seq, (topic, data, level, keep, mid)))
        if len(self._pending) > MAX_PENDING:
            _, dropped = self._pending.popleft()
            if dropped[4] in self._sent_held:
                self._sent_held.discard(dropped[4])  # it did reach the broker
            else:
                self.dropped_durable += 1
            log.error("durable message dropped: outbox unwritable", error=self.storage_error)
        if keep:
            # Not marked dirty: the outbox sends it now; memory re-sends it after a reconnect.
            self._retained[topic] = (data, level)
        self._outbox_empty.clear()
        self._pending_wake.set()
        return mid

    @property
    def pending(self) -> int:
        """Durable messages held in memory, not yet written to the outbox."""
        return len(self._pending)

    async def persist_pending(self) -> bool:
        """Write the held durable messages to the outbox (in a thread); True when none is left.

        A failed write keeps them held and sets ``storage_error``.
        """
        async with self._persist_lock:
            while self._pending:
                batch = list(self._pending)
                # Held messages the broker already acknowledged need no outbox row.
                todo = [m for _, m in batch if m[4] not in self._sent_held]
                try:
                    await asyncio.to_thread(self.outbox.put_many, todo)
                except StoreError as exc:
                    if self.storage_error != str(exc):
                        log.error("outbox write failed; holding messages", error=str(exc),
                                  held=len(self._pending))  # fmt: skip
                    self.storage_error = str(exc)
                    return False
                last = batch[-1][0]
                while self._pending and self._pending[0][0] <= last:
                    self._sent_held.discard(self._pending.popleft()[1][4])
                if self.storage_error is not None:
                    log.info("outbox writable again", error_was=self.storage_error)
                self.storage_error = None
                self._outbox_wake.set()
            return True

    async def _persist_loop(self) -> None:
        while True:
            await self._pending_wake.wait()
            self._pending_wake.clear()
            if not await self.persist_pending():
                self._outbox_wake.set()  # the sender delivers held messages from memory
                # The disk refused: try again in a second (or sooner, on a new message).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PERSIST_RETRY_S):
                        await self._closing.wait()
                self._pending_wake.set()

    def publish_retained(self, topic: str, payload: dict[str, Any] | None) -> None:
        """Set a retained value (None or {} clears it); re-published after every reconnect.

        Only the newest value of a topic is sent when updates come faster than the broker.

        Raises:
            PublishError: invalid topic or payload.
        """
        spec = self.topics.spec(check_topic(topic))
        data = encode_payload(payload) if payload else b""
        self._retained[topic] = (data, spec.qos)
        self._retained_dirty[topic] = None
        self._retained_wake.set()

    def publish_live(self, topic: str, payload: dict[str, Any]) -> None:
        """Send telemetry at QoS 0, not retained; dropped (and counted) while disconnected.

        Raises:
            PublishError: invalid topic or payload.
        """
        check_topic(topic)
        if not self.connected.is_set():
            self.dropped_live += 1
            return
        if self._live.maxlen is not None and len(self._live) == self._live.maxlen:
            self.dropped_live += 1  # the append below pushes the oldest out
        self._live.append((topic, encode_payload(payload)))
        self._live_wake.set()

    def stats(self) -> dict[str, Any]:
        """Counters for the health topic."""
        return {
            "connected": self.connected.is_set(),
            "url": self.url,
            "published": self.published,
            "published_retained": self.published_retained,
            "published_live": self.published_live,
            "dropped_live": self.dropped_live,
            "dropped_requests": self.dropped_requests,
            "rejected": self.rejected,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "outbox_depth": self.outbox.depth() + len(self._pending),
            "outbox_held_in_memory": len(self._pending),
            "dropped_durable": self.dropped_durable,
            "storage_error": self.storage_error,
            "last_error": self.last_error,
        }

    async def wait_flushed(self) -> None:
        """Wait until the outbox (and the messages held in memory) is empty."""
        while self.outbox.depth() > 0 or self._pending:
            self._outbox_empty.clear()
            self._outbox_wake.set()
            self._pending_wake.set()
            await self._outbox_empty.wait()

    async def stop(self, flush_timeout: float = 5.0, *, close_timeout: float = 2.0) -> None:
        """Flush the outbox as far as the broker allows, publish offline, disconnect.

        The connection loop keeps running (and reconnecting) during the flush window, so a
        broker that comes back within ``flush_timeout`` still gets the backlog. Then the
        offline state and a clean DISCONNECT get ``close_timeout`` seconds; a broker that
        hangs longer is left to the caller, who cancels :meth:`run`. What was not sent
        stays in the outbox for the next start.
        """
        with contextlib.suppress(TimeoutError):
            # Held messages reach the disk first: they must survive the restart.
            async with asyncio.timeout(max(0.5, flush_timeout)):
                await self.persist_pending()
        if self._running and not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, flush_timeout)):
                    await self.wait_flushed()
        self._closing.set()
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, close_timeout)):
                    await self._finished.wait()
        depth = self.outbox.depth()
        if self._owns_outbox and not self._running:
            self.outbox.close()
        log.info("mqtt stopped", outbox_depth=depth, published=self.published)

    # ------------------------------------------------------------- connection

    def _set_connected(self, up: bool) -> None:
        if up:
            self.disconnected.clear()
            self.connected.set()
        else:
            self.connected.clear()
            self.disconnected.set()

    def _state_payload(self, state: str, **extra: Any) -> bytes:
        return encode_payload(
            {"state": state, "version": self.version, "since": self._since, **extra}
        )

    def _client(self) -> aiomqtt.Client:
        # The broker sends the will at an unknown later time: "since" cannot be known.
        will = aiomqtt.Will(
            topic=self.topics.state,
            payload=encode_payload(
                {
                    "state": "offline",
                    "version": self.version,
                    "since": None,
                    "reason": "connection lost",
                }
            ),
            qos=1,
            retain=True,
        )
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self._password,
            identifier=self.client_id,
            will=will,
            clean_session=True,
            keepalive=self.keepalive,
            timeout=self.timeout,
            tls_context=self._tls_context,
            # Alerts are small and latency-bound: without TCP_NODELAY Nagle holds a
            # publish until the previous one's PUBACK, adding tens of ms per alert.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def run(self) -> None:
        """Connect, publish and reconnect until :meth:`stop`. Never raises MQTT errors."""
        if self._running:
            raise PublishError("MqttPublisher.run() is already running")
        self._running = True
        self._finished.clear()
        failures = 0
        persister = asyncio.create_task(self._persist_loop(), name="mqtt-persist")
        self._pending_wake.set()
        try:
            while not self._closing.is_set():
                before = self.connections
                try:
                    await self._connection()
                except (aiomqtt.MqttError, StoreError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if self.connections > before:
                        log.warning("mqtt connection lost", url=self.url, error=str(exc))
                    else:
                        failures += 1
                        self.connect_failures += 1
                        log.warning(
                            "mqtt connect failed", url=self.url, error=str(exc), attempt=failures
                        )
                finally:
                    self._set_connected(False)
                if self.connections > before:
                    failures = 0
                if self._closing.is_set():
                    break
                delay = backoff_delay(max(1, failures), self.backoff_initial, self.backoff_max)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
        finally:
            persister.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await persister
            self._running = False
            self._set_connected(False)
            self._finished.set()
            if self._owns_outbox and self._closing.is_set():
                self.outbox.close()

    async def _connection(self) -> None:
        client = self._client()
        async with client:
            self.connections += 1
            self._since = _now_iso()
            # Plain publish here: this is the long-lived run() task, whose cancelling()
            # count 3.11's TaskGroup can leave raised after a lost connection; the
            # checkpoint belongs in the per-connection sender tasks only.
            await client.publish(
                self.topics.state, self._state_payload("online"), qos=1, retain=True
            )
            for topic in self._retained:
                self._retained_dirty[topic] = None
            self._retained_wake.set()
            if self.command_handler is not None:
                await client.subscribe(self.topics.request_filter, qos=1)
            self.dropped_live += len(self._live)  # left over from the previous connection
            self._live.clear()
            self._set_connected(True)
            log.info(
                "mqtt connected",
                url=self.url,
                client_id=self.client_id,
                outbox_depth=self.outbox.depth(),
                reconnects=self.reconnects,
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._reader(client), name="mqtt-reader")
                    tg.create_task(self._drain_outbox(client), name="mqtt-outbox")
                    tg.create_task(self._send_retained(client), name="mqtt-retained")
                    tg.create_task(self._send_live(client), name="mqtt-live")
                    tg.create_task(self._serve_commands(client), name="mqtt-commands")
                    tg.create_task(self._until_closing(client), name="mqtt-closing")
            except BaseExceptionGroup as eg:
                _unwrap_group(eg)
            finally:
                self._set_connected(False)

    async def _until_closing(self, client: aiomqtt.Client) -> None:
        await self._closing.wait()
        self._since = _now_iso()
        await _publish(
            client,
            self.topics.state,
            self._state_payload("offline", reason="shutdown"),
            qos=1,
            retain=True,
        )
        raise _Closing

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                data = bytes(payload)
            else:
                data = b"" if payload is None else str(payload).encode()
            try:
                self._requests.put_nowait((topic, data))
            except asyncio.QueueFull:
                self.dropped_requests += 1
                log.warning("request dropped: queue full", topic=topic)

    async def _serve_commands(self, client: aiomqtt.Client) -> None:
        handler = self.command_handler
        while True:
            topic, data = await self._requests.get()
            if handler is None:
                continue
            try:
                reply = await handler(topic, data)
            except Exception:
                log.exception("command handler raised", topic=topic)
                continue
            if reply is None:
                continue
            resp_topic, body = reply
            try:
                data = encode_payload(body)
            except PublishError as exc:
                data = encode_payload(
                    {"status": "error", "data": None, "error": str(exc),
                     "transaction": body.get("transaction")}
                )  # fmt: skip
            await _publish(client, resp_topic, data, qos=1, retain=False)

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        box = self.outbox
        while True:
            self._outbox_wake.clear()
            batch = await asyncio.to_thread(box.peek, self.batch)
            if not batch:
                if self.storage_error is not None and self._pending:
                    # The disk refuses: what it holds went out above; deliver the held
                    # messages straight from memory so alerts keep flowing.
                    await self._send_held(client)
                if not self._pending:
                    self._outbox_empty.set()
                await self._outbox_wake.wait()
                continue
            for msg in batch:
                try:
                    await _publish(client, msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                    self.published += 1
                except (ValueError, TypeError) as exc:
                    # A message paho refuses (bad topic, too large) would block the queue forever.
                    self.rejected += 1
                    log.error(
                        "outbox message rejected",
                        topic=msg.topic,
                        msg_id=msg.msg_id,
                        error=str(exc),
                    )
                await asyncio.to_thread(box.ack, msg.msg_id)

    async def _send_held(self, client: aiomqtt.Client) -> None:
        """Publish held (not yet persisted) messages once each, oldest first."""
        for _, (topic, data, qos, retain, mid) in list(self._pending):
            if mid in self._sent_held:
                continue
            await _publish(client, topic, data, qos=qos, retain=retain)
            self._sent_held.add(mid)
            self.published += 1

    async def _send_retained(self, client: aiomqtt.Client) -> None:
        while True:
            await self._retained_wake.wait()
            self._retained_wake.clear()
            while self._retained_dirty:
                topic = next(iter(self._retained_dirty))
                data, qos = self._retained[topic]
                await _publish(client, topic, data, qos=qos, retain=True)
                # Only now: a failure above leaves it dirty for the next connection.
                self._retained_dirty.pop(topic, None)
                if self._retained.get(topic, (None, 0))[0] is not data:
                    self._retained_dirty[topic] = None  # changed while we were sending
                self.published_retained += 1

    async def _send_live(self, client: aiomqtt.Client) -> None:
        while True:
            await self._live_wake.wait()
            self._live_wake.clear()
            while self._live:
                topic, data = self._live.popleft()
                await _publish(client, topic, data, qos=0, retain=False)
                self.published_live += 1


def make_publisher(
    settings: Settings,
    *,
    on_request: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]] | None = None,
    outbox_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> MqttPublisher:
    """Build the daemon's publisher from the settings.

    Args:
        settings: the station settings (``mqtt``, ``station``, ``data_dir``).
        on_request: ``async (cmd, body) -> data`` for validated commands; raising
            :class:`~dynoai_daemon.publish.commands.CommandError` (or any exception)
            sends an error reply.
        outbox_path: the outbox file; ``<data_dir>/outbox.sqlite`` by default.
        kwargs: further :class:`MqttPublisher` options (backoff, timeout, ...).

    Raises:
        ConfigError: bad url, password file or CA file.
        StoreError: the outbox cannot be opened.
    """
    m = settings.mqtt
    topics = Topics(m.base_topic, settings.station)
    handler: CommandHandler | None = None
    if on_request is not None:
        handler = CommandRouter.for_dispatcher(on_request, topics=topics).handle
    kwargs.setdefault("backoff_max", m.reconnect_max_s)
    return MqttPublisher(
        url=m.url,
        station=settings.station,
        outbox=outbox_path or Path(settings.data_dir) / "outbox.sqlite",
        base_topic=m.base_topic,
        username=m.username or None,
        password_file=m.password_file or None,
        ca_file=m.ca_file or None,
        client_id=m.client_id or None,
        keepalive=m.keepalive_s,
        command_handler=handler,
        **kwargs,
    )


__all__ = ["CommandHandler", "MqttPublisher", "backoff_delay", "make_publisher", "parse_url"]

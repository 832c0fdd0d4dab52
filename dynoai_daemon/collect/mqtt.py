"""The collector's MQTT side: paho-mqtt 2 with manual acknowledgement, bridged into asyncio.

Why paho directly and not aiomqtt: a session may be acknowledged (PUBACK) only after its
PostgreSQL commit, so that a collector killed between receive and commit gets the message
again instead of losing it. paho-mqtt 2 has exactly that (``manual_ack_set(True)``, then
``ack(mid, qos)``); aiomqtt 2 acknowledges on receipt and does not expose manual acks
(its open issue #345), and reaching into its private paho client would tie us to its
internals. paho's own network thread (``loop_start``) keeps the socket, keepalive and
reconnects (exponential backoff, ``reconnect_delay_set``) going whatever the asyncio side
is doing, and paho's ``publish``/``ack`` are thread-safe. The thread only hands each
message to the event loop (``call_soon_threadsafe`` into an :class:`asyncio.Queue`); all
decisions happen in the loop.

The connection is MQTT 5 with clean start off and a session expiry, and a fixed client id
(``dynoai-collector-<id>``): the broker keeps the subscription and queues messages while
the collector is away (restart, crash), and resends unacknowledged ones when it is back.
``Receive Maximum`` bounds how many unacknowledged messages the broker sends at once, so
a stalled database back-pressures the broker instead of filling memory.

Acknowledgements carry a connection generation: a message received on a connection that
has since dropped is not acknowledged on the next one (its packet id belongs to the old
connection; the broker resends it, and the idempotent insert absorbs the copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from dynoai_daemon.errors import ConfigError
from dynoai_daemon.publish.mqtt import parse_url

log = structlog.get_logger("dynoai.collect.mqtt")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the collector got it; ``generation`` is its connection's number."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    generation: int


class MqttBridge:
    """One persistent MQTT 5 session with a shared subscription and manual acks.

    Args:
        url: ``mqtt://[user@]host[:port]`` or ``mqtts://...``.
        client_id: the MQTT client id (fixed per collector: the broker keeps its session).
        subscription: the topic filter (``$share/<group>/...``), subscribed at QoS 1.
        username: broker user (overrides one in the URL).
        password: broker password (read from a file by the caller; never logged).
        ca_file: CA bundle for mqtts (system CAs when None).
        session_expiry: seconds the broker keeps the session after a disconnect.
        receive_maximum: most unacknowledged messages the broker may send at once.
        keepalive: MQTT keepalive, seconds.
        reconnect_min: first reconnect delay, whole seconds (paho doubles it up to max).
        reconnect_max: largest reconnect delay, whole seconds.
        will: (topic, payload) published retained at QoS 1 by the broker if we vanish.

    Raises:
        ConfigError: bad URL or unreadable CA file.
    """

    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        subscription: str,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        session_expiry: int = 7 * 24 * 3600,
        receive_maximum: int = 200,
        keepalive: int = 10,
        reconnect_min: int = 1,
        reconnect_max: int = 30,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.host, self.port, self.tls, url_user = parse_url(url)
        self.url = f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
        self.client_id = client_id
        self.subscription = subscription
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self.connects = 0
        self.connect_failures = 0
        self.subscribed = False
        self.last_error: str | None = None
        self.session_present: bool | None = None
        self._lock = threading.Lock()
        self._generation = 0
        self._connected = False
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._changed: asyncio.Event | None = None

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
        )
        c.manual_ack_set(True)
        c.reconnect_delay_set(min_delay=max(1, reconnect_min), max_delay=max(1, reconnect_max))
        user = username or url_user
        if user:
            c.username_pw_set(user, password)
        if self.tls:
            try:
                c.tls_set(ca_certs=ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot use CA file {ca_file!r}: {exc}", field="--ca-file"
                ) from exc
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c
        self._receive_maximum = max(1, min(65535, receive_maximum))

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the connection's loss."""
        return self._connected

    @property
    def generation(self) -> int:
        """The number of the current (or last) connection; bumps on connect and on loss."""
        return self._generation

    async def wait_connected(self, within: float) -> bool:
        """Wait until connected and subscribed; False after ``within`` seconds."""
        assert self._changed is not None, "start() first"
        try:
            async with asyncio.timeout(within):
                while True:
                    self._changed.clear()
                    if self._connected and self.subscribed:
                        break
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Connect in paho's network thread (which keeps reconnecting) and subscribe."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = self._receive_maximum
        self._client.connect_async(
            self.host,
            self.port,
            keepalive=self.keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        self._started = True

    def stop_accepting(self) -> None:
        """Leave further messages unacknowledged with the broker (shutdown has begun)."""
        self._accepting = False

    async def close(self, final: tuple[str, bytes] | None = None, within: float = 2.0) -> None:
        """Publish ``final`` (retained, QoS 1) if connected, disconnect cleanly (the broker
        keeps the session and every unacknowledged message) and join paho's thread."""
        if not self._started:
            return
        self._started = False
        self._accepting = False
        if final is not None and self._connected:
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            await asyncio.to_thread(info.wait_for_publish, within)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    # ------------------------------------------------------------------ loop side

    def ack(self, d: Delivery) -> bool:
        """Acknowledge a message (QoS >= 1) if its connection is still the current one.

        Returns:
            True if a PUBACK was queued; False if the connection it came on is gone (the
            broker will send it again) or it needs none (QoS 0).
        """
        if d.qos == 0:
            return False
        with self._lock:
            if d.generation != self._generation or not self._connected:
                return False
            rc = self._client.ack(d.mid, d.qos)
        return rc == paho.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Publish without waiting; False when not connected (QoS 0 is then dropped)."""
        if not self._connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    # ------------------------------------------------------------------ paho thread

    def _to_loop(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            loop.call_soon_threadsafe(fn, *args)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason.getName()}"
            log.error("mqtt connect refused", url=self.url, reason=reason.getName())
            return
        with self._lock:
            self._generation += 1
            self._connected = True
        self.connects += 1
        self.session_present = bool(flags.session_present)
        self.last_error = None
        log.info(
            "mqtt connected",
            url=self.url,
            client_id=self.client_id,
            session_present=self.session_present,
        )
        # Always (re)subscribe: harmless when the session kept it, needed when the broker
        # lost it (no persistence) or this is the first connection.
        client.subscribe(self.subscription, options=SubscribeOptions(qos=1))
        self._to_loop(self._notify)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # TCP connect or TLS failed (broker down, wrong host); paho retries with backoff.
        self.connect_failures += 1
        self.last_error = f"cannot connect to {self.url}"
        if self.connect_failures == 1 or self.connect_failures % 10 == 0:
            log.warning("mqtt broker unreachable", url=self.url, attempts=self.connect_failures)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            was = self._connected
            self._generation += 1
            self._connected = False
        self.subscribed = False
        if was and self._started:
            self.last_error = f"connection lost: {reason.getName()}"
            log.warning("mqtt connection lost", url=self.url, reason=reason.getName())
        self._to_loop(self._notify)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        bad = [r for r in reasons if r.is_failure]
        if bad:
            self.subscribed = False
            why = bad[0].getName()
            self.last_error = f"subscription to {self.subscription!r} refused: {why}"
            log.error("mqtt subscription refused", filter=self.subscription, reason=why)
        else:
            self.subscribed = True
        self._to_loop(self._notify)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not self._accepting:
            return  # stays unacknowledged: the broker resends it to the next session holder
        d = Delivery(
            topic=msg.topic,
            payload=bytes(msg.payload),
            mid=msg.mid,
            qos=msg.qos,
            dup=bool(msg.dup),
            generation=self._generation,
        )
        self._to_loop(self.deliveries.put_nowait, d)

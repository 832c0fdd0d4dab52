"""The simulated dyno's JetDrive sender: a provider (the dyno end of the protocol).

:class:`JetDriveProvider` encodes ChannelInfo, values and logging responses with the
driver's own codec (:mod:`drivers.jetdrive_codec`), answers RequestChannelInfo and Ping, and
sends over a multicast or unicast UDP socket; the simulated cell and the tests use it to
play the dyno.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from drivers.base import cancel_and_wait
from drivers.jetdrive import Datagrams, is_multicast, make_udp_socket, random_host_id
from drivers.jetdrive_codec import (
    ALL_HOSTS,
    DEFAULT_GROUP,
    DEFAULT_PORT,
    MTU,
    U32,
    ChannelDef,
    ChannelInfo,
    ChannelValue,
    ChannelValues,
    ClearChannelInfo,
    Logging,
    LoggingCommand,
    Ping,
    Pong,
    RequestChannelInfo,
    chunk_channel_defs,
    chunk_channel_values,
    decode_datagram,
    encode_message,
)
from dynoai_daemon.errors import ProtocolError


class JetDriveProvider:
    """A JetDrive provider: the dyno end of the protocol.

    The encoders are pure (each datagram takes the next sequence number); :meth:`start`
    adds a socket that answers RequestChannelInfo and Ping, and re-announces the channel
    list every ``announce_interval_s``.

    Args:
        name: provider name (at most 50 bytes).
        channels: ``ChannelDef`` records, or ``(name, unit)`` pairs numbered by position.
        host_id: our host id (random when None).
        clock: monotonic seconds; the device clock counts ms from construction.
        mtu: datagram size limit used to split long lists.
    """

    def __init__(
        self,
        *,
        name: str = "Dyno",
        channels: Iterable[ChannelDef | tuple[str, int]] = (),
        host_id: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        mtu: int = MTU,
    ) -> None:
        defs: list[ChannelDef] = []
        for i, ch in enumerate(channels):
            defs.append(ch if isinstance(ch, ChannelDef) else ChannelDef(i, ch[0], int(ch[1])))
        self.name = name
        self.channels = defs
        self._by_name = {c.name.lower(): c.id for c in defs}
        self.host_id = host_id if host_id is not None else random_host_id()
        self.clock = clock
        self.mtu = mtu
        self.seq = 0
        self.boot = clock()
        self.requests_answered = 0
        self.pings_answered = 0
        self.bad_datagrams = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._dest: tuple[str, int] | None = None
        self._unicast = False
        self._announcer: asyncio.Task[None] | None = None
        self.local_address: tuple[str, int] | None = None

    # --- pure encoders --------------------------------------------------------------------

    def device_ms(self) -> int:
        """Return the device clock: ms since (re)boot, wrapping at 2**32."""
        return int((self.clock() - self.boot) * 1000.0) % U32

    def reboot(self) -> None:
        """Simulate a reboot: the device clock and the sequence restart from 0."""
        self.boot = self.clock()
        self.seq = 0

    def _msg(self, body: Any, dest: int = ALL_HOSTS) -> bytes:
        data = encode_message(body, source=self.host_id, seq=self.seq, dest=dest)
        self.seq = (self.seq + 1) & 0xFF
        return data

    def channel_info_datagrams(self) -> list[bytes]:
        """Return the ChannelInfo datagrams (several when the list exceeds the MTU)."""
        return [
            self._msg(ChannelInfo(self.name, chunk))
            for chunk in chunk_channel_defs(self.channels, self.mtu)
        ]

    def clear_datagram(self) -> bytes:
        """Return a ClearChannelInfo datagram."""
        return self._msg(ClearChannelInfo())

    def values_datagrams(
        self, values: Mapping[str | int, float] | Sequence[ChannelValue], ts_ms: int | None = None
    ) -> list[bytes]:
        """Encode channel values (by channel name, id, or ready records).

        Args:
            values: ``{name or id: value}`` stamped ``ts_ms`` (default: the device clock),
                or a sequence of :class:`ChannelValue`.
            ts_ms: device timestamp for a mapping.

        Raises:
            KeyError: a channel name this provider does not announce.
        """
        if isinstance(values, Mapping):
            ts = self.device_ms() if ts_ms is None else ts_ms
            recs = [
                ChannelValue(k if isinstance(k, int) else self._by_name[k.lower()], ts, float(v))
                for k, v in values.items()
            ]
        else:
            recs = list(values)
        return [self._msg(ChannelValues(c)) for c in chunk_channel_values(recs, self.mtu)]

    def logging_datagram(self, command: LoggingCommand) -> bytes:
        """Return a logging response (begin/end/cancel) as the dyno would send it."""
        return self._msg(Logging(True, int(command)))

    def handle(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Answer one received datagram.

        Returns:
            ``(datagram, to_sender)`` replies: ChannelInfo for RequestChannelInfo (to all),
            a Pong for a Ping (addressed to the pinging host). Bad datagrams are counted.
        """
        try:
            msg = decode_datagram(data)
        except ProtocolError:
            self.bad_datagrams += 1
            return []
        h = msg.header
        if h.source in (self.host_id, ALL_HOSTS) or h.dest not in (ALL_HOSTS, self.host_id):
            return []
        body = msg.body
        if isinstance(body, RequestChannelInfo):
            self.requests_answered += 1
            return [(d, False) for d in self.channel_info_datagrams()]
        if isinstance(body, Ping):
            self.pings_answered += 1
            pong = Pong(body.host_ts, self.device_ms(), body.echo, body.version)
            return [(self._msg(pong, dest=h.source), True)]
        return []

    # --- sockets --------------------------------------------------------------------------

    async def start(
        self,
        *,
        group: str = DEFAULT_GROUP,
        port: int = DEFAULT_PORT,
        interface_address: str = "127.0.0.1",
        ttl: int = 1,
        target: tuple[str, int] | None = None,
        announce_interval_s: float = 30.0,
    ) -> None:
        """Open a socket, announce the channel list, and serve requests in the background.

        Multicast (``group`` multicast, no ``target``): joins the group on
        ``interface_address`` and sends to ``(group, port)``. Unicast (``target`` given):
        binds an ephemeral port on ``interface_address`` and sends to ``target``; replies to
        a Ping or request go to whoever sent it.

        Raises:
            OSError: the socket could not be opened.
        """
        loop = asyncio.get_running_loop()
        if target is None and is_multicast(group):
            sock, _ = make_udp_socket(
                group=group, port=port, interface_address=interface_address, ttl=ttl
            )
            self._dest, self._unicast = (group, port), False
        else:
            sock, _ = make_udp_socket(
                group=interface_address, port=0, interface_address=interface_address, join=False
            )
            self._dest, self._unicast = (target or (group, port)), True
        host, lport = sock.getsockname()[:2]
        self.local_address = (str(host), int(lport))
        proto = Datagrams(self._on_datagram, lambda exc: None)
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
        self._transport = transport
        self.send(self.channel_info_datagrams())
        self._announcer = asyncio.create_task(
            self._announce(announce_interval_s), name=f"jetdrive-provider:{self.name}"
        )

    async def _announce(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.send(self.channel_info_datagrams())

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        # Multicast replies go to the group (the Pong's header names the pinging host):
        # with SO_REUSEPORT, a unicast reply to the shared port would reach just one of
        # the sockets bound to it, not necessarily the pinging one.
        for reply, _ in self.handle(data):
            self.send([reply], addr if self._unicast else None)

    def send(self, datagrams: Sequence[bytes], addr: tuple[str, int] | None = None) -> None:
        """Send datagrams to ``addr`` (default: the group or unicast target)."""
        transport, dest = self._transport, addr or self._dest
        if transport is None or dest is None:
            raise RuntimeError("JetDriveProvider.send() before start()")
        for d in datagrams:
            with contextlib.suppress(OSError):
                transport.sendto(d, dest)

    def send_values(
        self, values: Mapping[str | int, float] | Sequence[ChannelValue], ts_ms: int | None = None
    ) -> None:
        """Encode and send channel values (see :meth:`values_datagrams`)."""
        self.send(self.values_datagrams(values, ts_ms))

    def send_channel_info(self, *, clear_first: bool = False) -> None:
        """Announce the channel list, after a ClearChannelInfo when it changed."""
        if clear_first:
            self.send([self.clear_datagram()])
        self.send(self.channel_info_datagrams())

    def send_logging(self, command: LoggingCommand) -> None:
        """Send a logging response (run begin/end/cancel)."""
        self.send([self.logging_datagram(command)])

    async def close(self) -> None:
        """Stop serving and close the socket; safe to call more than once."""
        task, self._announcer = self._announcer, None
        if task is not None:
            await cancel_and_wait(task)
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()


__all__ = ["JetDriveProvider"]

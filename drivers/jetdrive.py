"""Dynojet JetDrive driver: the UDP sockets around the receiver, and pcap decoding.

:class:`JetDriveDriver` wraps a :class:`~drivers.jetdrive_receiver.JetDriveReceiver` around a
UDP socket that joins the multicast group (or falls back to unicast), requests channel info
on start and when stale, and pings for clock alignment; :meth:`JetDriveDriver.decode_capture`
decodes a pcap offline for ``dynoai decode``. The socket helpers here are shared with the
simulated dyno (:mod:`simulators.jetdrive_provider`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from drivers.base import Driver, DriverStats
from drivers.jetdrive_codec import (
    DEFAULT_GROUP,
    DEFAULT_PORT,
    U32,
    Logging,
    LoggingCommand,
    Ping,
    RequestChannelInfo,
    encode_message,
)
from drivers.jetdrive_receiver import JetDriveReceiver
from drivers.pcap import PcapReader
from dynoai_daemon.channels import STOICH_GASOLINE, Sample
from dynoai_daemon.errors import ConfigError, DriverOpenError, DriverOperationError

log = structlog.get_logger(__name__)


# --- sockets --------------------------------------------------------------------------------


class Datagrams(asyncio.DatagramProtocol):
    """Forwards datagrams to a callback and reports the end of the transport."""

    def __init__(
        self,
        on_datagram: Callable[[bytes, tuple[str, int]], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self.on_datagram = on_datagram
        self.on_error = on_error
        self.lost = asyncio.Event()
        self.exc: Exception | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. a unicast peer that went away) must not end the link.
        self.on_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.exc = exc
        self.lost.set()


def is_multicast(address: str) -> bool:
    """Return True for an IPv4 multicast address."""
    try:
        return ipaddress.IPv4Address(address).is_multicast
    except ValueError:
        return False


def make_udp_socket(
    *,
    group: str,
    port: int,
    interface_address: str = "0.0.0.0",
    ttl: int = 1,
    join: bool = True,
) -> tuple[socket.socket, bool]:
    """Create a non-blocking UDP socket for JetDrive.

    With a multicast ``group`` the socket binds ``("", port)`` with SO_REUSEADDR (and
    SO_REUSEPORT) so several programs share the port, joins the group on
    ``interface_address`` and sends multicast out of that interface with loopback on.
    With a unicast ``group`` (or ``join=False``) it binds ``(interface_address, port)``.

    Returns:
        ``(socket, joined)``: whether the multicast group was joined.

    Raises:
        OSError: the bind or the join failed (the socket is closed then).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        multicast = join and is_multicast(group)
        if not multicast:
            sock.bind((interface_address, port))
            return sock, False
        sock.bind(("", port))
        iface = socket.inet_aton(interface_address)
        mreq = socket.inet_aton(group) + iface
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        if interface_address != "0.0.0.0":
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        return sock, True
    except OSError:
        sock.close()
        raise


def _parse_peer(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    try:
        ipaddress.IPv4Address(host)
        p = int(port)
    except ValueError:
        raise ConfigError(
            f"jetdrive: bad peer {text!r} (want IPv4[:port])", field="peers"
        ) from None
    if not 0 < p <= 0xFFFF:
        raise ConfigError(f"jetdrive: bad peer port in {text!r}", field="peers")
    return host, p


def random_host_id(rng: random.Random | None = None) -> int:
    """Return a random host id, never 0 nor 0xFFFF (as the spec asks)."""
    return (rng or random).randint(1, 0xFFFE)


# --- driver ---------------------------------------------------------------------------------


class JetDriveDriver(Driver):
    """Live JetDrive listener (a "host" in JetDrive terms).

    Args:
        group: multicast group; a unicast address means unicast mode from the start.
        port: UDP port (0 binds a free port, handy in tests).
        interface_address: local interface address to join the group on and send from.
        host_id: our JetDrive host id (random when None); 0 and 0xFFFF are invalid.
        unicast_fallback: when joining the group fails, listen for unicast datagrams on the
            port (all interfaces) instead of failing, and send requests to ``peers`` and to
            every provider heard from.
        ttl: multicast TTL of our requests and pings.
        peers: ``"ip[:port]"`` providers to send requests to in unicast mode.
        ping_interval_s: Ping period for clock alignment.
        info_refresh_s: re-request ChannelInfo when a provider's list is older than this.
        stoich: AFR per lambda for lambda-unit channels.
        reboot_margin_ms: a device clock jump back by more than this is a provider reboot.
        use_device_time: stamp samples with the aligned device time (see the receiver).
        **kwargs: the :class:`Driver` options (source, channel_map, clock, ...).

    Raises:
        ConfigError: an option is out of range.
    """

    name = "jetdrive"
    kind = "udp"

    def __init__(
        self,
        *,
        group: str = DEFAULT_GROUP,
        port: int = DEFAULT_PORT,
        interface_address: str = "0.0.0.0",
        host_id: int | None = None,
        unicast_fallback: bool = True,
        ttl: int = 1,
        peers: Sequence[str] = (),
        ping_interval_s: float = 2.0,
        info_refresh_s: float = 30.0,
        stoich: float = STOICH_GASOLINE,
        reboot_margin_ms: int = 2000,
        use_device_time: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for fname, addr in (("group", group), ("interface_address", interface_address)):
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise ConfigError(f"jetdrive: {fname} {addr!r} is not IPv4", field=fname) from None
        if not 0 <= int(port) <= 0xFFFF:
            raise ConfigError(f"jetdrive: port {port} out of range", field="port")
        if host_id is not None and not 0 < int(host_id) < 0xFFFF:
            raise ConfigError("jetdrive: host_id must be 1..0xFFFE", field="host_id")
        if not 0 <= int(ttl) <= 255:
            raise ConfigError("jetdrive: ttl must be 0..255", field="ttl")
        if ping_interval_s <= 0 or info_refresh_s <= 0:
            raise ConfigError("jetdrive: intervals must be positive", field="ping_interval_s")
        if not stoich > 0:
            raise ConfigError("jetdrive: stoich must be positive", field="stoich")
        self.group = group
        self.port = int(port)
        self.interface_address = interface_address
        self.host_id = int(host_id) if host_id is not None else random_host_id()
        self.unicast_fallback = bool(unicast_fallback)
        self.ttl = int(ttl)
        self.peers = [_parse_peer(p, self.port) for p in peers]
        self.ping_interval_s = float(ping_interval_s)
        self.info_refresh_s = float(info_refresh_s)
        self.stoich = float(stoich)
        self.reboot_margin_ms = int(reboot_margin_ms)
        self.use_device_time = bool(use_device_time)
        self.receiver = self._new_receiver(self.host_id)
        self.mode: str | None = None  # "multicast" or "unicast" once open
        self.local_address: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._seq = 0
        self._sent = 0
        self._send_errors = 0
        self._join_failures = 0

    def _new_receiver(self, host_id: int | None, hold_limit: int = 1024) -> JetDriveReceiver:
        return JetDriveReceiver(
            source=self.source,
            host_id=host_id,
            channel_map=self.channel_map,
            stoich=self.stoich,
            reboot_margin_ms=self.reboot_margin_ms,
            hold_limit=hold_limit,
            info_refresh_s=self.info_refresh_s,
            use_device_time=self.use_device_time,
        )

    # --- Driver hooks ---------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            sock, joined = make_udp_socket(
                group=self.group,
                port=self.port,
                interface_address=self.interface_address,
                ttl=self.ttl,
            )
        except OSError as exc:
            if not (self.unicast_fallback and is_multicast(self.group)):
                raise DriverOpenError(
                    f"{self.source}: cannot open JetDrive socket on {self.group}:{self.port}"
                    f" via {self.interface_address}: {exc}"
                ) from exc
            self._join_failures += 1
            log.warning(
                "jetdrive multicast join failed, falling back to unicast",
                source=self.source,
                group=self.group,
                interface=self.interface_address,
                error=str(exc),
            )
            try:
                # The interface that refused the join may not be usable at all, so
                # listen for unicast datagrams on every interface.
                sock, joined = make_udp_socket(
                    group=self.group, port=self.port, interface_address="0.0.0.0", join=False
                )
            except OSError as exc2:
                raise DriverOpenError(
                    f"{self.source}: cannot bind UDP port {self.port}: {exc2}"
                ) from exc2
        self._sock = sock
        self.mode = "multicast" if joined else "unicast"
        host, port = sock.getsockname()[:2]
        self.local_address = (str(host), int(port))
        self._sync_stats()

    async def _close(self) -> None:
        transport, self._transport = self._transport, None
        sock, self._sock = self._sock, None
        if transport is not None:
            transport.close()
        elif sock is not None:
            sock.close()

    async def _read(self) -> None:
        if self._sock is None:
            await self._open()
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        proto = Datagrams(self._on_datagram, self._on_send_error)
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=self._sock)
        self._transport = transport
        now = self.clock()
        self.send_request_channel_info()
        self.receiver.note_request_sent(now)
        self.send_ping()
        next_ping = now + self.ping_interval_s
        while True:
            timeout = max(0.05, min(0.5, next_ping - self.clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: it can eat a cancel
                    await proto.lost.wait()
            if proto.lost.is_set():
                raise DriverOperationError(f"{self.source}: JetDrive socket closed: {proto.exc}")
            now = self.clock()
            if now >= next_ping:
                self.send_ping()
                next_ping = now + self.ping_interval_s
            if self.receiver.wants_channel_info(now):
                self.send_request_channel_info()

    # --- sending --------------------------------------------------------------------------

    def _targets(self) -> list[tuple[str, int]]:
        if self.mode == "multicast":
            assert self.local_address is not None
            return [(self.group, self.local_address[1])]
        out = list(self.peers)
        for p in self.receiver.providers.values():
            if p.is_provider and p.addr is not None and p.addr not in out:
                out.append(p.addr)
        return out

    def _send(self, body: Ping | RequestChannelInfo | Logging) -> None:
        transport = self._transport
        if transport is None:
            return
        data = encode_message(body, source=self.host_id, seq=self._seq)
        self._seq = (self._seq + 1) & 0xFF
        for addr in self._targets():
            try:
                transport.sendto(data, addr)
                self._sent += 1
            except OSError:
                self._send_errors += 1
        self._sync_stats()

    def send_request_channel_info(self) -> None:
        """Ask every provider for its channel list."""
        self._send(RequestChannelInfo())

    def send_ping(self) -> None:
        """Send a Ping stamped with our clock (ms) for clock alignment."""
        self._send(Ping(int(self.clock() * 1000.0) % U32))

    def send_logging_request(self, command: LoggingCommand) -> None:
        """Ask the dyno to begin/end/cancel/query logging (extended protocol)."""
        self._send(Logging(False, int(command)))

    # --- receiving ------------------------------------------------------------------------

    def _on_send_error(self, exc: Exception) -> None:
        self._send_errors += 1
        self._sync_stats()

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.clock()
        before = self.receiver.stats.messages
        samples = self.receiver.feed(data, now, addr)
        if self.receiver.stats.messages != before:
            self.stats.last_seen = now
        if samples:
            self.stats.samples += len(samples)
            self._put_nowait(samples)
        if self._transport is not None and self.receiver.wants_channel_info(now):
            self.send_request_channel_info()
        self._sync_stats()

    def _sync_stats(self) -> None:
        rs = self.receiver.stats
        self.stats.messages = rs.messages
        self.stats.bad_frames = rs.bad_frames
        extra = rs.extra()
        extra.update(
            sent=self._sent,
            send_errors=self._send_errors,
            multicast_join_failures=self._join_failures,
            held_values=self.receiver.pending_values(),
        )
        extra.update(self.implausible_counters())
        self.stats.extra = extra

    # --- offline --------------------------------------------------------------------------

    @classmethod
    def decode_capture(
        cls, path: str | Path, /, **options: Any
    ) -> tuple[list[Sample], DriverStats]:
        """Decode the JetDrive datagrams of a pcap or pcapng file.

        Only UDP datagrams to or from ``port`` (default 22344; 0 = any port) are decoded.
        Each sample's ``t`` is the capture timestamp (epoch seconds) of its datagram;
        values seen before their ChannelInfo are released when it arrives, so the result
        is sorted by ``t``.

        Args:
            path: the capture.
            **options: the driver's options (port, channel_map, stoich, source, ...).

        Returns:
            ``(samples, stats)``; stats.extra also carries the pcap reader's counters.

        Raises:
            InputError: not a pcap/pcapng file, or an unsupported link type.
            ConfigError: a bad option.
        """
        drv = cls(**options)
        rx = drv._new_receiver(None, hold_limit=1_000_000)
        samples: list[Sample] = []
        other_ports = 0
        with PcapReader(path) as reader:
            for dg in reader.udp_datagrams():
                if drv.port and drv.port not in (dg.dport, dg.sport):
                    other_ports += 1
                    continue
                samples.extend(rx.feed(dg.payload, dg.t, (dg.src, dg.sport)))
            pstats = reader.stats.as_dict()
        samples.sort(key=lambda s: s.t)
        stats = DriverStats(
            messages=rx.stats.messages,
            bad_frames=rx.stats.bad_frames,
            samples=len(samples),
        )
        extra = rx.stats.extra()
        extra["other_ports"] = other_ports
        extra["held_values"] = rx.pending_values()
        extra.update({f"pcap_{k}": v for k, v in pstats.items()})
        stats.extra = extra
        return samples, stats


__all__ = [
    "Datagrams",
    "JetDriveDriver",
    "is_multicast",
    "make_udp_socket",
    "random_host_id",
]

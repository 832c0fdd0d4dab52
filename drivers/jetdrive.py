"""Dynojet JetDrive driver: receiver state machine, UDP driver, simulated provider, pcap decode.

:class:`JetDriveReceiver` is the pure heart (no sockets, injectable time): it keeps, per
provider (source host id), the channel table built from ChannelInfo, binds channels by
(provider, name, unit) to canonical channels through contract.md's default map (overridable
with ``channel_map``), converts SI units to the project's units, holds back values whose
channel is not yet known (and asks for ChannelInfo), counts sequence gaps, out-of-order
packets, truncated datagrams and provider reboots, aligns the provider clock by Ping/Pong,
and turns logging begin/end responses into ``run_marker`` samples (1 = begin, 0 = end; a
cancel emits ``run_marker`` 0 plus ``run_cancel`` 1). :class:`JetDriveDriver` wraps it
around a UDP socket that joins the multicast group (or falls back to unicast), requests
channel info on start and when stale, and pings for clock alignment.
:class:`JetDriveProvider` plays the dyno for the simulator and tests, and
:meth:`JetDriveDriver.decode_capture` decodes a classic pcap offline for ``dynoai decode``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from drivers.base import Driver, DriverStats, cancel_and_wait
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
    Opaque,
    Ping,
    Pong,
    RequestChannelInfo,
    chunk_channel_defs,
    chunk_channel_values,
    convert_unit,
    decode_datagram,
    encode_message,
    u32_diff,
)
from drivers.pcap import PcapReader
from dynoai_daemon.channels import STOICH_GASOLINE, Sample
from dynoai_daemon.errors import ConfigError, DriverOpenError, DriverOperationError, ProtocolError

log = structlog.get_logger(__name__)

#: contract.md's default JetDrive map, in priority order: when one provider publishes
#: several channels that default to the same canonical channel (say ``Engine RPM`` and
#: ``RPM``), the earliest entry here wins and the others keep their JetDrive names.
DEFAULT_CHANNEL_MAP: Final[tuple[tuple[str, str], ...]] = (
    ("engine rpm", "rpm"),
    ("digital rpm 1", "rpm"),
    ("rpm", "rpm"),
    ("torque", "torque_ftlb"),
    ("power", "power_hp"),
    ("afr 1", "afr_front"),
    ("afr 2", "afr_rear"),
    ("map", "map_kpa"),
    ("tps", "tps_pct"),
    ("throttle", "tps_pct"),
)
RUN_MARKER: Final = "run_marker"
RUN_CANCEL: Final = "run_cancel"
MAX_PONG_RTT_MS: Final = 10_000  # a Pong older than this answers a Ping we gave up on
FORWARD_JUMP_SLACK_MS: Final = 60_000


# --- receiver -------------------------------------------------------------------------------


@dataclass
class ReceiverStats:
    """Counters of a :class:`JetDriveReceiver` (all monotonically increasing).

    ``seq_gaps`` counts missing sequence numbers (a jump from 4 to 7 adds 2),
    ``out_of_order`` packets older than the newest seen (duplicates included),
    ``unknown_channel_values`` value records that arrived before their ChannelInfo.
    """

    datagrams: int = 0
    messages: int = 0
    bad_frames: int = 0
    ignored_source: int = 0
    own_messages: int = 0
    not_for_us: int = 0
    trailing_bytes: int = 0
    seq_gaps: int = 0
    out_of_order: int = 0
    unknown_channel_values: int = 0
    released_values: int = 0
    held_dropped: int = 0
    provider_reboots: int = 0
    channel_info_packets: int = 0
    clears: int = 0
    pongs: int = 0
    stale_pongs: int = 0
    run_markers: int = 0
    unsupported_messages: int = 0

    def extra(self) -> dict[str, int]:
        """Return the counters that are not plain DriverStats fields."""
        d = asdict(self)
        for k in ("messages", "bad_frames"):
            d.pop(k)
        return d


@dataclass
class ProviderState:
    """What the receiver knows about one source host."""

    host_id: int
    name: str = ""
    is_provider: bool = False
    had_info: bool = False
    cleared: bool = False
    channels: dict[int, ChannelDef] = field(default_factory=dict)
    bindings: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (channel, unit)
    last_seq: int | None = None
    last_ts: int | None = None  # newest device timestamp, unwrapped ms
    last_ts_raw: int = 0
    last_arrival: float = 0.0
    last_info_at: float | None = None
    pongs: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=32))
    offset_s: float | None = None  # monotonic = device seconds + offset
    rtt_ms: float | None = None
    held: deque[tuple[float, ChannelValue]] = field(default_factory=deque)
    addr: tuple[str, int] | None = None

    def reset_clock(self) -> None:
        """Forget the clock alignment and timestamp history (provider rebooted)."""
        self.pongs.clear()
        self.offset_s = None
        self.rtt_ms = None
        self.last_ts = None


class JetDriveReceiver:
    """Pure JetDrive receive state machine.

    Args:
        source: source name stamped on samples.
        host_id: our own host id: our own looped-back messages are skipped and messages
            addressed to another host ignored. None (offline decoding) accepts everything.
        channel_map: overrides, ``{"jetdrive name": "channel"}`` or
            ``{"provider:jetdrive name": "channel"}``, matched case-insensitively.
        stoich: AFR per lambda for lambda-unit channels.
        reboot_margin_ms: a device timestamp this far behind the newest one is a reboot.
        hold_limit: values held per provider while their ChannelInfo is missing.
        info_refresh_s: ask again when a provider sent no ChannelInfo for this long.
        request_interval_s: at most one RequestChannelInfo per this interval.
        use_device_time: stamp ``t`` with the aligned device time once Ping/Pong has aligned
            the clock (default: arrival time).
    """

    def __init__(
        self,
        *,
        source: str = "jetdrive",
        host_id: int | None = None,
        channel_map: Mapping[str, str] | None = None,
        stoich: float = STOICH_GASOLINE,
        reboot_margin_ms: int = 2000,
        hold_limit: int = 1024,
        info_refresh_s: float = 30.0,
        request_interval_s: float = 1.0,
        use_device_time: bool = False,
    ) -> None:
        self.source = source
        self.host_id = host_id
        self.overrides = {k.strip().lower(): v for k, v in (channel_map or {}).items()}
        self.stoich = stoich
        self.reboot_margin_ms = reboot_margin_ms
        self.hold_limit = hold_limit
        self.info_refresh_s = info_refresh_s
        self.request_interval_s = request_interval_s
        self.use_device_time = use_device_time
        self.stats = ReceiverStats()
        self.providers: dict[int, ProviderState] = {}
        self.last_error: str | None = None
        self._want_info = False
        self._last_request: float | None = None

    # --- public ---------------------------------------------------------------------------

    def feed(self, data: bytes, now: float, addr: tuple[str, int] | None = None) -> list[Sample]:
        """Process one datagram that arrived at monotonic time ``now``.

        Never raises on bad input: a datagram that violates the protocol is counted in
        ``stats.bad_frames`` (its message kept in ``last_error``) and yields nothing.

        Returns:
            The samples it produced (possibly held-back values released by a ChannelInfo).
        """
        self.stats.datagrams += 1
        try:
            msg = decode_datagram(data)
        except ProtocolError as exc:
            self.stats.bad_frames += 1
            self.last_error = str(exc)
            return []
        h = msg.header
        if h.source == ALL_HOSTS:
            self.stats.ignored_source += 1
            return []
        if self.host_id is not None and h.source == self.host_id:
            self.stats.own_messages += 1
            return []
        self.stats.messages += 1
        self.stats.trailing_bytes += msg.trailing
        prov = self.providers.get(h.source)
        if prov is None:
            prov = self.providers[h.source] = ProviderState(h.source)
        if addr is not None:
            prov.addr = addr
        seq_before = prov.last_seq
        samples: list[Sample] = []
        rebooted = False
        body = msg.body
        if self.host_id is not None and h.dest not in (ALL_HOSTS, self.host_id):
            self.stats.not_for_us += 1
        elif isinstance(body, ChannelValues):
            samples, rebooted = self._on_values(prov, body, now)
        elif isinstance(body, ChannelInfo):
            samples, rebooted = self._on_info(prov, body, now)
        elif isinstance(body, ClearChannelInfo):
            self._on_clear(prov)
        elif isinstance(body, Pong):
            self._on_pong(prov, body, now)
        elif isinstance(body, Logging):
            samples = self._on_logging(body, now)
        elif isinstance(body, Opaque):
            self.stats.unsupported_messages += 1
        # Ping and RequestChannelInfo from other hosts need nothing from a listener.
        prov.last_arrival = now
        if rebooted:
            prov.last_seq = h.seq  # a rebooted provider restarts its sequence
        else:
            self._account_seq(prov, seq_before, h.seq)
        return samples

    def wants_channel_info(self, now: float) -> bool:
        """Return True (once) when a RequestChannelInfo should be sent now.

        Due when values arrived for unknown channels, when a provider's list is older
        than ``info_refresh_s``, or when no provider is known for that long; rate-limited
        by ``request_interval_s``.
        """
        last = self._last_request
        if last is not None and now - last < self.request_interval_s:
            return False
        due = self._want_info
        if not due:
            since_req = now - last if last is not None else float("inf")
            if since_req > self.info_refresh_s:
                provs = [p for p in self.providers.values() if p.is_provider]
                due = not provs or any(
                    p.last_info_at is None or now - p.last_info_at > self.info_refresh_s
                    for p in provs
                )
        if due:
            self._last_request = now
            self._want_info = False
        return due

    def note_request_sent(self, now: float) -> None:
        """Record that a RequestChannelInfo went out at ``now`` (e.g. the one on start)."""
        self._last_request = now
        self._want_info = False

    def clock_offset(self, host_id: int) -> float | None:
        """Return ``monotonic - device seconds`` for a provider, or None before alignment."""
        p = self.providers.get(host_id)
        return None if p is None else p.offset_s

    def aligned_time(self, host_id: int, device_t: float) -> float | None:
        """Map a provider's device time (s) onto the monotonic clock, None before alignment."""
        off = self.clock_offset(host_id)
        return None if off is None else device_t + off

    def pending_values(self) -> int:
        """Return how many value records are held back waiting for ChannelInfo."""
        return sum(len(p.held) for p in self.providers.values())

    def binding(self, host_id: int, channel_id: int) -> tuple[str, int] | None:
        """Return ``(channel name, jetdrive unit)`` a provider channel is bound to."""
        p = self.providers.get(host_id)
        return None if p is None else p.bindings.get(channel_id)

    # --- message handlers -----------------------------------------------------------------

    def _account_seq(self, prov: ProviderState, last: int | None, seq: int) -> None:
        if last is None:
            prov.last_seq = seq
            return
        diff = (seq - last - 1) & 0xFF
        if diff == 0:
            prov.last_seq = seq
        elif diff < 128:
            self.stats.seq_gaps += diff
            prov.last_seq = seq
        else:
            # Behind the newest seen (or a duplicate): keep the newest as reference.
            self.stats.out_of_order += 1

    def _reboot(self, prov: ProviderState, why: str) -> None:
        self.stats.provider_reboots += 1
        prov.reset_clock()
        log.info("jetdrive provider reboot", source=self.source, host=prov.host_id, why=why)

    def _track_ts(self, prov: ProviderState, ts: int, now: float) -> bool:
        """Update the provider's newest timestamp; return True when it reveals a reboot."""
        if prov.last_ts is None:
            prov.last_ts, prov.last_ts_raw = ts, ts
            return False
        delta = u32_diff(ts, prov.last_ts_raw)
        elapsed_ms = max(0.0, now - prov.last_arrival) * 1000.0
        if delta < -self.reboot_margin_ms or delta > elapsed_ms + FORWARD_JUMP_SLACK_MS:
            self._reboot(prov, f"device clock jumped by {delta} ms")
            prov.last_ts, prov.last_ts_raw = ts, ts
            return True
        if delta > 0:
            prov.last_ts += delta
            prov.last_ts_raw = ts
        return False

    def _sample(self, prov: ProviderState, cid: int, rec: ChannelValue, t: float) -> Sample:
        name, unit = prov.bindings[cid]
        device_t = rec.ts_ms / 1000.0
        if self.use_device_time and prov.offset_s is not None:
            # Never later than arrival: a value cannot be stamped after we received it.
            t = min(t, device_t + prov.offset_s)
        return Sample(t, name, convert_unit(rec.value, unit, self.stoich), self.source, device_t)

    def _on_values(
        self, prov: ProviderState, body: ChannelValues, now: float
    ) -> tuple[list[Sample], bool]:
        prov.is_provider = True
        rebooted = False
        out: list[Sample] = []
        for rec in body.values:
            rebooted |= self._track_ts(prov, rec.ts_ms, now)
            if rec.id in prov.bindings:
                out.append(self._sample(prov, rec.id, rec, now))
                continue
            self.stats.unknown_channel_values += 1
            self._want_info = True
            if len(prov.held) >= self.hold_limit:
                prov.held.popleft()
                self.stats.held_dropped += 1
            prov.held.append((now, rec))
        return out, rebooted

    def _on_info(
        self, prov: ProviderState, body: ChannelInfo, now: float
    ) -> tuple[list[Sample], bool]:
        self.stats.channel_info_packets += 1
        rebooted = False
        if prov.cleared:
            # A fresh list after Clear: the provider restarted or changed its set-up; its
            # clock and sequence may have restarted too, so re-align from scratch.
            self._reboot(prov, "ChannelInfo after ClearChannelInfo")
            prov.cleared = False
            rebooted = True
        prov.is_provider = True
        prov.had_info = True
        prov.name = body.provider
        for ch in body.channels:
            prov.channels[ch.id] = ch
        prov.last_info_at = now
        self._rebind(prov)
        out: list[Sample] = []
        if prov.held:
            keep: deque[tuple[float, ChannelValue]] = deque()
            for t, rec in prov.held:
                if rec.id in prov.bindings:
                    out.append(self._sample(prov, rec.id, rec, t))
                else:
                    keep.append((t, rec))
            prov.held = keep
            self.stats.released_values += len(out)
        return out, rebooted

    def _on_clear(self, prov: ProviderState) -> None:
        self.stats.clears += 1
        prov.is_provider = True
        prov.channels.clear()
        prov.bindings.clear()
        prov.cleared = prov.had_info

    def _on_pong(self, prov: ProviderState, body: Pong, now: float) -> None:
        now_ms = int(now * 1000.0) % U32
        rtt = u32_diff(now_ms, body.host_ts)
        if not 0 <= rtt <= MAX_PONG_RTT_MS:
            self.stats.stale_pongs += 1
            return
        self.stats.pongs += 1
        offset = now - body.remote_ts / 1000.0 - rtt / 2000.0
        prov.pongs.append((float(rtt), offset))
        best_rtt, best_off = min(prov.pongs, key=lambda p: p[0])
        prov.rtt_ms, prov.offset_s = best_rtt, best_off

    def _on_logging(self, body: Logging, now: float) -> list[Sample]:
        if not body.response:
            return []
        if body.command == LoggingCommand.BEGIN:
            self.stats.run_markers += 1
            return [Sample(now, RUN_MARKER, 1.0, self.source)]
        if body.command == LoggingCommand.END:
            self.stats.run_markers += 1
            return [Sample(now, RUN_MARKER, 0.0, self.source)]
        if body.command == LoggingCommand.CANCEL:
            self.stats.run_markers += 1
            return [
                Sample(now, RUN_MARKER, 0.0, self.source),
                Sample(now, RUN_CANCEL, 1.0, self.source),
            ]
        return []

    def _rebind(self, prov: ProviderState) -> None:
        pname = prov.name.lower()
        bindings: dict[int, tuple[str, int]] = {}
        default_pick: dict[str, tuple[int, int]] = {}  # canonical -> (priority, channel id)
        explicit_targets: set[str] = set()
        priority = {n: i for i, (n, _) in reversed(list(enumerate(DEFAULT_CHANNEL_MAP)))}
        defaults = dict(DEFAULT_CHANNEL_MAP)
        for cid in sorted(prov.channels):
            ch = prov.channels[cid]
            key = ch.name.lower()
            override = self.overrides.get(f"{pname}:{key}", self.overrides.get(key))
            if override is not None:
                bindings[cid] = (override, ch.unit)
                explicit_targets.add(override)
                continue
            bindings[cid] = (ch.name, ch.unit)
            target = defaults.get(key)
            if target is not None:
                prio = priority[key]
                cur = default_pick.get(target)
                if cur is None or prio < cur[0]:
                    default_pick[target] = (prio, cid)
        for target, (_, cid) in default_pick.items():
            if target not in explicit_targets:
                bindings[cid] = (target, prov.channels[cid].unit)
        prov.bindings = bindings


# --- sockets --------------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
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
        proto = _Datagrams(self._on_datagram, self._on_send_error)
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
    def decode_capture(cls, path: str | Path, **options: Any) -> tuple[list[Sample], DriverStats]:
        """Decode the JetDrive datagrams of a classic pcap file.

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
            InputError: not a classic pcap file or an unsupported link type.
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


# --- provider (the dyno side, for the simulator and tests) ---------------------------------


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
        proto = _Datagrams(self._on_datagram, lambda exc: None)
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


__all__ = [
    "DEFAULT_CHANNEL_MAP",
    "RUN_CANCEL",
    "RUN_MARKER",
    "JetDriveDriver",
    "JetDriveProvider",
    "JetDriveReceiver",
    "ProviderState",
    "ReceiverStats",
    "is_multicast",
    "make_udp_socket",
    "random_host_id",
]

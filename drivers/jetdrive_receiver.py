"""Dynojet JetDrive receiver: the protocol state machine, with no sockets and injectable time.

:class:`JetDriveReceiver` keeps, per provider (source host id), the channel table built from
ChannelInfo, binds channels by (provider, name, unit) to canonical channels through
docs/contract.md's default map (overridable with ``channel_map``), converts SI units to the
project's units, holds back values whose channel is not yet known (and asks for
ChannelInfo), counts sequence gaps, out-of-order packets, truncated datagrams and provider
reboots, aligns the provider clock by Ping/Pong, and turns logging begin/end responses into
``run_marker`` samples (1 = begin, 0 = end; a cancel emits ``run_marker`` 0 plus
``run_cancel`` 1). The driver (:mod:`drivers.jetdrive`) feeds it datagrams.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Final

import structlog

from drivers.jetdrive_codec import (
    ALL_HOSTS,
    U32,
    ChannelDef,
    ChannelInfo,
    ChannelValue,
    ChannelValues,
    ClearChannelInfo,
    Logging,
    LoggingCommand,
    Opaque,
    Pong,
    convert_unit,
    decode_datagram,
    u32_diff,
)
from dynoai_daemon.channels import STOICH_GASOLINE, Sample
from dynoai_daemon.errors import ProtocolError

log = structlog.get_logger(__name__)

#: docs/contract.md's default JetDrive map, in priority order: when one provider publishes
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


__all__ = [
    "DEFAULT_CHANNEL_MAP",
    "RUN_CANCEL",
    "RUN_MARKER",
    "JetDriveReceiver",
    "ProviderState",
    "ReceiverStats",
]

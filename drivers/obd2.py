"""OBD-II Mode 01 over CAN (ISO 15765-4): codec, rate-based PID scheduler, driver and ECU responder.

The fallback for a stock ECU with no broadcast. Requests ``02 01 PID 00 00 00 00 00`` go to
the functional id 0x7DF (11-bit) or 0x18DB33F1 (29-bit); single-frame replies ``0N 41 PID A
B ..`` come from 0x7E8-0x7EF or 0x18DAF1xx. PIDs: 0x0C rpm = (256A + B) / 4, 0x0B MAP = A
kPa, 0x11 TPS = A * 100 / 255 %, 0x0F IAT and 0x05 coolant = A - 40 degC (published in degF
as ``iat_f``/``ect_f``), 0x0E timing = A / 2 - 64 deg (``spark_front_deg`` by default,
option ``timing_channel``). Every value costs one round trip, so :class:`PidScheduler`
polls by needed rate (rpm and MAP as fast as the ECU answers, TPS and timing slower, IAT and
coolant about once a second), keeps exactly one request outstanding, drops a PID after
``max_misses`` unanswered requests in a row (counted; probed again every
``retry_dropped_s``), and the driver stamps each value when its reply arrives.
:class:`Obd2Responder` plays the ECU on a python-can bus for the simulator and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import can

from drivers.base import DriverStats, cancel_and_wait
from drivers.can_base import (
    EXT_ID_MASK,
    STD_ID_MASK,
    ByteLike,
    CanDriver,
    CanFilter,
    CanFrame,
    Decoded,
    frame_to_message,
    parse_int,
)
from dynoai_daemon.channels import Sample
from dynoai_daemon.errors import ConfigError, DriverOperationError, ProtocolError

FUNCTIONAL_ID_11: Final = 0x7DF
FUNCTIONAL_ID_29: Final = 0x18DB33F1
RESPONSE_BASE_11: Final = 0x7E8
RESPONSE_BASE_29: Final = 0x18DAF100
MODE_01: Final = 0x01
POSITIVE_01: Final = 0x41
NEGATIVE: Final = 0x7F
PAD: Final = 0x55


def _c_to_f(c: float) -> float:
    return c * 1.8 + 32.0


@dataclass(frozen=True)
class PidSpec:
    """One Mode 01 PID: its protocol name, size, scaling and default poll period."""

    pid: int
    name: str
    nbytes: int
    default_channel: str
    default_period_s: float
    decode: Callable[[bytes], float]  # reply data bytes -> value in the channel's unit
    to_raw: Callable[[float], bytes]  # value in OBD units (degC for temperatures) -> bytes


def _u8(x: float) -> bytes:
    v = round(x)
    if not 0 <= v <= 0xFF:
        raise ValueError(f"OBD value {x} out of range")
    return bytes([v])


def _rpm_raw(rpm: float) -> bytes:
    v = round(rpm * 4)
    if not 0 <= v <= 0xFFFF:
        raise ValueError(f"OBD rpm {rpm} out of range")
    return v.to_bytes(2, "big")


PIDS: Final[dict[int, PidSpec]] = {
    s.pid: s
    for s in (
        PidSpec(0x0C, "rpm", 2, "rpm", 0.0, lambda b: (256 * b[0] + b[1]) / 4.0, _rpm_raw),
        PidSpec(0x0B, "map", 1, "map_kpa", 0.0, lambda b: float(b[0]), _u8),
        PidSpec(
            0x11,
            "tps",
            1,
            "tps_pct",
            0.05,
            lambda b: b[0] * 100.0 / 255.0,
            lambda x: _u8(x * 255.0 / 100.0),
        ),
        PidSpec(
            0x0E,
            "timing",
            1,
            "spark_front_deg",
            0.1,
            lambda b: b[0] / 2.0 - 64.0,
            lambda x: _u8((x + 64.0) * 2.0),
        ),
        PidSpec(
            0x0F, "iat", 1, "iat_f", 1.0, lambda b: _c_to_f(b[0] - 40.0), lambda x: _u8(x + 40)
        ),
        PidSpec(
            0x05, "coolant", 1, "ect_f", 1.0, lambda b: _c_to_f(b[0] - 40.0), lambda x: _u8(x + 40)
        ),
    )
}
PID_BY_NAME: Final[dict[str, int]] = {s.name: s.pid for s in PIDS.values()}


def parse_pid(key: int | str) -> int:
    """Return the PID number for ``"rpm"``, ``"0x0C"`` or ``12``.

    Raises:
        ConfigError: not a known PID.
    """
    if isinstance(key, str) and key.strip().lower() in PID_BY_NAME:
        return PID_BY_NAME[key.strip().lower()]
    pid = parse_int(key, what="pids")
    if pid not in PIDS:
        raise ConfigError(
            f"obd2: PID {key!r} not supported (known: {', '.join(PID_BY_NAME)})", field="pids"
        )
    return pid


# --- codec ------------------------------------------------------------------------------------


def encode_request(pid: int, *, extended: bool = False) -> CanFrame:
    """Return the functional Mode 01 request for ``pid``."""
    arb = FUNCTIONAL_ID_29 if extended else FUNCTIONAL_ID_11
    return arb, bytes([0x02, MODE_01, pid & 0xFF, 0, 0, 0, 0, 0]), extended


def encode_response(pid: int, value: float, *, ecu: int = 0, extended: bool = False) -> CanFrame:
    """Return an ECU's single-frame reply carrying ``value`` (OBD units: degC for temperatures).

    ``ecu`` is 0..7 (reply id 0x7E8 + ecu) in 11-bit mode, the ECU address byte in 29-bit
    mode. The frame is padded to 8 bytes with 0x55.

    Raises:
        ValueError: unknown PID or a value out of range.
    """
    spec = PIDS.get(pid)
    if spec is None:
        raise ValueError(f"obd2: PID {pid:#04x} has no encoder")
    payload = spec.to_raw(value)
    body = bytes([2 + len(payload), POSITIVE_01, pid]) + payload
    return response_id(ecu, extended), body.ljust(8, bytes([PAD])), extended


def response_id(ecu: int, extended: bool) -> int:
    """Return the reply id of ECU ``ecu``."""
    if extended:
        return RESPONSE_BASE_29 | (ecu & 0xFF)
    if not 0 <= ecu <= 7:
        raise ValueError("obd2: 11-bit ECU index must be 0..7")
    return RESPONSE_BASE_11 + ecu


@dataclass(frozen=True)
class Reply:
    """A parsed Mode 01 reply: PID and value (None for a PID we do not scale), or a refusal."""

    pid: int
    value: float | None
    negative: bool = False


def is_response_id(arbitration_id: int, is_extended: bool, extended: bool) -> bool:
    """Return True when the id is an OBD reply id of the configured addressing."""
    if is_extended != extended:
        return False
    if extended:
        return (arbitration_id & 0xFFFFFF00) == RESPONSE_BASE_29
    return RESPONSE_BASE_11 <= arbitration_id <= RESPONSE_BASE_11 + 7


def parse_reply(data: ByteLike) -> Reply | None:
    """Parse a single-frame reply's data; None when it is not a Mode 01 answer.

    Raises:
        ProtocolError: a malformed single frame (bad length byte, short payload).
    """
    if len(data) < 1:
        raise ProtocolError("OBD reply without data")
    pci = data[0]
    if pci >> 4 != 0:
        return None  # first/consecutive/flow-control frames: not a Mode 01 single frame
    n = pci & 0x0F
    if n < 1 or n > 7 or len(data) < 1 + n:
        raise ProtocolError(f"OBD single frame: length byte {n} with {len(data)} data bytes")
    sid = data[1]
    if sid == NEGATIVE:
        if n < 3:
            raise ProtocolError("OBD negative reply too short")
        return Reply(-1, None, negative=True) if data[2] == MODE_01 else None
    if sid != POSITIVE_01:
        return None
    if n < 2:
        raise ProtocolError("OBD Mode 01 reply without PID")
    pid = data[2]
    spec = PIDS.get(pid)
    if spec is None:
        return Reply(pid, None)
    payload = bytes(data[3 : 1 + n])
    if len(payload) < spec.nbytes:
        raise ProtocolError(
            f"OBD PID {pid:#04x}: {len(payload)} data bytes, expected {spec.nbytes}"
        )
    return Reply(pid, spec.decode(payload))


class Obd2Codec:
    """Pure Mode 01 codec: requests out, replies in.

    Args:
        channels: PID -> channel for the decoded values ("" drops a PID's value).
        extended: 29-bit addressing.
    """

    def __init__(
        self, channels: Mapping[int, str] | None = None, *, extended: bool = False
    ) -> None:
        self.extended = extended
        self.channels = (
            {p: s.default_channel for p, s in PIDS.items()} if channels is None else dict(channels)
        )
        self.counters: dict[str, int] = {"negative_replies": 0, "unknown_pid_replies": 0}

    def request(self, pid: int) -> CanFrame:
        """Return the request frame for ``pid``."""
        return encode_request(pid, extended=self.extended)

    def parse(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Reply | None:
        """Return the reply carried by a frame, None when the frame is not an OBD reply.

        Raises:
            ProtocolError: a malformed reply.
        """
        if not is_response_id(arbitration_id, is_extended, self.extended):
            return None
        reply = parse_reply(data)
        if reply is not None:
            if reply.negative:
                self.counters["negative_replies"] += 1
            elif reply.value is None:
                self.counters["unknown_pid_replies"] += 1
        return reply

    def values(self, reply: Reply) -> Decoded:
        """Return the channel values of a parsed reply."""
        if reply.value is None:
            return []
        ch = self.channels.get(reply.pid)
        return [(ch, reply.value)] if ch else []

    def decode(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Decoded | None:
        """Decode any Mode 01 reply into channel values (the capture path; no request state).

        Raises:
            ProtocolError: a malformed reply.
        """
        reply = self.parse(arbitration_id, data, is_extended)
        if reply is None:
            return None
        return self.values(reply)

    def can_filters(self) -> list[CanFilter]:
        """Return the filter of the reply ids :func:`is_response_id` accepts.

        11-bit: 0x7E8-0x7EF (0x7E8 / 0x7F8); 29-bit: 0x18DAF1xx (0x18DAF100 / 0x1FFFFF00).
        The requests (0x7DF, 0x18DB33F1), ours or another tester's, do not pass.
        """
        if self.extended:
            return [{"can_id": RESPONSE_BASE_29, "can_mask": EXT_ID_MASK & ~0xFF, "extended": True}]
        return [{"can_id": RESPONSE_BASE_11, "can_mask": STD_ID_MASK & ~0x7, "extended": False}]


# --- scheduler ----------------------------------------------------------------------------------


@dataclass
class _PidState:
    pid: int
    period_s: float
    order: int
    next_due: float = 0.0
    last_sent: float = -math.inf
    misses: int = 0
    dropped_at: float | None = None
    requests: int = 0
    replies: int = 0


class PidScheduler:
    """Which PID to request next: earliest due first, one at a time (pure, injectable time).

    A PID becomes due ``period_s`` after its last request; with period 0 it is always due,
    so several period-0 PIDs share the bus round-robin while slower ones slot in when their
    period has passed. ``max_misses`` unanswered requests in a row drop a PID; a dropped PID
    is probed once every ``retry_dropped_s`` (0 = never) and revived when it answers.

    Args:
        periods: PID -> poll period in seconds; the dict order breaks ties.
        max_misses: consecutive timeouts that drop a PID.
        retry_dropped_s: probe period of dropped PIDs.

    Raises:
        ConfigError: no PIDs, a negative period or max_misses < 1.
    """

    def __init__(
        self, periods: Mapping[int, float], *, max_misses: int = 3, retry_dropped_s: float = 30.0
    ) -> None:
        if not periods:
            raise ConfigError("obd2: no PIDs to poll", field="pids")
        if max_misses < 1:
            raise ConfigError("obd2: max_misses must be >= 1", field="max_misses")
        if retry_dropped_s < 0 or any(p < 0 for p in periods.values()):
            raise ConfigError("obd2: periods must not be negative", field="pids")
        self.max_misses = max_misses
        self.retry_dropped_s = retry_dropped_s
        self.states = {
            pid: _PidState(pid, float(p), i) for i, (pid, p) in enumerate(periods.items())
        }
        self.drops = 0
        self.revivals = 0
        self.timeouts = 0

    def next(self, now: float) -> tuple[int | None, float]:
        """Return ``(pid, 0)`` to request now, or ``(None, wait_s)`` (inf: nothing to poll)."""
        best: _PidState | None = None
        best_key = (math.inf, math.inf, 0)
        for st in self.states.values():
            if st.dropped_at is None:
                due = st.next_due
            elif self.retry_dropped_s > 0:
                due = st.dropped_at + self.retry_dropped_s
            else:
                continue
            # equal due times: the PID asked least recently goes first (round-robin)
            key = (due, st.last_sent, st.order)
            if best is None or key < best_key:
                best, best_key = st, key
        if best is None:
            return None, math.inf
        if best_key[0] <= now:
            return best.pid, 0.0
        return None, best_key[0] - now

    def sent(self, pid: int, now: float) -> None:
        """Record that ``pid`` was requested at ``now``."""
        st = self.states[pid]
        st.requests += 1
        st.last_sent = now
        st.next_due = now + st.period_s
        if st.dropped_at is not None:
            st.dropped_at = now  # the probe is under way; the next one waits a full period

    def answered(self, pid: int) -> None:
        """Record a reply to ``pid``."""
        st = self.states[pid]
        st.replies += 1
        st.misses = 0
        if st.dropped_at is not None:
            st.dropped_at = None
            self.revivals += 1

    def missed(self, pid: int, now: float) -> bool:
        """Record a timeout of ``pid``; return True when this drops it."""
        st = self.states[pid]
        self.timeouts += 1
        st.misses += 1
        if st.dropped_at is None and st.misses >= self.max_misses:
            st.dropped_at = now
            self.drops += 1
            return True
        return False

    def active(self) -> list[int]:
        """Return the PIDs currently polled (not dropped)."""
        return [p for p, st in self.states.items() if st.dropped_at is None]

    def dropped(self) -> list[int]:
        """Return the dropped PIDs."""
        return [p for p, st in self.states.items() if st.dropped_at is not None]


# --- driver ---------------------------------------------------------------------------------------


class Obd2Driver(CanDriver):
    """OBD-II Mode 01 poller.

    Args:
        extended: 29-bit addressing (request 0x18DB33F1, replies 0x18DAF1xx).
        pids: PID (``"rpm"``, ``"0x0C"``, 12) -> poll period in seconds; default rpm and
            map 0 (as fast as possible), tps 0.05, timing 0.1, iat and coolant 1.0.
        timing_channel: channel of PID 0x0E (default ``spark_front_deg``).
        timeout_s: how long to wait for a reply.
        max_misses: consecutive unanswered requests that drop a PID.
        retry_dropped_s: probe period of dropped PIDs (0 = never).
        max_send_errors: consecutive failed sends that count as a dead bus.
        **kwargs: :class:`~drivers.can_base.CanDriver` options; ``channel_map`` keys are PID
            names (rpm, map, tps, timing, iat, coolant) or numbers.

    Raises:
        ConfigError: a bad option.
    """

    name = "obd2"
    codec: Obd2Codec

    def __init__(
        self,
        *,
        extended: bool = False,
        pids: Mapping[int | str, float] | None = None,
        timing_channel: str = "spark_front_deg",
        timeout_s: float = 0.1,
        max_misses: int = 3,
        retry_dropped_s: float = 30.0,
        max_send_errors: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if timeout_s <= 0:
            raise ConfigError("obd2: timeout_s must be positive", field="timeout_s")
        periods = (
            {parse_pid(k): float(v) for k, v in pids.items()}
            if pids is not None
            else {p: s.default_period_s for p, s in PIDS.items()}
        )
        channels = {p: PIDS[p].default_channel for p in periods}
        if 0x0E in channels:
            channels[0x0E] = timing_channel
        for key, ch in self.channel_map.items():
            channels[parse_pid(key)] = ch
        self.extended = bool(extended)
        self.timeout_s = float(timeout_s)
        self.max_misses = int(max_misses)
        self.retry_dropped_s = float(retry_dropped_s)
        self.max_send_errors = int(max_send_errors)
        self.codec = Obd2Codec(channels, extended=self.extended)
        self.scheduler = PidScheduler(
            periods, max_misses=self.max_misses, retry_dropped_s=self.retry_dropped_s
        )
        self._outstanding: tuple[int, asyncio.Future[float]] | None = None
        self._counters.update(requests=0, replies=0, late_replies=0, send_errors=0)

    def sync_stats(self) -> DriverStats:
        """Copy counters, including the scheduler's, into ``stats.extra``."""
        stats = super().sync_stats()
        sch = self.scheduler
        stats.extra.update(
            timeouts=sch.timeouts,
            pids_dropped=sch.drops,
            pids_revived=sch.revivals,
            pids_active=len(sch.active()),
        )
        return stats

    async def _read(self) -> None:
        if self._bus is None:
            await self._open()
        consumer = asyncio.create_task(super()._read(), name=f"{self.source}:rx")
        poller = asyncio.create_task(self._poll(), name=f"{self.source}:poll")
        try:
            done, _ = await asyncio.wait({consumer, poller}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise DriverOperationError(f"{self.source}: OBD poller stopped")
        finally:
            await cancel_and_wait(consumer, poller)
            self._outstanding = None

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        sch = self.scheduler
        send_errors = 0
        while True:
            pid, wait = sch.next(self.clock())
            if pid is None:
                # Nothing due: wait for the next due time (or a long idle when all are dropped
                # and never retried).
                await asyncio.sleep(min(wait, 3600.0))
                continue
            fut: asyncio.Future[float] = loop.create_future()
            self._outstanding = (pid, fut)
            sent_at = self.clock()
            sch.sent(pid, sent_at)
            try:
                self.send(frame_to_message(self.codec.request(pid)))
            except DriverOperationError:
                self._counters["send_errors"] += 1
                send_errors += 1
                if send_errors >= self.max_send_errors:
                    raise
            else:
                send_errors = 0
                self._counters["requests"] += 1
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                # that races with the reply, which would leave this loop running after close.
                async with asyncio.timeout(self.timeout_s):
                    await fut
            except TimeoutError:
                if sch.missed(pid, self.clock()):
                    self._counters[f"dropped_pid_{pid:#04x}"] = 1
                self.sync_stats()
            else:
                sch.answered(pid)
                self._counters.pop(f"dropped_pid_{pid:#04x}", None)
            finally:
                self._outstanding = None

    def handle_frame(self, msg: can.Message, t: float, out: list[Sample]) -> None:
        """Match a reply to the outstanding request and stamp its value with arrival time."""
        if msg.is_error_frame or msg.is_remote_frame:
            self.ingest(msg, t, out)
            return
        try:
            reply = self.codec.parse(msg.arbitration_id, msg.data, msg.is_extended_id)
        except ProtocolError:
            self.stats.bad_frames += 1
            return
        if reply is None:
            self._counters["other_frames"] += 1
            return
        self.stats.messages += 1
        self.stats.last_seen = t
        pending = self._outstanding
        if reply.negative:
            # "service not supported": nothing more will come for this request.
            if pending is not None and not pending[1].done():
                pending[1].set_exception(TimeoutError())
            return
        if pending is None or pending[0] != reply.pid or pending[1].done():
            self._counters["late_replies"] += 1
            return
        self._counters["replies"] += 1
        for ch, v in self.codec.values(reply):
            out.append(Sample(t, ch, v, self.source, msg.timestamp))
        pending[1].set_result(t)


# --- ECU side -----------------------------------------------------------------------------------


ValueSource = Mapping[int, float] | Callable[[int], float | None]


class Obd2Responder:
    """An ECU that answers Mode 01 requests on a python-can bus (simulator and tests).

    Args:
        bus: the bus to listen and answer on (not closed by :meth:`stop`).
        values: PID -> value in OBD units (degC for temperatures), or a function of the PID
            returning None for "no answer"; PIDs without a value are never answered.
        extended: 29-bit addressing.
        ecu: ECU index (11-bit) or address byte (29-bit) of the replies.
        negative_for: PIDs answered with a negative response instead of data.
    """

    def __init__(
        self,
        bus: can.BusABC,
        values: ValueSource,
        *,
        extended: bool = False,
        ecu: int = 0,
        negative_for: frozenset[int] = frozenset(),
    ) -> None:
        self.bus = bus
        self.values = values
        self.extended = extended
        self.ecu = ecu
        self.negative_for = negative_for
        self.requests: dict[int, int] = {}
        self.answered: dict[int, int] = {}
        self._notifier: can.Notifier | None = None

    def respond(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> CanFrame | None:
        """Return the reply to a frame, or None (not a request for us, or no value)."""
        req_id = FUNCTIONAL_ID_29 if self.extended else FUNCTIONAL_ID_11
        if arbitration_id != req_id or is_extended != self.extended or len(data) < 3:
            return None
        if data[0] != 0x02 or data[1] != MODE_01:
            return None
        pid = data[2]
        self.requests[pid] = self.requests.get(pid, 0) + 1
        if pid in self.negative_for:
            body = bytes([0x03, NEGATIVE, MODE_01, 0x12]).ljust(8, bytes([PAD]))
            return response_id(self.ecu, self.extended), body, self.extended
        value = self.values(pid) if callable(self.values) else self.values.get(pid)
        if value is None:
            return None
        self.answered[pid] = self.answered.get(pid, 0) + 1
        return encode_response(pid, value, ecu=self.ecu, extended=self.extended)

    def _on_message(self, msg: can.Message) -> None:
        reply = self.respond(msg.arbitration_id, msg.data, msg.is_extended_id)
        if reply is not None:
            with contextlib.suppress(can.CanError):
                self.bus.send(frame_to_message(reply))

    def start(self) -> None:
        """Start answering (needs a running event loop)."""
        if self._notifier is None:
            self._notifier = can.Notifier(
                self.bus, [self._on_message], timeout=0.05, loop=asyncio.get_running_loop()
            )

    def stop(self) -> None:
        """Stop answering."""
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.stop(timeout=1.0)

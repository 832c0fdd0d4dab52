"""Innovate MTS serial protocol (LC-1, LC-2, LM-2 and chains of them): codec and driver.

The codec is pure: :class:`MtsDecoder` buffers a byte stream, re-synchronises on header
bytes (bit 7 set; data bytes have it clear), frames packets by the header's length field
(``2 * (len + 1)`` bytes in total) and splits data packets into lambda sub-packets and aux
words in chain order; :func:`encode_packet` is its inverse for the simulators. Everything
follows docs/protocols.md. :class:`InnovateMtsDriver` reads a serial port with it and turns
each lambda sub-packet into ``<channel>`` (AFR on the gasoline scale, only while the sensor
reports a valid lambda), ``<channel>_status`` (a :class:`SensorStatus` code, always) and
``<channel>_detail`` (the raw L word whenever the status is not normal); aux words become
``<source>_aux<i>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from drivers.serial_base import SerialDriver, check_positive
from dynoai_daemon.channels import (
    STOICH_GASOLINE,
    Sample,
    SensorStatus,
    detail_channel,
    status_channel,
)
from dynoai_daemon.errors import ConfigError, ProtocolError

BAUDRATE: Final = 19200
#: Controllers stream one packet every 81.92 ms (~12 Hz).
NOMINAL_PERIOD_S: Final = 0.08192
HEADER_MASK: Final = 0xA280
RECORDING_BIT: Final = 0x4000
DATA_BIT: Final = 0x1000
LAMBDA_STATUS_MASK: Final = 0x4200
MAX_WORDS: Final = 255
MAX_L: Final = 0x1FFF
AF_GASOLINE: Final = 147

#: A header's first byte has bits 7, 5 and 1 set (bits 15, 13, 9 of the word) and its
#: second byte bit 7 (bit 7 of the word): the pair every resync search looks for.
_HEADER_RE = re.compile(
    b"[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0xA2 == 0xA2) + b"][\x80-\xff]"
)
_HIGH_RE = re.compile(b"[\x80-\xff]")

# Packet kinds from the scanner.
_NEED_MORE, _PACKET, _GARBAGE, _BAD = range(4)

#: SensorStatus for each MTS function code (000..111).
FUNCTION_STATUS: Final[tuple[SensorStatus, ...]] = (
    SensorStatus.NORMAL,
    SensorStatus.O2_LEVEL,
    SensorStatus.FREE_AIR_CAL,
    SensorStatus.NEEDS_CAL,
    SensorStatus.WARMING_UP,
    SensorStatus.HEATER_CAL,
    SensorStatus.ERROR,
    SensorStatus.RESERVED,
)

#: Error codes an LC-1/LC-2 sends in L with function code 110.
ERROR_CODES: Final[dict[int, str]] = {
    1: "heater short",
    2: "heater open",
    3: "pump cell short",
    4: "pump cell open",
    5: "reference cell short",
    6: "reference cell open",
    7: "system error",
    8: "sensor timing error",
    9: "supply voltage low",
}


@dataclass(frozen=True, slots=True)
class LambdaItem:
    """One lambda sub-packet (status word + lambda word).

    Attributes:
        function: MTS function code 0..7 (0 = lambda valid).
        af: stoichiometric AFR x10 the device is set to (147 for gasoline).
        l_value: the 13-bit L word: lambda data when ``function == 0``, otherwise the
            function's detail (O2 level, warm-up percent, countdown, error code).
    """

    function: int
    af: int
    l_value: int

    @property
    def status(self) -> SensorStatus:
        """The function code as a :class:`SensorStatus`."""
        return FUNCTION_STATUS[self.function & 7]

    @property
    def lambda_value(self) -> float | None:
        """Lambda, only when the function code says it is valid."""
        if self.function != 0:
            return None
        return (self.l_value + 500) / 1000.0

    @property
    def afr(self) -> float | None:
        """AFR on the device's own fuel scale, only when lambda is valid."""
        if self.function != 0:
            return None
        return (self.l_value + 500) * self.af / 10000.0

    @property
    def error(self) -> str | None:
        """The error text for function code 110, else None."""
        if self.function != 6:
            return None
        return ERROR_CODES.get(self.l_value, f"unknown error {self.l_value}")


@dataclass(frozen=True, slots=True)
class AuxItem:
    """One aux channel word (10-bit value, device-specific scaling)."""

    value: int


Item = LambdaItem | AuxItem


@dataclass(frozen=True, slots=True)
class MtsPacket:
    """One decoded MTS packet.

    Attributes:
        recording: header bit 14 (the device is recording).
        is_data: header bit 12 (False for a command reply).
        words: the payload words after the header, as sent.
        items: for data packets, lambda sub-packets and aux words in chain order;
            empty for command replies.
    """

    recording: bool
    is_data: bool
    words: tuple[int, ...]
    items: tuple[Item, ...] = field(default=())

    @property
    def size(self) -> int:
        """Bytes on the wire."""
        return 2 * (len(self.words) + 1)

    @property
    def lambdas(self) -> list[LambdaItem]:
        """The lambda sub-packets in chain order."""
        return [i for i in self.items if isinstance(i, LambdaItem)]

    @property
    def aux(self) -> list[AuxItem]:
        """The aux words in chain order."""
        return [i for i in self.items if isinstance(i, AuxItem)]


# --------------------------------------------------------------------------- decoding


def is_header(word: int) -> bool:
    """Return True when ``word`` has the header bits (mask 0xA280) set."""
    return word & HEADER_MASK == HEADER_MASK


def header_length(word: int) -> int:
    """Return the payload length in words: bit 8 as length bit 7, bits 6..0 below it."""
    return ((word >> 1) & 0x80) | (word & 0x7F)


def parse_items(words: Sequence[int]) -> tuple[Item, ...]:
    """Split a data packet's payload words into lambda sub-packets and aux words.

    Raises:
        ProtocolError: a lambda status word is not followed by its lambda word.
    """
    items: list[Item] = []
    i = 0
    n = len(words)
    while i < n:
        w = words[i]
        if w & LAMBDA_STATUS_MASK == LAMBDA_STATUS_MASK:
            if i + 1 >= n:
                raise ProtocolError("lambda status word without its lambda word")
            lw = words[i + 1]
            items.append(
                LambdaItem(
                    function=(w >> 10) & 7,
                    af=((w >> 1) & 0x80) | (w & 0x7F),
                    l_value=((lw >> 8) & 0x3F) << 7 | (lw & 0x7F),
                )
            )
            i += 2
        else:
            items.append(AuxItem(((w & 0xFF00) >> 1) | (w & 0xFF)))
            i += 1
    return tuple(items)


def _scan(buf: bytes | bytearray, pos: int) -> tuple[int, int, MtsPacket | None]:
    """Look at ``buf[pos:]``: return (kind, end, packet).

    ``_GARBAGE``: bytes ``pos:end`` hold no packet start. ``_BAD``: a header at ``pos`` whose
    packet is broken (drop one byte and rescan). ``_NEED_MORE``: wait, keep ``pos:``.
    ``_PACKET``: ``pos:end`` is ``packet``.
    """
    n = len(buf)
    m = _HEADER_RE.search(buf, pos)
    if m is None:
        # A trailing byte could be the first half of a header: keep it.
        end = n - 1 if n > pos and buf[n - 1] & 0xA2 == 0xA2 else n
        return (_GARBAGE, end, None) if end > pos else (_NEED_MORE, pos, None)
    start = m.start()
    if start > pos:
        return _GARBAGE, start, None
    word = (buf[pos] << 8) | buf[pos + 1]
    nwords = header_length(word)
    body = pos + 2
    end = body + 2 * nwords
    hi = _HIGH_RE.search(buf, body, min(end, n))
    if hi is not None:
        # Cut short by the next header (or junk). A "header" directly followed by another
        # high byte has no body at all: that is a stray byte before a header, not a packet.
        return (_BAD if hi.start() > body else _GARBAGE), pos + 1, None
    if end > n:
        return _NEED_MORE, pos, None
    words = tuple((buf[j] << 8) | buf[j + 1] for j in range(body, end, 2))
    is_data = bool(word & DATA_BIT)
    items: tuple[Item, ...] = ()
    if is_data:
        try:
            items = parse_items(words)
        except ProtocolError:
            return _BAD, pos + 1, None
    return _PACKET, end, MtsPacket(bool(word & RECORDING_BIT), is_data, words, items)


def decode_packet(buf: bytes | bytearray) -> tuple[int, MtsPacket | None]:
    """Decode the packet at the start of ``buf``.

    Returns:
        ``(0, None)``: need more bytes. ``(n, packet)``: the first ``n`` bytes are
        ``packet``. ``(n, None)`` with ``n > 0``: the first ``n`` bytes are not a packet
        (garbage before a header, or a broken packet's header byte); drop them and call
        again.
    """
    kind, end, pkt = _scan(buf, 0)
    if kind == _NEED_MORE:
        return 0, None
    return end, pkt


class MtsDecoder:
    """Incremental MTS stream decoder: feed bytes in any chunking, get packets.

    Attributes:
        packets: packets decoded (data and command replies).
        replies: command replies among them.
        bad_frames: headers whose packet was broken (cut short by another header or junk,
            or a lambda pair missing its second word). Also readable as ``bad_packets``.
        skipped_bytes: bytes dropped while re-synchronising (garbage, broken packets,
            and at :meth:`flush` a cut-off final packet).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.packets = 0
        self.replies = 0
        self.bad_frames = 0
        self.skipped_bytes = 0

    @property
    def bad_packets(self) -> int:
        """Alias of ``bad_frames``."""
        return self.bad_frames

    @property
    def pending(self) -> int:
        """Bytes held waiting for the rest of a packet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[MtsPacket]:
        """Consume ``data`` and return the packets it completes, in stream order."""
        buf = self._buf
        buf += data
        out: list[MtsPacket] = []
        pos = 0
        while True:
            kind, end, pkt = _scan(buf, pos)
            if kind == _NEED_MORE:
                break
            if kind == _PACKET:
                assert pkt is not None
                out.append(pkt)
                self.packets += 1
                if not pkt.is_data:
                    self.replies += 1
            else:
                if kind == _BAD:
                    self.bad_frames += 1
                self.skipped_bytes += end - pos
            pos = end
        if pos:
            del buf[:pos]
        return out

    def flush(self) -> list[MtsPacket]:
        """End of stream: count a cut-off final packet as skipped bytes."""
        if self._buf:
            self.skipped_bytes += len(self._buf)
            self._buf.clear()
        return []


# --------------------------------------------------------------------------- encoding


def lambda_item(lam: float, af: int = AF_GASOLINE) -> LambdaItem:
    """Return a valid-lambda sub-packet for ``lam``, saturating at the encodable range.

    Real controllers saturate too: lambda 0.5 .. 8.691 fits the 13-bit L word.

    Raises:
        ValueError: ``lam`` is not finite.
    """
    if not math.isfinite(lam):
        raise ValueError(f"lambda must be finite, got {lam}")
    raw = round(lam * 1000.0) - 500
    return LambdaItem(0, af, min(MAX_L, max(0, raw)))


def status_item(status: SensorStatus | int, detail: int = 0, af: int = AF_GASOLINE) -> LambdaItem:
    """Return a sub-packet carrying MTS function ``status`` (1..7) with L = ``detail``."""
    return LambdaItem(int(status), af, detail)


def encode_header(nwords: int, *, recording: bool = False, is_data: bool = True) -> bytes:
    """Return the two header bytes for a payload of ``nwords`` words.

    Raises:
        ValueError: ``nwords`` is outside 0..255.
    """
    if not 0 <= nwords <= MAX_WORDS:
        raise ValueError(f"MTS packet length {nwords} words outside 0..{MAX_WORDS}")
    w = HEADER_MASK | ((nwords & 0x80) << 1) | (nwords & 0x7F)
    if recording:
        w |= RECORDING_BIT
    if is_data:
        w |= DATA_BIT
    return w.to_bytes(2, "big")


def encode_item(item: Item) -> list[int]:
    """Return the payload words of one sub-item.

    Raises:
        ValueError: a field is out of its range.
    """
    if isinstance(item, AuxItem):
        if not 0 <= item.value <= 0x3FF:
            raise ValueError(f"aux value {item.value} outside 0..1023")
        return [((item.value >> 7) & 0x07) << 8 | (item.value & 0x7F)]
    if not 0 <= item.function <= 7:
        raise ValueError(f"function code {item.function} outside 0..7")
    if not 0 <= item.af <= 0xFF:
        raise ValueError(f"AF {item.af} outside 0..255")
    if not 0 <= item.l_value <= MAX_L:
        raise ValueError(f"L {item.l_value} outside 0..{MAX_L}")
    status = LAMBDA_STATUS_MASK | (item.function << 10) | ((item.af & 0x80) << 1) | (item.af & 0x7F)
    lam = ((item.l_value >> 7) & 0x3F) << 8 | (item.l_value & 0x7F)
    return [status, lam]


def encode_packet(
    items: Iterable[Item | int], recording: bool = False, *, is_data: bool = True
) -> bytes:
    """Encode a packet: lambda sub-packets, aux words, or raw payload words (ints).

    Raw ints are sent as given (e.g. a command reply's words) and must have bits 15 and 7
    clear, as every MTS data byte does.

    Raises:
        ValueError: a field is out of range or the packet exceeds 255 words.
    """
    words: list[int] = []
    for it in items:
        if isinstance(it, int):
            if not 0 <= it <= 0xFFFF or it & 0x8080:
                raise ValueError(f"raw word {it:#x} is not an MTS data word")
            words.append(it)
        else:
            words.extend(encode_item(it))
    out = bytearray(encode_header(len(words), recording=recording, is_data=is_data))
    for w in words:
        out += w.to_bytes(2, "big")
    return bytes(out)


# --------------------------------------------------------------------------- driver


class InnovateMtsDriver(SerialDriver):
    """Innovate MTS widebands on a serial port (LC-1/LC-2/LM-2, chained).

    Args:
        port: pyserial port or URL (e.g. ``/dev/dynoai-lm2``).
        baudrate: 19200 for every MTS device.
        channels: channel for each lambda sub-packet by chain position; positions beyond
            the list become ``<source>_afr<i>``. Default ``afr_front``, ``afr_rear``.
        stoich: AFR reported = lambda x ``stoich`` (the gasoline scale, whatever fuel the
            device is set to).
        **kwargs: :class:`~drivers.serial_base.SerialDriver` and Driver options.

    Raises:
        ConfigError: an option is invalid.
    """

    name: ClassVar[str] = "innovate_mts"
    nominal_period_s: float = NOMINAL_PERIOD_S

    def __init__(
        self,
        *,
        port: str = "",
        baudrate: int = BAUDRATE,
        channels: Sequence[str] = ("afr_front", "afr_rear"),
        stoich: float = STOICH_GASOLINE,
        **kwargs: Any,
    ) -> None:
        super().__init__(port=port, baudrate=baudrate, **kwargs)
        if isinstance(channels, str) or not all(isinstance(c, str) and c for c in channels):
            raise ConfigError(
                f"{self.name}: channels must be a list of non-empty names", field="channels"
            )
        self.channels = [self.map_channel(c) for c in channels]
        self.stoich = check_positive("stoich", self.name, stoich)
        self.counters.update({"command_replies": 0, "lambda_items": 0, "aux_items": 0})
        self._names: dict[int, tuple[str, str, str]] = {}

    def new_decoder(self) -> MtsDecoder:
        """Return a fresh :class:`MtsDecoder`."""
        return MtsDecoder()

    def _lambda_names(self, pos: int) -> tuple[str, str, str]:
        names = self._names.get(pos)
        if names is None:
            ch = (
                self.channels[pos]
                if pos < len(self.channels)
                else self.map_channel(f"{self.source}_afr{pos}")
            )
            names = (ch, status_channel(ch), detail_channel(ch))
            self._names[pos] = names
        return names

    def message_samples(self, msg: Any, t: float, out: list[Sample]) -> bool:
        """Append the samples of one :class:`MtsPacket`; command replies give none."""
        pkt: MtsPacket = msg
        if not pkt.is_data:
            self.counters["command_replies"] += 1
            return False
        src = self.source
        lam_pos = 0
        aux_pos = 0
        for it in pkt.items:
            if isinstance(it, LambdaItem):
                ch, st_ch, det_ch = self._lambda_names(lam_pos)
                lam_pos += 1
                status = it.status
                if status is SensorStatus.NORMAL:
                    afr = (it.l_value + 500) / 1000.0 * self.stoich
                    if math.isfinite(afr):
                        out.append(Sample(t, ch, afr, src))
                else:
                    out.append(Sample(t, det_ch, float(it.l_value), src))
                out.append(Sample(t, st_ch, float(status), src))
            else:
                out.append(Sample(t, self.map_channel(f"{src}_aux{aux_pos}"), float(it.value), src))
                aux_pos += 1
        self.counters["lambda_items"] += lam_pos
        self.counters["aux_items"] += aux_pos
        return True


__all__ = [
    "BAUDRATE",
    "ERROR_CODES",
    "FUNCTION_STATUS",
    "NOMINAL_PERIOD_S",
    "AuxItem",
    "InnovateMtsDriver",
    "Item",
    "LambdaItem",
    "MtsDecoder",
    "MtsPacket",
    "decode_packet",
    "encode_header",
    "encode_item",
    "encode_packet",
    "header_length",
    "is_header",
    "lambda_item",
    "parse_items",
    "status_item",
]

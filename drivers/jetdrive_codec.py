"""Pure codec for Dynojet JetDrive datagrams (see docs/protocols.md "Dynojet JetDrive").

No I/O happens here: :func:`decode_datagram` turns one UDP payload into a :class:`Message`
(header plus a typed body) and raises :class:`~dynoai_daemon.errors.ProtocolError` for
anything that violates the wire format (short header, a value length larger than what
arrived, partial records); the ``encode_*`` functions build byte-exact datagrams for every
message kind, so the simulator's dyno speaks the same bytes a real one does. All fields are
little-endian; one message per datagram; the MTU is 1400 bytes, and long channel lists or
value batches are split across several datagrams by :func:`chunk_channel_defs` and
:func:`chunk_channel_values`. Unit conversion to the project's units also lives here
because it depends only on the JetDrive unit code.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from dynoai_daemon.errors import ProtocolError

HEADER: Final = struct.Struct("<BHHBH")
"""key u8, value length u16, source host u16, sequence u8, destination host u16."""
HEADER_SIZE: Final = HEADER.size  # 8
CHANNEL_RECORD: Final = struct.Struct("<HB30sB")  # id, vendor, name, unit: 34 bytes
VALUE_RECORD: Final = struct.Struct("<HIf")  # id, timestamp ms, value: 10 bytes
PROVIDER_NAME_SIZE: Final = 50
CHANNEL_NAME_SIZE: Final = 30
PING: Final = struct.Struct("<BI")  # version, host timestamp
PONG: Final = struct.Struct("<BII")  # version, echoed host timestamp, remote timestamp

DEFAULT_GROUP: Final = "224.0.2.10"
DEFAULT_PORT: Final = 22344
MTU: Final = 1400
ALL_HOSTS: Final = 0xFFFF
PING_VERSION: Final = 1
U32: Final = 1 << 32


class Key(IntEnum):
    """Message keys (header byte 0)."""

    CHANNEL_INFO = 0x01
    CHANNEL_VALUES = 0x02
    CLEAR_CHANNEL_INFO = 0x03
    PING = 0x04
    PONG = 0x05
    REQUEST_CHANNEL_INFO = 0x06
    LOGGING_REQUEST = 0x10
    LOAD_CONTROL_REQUEST = 0x11
    BRAKE_REQUEST = 0x12
    LOGGING_RESPONSE = 0x20
    LOAD_CONTROL_RESPONSE = 0x21
    BRAKE_RESPONSE = 0x22


class LoggingCommand(IntEnum):
    """Byte 0 of a logging request or response."""

    END = 0
    BEGIN = 1
    CANCEL = 2
    QUERY = 3


class Unit(IntEnum):
    """JetDrive unit codes."""

    SECONDS = 0
    METERS = 1
    KMH = 2
    NEWTON = 3
    KILOWATT = 4
    NEWTON_METER = 5
    DEG_C = 6
    KPA = 7
    RPM = 8
    RPM_PER_KMH = 9
    KMH_PER_S = 10
    AFR = 11
    KG_PER_H = 12
    LAMBDA = 13
    VOLT = 14
    AMPERE = 15
    PERCENT = 16
    EXTENDED = 254
    NONE = 255


NM_TO_LBFT: Final = 0.737562149
KW_TO_HP: Final = 1.34102209


@dataclass(frozen=True, slots=True)
class Header:
    """The 8-byte header of every datagram."""

    key: int
    length: int
    source: int
    seq: int
    dest: int


@dataclass(frozen=True, slots=True)
class ChannelDef:
    """One 34-byte ChannelInfo record."""

    id: int
    name: str
    unit: int
    vendor: int = 0


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """Provider name plus some (or all) of its channel records."""

    provider: str
    channels: tuple[ChannelDef, ...]


@dataclass(frozen=True, slots=True)
class ChannelValue:
    """One 10-byte ChannelValues record (timestamp in ms on the provider's clock)."""

    id: int
    ts_ms: int
    value: float


@dataclass(frozen=True, slots=True)
class ChannelValues:
    """A batch of channel values."""

    values: tuple[ChannelValue, ...]


@dataclass(frozen=True, slots=True)
class ClearChannelInfo:
    """The provider's channel list is about to change; forget it."""


@dataclass(frozen=True, slots=True)
class RequestChannelInfo:
    """Ask providers to send their channel lists."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Clock probe from a host."""

    host_ts: int
    echo: bytes = b""
    version: int = PING_VERSION


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping: the echoed host timestamp plus the remote's own clock."""

    host_ts: int
    remote_ts: int
    echo: bytes = b""
    version: int = PING_VERSION


@dataclass(frozen=True, slots=True)
class Logging:
    """Extended logging request (0x10) or response (0x20)."""

    response: bool
    command: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Opaque:
    """A message kind this codec carries but does not interpret (load control, brake, unknown)."""

    key: int
    payload: bytes


Body = (
    ChannelInfo
    | ChannelValues
    | ClearChannelInfo
    | RequestChannelInfo
    | Ping
    | Pong
    | Logging
    | Opaque
)


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded datagram.

    Attributes:
        header: the parsed header.
        body: the typed value part.
        trailing: bytes after the declared value length (tolerated, counted by receivers).
    """

    header: Header
    body: Body
    trailing: int = 0


# --- decoding -------------------------------------------------------------------------------


def decode_header(data: bytes) -> Header:
    """Parse the 8-byte header.

    Raises:
        ProtocolError: fewer than 8 bytes.
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"jetdrive: datagram of {len(data)} bytes is shorter than the header")
    key, length, source, seq, dest = HEADER.unpack_from(data)
    return Header(key, length, source, seq, dest)


def _cstr(raw: bytes) -> str:
    # Zero-padded fields: the name ends at the first NUL; vendors use ASCII, so replace
    # anything undecodable rather than reject the whole channel list.
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def decode_channel_info(value: bytes) -> ChannelInfo:
    """Decode a ChannelInfo value (provider name + 34-byte records).

    Raises:
        ProtocolError: shorter than the provider name or a partial record.
    """
    if len(value) < PROVIDER_NAME_SIZE:
        raise ProtocolError(f"jetdrive: ChannelInfo of {len(value)} bytes has no provider name")
    rest = len(value) - PROVIDER_NAME_SIZE
    if rest % CHANNEL_RECORD.size:
        raise ProtocolError(
            f"jetdrive: ChannelInfo ends in a partial record ({rest % CHANNEL_RECORD.size} bytes)"
        )
    provider = _cstr(value[:PROVIDER_NAME_SIZE])
    chans = tuple(
        ChannelDef(cid, _cstr(name), unit, vendor)
        for cid, vendor, name, unit in CHANNEL_RECORD.iter_unpack(value[PROVIDER_NAME_SIZE:])
    )
    return ChannelInfo(provider, chans)


def decode_channel_values(value: bytes) -> ChannelValues:
    """Decode a ChannelValues value (10-byte records).

    Raises:
        ProtocolError: a partial record.
    """
    if len(value) % VALUE_RECORD.size:
        raise ProtocolError(
            f"jetdrive: ChannelValues ends in a partial record ({len(value) % VALUE_RECORD.size}"
            " bytes)"
        )
    return ChannelValues(
        tuple(ChannelValue(cid, ts, v) for cid, ts, v in VALUE_RECORD.iter_unpack(value))
    )


def decode_body(key: int, value: bytes) -> Body:
    """Decode the value part of a message with key ``key``.

    Raises:
        ProtocolError: the value does not fit the message kind.
    """
    if key == Key.CHANNEL_INFO:
        return decode_channel_info(value)
    if key == Key.CHANNEL_VALUES:
        return decode_channel_values(value)
    if key == Key.CLEAR_CHANNEL_INFO:
        return ClearChannelInfo()
    if key == Key.REQUEST_CHANNEL_INFO:
        return RequestChannelInfo()
    if key == Key.PING:
        if len(value) < PING.size:
            raise ProtocolError(f"jetdrive: Ping of {len(value)} bytes, need {PING.size}")
        version, host_ts = PING.unpack_from(value)
        return Ping(host_ts, bytes(value[PING.size :]), version)
    if key == Key.PONG:
        if len(value) < PONG.size:
            raise ProtocolError(f"jetdrive: Pong of {len(value)} bytes, need {PONG.size}")
        version, host_ts, remote_ts = PONG.unpack_from(value)
        return Pong(host_ts, remote_ts, bytes(value[PONG.size :]), version)
    if key in (Key.LOGGING_REQUEST, Key.LOGGING_RESPONSE):
        if not value:
            raise ProtocolError("jetdrive: logging message without a command byte")
        return Logging(key == Key.LOGGING_RESPONSE, value[0], bytes(value[1:]))
    return Opaque(key, bytes(value))


def decode_datagram(data: bytes) -> Message:
    """Decode one datagram (header + value).

    Args:
        data: the UDP payload.

    Returns:
        The message; ``trailing`` counts bytes past the declared value length.

    Raises:
        ProtocolError: short header, a declared length larger than what arrived, or a body
            that does not fit its kind.
    """
    header = decode_header(data)
    end = HEADER_SIZE + header.length
    if end > len(data):
        raise ProtocolError(
            f"jetdrive: truncated datagram: header says {header.length} value bytes,"
            f" {len(data) - HEADER_SIZE} arrived"
        )
    body = decode_body(header.key, memoryview(data)[HEADER_SIZE:end].tobytes())
    return Message(header, body, len(data) - end)


# --- encoding -------------------------------------------------------------------------------


def _u16(name: str, v: int) -> int:
    if not 0 <= v <= 0xFFFF:
        raise ValueError(f"{name} {v} does not fit u16")
    return v


def _pad(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size:
        raise ValueError(f"{what} {text!r} is longer than {size} bytes")
    return raw.ljust(size, b"\0")


def encode_header(key: int, length: int, source: int, seq: int, dest: int = ALL_HOSTS) -> bytes:
    """Build the 8-byte header.

    Raises:
        ValueError: a field out of range.
    """
    if not 0 <= key <= 0xFF:
        raise ValueError(f"key {key} does not fit u8")
    return HEADER.pack(
        key, _u16("length", length), _u16("source", source), seq & 0xFF, _u16("dest", dest)
    )


def encode_body(body: Body) -> tuple[int, bytes]:
    """Return ``(key, value bytes)`` for a message body.

    Raises:
        ValueError: a name too long or a number out of range.
    """
    if isinstance(body, ChannelInfo):
        parts = [_pad(body.provider, PROVIDER_NAME_SIZE, "provider name")]
        for ch in body.channels:
            parts.append(
                CHANNEL_RECORD.pack(
                    _u16("channel id", ch.id),
                    ch.vendor,
                    _pad(ch.name, CHANNEL_NAME_SIZE, "channel name"),
                    ch.unit,
                )
            )
        return Key.CHANNEL_INFO, b"".join(parts)
    if isinstance(body, ChannelValues):
        return Key.CHANNEL_VALUES, b"".join(
            VALUE_RECORD.pack(_u16("channel id", v.id), v.ts_ms % U32, v.value) for v in body.values
        )
    if isinstance(body, ClearChannelInfo):
        return Key.CLEAR_CHANNEL_INFO, b""
    if isinstance(body, RequestChannelInfo):
        return Key.REQUEST_CHANNEL_INFO, b""
    if isinstance(body, Ping):
        return Key.PING, PING.pack(body.version, body.host_ts % U32) + body.echo
    if isinstance(body, Pong):
        return Key.PONG, PONG.pack(body.version, body.host_ts % U32, body.remote_ts % U32) + (
            body.echo
        )
    if isinstance(body, Logging):
        key = Key.LOGGING_RESPONSE if body.response else Key.LOGGING_REQUEST
        return key, bytes([body.command & 0xFF]) + body.data
    return body.key, body.payload


def encode_message(body: Body, *, source: int, seq: int, dest: int = ALL_HOSTS) -> bytes:
    """Encode one whole datagram.

    Args:
        body: the message.
        source: sender host id (not 0xFFFF for real senders).
        seq: sequence number (taken mod 256).
        dest: destination host id, 0xFFFF for all.

    Raises:
        ValueError: a field out of range, or the datagram would exceed the 1400-byte MTU.
    """
    key, value = encode_body(body)
    if HEADER_SIZE + len(value) > MTU:
        raise ValueError(f"jetdrive: {HEADER_SIZE + len(value)}-byte datagram exceeds MTU {MTU}")
    return encode_header(key, len(value), source, seq, dest) + value


def chunk_channel_defs(
    channels: Sequence[ChannelDef], mtu: int = MTU
) -> Iterator[tuple[ChannelDef, ...]]:
    """Split a channel list so that each ChannelInfo datagram fits ``mtu``."""
    per = max(1, (mtu - HEADER_SIZE - PROVIDER_NAME_SIZE) // CHANNEL_RECORD.size)
    for i in range(0, max(1, len(channels)), per):
        yield tuple(channels[i : i + per])


def chunk_channel_values(
    values: Sequence[ChannelValue], mtu: int = MTU
) -> Iterator[tuple[ChannelValue, ...]]:
    """Split values so that each ChannelValues datagram fits ``mtu``."""
    per = max(1, (mtu - HEADER_SIZE) // VALUE_RECORD.size)
    for i in range(0, len(values), per):
        yield tuple(values[i : i + per])


# --- units ----------------------------------------------------------------------------------


def convert_unit(value: float, unit: int, stoich: float = 14.7) -> float:
    """Convert a value in JetDrive unit ``unit`` to the project's unit for that quantity.

    N*m -> lb-ft, kW -> hp, degC -> degF, lambda -> AFR (x ``stoich``); km/h, kPa, rpm,
    AFR, V, A, % and the rest are kept as they are.
    """
    if unit == Unit.NEWTON_METER:
        return value * NM_TO_LBFT
    if unit == Unit.KILOWATT:
        return value * KW_TO_HP
    if unit == Unit.DEG_C:
        return value * 1.8 + 32.0
    if unit == Unit.LAMBDA:
        return value * stoich
    return value


def u32_diff(later: int, earlier: int) -> int:
    """Return ``later - earlier`` on a wrapping u32 clock, in ``[-2**31, 2**31)``."""
    d = (later - earlier) % U32
    return d - U32 if d >= 1 << 31 else d

"""Minimal classic-pcap reader and writer for UDP drivers (``dynoai decode`` and tests).

:class:`PcapReader` reads the classic libpcap format (not pcapng) in both byte orders with
micro- or nanosecond timestamps, walks the records and extracts the UDP payloads of IPv4
packets from the link types that matter here: Ethernet (1, with 802.1Q/802.1ad tags), raw
IPv4 (101 and 228), Linux cooked capture SLL (113) and SLL2 (276), and BSD null/loopback
(0, 108). It honours the IPv4 header length, skips fragments and non-UDP packets, and counts
everything it skips in :class:`PcapStats`; a truncated final record is counted and ends the
walk instead of raising. :class:`PcapWriter` writes such files (used by tests to build
captures byte by byte); :func:`ipv4_udp` builds the IPv4+UDP packet it wraps.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

from dynoai_daemon.errors import InputError

MAGIC_US: Final = 0xA1B2C3D4
MAGIC_NS: Final = 0xA1B23C4D
GLOBAL_HEADER_SIZE: Final = 24
RECORD_HEADER_SIZE: Final = 16
MAX_RECORD: Final = 256 * 1024 * 1024  # beyond this a record length is corruption

LINKTYPE_NULL: Final = 0
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_LOOP: Final = 108
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_LINUX_SLL2: Final = 276
SUPPORTED_LINKTYPES: Final = frozenset(
    {
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW,
        LINKTYPE_LOOP,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_LINUX_SLL2,
    }
)
ETHERTYPE_IPV4: Final = 0x0800
VLAN_ETHERTYPES: Final = frozenset({0x8100, 0x88A8, 0x9100})
IPPROTO_UDP: Final = 17
AF_INET_BSD: Final = 2  # AF_INET is 2 on every platform that writes null-link captures


@dataclass(frozen=True, slots=True)
class PcapRecord:
    """One captured packet: epoch time in seconds, captured bytes, original length."""

    t: float
    data: bytes
    orig_len: int


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A UDP payload found in a capture, with its capture time and endpoints."""

    t: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


@dataclass
class PcapStats:
    """What the reader saw and skipped."""

    records: int = 0
    udp: int = 0
    non_ipv4: int = 0
    non_udp: int = 0
    fragments: int = 0
    bad_ip: int = 0
    snapped_udp: int = 0  # UDP payloads cut short by the capture's snap length
    truncated_records: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a dict."""
        return asdict(self)


class PcapReader:
    """Reads a classic pcap file.

    Args:
        source: a path or a binary file object (not closed by the reader if passed in).

    Raises:
        InputError: the file is not a classic pcap or uses an unsupported link type.
    """

    def __init__(self, source: str | Path | BinaryIO) -> None:
        if isinstance(source, (str, Path)):
            self.path = str(source)
            try:
                self._f: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise InputError(f"cannot open capture: {exc}", path=self.path) from exc
            self._own = True
        else:
            self.path = getattr(source, "name", "<stream>")
            self._f = source
            self._own = False
        self.stats = PcapStats()
        self.truncated = False
        try:
            self._read_global_header()
        except InputError:
            self.close()
            raise

    def _read_global_header(self) -> None:
        head = self._f.read(GLOBAL_HEADER_SIZE)
        if len(head) < 4:
            raise InputError("not a pcap file: too short", path=self.path)
        for order in ("<", ">"):
            (magic,) = struct.unpack(order + "I", head[:4])
            if magic in (MAGIC_US, MAGIC_NS):
                break
        else:
            hint = " (pcapng is not supported; convert with editcap -F pcap)"
            if head[:4] == b"\x0a\x0d\x0d\x0a":
                raise InputError("pcapng file" + hint, path=self.path)
            raise InputError(f"not a pcap file: magic {head[:4].hex()}", path=self.path)
        if len(head) < GLOBAL_HEADER_SIZE:
            raise InputError("truncated pcap global header", path=self.path)
        self.byte_order = order
        self.nanosecond = magic == MAGIC_NS
        self.version = struct.unpack(order + "HH", head[4:8])
        self.snaplen, network = struct.unpack(order + "II", head[16:24])
        self.linktype = network & 0xFFFF  # upper bits may carry FCS information
        if self.linktype not in SUPPORTED_LINKTYPES:
            raise InputError(f"unsupported pcap link type {self.linktype}", path=self.path)
        self._rec = struct.Struct(order + "IIII")
        self._frac = 1e-9 if self.nanosecond else 1e-6

    def close(self) -> None:
        """Close the file if the reader opened it."""
        if self._own:
            self._f.close()

    def __enter__(self) -> PcapReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def records(self) -> Iterator[PcapRecord]:
        """Yield every complete record; a truncated last record sets ``truncated``."""
        while True:
            head = self._f.read(RECORD_HEADER_SIZE)
            if not head:
                return
            if len(head) < RECORD_HEADER_SIZE:
                self._truncated()
                return
            sec, frac, incl, orig = self._rec.unpack(head)
            if incl > MAX_RECORD:
                # A wild length means the rest of the file cannot be framed: stop here.
                self._truncated()
                return
            data = self._f.read(incl)
            if len(data) < incl:
                self._truncated()
                return
            self.stats.records += 1
            yield PcapRecord(sec + frac * self._frac, data, orig)

    def _truncated(self) -> None:
        self.truncated = True
        self.stats.truncated_records += 1

    def udp_datagrams(self) -> Iterator[UdpDatagram]:
        """Yield the UDP payloads of IPv4 packets, skipping (and counting) the rest."""
        for rec in self.records():
            ip = self._ipv4(rec.data)
            if ip is None:
                self.stats.non_ipv4 += 1
                continue
            dg = self._udp(rec.t, ip)
            if dg is not None:
                self.stats.udp += 1
                yield dg

    def _ipv4(self, frame: bytes) -> bytes | None:
        lt = self.linktype
        if lt == LINKTYPE_ETHERNET:
            if len(frame) < 14:
                return None
            off = 12
            (etype,) = struct.unpack_from(">H", frame, off)
            while etype in VLAN_ETHERTYPES and len(frame) >= off + 6:
                off += 4
                (etype,) = struct.unpack_from(">H", frame, off)
            return frame[off + 2 :] if etype == ETHERTYPE_IPV4 else None
        if lt in (LINKTYPE_RAW, LINKTYPE_IPV4):
            return frame if frame and frame[0] >> 4 == 4 else None
        if lt == LINKTYPE_LINUX_SLL:
            if len(frame) < 16 or struct.unpack_from(">H", frame, 14)[0] != ETHERTYPE_IPV4:
                return None
            return frame[16:]
        if lt == LINKTYPE_LINUX_SLL2:
            if len(frame) < 20 or struct.unpack_from(">H", frame, 0)[0] != ETHERTYPE_IPV4:
                return None
            return frame[20:]
        # Null/loopback: a 4-byte address family in the capturing host's byte order (0)
        # or always big-endian (108); accept AF_INET either way.
        if len(frame) < 4:
            return None
        fams = {struct.unpack_from(">I", frame)[0]}
        if lt == LINKTYPE_NULL:
            fams.add(struct.unpack_from("<I", frame)[0])
        return frame[4:] if AF_INET_BSD in fams else None

    def _udp(self, t: float, ip: bytes) -> UdpDatagram | None:
        if len(ip) < 20 or ip[0] >> 4 != 4:
            self.stats.bad_ip += 1
            return None
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from(">H", ip, 2)[0]
        if ihl < 20 or len(ip) < ihl or total < ihl:
            self.stats.bad_ip += 1
            return None
        flags_frag = struct.unpack_from(">H", ip, 6)[0]
        if flags_frag & 0x2000 or flags_frag & 0x1FFF:  # more fragments, or an offset
            self.stats.fragments += 1
            return None
        if ip[9] != IPPROTO_UDP:
            self.stats.non_udp += 1
            return None
        ip = ip[:total]  # drop Ethernet padding past the IP total length
        if len(ip) < ihl + 8:
            self.stats.bad_ip += 1
            return None
        sport, dport, ulen = struct.unpack_from(">HHH", ip, ihl)
        if ulen < 8:
            self.stats.bad_ip += 1
            return None
        payload = ip[ihl + 8 : ihl + ulen]
        if len(payload) < ulen - 8:
            self.stats.snapped_udp += 1
        src = ".".join(str(b) for b in ip[12:16])
        dst = ".".join(str(b) for b in ip[16:20])
        return UdpDatagram(t, src, sport, dst, dport, payload)


# --- writing --------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = int(sum(struct.unpack(f">{len(data) // 2}H", data)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _addr(text: str) -> bytes:
    parts = [int(p) for p in text.split(".")]
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    return bytes(parts)


def ipv4_udp(
    payload: bytes,
    *,
    src: str = "127.0.0.1",
    dst: str = "224.0.2.10",
    sport: int = 22344,
    dport: int = 22344,
    ident: int = 0,
    flags_frag: int = 0x4000,
    ttl: int = 1,
    protocol: int = IPPROTO_UDP,
    options: bytes = b"",
) -> bytes:
    """Build an IPv4 packet carrying a UDP datagram, with valid checksums.

    Args:
        payload: the UDP payload (for ``protocol`` other than UDP: the raw IP payload).
        flags_frag: the flags + fragment offset field (default: don't fragment).
        options: IPv4 options (padded to 4 bytes), to exercise IHL > 5.
    """
    options = options + b"\0" * (-len(options) % 4)
    s, d = _addr(src), _addr(dst)
    if protocol == IPPROTO_UDP:
        ulen = 8 + len(payload)
        pseudo = s + d + struct.pack(">BBH", 0, IPPROTO_UDP, ulen)
        udp = struct.pack(">HHHH", sport, dport, ulen, 0) + payload
        csum = _checksum(pseudo + udp) or 0xFFFF
        body = udp[:6] + struct.pack(">H", csum) + udp[8:]
    else:
        body = payload
    ihl = 5 + len(options) // 4
    hdr = struct.pack(
        ">BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(body),
        ident,
        flags_frag,
        ttl,
        protocol,
        0,
        s,
        d,
    )
    hdr += options
    hdr = hdr[:10] + struct.pack(">H", _checksum(hdr)) + hdr[12:]
    return hdr + body


class PcapWriter:
    """Writes a classic pcap file.

    Args:
        target: a path or a binary file object.
        linktype: one of the supported link types.
        nanosecond: write nanosecond timestamps (magic 0xa1b23c4d).
        big_endian: write a big-endian file.
        snaplen: captured bytes per record at most (longer packets are cut, like tcpdump -s).
    """

    def __init__(
        self,
        target: str | Path | BinaryIO,
        *,
        linktype: int = LINKTYPE_ETHERNET,
        nanosecond: bool = False,
        big_endian: bool = False,
        snaplen: int = 65535,
    ) -> None:
        if linktype not in SUPPORTED_LINKTYPES:
            raise ValueError(f"unsupported link type {linktype}")
        if isinstance(target, (str, Path)):
            self._f: BinaryIO = open(target, "wb")  # noqa: SIM115 - closed in close()
            self._own = True
        else:
            self._f = target
            self._own = False
        self.linktype = linktype
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        self._o = ">" if big_endian else "<"
        magic = MAGIC_NS if nanosecond else MAGIC_US
        self._f.write(struct.pack(self._o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write_record(self, data: bytes, t: float, orig_len: int | None = None) -> None:
        """Write one record with capture time ``t`` (epoch seconds)."""
        scale = 1_000_000_000 if self.nanosecond else 1_000_000
        ticks = round(t * scale)
        sec, frac = divmod(ticks, scale)
        cap = data[: self.snaplen]
        orig = len(data) if orig_len is None else orig_len
        self._f.write(struct.pack(self._o + "IIII", sec, frac, len(cap), orig) + cap)

    def frame(self, ip_packet: bytes) -> bytes:
        """Wrap an IPv4 packet in this file's link-layer header."""
        lt = self.linktype
        if lt == LINKTYPE_ETHERNET:
            return (
                b"\x01\x00\x5e\x00\x02\x0a"
                + b"\x02\x00\x00\x00\x00\x01"
                + b"\x08\x00"
                + (ip_packet)
            )
        if lt in (LINKTYPE_RAW, LINKTYPE_IPV4):
            return ip_packet
        if lt == LINKTYPE_LINUX_SLL:
            # packet type 0 (to us), ARPHRD_ETHER, 6-byte address, protocol IPv4.
            return struct.pack(">HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01\0\0", ETHERTYPE_IPV4) + (
                ip_packet
            )
        if lt == LINKTYPE_LINUX_SLL2:
            return struct.pack(">HHIHBB8s", ETHERTYPE_IPV4, 0, 1, 1, 0, 6, b"\0" * 8) + ip_packet
        if lt == LINKTYPE_LOOP:
            return struct.pack(">I", AF_INET_BSD) + ip_packet
        return struct.pack(self._o + "I", AF_INET_BSD) + ip_packet

    def write_udp(
        self,
        payload: bytes,
        t: float,
        *,
        src: str = "127.0.0.1",
        dst: str = "224.0.2.10",
        sport: int = 22344,
        dport: int = 22344,
    ) -> None:
        """Write a UDP datagram as one record (IPv4 in this file's link layer)."""
        self.write_record(
            self.frame(ipv4_udp(payload, src=src, dst=dst, sport=sport, dport=dport)), t
        )

    def close(self) -> None:
        """Flush, and close the file if the writer opened it."""
        self._f.flush()
        if self._own:
            self._f.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_udp(source: str | Path | BinaryIO | bytes) -> tuple[list[UdpDatagram], PcapStats]:
    """Read every UDP datagram of a capture (``bytes`` are read as an in-memory file).

    Raises:
        InputError: not a classic pcap, or an unsupported link type.
    """
    src: str | Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    with PcapReader(src) as reader:
        out = list(reader.udp_datagrams())
        return out, reader.stats

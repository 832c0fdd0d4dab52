"""Packet captures for the UDP drivers, read and written through dpkt (``dynoai decode``, tests).

:class:`PcapReader` opens a classic pcap (either byte order, micro- or nanosecond stamps) or
a pcapng file with dpkt's readers and yields the UDP payloads of IPv4 packets from the link
types that matter here: Ethernet (1, with 802.1Q/802.1ad tags), raw IPv4 (101 and 228),
Linux cooked capture SLL (113) and SLL2 (276), and BSD null/loopback (0, 108); a pcapng
file is read with the link type of its first interface. dpkt parses the headers; this
module counts what it skips in :class:`PcapStats` (not IPv4, not UDP, fragments, broken
IPv4/UDP headers, UDP payloads cut by the snap length) and notices a truncated final record
(a short read), which ends the walk instead of raising. :class:`PcapWriter` writes pcap or
pcapng through dpkt's writers (tests build captures with it); :func:`ipv4_udp` builds the
IPv4+UDP packet with valid checksums.
"""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

import dpkt

from dynoai_daemon.errors import InputError

PCAP_MAGICS: Final = frozenset(
    {b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"}
)
PCAPNG_MAGIC: Final = b"\x0a\x0d\x0d\x0a"
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
IPPROTO_UDP: Final = 17
AF_INET_BSD: Final = 2  # AF_INET is 2 on every platform that writes null-link captures


@dataclass(frozen=True, slots=True)
class PcapRecord:
    """One captured packet: epoch time in seconds and the captured bytes."""

    t: float
    data: bytes


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


@dataclass
class _ShortReads:
    """The file as dpkt reads it, noting reads that got less than they asked for.

    dpkt's readers hand out a short final record as if it were whole; a read that came up
    short since the last record is how a cut file shows. A length that is negative or
    beyond :data:`MAX_RECORD` is corruption: it reads nothing and counts as short.
    """

    f: BinaryIO
    reads: list[tuple[int, int]] = field(default_factory=list)  # (asked, got) since a record

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > MAX_RECORD:
            self.reads.append((1, 0))
            return b""
        data = self.f.read(n)
        self.reads.append((n, len(data)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def cut(self, *, at_end: bool) -> bool:
        """True when a read since the last record came up short (a clean EOF excepted)."""
        reads = self.reads
        if at_end and reads and reads[0][1] == 0:
            reads = reads[1:]  # nothing at all where the next record would start: the end
        return any(got < asked for asked, got in reads)


class PcapReader:
    """Reads a pcap or pcapng file.

    Args:
        source: a path or a binary file object (not closed by the reader if passed in).

    Raises:
        InputError: the file is neither pcap nor pcapng, its header is cut or invalid, or
            it uses an unsupported link type.
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
            self._open()
        except InputError:
            self.close()
            raise

    def _open(self) -> None:
        start = self._f.tell()
        magic = self._f.read(4)
        self._f.seek(start)
        if len(magic) < 4:
            raise InputError("not a pcap file: too short", path=self.path)
        self.pcapng = magic == PCAPNG_MAGIC
        if not self.pcapng and magic not in PCAP_MAGICS:
            raise InputError(f"not a pcap or pcapng file: magic {magic.hex()}", path=self.path)
        kind = "pcapng" if self.pcapng else "pcap"
        self._io = _ShortReads(self._f)
        try:
            self._reader: Any = (dpkt.pcapng.Reader if self.pcapng else dpkt.pcap.Reader)(self._io)
        except dpkt.NeedData as exc:
            raise InputError(f"truncated {kind} global header", path=self.path) from exc
        except (ValueError, dpkt.UnpackError, struct.error) as exc:
            raise InputError(f"invalid {kind} header: {exc}", path=self.path) from exc
        self.linktype = int(self._reader.datalink()) & 0xFFFF  # upper bits may carry FCS
        if self.linktype not in SUPPORTED_LINKTYPES:
            raise InputError(f"unsupported {kind} link type {self.linktype}", path=self.path)

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
        it = iter(self._reader)
        while True:
            self._io.reads.clear()
            try:
                ts, data = next(it)
            except StopIteration:
                if self._io.cut(at_end=True):
                    self._truncated()
                return
            except (dpkt.UnpackError, struct.error, ValueError):
                self._truncated()
                return
            if self._io.cut(at_end=False):
                self._truncated()
                return
            self.stats.records += 1
            yield PcapRecord(float(ts), bytes(data))

    def _truncated(self) -> None:
        self.truncated = True
        self.stats.truncated_records += 1

    def udp_datagrams(self) -> Iterator[UdpDatagram]:
        """Yield the UDP payloads of IPv4 packets, skipping (and counting) the rest."""
        for rec in self.records():
            dg = self._udp(rec.t, self._ipv4(rec.data))
            if dg is not None:
                self.stats.udp += 1
                yield dg

    def _ipv4(self, frame: bytes) -> Any:
        """The dpkt IP packet, None when the frame is not IPv4, or bytes when broken IPv4."""
        lt = self.linktype
        try:
            if lt in (LINKTYPE_RAW, LINKTYPE_IPV4):
                return dpkt.ip.IP(frame) if frame and frame[0] >> 4 == 4 else None
            if lt == LINKTYPE_ETHERNET:
                link: Any = dpkt.ethernet.Ethernet(frame)
                tags = getattr(link, "vlan_tags", None)
                ethertype = int(tags[-1].type) if tags else int(link.type)
            elif lt == LINKTYPE_LINUX_SLL:
                link = dpkt.sll.SLL(frame)
                ethertype = int(link.ethtype)
            elif lt == LINKTYPE_LINUX_SLL2:
                link = dpkt.sll2.SLL2(frame)
                ethertype = int(link.ethtype)
            else:  # null/loopback: dpkt takes the family in either byte order
                link = dpkt.loopback.Loopback(frame)
                ethertype = ETHERTYPE_IPV4 if link.family == AF_INET_BSD else 0
        except (dpkt.UnpackError, struct.error):
            return None
        if isinstance(link.data, dpkt.ip.IP):
            return link.data
        return bytes(link.data) if ethertype == ETHERTYPE_IPV4 else None

    def _udp(self, t: float, ip: Any) -> UdpDatagram | None:
        if ip is None:
            self.stats.non_ipv4 += 1
            return None
        if not isinstance(ip, dpkt.ip.IP) or ip.v != 4:
            self.stats.bad_ip += 1
            return None
        if ip.mf or ip.offset:  # more fragments, or an offset
            self.stats.fragments += 1
            return None
        if ip.p != IPPROTO_UDP:
            self.stats.non_udp += 1
            return None
        udp = ip.data
        if not isinstance(udp, dpkt.udp.UDP) or udp.ulen < 8:
            self.stats.bad_ip += 1
            return None
        payload = bytes(udp.data)[: udp.ulen - 8]
        if len(payload) < udp.ulen - 8:
            self.stats.snapped_udp += 1
        src, dst = socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)
        return UdpDatagram(t, src, int(udp.sport), dst, int(udp.dport), payload)


# --- writing --------------------------------------------------------------------------------


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
    """Build an IPv4 packet carrying a UDP datagram, with valid checksums (by dpkt).

    Args:
        payload: the UDP payload (for ``protocol`` other than UDP: the raw IP payload).
        flags_frag: the flags + fragment offset field (default: don't fragment).
        options: IPv4 options (padded to 4 bytes), to exercise IHL > 5.
    """
    options = options + b"\0" * (-len(options) % 4)
    body: Any = payload
    if protocol == IPPROTO_UDP:
        body = dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
    ip = dpkt.ip.IP(
        src=socket.inet_aton(src),
        dst=socket.inet_aton(dst),
        id=ident,
        ttl=ttl,
        p=protocol,
        opts=options,
        data=body,
    )
    ip.hl = 5 + len(options) // 4
    ip._flags_offset = flags_frag  # the raw 16-bit field; dpkt names its bits
    return bytes(ip)


class PcapWriter:
    """Writes a pcap (or, with ``pcapng=True``, a pcapng) file through dpkt.

    Args:
        target: a path or a binary file object.
        linktype: one of the supported link types.
        nanosecond: write nanosecond timestamps (pcap only; pcapng stores microseconds).
        snaplen: captured bytes per record at most (longer packets are cut, like tcpdump -s).
        pcapng: write pcapng instead of classic pcap.
    """

    def __init__(
        self,
        target: str | Path | BinaryIO,
        *,
        linktype: int = LINKTYPE_ETHERNET,
        nanosecond: bool = False,
        snaplen: int = 65535,
        pcapng: bool = False,
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
        self.snaplen = snaplen
        self._w: Any = (
            dpkt.pcapng.Writer(self._f, snaplen=snaplen, linktype=linktype)
            if pcapng
            else dpkt.pcap.Writer(self._f, snaplen=snaplen, linktype=linktype, nano=nanosecond)
        )

    def write_record(self, data: bytes, t: float) -> None:
        """Write one record with capture time ``t`` (epoch seconds), cut to ``snaplen``."""
        self._w.writepkt_time(data[: self.snaplen], t)

    def frame(self, ip_packet: bytes) -> bytes:
        """Wrap an IPv4 packet in this file's link-layer header."""
        lt = self.linktype
        if lt == LINKTYPE_ETHERNET:
            eth = dpkt.ethernet.Ethernet(
                dst=b"\x01\x00\x5e\x00\x02\x0a", src=b"\x02\x00\x00\x00\x00\x01", type=0x0800
            )
            return bytes(eth) + ip_packet
        if lt in (LINKTYPE_RAW, LINKTYPE_IPV4):
            return ip_packet
        if lt == LINKTYPE_LINUX_SLL:
            return bytes(dpkt.sll.SLL(ethtype=ETHERTYPE_IPV4)) + ip_packet
        if lt == LINKTYPE_LINUX_SLL2:
            return bytes(dpkt.sll2.SLL2(ethtype=ETHERTYPE_IPV4, intindex=1)) + ip_packet
        # null/loopback: the family big-endian (108 requires it; 0 takes either order)
        return struct.pack(">I", AF_INET_BSD) + ip_packet

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
        InputError: not a pcap or pcapng file, or an unsupported link type.
    """
    src: str | Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    with PcapReader(src) as reader:
        out = list(reader.udp_datagrams())
        return out, reader.stats

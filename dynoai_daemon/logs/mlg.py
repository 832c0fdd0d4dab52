"""TunerStudio / MegaLogViewer binary logs (``.mlg``, magic ``MLVLG``), versions 1 and 2.

The default log format of current TunerStudio, Speeduino and rusEFI. Layout (all numbers
big-endian): ``"MLVLG\\0"``, format version u16, capture time u32 (Unix seconds), start of
the info text (u16 in v1, u32 in v2), start of the data u32, record length u16, number
of fields u16; then one descriptor per field (55 bytes in v1, 89 in v2, which appends a
34-byte category): type u8, name[34], units[10], display style u8 and, for a scalar,
scale f32, transform f32, digits u8 (value = (raw + transform) x scale), or, for a bit
field (type >= 10), bit style u8, index into the bit names u32, bit count u8 and 3 unused
bytes. The bit names (NUL-separated) run up to the info text; the info text (quoted title
and ``Capture Date`` lines, then any tune the logger attached) runs up to the data. Data
blocks follow: type u8 (0 = record, 1 = marker), rolling counter u8, timestamp u16 in
10 us units, then either the record (the fields packed in order) and a check byte (the
sum of the record's bytes mod 256) or a 50-byte marker text.

:class:`MlgReader` streams the blocks in chunks: records are decoded column-wise with one
numpy structured view per chunk, a record whose check byte is wrong is dropped and counted
(``crc_errors``), an unknown block type makes the reader resynchronise on the next block
that checks out (``skipped_bytes``). Time is the ``Time`` field when the log has one, else
the block timestamps unwrapped over their 16-bit rollover; a time base that restarts
(TunerStudio appends after a reconnect) is continued so that time never goes back, and
the restart is counted. Markers are kept as ``(time, text)`` in
:attr:`MlgReader.marker_list` (run hints for the summary), timed by the record that
follows them (a 16-bit block timestamp wraps every 0.66 s, too often to place them by).
Columns become canonical channels through the shared aliases and units of
:mod:`~dynoai_daemon.logs.units`, like the ``.msl`` reader.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt

from dynoai_daemon.channels import FloatArray, Frame
from dynoai_daemon.errors import LogFormatError
from dynoai_daemon.logs.base import LogReader, capture_date
from dynoai_daemon.logs.units import TIME_ALIASES, map_columns, normalize_name, time_scale

MAGIC: Final = b"MLVLG\x00"
NAME_LEN: Final = 34
UNITS_LEN: Final = 10
CATEGORY_LEN: Final = 34
MARKER_LEN: Final = 50
BLOCK_HEADER: Final = 4
FIELD_LEN: Final[dict[int, int]] = {1: 55, 2: 89}
TIMESTAMP_S: Final = 1e-5
#: A restart of the time base is continued this far after the last row.
RESTART_GAP_S: Final = 1.0

#: Scalar field types: code -> numpy big-endian dtype.
SCALAR_TYPES: Final[dict[int, str]] = {
    0: ">u1",
    1: ">i1",
    2: ">u2",
    3: ">i2",
    4: ">u4",
    5: ">i4",
    6: ">i8",
    7: ">f4",
}
#: Bit-field types: code -> dtype (other codes >= 10 are sized by their bit count).
BIT_TYPES: Final[dict[int, str]] = {10: ">u1", 11: ">u2", 12: ">u4"}


@dataclass(frozen=True, slots=True)
class MlgField:
    """One field descriptor of an MLVLG header.

    Attributes:
        type: the type code (0-7 scalar, 10 and above bit field).
        name: the field name.
        units: its units text (often empty).
        style: the display style code.
        scale: multiplier (1 for bit fields).
        transform: added to the raw value before scaling (0 for bit fields).
        digits: decimals the logger shows.
        category: v2 category text.
        bits: bit count of a bit field (0 for scalars).
        bit_names_index: a bit field's offset into the bit names.
        dtype: numpy dtype of the raw value.
    """

    type: int
    name: str
    units: str
    style: int
    scale: float
    transform: float
    digits: int
    category: str
    bits: int
    bit_names_index: int
    dtype: str

    @property
    def is_bits(self) -> bool:
        """True for a bit field."""
        return self.type >= 10


@dataclass
class MlgHeader:
    """The parsed MLVLG header."""

    version: int
    timestamp: int
    info_start: int
    data_start: int
    record_length: int
    fields: list[MlgField]
    bit_names: list[str] = field(default_factory=list)
    info: str = ""

    @property
    def block_length(self) -> int:
        """Bytes of one record block: header, record and check byte."""
        return BLOCK_HEADER + self.record_length + 1

    @property
    def capture_utc(self) -> datetime | None:
        """The capture time written in the header, or None when it is 0."""
        return datetime.fromtimestamp(self.timestamp, UTC) if self.timestamp > 0 else None

    @property
    def title(self) -> list[str]:
        """The quoted lines at the start of the info text (firmware, capture date)."""
        out: list[str] = []
        for line in self.info.splitlines():
            s = line.strip()
            if not s:
                break
            out.append(s.strip('"'))
        return out


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("latin-1").strip()


def _bit_dtype(code: int, bits: int) -> str:
    known = BIT_TYPES.get(code)
    if known is not None:
        return known
    return ">u1" if bits <= 8 else ">u2" if bits <= 16 else ">u4"


def parse_header(data: bytes, path: str) -> MlgHeader:
    """Parse the header from the file's first bytes (at least up to the data start).

    Raises:
        LogFormatError: not an MLVLG file, an unsupported version, or an inconsistent
            header (names the byte offset as ``line`` 1).
    """

    def bad(msg: str) -> LogFormatError:
        return LogFormatError(msg, path=path, line=1)

    if not data.startswith(MAGIC):
        raise bad("not an MLVLG file (no MLVLG magic)")
    if len(data) < 24:
        raise bad("MLVLG header is cut short")
    (version,) = struct.unpack_from(">H", data, 6)
    if version not in FIELD_LEN:
        raise bad(f"MLVLG format version {version} is not supported (1 and 2 are)")
    if version == 1:
        ts, info_start, data_start, rec_len, nfields = struct.unpack_from(">IHIHH", data, 8)
        pos = 22
    else:
        ts, info_start, data_start, rec_len, nfields = struct.unpack_from(">IIIHH", data, 8)
        pos = 24
    flen = FIELD_LEN[version]
    fields_end = pos + nfields * flen
    if nfields == 0 or fields_end > len(data) or not fields_end <= info_start < data_start:
        raise bad(
            f"MLVLG header is inconsistent ({nfields} fields, info at {info_start}, "
            f"data at {data_start})"
        )
    fields: list[MlgField] = []
    for i in range(nfields):
        d = data[pos : pos + flen]
        code = d[0]
        name = _text(d[1 : 1 + NAME_LEN]) or f"field_{i + 1}"
        units = _text(d[35:45])
        style = d[45]
        category = _text(d[55:89]) if version == 2 else ""
        if code >= 10:
            names_index, bits = struct.unpack_from(">IB", d, 47)
            fields.append(
                MlgField(
                    code, name, units, style, 1.0, 0.0, 0, category, bits, names_index,
                    _bit_dtype(code, bits),
                )
            )  # fmt: skip
        elif code in SCALAR_TYPES:
            scale, transform, digits = struct.unpack_from(">ffB", d, 46)
            fields.append(
                MlgField(
                    code, name, units, style, float(scale), float(transform), digits,
                    category, 0, 0, SCALAR_TYPES[code],
                )
            )  # fmt: skip
        else:
            raise bad(f"field {name!r}: unknown MLVLG field type {code}")
        pos += flen
    size = sum(np.dtype(f.dtype).itemsize for f in fields)
    if size != rec_len:
        raise bad(f"MLVLG fields take {size} bytes but the record length is {rec_len}")
    bit_names = [s.decode("latin-1") for s in data[fields_end:info_start].split(b"\x00") if s]
    info = data[info_start:data_start].split(b"\x00", 1)[0].decode("latin-1")
    return MlgHeader(version, ts, info_start, data_start, rec_len, fields, bit_names, info)


def read_header(path: Path) -> MlgHeader:
    """Read and parse the header of the ``.mlg`` at ``path``."""
    with path.open("rb") as fh:
        head = fh.read(64)
        if head.startswith(MAGIC) and len(head) >= 24:
            (version,) = struct.unpack_from(">H", head, 6)
            (data_start,) = struct.unpack_from(">I", head, 14 if version == 1 else 16)
            fh.seek(0)
            head = fh.read(max(64, min(data_start, 64 << 20)))
    return parse_header(head, str(path))


@dataclass
class Blocks:
    """Decoded records of one chunk: block timestamps and the raw record matrix."""

    stamps: npt.NDArray[np.int64]
    records: npt.NDArray[np.void]


class MlgReader(LogReader):
    """Reader of MLVLG binary logs (see module docstring).

    Attributes (besides LogReader's):
        header: the parsed header (fields, info text, capture time).
        title: the info text's title lines.
        marker_list: ``(time s, text)`` of the marker blocks of the last iteration.
        crc_errors: records dropped for a wrong check byte in the last iteration.
        skipped_bytes: bytes skipped to resynchronise in the last iteration.
        restarts: times the time base started over in the last iteration.
    """

    format = "mlg"

    def _prepare(self) -> None:
        self.header = read_header(self.path)
        self.title = self.header.title
        self.capture_utc = self.header.capture_utc or capture_date(self.title)
        self.marker_list: list[tuple[float, str]] = []
        self.crc_errors = 0
        self.skipped_bytes = 0
        self.restarts = 0
        self._pending_marks: list[tuple[int, str]] = []
        fields = self.header.fields
        self.time_index: int | None = None
        self.time_scale = 1.0
        for i, f in enumerate(fields):
            if normalize_name(f.name) in TIME_ALIASES and not f.is_bits:
                sc = time_scale(f.units) if f.units else 1.0
                if sc is not None:
                    self.time_index, self.time_scale = i, sc
                    break
        skip = [] if self.time_index is None else [self.time_index]
        plan = map_columns([(f.name, f.units) for f in fields], self.stoich, skip=skip)
        self.outputs = plan.outputs
        self.units_of = {f.name: f.units for f in fields}
        self.warnings.extend(plan.warnings)
        self.source_units.update(plan.unit_of)
        for f, outs in zip(fields, plan.outputs, strict=True):
            for o in outs:
                self.source_of.setdefault(o.channel, f.name)
        dt = np.dtype([(f"f{i}", f.dtype) for i, f in enumerate(fields)])
        if dt.itemsize != self.header.record_length:  # pragma: no cover - checked in header
            raise self.error("record layout does not match the record length", 1)
        self._dtype = dt

    # -- raw blocks ----------------------------------------------------------------------

    def _read_blocks(self, fh: BinaryIO) -> Iterator[Blocks]:
        """Yield the record blocks chunk by chunk; markers go to ``marker_list``."""
        hdr = self.header
        blk = hdr.block_length
        rl = hdr.record_length
        want = max(blk * min(self.chunk_rows, 1 << 20), 1 << 16)
        want = min(want, 16 << 20)
        fh.seek(hdr.data_start)
        carry = b""
        eof = False
        while not eof:
            more = fh.read(want)
            eof = len(more) < want
            buf = carry + more
            n = len(buf)
            arr = np.frombuffer(buf, dtype=np.uint8)
            runs: list[tuple[int, int]] = []  # (offset, count) of back-to-back records
            marks: list[tuple[int, str]] = []
            p = 0
            while p + BLOCK_HEADER <= n:
                kind = buf[p]
                if kind == 0:
                    fit = (n - p) // blk
                    if fit == 0:
                        break
                    # Records follow each other at a fixed stride until a marker (or
                    # damage) breaks the pattern: find that point in one numpy step.
                    breaks = np.flatnonzero(arr[p : p + fit * blk : blk])
                    k = int(breaks[0]) if breaks.size else fit
                    runs.append((p, k))
                    p += k * blk
                elif kind == 1:
                    if p + BLOCK_HEADER + MARKER_LEN > n:
                        break
                    # Placed by position: the number of records of this chunk before it.
                    before = sum(k for _, k in runs)
                    marks.append((before, _text(buf[p + 4 : p + 4 + MARKER_LEN])))
                    p += BLOCK_HEADER + MARKER_LEN
                else:
                    q = self._resync(buf, p + 1, eof)
                    if q is None:
                        break
                    self.skipped_bytes += q - p
                    p = q
            if eof and p < n:
                self.skipped_bytes += n - p  # a cut-short last block
                p = n
            carry = buf[p:]
            if runs:
                mats = [arr[a : a + k * blk].reshape(k, blk) for a, k in runs]
                mat = mats[0] if len(mats) == 1 else np.concatenate(mats)
                raw = mat[:, BLOCK_HEADER : BLOCK_HEADER + rl]
                good = (raw.sum(axis=1, dtype=np.int64) & 0xFF) == mat[:, BLOCK_HEADER + rl]
                nbad = int(np.count_nonzero(~good))
                if nbad:
                    self.crc_errors += nbad
                    mat, raw = mat[good], raw[good]
                    kept = np.concatenate([[0], np.cumsum(good)])
                    marks = [(int(kept[b]), text) for b, text in marks]
                self._pending_marks.extend(marks)
                stamps = (mat[:, 2].astype(np.int64) << 8) | mat[:, 3]
                yield Blocks(stamps, np.ascontiguousarray(raw).view(self._dtype).reshape(-1))
            else:
                self._pending_marks.extend((0, text) for _, text in marks)

    def _resync(self, buf: bytes, start: int, eof: bool) -> int | None:
        """Offset of the next record block whose check byte is right, or None."""
        blk = self.header.block_length
        rl = self.header.record_length
        for q in range(start, len(buf) - blk + 1):
            if buf[q] == 0 and (sum(buf[q + 4 : q + 4 + rl]) & 0xFF) == buf[q + 4 + rl]:
                return q
        return None if not eof else len(buf)

    def records(self) -> Iterator[npt.NDArray[np.void]]:
        """Yield the raw records chunk by chunk (fields ``f0``, ``f1``... in header order).

        Records with a wrong check byte are left out (and counted); pass a chunk and a
        field index to :meth:`values` for the field's scaled values.
        """
        self.crc_errors = 0
        self.skipped_bytes = 0
        self._pending_marks = []
        with self.path.open("rb") as fh:
            for blocks in self._read_blocks(fh):
                yield blocks.records

    def values(self, rec: npt.NDArray[np.void], i: int) -> FloatArray:
        """Field ``i`` of decoded records as float64, scaled: ``(raw + transform) x scale``."""
        f = self.header.fields[i]
        raw = rec[f"f{i}"].astype(np.float64)
        if f.is_bits or (f.scale == 1.0 and f.transform == 0.0):
            return raw
        return (raw + f.transform) * f.scale

    # -- frames --------------------------------------------------------------------------

    def _frames(self) -> Iterator[Frame]:
        self.marker_list = []
        self.crc_errors = 0
        self.skipped_bytes = 0
        self.restarts = 0
        self._pending_marks = []
        last_t = -np.inf
        shift = 0.0
        stamp_base = 0
        last_stamp = -1
        with self.path.open("rb") as fh:
            for blocks in self._read_blocks(fh):
                st = blocks.stamps
                if not st.size:
                    continue  # every record of the chunk failed its check byte
                # Block timestamps (10 us, 16 bits) unwrapped over their rollover.
                prev = last_stamp if last_stamp >= 0 else int(st[0])
                wraps = np.cumsum(np.diff(st, prepend=prev) < 0)
                unwrapped = (st + (stamp_base + wraps * 65536)).astype(np.float64) * TIMESTAMP_S
                stamp_base += int(wraps[-1]) * 65536
                last_stamp = int(st[-1])
                if self.time_index is None:
                    t = unwrapped
                else:
                    t = self.values(blocks.records, self.time_index) * self.time_scale
                keep = np.isfinite(t)
                if not keep.all():
                    t, st = t[keep], st[keep]
                    blocks = Blocks(st, blocks.records[keep])
                    if not t.size:
                        continue
                t = t + shift
                # A time base that starts over (a reconnect) is continued forward.
                for b in np.flatnonzero(np.diff(t, prepend=last_t) < 0).tolist():
                    before = last_t if b == 0 else float(t[b - 1])
                    add = before + RESTART_GAP_S - float(t[b])
                    t[b:] += add
                    shift += add
                    self.restarts += 1
                last_t = float(t[-1])
                for before, text in self._pending_marks:
                    self.marker_list.append((float(t[min(before, t.size - 1)]), text))
                self._pending_marks = []
                cols: dict[str, FloatArray] = {}
                for i, outs in enumerate(self.outputs):
                    if not outs:
                        continue
                    v = self.values(blocks.records, i)
                    for o in outs:
                        cols[o.channel] = (
                            v if (o.scale, o.offset) == (1.0, 0.0) else (v * o.scale + o.offset)
                        )
                for start in range(0, t.size, self.chunk_rows):
                    stop = start + self.chunk_rows
                    yield Frame(t[start:stop], {k: c[start:stop] for k, c in cols.items()})
        for _before, text in self._pending_marks:
            self.marker_list.append((last_t if np.isfinite(last_t) else 0.0, text))


__all__ = ["MAGIC", "MlgField", "MlgHeader", "MlgReader", "parse_header", "read_header"]

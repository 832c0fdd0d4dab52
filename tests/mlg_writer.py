"""A small writer of TunerStudio MLVLG binary logs (v1 and v2), for the reader's tests.

Written from the format description in ``dynoai_daemon/logs/mlg.py`` (not from the reader's
code): header, field descriptors (scalars and bit fields), bit names, info text, then
record blocks (type 0, rolling counter, 10 us timestamp, packed big-endian record, sum
check byte) and marker blocks (type 1, 50-byte text).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynoai_daemon.channels import Frame

_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "q", 7: "f", 10: "B", 11: "H", 12: "I"}


@dataclass
class Field:
    """One logger field: a scalar (type 0-7) or a bit field (type 10 and above)."""

    name: str
    type: int = 7
    units: str = ""
    scale: float = 1.0
    transform: float = 0.0
    digits: int = 2
    bits: int = 0
    bit_names: tuple[str, ...] = ()
    category: str = ""

    @property
    def fmt(self) -> str:
        if self.type in _FMT:
            return _FMT[self.type]
        return "B" if self.bits <= 8 else "H" if self.bits <= 16 else "I"

    def raw(self, value: float) -> int | float:
        """The stored raw value of a physical value: value / scale - transform."""
        if self.type == 7:
            return float(value)
        if self.type >= 10:
            return int(value)
        return round(value / self.scale - self.transform)


SPEEDUINO_INFO = (
    '"speeduino 202207: Speeduino 202207.1"\n"Capture Date: Sun Nov 13 10:56:01 CET 2022"\n'
)


def _pad(text: str, n: int) -> bytes:
    b = text.encode("latin-1")[:n]
    return b + b"\x00" * (n - len(b))


def write_mlg(
    path: Path,
    fields: Sequence[Field],
    rows: Sequence[Sequence[float]],
    *,
    version: int = 1,
    stamps: Sequence[int] | None = None,
    markers: Sequence[tuple[int, str]] = (),
    info: str = SPEEDUINO_INFO,
    timestamp: int = 1668333361,
    corrupt_rows: Sequence[int] = (),
    garbage_after: Sequence[int] = (),
) -> Path:
    """Write an MLVLG file.

    Args:
        fields: the fields in record order.
        rows: physical values per record (converted with each field's scale/transform).
        version: 1 or 2.
        stamps: raw 16-bit block timestamps (10 us units, wrapping); default 10 ms apart.
        markers: ``(row index before which the marker goes, text)``.
        corrupt_rows: records written with a wrong check byte.
        garbage_after: records followed by 3 bytes that are no block.
    """
    flen = 55 if version == 1 else 89
    head = 22 if version == 1 else 24
    bit_blob = b""
    descs = b""
    for f in fields:
        d = bytes([f.type]) + _pad(f.name, 34) + _pad(f.units, 10)
        if f.type >= 10:
            index = head + len(fields) * flen + len(bit_blob)
            bit_blob += b"".join(n.encode("latin-1") + b"\x00" for n in f.bit_names)
            d += bytes([2, 0]) + struct.pack(">IB", index, f.bits) + b"\x00\x00\x00"
        else:
            d += bytes([0]) + struct.pack(">ffB", f.scale, f.transform, f.digits)
        if version == 2:
            d += _pad(f.category, 34)
        assert len(d) == flen, (f.name, len(d))
        descs += d
    info_start = head + len(descs) + len(bit_blob)
    info_b = info.encode("latin-1") + b"\x00"
    data_start = info_start + len(info_b)
    rec = struct.Struct(">" + "".join(f.fmt for f in fields))
    if version == 1:
        top = struct.pack(">HIHIHH", 1, timestamp, info_start, data_start, rec.size, len(fields))
    else:
        top = struct.pack(">HIIIHH", 2, timestamp, info_start, data_start, rec.size, len(fields))
    out = bytearray(b"MLVLG\x00" + top + descs + bit_blob + info_b)
    assert len(out) == data_start
    marks = sorted(markers)
    mi = 0
    counter = 0
    for k, row in enumerate(rows):
        stamp = (stamps[k] if stamps is not None else k * 1000) & 0xFFFF
        while mi < len(marks) and marks[mi][0] <= k:
            out += bytes([1, counter & 0xFF]) + struct.pack(">H", stamp) + _pad(marks[mi][1], 50)
            counter += 1
            mi += 1
        body = rec.pack(*(f.raw(v) for f, v in zip(fields, row, strict=True)))
        check = sum(body) & 0xFF
        if k in corrupt_rows:
            check ^= 0x5A
        out += bytes([0, counter & 0xFF]) + struct.pack(">H", stamp) + body + bytes([check])
        counter += 1
        if k in garbage_after:
            out += b"\x07\x07\x07"
    path.write_bytes(bytes(out))
    return path


#: Canonical channel -> (TunerStudio field name, units, type, scale, transform, digits).
CANONICAL_AS_MLG: dict[str, tuple[str, str, int, float, float, int]] = {
    "rpm": ("RPM", "rpm", 2, 1.0, 0.0, 0),
    "map_kpa": ("MAP", "kpa", 2, 0.1, 0.0, 1),
    "tps_pct": ("TPS", "%", 2, 0.1, 0.0, 1),
    "afr_front": ("AFR", "O2", 7, 1.0, 0.0, 3),
    "afr_rear": ("AFR2", "O2", 7, 1.0, 0.0, 3),
    "iat_f": ("IAT", "", 3, 0.1, 0.0, 1),
    "ect_f": ("CLT", "", 3, 0.1, -400.0, 1),
    "knock_front_deg": ("Knock F", "deg", 7, 1.0, 0.0, 2),
    "knock_rear_deg": ("Knock R", "deg", 7, 1.0, 0.0, 2),
}


def frame_to_mlg(path: Path, frame: Frame, *, version: int = 1, celsius: bool = True) -> Path:
    """Write a canonical frame as a Speeduino-style .mlg (temperatures in degC, no unit)."""
    fields = [Field("Time", 7, "s", digits=3)]
    cols = [frame.t]
    for ch, (name, units, typ, scale, transform, digits) in CANONICAL_AS_MLG.items():
        col = frame.columns.get(ch)
        if col is None:
            continue
        if ch in ("iat_f", "ect_f") and celsius:
            col = (col - 32.0) / 1.8
        fields.append(Field(name, typ, units, scale, transform, digits))
        cols.append(np.nan_to_num(col, nan=0.0))
    rows = np.column_stack(cols).tolist()
    return write_mlg(path, fields, rows, version=version)

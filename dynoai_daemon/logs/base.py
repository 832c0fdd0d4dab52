"""The common shape of every recorded-log reader.

A :class:`LogReader` is an iterable of :class:`~dynoai_daemon.channels.Frame` chunks read
incrementally from one file: time in seconds in ``t``, canonical channel names and units
as columns, NaN where a row has no value. Iterating twice reads the file twice. Readers
parse their header when built (so a bad header fails at :func:`read_log` time) and the
data as they are iterated; a malformed line raises
:class:`~dynoai_daemon.errors.LogFormatError` naming the 1-based physical line.
A chunk holds at most ``chunk_rows`` rows (fewer is normal: the pyarrow readers cut at
their 4 MiB blocks rather than copy rows together). Columns may be read-only, zero-copy
views of Arrow memory: copy before writing into them.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dynoai_daemon.channels import FloatArray, Frame
from dynoai_daemon.errors import LogFormatError

DEFAULT_CHUNK_ROWS = 262_144


def decode_text(raw: bytes) -> str:
    """Decode a header line: UTF-8 (BOM dropped), falling back to Windows-1252/Latin-1."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    return text.removeprefix("\ufeff").rstrip("\r\n")


def parse_float(field: str) -> float | None:
    """Parse one numeric field strictly; empty means missing (None).

    Accepts what a CSV writer produces (``1``, ``-2.5``, ``1e-7``, ``nan``, ``inf``) and
    rejects Python-only spellings such as ``1_000``.

    Raises:
        ValueError: the field is not a number.
    """
    s = field.strip()
    if not s:
        return None
    if "_" in s:
        raise ValueError(s)
    return float(s)


def parse_number(field: str) -> float:
    """Parse a decimal or hexadecimal (``0x1A2B``, ``-0x10``) number.

    Raises:
        ValueError: the field is empty or not a number.
    """
    s = field.strip().strip('"').strip()
    body = s.lstrip("+-")
    if body[:2] in ("0x", "0X"):
        return float(int(s, 16))
    v = parse_float(s)
    if v is None:
        raise ValueError("empty")
    return v


_CAPTURE = re.compile(
    r"capture date:\s*(?:\w{3}\s+)?(\w{3})\s+(\d{1,2})\s+(\d{1,2}):(\d{2}):(\d{2})"
    r"\s+(?:([A-Za-z]{2,5})\s+)?(\d{4})",
    re.IGNORECASE,
)
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
#: UTC offsets (hours) of the zone names TunerStudio writes; others are read as UTC.
_ZONES = {
    "utc": 0, "gmt": 0, "wet": 0, "west": 1, "cet": 1, "cest": 2, "eet": 2, "eest": 3,
    "bst": 1, "est": -5, "edt": -4, "cst": -6, "cdt": -5, "mst": -7, "mdt": -6,
    "pst": -8, "pdt": -7, "aest": 10, "aedt": 11,
}  # fmt: skip


def capture_date(lines: list[str]) -> datetime | None:
    """The ``Capture Date: Mon Dec 28 13:30:43 CET 2020`` of TunerStudio titles, in UTC."""
    for line in lines:
        m = _CAPTURE.search(line)
        if m is None or m.group(1).lower()[:3] not in _MONTHS:
            continue
        mon = _MONTHS.index(m.group(1).lower()[:3]) + 1
        day, hh, mm, ss, year = (int(m.group(i)) for i in (2, 3, 4, 5, 7))
        off = _ZONES.get((m.group(6) or "utc").lower(), 0)
        try:
            local = datetime(year, mon, day, hh, mm, ss, tzinfo=UTC)
        except ValueError:
            continue
        return local - timedelta(hours=off)
    return None


def scale_time(raw: FloatArray, seconds_per_unit: float) -> FloatArray:
    """Convert a time column to seconds; ms are divided by 1000 (exact to the last bit)."""
    if seconds_per_unit == 1.0:
        return raw
    per_second = 1.0 / seconds_per_unit
    if per_second == round(per_second):
        return raw / round(per_second)
    return raw * seconds_per_unit


class LogReader(ABC):
    """An iterable of Frame chunks from one log file.

    Attributes:
        path: the file.
        format: the resolved format name (``canonical``, ``powervision``, ...).
        rows_read: rows yielded so far by the current (or last) iteration.
        chunk_rows: the most rows one chunk holds.
        stoich: stoichiometric AFR used to convert lambda to AFR.
        source_of: output channel -> the log's own column/signal name.
        source_units: output channel -> the unit its source column gives ("" = none).
        title: the log's title lines (firmware, capture date), when it has them.
        capture_utc: the capture time stated in the log, else None.
        warnings: things the reader decided that a user may want to know (a column kept
            raw because its unit is unknown, a guessed time unit).
    """

    format: str = ""

    def __init__(
        self, path: str | Path, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, stoich: float = 14.7
    ) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        if not (math.isfinite(stoich) and stoich > 0):
            raise ValueError("stoich must be a positive number")
        self.path = Path(path)
        self.chunk_rows = int(chunk_rows)
        self.stoich = float(stoich)
        self.rows_read = 0
        self.source_of: dict[str, str] = {}
        #: output channel -> unit text of its source column ("" when the log gives none)
        self.source_units: dict[str, str] = {}
        #: header/title lines that name the logger or firmware (MegaLogViewer, MLVLG)
        self.title: list[str] = []
        #: the capture time the log itself states, when it states one
        self.capture_utc: datetime | None = None
        self.warnings: list[str] = []
        self._prepare()

    def __iter__(self) -> Iterator[Frame]:
        self.rows_read = 0
        for frame in self._frames():
            self.rows_read += len(frame)
            yield frame

    def error(self, message: str, line: int) -> LogFormatError:
        """Build the error for a bad ``line`` (1-based physical line) of this file."""
        return LogFormatError(message, path=str(self.path), line=line)

    @abstractmethod
    def _prepare(self) -> None:
        """Read and check the header; raise LogFormatError when it is bad."""

    @abstractmethod
    def _frames(self) -> Iterator[Frame]:
        """Yield the data as frames of at most ``chunk_rows`` rows."""


def header_lines(path: Path, limit: int) -> Iterator[tuple[int, int, str]]:
    """Yield ``(line number, byte offset after the line, text)`` for the first lines.

    Text is decoded with :func:`decode_text`; at most ``limit`` lines are read.
    """
    offset = 0
    with path.open("rb") as fh:
        for lineno in range(1, limit + 1):
            raw = fh.readline()
            if not raw:
                return
            offset += len(raw)
            yield lineno, offset, decode_text(raw)

"""Comma-separated lines from DIY dyno controllers (Arduino and alike): codec and driver.

Many home-built dyno and logger controllers print one CSV line per sample over USB serial,
e.g. ``"12345,3512,87.2,13.1\\r\\n"``. The config names each column (``columns``, an empty
name ignores that column) and optionally which column is the device's clock
(``time_column``, in ms or s, kept as ``device_t``). :class:`SerialCsvDecoder` is the pure
codec (:func:`encode_row` its inverse): a line with the wrong number of fields or a field
that is not a plain number is a bad line, counted and skipped; a repeat of the header line
(controllers print one at boot) is recognised and skipped without counting as bad.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

from drivers.serial_base import LineCounters, LineSplitter, SerialDriver, check_positive
from dynoai_daemon.channels import Sample
from dynoai_daemon.errors import ConfigError

BAUDRATE: Final = 115200
#: Period used to time a raw capture that has no time column.
NOMINAL_PERIOD_S: Final = 0.1
MAX_LINE: Final = 1024
#: Divisor from the time column's unit to seconds.
TIME_SCALE: Final[dict[str, float]] = {"ms": 1000.0, "s": 1.0}

# float() would also accept "nan", "inf" and "1_000": a controller never means those.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


@dataclass(frozen=True, slots=True)
class CsvRow:
    """One decoded line: ``(column name, value)`` pairs and the device time in seconds."""

    values: tuple[tuple[str, float], ...]
    device_t: float | None = None


class SerialCsvDecoder(LineCounters):
    """Incremental CSV line decoder.

    Args:
        columns: a name per field; ``""`` ignores that field (it may hold anything).
        time_column: the name (in ``columns``) of the device clock field, or None.
        time_unit: ``"ms"`` or ``"s"``.

    Attributes:
        rows: lines decoded. header_lines: header repeats skipped.
        bad_frames: bad lines (wrong field count, non-numeric or non-ASCII field, too long).
        skipped_bytes: bytes of the bad lines.

    Raises:
        ValueError: ``time_column`` is not one of ``columns`` or ``time_unit`` is unknown.
    """

    def __init__(
        self, columns: Sequence[str], time_column: str | None = None, time_unit: str = "ms"
    ) -> None:
        self.columns = list(columns)
        if time_column is not None and time_column not in self.columns:
            raise ValueError(f"time_column {time_column!r} is not one of the columns")
        if time_unit not in TIME_SCALE:
            raise ValueError(f"time_unit must be 'ms' or 's', got {time_unit!r}")
        self.time_index = self.columns.index(time_column) if time_column else None
        self.time_scale = TIME_SCALE[time_unit]
        self._used = [
            (i, name) for i, name in enumerate(self.columns) if name and i != self.time_index
        ]
        self._header = [c.strip().lower() for c in self.columns]
        self._lines = LineSplitter(MAX_LINE)
        self.rows = 0
        self.header_lines = 0
        self._bad = 0
        self._skipped = 0

    def parse_line(self, line: bytes) -> CsvRow | None:
        """Decode one line (terminator removed); None if it is bad or a header."""
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return None
        fields = text.split(",")
        n = len(self.columns)
        if len(fields) == n + 1 and not fields[-1].strip():
            fields.pop()  # a trailing comma, common in Arduino sketches
        if len(fields) != n:
            return None
        device_t: float | None = None
        if self.time_index is not None:
            f = fields[self.time_index].strip()
            if f:
                if _NUMBER_RE.fullmatch(f) is None:
                    self._maybe_header(fields)
                    return None
                device_t = float(f) / self.time_scale
        values: list[tuple[str, float]] = []
        for i, name in self._used:
            f = fields[i].strip()
            if not f:
                continue
            if _NUMBER_RE.fullmatch(f) is None:
                self._maybe_header(fields)
                return None
            v = float(f)
            if not math.isfinite(v):  # e.g. "1e999"
                return None
            values.append((name, v))
        return CsvRow(tuple(values), device_t)

    def _maybe_header(self, fields: list[str]) -> None:
        if [f.strip().lower() for f in fields] == self._header:
            self.header_lines += 1
        return None

    def _decode(self, lines: list[bytes]) -> list[CsvRow]:
        out: list[CsvRow] = []
        for line in lines:
            headers = self.header_lines
            row = self.parse_line(line)
            if row is None:
                if self.header_lines == headers:
                    self._bad += 1
                    self._skipped += len(line)
                continue
            out.append(row)
        self.rows += len(out)
        return out

    def feed(self, data: bytes | bytearray) -> list[CsvRow]:
        """Consume ``data``; return the rows of the lines it completes."""
        return self._decode(self._lines.feed(bytes(data)))

    def flush(self) -> list[CsvRow]:
        """End of stream: decode an unterminated last line."""
        return self._decode(self._lines.flush())


def encode_row(values: Sequence[float | None], decimals: int = 3) -> bytes:
    """Return one CSV line; None becomes an empty field.

    Raises:
        ValueError: a value is not finite.
    """
    parts: list[str] = []
    for v in values:
        if v is None:
            parts.append("")
        elif not math.isfinite(v):
            raise ValueError(f"cannot encode {v} in a CSV row")
        else:
            parts.append(f"{v:.{decimals}f}")
    return (",".join(parts) + "\r\n").encode("ascii")


class SerialCsvDriver(SerialDriver):
    """A controller printing CSV lines on a serial port.

    Args:
        port: pyserial port or URL.
        columns: channel name per field (``""`` = ignore the field).
        baudrate: line speed (115200 by default, as most Arduino sketches use).
        time_column: the column holding the device clock, or None.
        time_unit: ``"ms"`` or ``"s"`` for ``time_column``.
        nominal_period_s: line period for timing a raw capture without a time column.
        **kwargs: :class:`~drivers.serial_base.SerialDriver` and Driver options.

    Raises:
        ConfigError: an option is invalid.
    """

    name: ClassVar[str] = "serial_csv"

    def __init__(
        self,
        *,
        port: str = "",
        columns: Sequence[str] = (),
        baudrate: int = BAUDRATE,
        time_column: str | None = None,
        time_unit: Literal["ms", "s"] = "ms",
        nominal_period_s: float = NOMINAL_PERIOD_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(port=port, baudrate=baudrate, **kwargs)
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise ConfigError(f"{self.name}: columns must be a list of names", field="columns")
        cols = list(columns)
        if not any(c and c != time_column for c in cols):
            raise ConfigError(
                f"{self.name}: columns must name at least one channel", field="columns"
            )
        named = [c for c in cols if c]
        if len(set(named)) != len(named):
            raise ConfigError(f"{self.name}: column names must be unique", field="columns")
        if time_column is not None and time_column not in cols:
            raise ConfigError(
                f"{self.name}: time_column {time_column!r} is not one of the columns",
                field="time_column",
            )
        if time_unit not in TIME_SCALE:
            raise ConfigError(f"{self.name}: time_unit must be 'ms' or 's'", field="time_unit")
        self.columns = cols
        self.time_column = time_column
        self.time_unit = time_unit
        self.nominal_period_s = check_positive("nominal_period_s", self.name, nominal_period_s)
        self._names = {c: self.map_channel(c) for c in named}

    def new_decoder(self) -> SerialCsvDecoder:
        """Return a fresh :class:`SerialCsvDecoder` for the configured columns."""
        return SerialCsvDecoder(self.columns, self.time_column, self.time_unit)

    def capture_time(self, msg: Any, index: int) -> float:
        """The row's device time when the capture has a time column, else the nominal one."""
        row: CsvRow = msg
        if row.device_t is not None:
            return row.device_t
        return index * self.nominal_period_s

    def message_samples(self, msg: Any, t: float, out: list[Sample]) -> bool:
        """Append the samples of one row; an all-empty row gives none and is not counted."""
        row: CsvRow = msg
        if not row.values:
            return False
        src = self.source
        names = self._names
        dev = row.device_t
        for name, v in row.values:
            out.append(Sample(t, names[name], v, src, dev))
        return True


__all__ = [
    "BAUDRATE",
    "NOMINAL_PERIOD_S",
    "CsvRow",
    "SerialCsvDecoder",
    "SerialCsvDriver",
    "encode_row",
]

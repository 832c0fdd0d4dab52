"""Any logger's delimited text export, with an optional column map (``--format csv``).

For exports no dedicated reader knows (ECUMaster EMU, RomRaider, spreadsheets): the
header row is the first line with at least two fields; the delimiter (``;``, tab or
``,``) is the one that line uses most; a decimal comma (``14,7``) is recognised when the
delimiter is not a comma and the data's numbers use one. Time is the column the map names
as ``time_s``, else the first column called ``Time``/``Timestamp``...; its unit comes from
the name (``Time (msec)``) or, when it has none, from the sample step (as for WinPEP).

With a column map (``--columns rpm=RPM,map_kpa=MAP:bar,afr_front=Lambda:lambda``) only
the mapped columns are read, each converted from the unit given after ``:`` or in the
column's name (``MAP (bar)``) to the channel's canonical unit; a column or unit that does
not exist is an error naming it. Without a map, the shared aliases of
:mod:`~dynoai_daemon.logs.units` apply (``engine/rpm`` is ``rpm``) and every other column
is kept raw, as in the other readers. Empty cells are missing values (sparse exports).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import numpy as np

from dynoai_daemon.channels import CANONICAL_CHANNELS, Frame
from dynoai_daemon.errors import InputError
from dynoai_daemon.logs.base import DEFAULT_CHUNK_ROWS, LogReader, decode_text, scale_time
from dynoai_daemon.logs.units import Output, conversion, map_columns, split_unit, time_scale
from dynoai_daemon.logs.winpep import find_time_column

HEADER_SEARCH_LINES: Final = 50
DELIMITERS: Final = (";", "\t", ",")
TIME_KEYS: Final = ("time_s", "time")


def parse_column_map(text: str) -> dict[str, str]:
    """Parse ``--columns rpm=RPM,map_kpa=MAP:bar`` into ``{channel: "COLUMN[:unit]"}``.

    Raises:
        InputError: an item without ``=``, an empty name, or a channel given twice.
    """
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, col = item.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or not key or not col:
            raise InputError(f"--columns: {item.strip()!r} is not CHANNEL=COLUMN")
        if key in out:
            raise InputError(f"--columns: channel {key!r} given twice")
        out[key] = col
    return out


def _split(line: str, delimiter: str) -> list[str]:
    """The fields of one line, trimmed and unquoted; [] for a line csv cannot split."""
    try:
        fields = next(csv.reader([line], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return []
    return [f.strip().strip('"').strip() for f in fields]


class DelimitedReader(LogReader):
    """Reader of delimited text logs with an optional column map (see module docstring).

    Args:
        path: the file.
        columns: channel -> ``COLUMN`` or ``COLUMN:unit``; None maps by the aliases.
        chunk_rows: the most rows one Frame holds.
        stoich: AFR per lambda.
    """

    format = "csv"

    def __init__(
        self,
        path: str | Path,
        *,
        columns: Mapping[str, str] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        stoich: float = 14.7,
    ) -> None:
        self.column_map = dict(columns or {})
        super().__init__(path, chunk_rows=chunk_rows, stoich=stoich)

    def _prepare(self) -> None:
        header: tuple[int, str] | None = None
        with self.path.open("rb") as fh:
            for lineno in range(1, HEADER_SEARCH_LINES + 1):
                raw = fh.readline()
                if not raw:
                    break
                text = decode_text(raw)
                counts = {d: text.count(d) for d in DELIMITERS}
                best = max(DELIMITERS, key=lambda d: counts[d])
                if counts[best] >= 1:
                    header = (lineno, text)
                    break
            self.data_offset = fh.tell()
            sample = [decode_text(fh.readline()) for _ in range(20)]
        if header is None:
            raise self.error("no delimited header row found", 1)
        self.header_line, text = header
        counts = {d: text.count(d) for d in DELIMITERS}
        self.delimiter = max(DELIMITERS, key=lambda d: counts[d])
        if "\x00" in text or any("\x00" in s for s in sample):
            raise self.error("binary data, not a delimited text log", self.header_line)
        names = _split(text, self.delimiter)
        if len(names) < 2:
            raise self.error("unreadable header row", self.header_line)
        self.names = names
        self.decimal_comma = self.delimiter != "," and any(
            any(_is_comma_number(f) for f in _split(s, self.delimiter)) for s in sample if s
        )
        self.time_index, unit = self._time_column(names)
        self.time_scale = time_scale(unit) if unit else None
        if unit and self.time_scale is None:
            raise self.error(f"time column unit {unit!r} is not a time unit", self.header_line)
        self.outputs: list[list[Output]] = [[] for _ in names]
        if self.column_map:
            self._map_explicit(names)
        else:
            pairs = [split_unit(n) for n in names]
            plan = map_columns(pairs, self.stoich, skip=[self.time_index])
            self.outputs = plan.outputs
            self.warnings.extend(plan.warnings)
            self.source_units.update(plan.unit_of)
            for name, outs in zip(names, plan.outputs, strict=True):
                for o in outs:
                    self.source_of.setdefault(o.channel, name)
        if self.time_scale is None:
            self.time_scale = self._detect_time_scale(sample)

    def _find(self, names: list[str], column: str) -> int | None:
        want = column.strip().lower()
        for i, n in enumerate(names):
            if n.lower() == want or split_unit(n)[0].lower() == want:
                return i
        return None

    def _time_column(self, names: list[str]) -> tuple[int, str]:
        for key in TIME_KEYS:
            spec = self.column_map.pop(key, None)
            if spec is not None:
                col, _, unit = spec.partition(":")
                i = self._find(names, col)
                if i is None:
                    raise InputError(
                        f"--columns: no column {col!r} in the header", path=str(self.path)
                    )
                return i, unit.strip() or split_unit(names[i])[1]
        ti = find_time_column(names)
        if ti is None:
            raise self.error(
                "no time column (name one with --columns time_s=COLUMN)", self.header_line
            )
        return ti, split_unit(names[ti])[1]

    def _map_explicit(self, names: list[str]) -> None:
        for channel, spec in self.column_map.items():
            col, _, unit = spec.partition(":")
            i = self._find(names, col)
            if i is None:
                raise InputError(
                    f"--columns: no column {col!r} in the header ({len(names)} columns)",
                    path=str(self.path),
                )
            unit = unit.strip() or split_unit(names[i])[1]
            if channel in CANONICAL_CHANNELS:
                conv = conversion(
                    channel, unit, self.stoich, lambda_default="lambda" in col.lower()
                )
                if conv is None:
                    raise InputError(
                        f"--columns: unit {unit!r} of {col!r} does not convert to {channel}",
                        path=str(self.path),
                    )
                self.outputs[i].append(Output(channel, conv[0], conv[1]))
            else:
                self.outputs[i].append(Output(channel))
            self.source_of[channel] = names[i]
            self.source_units[channel] = unit

    def _number(self, field: str) -> float:
        s = field.strip().strip('"')
        if not s:
            return float("nan")
        if self.decimal_comma:
            s = s.replace(",", ".")
        return float(s)

    def _detect_time_scale(self, sample: list[str]) -> float:
        vals: list[float] = []
        for s in sample:
            if not s:
                continue
            try:
                vals.append(self._number(_split(s, self.delimiter)[self.time_index]))
            except (ValueError, IndexError, csv.Error):
                continue
        steps = np.diff(np.asarray(vals, dtype=np.float64))
        steps = steps[steps > 0]
        if steps.size and float(np.median(steps)) >= 1.0:
            self.warnings.append(
                f"time column {self.names[self.time_index]!r} has no unit; "
                "median step >= 1, read as milliseconds"
            )
            return 0.001
        return 1.0

    def _frames(self) -> Iterator[Frame]:
        used = [(i, outs) for i, outs in enumerate(self.outputs) if outs]
        ti = self.time_index
        ncol = len(self.names)
        last_t = -np.inf
        rows_t: list[float] = []
        rows_v: list[list[float]] = []
        with self.path.open("rb") as fh:
            fh.seek(self.data_offset)
            for lineno, raw in enumerate(fh, start=self.header_line + 1):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not text.strip():
                    continue
                try:
                    fields = next(csv.reader([text], delimiter=self.delimiter))
                except csv.Error as exc:
                    raise self.error(f"unparseable row: {exc}", lineno) from exc
                if len(fields) > ncol:
                    raise self.error(f"expected {ncol} fields, got {len(fields)}", lineno)
                fields += [""] * (ncol - len(fields))
                try:
                    t = self._number(fields[ti])
                except ValueError:
                    raise self.error(
                        f"time ({self.names[ti]!r}) is not a number: {fields[ti]!r}", lineno
                    ) from None
                if not np.isfinite(t):
                    raise self.error(f"time ({self.names[ti]!r}) is missing", lineno)
                vals: list[float] = []
                for i, _ in used:
                    try:
                        vals.append(self._number(fields[i]))
                    except ValueError:
                        raise self.error(
                            f"column {self.names[i]!r}: not a number: {fields[i].strip()!r}",
                            lineno,
                        ) from None
                ts = t * (self.time_scale or 1.0)
                if ts < last_t:
                    raise self.error(f"time goes backwards ({ts!r} s after {last_t!r} s)", lineno)
                last_t = ts
                rows_t.append(t)
                rows_v.append(vals)
                if len(rows_t) >= self.chunk_rows:
                    yield self._frame(rows_t, rows_v, used)
                    rows_t, rows_v = [], []
        if rows_t:
            yield self._frame(rows_t, rows_v, used)

    def _frame(
        self, rows_t: list[float], rows_v: list[list[float]], used: list[tuple[int, list[Output]]]
    ) -> Frame:
        t = scale_time(np.asarray(rows_t, dtype=np.float64), self.time_scale or 1.0)
        mat = np.asarray(rows_v, dtype=np.float64).reshape(len(rows_t), len(used))
        cols = {}
        for k, (_, outs) in enumerate(used):
            v = mat[:, k]
            for o in outs:
                cols[o.channel] = v if (o.scale, o.offset) == (1.0, 0.0) else v * o.scale + o.offset
        return Frame(t, cols)


def _is_comma_number(field: str) -> bool:
    s = field.strip().lstrip("+-")
    head, sep, tail = s.partition(",")
    return bool(sep) and head.isdigit() and tail.isdigit()


__all__ = ["DelimitedReader", "parse_column_map"]

"""Dynojet Power Vision CSV logs: signal definitions, then long-format samples.

Layout: the first line is ``Dynojet Power Vision Log File``; then, in any order, metadata
lines (``Log Date,...``: first field not an integer, kept in ``metadata``) and signal
definition rows ``idx,"driver","id","name","units","description","color"``; then the
header ``"Time(ms)","Signal","Value"``; then one row per value:
``time_ms,signal_index,value``, where any number may be hexadecimal (``0x1A2B``).

The long rows are pivoted to wide frames, one row per distinct time (rows sharing a time
share a frame row; a signal given twice at one time keeps the later value), and signals
become channels by name and unit (shared aliases: ``RPM``, ``MAP``, ``TP``, ``ET``,
``IAT``, ``WBO2 F/R``, ``VE Front/Rear``, ``Advance F/R``, ``Spark Knock F/R``, ``B+``,
``Set Lambda``; degC to degF, lambda times stoich). Others keep a sanitized name. Parsing
is line by line in Python (Power Vision logs are small), a chunk at a time: a chunk holds
at most ``chunk_rows`` distinct times and never splits one time across chunks.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator

import numpy as np

from dynoai_daemon.channels import FloatArray, Frame
from dynoai_daemon.logs.base import LogReader, header_lines, parse_number
from dynoai_daemon.logs.units import Output, map_columns, split_unit, time_scale

MAGIC = "dynojet power vision log file"
HEADER_SEARCH_LINES = 10_000


def _csv_fields(text: str) -> list[str]:
    return [f.strip() for f in next(csv.reader([text], skipinitialspace=True), [])]


class PowerVisionReader(LogReader):
    """Reader of Power Vision CSV logs (see module docstring).

    Attributes (besides the base's):
        signals: signal index -> (name, units) from the definition rows.
        metadata: the other lines before the data header, as lists of fields.
    """

    format = "powervision"

    def _prepare(self) -> None:
        self.signals: dict[int, tuple[str, str]] = {}
        self.metadata: list[list[str]] = []
        lines = header_lines(self.path, HEADER_SEARCH_LINES)
        first = next(lines, None)
        last_line = 1
        if first is None or MAGIC not in first[2].strip().strip('",').lower():
            raise self.error(f"not a Power Vision log: line 1 is not {MAGIC!r}", 1)
        for lineno, offset, text in lines:
            last_line = lineno
            if not text.strip():
                continue
            try:
                fields = _csv_fields(text)
            except csv.Error as exc:
                raise self.error(f"unreadable line: {exc}", lineno) from exc
            low = [f.lower() for f in fields]
            if len(low) == 3 and low[0].startswith("time") and low[1:] == ["signal", "value"]:
                unit = split_unit(fields[0])[1] or "ms"
                scale = time_scale(unit)
                if scale is None:
                    raise self.error(f"time unit {unit!r} is not a time unit", lineno)
                self._start(offset, lineno + 1, scale)
                return
            try:
                idx = int(fields[0])
            except ValueError:
                self.metadata.append(fields)
                continue
            if len(fields) < 5:
                raise self.error(
                    "signal definition needs idx,driver,id,name,units"
                    f"[,description,color]; got {len(fields)} fields",
                    lineno,
                )
            if idx in self.signals:
                raise self.error(f"signal index {idx} defined twice", lineno)
            if not fields[3]:
                raise self.error(f"signal {idx} has no name", lineno)
            self.signals[idx] = (fields[3], fields[4])
        raise self.error(
            'no "Time(ms)","Signal","Value" header before the end of the header section',
            last_line,
        )

    def _start(self, offset: int, data_line: int, scale: float) -> None:
        self._data_offset = offset
        self._data_line = data_line
        self._time_scale = scale
        order = sorted(self.signals)
        plan = map_columns([self.signals[i] for i in order], self.stoich)
        self.warnings.extend(plan.warnings)
        self.source_of.update(plan.source_of)
        self._col_of = {idx: k for k, idx in enumerate(order)}
        self._outputs: list[list[Output]] = plan.outputs

    def _frames(self) -> Iterator[Frame]:
        ts: list[float] = []
        cols: list[int] = []
        vals: list[float] = []
        distinct = 0
        last_t = -math.inf
        col_of = self._col_of
        per_s = round(1.0 / self._time_scale, 9)  # ms: divide by 1000, exact
        with self.path.open("rb") as fh:
            fh.seek(self._data_offset)
            for lineno, raw in enumerate(fh, start=self._data_line):
                text = raw.decode("latin-1").rstrip("\r\n")
                if not text.strip():
                    continue
                fields = text.split(",") if '"' not in text else _csv_fields(text)
                if len(fields) != 3:
                    raise self.error(
                        f"expected 3 fields (time,signal,value), got {len(fields)}", lineno
                    )
                try:
                    t = parse_number(fields[0]) / per_s
                except ValueError:
                    raise self.error(
                        f"time is not a number: {fields[0].strip()!r}", lineno
                    ) from None
                try:
                    sig_f = parse_number(fields[1])
                except ValueError:
                    raise self.error(
                        f"signal index is not a number: {fields[1].strip()!r}", lineno
                    ) from None
                try:
                    value = parse_number(fields[2])
                except ValueError:
                    raise self.error(
                        f"value is not a number: {fields[2].strip()!r}", lineno
                    ) from None
                if not math.isfinite(t):
                    raise self.error("time is not finite", lineno)
                if t < last_t:
                    raise self.error(f"time goes backwards ({t!r} s after {last_t!r} s)", lineno)
                col = col_of.get(int(sig_f)) if sig_f.is_integer() else None
                if col is None:
                    raise self.error(
                        f"signal {fields[1].strip()} is not defined in the header", lineno
                    )
                if t != last_t:
                    if distinct == self.chunk_rows:
                        yield self._pivot(ts, cols, vals)
                        ts, cols, vals = [], [], []
                        distinct = 0
                    distinct += 1
                    last_t = t
                ts.append(t)
                cols.append(col)
                vals.append(value)
        if ts:
            yield self._pivot(ts, cols, vals)

    def _pivot(self, ts: list[float], cols: list[int], vals: list[float]) -> Frame:
        """Long rows (non-decreasing time) to one wide row per distinct time."""
        t_all = np.asarray(ts, dtype=np.float64)
        new_row = np.empty(t_all.shape[0], dtype=bool)
        new_row[0] = True
        np.not_equal(t_all[1:], t_all[:-1], out=new_row[1:])
        row = np.cumsum(new_row) - 1
        t = t_all[new_row]
        col = np.asarray(cols, dtype=np.intp)
        val = np.asarray(vals, dtype=np.float64)
        ncol = len(self._outputs)
        key = row * ncol + col
        _, first_from_end = np.unique(key[::-1], return_index=True)
        if first_from_end.shape[0] != key.shape[0]:
            # A signal repeated at one time: keep the later value (numpy does not promise
            # which of several writes to one element wins).
            keep = key.shape[0] - 1 - first_from_end
            row, col, val = row[keep], col[keep], val[keep]
        grid = np.full((ncol, t.shape[0]), np.nan)
        grid[col, row] = val
        out: dict[str, FloatArray] = {}
        for k, outs in enumerate(self._outputs):
            for o in outs:
                out[o.channel] = (
                    grid[k]
                    if (o.scale == 1.0 and o.offset == 0.0)
                    else grid[k] * o.scale + o.offset
                )
        return Frame(t, out)

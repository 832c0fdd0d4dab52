"""Streaming reader of wide, delimited numeric logs (one row per sample time), on pyarrow.

The canonical CSV, WinPEP-style CSV and MegaLogViewer ``.msl`` logs share one shape:
some header lines, then rows of numbers, one column per channel. A format module only
works out the :class:`WideLayout` (where the data starts, the delimiter, which column is
time and in what unit, and what every column becomes); this module streams the data with
``pyarrow.csv.open_csv`` in blocks sized for ``chunk_rows``, turns each chunk into float64
numpy columns (zero-copy when a column has no missing values, so those arrays are
read-only) and checks time (present, finite, never going backwards).

pyarrow reports errors by its own row count, which skips blank lines and knows nothing of
the header, so when it rejects the data this module re-reads the file from the first row
pyarrow had not yet delivered, with the same rules in Python, to name the physical line.
"""

from __future__ import annotations

import csv
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dynoai_daemon.channels import FloatArray, Frame
from dynoai_daemon.errors import LogFormatError
from dynoai_daemon.logs.base import LogReader, parse_float, scale_time
from dynoai_daemon.logs.units import Output

MIN_BLOCK = 1 << 16
#: Blocks of 512 KiB: pyarrow's streaming reader holds several blocks in flight, so RSS
#: follows the block size (4 MiB: 310 MB peak on a 1M-row replay, 512 KiB: 163 MB), and
#: smaller blocks keep the read-ahead thread and the core overlapped (2.2 s -> 1.75 s).
MAX_BLOCK = 1 << 19
#: Median sample step at or above which an unlabelled time column is taken as ms.
MS_STEP_THRESHOLD = 1.0
#: Fields read as missing. pyarrow matches null strings exactly (no trimming), so the
#: blank fields of ``a, , b`` style files are listed; the Python re-check uses the same set.
NULL_VALUES: tuple[str, ...] = ("", " ", "  ", "   ", "\t")


@dataclass
class WideLayout:
    """Where and how the data of a wide log lies.

    Attributes:
        data_offset: byte offset of the first line after the header lines.
        data_line: that line's 1-based physical line number.
        delimiter: field separator.
        names: the log's column names (for messages).
        time_index: which column is time.
        time_scale: seconds per time unit, or None to detect it from the data.
        outputs: per column, the channels it feeds (empty for the time column).
        marker_prefix: data lines starting with this are annotations (MegaLogViewer
            ``MARK`` lines), counted in ``markers`` and not data.
    """

    data_offset: int
    data_line: int
    delimiter: str
    names: list[str]
    time_index: int
    time_scale: float | None
    outputs: list[list[Output]]
    marker_prefix: str | None = None


def _to_numpy(col: pa.Array) -> FloatArray:
    arr: FloatArray = col.to_numpy(zero_copy_only=False)
    return arr


class WideCsvReader(LogReader):
    """Base of the wide-format readers; subclasses provide :meth:`_layout`.

    Attributes (besides LogReader's):
        layout: the header's reading.
        markers: annotation lines seen in the last iteration (MegaLogViewer only).
    """

    layout: WideLayout

    def _prepare(self) -> None:
        self.layout = self._layout()
        if self.layout.time_scale is None:
            self.layout.time_scale = self._detect_time_scale()
        self.markers = 0
        for name, outs in zip(self.layout.names, self.layout.outputs, strict=True):
            for o in outs:
                self.source_of.setdefault(o.channel, name)

    @abstractmethod
    def _layout(self) -> WideLayout:
        """Read the header lines and return the layout; raise LogFormatError when bad."""

    # -- streaming -----------------------------------------------------------------------

    def _block_size(self) -> int:
        lay = self.layout
        with self.path.open("rb") as fh:
            fh.seek(lay.data_offset)
            sample = fh.read(MIN_BLOCK)
        lines = max(sample.count(b"\n"), 1)
        per_row = max(len(sample) / lines, 1.0)
        return int(min(max(per_row * self.chunk_rows, MIN_BLOCK), MAX_BLOCK))

    def _frames(self) -> Iterator[Frame]:
        lay = self.layout
        ncol = len(lay.names)
        names = [f"c{i}" for i in range(ncol)]
        self.markers = 0
        self._last_t = -np.inf
        marker = lay.marker_prefix

        def on_invalid(row: Any) -> str:
            text = str(row.text or "")
            if marker is not None and text.lstrip().startswith(marker):
                self.markers += 1
                return "skip"
            return "error"

        read_opts = pacsv.ReadOptions(
            column_names=names, block_size=self._block_size(), use_threads=False
        )
        parse_opts = pacsv.ParseOptions(
            delimiter=lay.delimiter,
            invalid_row_handler=on_invalid if marker is not None else None,
        )
        convert_opts = pacsv.ConvertOptions(
            column_types={n: pa.float64() for n in names},
            null_values=list(NULL_VALUES),
            quoted_strings_can_be_null=True,
        )
        done = 0  # rows already turned into frames
        src = pa.OSFile(str(self.path), "rb")
        try:
            src.seek(lay.data_offset)
            try:
                reader = pacsv.open_csv(
                    src,
                    read_options=read_opts,
                    parse_options=parse_opts,
                    convert_options=convert_opts,
                )
            except pa.ArrowInvalid as exc:
                if "Empty CSV" in str(exc):
                    return
                raise self._parse_error(0, exc) from exc
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except pa.ArrowInvalid as exc:
                    raise self._parse_error(done, exc) from exc
                # Blocks are sized near chunk_rows; a batch is cut (views, no copy) rather
                # than batches glued together, which would copy every column.
                for start in range(0, batch.num_rows, self.chunk_rows):
                    part = batch.slice(start, self.chunk_rows)
                    yield self._convert(part, done)
                    done += part.num_rows
        finally:
            src.close()

    def _convert(self, table: pa.RecordBatch, row0: int) -> Frame:
        lay = self.layout
        raw_t = _to_numpy(table.column(lay.time_index))
        t = scale_time(raw_t, lay.time_scale or 1.0)
        finite = np.isfinite(t)
        if not bool(finite.all()):
            i = int(np.flatnonzero(~finite)[0])
            what = "missing" if np.isnan(t[i]) else "not finite"
            raise self.error(
                f"time ({lay.names[lay.time_index]!r}) is {what}", self._row_line(row0 + i)
            )
        if t.size:
            if t[0] < self._last_t:
                raise self.error(
                    f"time goes backwards ({float(t[0])!r} s after {self._last_t!r} s)",
                    self._row_line(row0),
                )
            back = np.flatnonzero(np.diff(t) < 0)
            if back.size:
                i = int(back[0]) + 1
                raise self.error(
                    f"time goes backwards ({float(t[i])!r} s after {float(t[i - 1])!r} s)",
                    self._row_line(row0 + i),
                )
            self._last_t = float(t[-1])
        cols: dict[str, FloatArray] = {}
        for i, outs in enumerate(lay.outputs):
            if not outs:
                continue
            arr = _to_numpy(table.column(i))
            for o in outs:
                if o.scale == 1.0 and o.offset == 0.0:
                    cols[o.channel] = arr
                else:
                    cols[o.channel] = arr * o.scale + o.offset
        return Frame(t, cols)

    def _detect_time_scale(self) -> float:
        """Seconds or milliseconds for an unlabelled time column, from the sample step.

        Rule: milliseconds when the median positive step over the first 1000 data rows is
        at least 1.0 (nobody logs a dyno pull at 1 Hz or slower, while a millisecond clock
        steps by at least 1 at any rate below 1 kHz); otherwise seconds. Read once, before
        any chunk, so the answer does not depend on ``chunk_rows``. Rows that do not parse
        are left to the data pass to report.
        """
        lay = self.layout
        head: list[float] = []
        for _lineno, text in self._data_lines():
            if text is None:
                continue
            try:
                fields = next(csv.reader([text], delimiter=lay.delimiter))
                v = parse_float(fields[lay.time_index])
            except (csv.Error, StopIteration, IndexError, ValueError):
                continue
            if v is not None:
                head.append(v)
            if len(head) >= 1000:
                break
        steps = np.diff(np.asarray(head, dtype=np.float64))
        steps = steps[steps > 0]
        if steps.size and float(np.median(steps)) >= MS_STEP_THRESHOLD:
            self.warnings.append(
                f"time column {lay.names[lay.time_index]!r} has no unit; "
                "median step >= 1, read as milliseconds"
            )
            return 0.001
        return 1.0

    # -- finding the physical line -----------------------------------------------------

    def _data_lines(self) -> Iterator[tuple[int, str | None]]:
        """Yield (physical line, text) for each data row; text None for skipped lines."""
        lay = self.layout
        marker = lay.marker_prefix
        with self.path.open("rb") as fh:
            fh.seek(lay.data_offset)
            for lineno, raw in enumerate(fh, start=lay.data_line):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not text or (marker is not None and text.lstrip().startswith(marker)):
                    yield lineno, None
                else:
                    yield lineno, text

    def _row_line(self, row: int) -> int:
        """Physical line of data row ``row`` (0-based, blank and marker lines skipped)."""
        k = 0
        last = self.layout.data_line
        for lineno, text in self._data_lines():
            last = lineno
            if text is None:
                continue
            if k == row:
                return lineno
            k += 1
        return last

    def _check_row(self, text: str) -> str | None:
        """Why ``text`` is not a valid data row, or None when it is."""
        lay = self.layout
        try:
            fields = next(csv.reader([text], delimiter=lay.delimiter, strict=True))
        except (csv.Error, StopIteration) as exc:
            return f"unparseable row: {exc}"
        if len(fields) != len(lay.names):
            return f"expected {len(lay.names)} fields, got {len(fields)}"
        for name, field in zip(lay.names, fields, strict=True):
            if field in NULL_VALUES:
                continue
            try:
                if parse_float(field) is None:
                    raise ValueError(field)
            except ValueError:
                return f"column {name!r}: not a number: {field.strip()!r}"
        return None

    def _parse_error(self, first_unread: int, exc: Exception) -> LogFormatError:
        """Locate the row pyarrow rejected: the first bad row at or after ``first_unread``."""
        k = 0
        last = self.layout.data_line
        for lineno, text in self._data_lines():
            last = lineno
            if text is None:
                continue
            if k >= first_unread:
                why = self._check_row(text)
                if why is not None:
                    return self.error(why, lineno)
            k += 1
        # pyarrow saw a problem our rules do not (should not happen): say what it said.
        return self.error(f"unreadable data: {exc}", last)

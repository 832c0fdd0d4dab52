"""The project's own log format, canonical CSV: its reader and its streaming writer.

Format (docs/contract.md): a header row of channel names with ``time_s`` first, then one row
per sample time of plain numbers; an empty field is a missing value (NaN in a Frame).
Columns other than the canonical channels (``afr_front_status``...) are kept as they are.

The reader is the pyarrow streaming path of :mod:`dynoai_daemon.logs.wide`: no Python
object per row, float64 numpy columns straight out of Arrow.

The writer is what the daemon's raw recorder appends to while a run is live, so its header
cannot change once written. Strategy: the header is fixed when the writer is created:
``time_s``, then the given columns (canonical ones in ``CHANNEL_UNITS`` order, then the
others in the order given), or by default every canonical channel plus
``afr_front_status`` and ``afr_rear_status``. A value that does not fit the main file is
never dropped: it goes, in long form ``time_s,channel,value``, to a sidecar file next to
it (``<name>.extra.csv``, created only when needed). Two kinds of value go there: channels
not in the header, and rows whose time is earlier than the last row written (the main
file's time must never go backwards, or it would not read back). Counters say how many.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dynoai_daemon.channels import (
    AFR_CHANNELS,
    CANONICAL_CHANNELS,
    TIME_COLUMN,
    FloatArray,
    Frame,
    Sample,
    samples_to_frame,
    status_channel,
)
from dynoai_daemon.logs.base import header_lines
from dynoai_daemon.logs.units import Output
from dynoai_daemon.logs.wide import WideCsvReader, WideLayout

#: The columns a writer created without ``columns`` puts after ``time_s``.
DEFAULT_COLUMNS: Final[tuple[str, ...]] = CANONICAL_CHANNELS + tuple(
    status_channel(c) for c in AFR_CHANNELS
)
SIDECAR_SUFFIX: Final = ".extra.csv"
_WRITE_OPTS: Final = pacsv.WriteOptions(include_header=False, quoting_style="none")


class CanonicalReader(WideCsvReader):
    """Reader of canonical CSV (see module docstring)."""

    format = "canonical"

    def _layout(self) -> WideLayout:
        first = next(iter(header_lines(self.path, 1)), None)
        if first is None:
            raise self.error("empty file: no header row", 1)
        _, offset, text = first
        try:
            names = [n.strip() for n in next(csv.reader([text]))]
        except (csv.Error, StopIteration) as exc:
            raise self.error(f"unreadable header: {exc}", 1) from exc
        if not names or names[0] != TIME_COLUMN:
            raise self.error(
                f"canonical CSV must start with a {TIME_COLUMN!r} column, got {names[:1]}", 1
            )
        seen: set[str] = set()
        for i, n in enumerate(names):
            if not n:
                raise self.error(f"header column {i + 1} has no name", 1)
            if n in seen:
                raise self.error(f"header names column {n!r} twice", 1)
            seen.add(n)
        outputs = [[] if i == 0 else [Output(n)] for i, n in enumerate(names)]
        return WideLayout(
            data_offset=offset,
            data_line=2,
            delimiter=",",
            names=names,
            time_index=0,
            time_scale=1.0,
            outputs=outputs,
        )


def order_columns(columns: Iterable[str]) -> list[str]:
    """Canonical channels in ``CHANNEL_UNITS`` order, then the others as given (no time)."""
    given = list(dict.fromkeys(c for c in columns if c != TIME_COLUMN))
    canon = [c for c in CANONICAL_CHANNELS if c in given]
    return canon + [c for c in given if c not in CANONICAL_CHANNELS]


def _fmt(v: float) -> str:
    s = repr(v)
    return s[:-2] if s.endswith(".0") else s


class CanonicalWriter:
    """Streaming canonical CSV writer with a fixed header (see module docstring).

    Attributes:
        path: the main file.
        columns: the header after ``time_s``.
        sidecar_path: where values that do not fit go (created on first use).
        rows_written: rows in the main file.
        extra_values: values written to the sidecar.
        late_rows: rows sent to the sidecar because their time went backwards.
    """

    def __init__(
        self,
        path: str | Path,
        columns: Sequence[str] | None = None,
        *,
        on_late: Literal["sidecar", "raise"] = "sidecar",
    ) -> None:
        """Create (truncate) ``path`` and write the header.

        Args:
            path: the CSV file.
            columns: channels after ``time_s``; None for :data:`DEFAULT_COLUMNS`.
            on_late: what a row earlier than the last written row does: go to the
                sidecar, or raise ValueError.

        Raises:
            ValueError: a column name cannot be written in a CSV header.
            OSError: the file cannot be created.
        """
        self.path = Path(path)
        self.columns = order_columns(DEFAULT_COLUMNS if columns is None else columns)
        for c in self.columns:
            if not c or any(ch in c for ch in ',"\r\n'):
                raise ValueError(f"column name {c!r} cannot be written in a CSV header")
        self.sidecar_path = self.path.with_name(
            self.path.name.removesuffix(".csv") + SIDECAR_SUFFIX
        )
        self.rows_written = 0
        self.extra_values = 0
        self.late_rows = 0
        self._on_late = on_late
        self._last_t = -math.inf
        self._index = {c: i for i, c in enumerate(self.columns)}
        self._fh: io.BufferedWriter | None = self.path.open("wb")
        self._side: io.TextIOWrapper | None = None
        self._side_csv: Any = None  # a csv writer (its type is private to _csv)
        self._fh.write((",".join([TIME_COLUMN, *self.columns]) + "\n").encode())
        # A live file must read back (header included) as soon as it exists.
        self._fh.flush()

    def __enter__(self) -> CanonicalWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fh is None

    def write_samples(self, samples: Sequence[Sample]) -> None:
        """Write samples: one row per distinct time (see ``samples_to_frame``)."""
        if samples:
            self.write_frame(samples_to_frame(samples))

    def write_frame(self, frame: Frame) -> None:
        """Append a frame's rows; values that do not fit go to the sidecar.

        Raises:
            ValueError: the writer is closed, the frame's time is not finite or not
                non-decreasing, or a row is late and ``on_late="raise"``.
        """
        if self._fh is None:
            raise ValueError("writer is closed")
        n = len(frame)
        if n == 0:
            return
        t = np.asarray(frame.t, dtype=np.float64)
        if not bool(np.isfinite(t).all()):
            raise ValueError("frame time must be finite")
        if n > 1 and bool((np.diff(t) < 0).any()):
            raise ValueError("frame time must be non-decreasing")
        late = int(np.searchsorted(t, self._last_t, side="left"))
        if late:
            if self._on_late == "raise":
                raise ValueError(f"time goes backwards: {float(t[0])!r} s after {self._last_t!r} s")
            self.late_rows += late
            self._to_sidecar(frame.slice(0, late), list(frame.columns))
            frame = frame.slice(late, n)
            t = t[late:]
            n -= late
            if n == 0:
                return
        extra = [c for c in frame.columns if c not in self._index and c != TIME_COLUMN]
        if extra:
            self._to_sidecar(frame, extra)
        arrays: list[pa.Array] = [pa.array(t, type=pa.float64())]
        for c in self.columns:
            col = frame.columns.get(c)
            if col is None:
                arrays.append(pa.nulls(n, type=pa.float64()))
            else:
                a = np.asarray(col, dtype=np.float64)
                arrays.append(pa.array(a, type=pa.float64(), mask=np.isnan(a)))
        names = [TIME_COLUMN, *self.columns]
        batch = pa.RecordBatch.from_arrays(arrays, names=names)
        buf = pa.BufferOutputStream()
        pacsv.write_csv(batch, buf, write_options=_WRITE_OPTS)
        self._fh.write(buf.getvalue().to_pybytes())
        self.rows_written += n
        self._last_t = float(t[-1])

    def _to_sidecar(self, frame: Frame, channels: list[str]) -> None:
        if self._side_csv is None:
            self._side = self.sidecar_path.open("w", newline="", encoding="utf-8")
            self._side_csv = csv.writer(self._side, lineterminator="\n")
            self._side_csv.writerow([TIME_COLUMN, "channel", "value"])
        writer = self._side_csv
        cols: list[tuple[str, FloatArray]] = [
            (c, np.asarray(frame.columns[c], dtype=np.float64)) for c in channels
        ]
        for i, tv in enumerate(frame.t.tolist()):
            ts = _fmt(tv)
            for name, col in cols:
                v = float(col[i])
                if not math.isnan(v):
                    writer.writerow([ts, name, _fmt(v)])
                    self.extra_values += 1

    def flush(self) -> None:
        """Push buffered rows to the operating system (both files)."""
        if self._fh is not None:
            self._fh.flush()
        if self._side is not None:
            self._side.flush()

    def close(self) -> None:
        """Flush and close both files; idempotent."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._side is not None:
            self._side.close()
            self._side = None
            self._side_csv = None


def write_canonical(path: str | Path, frames: Iterable[Frame]) -> Path:
    """Write frames as one canonical CSV, atomically (temporary name, then rename).

    The header is ``time_s`` plus every channel any frame carries, so nothing needs a
    sidecar.

    Args:
        path: destination file.
        frames: frames in time order.

    Returns:
        The path written.

    Raises:
        ValueError: time goes backwards between frames, or a channel name cannot be
            written in a CSV header.
    """
    dest = Path(path)
    frames = list(frames)
    columns = order_columns(c for f in frames for c in f.columns)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with CanonicalWriter(tmp, columns, on_late="raise") as w:
            for f in frames:
                w.write_frame(f)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest

"""Forward-filled channel state with staleness, and look-ups back in time.

The core sees rows that carry only some channels. A channel's value at time ``q`` is
its last value at or before ``q``, provided that value is no older than the staleness
limit; otherwise it is missing (NaN). The timeline keeps a short history of rows (at
least the longest transport delay plus the rate window) so that an AFR reading can be
matched to the engine state some hundred milliseconds earlier even across batch
boundaries. Batch boundaries never change a result: feeding rows one at a time or all at
once gives the same values.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from dynoai_daemon.channels import Frame

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


class Window:
    """History + current batch for the tracked channels, ready for look-ups.

    Row 0 is a sentinel at ``-inf`` that carries each channel's value from before the
    history (or NaN), so every look-up finds a row.
    """

    def __init__(
        self,
        t: FloatArray,
        values: dict[str, FloatArray],
        present_t: dict[str, FloatArray],
        batch_start: int,
        stale_s: float,
    ) -> None:
        self.t = t
        self._values = values
        self._present_t = present_t
        self._ffill: dict[str, IntArray] = {}
        self.batch_start = batch_start
        self.stale_s = stale_s

    def _index(self, name: str) -> IntArray:
        idx = self._ffill.get(name)
        if idx is None:
            v = self._values[name]
            n = v.shape[0]
            nan = np.isnan(v)
            nan[0] = False  # the sentinel row always "has" the carried value
            if not nan.any():
                idx = np.arange(n, dtype=np.intp)
            else:
                idx = np.where(nan, 0, np.arange(n, dtype=np.intp))
                np.maximum.accumulate(idx, out=idx)
            self._ffill[name] = idx
        return idx

    def rows_at(self, q: FloatArray) -> IntArray:
        """Return, for each query time, the last row at or before it."""
        return (np.searchsorted(self.t, q, side="right") - 1).astype(np.intp)

    def batch_rows(self) -> IntArray:
        """Return the row indexes of the current batch."""
        return np.arange(self.batch_start, self.t.shape[0], dtype=np.intp)

    def value(self, name: str, rows: IntArray, q: FloatArray | None = None) -> FloatArray:
        """Return channel ``name`` as seen at ``rows`` (at times ``q``), NaN if stale.

        Args:
            name: a tracked channel.
            rows: row indexes from :meth:`rows_at` or :meth:`batch_rows`.
            q: the query times; defaults to the rows' own times.
        """
        if name not in self._values:
            return np.full(rows.shape[0], np.nan)
        src = self._index(name)[rows]
        v = self._values[name][src]
        tq = self.t[rows] if q is None else q
        age = tq - self._present_t[name][src]
        with np.errstate(invalid="ignore"):
            return np.where(age <= self.stale_s, v, np.nan)

    def has(self, name: str) -> bool:
        """Return True when the channel has ever been seen (in history or batch)."""
        return name in self._values

    def raw(self, name: str) -> FloatArray | None:
        """Return the raw (not forward-filled) column of the current batch."""
        v = self._values.get(name)
        return None if v is None else v[self.batch_start :]


class Timeline:
    """Tracks the channels the core needs, across batches.

    Args:
        channels: channel names to track.
        stale_s: staleness limit in seconds.
        keep_s: how much history to keep; must cover the longest look-back.
    """

    def __init__(self, channels: Iterable[str], *, stale_s: float, keep_s: float) -> None:
        self.channels = tuple(dict.fromkeys(channels))
        self.stale_s = stale_s
        self.keep_s = keep_s
        self._hist_t: FloatArray = np.empty(0)
        self._hist: dict[str, FloatArray] = {}
        self._carry: dict[str, tuple[float, float]] = {}  # name -> (time, value)
        self.last_t = -np.inf

    def window(self, frame: Frame) -> Window:
        """Combine history with ``frame`` into a :class:`Window` and roll the history.

        Raises:
            ValueError: the frame starts before the previous one ended.
        """
        n = len(frame)
        if n and frame.t[0] < self.last_t:
            raise ValueError(f"time went backwards: {frame.t[0]:.6f} after {self.last_t:.6f}")
        h = self._hist_t.shape[0]
        t = np.empty(1 + h + n)
        t[0] = -np.inf
        t[1 : 1 + h] = self._hist_t
        t[1 + h :] = frame.t
        values: dict[str, FloatArray] = {}
        present_t: dict[str, FloatArray] = {}
        for name in self.channels:
            col = frame.columns.get(name)
            hist = self._hist.get(name)
            carry = self._carry.get(name)
            if col is None and hist is None and carry is None:
                continue
            v = np.empty(1 + h + n)
            v[0] = np.nan if carry is None else carry[1]
            v[1 : 1 + h] = np.nan if hist is None else hist
            v[1 + h :] = np.nan if col is None else col
            pt = t.copy()
            pt[0] = -np.inf if carry is None else carry[0]
            values[name] = v
            present_t[name] = pt
        win = Window(t, values, present_t, 1 + h, self.stale_s)
        if n:
            self.last_t = float(frame.t[-1])
            cut = int(np.searchsorted(t, self.last_t - self.keep_s, side="left"))
            cut = max(cut, 1)
            self._hist_t = t[cut:].copy()
            new_hist: dict[str, FloatArray] = {}
            for name, v in values.items():
                src = int(win._index(name)[cut - 1])
                if not np.isnan(v[src]):
                    self._carry[name] = (float(present_t[name][src]), float(v[src]))
                new_hist[name] = v[cut:].copy()
            self._hist = new_hist
        return win

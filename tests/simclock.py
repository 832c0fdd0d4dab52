"""A wall clock for the virtual cell in tests, with the host's stalls cut out.

The virtual cell runs on ``(clock() - t0) * speed``. With the plain monotonic clock, a
host that stalls the test process for 30 ms (two cores shared by many test runs) moves
the cell's clock 0.6 simulated seconds at ``speed=20``: longer than the core's staleness
limit and its rate window, so readings that were due together arrive "late", the engine
state goes stale and cells are lost. That measures the host, not dynoai. This clock
advances by the wall time elapsed since it was last read, but by at most
``max_step_s`` per reading: while the process is descheduled nobody reads it, so a stall
costs at most ``max_step_s`` of the cell's time, and simulated time measures only the work
that was actually done. Between stalls it runs at wall speed, so a healthy run is
unchanged. Only readings from the thread that created it (the event loop's, where the
cell emits and the daemon processes) move it; other threads (the CAN reader stamping
frames) read the current value, so a reader thread that runs while the loop is starved
of CPU cannot push the cell's time ahead of the work the loop has done.
"""

from __future__ import annotations

import threading
import time


class StallFreeClock:
    """Monotonic seconds that never jump by more than ``max_step_s`` between two readings.

    Args:
        max_step_s: the largest advance of one reading, in wall seconds. Pick it well below
            the smallest window the daemon measures (at ``speed`` X, ``max_step_s * X``
            simulated seconds against a 250 ms staleness limit and a 200 ms rate window).
    """

    def __init__(self, max_step_s: float) -> None:
        if not max_step_s > 0:
            raise ValueError("max_step_s must be positive")
        self.max_step_s = max_step_s
        self._lock = threading.Lock()
        self._owner = threading.get_ident()
        self._last_wall = time.monotonic()
        self._now = self._last_wall
        #: wall seconds cut out of the clock so far (the stalls it absorbed)
        self.cut_s = 0.0

    def __call__(self) -> float:
        with self._lock:
            if threading.get_ident() != self._owner:
                return self._now
            wall = time.monotonic()
            dt = wall - self._last_wall
            self._last_wall = wall
            step = min(dt, self.max_step_s)
            self.cut_s += dt - step
            self._now += step
            return self._now


def stall_free_clock(speed: float, max_sim_step_s: float = 0.02) -> StallFreeClock:
    """A clock for ``VirtualCell(speed=speed)`` whose stalls cost at most ``max_sim_step_s``
    simulated seconds (default 20 ms: one ECU report, a tenth of the rate window)."""
    return StallFreeClock(max_sim_step_s / speed)

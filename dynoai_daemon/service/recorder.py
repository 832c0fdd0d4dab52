"""Raw recorder: every sample of a run, as canonical CSV under ``raw/<run_id>.csv``.

The file opens when a run starts, beginning with the last couple of seconds before the
start (the transport-delay look-back needs them to replay the run identically), takes
every batch while the run is open, and is flushed at least once a second so that a killed
daemon leaves at most a second unwritten. A run that was never closed into a session is
found again at start-up by :func:`orphaned_runs`.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from dynoai_daemon.channels import Frame, concat_frames
from dynoai_daemon.logs import CanonicalWriter

PRE_RUN_S = 2.0
FLUSH_S = 1.0


class RawRecorder:
    """Writes the raw data of each run.

    Args:
        raw_dir: the ``raw/`` folder (created when needed).
        clock: monotonic clock for flush timing.
    """

    def __init__(self, raw_dir: Path) -> None:
        self.raw_dir = raw_dir
        self._pre: deque[Frame] = deque()
        self._writer: object | None = None
        self._run_id: str | None = None
        self._last_flush = time.monotonic()
        self.rows_written = 0

    @property
    def run_id(self) -> str | None:
        """The run being recorded, if any."""
        return self._run_id

    def path_for(self, run_id: str) -> Path:
        """Return the raw file of ``run_id``."""
        return self.raw_dir / f"{run_id}.csv"

    def start(self, run_id: str) -> None:
        """Open ``raw/<run_id>.csv`` and write the pre-run history into it."""
        self.stop()
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        writer = CanonicalWriter(self.path_for(run_id))
        pre = concat_frames(list(self._pre))
        if len(pre):
            writer.write_frame(pre)
            self.rows_written += len(pre)
        self._pre.clear()
        self._writer = writer
        self._run_id = run_id
        writer.flush()

    def write(self, frame: Frame) -> None:
        """Record a batch (to the open run's file, or to the pre-run history)."""
        if not len(frame):
            return
        w = self._writer
        if w is None:
            self._pre.append(frame)
            newest = float(frame.t[-1])
            while self._pre and float(self._pre[0].t[-1]) < newest - PRE_RUN_S:
                self._pre.popleft()
            return
        w.write_frame(frame)  # type: ignore[attr-defined]
        self.rows_written += len(frame)
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_S:
            w.flush()  # type: ignore[attr-defined]
            self._last_flush = now

    def flush(self) -> None:
        """Push buffered rows to the OS."""
        if self._writer is not None:
            self._writer.flush()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Close the open run's file, if any."""
        w, self._writer, self._run_id = self._writer, None, None
        if w is not None:
            w.close()  # type: ignore[attr-defined]


def orphaned_runs(data_dir: Path) -> list[Path]:
    """Raw files whose run never became a session (daemon killed mid-run)."""
    raw = data_dir / "raw"
    if not raw.is_dir():
        return []
    sessions = data_dir / "sessions"
    out = []
    for p in sorted(raw.glob("*.csv")):
        if not (sessions / f"{p.stem}.json").exists():
            out.append(p)
    return out

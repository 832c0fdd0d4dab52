"""Raw recorder: every sample of a run, as canonical CSV under ``raw/<run_id>.csv``.

The file opens when a run starts, beginning with the last couple of seconds before the
start (the transport-delay look-back needs them to replay the run identically), takes
every batch while the run is open, and is flushed at least once a second so that a killed
daemon leaves at most a second unwritten. A run that was never closed into a session is
found again at start-up by :func:`orphaned_runs`.

All file work happens on one writer thread, in the order the loop asked for it, so a slow
or full disk never stalls the event loop. A write that fails (ENOSPC, EIO) does not lose
the batch: it stays in a bounded backlog (oldest rows dropped and counted beyond it),
``error`` says why, and the backlog is written again, at most once a second, until the
disk takes it; then ``error`` clears.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from dynoai_daemon.channels import Frame, concat_frames
from dynoai_daemon.logs import CanonicalWriter

PRE_RUN_S = 2.0
FLUSH_S = 1.0
RETRY_S = 1.0
MAX_BACKLOG_ROWS = 500_000


class RawRecorder:
    """Writes the raw data of each run, on a writer thread.

    ``start``/``write``/``stop``/``discard`` return at once (the loop thread keeps
    ``run_id``); :meth:`close` ends the thread after the queued work.

    Args:
        raw_dir: the ``raw/`` folder (created when needed).
    """

    def __init__(self, raw_dir: Path) -> None:
        self.raw_dir = raw_dir
        self._run_id: str | None = None
        self.rows_written = 0
        self.dropped_rows = 0
        self.error: str | None = None
        # Writer-thread state.
        self._pre: deque[Frame] = deque()
        self._writer: CanonicalWriter | None = None
        self._active: str | None = None
        self._backlog: deque[Frame] = deque()
        self._closing: list[tuple[CanonicalWriter, deque[Frame]]] = []
        self._backlog_rows = 0
        self._last_try = 0.0
        self._ops: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batches: list[Frame] = []  # loop side: batches not yet handed over
        self._last_send = time.monotonic()

    @property
    def run_id(self) -> str | None:
        """The run being recorded, if any."""
        return self._run_id

    @property
    def backlog_rows(self) -> int:
        """Rows waiting for the disk after a failed write."""
        return self._backlog_rows

    def path_for(self, run_id: str) -> Path:
        """Return the raw file of ``run_id``."""
        return self.raw_dir / f"{run_id}.csv"

    # ------------------------------------------------------------------ loop side

    def start(self, run_id: str) -> None:
        """Open ``raw/<run_id>.csv`` and write the pre-run history into it."""
        self._send_batches()
        self._run_id = run_id
        self._submit(lambda: self._do_start(run_id))

    def write(self, frame: Frame) -> None:
        """Record a batch (to the open run's file, or to the pre-run history).

        Batches are handed to the writer thread once a second (one thread wake-up and one
        CSV write per second instead of one per batch): a killed daemon loses at most
        that second, as it would with a flush per second.
        """
        if len(frame):
            self._batches.append(frame)
            now = time.monotonic()
            if now - self._last_send >= FLUSH_S:
                self._send_batches(now)

    def stop(self) -> None:
        """Close the open run's file, if any."""
        self._send_batches()
        self._run_id = None
        self._submit(self._do_stop)

    def discard(self, run_id: str) -> None:
        """Close the open file and delete ``raw/<run_id>.csv`` (a run too short to keep)."""
        self._send_batches()
        self._run_id = None
        path = self.path_for(run_id)

        def op() -> None:
            self._do_stop()
            with contextlib.suppress(OSError):
                path.unlink()

        self._submit(op)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued work, close the file and end the thread (idempotent)."""
        self.stop()
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None:
            self._ops.put(None)
            t.join(timeout)

    def _send_batches(self, now: float | None = None) -> None:
        frames, self._batches = self._batches, []
        self._last_send = time.monotonic() if now is None else now
        if frames:
            self._submit(lambda: self._do_write(frames))

    def _submit(self, op: Callable[[], None]) -> None:
        if self._thread is None:  # only the loop thread submits: no lock needed here
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._work, name="raw-recorder", daemon=True
                    )
                    self._thread.start()
        self._ops.put(op)

    # ------------------------------------------------------------------ writer thread

    def _work(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                self._do_stop()
                self._give_up_closing()
                return
            try:
                op()
            except Exception as exc:  # never let one bad op end the recording
                self.error = repr(exc)

    def _do_start(self, run_id: str) -> None:
        self._do_stop()
        pre = concat_frames(list(self._pre))
        self._pre.clear()
        self._active = run_id
        self._open_writer()
        if len(pre):
            self._hold(pre)
        self._drain(force=True)

    def _open_writer(self) -> bool:
        run_id = self._active
        if self._writer is not None or run_id is None:
            return self._writer is not None
        path = self.path_for(run_id)
        try:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            self._writer = CanonicalWriter(path)
        except OSError as exc:
            self.error = f"{path}: {exc.strerror or exc}"
            return False
        return True

    def _do_write(self, frames: list[Frame]) -> None:
        self._finish_closing(force=False)
        if self._active is None:
            self._pre.extend(frames)
            newest = float(frames[-1].t[-1])
            while self._pre and float(self._pre[0].t[-1]) < newest - PRE_RUN_S:
                self._pre.popleft()
            return
        for frame in frames:
            self._hold(frame)
        self._drain(force=False)

    def _do_stop(self) -> None:
        self._drain(force=True)
        self._active = None
        w, self._writer = self._writer, None
        if w is None:
            if self._backlog_rows:  # the file could never be created
                self.dropped_rows += self._backlog_rows
                self._backlog.clear()
                self._backlog_rows = 0
            return
        # A run ends, but the disk may still refuse: its file waits to be finished.
        self._closing.append((w, self._backlog))
        self._backlog = deque()
        self._backlog_rows = 0
        self._finish_closing(force=True)

    def _finish_closing(self, *, force: bool) -> None:
        """Write, flush and close the files of ended runs; keep those the disk refuses."""
        if not self._closing:
            return
        now = time.monotonic()
        if not force and now - self._last_try < RETRY_S:
            return
        self._last_try = now
        left: list[tuple[CanonicalWriter, deque[Frame]]] = []
        for w, backlog in self._closing:
            try:
                while backlog:
                    w.write_frame(backlog[0])
                    self.rows_written += len(backlog.popleft())
                w.flush()
                w.close()
            except OSError as exc:
                self.error = f"{w.path}: {exc.strerror or exc}"
                left.append((w, backlog))
        self._closing = left
        if not left and self._writer is None:
            self.error = None

    def _give_up_closing(self) -> None:
        for w, backlog in self._closing:
            self.dropped_rows += sum(len(f) for f in backlog)
            with contextlib.suppress(OSError):
                w.close()
        self._closing = []

    def _hold(self, frame: Frame) -> None:
        self._backlog.append(frame)
        self._backlog_rows += len(frame)
        while self._backlog_rows > MAX_BACKLOG_ROWS and len(self._backlog) > 1:
            old = self._backlog.popleft()
            self._backlog_rows -= len(old)
            self.dropped_rows += len(old)

    def _drain(self, *, force: bool) -> None:
        if not self._backlog:
            return
        now = time.monotonic()
        if self.error is not None and not force and now - self._last_try < RETRY_S:
            return  # the disk refused a moment ago: keep holding, try again shortly
        self._last_try = now
        if not self._open_writer():
            return
        w = self._writer
        assert w is not None
        try:
            # One CSV write for everything held (a second of batches): far cheaper than one
            # per batch. All or nothing, so a refused write is retried whole.
            frame = concat_frames(list(self._backlog))
            w.write_frame(frame)
            self._backlog.clear()
            self._backlog_rows = 0
            self.rows_written += len(frame)
            w.flush()
        except OSError as exc:
            self.error = f"{w.path}: {exc.strerror or exc}"
            return
        if not self._closing:
            self.error = None


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

"""Recorded logs through the same core: ``dynoai replay``.

Logs are read in chunks, placed one after another on one time axis (each file's run is
closed at its end), fed to the :class:`~dynoai_daemon.core.Core`, and every closed run is
turned into a TuningSession, stored under the data directory and added to the dataset.
``speed`` paces the feed against the wall clock (1 = real time); None runs as fast as
possible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drivers.registry import driver_class
from dynoai_daemon.channels import Frame, samples_to_frame
from dynoai_daemon.config import Settings
from dynoai_daemon.core import Core, CoreEvent, RunClosed, RunDiscarded
from dynoai_daemon.logs.readers import read_log
from dynoai_daemon.logs.sniff import sniff_format
from dynoai_daemon.models import TuningSession
from dynoai_daemon.patterns.session import SessionBuilder
from dynoai_daemon.store import SessionStore

FILE_GAP_S = 10.0
CAPTURE_FORMATS = {"candump": "can", "asc": "can", "blf": "can", "jetdrive": "udp"}
DEFAULT_CAPTURE_DRIVERS = {"can": ("megasquirt", "aemnet"), "udp": ("jetdrive",)}


def capture_frames(path: str | Path, fmt: str, settings: Settings) -> list[Frame]:
    """Decode a CAN log or JetDrive pcap with the drivers' own codecs into one frame.

    The CAN (or UDP) sources of the config say which drivers decode the capture, with
    their options; without any, MegaSquirt + AEMnet (CAN) or JetDrive (pcap) are used.

    Raises:
        InputError / LogFormatError: the capture cannot be read.
    """
    kind = CAPTURE_FORMATS[fmt]
    chosen = []
    for src in settings.sources:
        cls = driver_class(src.driver)
        if cls.kind == kind:
            chosen.append((cls, {"source": src.name, **src.options()}))
    if not chosen:
        chosen = [(driver_class(n), {"source": n}) for n in DEFAULT_CAPTURE_DRIVERS[kind]]
    samples = []
    for cls, options in chosen:
        decoded, _ = cls.decode_capture(path, **options)
        samples.extend(decoded)
    frame = samples_to_frame(samples)
    return [frame] if len(frame) else []


PACE_SLICE_S = 0.02


@dataclass
class ReplayResult:
    """What a replay produced."""

    sessions: list[TuningSession] = field(default_factory=list)
    session_paths: list[Path] = field(default_factory=list)
    rows: int = 0
    discarded_runs: int = 0
    files: int = 0
    parse_s: float = 0.0
    core_s: float = 0.0
    session_s: float = 0.0


def _paced(frames: Iterable[Frame], speed: float) -> Iterator[Frame]:
    """Yield slices of ``frames`` no faster than ``speed`` x real time."""
    wall0: float | None = None
    t0 = 0.0
    for frame in frames:
        n = len(frame)
        i = 0
        while i < n:
            if wall0 is None:
                wall0, t0 = time.monotonic(), float(frame.t[i])
            end_t = float(frame.t[i]) + PACE_SLICE_S
            j = i + int((frame.t[i:] < end_t).sum())
            due = wall0 + (float(frame.t[j - 1]) - t0) / speed
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield frame.slice(i, j)
            i = j


def replay_logs(
    paths: Sequence[str | Path],
    settings: Settings,
    *,
    fmt: str = "auto",
    speed: float | None = None,
    store: bool = True,
    on_session: Callable[[TuningSession], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    builder: SessionBuilder | None = None,
) -> ReplayResult:
    """Replay logs through the core and build a session per closed run.

    Args:
        paths: log files, replayed in order on one time axis.
        settings: grid, tuning, station, data directory, build.
        fmt: reader format or ``"auto"``.
        speed: pace factor against real time, or None for as fast as possible.
        store: write sessions and the dataset under ``settings.data_dir``.
        on_session: called with each session as it is built.
        on_progress: called with the number of rows of each chunk fed.
        builder: the session builder (default: one from ``settings``).

    Returns:
        The sessions and counters.

    Raises:
        LogFormatError: a log is malformed (names file and line).
    """
    core = Core(grid=settings.grid, tuning=settings.tuning, station=settings.station)
    builder = builder or SessionBuilder.from_settings(settings)
    sessions = SessionStore(settings.data_dir) if store else None
    result = ResultSink(
        result=ReplayResult(), builder=builder, store=sessions, on_session=on_session
    )
    offset = 0.0
    for path in paths:
        resolved = sniff_format(Path(path)) if fmt == "auto" else fmt
        reader: Iterable[Frame]
        if resolved in CAPTURE_FORMATS:
            reader = capture_frames(path, resolved, settings)
        else:
            reader = read_log(path, format=resolved, stoich=settings.tuning.stoich_afr)
        result.result.files += 1
        first: float | None = None
        it: Iterable[Frame] = reader if speed is None else _paced(reader, speed)
        tp = time.perf_counter()
        for frame in it:
            if not len(frame):
                continue
            if first is None:
                first = float(frame.t[0])
                offset = core.last_t + FILE_GAP_S - first if math.isfinite(core.last_t) else 0.0
            shifted = Frame(frame.t + offset, frame.columns) if offset else frame
            tc = time.perf_counter()
            result.result.parse_s += tc - tp
            res = core.feed(shifted)
            result.result.core_s += time.perf_counter() - tc
            result.result.rows += len(frame)
            result.handle(res.events)
            if on_progress is not None:
                on_progress(len(frame))
            tp = time.perf_counter()
        result.handle(core.stop_run("end_of_log"))
    result.result.discarded_runs = core.runs_discarded
    if sessions is not None and result.result.sessions:
        t0 = time.perf_counter()
        sessions.append_many_to_dataset(result.result.sessions)
        result.result.session_s += time.perf_counter() - t0
    return result.result


@dataclass
class ResultSink:
    """Turns core events into stored sessions."""

    result: ReplayResult
    builder: SessionBuilder
    store: object | None
    on_session: Callable[[TuningSession], None] | None

    def handle(self, events: list[CoreEvent]) -> None:
        """Build, store and report a session for every closed run."""
        for ev in events:
            if isinstance(ev, RunClosed):
                t0 = time.perf_counter()
                session = self.builder.build(ev.run)
                if isinstance(self.store, SessionStore):
                    # The dataset is written once at the end of the replay.
                    self.result.session_paths.append(self.store.save_session(session))
                self.result.session_s += time.perf_counter() - t0
                self.result.sessions.append(session)
                if self.on_session is not None:
                    self.on_session(session)
            elif isinstance(ev, RunDiscarded):
                pass

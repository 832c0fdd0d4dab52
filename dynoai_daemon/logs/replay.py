"""Recorded logs through the same core: ``dynoai replay``.

Logs are read in chunks, placed one after another on one time axis (each file's run is
closed at its end), fed to the :class:`~dynoai_daemon.core.Core`, and every closed run is
turned into a TuningSession, stored under the data directory and added to the dataset.
``speed`` paces the feed against the wall clock (1 = real time); None runs as fast as
possible.

Every file's units are decided and its implausible values blanked on the way in
(:mod:`~dynoai_daemon.logs.decide`); what was decided and dropped is reported per file in
:class:`FileReport`. Replay is idempotent: a run's session id and timestamp come from the
log, never the wall clock: ``<station>-<run start UTC yyyymmddThhmmss>-<digest8>-<n>``,
where the run start is the log's capture time (its header or title, else the file's
modification time) plus the run's start within the log, ``digest8`` the first 8 hex
digits of the file's SHA-256 and ``n`` the run's number within the log; replaying a log
again gives the same ids, which the store does not add twice. A run whose session cannot
be built is reported in ``errors`` (``<file>: run <id>: <what>``) and the others are kept.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from drivers.registry import driver_class
from dynoai_daemon.channels import Frame, samples_to_frame, screen_frame
from dynoai_daemon.config import Settings
from dynoai_daemon.core import Core, CoreEvent, RunClosed, RunDiscarded
from dynoai_daemon.core.runs import OpenRun
from dynoai_daemon.errors import InputError
from dynoai_daemon.logs.base import LogReader
from dynoai_daemon.logs.decide import DecidedLog
from dynoai_daemon.logs.delimited import DelimitedReader
from dynoai_daemon.logs.prefetch import Prefetch
from dynoai_daemon.logs.readers import read_log
from dynoai_daemon.logs.sniff import sniff_format
from dynoai_daemon.models import TuningSession, format_errors
from dynoai_daemon.patterns.session import SessionBuilder
from dynoai_daemon.store import SessionStore

FILE_GAP_S = 10.0
CAPTURE_FORMATS = {"candump": "can", "asc": "can", "blf": "can", "trc": "can", "jetdrive": "udp"}
#: Driver counters worth a line in the replay summary of a capture.
CAPTURE_NOTES = frozenset({"lambda_invalid", "lambda_no_reading", "sensor_fault"})
DEFAULT_CAPTURE_DRIVERS = {"can": ("megasquirt", "aemnet"), "udp": ("jetdrive",)}


def capture_frames(
    path: str | Path, fmt: str, settings: Settings, notes: list[str] | None = None
) -> list[Frame]:
    """Decode a CAN log or JetDrive pcap with the drivers' own codecs into one frame.

    The CAN (or UDP) sources of the config say which drivers decode the capture, with
    their options; without any, MegaSquirt + AEMnet (CAN) or JetDrive (pcap) are used.

    Args:
        path: the capture.
        fmt: its format (a key of CAPTURE_FORMATS).
        settings: the station's sources.
        notes: when given, one line per driver that decoded anything (with its
            invalid-reading counters) is appended.

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
        decode: Any = getattr(cls, "decode_capture", None)
        if decode is None:
            raise InputError(f"driver {cls.name!r} cannot decode captures", path=str(path))
        decoded, stats = decode(path, **options)
        samples.extend(decoded)
        if notes is not None and stats.messages:
            counts = {k: v for k, v in sorted(stats.extra.items()) if v and k in CAPTURE_NOTES}
            said = ", ".join(f"{k} {v}" for k, v in counts.items())
            notes.append(f"{cls.name}: {stats.messages} messages" + (f" ({said})" if said else ""))
    frame = samples_to_frame(samples)
    return [frame] if len(frame) else []


PACE_SLICE_S = 0.02
DIGEST_CHARS = 8


@dataclass
class FileReport:
    """What one log gave: format, decisions, drops, runs, cells and why nothing was learned."""

    path: Path
    format: str = ""
    digest: str = ""
    capture_utc: datetime | None = None
    capture_from: str = ""
    rows: int = 0
    #: what was decided about the log's units and columns (``decided:`` lines)
    notes: list[str] = field(default_factory=list)
    #: other things worth saying: reader warnings, capture decoders, corrupt records
    info: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    discarded_runs: int = 0
    sessions: list[str] = field(default_factory=list)
    cells: int = 0
    markers: int = 0
    #: ``(seconds from the log's first row, text)`` of the log's markers (MLVLG)
    marker_list: list[tuple[float, str]] = field(default_factory=list)
    #: run id -> (start, end) in seconds from the log's first row
    run_spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    first_t: float = 0.0
    outside_runs: int = 0
    #: run id -> {gate: readings it rejected}
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    #: run id -> cell-cylinders learned (runs whose session was built)
    run_cells: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


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
    reports: list[FileReport] = field(default_factory=list)
    #: ``<file>: run <id>: <what>`` for each run whose session could not be built
    errors: list[str] = field(default_factory=list)
    #: sessions not added to the dataset because their id was already there (from an
    #: earlier replay, or the same log given twice)
    already_stored: int = 0


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replay_run_id(station: str, start_utc: datetime, digest: str, n: int) -> str:
    """The deterministic id of run ``n`` (1-based) of the log with ``digest``."""
    return f"{station}-{start_utc.strftime('%Y%m%dT%H%M%S')}-{digest[:DIGEST_CHARS]}-{n}"


def provenance(rep: FileReport) -> str:
    """The note of a replayed run's session: the log (name, SHA-256, format), its decisions."""
    head = f"replayed from {rep.path.name} (sha256 {rep.digest}, format {rep.format})"
    return "; ".join([head, *rep.notes])


def cells_learned(session: TuningSession) -> int:
    """Cell-cylinders of a session with a VE correction."""
    g = session.grid
    if g is None:
        return 0
    return sum(
        1
        for cyl in (g.front, g.rear)
        for row in cyl.ve_correction_pct
        for v in row
        if v is not None
    )


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


def open_log(
    path: str | Path,
    settings: Settings,
    fmt: str,
    *,
    columns: Mapping[str, str] | None = None,
    temp_unit: str | None = None,
    report: FileReport | None = None,
) -> Iterable[Frame]:
    """Open one log for replay: the reader with units decided and values screened.

    Args:
        path: the log.
        settings: stoich, capture drivers.
        fmt: a format name or ``"auto"``.
        columns: a column map for ``csv`` (channel -> ``COLUMN[:unit]``).
        temp_unit: ``"C"``/``"F"`` to force blank temperature units.
        report: filled with the format, capture time, and (as the frames are read) the
            decisions and the values dropped.

    Raises:
        InputError / LogFormatError: the log cannot be read.
    """

    p = Path(path)
    rep = report if report is not None else FileReport(p)
    if columns and fmt == "auto":
        fmt = "csv"
    resolved = sniff_format(p) if fmt == "auto" else fmt
    rep.format = resolved
    if resolved in CAPTURE_FORMATS:
        return _ScreenedCapture(capture_frames(p, resolved, settings, rep.info), rep)
    stoich = settings.tuning.stoich_afr
    if resolved == "csv":
        if not p.is_file():
            raise InputError("no such log file", path=str(p))
        reader: LogReader = DelimitedReader(p, columns=columns, stoich=stoich)
    else:
        reader = read_log(p, format=resolved, stoich=stoich)
    if reader.capture_utc is not None:
        rep.capture_utc, rep.capture_from = reader.capture_utc, "log header"
    rep.info.extend(reader.warnings)
    decided = DecidedLog(reader, temp_unit=temp_unit, stoich=stoich)
    # The report shares the decisions' list: filled once the first rows are read, so a
    # run's session can say under which decisions it was learned.
    rep.notes = decided.decisions.notes
    return _DecidedFrames(decided, rep)


@dataclass
class _DecidedFrames:
    log: Any
    report: FileReport

    def __iter__(self) -> Iterator[Frame]:
        yield from self.log
        self.report.dropped = dict(self.log.decisions.dropped)
        marks = list(getattr(self.log.reader, "marker_list", ()))
        self.report.markers = len(marks)
        self.report.marker_list = [(t - self.report.first_t, text) for t, text in marks]
        for attr in ("crc_errors", "skipped_bytes", "restarts"):
            n = getattr(self.log.reader, attr, 0)
            if n:
                self.report.info.append(f"{attr.replace('_', ' ')}: {n}")


@dataclass
class _ScreenedCapture:
    frames: list[Frame]
    report: FileReport

    def __iter__(self) -> Iterator[Frame]:
        counts: dict[str, int] = {}
        for f in self.frames:
            yield screen_frame(f, counts)
        self.report.dropped = counts


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
    columns: Mapping[str, str] | None = None,
    temp_unit: str | None = None,
    on_file: Callable[[FileReport], None] | None = None,
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
        columns: column map of ``csv`` logs.
        temp_unit: force blank temperature units (``"C"``/``"F"``); default from
            ``settings.replay.temp_unit`` (``auto`` decides per log).
        on_file: called with each file's report once the file is done.

    Returns:
        The sessions, per-file reports and errors (runs whose session failed).

    A log that cannot be read (missing, unknown format, malformed) is reported in
    ``errors`` with its file and line, and the other logs are still replayed.
    """
    if temp_unit is None and settings.replay.temp_unit != "auto":
        temp_unit = settings.replay.temp_unit
    core = Core(grid=settings.grid, tuning=settings.tuning, station=settings.station)
    builder = builder or SessionBuilder.from_settings(settings)
    sessions = SessionStore(settings.data_dir) if store else None
    result = ResultSink(
        result=ReplayResult(), builder=builder, store=sessions, on_session=on_session
    )
    offset = 0.0
    for path in paths:
        p = Path(path)
        t_file = time.perf_counter()
        rep = FileReport(p)
        result.begin_file(rep, core.runs_started, core.outside_runs)
        try:
            offset = _replay_file(p, settings, fmt, columns, temp_unit, speed, core, result,
                                  offset, on_progress)  # fmt: skip
        except InputError as exc:
            # A bad file: what it gave so far is kept, the others are still replayed.
            result.handle(core.stop_run("end_of_log"))
            result.result.errors.append(str(exc))
        rep.runs = core.runs_started - result.file_seq0
        rep.outside_runs = core.outside_runs - result.file_outside0
        rep.seconds = round(time.perf_counter() - t_file, 3)
        result.result.reports.append(rep)
        if on_file is not None:
            on_file(rep)
    result.result.discarded_runs = core.runs_discarded
    if sessions is not None and result.result.sessions:
        t0 = time.perf_counter()
        before = sessions.dataset_session_ids()
        sessions.append_many_to_dataset(result.result.sessions)
        fresh = {s.session_id for s in result.result.sessions} - before
        result.result.already_stored = len(result.result.sessions) - len(fresh)
        result.result.session_s += time.perf_counter() - t0
    return result.result


def _replay_file(
    p: Path,
    settings: Settings,
    fmt: str,
    columns: Mapping[str, str] | None,
    temp_unit: str | None,
    speed: float | None,
    core: Core,
    result: ResultSink,
    offset: float,
    on_progress: Callable[[int], None] | None,
) -> float:
    """Feed one log through the core; returns the time offset it was placed at."""
    rep = result.report
    assert rep is not None
    try:
        reader = open_log(p, settings, fmt, columns=columns, temp_unit=temp_unit, report=rep)
        rep.digest = file_digest(p)
        if rep.capture_utc is None:
            rep.capture_utc = datetime.fromtimestamp(int(p.stat().st_mtime), UTC)
            rep.capture_from = "file modification time"
    except OSError as exc:
        raise InputError(f"cannot read log: {exc.strerror or exc}", path=str(p)) from exc
    result.result.files += 1
    first: float | None = None
    # As fast as possible: the reader parses ahead in its own thread (pyarrow releases the
    # GIL) while this thread runs the core. Paced: no need, the core waits anyway.
    it: Iterable[Frame] = (
        Prefetch(reader, name=f"read:{p.name}") if speed is None else _paced(reader, speed)
    )
    tp = time.perf_counter()
    for frame in it:
        if not len(frame):
            continue
        if first is None:
            first = float(frame.t[0])
            offset = core.last_t + FILE_GAP_S - first if math.isfinite(core.last_t) else 0.0
            result.file_origin = first + offset
            rep.first_t = first
        shifted = Frame(frame.t + offset, frame.columns) if offset else frame
        tc = time.perf_counter()
        result.result.parse_s += tc - tp
        res = core.feed(shifted)
        result.result.core_s += time.perf_counter() - tc
        result.result.rows += len(frame)
        rep.rows += len(frame)
        result.handle(res.events)
        if on_progress is not None:
            on_progress(len(frame))
        tp = time.perf_counter()
    result.handle(core.stop_run("end_of_log"))
    return offset


@dataclass
class ResultSink:
    """Turns core events into stored sessions, with ids derived from the log."""

    result: ReplayResult
    builder: SessionBuilder
    store: object | None
    on_session: Callable[[TuningSession], None] | None
    report: FileReport | None = None
    file_seq0: int = 0
    file_outside0: int = 0
    file_origin: float = 0.0

    def begin_file(self, report: FileReport, seq0: int, outside0: int) -> None:
        """Start attributing runs to the log of ``report``."""
        self.report = report
        self.file_seq0 = seq0
        self.file_outside0 = outside0
        self.file_origin = 0.0

    def _name(self, run: OpenRun) -> None:
        rep = self.report
        if rep is None or rep.capture_utc is None:
            return
        n = run.seq - self.file_seq0
        run.start_utc = rep.capture_utc + timedelta(
            seconds=max(0.0, run.start_t - self.file_origin)
        )
        run.run_id = replay_run_id(run.station, run.start_utc, rep.digest, n)

    def handle(self, events: list[CoreEvent]) -> None:
        """Build, store and report a session for every closed run."""
        for ev in events:
            if isinstance(ev, RunClosed):
                t0 = time.perf_counter()
                run = ev.run
                self._name(run)
                rep = self.report
                if rep is not None:
                    rep.rejected[run.run_id] = dict(run.rejected)
                    rep.run_spans[run.run_id] = (
                        run.start_t - self.file_origin,
                        run.end_t - self.file_origin,
                    )
                try:
                    session = self.builder.build(run)
                    if rep is not None:
                        session.notes = provenance(rep)
                except (ValidationError, InputError, ValueError) as exc:
                    what = format_errors(exc) if isinstance(exc, ValidationError) else str(exc)
                    where = rep.path if rep is not None else "?"
                    self.result.errors.append(f"{where}: run {run.run_id}: {what}")
                    continue
                if isinstance(self.store, SessionStore):
                    # The dataset is written once at the end of the replay.
                    self.result.session_paths.append(self.store.save_session(session))
                self.result.session_s += time.perf_counter() - t0
                self.result.sessions.append(session)
                if rep is not None:
                    rep.sessions.append(session.session_id)
                    rep.run_cells[session.session_id] = cells_learned(session)
                    rep.cells += rep.run_cells[session.session_id]
                if self.on_session is not None:
                    self.on_session(session)
            elif isinstance(ev, RunDiscarded) and self.report is not None:
                self.report.discarded_runs += 1

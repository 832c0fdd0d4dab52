"""The daemon: drivers in, the core in the middle, MQTT and files out, nothing lost.

One :class:`Daemon` owns a station. It starts in the order of docs/architecture.md (config ->
store -> outbox/MQTT -> core -> drivers) inside an ``asyncio.TaskGroup`` of named tasks
and stops in reverse. Drivers put sample batches into a bounded hub queue (live data
drops the oldest batch when full, counted); the core task drains it every ``batch_ms``
into one frame, feeds the core, raises alerts, records raw data, and publishes throttled
live values and cells. Closed runs become sessions in an executor, are stored atomically
and go out through the durable outbox. A run left open by a killed daemon is found in
``raw/`` at start-up and closed as an aborted session.

Faults are survived, never fatal: an exception while handling one batch is logged and
counted (``hub.batch_errors``); a write the disk refuses (ENOSPC, EIO) leaves the data in
memory and is retried (raw rows in the recorder, alerts and sessions in the publisher,
sessions in the store), with health saying ``storage: <error>`` until it clears. No
file, SQLite or bus work runs on the event loop; ``loop_lag_ms_max`` in health is the
worst scheduling delay seen since the previous health message.

Shutdown budget (SIGTERM to exit; systemd's TimeoutStopSec is 15 s): drivers closed
1 s, tasks cancelled 1 s, last batch and open run closed, sessions stored 3 s, MQTT
flushed and disconnected 3.5 s, recorder closed 0.5 s: 9 s at most (:data:`STOP_BUDGET_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from drivers.registry import create_driver
from dynoai_daemon import __version__
from dynoai_daemon.alerts import Alert, AlertEngine, utc_iso
from dynoai_daemon.channels import KNOCK_CHANNELS, Frame, Sample, samples_to_frame
from dynoai_daemon.config import Settings, load_settings, session_context
from dynoai_daemon.core import Core, CoreEvent, FeedResult, RunClosed, RunDiscarded, RunStarted
from dynoai_daemon.core.criterion import cell_suggestion
from dynoai_daemon.errors import StoreError
from dynoai_daemon.logs import read_log
from dynoai_daemon.models import BuildConfiguration, TuningSession
from dynoai_daemon.patterns.session import SessionBuilder
from dynoai_daemon.publish.mqtt import make_publisher
from dynoai_daemon.publish.topics import encode_payload
from dynoai_daemon.service.arbiter import ChannelArbiter
from dynoai_daemon.service.predictions import Predictions
from dynoai_daemon.service.recorder import RawRecorder, orphaned_runs
from dynoai_daemon.service.sdnotify import SdNotifier, watchdog_task
from dynoai_daemon.service.tunepool import TunePool
from dynoai_daemon.store import SessionStore

log = structlog.get_logger("dynoai.daemon")

HUB_MAX_BATCHES = 20_000
LAG_PROBE_S = 0.1
SESSION_RETRY_S = 1.0
#: Worst case from SIGTERM to exit; below systemd/dynoai.service's TimeoutStopSec (15 s).
STOP_BUDGET_S = 9.0


class Publisher(Protocol):
    """What the daemon needs from the MQTT side (see :mod:`dynoai_daemon.publish`)."""

    def publish_durable(self, topic: str, payload: dict[str, Any] | bytes) -> str: ...

    def publish_retained(self, topic: str, payload: dict[str, Any] | None) -> None: ...

    def publish_live(self, topic: str, payload: dict[str, Any]) -> None: ...

    def topic(self, suffix: str) -> str: ...

    async def run(self) -> None: ...

    async def stop(self, flush_timeout: float, *, close_timeout: float = ...) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass
class SourceState:
    """Per-source bookkeeping for health and staleness."""

    name: str
    driver: Any
    last_seen: float | None = None
    samples: int = 0
    online: bool = False
    stale_alerted: bool = False


@dataclass
class HubStats:
    """Counters of the hub between drivers and the core."""

    batches_in: int = 0
    samples_in: int = 0
    dropped_batches: int = 0
    late_samples: int = 0
    shadowed_samples: int = 0
    batch_errors: int = 0
    frames_fed: int = 0
    rows_fed: int = 0
    alerts: int = 0
    sessions: int = 0
    runs_discarded: int = 0
    recovered_runs: int = 0


@dataclass
class Hub:
    """Bounded queue of sample batches with drop-oldest for live telemetry.

    ``event`` is set when anything is queued; ``urgent`` when a batch carries knock
    retard, so the core cuts its micro-batch short and the knock alert leaves at once
    instead of up to ``batch_ms`` later.
    """

    maxsize: int = HUB_MAX_BATCHES
    stats: HubStats = field(default_factory=HubStats)
    queue: asyncio.Queue[list[Sample]] = field(init=False)
    event: asyncio.Event = field(init=False)
    urgent: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.maxsize)
        self.event = asyncio.Event()
        self.urgent = asyncio.Event()

    def put(self, batch: list[Sample]) -> None:
        """Add a batch, dropping the oldest queued batch when full."""
        while True:
            try:
                self.queue.put_nowait(batch)
                break
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.queue.get_nowait()
                    self.stats.dropped_batches += 1
        self.stats.batches_in += 1
        self.stats.samples_in += len(batch)
        self.event.set()
        if not self.urgent.is_set() and any(
            s.value > 0 and s.channel in KNOCK_CHANNELS for s in batch
        ):
            self.urgent.set()

    def drain(self) -> list[Sample]:
        """Take everything queued now."""
        out: list[Sample] = []
        q = self.queue
        while True:
            try:
                out.extend(q.get_nowait())
            except asyncio.QueueEmpty:
                break
        self.event.clear()
        self.urgent.clear()
        return out


async def _bounded(aw: Any, seconds: float, what: str) -> None:
    """Await ``aw`` for at most ``seconds``; log (never raise) a failure or time-out."""
    try:
        async with asyncio.timeout(seconds):
            await aw
    except TimeoutError:
        log.warning("shutdown step timed out", step=what, seconds=seconds)
    except Exception as exc:
        log.warning("shutdown step failed", step=what, error=repr(exc))


def _log_stuck(tasks: set[asyncio.Task[Any]]) -> None:
    """Name the tasks that ignored cancellation (a bug: the TaskGroup would wait forever)."""
    for t in tasks:
        log.error("task did not stop when cancelled", task=t.get_name(), where=_where(t))


def _where(t: asyncio.Task[Any]) -> list[str]:
    """Where a task waits: up to 8 ``file:line`` frames."""
    return [f"{f.f_code.co_filename}:{f.f_lineno}" for f in t.get_stack(limit=8)]


async def _cancel_hard(task: asyncio.Task[Any], tries: int = 5, wait_s: float = 1.0) -> None:
    """Cancel ``task`` and wait for it, cancelling again if a library swallowed the cancel
    (3.11's ``wait_for`` can), so the enclosing TaskGroup never waits forever."""
    for _ in range(tries):
        task.cancel()
        await asyncio.wait([task], timeout=wait_s)
        if task.done():
            return
        _log_stuck({task})


def dump_tasks() -> None:
    """SIGUSR1: log every asyncio task and where it waits (to diagnose a hang)."""
    for t in asyncio.all_tasks():
        log.warning("task", task=t.get_name(), done=t.done(), where=_where(t))


def _encode_session(session: TuningSession) -> bytes:
    """The session's MQTT payload (CPU work: call it in a thread)."""
    return encode_payload(session.model_dump(mode="json"))


def _finite(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None


class Daemon:
    """One station's daemon.

    Args:
        settings: the validated configuration.
        config_path: the file it came from (re-read on SIGHUP).
        publisher: MQTT side; None builds one from ``settings.mqtt`` (or none when
            MQTT is disabled).
        drivers: prebuilt drivers by source name (tests, simulator); None builds them
            from ``settings.sources`` through the driver registry.
        clock: monotonic clock shared with the drivers.
        on_alert / on_session: extra callbacks (the ``simulate`` console uses them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: str | None = None,
        publisher: Publisher | None = None,
        drivers: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_alert: Callable[[Alert], None] | None = None,
        on_session: Callable[[TuningSession], None] | None = None,
        on_event: Callable[[CoreEvent], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock
        self.on_alert = on_alert
        self.on_session = on_session
        self.on_event = on_event
        self.data_dir = Path(settings.data_dir)
        self._publisher = publisher
        self._prebuilt = drivers
        self.sources: dict[str, SourceState] = {}
        self.hub = Hub()
        self.core = Core(grid=settings.grid, tuning=settings.tuning, station=settings.station)
        self.alerts = AlertEngine(settings.alerts, station=settings.station)
        self.builder = SessionBuilder.from_settings(settings)
        self.recorder = RawRecorder(self.data_dir / "raw")
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._sessions_q: asyncio.Queue[RunClosed | None] = asyncio.Queue()
        self._sessions_idle = asyncio.Event()
        self._sessions_idle.set()
        self._latest: dict[str, float] = {}
        self._last_live = 0.0
        self._last_cells = 0.0
        self._cells_seen: np.ndarray | None = None
        self._loop_beat = time.monotonic()
        self._t_last_fed = -math.inf
        self.arbiter = ChannelArbiter(())
        self._since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.store: Any = None
        self.tune_pool: TunePool = TunePool(
            self.data_dir, settings.tuning, SessionStore(self.data_dir)
        )
        self.predictions = Predictions(self.data_dir / "models")
        self._predict_tasks: set[asyncio.Task[Any]] = set()
        self._lag_max = 0.0
        self.session_storage_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> asyncio.Event:
        """Set once every task has started (READY was sent)."""
        return self._ready

    def request_stop(self) -> None:
        """Ask the daemon to stop (signal handlers call this)."""
        self._stop.set()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        # The first SIGTERM/SIGINT stops cleanly (bounded, STOP_BUDGET_S); a second one
        # means the operator will not wait: leave now (the outbox and the raw file are
        # already on disk; the open run is recovered at the next start).
        if self._stop.is_set():
            log.warning("second stop signal: exiting now", signal=sig.name)
            os._exit(128 + int(sig))
        log.info("stop signal", signal=sig.name)
        self.request_stop()

    def healthy(self) -> bool:
        """True while the core loop keeps turning (gates the systemd watchdog)."""
        return time.monotonic() - self._loop_beat < max(2.0, 10 * self.settings.batch_ms / 1000)

    async def run(self) -> None:
        """Run until :meth:`request_stop`; closes the open run into a session on the way out."""
        notifier = SdNotifier()
        self.store = SessionStore(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tune_pool = TunePool(self.data_dir, self.settings.tuning, self.store)
        self.tune_pool.load()
        self.tune_pool.set_build(self.builder.build_config)
        self.tune_pool.set_base_tune(self.settings.tune.base or None)
        pub = self._publisher or self._make_publisher()
        self._publisher = pub
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig, handler in (
            (signal.SIGTERM, functools.partial(self._on_stop_signal, signal.SIGTERM)),
            (signal.SIGINT, functools.partial(self._on_stop_signal, signal.SIGINT)),
            (signal.SIGHUP, self.reload),
            (signal.SIGUSR1, dump_tasks),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
        try:
            async with asyncio.TaskGroup() as tg:
                mqtt_task = tg.create_task(pub.run(), name="mqtt") if pub is not None else None
                sessions_task = tg.create_task(self._sessions_loop(), name="sessions")
                await self._publish_tune()
                # Listed now (a cheap glob), read in a thread after READY: a big orphaned
                # file neither delays start-up nor stalls the loop.
                orphans = orphaned_runs(self.data_dir)
                core_task = tg.create_task(self._core_loop(), name="core")
                drivers = self._build_drivers()
                driver_tasks = [
                    tg.create_task(self._driver_loop(st), name=f"driver:{name}")
                    for name, st in drivers.items()
                ]
                health_task = tg.create_task(self._health_loop(), name="health")
                lag_task = tg.create_task(self._lag_loop(), name="loop-lag")
                wd_task = tg.create_task(watchdog_task(notifier, self.healthy), name="watchdog")
                if self.builder.build_config is not None:
                    self._schedule_predictions(self.builder.build_config)
                recover_task = tg.create_task(self._recover_orphans(orphans), name="recover")
                notifier.ready(f"station {self.settings.station}: {len(drivers)} source(s)")
                self._ready.set()
                log.info("daemon started", station=self.settings.station, sources=list(drivers))
                await self._stop.wait()
                notifier.stopping()
                log.info("daemon stopping", station=self.settings.station)
                # Reverse order: drivers, then core (flush the last samples), sessions, MQTT.
                # Every step is bounded (STOP_BUDGET_S in all, see the module docstring).
                await asyncio.wait(
                    [
                        asyncio.ensure_future(_bounded(st.driver.close(), 1.0, f"close {n}"))
                        for n, st in drivers.items()
                    ]
                    or [asyncio.ensure_future(asyncio.sleep(0))]
                )
                stoppable = [*driver_tasks, health_task, lag_task, wd_task, core_task, recover_task]
                for t in stoppable:
                    t.cancel()
                _, stuck = await asyncio.wait(stoppable, timeout=1.0)
                _log_stuck(stuck)
                self._safely(lambda: self._process(self.hub.drain()), "last batch")
                self._safely(
                    lambda: self._handle_events(self.core.stop_run("shutdown")), "closing run"
                )
                self.recorder.stop()
                self._sessions_q.put_nowait(None)
                await asyncio.wait([sessions_task], timeout=3.0)
                sessions_task.cancel()
                for t in self._predict_tasks:
                    t.cancel()
                if self._predict_tasks:
                    await asyncio.wait(self._predict_tasks, timeout=2.0)
                if pub is not None and mqtt_task is not None:
                    self._publish_retained(pub, "run/current", None)
                    await _bounded(pub.stop(flush_timeout=2.0, close_timeout=1.0), 3.0, "mqtt")
                    await _cancel_hard(mqtt_task, tries=1, wait_s=0.5)
        finally:
            for sig in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await asyncio.to_thread(self.recorder.close, 0.5)

    def reload(self) -> None:
        """SIGHUP: re-read alert thresholds and the build from the config file."""
        if not self.config_path:
            log.info("reload ignored: no config file")
            return
        try:
            new = load_settings(self.config_path)
        except Exception as exc:  # keep running on a bad edit
            log.error("reload failed", error=str(exc))
            return
        self.alerts.reload(new.alerts)
        ctx = session_context(new)
        if ctx.build is not None:
            self.builder.build_config = ctx.build
        self.builder.conditions = ctx.conditions or self.builder.conditions
        log.info("reloaded alert thresholds and build", config=self.config_path)

    # ------------------------------------------------------------------ parts

    def _make_publisher(self) -> Publisher | None:
        if not self.settings.mqtt.enabled:
            return None
        return make_publisher(self.settings, on_request=self._on_request)

    def _build_drivers(self) -> dict[str, SourceState]:
        built: dict[str, Any] = dict(self._prebuilt or {})
        if self._prebuilt is None:
            for src in self.settings.sources:
                if not src.enabled:
                    continue
                built[src.name] = create_driver(
                    src.driver,
                    source=src.name,
                    on_availability=self._on_availability,
                    clock=self.clock,
                    **src.options(),
                )
        else:
            for d in built.values():
                if getattr(d, "on_availability", None) is None:
                    d.on_availability = self._on_availability
        self.sources = {name: SourceState(name, d) for name, d in built.items()}
        # A channel two sources report is taken from the one listed first (arbiter.py).
        self.arbiter = ChannelArbiter(self.sources)
        return self.sources

    def _on_availability(self, source: str, online: bool, reason: str) -> None:
        st = self.sources.get(source)
        if st is not None:
            st.online = online
        link = getattr(st.driver, "link", "") if st is not None else ""
        if online or reason == "closed":
            log.info("source availability", source=source, link=link, online=online,
                     reason=reason)  # fmt: skip
        else:
            # The first failure and every change of reason (drivers/base.py): never silent.
            log.warning("source unavailable", source=source, link=link, reason=reason)
        pub = self._publisher
        if pub is not None:
            self._publish_retained(
                pub,
                f"source/{source}/availability",
                {"state": "online" if online else "offline", "reason": reason},
            )

    async def _driver_loop(self, st: SourceState) -> None:
        d = st.driver
        try:
            await d.open()
            async for batch in d.samples():
                st.last_seen = self.clock()
                st.samples += len(batch)
                st.stale_alerted = False
                self.hub.put(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("source failed", source=st.name, error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                await d.close()

    async def _core_loop(self) -> None:
        period = self.settings.batch_ms / 1000.0
        while True:
            self._loop_beat = time.monotonic()
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns the result when the
            # event fires in the same iteration as a cancel, swallowing the cancel, and the
            # TaskGroup then waits for this loop forever (seen as a hung SIGTERM).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.hub.event.wait()
            # Micro-batch: gather what arrives within one batch period, unless knock
            # arrives (then process now: the alert is latency-bound).
            if not self.hub.urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(period):
                        await self.hub.urgent.wait()
            self._safely(lambda: self._process(self.hub.drain()), "batch")
            self._safely(self._check_stale, "stale check")

    def _safely(self, fn: Callable[[], object], what: str) -> None:
        """Run ``fn``; an exception is logged and counted, never the end of the daemon."""
        try:
            fn()
        except Exception as exc:
            self.hub.stats.batch_errors += 1
            log.exception("error while handling data", step=what, error=repr(exc))

    async def _lag_loop(self) -> None:
        """Measure how late the loop wakes a sleeper: the blocking work it suffers."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            lag = loop.time() - t0 - LAG_PROBE_S
            if lag > self._lag_max:
                self._lag_max = lag

    def _process(self, samples: list[Sample]) -> FeedResult | None:
        if not samples:
            return None
        # The core needs non-decreasing time: a sample stamped before what was already fed
        # (a late queue, a clock-aligned device time) is moved up and counted.
        # A channel several sources report comes from one of them (arbiter.py).
        last = self._t_last_fed
        fixed: list[Sample] = []
        late = 0
        admit = self.arbiter.admit
        for s in samples:
            if not admit(s):
                continue
            if s.t < last:
                late += 1
                fixed.append(Sample(last, s.channel, s.value, s.source, s.device_t))
            else:
                fixed.append(s)
        self.hub.stats.late_samples += late
        self.hub.stats.shadowed_samples = self.arbiter.shadowed
        if not fixed:
            return None
        frame = samples_to_frame(fixed)
        return self._feed(frame)

    def _feed(self, frame: Frame) -> FeedResult:
        res = self.core.feed(frame)
        self._t_last_fed = float(frame.t[-1])
        self.hub.stats.frames_fed += 1
        self.hub.stats.rows_fed += len(frame)
        for name, col in frame.columns.items():
            ok = col[~np.isnan(col)]
            if ok.size:
                self._latest[name] = float(ok[-1])
        # Recorder before events, so a run's file exists when it starts.
        started = [e for e in res.events if isinstance(e, RunStarted)]
        if started and self.recorder.run_id is None:
            self.recorder.start(started[-1].run_id)
        self.recorder.write(frame)
        self._handle_events(res.events)
        for alert in self.alerts.evaluate(res, self.core):
            self._send_alert(alert)
        self._publish_live(res)
        return res

    def _handle_events(self, events: list[CoreEvent]) -> None:
        pub = self._publisher
        for ev in events:
            if self.on_event is not None:
                self.on_event(ev)
            if isinstance(ev, RunStarted):
                if self.recorder.run_id != ev.run_id:
                    self.recorder.start(ev.run_id)
                log.info("run started", run=ev.run_id)
                if pub is not None:
                    self._publish_retained(
                        pub,
                        "run/current",
                        {"run_id": ev.run_id, "start_s": ev.t, "cells_covered": 0},
                    )
                self._cells_seen = None
            elif isinstance(ev, RunClosed):
                self.recorder.stop()
                self._sessions_idle.clear()
                self._sessions_q.put_nowait(ev)
                if pub is not None:
                    self._publish_retained(pub, "run/current", None)
            elif isinstance(ev, RunDiscarded):
                self.recorder.discard(ev.run_id)
                self.hub.stats.runs_discarded += 1
                log.info("run discarded", run=ev.run_id, duration_s=round(ev.duration_s, 2))
                if pub is not None:
                    self._publish_retained(pub, "run/current", None)

    async def _sessions_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ev = await self._sessions_q.get()
            if ev is None:
                self._sessions_idle.set()
                return
            try:
                session = await loop.run_in_executor(None, self.builder.build, ev.run)
                self.tune_pool.attach_tables(session)
            except Exception as exc:
                log.exception("session failed", run=ev.run.run_id, error=repr(exc))
                self.hub.stats.batch_errors += 1
            else:
                await self._store_until_done(session)
                try:  # a whole session is large: encoded off the loop
                    body = await asyncio.to_thread(_encode_session, session)
                except Exception as exc:
                    log.exception("session not encoded", run=session.session_id, error=repr(exc))
                    self.hub.stats.batch_errors += 1
                    body = None
                self._safely(
                    functools.partial(self._publish_session, session, body), "publish session"
                )
                if self.tune_pool.add(session):
                    await self._publish_tune()
                if self.settings.report.auto:  # [report] auto: sessions/<id>.html
                    try:
                        await loop.run_in_executor(None, self._write_report, session)
                    except Exception as exc:
                        log.error("report failed", run=session.session_id, error=repr(exc))
            if self._sessions_q.empty():
                self._sessions_idle.set()

    async def _store_until_done(self, session: TuningSession) -> None:
        """Store a session, retrying while the disk refuses (the session waits in memory)."""
        while True:
            try:
                await asyncio.to_thread(self._store_session, session)
            except StoreError as exc:
                if self.session_storage_error != str(exc):
                    log.error("session not stored; retrying", run=session.session_id,
                              error=str(exc))  # fmt: skip
                self.session_storage_error = str(exc)
                await asyncio.sleep(SESSION_RETRY_S)
                continue
            if self.session_storage_error is not None:
                log.info("session store writable again", run=session.session_id)
            self.session_storage_error = None
            return

    def _store_session(self, session: TuningSession) -> None:
        self.store.save_session(session)
        self.store.append_to_dataset(session)  # a session id already there is not re-added

    def _write_report(self, session: TuningSession) -> None:
        from dynoai_daemon.report import build_report  # matplotlib: only when enabled

        path = self.store.session_path(session.session_id)
        built = build_report(
            [path], path.with_suffix(".html"), self.settings, data_dir=self.data_dir
        )
        log.info("report written", run=session.session_id, path=str(built.path), bytes=built.size)

    def _publish_session(self, session: TuningSession, body: bytes | None = None) -> None:
        self.hub.stats.sessions += 1
        log.info(
            "session stored",
            run=session.session_id,
            aborted=session.aborted,
            peak_hp=session.peak_hp,
            max_afr_delta=session.max_cylinder_afr_delta,
        )
        if self.on_session is not None:
            self.on_session(session)
        pub = self._publisher
        if pub is None:
            return
        if body is None:
            body = _encode_session(session)
        pub.publish_durable(pub.topic(f"session/{session.session_id}"), body)
        summary = {
            "session_id": session.session_id,
            "timestamp_utc": session.timestamp_utc,
            "aborted": session.aborted,
            "peak_hp": session.peak_hp,
            "peak_torque": session.peak_torque,
            "max_cylinder_afr_delta": session.max_cylinder_afr_delta,
            "afr_accuracy_rms_error": session.afr_accuracy_rms_error,
            "pattern_counts": {k: len(v) for k, v in session.patterns.model_dump().items()},
        }
        pub.publish_durable(pub.topic("session/last"), summary, retain=True)  # type: ignore[call-arg]

    async def _publish_tune(self) -> None:
        """Publish the pooled correction of the current build (retained ``tune/current``)."""
        pub = self._publisher
        if pub is None:
            return
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(None, self.tune_pool.payload)
        except Exception as exc:  # a pooling fault must never stop the sessions loop
            log.error("tune pool failed", error=repr(exc))
            return
        self._publish_retained(pub, "tune/current", body)

    async def wait_sessions_idle(self) -> None:
        """Wait until every closed run has become a stored session."""
        await self._sessions_idle.wait()

    def _send_alert(self, alert: Alert) -> None:
        self.hub.stats.alerts += 1
        log.warning(
            "alert",
            id=alert.id,
            kind=alert.kind,
            cylinder=alert.cylinder,
            rpm=alert.rpm,
            map_kpa=alert.map_kpa,
            value=alert.value,
            run=alert.run_id,
            message=alert.message,
        )
        if self.on_alert is not None:
            self.on_alert(alert)
        pub = self._publisher
        if pub is not None:
            pub.publish_durable(pub.topic(f"alert/{alert.kind}"), alert.payload())

    def _publish_live(self, res: FeedResult) -> None:
        pub = self._publisher
        if pub is None:
            return
        now = time.monotonic()
        if now - self._last_live >= 1.0 / self.settings.live_max_hz:
            self._last_live = now
            cell = None
            rpm, kpa = self._latest.get("rpm"), self._latest.get("map_kpa")
            if rpm is not None and kpa is not None:
                idx, ok = self.core.grid.nearest(np.array([rpm]), np.array([kpa]))
                if ok[0]:
                    i, j = self.core.grid.cell_of(int(idx[0]))
                    cell = {
                        "rpm_index": i,
                        "map_index": j,
                        "rpm": self.core.grid.rpm_axis[i].item(),
                        "map_kpa": self.core.grid.map_axis[j].item(),
                    }
            run = self.core.run
            pub.publish_live(
                pub.topic("live"),
                {
                    "t": _finite(self._t_last_fed),
                    "run_t": _finite(self._t_last_fed - run.start_t) if run else None,
                    "ts": utc_iso(),
                    "values": {k: _finite(v) for k, v in self._latest.items()},
                    "cell": cell,
                    "run_id": run.run_id if run else None,
                },
            )
        if now - self._last_cells >= 1.0 / self.settings.cells_max_hz:
            self._last_cells = now
            self._publish_cells(pub)

    def _publish_cells(self, pub: Publisher) -> None:
        run = self.core.run
        if run is None:
            return
        w = run.front.weight + run.rear.weight
        prev = self._cells_seen
        changed = np.flatnonzero(w != (prev if prev is not None else 0))
        self._cells_seen = w.copy()
        if changed.size == 0:
            return
        grid = self.core.grid
        tuning = self.settings.tuning
        sug = {
            cyl: cell_suggestion(
                s.weight,
                s.weight_sq,
                s.ratio_mean,
                s.ratio_m2,
                min_weight=tuning.min_weight,
                max_ci_pct=tuning.max_ci_pct,
                max_correction_pct=tuning.max_correction_pct,
            )
            for cyl in ("front", "rear")
            for s in (run.cylinder(cyl),)
        }
        cells = []
        for flat in changed.tolist():
            i, j = grid.cell_of(flat)
            entry: dict[str, Any] = {
                "rpm_index": i,
                "map_index": j,
                "rpm": grid.rpm_axis[i].item(),
                "map_kpa": grid.map_axis[j].item(),
            }
            for cyl in ("front", "rear"):
                s = run.cylinder(cyl)
                wt = float(s.weight[flat])
                c = sug[cyl]
                ci = float(c.ci_pct[flat])
                entry[cyl] = {
                    "weight": round(wt, 3),
                    "afr_mean": round(float(s.afr_sum[flat]) / wt, 3) if wt > 0 else None,
                    "ve_correction_pct": (
                        round(float(c.pct[flat]), 3) if bool(c.sound[flat]) else None
                    ),
                    "ve_correction_ci_pct": round(ci, 3) if math.isfinite(ci) else None,
                    "clamped": bool(c.clamped[flat]),
                    "knock_count": int(s.knock_count[flat]),
                }
            cells.append(entry)
        pub.publish_live(
            pub.topic(f"run/{run.run_id}/cells"), {"run_id": run.run_id, "cells": cells}
        )
        covered = int(np.count_nonzero(sug["front"].sound | sug["rear"].sound))
        self._publish_retained(
            pub,
            "run/current",
            {"run_id": run.run_id, "start_s": run.start_t, "cells_covered": covered},
        )

    def _schedule_predictions(self, build: BuildConfiguration) -> None:
        """Publish the models' predictions for ``build`` (retained) in the background."""
        if self._publisher is None:
            return
        task = asyncio.create_task(
            self.predictions.publish(self._publisher, build.model_dump(mode="json")),
            name="predictions",
        )
        self._predict_tasks.add(task)
        task.add_done_callback(self._predict_tasks.discard)

    def _publish_retained(
        self, pub: Publisher, suffix: str, payload: dict[str, Any] | None
    ) -> None:
        pub.publish_retained(pub.topic(suffix), payload)

    def _check_stale(self) -> None:
        now = self.clock()
        for st in self.sources.values():
            if st.last_seen is None or st.stale_alerted:
                continue
            age = now - st.last_seen
            if age > self.alerts.config.source_stale_s:
                st.stale_alerted = True
                run = self.core.run
                alert = self.alerts.source_stale(
                    st.name, age, self._t_last_fed, run.run_id if run else None
                )
                if alert is not None:
                    self._send_alert(alert)

    def health(self) -> dict[str, Any]:
        """The health payload: per source, hub, core, outbox."""
        now = self.clock()
        sources = {}
        for name, st in self.sources.items():
            stats = getattr(st.driver, "stats", None)
            d = stats.as_dict() if stats is not None else {}
            d.update(
                link=getattr(st.driver, "link", ""),
                online=st.online,
                samples=st.samples,
                last_seen_age_s=None if st.last_seen is None else round(now - st.last_seen, 3),
            )
            d.pop("last_seen", None)
            sources[name] = d
        hub = self.hub.stats
        out: dict[str, Any] = {
            "station": self.settings.station,
            "version": __version__,
            "sources": sources,
            "hub": {**hub.__dict__, "queue_depth": self.hub.queue.qsize()},
            "core": {
                "rows": self.core.rows_seen,
                "runs_started": self.core.runs_started,
                "runs_discarded": self.core.runs_discarded,
                "run_open": self.core.run.run_id if self.core.run else None,
            },
            "alerts": dict(self.alerts.counts),
            "sessions_pending": self._sessions_q.qsize(),
            "storage": self.storage_status(),
            "loop_lag_ms_max": round(self._lag_max * 1000.0, 1),
            "raw": {
                "rows_written": self.recorder.rows_written,
                "backlog_rows": self.recorder.backlog_rows,
                "dropped_rows": self.recorder.dropped_rows,
            },
        }
        if self._publisher is not None:
            out["mqtt"] = self._publisher.stats()
        return out

    def storage_status(self) -> str:
        """``ok``, or the first storage error that has not cleared yet."""
        pub_err = getattr(self._publisher, "storage_error", None)
        for err in (self.recorder.error, self.session_storage_error, pub_err):
            if err:
                return str(err)
        return "ok"

    def _publish_health(self, pub: Publisher) -> None:
        self._publish_retained(pub, "health", self.health())

    async def _health_loop(self) -> None:
        while True:
            pub = self._publisher
            if pub is not None:
                self._safely(functools.partial(self._publish_health, pub), "health")
                self._lag_max = 0.0  # the maximum over each health period
            await asyncio.sleep(self.settings.health_interval_s)

    async def _recover_orphans(self, paths: list[Path]) -> None:
        """Close runs a killed daemon left in raw/ as aborted sessions (read in a thread)."""
        for path in paths:
            if path.stem == self.recorder.run_id:
                continue
            try:
                ev = await asyncio.to_thread(self._recover_one, path)
            except Exception as exc:
                log.error("could not recover run", path=str(path), error=repr(exc))
                continue
            if ev is None:
                log.warning("empty raw file left as is", path=str(path))
                continue
            self.hub.stats.recovered_runs += 1
            self._sessions_idle.clear()
            await self._sessions_q.put(ev)
            log.warning("recovered interrupted run", run=path.stem)

    def _recover_one(self, path: Path) -> RunClosed | None:
        core = Core(grid=self.settings.grid, tuning=self.settings.tuning,
                    station=self.settings.station)  # fmt: skip
        started = False
        for frame in read_log(path, format="canonical"):
            if not len(frame):
                continue
            if not started:
                core.feed(frame.slice(0, 1))
                core.start_run(run_id=path.stem, t=float(frame.t[0]))
                started = True
                frame = frame.slice(1, len(frame))
            core.feed(frame)
        if not started:
            return None
        for ev in core.stop_run("recovered", aborted=True):
            if isinstance(ev, RunClosed):
                return ev
        return None

    async def _on_request(self, cmd: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Handle a validated MQTT command; returns the ``data`` of the response."""
        if cmd == "ping":
            return {"pong": True, "station": self.settings.station, "version": __version__}
        if cmd == "run/start":
            self._handle_events(self.core.start_run())
            run = self.core.run
            return {"run_id": run.run_id if run else None}
        if cmd == "run/stop":
            run = self.core.run
            self._handle_events(self.core.stop_run("operator"))
            return {"run_id": run.run_id if run else None, "stopped": run is not None}
        if cmd == "build/set":
            build = BuildConfiguration.model_validate(body.get("build", body))
            self.builder.build_config = build  # also restarts its peak-power history
            self._schedule_predictions(build)
            new_pool = self.tune_pool.set_build(build)
            if body.get("tune"):
                new_pool = self.tune_pool.set_base_tune(str(body["tune"])) or new_pool
            if new_pool:
                await self._publish_tune()
            return {"build": build.model_dump(mode="json"), "tune_pool": self.tune_pool.build_id}
        if cmd == "tune/reset":
            self.tune_pool.reset("operator")
            await self._publish_tune()
            return {"reset": True, "build_id": self.tune_pool.build_id}
        raise ValueError(f"unknown command {cmd}")

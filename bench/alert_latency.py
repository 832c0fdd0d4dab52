"""Benchmark: knock alert latency of the real daemon, CAN frame on the bus -> MQTT alert.

Starts its own mosquitto on a free loopback port and ``dynoai run --config`` as a separate
process (so this script's load does not share the daemon's core), with one source: the
MegaSquirt broadcast over python-can's ``udp_multicast`` interface (the only CAN transport
that crosses processes here: no kernel CAN). A sender paces ``--rate`` frames/s (default
10,000) of MegaSquirt broadcast frames (groups 0-4, 6, 7 and 52 with knock retard 0, a
steady hold at 3000 rpm, 80 kPa, TPS 40 with a little wobble) in bursts per 1 ms tick, and
every 200-500 ms (random) puts one group-52 frame with knock retard > 0 on the bus. Each
injection carries a distinct retard (1.0..24.9 deg, cycling), so every alert is matched to
the frame that caused it. ``alerts.alert_repeat_s`` (0.1 s) is below the shortest injection
interval, so the AlertEngine (rate-limited per kind, cylinder and cell) lets each through.

An aiomqtt subscriber in this process stamps each ``dynoai/<station>/alert/knock`` with
``time.perf_counter()`` on arrival; latency = arrival - the stamp taken just before the
knock frame's ``bus.send``. The sender runs in a child process: as a thread here it held
the GIL often enough to delay this script's own arrival stamps by up to ~35 ms (found with
``--c-sub``). ``perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for all processes.
Prints n, p50, p90, p99, max against the target (p99 <= 20 ms), the background rate
achieved, the frames the daemon decoded (udp_multicast drops under load), the daemon's CPU
and the machine's load; then splits each latency at the daemon's log line of the alert
(ingest + micro-batch + core before it; outbox + MQTT after it) and, with ``--c-sub``, at
a ``mosquitto_sub`` arrival stamp (a C subscriber: what this script's own client adds).

If udp_multicast does not deliver on this host (or with ``--in-process``) the daemon runs
inside this process on a python-can ``virtual`` bus with the sender as a thread, and the
output says so: sender, subscriber and daemon then share one interpreter and its GIL.

Run: .venv/bin/python bench/alert_latency.py [--seconds 90] [--rate 10000] [--quick]
     [--batch-ms MS] [--c-sub] [--hist] [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt
import can

from drivers import megasquirt
from drivers.can_base import frame_to_message
from simulators.ports import free_port
from tests.mosquitto import MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]
CAN_GROUP = "239.74.163.2"
TARGET_P99_MS = 20.0
BACKGROUND_GROUPS = (0, 1, 2, 3, 4, 6, 7, 52)


def _groups_passing_filters() -> list[int]:
    """The background groups the daemon's megasquirt driver (default map) receives."""
    from drivers.can_base import filters_match

    flt = megasquirt.MegasquirtDriver(source="ecu", interface="virtual", channel="x").can_filters()
    return [
        g for g in BACKGROUND_GROUPS if filters_match(flt, megasquirt.encode_group(g, {})[0], False)
    ]


CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------- shared helpers
# (bench/daemon_load.py imports these)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string here
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = (f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(data: Mapping[str, Any]) -> str:
    """Render a config dict: scalars, one level of tables, arrays of tables (sources)."""
    head: list[str] = []
    tail: list[str] = []
    for key, v in data.items():
        if isinstance(v, Mapping):
            tail += ["", f"[{key}]"] + [f"{k} = {_toml_value(x)}" for k, x in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for item in v:
                tail += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(x)}" for k, x in item.items()]
        else:
            head.append(f"{key} = {_toml_value(v)}")
    return "\n".join(head + tail) + "\n"


def multicast_can_problem(group: str, port: int) -> str | None:
    """None if two udp_multicast buses in this process see each other's frames, else why."""
    try:
        rx = can.Bus(interface="udp_multicast", channel=group, port=port)
    except Exception as exc:
        return f"cannot open udp_multicast: {exc}"
    try:
        tx = can.Bus(interface="udp_multicast", channel=group, port=port)
    except Exception as exc:
        rx.shutdown()
        return f"cannot open udp_multicast: {exc}"
    try:
        for i in range(20):
            tx.send(can.Message(arbitration_id=0x7F0, data=bytes([i]), is_extended_id=False))
        got = 0
        deadline = time.monotonic() + 2.0
        while got < 20 and time.monotonic() < deadline:
            if rx.recv(0.2) is not None:
                got += 1
        return None if got >= 18 else f"udp_multicast delivered {got} of 20 probe frames"
    finally:
        tx.shutdown()
        rx.shutdown()


def wall_minus_perf() -> float:
    """``time.time() - time.perf_counter()``, from the tightest of a few readings."""
    best = (math.inf, 0.0)
    for _ in range(20):
        a = time.perf_counter()
        w = time.time()
        b = time.perf_counter()
        best = min(best, (b - a, w - (a + b) / 2))
    return best[1]


def log_time(ev: Mapping[str, Any]) -> float | None:
    """Unix time of a daemon log event (structlog's ISO ``timestamp``), None if absent."""
    ts = ev.get("timestamp")
    if not isinstance(ts, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return None


def loadavg() -> str:
    """The 1/5/15-minute load averages (what ``uptime`` prints), and the core count."""
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} cores"


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of an ascending list."""
    if not sorted_vals:
        return math.nan
    k = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (MiB), from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * PAGE_KB / 1024.0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                out += [int(x) for x in fh.read().split()]
    return out


def python_pid_under(pid: int, within: float = 10.0) -> int:
    """``pid`` itself if it runs Python, else its first Python descendant (behind a prefix
    such as ``py-spy record --``); waits up to ``within`` seconds for it to appear."""
    deadline = time.monotonic() + within
    while True:
        todo = [pid]
        while todo:
            p = todo.pop(0)
            with contextlib.suppress(OSError):
                with open(f"/proc/{p}/cmdline", "rb") as fh:
                    argv0 = fh.read().split(b"\0", 1)[0]
                if Path(argv0.decode(errors="replace")).name.startswith("python"):
                    return p
            todo += _children(p)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Python process under pid {pid}")
        time.sleep(0.05)  # the prefix has not started the daemon yet


class DaemonProcess:
    """``python -m dynoai_daemon.cli.main run --config FILE`` as a child, logging to a file.

    It gets its own session, so a Ctrl-C in the terminal reaches this script first and
    :meth:`stop` ends the daemon the way systemd does (SIGTERM, SIGKILL after a grace).
    """

    def __init__(self, config: Path, log_path: Path, *, log_level: str = "info") -> None:
        self.config = config
        self.log_path = log_path
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        #: The daemon's own pid when a prefix (a profiler) runs it: SIGTERM goes there.
        self.target_pid: int | None = None

    def argv(self) -> list[str]:
        """The daemon's command line."""
        entry = ["-m", "dynoai_daemon.cli.main"]
        return [
            sys.executable, *entry, "run",
            "--config", str(self.config), "--log-level", self.log_level,
        ]  # fmt: skip

    def start(self, argv_prefix: list[str] | None = None) -> None:
        """Start it (``argv_prefix``, e.g. a profiler, goes in front of the command)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNOAI_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [*(argv_prefix or []), *self.argv()],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The child's pid (the daemon's own when no prefix was used)."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """True while it runs."""
        return self.proc is not None and self.proc.poll() is None

    def events(self, name: str | None = None) -> Iterator[dict[str, Any]]:
        """The JSON log events so far (only those named ``name`` if given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict) and (name is None or ev.get("event") == name):
                    yield ev

    def tail(self, n: int = 30) -> str:
        """The last ``n`` log lines (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.target_pid or proc.pid, signal.SIGTERM)
            try:
                return proc.wait(grace)
            except subprocess.TimeoutExpired:
                if self.target_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.target_pid, signal.SIGKILL)
                proc.kill()
        return proc.wait()


def sigterm_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C, so the cleanup in ``finally`` runs for both."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@dataclass
class MqttWatch:
    """A subscriber for the station's alerts, health and source availability.

    ``on_alert(kind, payload, t_arrival)`` is called for every alert, with
    ``time.perf_counter()`` taken as soon as the message reaches this process's loop.
    """

    port: int
    station: str
    on_alert: Callable[[str, dict[str, Any], float], None] | None = None
    health: dict[str, Any] | None = None
    health_t: float = 0.0
    health_seen: asyncio.Event = field(default_factory=asyncio.Event)
    availability: dict[str, str] = field(default_factory=dict)
    alerts_by_kind: dict[str, int] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttWatch:
        self._task = asyncio.create_task(self._run(), name="bench-subscriber")
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    async def _run(self) -> None:
        base = f"dynoai/{self.station}"
        async with aiomqtt.Client(
            "127.0.0.1", self.port, identifier=f"bench-{uuid.uuid4().hex[:10]}"
        ) as client:
            await client.subscribe(f"{base}/alert/#", qos=1)
            await client.subscribe(f"{base}/health", qos=0)
            await client.subscribe(f"{base}/source/+/availability", qos=1)
            self.connected.set()
            async for m in client.messages:
                t = time.perf_counter()
                topic = m.topic.value
                raw = m.payload
                if not isinstance(raw, bytes | bytearray) or not raw:
                    continue
                with contextlib.suppress(ValueError):
                    body = json.loads(raw)
                    if "/alert/" in topic:
                        kind = topic.rsplit("/", 1)[1]
                        self.alerts_by_kind[kind] = self.alerts_by_kind.get(kind, 0) + 1
                        if self.on_alert is not None:
                            self.on_alert(kind, body, t)
                    elif topic.endswith("/health"):
                        self.health, self.health_t = body, t
                        self.health_seen.set()
                    elif topic.endswith("/availability"):
                        self.availability[topic.split("/")[-2]] = str(body.get("state"))

    async def wait_online(self, source: str, within: float, alive: Callable[[], bool]) -> None:
        """Wait until ``source`` reports online (RuntimeError if the daemon dies first)."""
        deadline = time.monotonic() + within
        while self.availability.get(source) != "online":
            if not alive():
                raise RuntimeError("the daemon exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"source {source} not online within {within:.0f} s")
            await asyncio.sleep(0.05)  # polling the retained availability we collected

    async def fresh_health(self, within: float = 5.0) -> dict[str, Any] | None:
        """The first health message that arrives from now on (None if none in time)."""
        self.health_seen.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.health_seen.wait(), within)
        return self.health if self.health_seen.is_set() else None


# --------------------------------------------------------------------------- the CAN traffic


def hold_state(i: int) -> dict[str, float]:
    """A steady hold at 3000 rpm, 80 kPa, TPS 40 with a small wobble (variant ``i``)."""
    w = math.sin(i * 0.7)
    return {
        "rpm": 3000.0 + 15.0 * w,
        "map": 80.0 + 0.4 * w,
        "tps": 40.0 + 0.2 * w,
        "afr": 13.2 + 0.05 * w,
    }


def ms_frames(s: Mapping[str, float], knock: float = 0.0) -> dict[int, can.Message]:
    """The MegaSquirt broadcast groups of BACKGROUND_GROUPS for engine state ``s``."""
    values: dict[int, dict[str, float]] = {
        0: {"seconds": 1000, "pw1": 4.2, "pw2": 4.3, "rpm": round(s["rpm"])},
        1: {"advance": 28.0, "afrtgt1": 13.2, "afrtgt2": 13.2},
        2: {"baro": 100.0, "map": s["map"], "mat": 90.0, "clt": 190.0},
        3: {"tps": s["tps"], "batt": 13.8, "afr1": s["afr"], "afr2": s["afr"] + 0.1},
        4: {"knock": 0.0, "egocor1": 100.0, "egocor2": 100.0, "aircor": 100.0},
        6: {"totalcor": 100.0, "ve1": 80.0, "ve2": 82.0, "iacstep": 10},
        7: {"cold_adv_deg": 0.0, "tpsdot": 0.5, "mapdot": 0.2, "rpmdot": 5.0},
        52: {"knock_retard": knock},
    }
    return {g: frame_to_message(megasquirt.encode_group(g, values[g])) for g in BACKGROUND_GROUPS}


def background_frames(variants: int = 64) -> list[can.Message]:
    """A cycle of broadcast frames: every group once per variant of the hold state."""
    out: list[can.Message] = []
    for i in range(variants):
        out.extend(ms_frames(hold_state(i)).values())
    return out


def knock_message(retard: float) -> can.Message:
    """A group-52 frame with knock retard ``retard`` degrees."""
    return frame_to_message(megasquirt.encode_group(52, {"knock_retard": retard}))


class Flag(Protocol):
    """A threading or multiprocessing Event, as the sender sees it."""

    def is_set(self) -> bool: ...


@dataclass
class SenderReport:
    """What the sender did: counts, timing and every knock injection ``(key, t_sent)``."""

    sent: int = 0
    skipped: int = 0
    errors: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    max_lag_ms: float = 0.0
    injections: list[tuple[int, float]] = field(default_factory=list)

    def rate(self) -> float:
        """Frames per second actually sent."""
        return self.sent / max(1e-9, self.t_end - self.t_start)


class CanSender:
    """Paces background frames per ``tick_s`` and injects knock frames on a random schedule.

    Frames due are computed from the elapsed time, so a late wake-up sends a bigger
    burst; a lag of more than ``max_burst`` frames is skipped and counted (never a flood).
    A knock injection is stamped with ``time.perf_counter()`` just before its ``send``;
    ``key`` is its retard in 0.1 deg (1.0 .. 24.9, cycling), which names its alert.
    ``progress`` (optional, 2 doubles) receives frames sent and knocks injected.
    """

    def __init__(
        self,
        bus: can.BusABC,
        frames: list[can.Message],
        rate: float,
        *,
        stop: Flag,
        knocking: Flag,
        progress: Any = None,
        tick_s: float = 0.001,
        max_burst: int = 200,
        knock_interval: tuple[float, float] = (0.2, 0.5),
        seed: int = 1,
    ) -> None:
        self.bus = bus
        self.frames = frames
        self.rate = rate
        self.stop = stop
        self.knocking = knocking
        self.progress = progress
        self.tick_s = tick_s
        self.max_burst = max_burst
        self.knock_interval = knock_interval
        self.rng = random.Random(seed)
        self.knocks = [knock_message(k / 10.0) for k in range(256)]
        self.report = SenderReport()

    def _send(self, msg: can.Message) -> bool:
        try:
            self.bus.send(msg)
            return True
        except can.CanError:
            self.report.errors += 1
            return False

    def run(self) -> SenderReport:
        """Send until ``stop`` is set; returns the report."""
        rep = self.report
        frames, n_frames = self.frames, len(self.frames)
        i = 0
        k = 0
        t0 = rep.t_start = time.perf_counter()
        next_tick = t0
        next_knock = math.inf
        while not self.stop.is_set():
            now = time.perf_counter()
            due = int((now - t0) * self.rate) - rep.sent - rep.skipped
            if due > self.max_burst:
                rep.skipped += due - self.max_burst
                due = self.max_burst
            for _ in range(due):
                self._send(frames[i])
                i = i + 1 if i + 1 < n_frames else 0
            rep.sent += due
            if self.knocking.is_set():
                if next_knock == math.inf:
                    next_knock = now + self.rng.uniform(*self.knock_interval)
                elif now >= next_knock:
                    key = 10 + k % 240
                    k += 1
                    t_sent = time.perf_counter()
                    if self._send(self.knocks[key]):
                        rep.sent += 1  # the daemon should decode it like any other frame
                        rep.injections.append((key, t_sent))
                    next_knock += self.rng.uniform(*self.knock_interval)
            else:
                next_knock = math.inf
            if self.progress is not None:
                self.progress[0] = rep.sent
                self.progress[1] = len(rep.injections)
            next_tick += self.tick_s
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                rep.max_lag_ms = max(rep.max_lag_ms, -delay * 1000.0)
                if delay < -0.05:  # stalled (the machine is busy): resynchronise the ticks
                    next_tick = time.perf_counter()
        rep.t_end = time.perf_counter()
        return rep


def sender_process(
    params: dict[str, Any], stop: Flag, knocking: Flag, progress: Any, conn: Connection
) -> None:
    """Child-process entry: a udp_multicast bus and a :class:`CanSender`; the report goes
    back over ``conn`` as a plain dict (perf_counter is CLOCK_MONOTONIC: system-wide)."""
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the parent cleans up
        bus = can.Bus(interface="udp_multicast", channel=params["group"], port=params["port"])
        try:
            sender = CanSender(
                bus, background_frames(), params["rate"], stop=stop, knocking=knocking,
                progress=progress, knock_interval=params["interval"], seed=params["seed"],
            )  # fmt: skip
            conn.send(asdict(sender.run()))
        finally:
            bus.shutdown()
            conn.close()


class SenderHandle(Protocol):
    """The sender as the measurement loop drives it (a child process or a thread)."""

    def start(self) -> None: ...

    def knock(self, on: bool) -> None: ...

    def progress(self) -> tuple[int, int]: ...

    def finish(self) -> SenderReport: ...

    def close(self) -> None: ...


class ProcessSender:
    """:class:`CanSender` in a child process (the process-mode default).

    In this process a sender thread would hold the GIL 10,000 times a second and delay the
    subscriber's arrival stamps (measured: up to ~35 ms against mosquitto_sub); in a child
    it cannot. Both sides stamp with ``time.perf_counter()``, CLOCK_MONOTONIC on Linux,
    one clock for every process of the machine.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._knocking = ctx.Event()
        self._progress = ctx.Array("d", 2, lock=False)
        self._rx, tx = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=sender_process,
            args=(params, self._stop, self._knocking, self._progress, tx),
            name="can-sender",
            daemon=True,
        )
        self._tx = tx

    def start(self) -> None:
        self._proc.start()
        self._tx.close()  # the child holds the write end now

    def knock(self, on: bool) -> None:
        (self._knocking.set if on else self._knocking.clear)()

    def progress(self) -> tuple[int, int]:
        return int(self._progress[0]), int(self._progress[1])

    def finish(self) -> SenderReport:
        self._stop.set()
        if not self._rx.poll(10.0):
            raise RuntimeError("the sender process sent no report")
        d = self._rx.recv()
        self._proc.join(5.0)
        d["injections"] = [tuple(x) for x in d["injections"]]
        return SenderReport(**d)

    def close(self) -> None:
        self._stop.set()
        if self._proc.pid is not None:
            self._proc.join(5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)
        self._rx.close()


class ThreadSender:
    """:class:`CanSender` in a thread of this process (the in-process fallback)."""

    def __init__(self, bus: can.BusABC, params: dict[str, Any]) -> None:
        self._stop = threading.Event()
        self._knocking = threading.Event()
        self._progress = [0.0, 0.0]
        self._sender = CanSender(
            bus, background_frames(), params["rate"], stop=self._stop, knocking=self._knocking,
            progress=self._progress, knock_interval=params["interval"], seed=params["seed"],
        )  # fmt: skip
        self._thread = threading.Thread(target=self._sender.run, name="can-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def knock(self, on: bool) -> None:
        (self._knocking.set if on else self._knocking.clear)()

    def progress(self) -> tuple[int, int]:
        return int(self._progress[0]), int(self._progress[1])

    def finish(self) -> SenderReport:
        self._stop.set()
        self._thread.join(5.0)
        return self._sender.report

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)


# --------------------------------------------------------------------------- matching


def match_arrivals(
    injections: list[tuple[int, float]], arrivals: list[tuple[int, float]]
) -> tuple[list[float | None], int, int]:
    """Pair each arrival ``(key, t)`` with the latest injection of that key sent before it.

    Returns (arrival time per injection or None, duplicates, unmatched arrivals).
    """
    by_key: dict[int, list[int]] = {}
    for idx, (key, _) in enumerate(injections):
        by_key.setdefault(key, []).append(idx)
    got: list[float | None] = [None] * len(injections)
    dup = unmatched = 0
    for key, t in arrivals:
        cands = by_key.get(key, [])
        pos = bisect.bisect_left([injections[i][1] for i in cands], t) - 1
        if pos < 0:
            unmatched += 1
        elif got[cands[pos]] is not None:
            dup += 1
        else:
            got[cands[pos]] = t
    return got, dup, unmatched


def split_at(
    injections: list[tuple[int, float]],
    arrived: list[float | None],
    stamps: list[tuple[int, float]],
    wall_offset: float,
) -> tuple[list[float], list[float]] | None:
    """Per alert stamped on the way (``(key, Unix time)``, e.g. the daemon's log line):
    (sent -> stamp, stamp -> arrival) in ms."""
    perf = [(k, t - wall_offset) for k, t in stamps]
    at, _, _ = match_arrivals(injections, perf)
    before: list[float] = []
    after: list[float] = []
    for (_, t_sent), t_mid, t_arr in zip(injections, at, arrived, strict=True):
        if t_mid is not None and t_arr is not None:
            before.append((t_mid - t_sent) * 1000.0)
            after.append((t_arr - t_mid) * 1000.0)
    return (before, after) if before else None


# --------------------------------------------------------------------------- the bench


def daemon_config(
    args: argparse.Namespace,
    *,
    station: str,
    data_dir: Path,
    mqtt_port: int,
    can_bus: dict[str, Any],
) -> dict[str, Any]:
    """The station's config: one CAN source, alert repeat below the injection interval."""
    cfg: dict[str, Any] = {
        "station": station,
        "data_dir": str(data_dir),
        "health_interval_s": 1.0,
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
        "alerts": {"alert_repeat_s": args.alert_repeat_s},
        "build": {"engine_family": "milwaukee_8", "displacement_ci": 114},
        "sources": [{"name": "ecu", "driver": "megasquirt", **can_bus}],
    }
    if args.batch_ms is not None:
        cfg["batch_ms"] = args.batch_ms
    return cfg


@dataclass
class Outcome:
    """Everything one run measured."""

    mode: str
    batch_ms: float
    sender: SenderReport
    arrivals: list[tuple[int, float]]
    window_s: float
    daemon_cpu_pct: float | None
    health: dict[str, Any] | None
    other_alerts: dict[str, int]
    load: str
    wall_offset: float
    alert_log: list[tuple[int, float]] = field(default_factory=list)
    c_sub_log: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Window:
    """The measurement window's results (filled by :func:`measure`)."""

    seconds: float = 0.0
    cpu_pct: float | None = None
    health: dict[str, Any] | None = None
    load: str = ""
    report: SenderReport | None = None


async def measure(
    args: argparse.Namespace,
    sender: SenderHandle,
    watch: MqttWatch,
    arrivals: list[tuple[int, float]],
    cpu_s: Callable[[], float],
) -> Window:
    """Warm up, inject knocks for ``args.seconds``, let the last alerts in, stop the sender."""
    w = Window()
    sender.start()
    await asyncio.sleep(args.warmup)  # the sender is up, the run opens, the hub settles
    c0 = cpu_s()
    t0 = time.perf_counter()
    sender.knock(True)
    last_report = t0
    while (now := time.perf_counter()) - t0 < args.seconds:
        await asyncio.sleep(0.25)
        if now - last_report >= 10.0:
            last_report = now
            sent, knocks = sender.progress()
            print(
                f"  ... {now - t0:5.0f} s  {knocks} knocks, {len(arrivals)} alerts, "
                f"{sent:,} frames sent",
                flush=True,
            )
    sender.knock(False)
    w.seconds = time.perf_counter() - t0
    w.cpu_pct = (cpu_s() - c0) / w.seconds * 100.0
    w.load = loadavg()
    await asyncio.sleep(1.0)  # the last alerts in flight
    w.report = await asyncio.to_thread(sender.finish)
    w.health = await watch.fresh_health(within=3.0)
    return w


def knock_arrivals(
    arrivals: list[tuple[int, float]],
) -> Callable[[str, dict[str, Any], float], None]:
    """An ``on_alert`` callback that records ``(key, arrival)`` of every knock alert."""

    def on_alert(kind: str, body: dict[str, Any], t: float) -> None:
        if kind == "knock" and isinstance(body.get("value"), int | float):
            arrivals.append((round(float(body["value"]) * 10), t))

    return on_alert


def _outcome(
    mode: str,
    cfg: Mapping[str, Any],
    w: Any,
    arrivals: list[tuple[int, float]],
    watch: Any,
    **extra: Any,
) -> Outcome:
    """The Outcome of a measured window, either mode."""
    assert w.report is not None
    return Outcome(
        mode=mode,
        batch_ms=float(cfg.get("batch_ms", 20.0)),
        sender=w.report,
        arrivals=arrivals,
        window_s=w.seconds,
        daemon_cpu_pct=w.cpu_pct,
        health=w.health,
        other_alerts={k: v for k, v in watch.alerts_by_kind.items() if k != "knock"},
        load=w.load,
        wall_offset=wall_minus_perf(),
        **extra,
    )


async def run_process(args: argparse.Namespace, tmp: Path, broker: MosquittoBroker) -> Outcome:
    """The daemon as ``dynoai run`` in its own process, CAN over udp_multicast."""
    station = f"bench{uuid.uuid4().hex[:6]}"
    port = args.can_port or free_port("udp", host="")
    can_bus = {"interface": "udp_multicast", "channel": CAN_GROUP, "port": port}
    cfg = daemon_config(
        args, station=station, data_dir=tmp / "data", mqtt_port=broker.port, can_bus=can_bus
    )
    cfg_path = tmp / "dynoai.toml"
    cfg_path.write_text(to_toml(cfg))
    daemon = DaemonProcess(cfg_path, tmp / "daemon.log")
    params = {
        "group": CAN_GROUP, "port": port, "rate": args.rate,
        "interval": tuple(args.interval), "seed": args.seed,
    }  # fmt: skip
    sender = ProcessSender(params)
    arrivals: list[tuple[int, float]] = []
    c_sub: subprocess.Popen[bytes] | None = None
    rc: int | None = None
    try:
        async with MqttWatch(broker.port, station, on_alert=knock_arrivals(arrivals)) as watch:
            c_sub = start_c_subscriber(args, broker.port, station, tmp)
            daemon.start(shlex.split(args.daemon_prefix) if args.daemon_prefix else None)
            try:
                await watch.wait_online("ecu", 30.0, daemon.alive)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; daemon log:\n{daemon.tail()}") from None
            pid = daemon.target_pid = python_pid_under(daemon.pid)
            w = await measure(args, sender, watch, arrivals, lambda: proc_cpu_s(pid))
    finally:
        sender.close()
        rc = daemon.stop()
        if c_sub is not None:
            c_sub.terminate()
            c_sub.wait(5)
    if rc not in (0, None):
        print(f"warning: daemon exited with {rc}; log tail:\n{daemon.tail()}")
    assert w.report is not None
    return _outcome(
        f"daemon as a separate process (dynoai run), CAN over udp_multicast "
        f"{CAN_GROUP}:{port}; sender in a child process",
        cfg,
        w,
        arrivals,
        watch,
        alert_log=[
            (round(float(ev["value"]) * 10), t)
            for ev in daemon.events("alert")
            if ev.get("kind") == "knock" and (t := log_time(ev)) is not None
        ],
        c_sub_log=read_c_subscriber(tmp / "mosquitto_sub.txt") if c_sub is not None else [],
    )


def start_c_subscriber(
    args: argparse.Namespace, port: int, station: str, tmp: Path
) -> subprocess.Popen[bytes] | None:
    """``mosquitto_sub`` stamping each knock alert on arrival (a C client, no GIL)."""
    exe = shutil.which("mosquitto_sub")
    if not args.c_sub or exe is None:
        return None
    with open(tmp / "mosquitto_sub.txt", "wb") as out:
        return subprocess.Popen(
            [exe, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-F", "%U %p",
             "-t", f"dynoai/{station}/alert/knock"],
            stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def read_c_subscriber(path: Path) -> list[tuple[int, float]]:
    """(retard key, Unix arrival time) per line of the mosquitto_sub output."""
    out: list[tuple[int, float]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            t, _, payload = line.partition(" ")
            with contextlib.suppress(ValueError, TypeError, KeyError):
                out.append((round(float(json.loads(payload)["value"]) * 10), float(t)))
    return out


async def run_in_process(args: argparse.Namespace, tmp: Path, broker: MosquittoBroker) -> Outcome:
    """Fallback: the Daemon in this process on a python-can ``virtual`` bus."""
    from dynoai_daemon.config import Settings
    from dynoai_daemon.service.daemon import Daemon

    station = f"bench{uuid.uuid4().hex[:6]}"
    chan = f"bench-{uuid.uuid4().hex[:8]}"
    can_bus = {"interface": "virtual", "channel": chan}
    cfg = daemon_config(
        args, station=station, data_dir=tmp / "data", mqtt_port=broker.port, can_bus=can_bus
    )
    daemon = Daemon(Settings(**cfg))
    bus = can.Bus(interface="virtual", channel=chan)
    params = {"rate": args.rate, "interval": tuple(args.interval), "seed": args.seed}
    sender = ThreadSender(bus, params)
    arrivals: list[tuple[int, float]] = []
    task: asyncio.Task[None] | None = None
    try:
        async with MqttWatch(broker.port, station, on_alert=knock_arrivals(arrivals)) as watch:
            task = asyncio.create_task(daemon.run(), name="daemon")
            await watch.wait_online("ecu", 30.0, lambda: not task.done())
            pid = os.getpid()
            w = await measure(args, sender, watch, arrivals, lambda: proc_cpu_s(pid))
    finally:
        sender.close()
        if task is not None:
            daemon.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        bus.shutdown()
    assert w.report is not None
    return _outcome(
        "IN-PROCESS FALLBACK: Daemon inside this process on a python-can virtual bus "
        "(sender thread, subscriber and daemon share one interpreter and its GIL; "
        "'daemon CPU' is the whole process)",
        cfg,
        w,
        arrivals,
        watch,
    )


def _print_split(
    title: str, names: tuple[str, str], split: tuple[list[float], list[float]]
) -> None:
    print(f"{title} (ms, p50 / p99 / max):")
    for name, vals in zip(names, split, strict=True):
        v = sorted(vals)
        print(f"  {name:<58} {percentile(v, 50):6.2f} / {percentile(v, 99):6.2f} / {v[-1]:6.2f}")


def report(o: Outcome, args: argparse.Namespace) -> bool:
    """Print the results; returns True when the target was met."""
    s = o.sender
    arrived, dup, unmatched = match_arrivals(s.injections, o.arrivals)
    lat = sorted(
        (t - t_sent) * 1000.0 for (_, t_sent), t in zip(s.injections, arrived, strict=True) if t
    )
    missing = sum(1 for t in arrived if t is None)
    print()
    print(f"mode: {o.mode}")
    print(
        f"daemon: batch_ms {o.batch_ms:g}, alert_repeat_s {args.alert_repeat_s:g}; "
        f"knock every {args.interval[0] * 1000:.0f}-{args.interval[1] * 1000:.0f} ms"
    )
    print(
        f"background: target {args.rate:,.0f} frames/s, achieved {s.rate():,.0f} frames/s "
        f"({s.sent:,} frames in {s.t_end - s.t_start:.1f} s; {s.skipped:,} skipped by the "
        f"pacer, {s.errors} send errors, worst tick lag {s.max_lag_ms:.1f} ms)"
    )
    h = o.health
    if h is not None:
        decoded = int(h.get("sources", {}).get("ecu", {}).get("messages", 0))
        hub = h.get("hub", {})
        # The driver's acceptance filters drop the groups with no mapped signal before
        # they are counted: those are not losses. Knock injections (group 52) all pass.
        passing = _groups_passing_filters()
        wanted = round(s.sent * len(passing) / len(BACKGROUND_GROUPS))
        lost = wanted - decoded
        print(
            f"daemon decoded {decoded:,} of ~{wanted:,} frames its CAN filters pass (groups "
            f"{', '.join(map(str, passing))} of {s.sent:,} sent; {lost:,} = "
            f"{lost / max(1, wanted) * 100:.2f} % lost on the way); hub: dropped_batches "
            f"{hub.get('dropped_batches')}, late_samples {hub.get('late_samples')}, "
            f"queue_depth {hub.get('queue_depth')}"
        )
    else:
        print("daemon decoded: unknown (no health message after the window)")
    if o.daemon_cpu_pct is not None:
        print(f"daemon CPU during the window: {o.daemon_cpu_pct:.0f} % of one core")
    print(
        f"knock frames injected {len(s.injections)}, alerts matched {len(lat)}, missing "
        f"{missing}, duplicates {dup}, unmatched {unmatched}; other alerts "
        f"{o.other_alerts or 'none'}"
    )
    print(f"machine: {o.load} (at the end of the {o.window_s:.0f} s window)")
    if not lat:
        print("no latency samples: MISS")
        return False
    p50, p90, p99 = (percentile(lat, q) for q in (50, 90, 99))
    print()
    print(f"{'n':>6} {'min':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7}   (ms)")
    print(
        f"{len(lat):>6} {lat[0]:>7.2f} {p50:>7.2f} {p90:>7.2f} {p99:>7.2f} {lat[-1]:>7.2f} "
        f"{sum(lat) / len(lat):>7.2f}"
    )
    ok = p99 <= TARGET_P99_MS and missing == 0
    why = "" if missing == 0 else f" ({missing} knock(s) without an alert)"
    print(f"target p99 <= {TARGET_P99_MS:g} ms: {'PASS' if ok else 'MISS'}{why}")
    split = split_at(s.injections, arrived, o.alert_log, o.wall_offset)
    if split:
        _print_split(
            "split at the daemon's log line of each alert",
            (
                "frame sent -> alert logged (ingest, batch wait, core)",
                "alert logged -> arrival (outbox, MQTT QoS 1, broker)",
            ),
            split,
        )
    split = split_at(s.injections, arrived, o.c_sub_log, o.wall_offset)
    if split:
        _print_split(
            "split at mosquitto_sub's arrival stamp",
            ("frame sent -> mosquitto_sub", "mosquitto_sub -> this script's subscriber"),
            split,
        )
    if args.hist:
        edges = [0, 5, 10, 15, 20, 25, 30, 40, 60, 100, math.inf]
        print("histogram (ms):")
        for lo, hi in itertools.pairwise(edges):
            n = sum(1 for v in lat if lo <= v < hi)
            print(f"  {lo:>4g}-{hi:<4g} {n:>5} {'#' * round(60 * n / len(lat))}")
    return ok


async def amain(args: argparse.Namespace) -> bool:
    tmp = Path(args.data_dir or tempfile.mkdtemp(prefix="dynoai-alert-bench-"))
    os.makedirs(tmp, exist_ok=True)
    broker = MosquittoBroker()
    try:
        broker.start()
        mode = "process"
        if args.in_process:
            mode = "in-process"
        else:
            problem = await asyncio.to_thread(
                multicast_can_problem, CAN_GROUP, free_port("udp", host="")
            )
            if problem is not None:
                print(f"udp_multicast unusable here ({problem}): falling back to in-process")
                mode = "in-process"
        print(
            f"alert latency bench: {args.rate:,.0f} frames/s background, {args.seconds:g} s of "
            f"knock injections after {args.warmup:g} s warm-up ({mode}); {loadavg()}",
            flush=True,
        )
        if mode == "process":
            outcome = await run_process(args, tmp, broker)
        else:
            outcome = await run_in_process(args, tmp, broker)
        print(f"\nbroker: mosquitto on 127.0.0.1:{broker.port} (set_tcp_nodelay true)")
        return report(outcome, args)
    finally:
        broker.close()
        if args.keep or args.data_dir:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="injection window (default 90)")
    ap.add_argument("--quick", action="store_true", help="a 15 s window")
    ap.add_argument("--rate", type=float, default=10_000.0, help="background frames/s")
    ap.add_argument("--warmup", type=float, default=3.0, help="background only, before knocks")
    ap.add_argument(
        "--interval", type=float, nargs=2, default=(0.2, 0.5), metavar=("MIN", "MAX"),
        help="seconds between knock injections (uniform random)",
    )  # fmt: skip
    ap.add_argument("--alert-repeat-s", type=float, default=0.1)
    ap.add_argument("--batch-ms", type=float, default=None, help="daemon batch_ms (default: its)")
    ap.add_argument("--in-process", action="store_true", help="force the virtual-bus fallback")
    ap.add_argument("--can-port", type=int, default=0, help="udp_multicast port (default: free)")
    ap.add_argument("--data-dir", help="keep config, log and data here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--hist", action="store_true", help="print a latency histogram")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--daemon-prefix", default="",
        help="command put in front of the daemon's (e.g. 'py-spy record -o prof.svg --')",
    )  # fmt: skip
    ap.add_argument(
        "--c-sub", action="store_true",
        help="also stamp arrivals with mosquitto_sub, to isolate this script's own delay",
    )  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 15.0)
    if args.interval[0] <= args.alert_repeat_s or args.interval[1] < args.interval[0]:
        ap.error("--alert-repeat-s must be below the shortest injection interval")
    sigterm_as_interrupt()
    try:
        ok = asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted: daemon, broker and temp dir cleaned up", file=sys.stderr)
        sys.exit(130)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Benchmark: the daemon's CPU and memory against a realistic, busy dyno cell, in real time.

Starts its own mosquitto and ``dynoai run --config`` as a separate process, then feeds it
like hardware, at the hardware's own rates, from this process (whose CPU is not counted):

- CAN (python-can ``udp_multicast``, the only CAN transport that crosses processes here),
  2,000 frames/s by default: MegaSquirt broadcast groups 0-3 at 300 Hz and 4, 6, 7, 31, 48
  and 52 at 100 Hz (source ``ecu``; its afr1/afr2 are dropped by channel_map since the
  widebands come from the MTS chains), plus two AEMnet UEGO controllers at 100 Hz (source
  ``aem``, mapped to extra channels ``afr_aem0``/``afr_aem1``; ``--no-aem`` leaves the
  frames on the bus without the source). Both CAN sources read the whole bus.
- two Innovate MTS streams on two pseudo-terminals (sources ``wb_front``/``wb_rear``),
  one packet every 81.92 ms each, as the controllers send.
- JetDrive at 100 Hz (RPM, Torque, Power) on loopback multicast 224.0.2.10.

The engine repeats a 22 s dyno cycle after 2 s of idle: roll-on (1 s), a steady hold at
3000 rpm / 80 kPa / TPS 40 (5 s), a WOT pull 3000 -> 5800 rpm (6 s, with a short knock
burst near the top), a closed-throttle decel (3 s) and idle (7 s), so with the default
tuning (run_end_idle_s 5) every cycle opens a run and closes it into a stored session.

Every ``--sample-s`` seconds it reads the daemon's CPU (utime + stime from
/proc/<pid>/stat, all threads, so the session-building executor counts) and RSS
(/proc/<pid>/statm). After ``--warmup`` seconds it measures for ``--seconds`` (default 120;
``--quick``: 20; a long session: e.g. ``--seconds 600``) and prints CPU % of one core
(mean and worst interval), RSS at start / end / max, the RSS slope (least squares, MB/min,
whole window and second half) and RSS projected over an 8 h shift, against the targets:
CPU <= 10 % of one core, RSS flat and under 150 MB (max, and the slope projected over 8 h).
It also splits the CPU into user and kernel time and counts the daemon's context switches,
and reports the event loop's lag (health ``loop_lag_ms_max``, the worst scheduling delay
of each health period). The data directory starts with a ``--dataset-sessions`` (default
300) session dataset, so that appending each new session is measured against a grown
store (it must cost the same as against an empty one: one line, one fsync).
``--profile FILE`` runs the daemon under ``py-spy record`` (collapsed stacks, blocking mode:
it adds a little CPU to the daemon) and prints the busy samples by subsystem and the top
functions, scaled to the measured CPU; idle waits that py-spy reports as busy here (the
loop's epoll wait, the idle executor thread) are left out. ``--daemon-prefix CMD`` puts a
launcher or tracer in front of the daemon (the measured pid is the first Python under it).

Run: .venv/bin/python bench/daemon_load.py [--seconds 120] [--quick] [--profile prof.txt]
     [--no-aem] [--can-rate 2000] [--batch-ms MS] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
import tty
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import can
import numpy as np

from bench.alert_latency import (
    CAN_GROUP,
    DaemonProcess,
    MqttWatch,
    loadavg,
    multicast_can_problem,
    proc_cpu_s,
    proc_rss_mb,
    python_pid_under,
    sigterm_as_interrupt,
    to_toml,
)
from drivers import aemnet, megasquirt
from drivers.can_base import CanFrame, frame_to_message
from drivers.innovate_mts import NOMINAL_PERIOD_S, encode_packet, lambda_item
from drivers.jetdrive_codec import Unit
from simulators.jetdrive_provider import JetDriveProvider
from simulators.ports import free_port
from tests.mosquitto import MosquittoBroker

TARGET_CPU_PCT = 10.0
TARGET_RSS_MB = 150.0
SHIFT_MIN = 8 * 60.0
JD_GROUP = "224.0.2.10"
STOICH = 14.7
CYCLE_S = 22.0
LEAD_IDLE_S = 2.0


# --------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class Engine:
    """The engine and dyno at one instant."""

    rpm: float
    map_kpa: float
    tps: float
    lam_front: float
    lam_rear: float
    afr_target: float
    knock: float
    torque_nm: float


def _lerp(a: float, b: float, x: float) -> float:
    return a + (b - a) * x


def engine_at(t: float) -> Engine:
    """The dyno cycle at ``t`` seconds since the feed started (see the module docstring)."""
    w = math.sin(t * 9.1) * 0.5 + math.sin(t * 3.7) * 0.5  # a little life in the signals
    knock = 0.0
    c = CYCLE_S if t < LEAD_IDLE_S else (t - LEAD_IDLE_S) % CYCLE_S  # CYCLE_S: idle
    if c < 1.0:  # roll-on
        x = c
        rpm, kpa, tps, lam, tgt = (
            _lerp(900, 3000, x), _lerp(30, 80, x), _lerp(2, 40, x), _lerp(1.0, 0.9, x), 13.4,
        )  # fmt: skip
        tq = _lerp(15, 90, x)
    elif c < 6.0:  # steady-state hold
        rpm, kpa, tps, lam, tgt, tq = 3000 + 10 * w, 80 + 0.5 * w, 40 + 0.3 * w, 0.9, 13.2, 90
    elif c < 12.0:  # WOT pull
        x = (c - 6.0) / 6.0
        rpm, kpa, tps, lam, tgt = _lerp(3000, 5800, x), 97 + w, 100, 0.87, 12.8
        tq = 150 - 40 * (x - 0.4) ** 2
        if 0.80 <= x < 0.82:  # a short knock burst near the top of the pull
            knock = 2.0
    elif c < 15.0:  # closed-throttle decel
        x = (c - 12.0) / 3.0
        rpm, kpa, tps, lam, tgt, tq = _lerp(5800, 900, x), 22, 0, 1.15, 14.6, -20
    else:  # idle
        rpm, kpa, tps, lam, tgt, tq = 900 + 15 * w, 30 + w, 2, 1.0, 14.6, 12
    return Engine(rpm, kpa, tps, lam + 0.004 * w, lam - 0.006 * w, tgt, knock, tq)


def ms_group_values(g: int, e: Engine, t: float) -> dict[str, float]:
    """Physical values of MegaSquirt broadcast group ``g`` for engine state ``e``."""
    afr_f, afr_r = e.lam_front * STOICH, e.lam_rear * STOICH
    values: dict[int, dict[str, float]] = {
        0: {"seconds": int(t) % 65536, "pw1": 3.0 + e.map_kpa / 30, "pw2": 3.1 + e.map_kpa / 30,
            "rpm": round(e.rpm)},
        1: {"advance": 32.0 - e.map_kpa / 10, "afrtgt1": e.afr_target, "afrtgt2": e.afr_target},
        2: {"baro": 100.0, "map": e.map_kpa, "mat": 95.0, "clt": 200.0},
        3: {"tps": e.tps, "batt": 13.9, "afr1": afr_f, "afr2": afr_r},
        4: {"knock": e.knock * 5, "egocor1": 100.0, "egocor2": 100.0, "aircor": 100.0},
        6: {"totalcor": 100.0, "ve1": 60 + e.map_kpa / 4, "ve2": 61 + e.map_kpa / 4,
            "iacstep": 20},
        7: {"cold_adv_deg": 0.0, "tpsdot": 0.0, "mapdot": 0.0, "rpmdot": 0.0},
        31: {"afr_cyl1": afr_f, "afr_cyl2": afr_r},
        48: {"knock_cyl1": e.knock, "knock_cyl2": 0.0},
        52: {"knock_retard": e.knock},
    }  # fmt: skip
    return values[g]


@dataclass
class Stream:
    """One periodic CAN frame on the bus."""

    name: str
    period_s: float
    encode: Callable[[Engine, float], CanFrame]
    next_t: float = 0.0
    sent: int = 0


def can_streams(rate: float) -> list[Stream]:
    """The CAN mix, scaled so that it totals ``rate`` frames/s (2,000 at scale 1)."""
    scale = rate / 2000.0
    out: list[Stream] = []

    def ms(g: int) -> Callable[[Engine, float], CanFrame]:
        return lambda e, t: megasquirt.encode_group(g, ms_group_values(g, e, t))

    def aem(i: int) -> Callable[[Engine, float], CanFrame]:
        return lambda e, t: aemnet.encode(i, e.lam_front if i == 0 else e.lam_rear)

    for k, g in enumerate((0, 1, 2, 3)):
        out.append(Stream(f"ms{g}", 1 / (300 * scale), ms(g), next_t=0.0003 * k))
    for k, g in enumerate((4, 6, 7, 31, 48, 52)):
        out.append(Stream(f"ms{g}", 1 / (100 * scale), ms(g), next_t=0.0021 + 0.0011 * k))
    for i in (0, 1):
        out.append(Stream(f"aem{i}", 1 / (100 * scale), aem(i), next_t=0.0047 + 0.0009 * i))
    return out


# --------------------------------------------------------------------------- the feeder


class PtyPair:
    """A raw pseudo-terminal: we write the master, the daemon opens the slave path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)  # a stalled daemon must never stall the feeder
        self.path = os.ttyname(self.slave)
        self.written = 0
        self.dropped = 0

    def write(self, data: bytes) -> None:
        try:
            os.write(self.master, data)
            self.written += 1
        except OSError:  # full (the daemon is not reading) or closed
            self.dropped += 1

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Feeder:
    """The cell's hardware, paced on a 5 ms tick in this process's event loop."""

    bus: can.BusABC
    ptys: tuple[PtyPair, PtyPair]
    jd: JetDriveProvider
    streams: list[Stream]
    jd_hz: float = 100.0
    tick_s: float = 0.005
    can_errors: int = 0
    can_skipped: int = 0
    jd_sent: int = 0
    t0: float = 0.0
    t_stop: float = 0.0
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="feeder")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.t_stop:
            self.t_stop = time.monotonic()

    @property
    def can_sent(self) -> int:
        return sum(s.sent for s in self.streams)

    def can_sent_for(self, prefix: str) -> int:
        return sum(s.sent for s in self.streams if s.name.startswith(prefix))

    async def _run(self) -> None:
        next_tick = time.monotonic()
        jd_next = 0.0
        mts_next = [0.0, NOMINAL_PERIOD_S / 2]  # two controllers, not in phase
        while not self._stop.is_set():
            now = time.monotonic()
            t = now - self.t0
            e = engine_at(t)
            for s in self.streams:
                if t - s.next_t > 0.5:  # the loop stalled: skip, never flood the bus
                    missed = int((t - s.next_t) / s.period_s)
                    self.can_skipped += missed
                    s.next_t += missed * s.period_s
                while s.next_t <= t:
                    try:
                        self.bus.send(frame_to_message(s.encode(e, s.next_t)))
                        s.sent += 1
                    except can.CanError:
                        self.can_errors += 1
                    s.next_t += s.period_s
            while jd_next <= t:
                power_kw = e.torque_nm * e.rpm / 9549.0
                self.jd.send_values({"RPM": e.rpm, "Torque": e.torque_nm, "Power": power_kw})
                self.jd_sent += 1
                jd_next += 1.0 / self.jd_hz
            for i, (pty, lam) in enumerate(zip(self.ptys, (e.lam_front, e.lam_rear), strict=True)):
                while mts_next[i] <= t:
                    pty.write(encode_packet([lambda_item(lam)]))
                    mts_next[i] += NOMINAL_PERIOD_S
            next_tick += self.tick_s
            delay = next_tick - time.monotonic()
            if delay < -0.1:
                next_tick = time.monotonic()  # resynchronise after a stall
            await asyncio.sleep(max(0.0, delay))


# --------------------------------------------------------------------------- measuring


@dataclass
class Totals:
    """Whole-window counters of the daemon process."""

    seconds: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    wakeups: int = 0


@dataclass
class Sample:
    t: float  # s since the window started
    cpu_pct: float  # over the interval before this sample
    rss_mb: float
    sessions: int | None
    alerts: int | None
    lag_ms: float | None = None  # the daemon's loop_lag_ms_max of its latest health


def cpu_user_sys_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of ``pid``'s threads (wake-ups)."""
    n = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
    return n


def slope_mb_min(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time, MB per minute (nan with < 3 samples)."""
    if len(samples) < 3:
        return math.nan
    xs = [s.t / 60.0 for s in samples]
    ys = [s.rss_mb for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else math.nan


#: Leaves that are a thread waiting, not working: py-spy's idle detection misses them here
#: (the loop's epoll wait, the idle executor thread) or misplaces a suspended coroutine
#: (``_get_loop`` under ``Event.wait``/``Queue.get``, Python 3.11), the raw recorder's
#: writer thread waiting for work (its own lines only: the writing itself is deeper), and
#: python-can's udp_multicast reader thread waiting in ``select`` (its recv's own lines).
IDLE_LEAVES = (
    "EpollSelector.select (",
    "_worker (concurrent/futures/thread.py",
    "._get_loop (",
    "RawRecorder._work (",
    "GeneralPurposeUdpMulticastBus.recv (",
)

#: Subsystems by a frame in the stack, the first match from the root down.
SUBSYSTEMS: tuple[tuple[str, str], ...] = (
    ("RawRecorder.", "core loop: raw recorder (CSV)"),
    ("Core.feed ", "core loop: Core.feed"),
    ("AlertEngine.", "core loop: alerts"),
    ("_publish_live ", "core loop: live/cells publish"),
    ("samples_to_frame ", "core loop: samples_to_frame"),
    ("Daemon._core_loop ", "core loop: other"),
    ("_BusReader._on_readable ", "CAN receive (python-can udp_multicast + decode)"),
    ("serial_base.py", "serial (MTS)"),
    ("jetdrive.py", "JetDrive"),
    ("jetdrive_receiver.py", "JetDrive"),
    ("Driver._pump ", "driver -> hub hand-off"),
    ("Daemon._driver_loop ", "driver -> hub hand-off"),
    ("_health_loop ", "health"),
    ("publish/mqtt.py", "MQTT"),
    ("aiomqtt", "MQTT"),
    ("_sessions_loop ", "sessions"),
    ("_build_and_store ", "sessions (executor)"),
    ("importlib", "imports"),
)


def print_top(path: Path, cpu_pct: float, n: int = 15) -> None:
    """Summarise a py-spy collapsed-stack file: busy samples by subsystem and top functions.

    Percentages are of the busy samples; "~% core" scales them by the measured CPU.
    """
    own: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = busy = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        print(f"profile: cannot read {path}: {exc}")
        return
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        if any(x in frames[-1] for x in IDLE_LEAVES):
            continue
        busy += c
        own[frames[-1]] += c
        part = next(
            (name for key, name in SUBSYSTEMS if any(key in f for f in frames)),
            "event loop, other",
        )
        parts[part] += c
    if not busy:
        print("profile: no busy samples")
        return
    print(
        f"\nprofile: {total:,} samples, {busy:,} busy after dropping idle waits "
        f"({', '.join(x.strip(' .(') for x in IDLE_LEAVES)}); {path}"
    )
    print(f"{'busy %':>7} {'~% core':>8}  subsystem")
    for name, c in parts.most_common():
        print(f"{c / busy * 100:>7.1f} {c / busy * cpu_pct:>8.1f}  {name}")
    print(f"{'busy %':>7} {'~% core':>8}  function (own time)")
    for f, c in own.most_common(n):
        print(f"{c / busy * 100:>7.1f} {c / busy * cpu_pct:>8.1f}  {f}")


def daemon_config(
    args: argparse.Namespace,
    *,
    station: str,
    data_dir: Path,
    mqtt_port: int,
    can_port: int,
    jd_port: int,
    ptys: tuple[PtyPair, PtyPair],
) -> dict[str, Any]:
    """A station like systemd/dynoai.toml.example: defaults except where the cell differs."""
    can_bus = {"interface": "udp_multicast", "channel": CAN_GROUP, "port": can_port}
    sources: list[dict[str, Any]] = [
        {"name": "wb_front", "driver": "innovate_mts", "port": ptys[0].path,
         "channels": ["afr_front"]},
        {"name": "wb_rear", "driver": "innovate_mts", "port": ptys[1].path,
         "channels": ["afr_rear"]},
        {"name": "ecu", "driver": "megasquirt", **can_bus,
         "channel_map": {"afr1": "", "afr2": ""}},
        {"name": "dyno", "driver": "jetdrive", "group": JD_GROUP, "port": jd_port,
         "interface_address": "127.0.0.1"},
    ]  # fmt: skip
    if not args.no_aem:
        sources.insert(
            3,
            {"name": "aem", "driver": "aemnet", **can_bus,
             "channel_map": {"0": "afr_aem0", "1": "afr_aem1"}},
        )  # fmt: skip
    cfg: dict[str, Any] = {
        "station": station,
        "data_dir": str(data_dir),
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
        "build": {
            "engine_family": "milwaukee_8", "displacement_ci": 114, "stage": "stage_2",
            "exhaust_type": "2-into-1",
        },
        "sources": sources,
    }  # fmt: skip
    if args.batch_ms is not None:
        cfg["batch_ms"] = args.batch_ms
    return cfg


def seed_dataset(data_dir: Path, n: int) -> str:
    """Put ``n`` sessions (clones of sessions from a replayed synthetic log) in the dataset."""
    if n <= 0:
        return "none"
    from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS, Settings
    from dynoai_daemon.logs import write_canonical
    from dynoai_daemon.logs.replay import replay_logs
    from dynoai_daemon.store import SessionStore
    from tests.synth import Plan, make_log

    rng = np.random.default_rng(7)
    shape = (len(DEFAULT_RPM_AXIS), len(DEFAULT_MAP_AXIS))
    ratio = 1.0 + rng.uniform(-0.05, 0.05, shape)
    plan = Plan([("idle", 2), ("hold", 3000, 80, 3.0), ("pull", 2000, 6000, 8), ("idle", 7)])
    log = data_dir.parent / "seed.csv"
    write_canonical(log, [make_log(plan, ratio, ratio, seed=7)])
    settings = Settings(station="seed", data_dir=str(data_dir.parent / "seed"))
    base = replay_logs([log], settings, store=False).sessions
    if not base:
        return "none (the seed log gave no session)"
    clones = [
        base[i % len(base)].model_copy(update={"session_id": f"seed-{i:04d}"}) for i in range(n)
    ]
    store = SessionStore(data_dir)
    store.append_many_to_dataset(clones)
    size = store.dataset_path.stat().st_size
    return f"{n} sessions, {size / 1e6:.1f} MB in {store.dataset_path.name}"


def own_cpu_s() -> float:
    """This process's CPU seconds (the feeder's; reported, never counted for the daemon)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def amain(args: argparse.Namespace) -> bool:
    tmp = Path(args.data_dir or tempfile.mkdtemp(prefix="dynoai-load-bench-"))
    os.makedirs(tmp, exist_ok=True)
    problem = await asyncio.to_thread(multicast_can_problem, CAN_GROUP, free_port("udp", host=""))
    if problem is not None:
        print(f"error: udp_multicast unusable here ({problem}): cannot feed CAN across processes")
        return False
    broker = MosquittoBroker()
    ptys: list[PtyPair] = []
    bus: can.BusABC | None = None
    jd: JetDriveProvider | None = None
    feeder: Feeder | None = None
    daemon: DaemonProcess | None = None
    ok, cpu_mean = False, math.nan
    try:
        broker.start()
        ptys = [PtyPair(), PtyPair()]
        pair = (ptys[0], ptys[1])
        station = f"load{uuid.uuid4().hex[:6]}"
        can_port, jd_port = free_port("udp", host=""), free_port("udp", host="")
        cfg = daemon_config(
            args, station=station, data_dir=tmp / "data", mqtt_port=broker.port,
            can_port=can_port, jd_port=jd_port, ptys=pair,
        )  # fmt: skip
        cfg_path = tmp / "dynoai.toml"
        cfg_path.write_text(to_toml(cfg))
        seeded = await asyncio.to_thread(seed_dataset, tmp / "data", args.dataset_sessions)
        print(f"dataset seeded: {seeded}")
        bus = can.Bus(interface="udp_multicast", channel=CAN_GROUP, port=can_port)
        jd = JetDriveProvider(
            name="Dyno",
            channels=[("RPM", Unit.RPM), ("Torque", Unit.NEWTON_METER), ("Power", Unit.KILOWATT)],
        )
        await jd.start(group=JD_GROUP, port=jd_port, interface_address="127.0.0.1")
        daemon = DaemonProcess(cfg_path, tmp / "daemon.log", log_level="info")
        prefix = shlex.split(args.daemon_prefix)
        if args.profile:
            exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            prefix = [exe, "record", "--format", "raw", "--rate", "100",
                      "--threads", "-o", args.profile, "--", *prefix]  # fmt: skip
        print(
            f"daemon load bench: {args.can_rate:,.0f} CAN frames/s "
            f"({'MegaSquirt + AEMnet source' if not args.no_aem else 'MegaSquirt source'}), "
            f"2 x MTS at {1 / NOMINAL_PERIOD_S:.1f} Hz, JetDrive {args.jd_hz:g} Hz; "
            f"{args.warmup:g} s warm-up + {args.seconds:g} s measured, sample every "
            f"{args.sample_s:g} s{'; PROFILED with py-spy' if args.profile else ''}"
            f"{'; daemon behind ' + args.daemon_prefix if args.daemon_prefix else ''}",
            flush=True,
        )
        print(f"machine at start: {loadavg()}")
        async with MqttWatch(broker.port, station) as watch:
            daemon.start(prefix)
            pid = daemon.target_pid = python_pid_under(daemon.pid)
            feeder = Feeder(bus, pair, jd, can_streams(args.can_rate), jd_hz=args.jd_hz)
            # The feeder starts with the daemon: sources open as soon as it is up.
            names = [s["name"] for s in cfg["sources"]]
            deadline = time.monotonic() + 30.0
            while any(watch.availability.get(n) != "online" for n in names):
                if not daemon.alive():
                    raise RuntimeError(f"the daemon exited at start-up:\n{daemon.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sources not online after 30 s: {watch.availability}\n{daemon.tail()}"
                    )
                if not feeder.started and "ecu" in watch.availability:
                    feeder.start()
                await asyncio.sleep(0.1)  # polling the retained availability messages
            if not feeder.started:
                feeder.start()
            rss_ready = proc_rss_mb(pid)
            await asyncio.sleep(args.warmup)
            totals = Totals()
            samples = await sample_loop(args, pid, watch, daemon, totals)
            load = loadavg()
            feeder_cpu = own_cpu_s()
            await feeder.stop()
            health = await watch.fresh_health(within=args.health_s + 2)
        ok, cpu_mean = report(
            args, samples, totals, rss_ready, feeder, health, load, feeder_cpu,
            sessions_logged=sum(1 for _ in daemon.events("session stored")),
        )  # fmt: skip
    finally:
        if feeder is not None:
            await feeder.stop()
        if daemon is not None:
            rc = daemon.stop()
            if rc not in (0, None):
                print(f"warning: daemon exited with {rc}; log tail:\n{daemon.tail()}")
        if jd is not None:
            await jd.close()
        if bus is not None:
            bus.shutdown()
        for p in ptys:
            p.close()
        broker.close()
        if args.keep or args.data_dir:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.profile:
        print_top(Path(args.profile), cpu_mean, args.top)
    return ok


async def sample_loop(
    args: argparse.Namespace, pid: int, watch: MqttWatch, daemon: DaemonProcess, totals: Totals
) -> list[Sample]:
    """CPU and RSS of ``pid`` every ``sample_s`` for ``seconds``; prints each sample."""
    samples: list[Sample] = [Sample(0.0, math.nan, proc_rss_mb(pid), None, None)]
    t0 = time.monotonic()
    u0, s0 = cpu_user_sys_s(pid)
    w0 = ctx_switches(pid)
    c_prev, t_prev = proc_cpu_s(pid), t0
    print(f"{'t s':>7} {'CPU %':>6} {'RSS MB':>7} {'sessions':>8} {'alerts':>6} {'lag ms':>6}")
    print(f"{0:>7.0f} {'':>6} {samples[0].rss_mb:>7.1f}")
    n = max(1, round(args.seconds / args.sample_s))
    for k in range(1, n + 1):
        await asyncio.sleep(max(0.0, t0 + k * args.sample_s - time.monotonic()))
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited:\n{daemon.tail()}")
        now, c = time.monotonic(), proc_cpu_s(pid)
        h = watch.health or {}
        s = Sample(
            now - t0,
            (c - c_prev) / (now - t_prev) * 100.0,
            proc_rss_mb(pid),
            h.get("hub", {}).get("sessions"),
            sum(h.get("alerts", {}).values()) if h else None,
            h.get("loop_lag_ms_max"),
        )
        samples.append(s)
        c_prev, t_prev = c, now
        print(
            f"{s.t:>7.0f} {s.cpu_pct:>6.1f} {s.rss_mb:>7.1f} "
            f"{s.sessions if s.sessions is not None else '-':>8} "
            f"{s.alerts if s.alerts is not None else '-':>6} "
            f"{s.lag_ms if s.lag_ms is not None else '-':>6}",
            flush=True,
        )
    u1, s1 = cpu_user_sys_s(pid)
    totals.seconds = time.monotonic() - t0
    totals.user_s, totals.sys_s = u1 - u0, s1 - s0
    totals.wakeups = ctx_switches(pid) - w0
    return samples


def report(
    args: argparse.Namespace,
    samples: list[Sample],
    totals: Totals,
    rss_ready: float,
    feeder: Feeder,
    health: dict[str, Any] | None,
    load: str,
    feeder_cpu: float,
    *,
    sessions_logged: int,
) -> tuple[bool, float]:
    """Print the summary against the targets; (both met, mean CPU %)."""
    window = samples[-1].t
    cpus = [s.cpu_pct for s in samples[1:]]
    cpu_mean = sum(c * (b.t - a.t) for c, a, b in zip(cpus, samples, samples[1:], strict=False))
    cpu_mean /= max(1e-9, window)
    rss = [s.rss_mb for s in samples]
    slope = slope_mb_min(samples)
    half = [s for s in samples if s.t >= window / 2]
    slope2 = slope_mb_min(half)
    projected = rss[-1] + max(0.0, slope) * SHIFT_MIN
    elapsed = (feeder.t_stop or time.monotonic()) - feeder.t0
    print()
    print(
        f"fed (whole run, {elapsed:.0f} s): CAN {feeder.can_sent:,} frames "
        f"({feeder.can_sent / elapsed:,.0f}/s; {feeder.can_skipped} skipped, "
        f"{feeder.can_errors} send errors), MTS {ptys_written(feeder)} packets, "
        f"JetDrive {feeder.jd_sent:,} datagrams ({feeder.jd_sent / elapsed:.0f}/s)"
    )
    if health is not None:
        src = health.get("sources", {})
        parts = []
        for name, want in (
            ("ecu", feeder.can_sent_for("ms")),
            ("aem", feeder.can_sent_for("aem")),
        ):
            if name in src:
                parts.append(f"{name} {src[name].get('messages', 0):,} of {want:,} frames")
        for name in ("wb_front", "wb_rear", "dyno"):
            if name in src:
                parts.append(f"{name} {src[name].get('messages', 0):,} messages")
        hub = health.get("hub", {})
        print(f"daemon decoded: {', '.join(parts)}")
        print(
            f"daemon hub: frames_fed {hub.get('frames_fed', 0):,}, "
            f"rows_fed {hub.get('rows_fed', 0):,}, "
            f"dropped_batches {hub.get('dropped_batches')}, late_samples "
            f"{hub.get('late_samples')}; runs discarded {hub.get('runs_discarded')}"
        )
        counts = {k: v for k, v in health.get("alerts", {}).items() if v}
        note = (
            " ('sensor': sources going silent when the feed stopped)" if "sensor" in counts else ""
        )
        print(f"alerts: {counts or 'none'}{note}")
    print(f"sessions stored (daemon log): {sessions_logged}")
    lags = sorted(s.lag_ms for s in samples if s.lag_ms is not None)
    if lags:
        print(
            f"event loop lag (worst per health period, ms): median {lags[len(lags) // 2]:.1f}, "
            f"max {lags[-1]:.1f} over {len(lags)} periods"
        )
    if health is not None:
        print(f"storage: {health.get('storage')}; dataset: {args.dataset_sessions} seeded + new")
    print(
        f"feeder (this script, not counted): {feeder_cpu / elapsed * 100:.0f} % of one core; "
        f"machine: {load}"
    )
    print()
    cpu_ok = cpu_mean <= TARGET_CPU_PCT
    print(
        f"daemon CPU over {window:.0f} s: mean {cpu_mean:.1f} % of one core, worst "
        f"{args.sample_s:g} s interval {max(cpus):.1f} %; target <= {TARGET_CPU_PCT:g} %: "
        f"{'PASS' if cpu_ok else 'MISS'}"
    )
    sec = max(1e-9, totals.seconds)
    print(
        f"  of which user {totals.user_s / sec * 100:.1f} %, system (kernel) "
        f"{totals.sys_s / sec * 100:.1f} %; {totals.wakeups / sec:,.0f} context switches/s"
    )
    print(
        f"daemon RSS MB: when ready {rss_ready:.1f}, window start {rss[0]:.1f}, end {rss[-1]:.1f}, "
        f"max {max(rss):.1f}; slope {slope:+.2f} MB/min (second half {slope2:+.2f}); "
        f"projected after {SHIFT_MIN / 60:.0f} h at that slope: {projected:.0f} MB"
    )
    rss_ok = max(rss) <= TARGET_RSS_MB and projected <= TARGET_RSS_MB
    print(
        f"target RSS flat under {TARGET_RSS_MB:g} MB (max and {SHIFT_MIN / 60:.0f} h projection): "
        f"{'PASS' if rss_ok else 'MISS'}"
        + ("" if window >= 300 else "  (a short window: the slope is noisy, run --seconds 600)")
    )
    return cpu_ok and rss_ok, cpu_mean


def ptys_written(feeder: Feeder) -> str:
    a, b = feeder.ptys
    dropped = a.dropped + b.dropped
    return f"{a.written + b.written:,}" + (f" ({dropped} not written)" if dropped else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="measured window (default 120)")
    ap.add_argument("--quick", action="store_true", help="20 s window, 5 s warm-up")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds fed before measuring")
    ap.add_argument("--sample-s", type=float, default=5.0, help="sampling period")
    ap.add_argument("--can-rate", type=float, default=2000.0, help="CAN frames/s (mix scaled)")
    ap.add_argument("--jd-hz", type=float, default=100.0, help="JetDrive datagrams/s")
    ap.add_argument("--no-aem", action="store_true", help="no aemnet source (frames stay on)")
    ap.add_argument("--batch-ms", type=float, default=None, help="daemon batch_ms (default: its)")
    ap.add_argument("--profile", metavar="FILE", help="run the daemon under py-spy record")
    ap.add_argument("--top", type=int, default=15, help="functions shown from the profile")
    ap.add_argument(
        "--daemon-prefix", default="",
        help="command put in front of the daemon's (a launcher or tracer; the measured pid is "
        "the first Python process under it)",
    )  # fmt: skip
    ap.add_argument(
        "--dataset-sessions", type=int, default=300,
        help="sessions already in the dataset when the daemon starts (default 300)",
    )  # fmt: skip
    ap.add_argument("--data-dir", help="keep config, log and data here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    args.health_s = 5.0  # the daemon's default health_interval_s
    if args.profile:
        args.profile = str(Path(args.profile).resolve())  # the daemon runs in the repo root
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 20.0), min(args.warmup, 5.0)
    sigterm_as_interrupt()
    try:
        ok = asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted: daemon, broker, ptys and temp dir cleaned up", file=sys.stderr)
        sys.exit(130)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

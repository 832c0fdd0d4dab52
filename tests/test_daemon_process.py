"""``dynoai run`` as a real process: SIGTERM, SIGKILL and restart, a broker outage, bad configs.

The daemon runs as systemd would run it (``python -m dynoai_daemon.cli.main run --config``),
fed like hardware: Innovate MTS packets on a pseudo-terminal and JetDrive datagrams on
loopback multicast. What it did is read from its own JSON log lines on stderr (every
alert is logged with its id, every stored session with its run id); what arrived is read
by a real subscriber on a real mosquitto. The checks are set equalities between the two:
at-least-once, so duplicates are allowed and nothing may be missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tty
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.innovate_mts import encode_packet, lambda_item
from drivers.jetdrive_codec import Unit
from simulators.jetdrive_provider import JetDriveProvider
from tests.mosquitto import MosquittoBroker, Received, Subscriber, free_port

pytestmark = pytest.mark.timeout(120)

STOICH = 14.7


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNOAI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_config(tmp: Path, *, station: str, mqtt_port: int, pty: str, jd_port: int) -> Path:
    cfg = tmp / "dynoai.toml"
    cfg.write_text(
        f'station = "{station}"\n'
        f'data_dir = "{tmp / "data"}"\n'
        "health_interval_s = 0.5\n"
        "[mqtt]\n"
        f'url = "mqtt://127.0.0.1:{mqtt_port}"\n'
        "keepalive_s = 2\n"
        "reconnect_max_s = 0.5\n"
        "[tuning]\nmin_run_s = 0.5\nrun_end_idle_s = 0.5\nmin_weight = 3.0\n"
        "[alerts]\nimbalance_min_weight = 3.0\n"
        '[build]\nengine_family = "milwaukee_8"\ndisplacement_ci = 114\n'
        "[[sources]]\n"
        'name = "widebands"\ndriver = "innovate_mts"\n'
        f'port = "{pty}"\n'
        "[[sources]]\n"
        'name = "dyno"\ndriver = "jetdrive"\ngroup = "224.0.2.10"\n'
        f'port = {jd_port}\ninterface_address = "127.0.0.1"\n'
    )
    return cfg


def _py_spy(pid: int) -> str:
    """The child's Python stacks, when py-spy is installed (diagnostics for a hang)."""
    import shutil

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return "(py-spy not installed: no stacks)"
    r = subprocess.run(
        [exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30, check=False
    )
    return r.stdout + r.stderr


class DaemonProcess:
    """``dynoai run --config`` as a child process, its JSON log lines parsed as they come."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._new = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dynoai_daemon.cli.main",
            "run",
            "--config",
            str(self.config),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_child_env(),
        )
        self._reader = asyncio.create_task(self._read(), name="daemon-log-reader")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.text.append(line)
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    self.events.append(ev)
            self._new.set()
        self._new.set()

    @property
    def exited(self) -> bool:
        return self._reader is not None and self._reader.done()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text[-n:])

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(
        self,
        event: str,
        within: float = 20.0,
        *,
        nth: int = 1,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The ``nth`` log event named ``event`` with these fields (waiting for it)."""

        def match(e: dict[str, Any]) -> bool:
            return (
                e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())
                and (where is None or where(e))
            )

        i = seen = 0
        try:
            async with asyncio.timeout(within):
                while True:
                    while i < len(self.events):
                        e = self.events[i]
                        i += 1
                        if match(e):
                            seen += 1
                            if seen == nth:
                                return e
                    if self.exited:
                        raise AssertionError(f"daemon exited before {event!r}:\n{self.tail()}")
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no {event!r} {fields} in the log:\n{self.tail()}") from None

    def alert_ids(self) -> set[str]:
        return {e["id"] for e in self.find("alert")}

    def session_ids(self) -> set[str]:
        return {e["run"] for e in self.find("session stored")}

    async def wait_exit(self, within: float) -> int:
        assert self.proc is not None
        try:
            rc = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            stacks = await asyncio.to_thread(_py_spy, self.proc.pid)
            raise AssertionError(
                f"still running after {within} s:\n{self.tail()}\n{stacks}"
            ) from None
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return rc

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def close(self) -> None:
        """Kill it if it still runs (a failed test), and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class Feeder:
    """The hardware: MTS packets on a pty and JetDrive values, 50 times a second."""

    def __init__(self, master: int, jd_port: int) -> None:
        self.master = master
        os.set_blocking(master, False)  # a killed daemon must never stall the writer
        self.jd_port = jd_port
        self.jd = JetDriveProvider(
            name="Dyno",
            channels=[
                ("RPM", Unit.RPM),
                ("MAP", Unit.KPA),
                ("TPS", Unit.PERCENT),
                ("Torque", Unit.NEWTON_METER),
                ("Power", Unit.KILOWATT),
            ],
        )
        self.state = {"rpm": 900.0, "map": 30.0, "tps": 2.0, "afr_f": 14.6, "afr_r": 14.6}
        self.ticks_sent = 0
        self._ticked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.jd.start(group="224.0.2.10", port=self.jd_port, interface_address="127.0.0.1")
        self._task = asyncio.create_task(self._loop(), name="feeder")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.jd.close()

    async def _loop(self) -> None:
        while True:
            s = self.state
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(
                    self.master,
                    encode_packet(
                        [lambda_item(s["afr_f"] / STOICH), lambda_item(s["afr_r"] / STOICH)]
                    ),
                )
            rpm = s["rpm"]
            self.jd.send_values(
                {
                    "RPM": rpm,
                    "MAP": s["map"],
                    "TPS": s["tps"],
                    "Torque": 160.0,
                    "Power": 160.0 * rpm / 9549.0,
                }
            )
            self.ticks_sent += 1
            self._ticked.set()
            await asyncio.sleep(0.02)  # the hardware's own pace: 50 Hz

    async def ticks(self, n: int) -> None:
        """Wait until ``n`` more ticks went out."""
        target = self.ticks_sent + n
        while self.ticks_sent < target:
            self._ticked.clear()
            await self._ticked.wait()

    async def idle(self, seconds: float) -> None:
        self.state.update(rpm=900.0, map=30.0, tps=2.0, afr_f=14.6, afr_r=14.6)
        await self.ticks(int(seconds / 0.02))

    async def pull(self, seconds: float, *, at_half: Callable[[], Any] | None = None) -> None:
        """A WOT pull 2000 -> 5000 rpm, front lean (14.4) and rear rich (13.1)."""
        steps = int(seconds / 0.02)
        for i in range(steps):
            if at_half is not None and i == steps // 2:
                await at_half()
            self.state.update(
                rpm=2000.0 + 3000.0 * i / steps, map=96.0, tps=90.0, afr_f=14.4, afr_r=13.1
            )
            await self.ticks(1)


@contextlib.contextmanager
def pty_pair() -> Any:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
async def cell(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A pty + JetDrive feeder and a config for a daemon; the broker port is filled in later."""
    station = f"p{uuid.uuid4().hex[:8]}"
    jd = free_port()
    with pty_pair() as (master, path):
        feeder = Feeder(master, jd)
        await feeder.start()
        daemons: list[DaemonProcess] = []

        def daemon_for(port: int) -> DaemonProcess:
            cfg = write_config(tmp_path, station=station, mqtt_port=port, pty=path, jd_port=jd)
            d = DaemonProcess(cfg)
            daemons.append(d)
            return d

        try:
            yield {
                "station": station,
                "feeder": feeder,
                "daemon_for": daemon_for,
                "data": tmp_path / "data",
            }
        finally:
            for d in daemons:
                await d.close()
            await feeder.close()


async def wait_received(
    sub: Subscriber,
    got: dict[str, set[str]],
    want_alerts: Callable[[], set[str]],
    want_sessions: Callable[[], set[str]],
    within: float = 30.0,
) -> None:
    """Collect alert and session ids from ``sub`` until every wanted id has arrived."""

    def missing() -> tuple[set[str], set[str]]:
        return want_alerts() - got["alerts"], want_sessions() - got["sessions"]

    try:
        async with asyncio.timeout(within):
            while any(missing()):
                m = await sub.queue.get()
                note(m, got)
    except TimeoutError:
        raise AssertionError(f"never arrived (alerts, sessions): {missing()}") from None


def note(m: Received, got: dict[str, set[str]]) -> None:
    if "/alert/" in m.topic:
        got["alerts"].add(m.json()["id"])
    elif "/session/" in m.topic and not m.topic.endswith("/last"):
        body = m.json()
        got["sessions"].add(body["session_id"])
        if body.get("aborted"):
            got["aborted"].add(body["session_id"])


def fresh() -> dict[str, set[str]]:
    return {"alerts": set(), "sessions": set(), "aborted": set()}


async def started(d: DaemonProcess) -> None:
    await d.start()
    await d.wait_for("daemon started")
    await d.wait_for("source availability", source="widebands", online=True)
    await d.wait_for("source availability", source="dyno", online=True)


async def test_broker_outage_mid_run_loses_nothing(
    cell: dict[str, Any], mosquitto_persistent: MosquittoBroker
) -> None:
    broker = mosquitto_persistent
    st, feeder = cell["station"], cell["feeder"]
    d: DaemonProcess = cell["daemon_for"](broker.port)
    got = fresh()
    filters = (f"dynoai/{st}/alert/#", f"dynoai/{st}/session/#")
    async with Subscriber(broker.port, *filters, persistent=True) as sub:
        await started(d)
        await d.wait_for("mqtt connected")
        # Run 1 with the broker up.
        await feeder.idle(0.3)
        await feeder.pull(2.0)
        await feeder.idle(1.0)
        first = await d.wait_for("session stored")
        await wait_received(sub, got, d.alert_ids, d.session_ids)
        assert got["alerts"], d.tail()

        # Run 2: the broker goes away in the middle of the pull and stays away 10 s.
        loop = asyncio.get_running_loop()
        down_at = 0.0

        async def broker_down() -> None:
            nonlocal down_at
            await asyncio.to_thread(broker.stop)
            down_at = loop.time()

        await feeder.idle(0.3)
        await feeder.pull(2.0, at_half=broker_down)
        await feeder.idle(1.0)
        second = await d.wait_for("session stored", nth=2)
        assert second["run"] != first["run"]
        alerts_during = d.alert_ids() - got["alerts"]
        assert alerts_during, "the pull during the outage raised no alert"
        await d.wait_for("mqtt connection lost")
        await feeder.idle(max(0.0, 10.0 - (loop.time() - down_at)))
        await asyncio.to_thread(broker.start)
        await d.wait_for("mqtt connected", nth=2, within=20)
        await wait_received(sub, got, d.alert_ids, d.session_ids)
        assert second["run"] in got["sessions"]
        assert alerts_during <= got["alerts"]

        # A clean stop: exit 0, and still nothing missing (what it flushed arrived).
        d.signal(signal.SIGTERM)
        assert await d.wait_exit(10) == 0, d.tail()
        await wait_received(sub, got, d.alert_ids, d.session_ids)


async def test_sigkill_mid_run_then_restart_delivers_and_recovers(
    cell: dict[str, Any], mosquitto_persistent: MosquittoBroker
) -> None:
    broker = mosquitto_persistent
    st, feeder, data = cell["station"], cell["feeder"], cell["data"]
    got = fresh()
    filters = (f"dynoai/{st}/alert/#", f"dynoai/{st}/session/#")
    async with Subscriber(broker.port, *filters, persistent=True) as sub:
        a: DaemonProcess = cell["daemon_for"](broker.port)
        await started(a)
        await a.wait_for("mqtt connected")
        # The broker is away, so the alerts of the pull can only wait in the outbox.
        await asyncio.to_thread(broker.stop)
        await a.wait_for("mqtt connection lost")
        await feeder.idle(0.3)
        await feeder.pull(1.5)
        run = (await a.wait_for("run started"))["run"]
        await a.wait_for("alert")
        await feeder.ticks(60)  # > 1 s more of the pull: the recorder has flushed since
        a.signal(signal.SIGKILL)
        assert await a.wait_exit(10) == -signal.SIGKILL
        killed_alerts = a.alert_ids()
        assert killed_alerts

        # What the killed daemon left on disk: the run's raw samples and the outbox.
        raw = (data / "raw" / f"{run}.csv").read_text().splitlines()
        assert raw[0].startswith("time_s,") and len(raw) > 20, raw[:3]
        assert not (data / "sessions" / f"{run}.json").exists()
        with contextlib.closing(sqlite3.connect(data / "outbox.sqlite")) as db:
            (depth,) = db.execute("SELECT count(*) FROM outbox").fetchone()
        assert depth >= len(killed_alerts)

        await asyncio.to_thread(broker.start)
        b: DaemonProcess = cell["daemon_for"](broker.port)
        await b.start()
        recovered = await b.wait_for("recovered interrupted run", run=run)
        assert recovered
        await b.wait_for("session stored", run=run)
        await wait_received(sub, got, lambda: killed_alerts | b.alert_ids(), lambda: {run})
        assert run in got["aborted"]
        session = json.loads((data / "sessions" / f"{run}.json").read_text())
        assert session["aborted"] is True and session["run"]["samples"] > 20
        b.signal(signal.SIGTERM)
        assert await b.wait_exit(10) == 0, b.tail()


async def test_sigterm_mid_run_closes_session_and_exits_0(
    cell: dict[str, Any], mqtt_broker: MosquittoBroker
) -> None:
    st, feeder, data = cell["station"], cell["feeder"], cell["data"]
    d: DaemonProcess = cell["daemon_for"](mqtt_broker.port)
    got = fresh()
    filters = (f"dynoai/{st}/session/#", f"dynoai/{st}/state")
    async with Subscriber(mqtt_broker.port, *filters) as sub:
        await started(d)
        await d.wait_for("mqtt connected")
        await feeder.idle(0.3)
        stopped = asyncio.Event()

        async def sigterm() -> None:
            await d.wait_for("run started")
            d.signal(signal.SIGTERM)
            stopped.set()

        await feeder.pull(2.0, at_half=sigterm)
        assert stopped.is_set()
        assert await d.wait_exit(10) == 0, d.tail()
        run = d.find("run started")[0]["run"]
        assert d.session_ids() == {run}
        await wait_received(sub, got, set, lambda: {run})
        assert run not in got["aborted"]  # closed cleanly, not recovered after a crash
        assert (data / "sessions" / f"{run}.json").exists()
        await sub.wait_for(lambda m: m.topic.endswith("/state") and b"offline" in m.payload)
    # ... and it stays retained for whoever looks later.
    async with Subscriber(mqtt_broker.port, f"dynoai/{st}/state") as late:
        m = await late.get()
        assert m.retain and m.json()["state"] == "offline" and m.json()["reason"] == "shutdown"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynoai_daemon.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_child_env(),
        check=False,
    )


def test_run_with_bad_config_exits_2_naming_every_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        'station = "cell 1/#"\n'
        "health_interval_s = -1\n"
        "[mqtt]\n"
        'url = "http://broker"\n'
        "[tuning]\nmin_weight = 0\n"
        "[[sources]]\n"
        'name = "wb"\ndriver = "no_such_driver"\n'
    )
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:"), r.stderr
    for field in ("station", "health_interval_s", "mqtt.url", "tuning.min_weight"):
        assert field in r.stderr, (field, r.stderr)
    assert not (tmp_path / "data").exists()

    r = run_cli("run", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr, r.stderr

    cfg.write_text('station = "ok"\n[[sources]]\nname = "wb"\ndriver = "no_such_driver"\n')
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2 and "no_such_driver" in r.stderr, r.stderr

"""``dynoai simulate`` as a newcomer runs it: a child process, its stdout, its data directory.

Each test runs the console script (``dynoai simulate``; ``python -m dynoai_daemon.cli.main``
when the script is not installed) with one pull at a high ``--speed``, then checks what a
user sees and what other programs get:

- with the configured broker reachable (the test's mosquitto) it uses it: the alerts it
  counts on stdout are the alerts a real subscriber received (by kind, and by id against
  its JSON log on stderr), the sessions on ``session/<id>`` are the files under
  ``sessions/``, nothing is left in the outbox, and the sessions hold against the truth
  file it wrote for the scenario (VE correction p95 within 1 point);
- with nothing listening at the configured URL it starts its own broker on loopback, says
  so, publishes everything there, and the broker is gone when it exits;
- with ``--no-mqtt`` it says so and publishes nothing, even with a broker reachable;
- bad input exits 2 with ``error: ...`` on stderr.

No wall-clock assertions: waits are on process exit and on messages, bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from dynoai_daemon.publish.outbox import Outbox
from simulators.broker import find_mosquitto
from simulators.evaluate import compare_sessions
from tests.mosquitto import MosquittoBroker, Received, Subscriber, free_port, port_accepts

pytestmark = pytest.mark.timeout(120)

#: Simulated seconds per wall second: one pull of a scenario is ~60 simulated s.
SPEED = "20"
#: Bound on one simulate process (it takes a few seconds; the machine may be loaded).
RUN_TIMEOUT_S = 90.0
#: Bound on messages still arriving after the process exited.
DELIVERY_TIMEOUT_S = 20.0

ALERT_LINE = re.compile(
    r"^ALERT (?P<kind>\S+) (?P<cyl>\S+)(?: at [^:]+)?: .*?(?: \(\+(?P<held>\d+) similar\))?$"
)
DONE_LINE = re.compile(
    r"^done: (?P<sessions>\d+) session\(s\), (?P<alerts>\d+) alert\(s\)(?: \((?P<kinds>[^)]*)\))?;"
)
SCENARIO_LINE = re.compile(r"^scenario (?P<name>\S+) \(seed (?P<seed>\d+)\)")


def _command() -> list[str]:
    script = shutil.which("dynoai", path=str(Path(sys.executable).parent))
    if script is not None:
        return [script, "simulate"]
    return [sys.executable, "-m", "dynoai_daemon.cli.main", "simulate"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNOAI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Result:
    """A finished ``dynoai simulate``."""

    rc: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def __str__(self) -> str:  # shown by a failing assert
        return (
            f"exit {self.rc}\n--- stdout\n{self.stdout}\n--- stderr (tail)\n{self.stderr[-3000:]}"
        )

    def done(self) -> tuple[int, int, Counter[str]]:
        """Sessions, alerts and alerts by kind from the final summary line."""
        found = [m for line in self.lines if (m := DONE_LINE.match(line))]
        assert len(found) == 1, self
        m = found[0]
        kinds: Counter[str] = Counter()
        for part in filter(None, (m["kinds"] or "").split(", ")):
            kind, n = part.rsplit(" ", 1)
            kinds[kind] = int(n)
        return int(m["sessions"]), int(m["alerts"]), kinds

    def alert_lines(self) -> list[re.Match[str]]:
        out = []
        for line in self.lines:
            if line.startswith("ALERT "):
                m = ALERT_LINE.match(line)
                assert m is not None, line
                out.append(m)
        return out

    def logged_alert_ids(self) -> set[str]:
        """Ids of the alerts the daemon logged (its JSON log lines on stderr)."""
        ids = set()
        for line in self.stderr.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "alert":
                ids.add(str(ev["id"]))
        return ids


async def simulate(cwd: Path, *args: str | Path) -> Result:
    """Run ``dynoai simulate ARGS`` in ``cwd`` to completion."""
    proc = await asyncio.create_subprocess_exec(
        *_command(),
        *map(str, args),
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(
            f"dynoai simulate did not finish within {RUN_TIMEOUT_S:g} s\n"
            + str(Result(-9, out.decode(errors="replace"), err.decode(errors="replace")))
        )
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def write_config(tmp: Path, station: str, mqtt_url: str) -> Path:
    cfg = tmp / "dynoai.toml"
    cfg.write_text(f'station = "{station}"\n[mqtt]\nurl = "{mqtt_url}"\n')
    return cfg


def session_files(data: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((data / "sessions").glob("*.json"))}


def outbox_depth(data: Path) -> int:
    """Messages still waiting for the broker (the outbox must exist: MQTT was on)."""
    path = data / "outbox.sqlite"
    assert path.is_file(), sorted(p.name for p in data.iterdir())
    with Outbox(path) as box:
        return box.depth()


def truth_file(data: Path, res: Result) -> dict[str, Any]:
    """The truth the run wrote, checked against the scenario line it printed."""
    found = [m for line in res.lines if (m := SCENARIO_LINE.match(line))]
    assert len(found) == 1, res
    truth: dict[str, Any] = json.loads((data / "truth" / f"{found[0]['name']}.json").read_text())
    assert truth["scenario"] == found[0]["name"] and truth["seed"] == int(found[0]["seed"])
    return truth


# ------------------------------------------------------------------------- with a broker


async def test_simulate_publishes_to_the_configured_broker(
    tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    station = f"simtest-{uuid.uuid4().hex[:10]}"
    cfg = write_config(tmp_path, station, mqtt_broker.url)
    data = tmp_path / "data"
    root = f"dynoai/{station}"
    # hot_day_knock: knock alerts through the outbox, two runs, and a non-heat-soak VE check.
    async with Subscriber(mqtt_broker.port, f"{root}/#") as sub:
        res = await simulate(
            tmp_path,
            "--config", cfg,
            "--scenario", "hot_day_knock",
            "--pulls", "1",
            "--speed", SPEED,
            "--data-dir", data,
        )  # fmt: skip
        assert res.rc == 0, res
        assert f"using the configured broker 127.0.0.1:{mqtt_broker.port}" in res.lines, res
        n_sessions, n_alerts, kinds = res.done()
        files = session_files(data)
        assert n_sessions >= 1 and len(files) == n_sessions, res
        assert sum(kinds.values()) == n_alerts

        # At least once: every session and every alert the run counted arrives (duplicates
        # allowed, told apart by id), all of it flushed before the process exited.
        sessions: dict[str, Any] = {}
        alerts: dict[str, dict[str, Any]] = {}
        alert_topics: dict[str, str] = {}

        def take(m: Received) -> None:
            rest = m.topic.removeprefix(f"{root}/")
            if rest.startswith("alert/"):
                a = m.json()
                alerts[a["id"]] = a
                alert_topics[a["id"]] = rest.removeprefix("alert/")
            elif rest.startswith("session/") and rest != "session/last":
                sessions[rest.removeprefix("session/")] = m.json()

        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                while set(sessions) != set(files) or len(alerts) < n_alerts:
                    take(await sub.get(within=DELIVERY_TIMEOUT_S))
        except TimeoutError:
            pytest.fail(
                f"after exit, got sessions {sorted(sessions)} of {sorted(files)} and "
                f"{len(alerts)} of {n_alerts} alerts\n{res}"
            )
        for m in sub.drain():
            take(m)
    assert outbox_depth(data) == 0

    # Alerts: what stdout counted (by kind) and the daemon logged (by id) is what arrived.
    got_kinds = Counter(a["kind"] for a in alerts.values())
    assert got_kinds == kinds, (got_kinds, res)
    assert set(alerts) == res.logged_alert_ids()
    for aid, a in alerts.items():
        assert a["station"] == station and alert_topics[aid] == a["kind"]
    # The lines printed as they happened (rate-limited) name only kinds that arrived, no
    # more often than they arrived, and all come before the final summary.
    shown: Counter[str] = Counter()
    for m in res.alert_lines():
        shown[m["kind"]] += 1 + int(m["held"] or 0)
    assert shown and all(shown[k] <= got_kinds[k] for k in shown), (shown, got_kinds)
    first_alert = next(i for i, line in enumerate(res.lines) if line.startswith("ALERT "))
    done_at = next(i for i, line in enumerate(res.lines) if line.startswith("done: "))
    assert first_alert < done_at

    # Sessions: the published JSON is the stored file, one summary line per run on stdout.
    assert sessions == files
    summaries = [line for line in res.lines if line.startswith("run ")]
    assert sorted(line.split()[1].rstrip(":") for line in summaries) == sorted(files)
    for sid, s in sessions.items():
        assert s["session_id"] == sid and s["run"]["station"] == station

    # Held against the scenario's own truth file.
    truth = truth_file(data, res)
    cmp = compare_sessions(sessions.values(), truth)
    print(cmp.summary())
    assert cmp.ve_cells >= 15 and not cmp.ve_soak_cells
    assert cmp.ve_p95_abs is not None and cmp.ve_p95_abs <= 1.0
    assert truth["knock_cells"] and got_kinds["knock"] > 0
    assert cmp.knock_truth & cmp.knock_found


# ------------------------------------------------------------------------- no broker


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")
async def test_simulate_starts_its_own_broker_when_none_answers(tmp_path: Path) -> None:
    closed = free_port()
    cfg = write_config(tmp_path, f"simtest-{uuid.uuid4().hex[:10]}", f"mqtt://127.0.0.1:{closed}")
    data = tmp_path / "data"
    res = await simulate(
        tmp_path, "--config", cfg, "--pulls", "1", "--speed", SPEED, "--data-dir", data
    )
    assert res.rc == 0, res
    started = [
        m
        for line in res.lines
        if (m := re.match(r"started mosquitto on 127\.0\.0\.1:(\d+)$", line))
    ]
    assert len(started) == 1, res
    port = int(started[0][1])
    assert port != closed
    # It published there: everything the run produced was acknowledged by that broker.
    n_sessions, _, _ = res.done()
    assert n_sessions >= 1 and len(session_files(data)) == n_sessions
    assert outbox_depth(data) == 0
    truth = truth_file(data, res)
    assert truth["scenario"] == "stock"
    # The broker it started is gone with it (it was a grandchild: the leak check cannot
    # see it, its port can).
    assert not port_accepts(port)
    assert not port_accepts(closed)


# ------------------------------------------------------------------------- --no-mqtt


async def test_simulate_no_mqtt_publishes_nothing(
    tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    station = f"simtest-{uuid.uuid4().hex[:10]}"
    # The configured broker is reachable, and still nothing may go there.
    cfg = write_config(tmp_path, station, mqtt_broker.url)
    data = tmp_path / "data"
    async with Subscriber(mqtt_broker.port, f"dynoai/{station}/#") as sub:
        res = await simulate(
            tmp_path,
            "--config", cfg,
            "--no-mqtt",
            "--pulls", "1",
            "--speed", SPEED,
            "--data-dir", data,
        )  # fmt: skip
        assert res.rc == 0, res
        assert any(line.startswith("MQTT off") for line in res.lines), res
        assert not any("broker" in line for line in res.lines), res
        n_sessions, _, _ = res.done()
        files = session_files(data)
        assert n_sessions >= 1 and len(files) == n_sessions
        truth = truth_file(data, res)
        cmp = compare_sessions(files.values(), truth)
        assert cmp.ve_p95_abs is not None and cmp.ve_p95_abs <= 1.0
        # A marker published after the process exited is the first thing to arrive: the
        # broker delivers in order, so the daemon sent nothing before it.
        marker = f"dynoai/{station}/test-marker"
        async with aiomqtt.Client("127.0.0.1", mqtt_broker.port) as client:
            await client.publish(marker, b"end", qos=1)
        first = await sub.get(within=DELIVERY_TIMEOUT_S)
        assert first.topic == marker, first


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--scenario", "no_such_scenario"], "unknown scenario 'no_such_scenario'"),
        (["--scenario", "missing.toml"], "missing.toml"),
        (["--speed", "0"], "--speed"),
        (["--pulls", "-1"], "--pulls"),
        (["--config", "bad.toml"], "mqtt"),
    ],
    ids=["unknown-scenario", "missing-scenario-file", "speed-0", "negative-pulls", "bad-config"],
)
async def test_simulate_bad_input_exits_2(tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "bad.toml").write_text('[mqtt]\nurl = "http://127.0.0.1:1"\n')
    res = await simulate(tmp_path, *args, "--no-mqtt", "--data-dir", tmp_path / "data")
    assert res.rc == 2, res
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], res
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()


async def test_simulate_with_aem_serial_gauges(tmp_path: Path) -> None:
    data = tmp_path / "data"
    res = await simulate(
        tmp_path, "--no-mqtt", "--wideband", "aem_serial", "--pulls", "1", "--speed", SPEED,
        "--data-dir", data,
    )  # fmt: skip
    assert res.rc == 0, res
    n_sessions, _, _ = res.done()
    assert n_sessions >= 1 and len(session_files(data)) == n_sessions
    cmp = compare_sessions(session_files(data).values(), truth_file(data, res))
    assert cmp.ve_cells >= 15 and cmp.ve_p95_abs is not None and cmp.ve_p95_abs <= 1.0

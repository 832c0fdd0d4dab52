"""The console of ``simulate`` and ``run`` on a terminal: one line per event, no repeats.

``dynoai simulate`` runs with stdout and stderr on a real pseudo-terminal: every alert is
one ``ALERT`` line (the daemon's log does not repeat it), no JSON and no key=value log
noise. The terminal renderer of the log is checked on its own for ``run``: an alert is
one ``ALERT kind cylinder at rpm / kPa: message`` line; other events one short line.
"""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _simulate_on_a_tty(tmp_path: Path, *args: str) -> str:
    exe = shutil.which("dynoai", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "dynoai_daemon.cli.main"]
    master, slave = pty.openpty()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNOAI_")}
    env.update(COLUMNS="250", TERM="xterm-256color")
    proc = subprocess.Popen(
        [*cmd, "simulate", *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(60) == 0
    return ANSI.sub("", b"".join(chunks).decode(errors="replace")).replace("\r", "")


def test_simulate_on_a_terminal_prints_each_alert_once(tmp_path: Path) -> None:
    out = _simulate_on_a_tty(
        tmp_path, "--scenario", "stage2_moderate", "--no-mqtt", "--speed", "40",
        "--data-dir", str(tmp_path / "data"),
    )  # fmt: skip
    lines = [x for x in out.splitlines() if x.strip()]
    assert not [x for x in lines if x.lstrip().startswith("{")], out  # no JSON on a terminal
    assert not [x for x in lines if "event=" in x or "station=" in x], out
    done = [x for x in lines if x.startswith("done: ")]
    assert len(done) == 1, out
    m = re.search(r"(\d+) alert\(s\) \(([^)]*)\)", done[0])
    assert m is not None, done[0]
    kinds = Counter({k: int(n) for k, n in (p.rsplit(" ", 1) for p in m.group(2).split(", "))})
    assert sum(kinds.values()) > 0  # the widebands warming up at least
    shown: Counter[str] = Counter()
    for x in lines:
        a = re.match(r"ALERT (\S+) .*?(?: \(\+(\d+) similar\))?$", x)
        if a:
            shown[a.group(1)] += 1 + int(a.group(2) or 0)
        # the daemon's log line for an alert would also start with a clock and say ALERT
        assert not re.match(r"\d\d:\d\d:\d\d ALERT", x), x
    # each alert at most once on screen: printed, or held back by the console's rate limit
    # (counted in a later "(+N similar)" or only in the final summary)
    assert set(shown) <= set(kinds) and sum(shown.values()) > 0, (shown, out)
    for kind, n in kinds.items():
        assert shown[kind] <= n, (kind, n, shown, out)


def test_terminal_log_line_for_run(restore_logging: None) -> None:
    from dynoai_daemon.logs_setup import configure_logging

    out = io.StringIO()
    configure_logging("info", station="c1", json=False, stream=out)
    log = structlog.get_logger("dynoai.daemon")
    log.warning("alert", id="abc", kind="knock", cylinder="rear", rpm=3000.0, map_kpa=90.0,
                value=2.5, run="r1", message="rear knock 2.5 deg")  # fmt: skip
    log.info("session stored", run="r1", peak_hp=97.123456)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d ALERT knock rear at 3000 rpm / 90 kPa: rear knock 2.5 deg", lines[0]
    ), lines[0]
    assert re.fullmatch(r"\d\d:\d\d:\d\d info +session stored  run=r1 peak_hp=97.12", lines[1])
    # off a terminal the same events are JSON lines, as before
    js = io.StringIO()
    configure_logging("info", station="c1", stream=js, drop_events=("session stored",))
    log.warning("alert", id="abc", kind="knock")
    log.info("session stored", run="r1")
    assert js.getvalue().count("\n") == 1 and '"event": "alert"' in js.getvalue()

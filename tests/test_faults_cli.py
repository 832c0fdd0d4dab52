"""Bad command lines and the truth of summary lines: ``error: <what>, <where>``, exit 2.

Each case of the issue is run through the real entry point (in process, so a traceback
would show in the captured stderr) or, where signals or a missing broker matter, as a
child process: ``config check`` on a directory or a binary file, an environment override
that is wrong (blamed on the variable, not on the file), ``bitrate = "fast"``, a random
or tiny ``.blf``, ``simulate --speed inf`` / ``--seed -1``, a data directory that cannot
be created, ``replay --speed nan``, ``config check --probe`` with a missing port and CAN
interface, a replay with no rows, ``replay --publish`` with the broker down, and Ctrl-C
during ``dynoai simulate``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from dynoai_daemon.cli.main import main
from dynoai_daemon.logs import write_canonical
from tests.mosquitto import free_port
from tests.synth import make_log
from tests.test_replay import plan, truth

pytestmark = pytest.mark.timeout(120)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_bad_input(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    # replay reports a bad log after what the other logs gave, so the error is a line of
    # its own, not necessarily the first
    assert any(line.startswith("error: ") for line in err.splitlines()), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_config_check_on_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["config", "check", str(tmp_path)], capsys)
    assert_bad_input(rc, err, str(tmp_path), "Is a directory")
    rc, _, err = run_cli(["run", "--config", str(tmp_path)], capsys)
    assert_bad_input(rc, err, str(tmp_path))


def test_config_check_on_a_binary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "junk.toml"
    f.write_bytes(bytes(random.Random(3).randrange(256) for _ in range(300)) + b"\xff")
    rc, _, err = run_cli(["config", "check", str(f)], capsys)
    assert_bad_input(rc, err, str(f), "not valid TOML")
    rc, _, err = run_cli(["run", "--config", str(f)], capsys)
    assert_bad_input(rc, err, str(f))


def test_an_environment_override_error_names_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "ok.toml"
    f.write_text('station = "x"\n')
    monkeypatch.setenv("DYNOAI_ALERTS__LEAN_LIMIT_AFR", "rich")
    rc, _, err = run_cli(["config", "check", str(f)], capsys)
    assert_bad_input(rc, err, "environment DYNOAI_ALERTS__LEAN_LIMIT_AFR", "lean_limit_afr")
    assert str(f) not in err  # the file is fine: do not blame it


def test_bitrate_that_is_not_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "can.toml"
    f.write_text(
        'station = "x"\n[[sources]]\nname = "ecu"\ndriver = "megasquirt"\n'
        'interface = "virtual"\nchannel = "c"\nbitrate = "fast"\n'
    )
    rc, _, err = run_cli(["config", "check", str(f)], capsys)
    assert_bad_input(rc, err, str(f), "sources[0] (ecu)", "bitrate", "'fast'")


@pytest.mark.parametrize(
    "content", [b"LOGG", bytes(random.Random(5).randrange(256) for _ in range(400))]
)
def test_a_blf_that_is_not_one(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "capture.blf"
    f.write_bytes(content)
    rc, _, err = run_cli(
        ["replay", "--format", "blf", "--data-dir", str(tmp_path / "d"), str(f)], capsys
    )
    assert_bad_input(rc, err, str(f))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["simulate", "--speed", "inf"], "--speed"),
        (["simulate", "--speed", "nan"], "--speed"),
        (["simulate", "--seed", "-1"], "--seed"),
        (["replay", "--speed", "nan", "x.csv"], "--speed"),
        (["replay", "--speed", "inf", "x.csv"], "--speed"),
    ],
)
def test_bad_speed_and_seed(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_cli([*args, "--data-dir", str(tmp_path)], capsys)
    assert_bad_input(rc, err, needle)


@pytest.mark.parametrize("command", ["simulate", "replay", "run"])
def test_a_data_dir_that_cannot_be_created(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "data"
    cfg = tmp_path / "c.toml"
    cfg.write_text('station = "x"\n[mqtt]\nenabled = false\n')
    args = {
        "simulate": ["simulate", "--no-mqtt"],
        "replay": ["replay", "--config", str(cfg), str(cfg)],
        "run": ["run", "--config", str(cfg)],
    }[command]
    rc, _, err = run_cli([*args, "--data-dir", str(bad)], capsys)
    assert_bad_input(rc, err, str(bad), "--data-dir")


def test_probe_names_each_source_that_cannot_be_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'station = "x"\n'
        '[[sources]]\nname = "widebands"\ndriver = "innovate_mts"\n'
        f'port = "{tmp_path / "no-such-tty"}"\n'
        '[[sources]]\nname = "ecu"\ndriver = "megasquirt"\n'
        'interface = "socketcan"\nchannel = "can0"\n'
        '[[sources]]\nname = "ok"\ndriver = "megasquirt"\n'
        f'interface = "virtual"\nchannel = "probe-{os.getpid()}"\n'
    )
    rc, out, err = run_cli(["config", "check", str(cfg)], capsys)
    assert rc == 0 and out.startswith("ok:"), err  # without --probe nothing is opened
    rc, _, err = run_cli(["config", "check", "--probe", str(cfg)], capsys)
    assert_bad_input(rc, err, "'widebands'", "No such file or directory", "'ecu'", "can0")
    assert "'ok'" not in err


def test_a_replay_with_no_rows_says_nothing_was_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "empty.csv"
    log.write_text("time_s,rpm,map_kpa,afr_front\n")
    rc, _, err = run_cli(["replay", "--data-dir", str(tmp_path / "d"), str(log)], capsys)
    assert rc == 0, err
    assert "0 rows" in err and "nothing written" in err and "written under" not in err


async def test_replay_publish_with_the_broker_down_says_nothing_was_published(
    tmp_path: Path,
) -> None:
    rf, rr = truth(4)
    frame = make_log(plan(hot=False), rf, rr, seed=4)
    log = tmp_path / "pull.csv"
    write_canonical(log, [frame])
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'station = "rpd"\n[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dynoai_daemon.cli.main", "replay", "--publish",
        "--config", str(cfg), "--data-dir", str(tmp_path / "d"), str(log),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, raw = await asyncio.wait_for(proc.communicate(), 60)
    err = raw.decode()
    assert proc.returncode == 0, err[-2000:]
    summary = [x for x in err.splitlines() if "rows replayed" in x][-1]
    assert "0 message(s) published" in summary and "still in the outbox" in summary, summary
    assert "1 session(s)" in summary


async def test_simulate_stops_on_the_first_ctrl_c(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dynoai_daemon.cli.main", "simulate", "--no-mqtt",
        "--speed", "1", "--data-dir", str(tmp_path / "d"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"ALERT" not in await proc.stdout.readline():  # the daemon is running
                pass
        # The plan is minutes long at --speed 1; the first SIGINT must end it.
        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stdout.read(), 5)
        rc = await asyncio.wait_for(proc.wait(), 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 130
    assert b"interrupted:" in rest

"""``dynoai run`` as a real process under faults: stopped by the OS mid-pull, a full disk.

The daemon runs as systemd would run it, fed like hardware (Innovate MTS packets on a
pseudo-terminal, JetDrive datagrams on loopback multicast; see test_daemon_process.py).

- SIGSTOP for 1.5 s in the middle of a pull (what a long GC pause or a slow disk does to
  the loop): every wideband reading sent meanwhile must be in ``raw/<run>.csv``.
- The data directory on a 2 MB tmpfs (mounted here: tests run as root), filled up in the
  middle of a run: the daemon keeps running, live alerts keep reaching the broker, health
  says ``storage: <error>``; once space is freed the session is stored and published, and
  the daemon still stops cleanly. The tmpfs is always unmounted in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import MosquittoBroker, Subscriber, free_port
from tests.test_daemon_process import (
    DaemonProcess,
    Feeder,
    fresh,
    note,
    pty_pair,
    started,
    wait_received,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def raw_afr_front(path: Path) -> list[float]:
    with path.open() as fh:
        return [float(r["afr_front"]) for r in csv.DictReader(fh) if r.get("afr_front")]


async def test_every_reading_sent_while_the_daemon_is_stopped_is_recorded(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    station = f"f{uuid.uuid4().hex[:8]}"
    jd = free_port()
    with pty_pair() as (master, path):
        feeder = Feeder(master, jd)
        await feeder.start()
        cfg = write_config(
            tmp_path, station=station, mqtt_port=mosquitto.port, pty=path, jd_port=jd
        )
        d = DaemonProcess(cfg)
        try:
            await started(d)
            assert d.proc is not None
            pid = d.proc.pid
            sent: list[float] = []

            async def stop_and_send() -> None:
                os.kill(pid, signal.SIGSTOP)
                try:
                    # 1.5 s at 50 Hz: 75 readings, each a different AFR, while it is stopped.
                    for i in range(75):
                        afr = round(13.0 + 0.03 * i, 3)
                        feeder.state.update(afr_f=afr)
                        await feeder.ticks(1)
                        sent.append(afr)
                finally:
                    os.kill(pid, signal.SIGCONT)

            await feeder.idle(0.3)
            await feeder.pull(2.0, at_half=stop_and_send)
            await feeder.idle(1.0)
            stored = await d.wait_for("session stored", within=30)
            raw = tmp_path / "data" / "raw" / f"{stored['run']}.csv"
            got = raw_afr_front(raw)
            missing = [a for a in sent if not any(abs(a - g) < 0.012 for g in got)]
            assert missing == [], f"{len(missing)} of {len(sent)} readings missing from {raw}"
            d.signal(signal.SIGTERM)
            assert await d.wait_exit(15) == 0, d.tail()
        finally:
            await d.close()
            await feeder.close()


# --------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; return it."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (65536, 4096, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)
    return filler


async def test_full_disk_mid_run_is_survived_and_space_coming_back_stores_everything(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    station = f"f{uuid.uuid4().hex[:8]}"
    jd = free_port()
    with small_tmpfs(tmp_path / "data") as data, pty_pair() as (master, path):
        feeder = Feeder(master, jd)
        await feeder.start()
        cfg = write_config(
            tmp_path, station=station, mqtt_port=mosquitto.port, pty=path, jd_port=jd
        )
        d = DaemonProcess(cfg)
        got = fresh()
        health: list[dict[str, Any]] = []
        filters = (f"dynoai/{station}/alert/#", f"dynoai/{station}/session/#")
        try:
            async with (
                Subscriber(mosquitto.port, *filters) as sub,
                Subscriber(mosquitto.port, f"dynoai/{station}/health") as hsub,
            ):
                await started(d)
                await d.wait_for("mqtt connected")
                filler: Path | None = None

                async def disk_full() -> None:
                    nonlocal filler
                    filler = await asyncio.to_thread(fill, data)

                await feeder.idle(0.3)
                await feeder.pull(2.0, at_half=disk_full)
                await feeder.idle(1.0)
                # The run closed while the disk is full: the session waits in memory.
                await d.wait_for("session not stored; retrying", within=30)
                # Live alerts raised during the full disk reached the broker all the same.
                alerts_full = d.alert_ids()
                assert alerts_full, d.tail()
                async with asyncio.timeout(20):
                    while not alerts_full <= got["alerts"]:
                        note(await sub.queue.get(), got)
                # Health says what is wrong.
                seen: list[Any] = []

                def bad_storage(m: Any) -> bool:
                    seen.append(m.json().get("storage"))
                    return bool(m.json().get("storage") != "ok")

                try:
                    m = await hsub.wait_for(bad_storage, within=20)
                except TimeoutError:
                    raise AssertionError(f"health storage: {seen[-5:]}\n{d.tail()}") from None
                health.append(m.json())
                assert "No space left" in health[-1]["storage"] or "full" in health[-1]["storage"]
                assert not d.exited

                # Space comes back: the session is stored and published, health clears.
                assert filler is not None
                await asyncio.to_thread(filler.unlink)
                stored = await d.wait_for("session stored", within=30)
                assert (data / "sessions" / f"{stored['run']}.json").exists()
                await wait_received(sub, got, d.alert_ids, d.session_ids)
                assert stored["run"] in got["sessions"]
                await hsub.wait_for(lambda m: m.json().get("storage") == "ok", within=20)
                d.signal(signal.SIGTERM)
                assert await d.wait_exit(15) == 0, d.tail()
                lines = (data / "dataset.jsonl").read_bytes().splitlines()
                assert [json.loads(x)["session_id"] for x in lines] == [stored["run"]]
        finally:
            await d.close()
            await feeder.close()
            shutil.rmtree(data / "raw", ignore_errors=True)

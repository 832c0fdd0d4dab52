"""Benchmark: the CPU ``dynoai watch`` spends on a live station's MQTT stream.

Captures the real stream once: a private mosquitto, ``dynoai simulate`` publishing into it
(the daemon throttles ``live`` to 10/s and ``cells`` to 2/s on wall time, so the capture
has a live station's message rate whatever the ``--speed``), and a subscriber on
``dynoai/<station>/#`` recording every message with its arrival time. Then, in one
process, times over the captured messages:

  1. baseline: ``json.loads`` of every payload (what any subscriber pays);
  2. model: :meth:`WatchState.apply` of every message;
  3. model + paint: the model plus rendering the grid, live line, alerts and sources
     at the app's 10 Hz repaint rate (what the terminal view costs without the terminal
     I/O that Textual adds).

and prints CPU seconds per minute of stream for each, and the ratios to the baseline.
Also reports the report's size and render time for the captured sessions.

Run: .venv/bin/python bench/watch_cpu.py [--scenario NAME] [--speed X]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS, load_settings
from dynoai_daemon.watch.render import render_alerts, render_grid, render_live, render_sources
from dynoai_daemon.watch.state import WatchState
from tests.mosquitto import MosquittoBroker

Captured = list[tuple[float, str, bytes]]


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class WatchProcess:
    """``dynoai watch`` on a pseudo-terminal of the given size, its output drained."""

    def __init__(self, url: str, size: tuple[int, int]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        exe = Path(sys.executable).parent / "dynoai"
        self.proc = subprocess.Popen(
            [str(exe), "watch", "--url", url, "--station", "bench"],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.bytes_out = 0
        asyncio.get_running_loop().add_reader(self.master, self._drain)

    def _drain(self) -> None:
        try:
            self.bytes_out += len(os.read(self.master, 1 << 16))
        except OSError:
            asyncio.get_running_loop().remove_reader(self.master)

    def cpu(self) -> float:
        return _cpu_of(self.proc.pid)

    async def quit(self) -> None:
        os.write(self.master, b"q")
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10)
        finally:
            asyncio.get_running_loop().remove_reader(self.master)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


WATCH: dict[str, float] = {}
WATCH_IDLE: dict[str, float] = {}


async def capture(broker: MosquittoBroker, data: Path, scenario: str, speed: float) -> Captured:
    watchers = {size: WatchProcess(broker.url, size) for size in ((80, 24), (160, 50))}
    await asyncio.sleep(3.0)  # let both start up and connect: startup CPU is not counted
    before = {size: w.cpu() for size, w in watchers.items()}
    await asyncio.sleep(3.0)  # connected, no station publishing yet: the idle cost
    idle = {size: w.cpu() for size, w in watchers.items()}
    for size in watchers:
        WATCH_IDLE[f"{size[0]}x{size[1]}"] = (idle[size] - before[size]) / 3.0
    cfg = data / "bench.toml"
    cfg.write_text(f'station = "bench"\ndata_dir = "{data}"\n[mqtt]\nurl = "{broker.url}"\n')
    got: Captured = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe("dynoai/bench/#", qos=1)
        exe = Path(sys.executable).parent / "dynoai"
        proc = await asyncio.create_subprocess_exec(
            str(exe), "simulate", "--config", str(cfg), "--scenario", scenario,
            "--speed", str(speed), "--data-dir", str(data),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        async def read() -> None:
            async for m in client.messages:
                raw = m.payload
                got.append(
                    (time.monotonic(), m.topic.value, bytes(raw) if isinstance(raw, bytes) else b"")
                )

        reader = asyncio.create_task(read())
        rc = await proc.wait()
        await asyncio.sleep(0.5)  # the last retained/session messages
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    for size, w in watchers.items():
        WATCH[f"{size[0]}x{size[1]}"] = w.cpu() - idle[size]
        await w.quit()
    if rc != 0:
        raise SystemExit(f"simulate failed: exit {rc}")
    return got


def cpu(fn: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()  # type: ignore[operator]
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="hot_day_knock")
    ap.add_argument("--speed", type=float, default=4.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dynoai-bench-watch-") as tmp, MosquittoBroker() as b:
        data = Path(tmp)
        msgs = asyncio.run(capture(b, data, args.scenario, args.speed))
        span = msgs[-1][0] - msgs[0][0]
        minutes = span / 60.0
        kinds: dict[str, int] = {}
        for _, topic, _ in msgs:
            key = topic.split("/", 2)[2].split("/")[0]
            kinds[key] = kinds.get(key, 0) + 1
        print(
            f"captured {len(msgs)} messages over {span:.1f} s of stream "
            f"({len(msgs) / span:.1f}/s): {kinds}"
        )

        def baseline() -> None:
            for _, _, p in msgs:
                if p:
                    json.loads(p)

        def new_state() -> WatchState:
            return WatchState(
                base="dynoai",
                station="bench",
                rpm_axis=[float(v) for v in DEFAULT_RPM_AXIS],
                map_axis=[float(v) for v in DEFAULT_MAP_AXIS],
            )

        def model() -> None:
            st = new_state()
            for _, topic, p in msgs:
                st.apply(topic, p)

        def model_paint() -> None:
            st = new_state()
            next_paint = msgs[0][0]
            dirty: set[str] = set()
            for t, topic, p in msgs:
                dirty |= st.apply(topic, p)
                if t >= next_paint and dirty:
                    next_paint = t + 0.1
                    if dirty & {"cells", "live", "session"}:
                        render_grid(st, "front", "correction")
                    if "live" in dirty:
                        render_live(st, compact=True)
                    if dirty & {"alerts", "health", "session", "tune"}:
                        render_alerts(st, 20)
                        render_sources(st)
                    dirty = set()

        for size, sec in WATCH.items():
            print(
                f"dynoai watch {size:>6} (real process on a pty): {sec:.2f} CPU s over the "
                f"stream, {sec / minutes:.2f} CPU s per minute ({sec / span * 100:.1f} % of a core;"
                f" idle {WATCH_IDLE[size] * 100:.1f} %)"
            )
        base = cpu(baseline)
        mod = cpu(model)
        paint = cpu(model_paint)
        for name, sec in (("baseline json.loads", base), ("state model", mod),
                          ("model + 10 Hz paint", paint)):  # fmt: skip
            print(
                f"{name:22s} {sec:7.4f} CPU s total, {sec / minutes:7.4f} CPU s per minute "
                f"of stream ({sec / minutes / 60 * 100:5.2f} % of one core), "
                f"x{sec / base:5.2f} baseline"
            )

        from dynoai_daemon.report import build_report

        sessions = sorted((data / "sessions").glob("*.json"))
        settings = load_settings(None)
        out = data / "report.html"
        t0 = time.perf_counter()
        built = build_report(sessions, out, settings, data_dir=data)
        wall = time.perf_counter() - t0
        print(
            f"report of {len(sessions)} sessions: {built.size / 1024:.0f} kB, "
            f"{len(built.figures)} figures, {wall:.2f} s wall"
        )
        single = data / "one.html"
        t0 = time.perf_counter()
        one = build_report(sessions[:1], single, settings, data_dir=data)
        print(
            f"report of 1 session: {one.size / 1024:.0f} kB, {len(one.figures)} figures, "
            f"{time.perf_counter() - t0:.2f} s wall"
        )
        os.sync()


if __name__ == "__main__":
    main()

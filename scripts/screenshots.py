"""Regenerate the README screenshots in docs/img/ from a real simulated pull.

A private mosquitto, ``dynoai simulate`` publishing into it at a slow speed, and
``dynoai watch``'s app in Textual's headless mode at 160x50 and then 80x24, each saved as
an SVG screenshot once the grid has filled, then rendered to PNG by headless Chromium.
When the simulation is over, ``dynoai report`` of its sessions is rendered to PNG too.

Run: .venv/bin/python scripts/screenshots.py [--scenario NAME] [--out docs/img]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS, load_settings
from dynoai_daemon.report import build_report
from dynoai_daemon.watch.app import Broker, WatchApp
from dynoai_daemon.watch.state import WatchState
from tests.mosquitto import MosquittoBroker


def chromium_png(src: Path, png: Path, size: tuple[int, int], profile: Path) -> None:
    exe = shutil.which("chromium")
    if exe is None:
        raise SystemExit("chromium not installed")
    subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
         f"--window-size={size[0]},{size[1]}", src.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


async def shoot_watch(port: int, size: tuple[int, int], svg: Path, cells: int) -> None:
    state = WatchState(
        base="dynoai",
        station="shop",
        rpm_axis=[float(v) for v in DEFAULT_RPM_AXIS],
        map_axis=[float(v) for v in DEFAULT_MAP_AXIS],
    )
    app = WatchApp(state, Broker("127.0.0.1", port))
    async with app.run_test(size=size) as pilot:
        try:
            async with asyncio.timeout(70):
                await app.wait_until(
                    lambda: state.covered("front") >= cells and state.live_cell is not None
                )
        except TimeoutError:
            print(
                state.grid_source,
                state.bad_messages,
                state.last_session,
                state.messages,
                state.station,
                state.run_id,
                len(state.cells["front"]),
                state.covered("front"),
                state.live_cell,
                app.connection,
            )
            raise
        await pilot.pause()
        app._repaint()
        await pilot.pause()
        await asyncio.to_thread(svg.write_text, app.export_screenshot())
        await pilot.press("q")


async def main_async(args: argparse.Namespace) -> None:
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="dynoai-shots-") as tmp, MosquittoBroker() as b:
        data = Path(tmp)
        cfg = data / "shop.toml"
        cfg.write_text(f'station = "shop"\ndata_dir = "{data}"\n[mqtt]\nurl = "{b.url}"\n')
        exe = Path(sys.executable).parent / "dynoai"
        proc = await asyncio.create_subprocess_exec(
            str(exe), "simulate", "--config", str(cfg), "--scenario", args.scenario,
            "--speed", "2", "--data-dir", str(data),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        shots = []
        for size, cells in (((160, 50), 8), ((80, 24), 6)):
            svg = data / f"watch-{size[0]}x{size[1]}.svg"
            await shoot_watch(b.port, size, svg, cells)
            shots.append(svg)
        await proc.wait()
        for svg in shots:
            m = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text())
            assert m is not None
            w, h = int(float(m.group(1))) + 1, int(float(m.group(2))) + 1
            chromium_png(svg, out / (svg.stem + ".png"), (w, h), data / "profile")
        sessions = sorted((data / "sessions").glob("*.json"))
        html = data / "report.html"
        build_report(sessions, html, load_settings(None), data_dir=data)
        chromium_png(html, out / "report.png", (1200, 2600), data / "profile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="stage2_moderate")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(args))
    print(f"wrote {', '.join(str(p) for p in sorted(out.glob('*.png')))}")


if __name__ == "__main__":
    main()

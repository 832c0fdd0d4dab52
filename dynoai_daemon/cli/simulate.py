"""``dynoai simulate``: the whole daemon against the built-in simulated dyno cell.

The simulated hardware speaks the real wire protocols into the real drivers (widebands as
Innovate MTS on a pseudo-terminal, the ECU as MegaSquirt frames on a python-can ``virtual``
bus, the dyno as JetDrive on loopback multicast). The daemon runs on the cell's clock
(simulated seconds), so ``--speed`` compresses wall time without changing any window the
core applies. Without a reachable broker it starts one on loopback (mosquitto, else
amqtt) or runs without MQTT and says so. Alerts print as they happen (rate-limited), a
summary per run as each session is stored, and the scenario's ground truth is written to
``<data-dir>/truth/<scenario>.json``. Defaults: ``--speed 10`` (the stock scenario's 82
simulated seconds take about 8 s), ``--data-dir ./dynoai-data``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_SPEED = 10.0
DEFAULT_DATA_DIR = "dynoai-data"
ALERT_REPEAT_WALL_S = 2.0


def add_parser(sub: Any) -> None:
    """Register ``simulate``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate", help="run the daemon against the simulated dyno cell"
    )
    p.add_argument(
        "--scenario",
        metavar="NAME_OR_FILE",
        default="stock",
        help="built-in scenario name or scenario TOML file (default: stock)",
    )
    p.add_argument("--pulls", type=int, metavar="N", help="number of pulls (default: the plan's)")
    p.add_argument(
        "--speed",
        type=float,
        default=DEFAULT_SPEED,
        metavar="X",
        help=f"simulated seconds per wall second (default: {DEFAULT_SPEED:g})",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"where sessions and truth go (default: ./{DEFAULT_DATA_DIR})",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (station, mqtt, tuning, ...)")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--no-mqtt", action="store_true", help="do not publish to MQTT")
    p.add_argument(
        "--wideband",
        choices=("mts", "aem", "aem_serial"),
        default="mts",
        help="how the widebands talk: Innovate MTS on a pty (default), AEMnet on CAN, "
        "or two AEM serial gauges on ptys",
    )
    p.set_defaults(handler=run)


class Console:
    """Alert and session lines: rich on a terminal, plain lines otherwise.

    The same alert kind and cylinder prints at most once per ``ALERT_REPEAT_WALL_S`` wall
    seconds; the lines held back are counted and reported with the next one, and every
    alert counts in ``by_kind`` (the final summary line's breakdown).
    """

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._rich: Any = None
        if self.tty:
            from rich.console import Console as RichConsole

            self._rich = RichConsole()
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self.alerts = 0
        self.by_kind: Counter[str] = Counter()
        self.sessions = 0

    def line(self, text: str, style: str = "") -> None:
        """Print one line."""
        if self._rich is not None:
            self._rich.print(text, style=style or None, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def alert(self, alert: Any) -> None:
        """Print an alert unless the same kind/cylinder printed very recently."""
        self.alerts += 1
        self.by_kind[str(alert.kind)] += 1
        key = (str(alert.kind), str(getattr(alert, "cylinder", "") or ""))
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < ALERT_REPEAT_WALL_S:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        cell = ""
        if getattr(alert, "rpm", None) is not None:
            cell = f" at {alert.rpm:.0f} rpm / {alert.map_kpa:.0f} kPa"
        msg = getattr(alert, "message", "") or ""
        more = f" (+{held} similar)" if held else ""
        style = "bold red" if alert.severity in ("critical", "high") else "yellow"
        self.line(f"ALERT {alert.kind} {key[1] or '-'}{cell}: {msg}{more}", style)

    def session(self, session: Any) -> None:
        """Print the run's summary line."""
        from dynoai_daemon.cli.replay import summary_line

        self.sessions += 1
        self.line(summary_line(session), "green")


def run(args: argparse.Namespace) -> int:
    """Simulate; exit 0 when the simulation completed (2 on a bad scenario or config)."""
    from dynoai_daemon.cli.common import settings_from_args
    from dynoai_daemon.errors import ConfigError
    from simulators.scenario import load_scenario

    if not (math.isfinite(args.speed) and args.speed > 0):
        raise ConfigError(
            f"--speed must be a positive finite number, not {args.speed}", field="speed"
        )
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, not {args.seed}", field="seed")
    if args.pulls is not None and args.pulls < 0:
        raise ConfigError("--pulls must be >= 0", field="pulls")
    from dynoai_daemon.logs_setup import configure_logging

    scenario = load_scenario(args.scenario)
    data_dir = args.data_dir
    if data_dir is None and args.config is None:
        data_dir = str(Path.cwd() / DEFAULT_DATA_DIR)
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if args.config is None:
        overrides["station"] = "sim"
    args.data_dir = data_dir
    settings = settings_from_args(args, **{k: v for k, v in overrides.items() if k != "data_dir"})
    if settings.build is None:
        overrides_build = scenario.build.to_build_config()
        settings = settings.model_copy(update={"build": overrides_build})
    # The console shows alerts and summaries; the daemon's own log only for problems.
    configure_logging("warning", station=settings.station)
    return asyncio.run(_simulate(args, settings, scenario))


async def _play(cell: Any) -> None:
    await cell.wait_sources_online()
    await cell.run_until_done()


async def _simulate(args: argparse.Namespace, settings: Any, scenario: Any) -> int:
    from dynoai_daemon.service.daemon import Daemon
    from simulators.broker import BrokerHandle, find_or_start_broker
    from simulators.cell import VirtualCell
    from simulators.truth import export_truth, write_truth

    console = Console()
    broker: BrokerHandle | None = None
    if args.no_mqtt or not settings.mqtt.enabled:
        settings = settings.model_copy(
            update={"mqtt": settings.mqtt.model_copy(update={"enabled": False})}
        )
        console.line("MQTT off (--no-mqtt or mqtt.enabled = false)")
    else:
        found: BrokerHandle = await asyncio.to_thread(find_or_start_broker, settings.mqtt.url)
        broker = found
        console.line(found.message)
        mqtt = (
            settings.mqtt.model_copy(update={"url": found.url})
            if found.url
            else settings.mqtt.model_copy(update={"enabled": False})
        )
        settings = settings.model_copy(update={"mqtt": mqtt})
    cell = VirtualCell(
        scenario, seed=args.seed, speed=args.speed, pulls=args.pulls, wideband=args.wideband
    )
    interrupted = False
    try:
        await cell.start()
        sim = cell.simulation
        assert sim is not None
        console.line(
            f"scenario {scenario.name} (seed {sim.seed}): {cell.duration_s:.0f} simulated s "
            f"at x{args.speed:g}; data in {settings.data_dir}"
        )
        daemon = Daemon(
            settings,
            drivers=cell.drivers(),
            clock=cell.sim_time,
            on_alert=console.alert,
            on_session=console.session,
        )
        cell.forward_availability = daemon._on_availability
        task = asyncio.create_task(daemon.run(), name="daemon")
        try:
            ready = asyncio.create_task(daemon.ready.wait())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                await task  # raises what stopped the daemon
                return 1
            # Ctrl-C/SIGTERM reach the daemon's handlers and stop it: the plan stops with it
            # (a second signal exits at once, see Daemon).
            plan = asyncio.create_task(_play(cell), name="plan")
            done, _ = await asyncio.wait({plan, task}, return_when=asyncio.FIRST_COMPLETED)
            if plan not in done:
                interrupted = True
                plan.cancel()
                await asyncio.gather(plan, return_exceptions=True)
            else:
                plan.result()
        finally:
            daemon.request_stop()
            await task
        truth = export_truth(sim, min_weight=settings.tuning.min_weight)
        path = write_truth(truth, Path(settings.data_dir) / "truth" / f"{scenario.name}.json")
        st = cell.stats
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(console.by_kind.items()))
        console.line(
            ("interrupted" if interrupted else "done")
            + f": {console.sessions} session(s), {console.alerts} alert(s)"
            + (f" ({kinds})" if kinds else "")
            + "; "
            f"{st.events} events sent ({st.mts_packets} MTS packets, {st.can_frames} CAN "
            f"frames, {st.jetdrive_values} JetDrive value datagrams); truth in {path}"
        )
    finally:
        await cell.close()
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    return 130 if interrupted else 0

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
    p.add_argument(
        "--ecu-tune",
        metavar="TUNE",
        help="load the VE (and spark) tables of a tune file into the simulated ECU",
    )
    p.add_argument(
        "--export-ecu-tune",
        metavar="OUT",
        help="write the simulated ECU's VE and spark tables (format by extension) and exit",
    )
    p.add_argument(
        "--fleet",
        type=int,
        metavar="N",
        help="instead: generate sessions for N random builds (parts -> true VE, ECU on the "
        "family's stock map), fast, straight into the core, for `dynoai train`",
    )
    p.set_defaults(handler=run)


def _load_ecu_tune(scenario: Any, path: str) -> tuple[Any, str]:
    """The scenario with a tune file's tables in its ECU, and a line saying what loaded."""
    import numpy as np

    from dynoai_daemon.tune import TuneFormatError, load_tune
    from simulators.scenario import EcuTable

    tune = load_tune(path)
    update: dict[str, Any] = {}
    loaded: list[str] = []
    for name, key in (
        ("ve_front", "ve_table_front"),
        ("ve_rear", "ve_table_rear"),
        ("spark_front", "spark_table"),
    ):
        t = tune.get(name)
        if t is None:
            continue
        if t.load_unit != "kPa":
            raise TuneFormatError(
                f"{name} is on a TPS axis; the simulated ECU runs speed density (kPa)", path
            )
        values = t.values
        if name == "spark_front":
            rear = tune.get("spark_rear")
            if rear is not None and rear is not t and rear.shape == t.shape:
                values = np.minimum(values, rear.values)  # one spark table: the safer one
        update[key] = EcuTable(
            rpm_axis=tuple(float(v) for v in t.rpm_axis),
            map_axis=tuple(float(v) for v in t.load_axis),
            values=tuple(tuple(float(v) for v in row) for row in values),
        )
        loaded.append(name)
    ecu = scenario.ecu.model_copy(update=update)
    return scenario.model_copy(update={"ecu": ecu}), (
        f"ECU tables from {path}: {', '.join(loaded)}"
    )


def _export_ecu_tune(scenario: Any, seed: int | None, out: str) -> str:
    """Write the simulated ECU's tables; return the line to print."""
    from dynoai_daemon.tune import TuneTables, save_tune
    from dynoai_daemon.tune.model import TuneTable
    from simulators.dyno import Simulation

    tab = Simulation(scenario, seed=seed).engine.tables
    tables = {
        name: TuneTable(
            name=name,
            rpm_axis=tab.rpm_axis,
            load_axis=tab.map_axis,
            load_unit="kPa",
            values=values,
            resolution=0.1,
            source="simulated ECU",
        )
        for name, values in (
            ("ve_front", tab.ve_ecu_front),
            ("ve_rear", tab.ve_ecu_rear),
            ("spark_front", tab.spark),
        )
    }
    tune = TuneTables(format="new", tables=tables, aliases={"spark_rear": "spark_front"}, path=out)
    path = save_tune(tune, out)
    return (
        f"wrote {path}: the simulated ECU's ve_front, ve_rear and spark tables of scenario "
        f"{scenario.name} ({tab.rpm_axis.size} rpm x {tab.map_axis.size} kPa)"
    )


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

    if args.fleet is not None:
        return run_fleet(args)
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
    if getattr(args, "ecu_tune", None):
        scenario, loaded = _load_ecu_tune(scenario, args.ecu_tune)
        print(loaded, flush=True)
    if getattr(args, "export_ecu_tune", None):
        print(_export_ecu_tune(scenario, args.seed, args.export_ecu_tune), flush=True)
        return 0
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
    if getattr(args, "ecu_tune", None):
        # The ECU runs the loaded tune: it is the base the sessions' tables refer to.
        tune = settings.tune.model_copy(update={"base": str(Path(args.ecu_tune).resolve())})
        settings = settings.model_copy(update={"tune": tune})
    # The console shows alerts and summaries; the daemon's own log only for problems. On a
    # terminal the console's ALERT line is the one a person reads: the log does not repeat it.
    both_tty = sys.stdout.isatty() and sys.stderr.isatty()
    configure_logging(
        "warning", station=settings.station, drop_events=("alert",) if both_tty else ()
    )
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
        if found.url:
            console.line(
                f"watch it live: dynoai watch --url {found.url} --station {settings.station}"
            )
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
        truth = export_truth(sim)
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
        if console.sessions:
            console.line(f"report: dynoai report {settings.data_dir} -o report.html")
    finally:
        await cell.close()
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    return 130 if interrupted else 0


def run_fleet(args: argparse.Namespace) -> int:
    """``--fleet N``: sessions of N random builds into ``<data-dir>/sessions`` + dataset."""
    from dynoai_daemon.errors import ConfigError
    from dynoai_daemon.store import SessionStore
    from simulators.fleet import generate_fleet

    if args.fleet < 1:
        raise ConfigError("--fleet must be >= 1", field="fleet")
    data_dir = Path(args.data_dir) if args.data_dir else Path.cwd() / DEFAULT_DATA_DIR
    store = SessionStore(data_dir)
    seed = 0 if args.seed is None else args.seed
    t0, c0 = time.perf_counter(), time.process_time()
    sessions = []
    builds: set[int] = set()
    for fs in generate_fleet(args.fleet, seed=seed):
        store.save_session(fs.session)
        sessions.append(fs.session)
        builds.add(fs.build_index)
    store.append_many_to_dataset(sessions)
    print(
        f"fleet: {len(sessions)} session(s) of {len(builds)} build(s) (seed {seed}) written to "
        f"{store.sessions_dir} in {time.perf_counter() - t0:.1f} s "
        f"({time.process_time() - c0:.1f} s CPU)"
    )
    return 0

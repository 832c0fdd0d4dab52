"""The virtual dyno cell: the simulated hardware speaking the real wire protocols.

A :class:`VirtualCell` plays a :class:`~simulators.dyno.Simulation` (or any time-ordered
list of :class:`~simulators.sensors.SimEvent`) onto real transports: the widebands as
Innovate MTS packets on a pseudo-terminal whose slave path the daemon opens like a USB
adapter (or as AEMnet frames on the CAN bus, or as two AEM serial gauges, each writing ASCII
lines on its own pseudo-terminal), the ECU as MegaSquirt broadcast frames on a
python-can bus, and the dyno as a JetDrive provider on loopback multicast (channel values,
and logging begin/end for the plan's run markers). Everything runs on one clock: the cell's
simulated time ``(clock() - t0) * speed``; an event at sim time ``t`` goes out when that
clock reaches ``t`` (plus the moment playback started). The daemon and its drivers are given
the same clock (:meth:`VirtualCell.sim_time`), so every window the core applies (transport
delay, staleness, rate gates, run timeouts) is measured in simulated seconds at any
``speed``; only the scheduling latency of the host is magnified by ``speed``.

Also here: :func:`replay_can_log` (a python-can log onto a bus with its timing) and
:func:`replay_canonical_as_cell` (a canonical CSV played as a simulated cell).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import threading
import time
import tty
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
import numpy as np

from drivers import aem_serial, aemnet, megasquirt
from drivers.can_base import frame_to_message
from drivers.innovate_mts import encode_packet, lambda_item, status_item
from drivers.jetdrive_codec import DEFAULT_GROUP, LoggingCommand
from drivers.registry import create_driver
from dynoai_daemon.logs.readers import read_log
from simulators.dyno import Simulation
from simulators.jetdrive_provider import JetDriveProvider
from simulators.ports import free_port
from simulators.scenario import Scenario, load_scenario
from simulators.sensors import SimEvent

STOICH = 14.7
NM_PER_FTLB = 1.3558179483314004
KW_PER_HP = 0.7456998715822702
#: JetDrive unit codes (docs/protocols.md): rpm, N*m, kW.
UNIT_RPM, UNIT_NM, UNIT_KW = 8, 5, 4
DYNO_CHANNELS: tuple[tuple[str, int], ...] = (
    ("Engine RPM", UNIT_RPM),
    ("Torque", UNIT_NM),
    ("Power", UNIT_KW),
)
#: canonical ECU channel -> MegaSquirt DBC signal.
ECU_SIGNALS: dict[str, str] = {
    "rpm": "rpm",
    "map_kpa": "map",
    "tps_pct": "tps",
    "iat_f": "mat",
    "ect_f": "clt",
    "baro_kpa": "baro",
    "afr_target": "afrtgt1",
    "ve_front": "ve1",
    "ve_rear": "ve2",
    "spark_front_deg": "advance",
}
#: The broadcast frames carry afr1/afr2/batt next to signals we send; the cell's ECU has
#: no wideband and no battery reading, so the daemon's megasquirt source drops them.
MS_DROPPED = {"afr1": "", "afr2": "", "batt": ""}
WIDEBANDS = ("mts", "aem", "aem_serial")
#: The AEM serial gauges: daemon source name -> the AFR channel it feeds.
AEM_SERIAL_SOURCES: dict[str, str] = {"wb_front": "afr_front", "wb_rear": "afr_rear"}
#: Decimals an AEM gauge line carries per display mode ("14.7", "1.00"). *Unverified* for
#: lambda: docs/protocols.md only shows an AFR line; 2 decimals is what the gauge displays.
AEM_DECIMALS: dict[str, int] = {"afr": 1, "lambda": 2}
_counter = itertools.count()


@dataclass
class CellStats:
    """What the cell sent, per transport, and what it could not."""

    events: int = 0
    mts_packets: int = 0
    mts_dropped: int = 0
    #: AEM serial gauge lines written (one per gauge per wideband report).
    aem_lines: int = 0
    #: AEM serial lines lost (pty buffer full or short write).
    aem_dropped: int = 0
    #: AEM serial readings withheld because the sensor was not ready (the gauge's serial
    #: output has no status: it sends nothing rather than a made-up AFR).
    aem_not_ready: int = 0
    can_frames: int = 0
    can_errors: int = 0
    jetdrive_values: int = 0
    markers: int = 0
    max_lag_s: float = 0.0


class VirtualCell:
    """A simulated dyno cell on real transports.

    Args:
        scenario: a :class:`Scenario`, a built-in name or a scenario TOML path; or None
            with ``events`` given.
        seed: overrides the scenario's seed.
        speed: simulated seconds per wall second (> 0).
        pulls: rebuild the plan with this many pulls.
        clock: the wall clock (monotonic seconds).
        jetdrive_port: UDP port of the dyno's multicast group (default: a free one).
        jetdrive_group: the multicast group (loopback interface).
        can_channel: python-can channel (default: unique per cell).
        can_interface: python-can interface (``virtual`` in one process).
        wideband: ``"mts"`` (Innovate MTS on a pty), ``"aem"`` (AEMnet on the CAN bus) or
            ``"aem_serial"`` (two AEM UEGO gauges' serial output, one pty each, read by
            the ``aem_serial`` sources ``wb_front`` and ``wb_rear``).
        aem_mode: display mode of the AEM serial gauges, ``"afr"`` or ``"lambda"``, or a
            (front, rear) pair of them: what their lines carry and what the daemon's
            sources are configured with.
        transport_delay: the simulator's exhaust transport delay on or off.
        events: play these instead of a simulation (time-ordered SimEvents).
        name: label (the scenario's name by default).

    Raises:
        ConfigError: unknown scenario; ValueError: bad speed or wideband.
    """

    def __init__(
        self,
        scenario: Scenario | str | os.PathLike[str] | None,
        *,
        seed: int | None = None,
        speed: float = 1.0,
        pulls: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        jetdrive_port: int | None = None,
        jetdrive_group: str = DEFAULT_GROUP,
        can_channel: str | None = None,
        can_interface: str = "virtual",
        wideband: str = "mts",
        aem_mode: str | tuple[str, str] = "afr",
        transport_delay: bool = True,
        events: Sequence[SimEvent] | None = None,
        name: str | None = None,
    ) -> None:
        if not (speed > 0 and math.isfinite(speed)):
            raise ValueError(f"speed must be a positive number, got {speed}")
        if wideband not in WIDEBANDS:
            raise ValueError(f"wideband must be one of {', '.join(WIDEBANDS)}, got {wideband!r}")
        modes = (aem_mode, aem_mode) if isinstance(aem_mode, str) else tuple(aem_mode)
        if len(modes) != 2 or any(m not in AEM_DECIMALS for m in modes):
            raise ValueError(
                f"aem_mode must be 'afr', 'lambda' or a (front, rear) pair, got {aem_mode!r}"
            )
        self.simulation: Simulation | None = None
        if events is None:
            if scenario is None:
                raise ValueError("VirtualCell needs a scenario or events")
            sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
            self.simulation = Simulation(
                sc, seed=seed, pulls=pulls, transport_delay=transport_delay
            )
            self.name = name or sc.name
        else:
            self.name = name or "replay"
        self._events: Sequence[SimEvent] | None = events
        self.speed = float(speed)
        self.clock = clock
        self.jetdrive_group = jetdrive_group
        self.jetdrive_port = jetdrive_port or free_port("udp")
        self.can_channel = can_channel or f"dynoai-sim-{os.getpid()}-{next(_counter)}"
        self.can_interface = can_interface
        self.wideband = wideband
        self.wideband_port = ""
        #: AEM serial: daemon source name -> the display mode of that gauge.
        self.aem_modes: dict[str, str] = dict(zip(AEM_SERIAL_SOURCES, modes, strict=True))
        #: AEM serial: daemon source name -> slave path of that gauge's pty.
        self.aem_ports: dict[str, str] = {}
        self._aem_fds: dict[str, tuple[int, int]] = {}
        self.stats = CellStats()
        self.done = asyncio.Event()
        self._t0: float | None = None
        self._offset = 0.0
        self._master: int | None = None
        self._slave: int | None = None
        self._bus: can.BusABC | None = None
        self._provider: JetDriveProvider | None = None
        self._reader_added = False
        self._online: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------ clock

    def sim_time(self) -> float:
        """The cell's clock in simulated seconds (0 until :meth:`start`)."""
        if self._t0 is None:
            return 0.0
        return (self.clock() - self._t0) * self.speed

    @property
    def events(self) -> Sequence[SimEvent]:
        """The events the cell plays (runs the simulation on first use)."""
        if self._events is None:
            assert self.simulation is not None
            self._events = list(self.simulation.run())
        return self._events

    @property
    def duration_s(self) -> float:
        """Simulated length of the playback."""
        ev = self.events
        return float(ev[-1].t) if ev else 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the transports (pty, CAN bus, JetDrive socket); playback starts with
        :meth:`run_until_done`.

        Raises:
            OSError: a pty or socket could not be opened; can.CanError: the bus.
        """
        self.events  # noqa: B018 - simulate before the clock starts, not during playback
        self._t0 = self.clock()
        try:
            if self.wideband == "mts":
                master, slave = os.openpty()
                self._master, self._slave = master, slave
                # Raw on both ends: no echo, no newline translation of binary packets.
                tty.setraw(slave)
                tty.setraw(master)
                os.set_blocking(master, False)
                self.wideband_port = os.ttyname(slave)
                # The daemon may write to the port (MTS commands): drain them so the
                # slave-to-master buffer never fills.
                asyncio.get_running_loop().add_reader(master, self._drain_master)
                self._reader_added = True
            elif self.wideband == "aem_serial":
                for src in AEM_SERIAL_SOURCES:
                    self.aem_ports[src] = self._open_aem_pty(src)
            self._bus = can.Bus(
                interface=self.can_interface, channel=self.can_channel, receive_own_messages=False
            )
            self._provider = JetDriveProvider(
                name="Dynojet 250i sim", channels=DYNO_CHANNELS, clock=self.sim_time
            )
            await self._provider.start(
                group=self.jetdrive_group,
                port=self.jetdrive_port,
                interface_address="127.0.0.1",
                announce_interval_s=5.0,
            )
        except BaseException:
            await self.close()
            raise

    def _open_aem_pty(self, src: str) -> str:
        """Open one gauge's pty like the MTS one (raw, non-blocking master, drained)."""
        master, slave = os.openpty()
        self._aem_fds[src] = (master, slave)
        # Raw: the gauge's CR LF must reach the driver untranslated.
        tty.setraw(slave)
        tty.setraw(master)
        os.set_blocking(master, False)
        asyncio.get_running_loop().add_reader(master, self._drain_fd, master)
        return os.ttyname(slave)

    def _drain_fd(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.read(fd, 4096)

    def _drain_master(self) -> None:
        if self._master is None:
            return
        with contextlib.suppress(OSError):
            os.read(self._master, 4096)

    async def close(self) -> None:
        """Close every transport; safe to call more than once."""
        prov, self._provider = self._provider, None
        if prov is not None:
            await prov.close()
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.shutdown()
        if self._master is not None:
            if self._reader_added:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self._master)
                self._reader_added = False
            os.close(self._master)
            self._master = None
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        fds, self._aem_fds = self._aem_fds, {}
        for master, slave in fds.values():
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(master)
            os.close(master)
            os.close(slave)

    async def __aenter__(self) -> VirtualCell:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ daemon side

    def sources(self) -> list[dict[str, Any]]:
        """The daemon's ``[[sources]]`` for this cell (SourceConfig-compatible dicts).

        Valid after :meth:`start` (the pty path exists only then).
        """
        out: list[dict[str, Any]] = []
        if self.wideband == "mts":
            out.append({"name": "widebands", "driver": "innovate_mts", "port": self.wideband_port})
        elif self.wideband == "aem_serial":
            for src, ch in AEM_SERIAL_SOURCES.items():
                out.append(
                    {
                        "name": src,
                        "driver": "aem_serial",
                        "port": self.aem_ports.get(src, ""),
                        "mode": self.aem_modes[src],
                        "channel": ch,
                    }
                )
        else:
            out.append(
                {
                    "name": "widebands",
                    "driver": "aemnet",
                    "interface": self.can_interface,
                    "channel": self.can_channel,
                    "bitrate": None,
                }
            )
        out.append(
            {
                "name": "ecu",
                "driver": "megasquirt",
                "interface": self.can_interface,
                "channel": self.can_channel,
                "bitrate": None,
                "channel_map": dict(MS_DROPPED),
            }
        )
        out.append(
            {
                "name": "dyno",
                "driver": "jetdrive",
                "group": self.jetdrive_group,
                "port": self.jetdrive_port,
                "interface_address": "127.0.0.1",
                "unicast_fallback": False,
            }
        )
        return out

    def drivers(
        self, on_availability: Callable[[str, bool, str], None] | None = None
    ) -> dict[str, Any]:
        """Driver instances for :meth:`sources`, on the cell's clock (for ``Daemon(drivers=)``).

        Each driver's availability is recorded (see :meth:`wait_sources_online`) and
        forwarded to ``on_availability``; assign :attr:`forward_availability` later to
        forward to a daemon built afterwards.
        """
        self.forward_availability = on_availability
        built: dict[str, Any] = {}
        for src in self.sources():
            opts = {k: v for k, v in src.items() if k not in ("name", "driver")}
            self._online[src["name"]] = asyncio.Event()
            built[src["name"]] = create_driver(
                src["driver"],
                source=src["name"],
                clock=self.sim_time,
                on_availability=self._availability,
                **opts,
            )
        return built

    forward_availability: Callable[[str, bool, str], None] | None = None

    def _availability(self, source: str, online: bool, reason: str) -> None:
        ev = self._online.get(source)
        if ev is not None:
            if online:
                ev.set()
            else:
                ev.clear()
        if self.forward_availability is not None:
            self.forward_availability(source, online, reason)

    async def wait_sources_online(self, wait_s: float = 10.0) -> None:
        """Wait until every driver from :meth:`drivers` reported online.

        Raises:
            TimeoutError: one did not come up within ``wait_s`` seconds.
        """
        async with asyncio.timeout(wait_s):
            for ev in self._online.values():
                await ev.wait()
        # JetDrive values before the receiver bound the channel list are held, but an
        # announcement now makes the binding immediate.
        if self._provider is not None:
            self._provider.send_channel_info()

    # ------------------------------------------------------------------ playback

    async def run_until_done(self) -> None:
        """Play every event at its time on the cell's clock, then set :attr:`done`.

        Raises:
            RuntimeError: before :meth:`start`.
        """
        if self._t0 is None or self._bus is None or self._provider is None:
            raise RuntimeError("VirtualCell.run_until_done() before start()")
        events = self.events
        n = len(events)
        self._offset = self.sim_time()
        i = 0
        while i < n:
            now = self.sim_time() - self._offset
            lag = 0.0
            while i < n and events[i].t <= now:
                lag = now - events[i].t
                self._emit(events[i])
                i += 1
            self.stats.max_lag_s = max(self.stats.max_lag_s, lag)
            if i < n:
                await asyncio.sleep(max(0.0, (events[i].t - now) / self.speed))
        self.done.set()

    def _emit(self, ev: SimEvent) -> None:
        self.stats.events += 1
        v = ev.values
        if ev.source == "wideband":
            if self.wideband == "mts":
                self._send_mts(v)
            elif self.wideband == "aem_serial":
                self._send_aem_serial(v)
            else:
                self._send_aem(v)
        elif ev.source == "ecu":
            self._send_ecu(v)
        elif ev.source == "dyno":
            self._send_dyno(v)

    def _send_mts(self, v: dict[str, float]) -> None:
        items = []
        for ch in ("afr_front", "afr_rear"):
            status = int(v.get(f"{ch}_status", 0.0))
            afr = v.get(ch)
            if status != 0 or afr is None:
                items.append(status_item(status or 1, int(v.get(f"{ch}_detail", 0.0)) & 0x1FFF))
            else:
                items.append(lambda_item(afr / STOICH))
        assert self._master is not None
        try:
            os.write(self._master, encode_packet(items))
            self.stats.mts_packets += 1
        except (BlockingIOError, OSError):
            # Nobody reads the port and its buffer is full: a real serial line loses it too.
            self.stats.mts_dropped += 1

    def _send_aem(self, v: dict[str, float]) -> None:
        for idx, ch in enumerate(("afr_front", "afr_rear")):
            status = int(v.get(f"{ch}_status", 0.0))
            afr = v.get(ch)
            if status == 0 and afr is not None:
                frame = aemnet.encode(idx, afr / STOICH, valid=True)
            else:
                frame = aemnet.encode(idx, 1.0, valid=False, fault=status >= 5)
            self._send_can(frame)

    def _send_aem_serial(self, v: dict[str, float]) -> None:
        for src, ch in AEM_SERIAL_SOURCES.items():
            status = int(v.get(f"{ch}_status", 0.0))
            afr = v.get(ch)
            if status != 0 or afr is None or not math.isfinite(afr) or afr <= 0:
                # No status field on the gauge's serial line (docs/protocols.md): a sensor that
                # is not ready sends no reading, never a made-up one.
                self.stats.aem_not_ready += 1
                continue
            mode = self.aem_modes[src]
            value = afr if mode == "afr" else afr / STOICH
            line = aem_serial.encode_line(value, AEM_DECIMALS[mode])
            master = self._aem_fds[src][0]
            try:
                n = os.write(master, line)
            except OSError:  # BlockingIOError included: nobody reads, the buffer is full
                self.stats.aem_dropped += 1
                continue
            if n == len(line):
                self.stats.aem_lines += 1
            else:
                # A short write cuts the line: the driver sees one bad line, as on a wire.
                self.stats.aem_dropped += 1

    def _send_ecu(self, v: dict[str, float]) -> None:
        sig = {ECU_SIGNALS[k]: x for k, x in v.items() if k in ECU_SIGNALS}
        knock = [v[k] for k in ("knock_front_deg", "knock_rear_deg") if k in v]
        if knock:
            # MegaSquirt broadcasts one knock retard (group 52): the worse cylinder's.
            sig["knock_retard"] = min(25.5, max(knock))
        try:
            frames = megasquirt.encode_signals(sig)
        except ValueError:
            self.stats.can_errors += 1
            return
        for fr in frames:
            self._send_can(fr)

    def _send_can(self, frame: Any) -> None:
        assert self._bus is not None
        try:
            self._bus.send(frame_to_message(frame, timestamp=self.sim_time()))
            self.stats.can_frames += 1
        except can.CanError:
            self.stats.can_errors += 1

    def _send_dyno(self, v: dict[str, float]) -> None:
        assert self._provider is not None
        if "run_marker" in v:
            cmd = LoggingCommand.BEGIN if v["run_marker"] >= 0.5 else LoggingCommand.END
            self._provider.send_logging(cmd)
            self.stats.markers += 1
        out: dict[str | int, float] = {}
        if "rpm" in v:
            out["Engine RPM"] = v["rpm"]
        if "torque_ftlb" in v:
            out["Torque"] = v["torque_ftlb"] * NM_PER_FTLB
        if "power_hp" in v:
            out["Power"] = v["power_hp"] * KW_PER_HP
        if out:
            self._provider.send_values(out)
            self.stats.jetdrive_values += 1


# ---------------------------------------------------------------------- log replay


def _scaled(messages: Iterable[can.Message], speed: float) -> Iterator[can.Message]:
    t0: float | None = None
    for m in messages:
        if t0 is None:
            t0 = m.timestamp
        m.timestamp = t0 + (m.timestamp - t0) / speed
        yield m


def replay_can_log(
    path: str | os.PathLike[str],
    bus: can.BusABC,
    speed: float = 1.0,
    *,
    stop: threading.Event | None = None,
    skip_s: float = 60.0,
) -> int:
    """Send a python-can log (candump ``.log``, ``.asc``, ``.blf``, ...) onto ``bus`` with
    its recorded timing (``can.MessageSync``), ``speed`` times faster. Blocking: run it in
    a thread (``asyncio.to_thread``) from async code.

    Args:
        path: the log file (any format ``can.LogReader`` reads).
        bus: where to send.
        speed: time scale (> 0).
        stop: set to end early.
        skip_s: recorded gaps longer than this are shortened to it.

    Returns:
        The number of messages sent.

    Raises:
        ValueError: bad speed or unknown log format; OSError: unreadable file.
    """
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    sent = 0
    reader = can.LogReader(path)
    try:
        for msg in can.MessageSync(
            _scaled(reader, speed), timestamps=True, gap=0.0, skip=skip_s / speed
        ):
            if stop is not None and stop.is_set():
                break
            if msg.is_error_frame:
                continue
            bus.send(msg)
            sent += 1
    finally:
        reader.stop()
    return sent


#: canonical columns the replayed cell sends as dyno channels; AFRs go to the widebands
#: and every column the ECU broadcast carries goes to the ECU.
_DYNO_COLS = ("torque_ftlb", "power_hp")


def canonical_events(csv_path: str | os.PathLike[str]) -> list[SimEvent]:
    """Turn a canonical CSV into time-ordered cell events (time starts at 0).

    Rows with AFRs become wideband reports, ECU channels MegaSquirt reports, torque and
    power (with the row's rpm) JetDrive reports.

    Raises:
        InputError / LogFormatError: the file is not a readable canonical CSV.
    """
    out: list[SimEvent] = []
    t0: float | None = None
    for frame in read_log(Path(csv_path), format="canonical"):
        cols = frame.columns
        ts = frame.t
        if t0 is None and len(ts):
            t0 = float(ts[0])
        for r in range(len(ts)):
            t = float(ts[r]) - (t0 or 0.0)
            row = {k: float(c[r]) for k, c in cols.items() if not np.isnan(c[r])}
            wb: dict[str, float] = {k: row[k] for k in ("afr_front", "afr_rear") if k in row}
            if wb:
                for k in list(wb):
                    wb[f"{k}_status"] = 0.0
                out.append(SimEvent(t, "wideband", wb))
            ecu = {k: x for k, x in row.items() if k in ECU_SIGNALS or k.startswith("knock_")}
            if ecu:
                out.append(SimEvent(t, "ecu", ecu))
            dyno = {k: row[k] for k in _DYNO_COLS if k in row}
            if dyno:
                if "rpm" in row:
                    dyno["rpm"] = row["rpm"]
                out.append(SimEvent(t, "dyno", dyno))
    return out


def replay_canonical_as_cell(
    csv_path: str | os.PathLike[str], *, speed: float = 1.0, **cell_options: Any
) -> VirtualCell:
    """A canonical CSV as a simulated cell: widebands as MTS on a pty, the ECU channels as
    MegaSquirt frames, torque and power as JetDrive. ``start()`` and ``run_until_done()``
    it like any cell.

    Args:
        csv_path: the canonical CSV.
        speed: time scale.
        **cell_options: other :class:`VirtualCell` options.

    Raises:
        InputError / LogFormatError: unreadable or malformed CSV.
    """
    events = canonical_events(csv_path)
    return VirtualCell(None, speed=speed, events=events, name=Path(csv_path).stem, **cell_options)

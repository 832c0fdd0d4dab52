"""The virtual cell's widebands as two AEM serial gauges, end to end through the real daemon.

``VirtualCell(wideband="aem_serial")`` writes each gauge's ASCII lines (``"14.7\\r\\n"`` in
AFR mode, ``"1.00\\r\\n"`` in lambda mode) on its own pseudo-terminal; the daemon reads them
with the real ``aem_serial`` driver (sources ``wb_front`` and ``wb_rear``) and the stored
sessions are held against the simulation's truth like the MTS cell in test_cell.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from drivers.aem_serial import VALID_RANGE, AemDecoder
from dynoai_daemon.channels import SensorStatus
from dynoai_daemon.config import Settings
from dynoai_daemon.service.daemon import Daemon
from simulators.cell import AEM_SERIAL_SOURCES, VirtualCell
from simulators.evaluate import compare_sessions
from simulators.sensors import SimEvent
from simulators.truth import export_truth
from tests.simclock import stall_free_clock

pytestmark = pytest.mark.timeout(60)


async def simulate_aem(
    tmp: Path,
    scenario: str,
    *,
    aem_mode: str | tuple[str, str],
    speed: float = 20.0,
    pulls: int | None = None,
) -> tuple[list[Any], dict[str, Any], VirtualCell, dict[str, Any]]:
    """Run one scenario with AEM serial widebands; returns sessions, truth, cell, drivers."""
    cell = VirtualCell(
        scenario,
        speed=speed,
        pulls=pulls,
        wideband="aem_serial",
        aem_mode=aem_mode,
        clock=stall_free_clock(speed),  # simulated time without the host's stalls
    )
    sessions: list[Any] = []
    await cell.start()
    try:
        settings = Settings(station="sim", data_dir=tmp, mqtt={"enabled": False})
        drivers = cell.drivers()
        daemon = Daemon(settings, drivers=drivers, clock=cell.sim_time, on_session=sessions.append)
        cell.forward_availability = daemon._on_availability
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            await cell.wait_sources_online()
            await cell.run_until_done()
            # Let the gauges' last lines reach the drivers before stopping.
            # Bounded by a generous deadline, not by a count of short sleeps, so a loaded
            # host only makes this wait longer.
            gauges = [drivers[src] for src in AEM_SERIAL_SOURCES]
            async with asyncio.timeout(10):
                while sum(d.stats.samples for d in gauges) < cell.stats.aem_lines:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            daemon.request_stop()
            await task
    finally:
        await cell.close()
    assert cell.simulation is not None
    return sessions, export_truth(cell.simulation), cell, drivers


async def test_aem_serial_cell_against_truth(tmp_path: Path) -> None:
    # Front gauge in AFR mode, rear in lambda mode: both line formats in one run. One pull
    # at x10 (~6 s of wall clock): at x20 a start-of-pull cell (2000 rpm, low MAP) is now
    # and then 1-2 pp off with the MTS widebands too (host scheduling jitter is magnified
    # by the speed); at x10 the p95 stays near 0.3-0.45 pp.
    modes = {"wb_front": "afr", "wb_rear": "lambda"}
    sessions, truth, cell, drivers = await simulate_aem(
        tmp_path, "stock", aem_mode=("afr", "lambda"), speed=10.0, pulls=1
    )
    cmp = compare_sessions(sessions, truth)
    st = cell.stats
    print(cmp.summary(), st)
    # Nothing lost on the way: no line dropped at the pty, none rejected by the driver.
    assert st.aem_lines > 0 and st.aem_dropped == 0 and st.mts_packets == 0
    assert st.can_errors == 0
    # The sensor warms up first: the gauges stayed silent rather than sending an AFR.
    assert st.aem_not_ready > 0
    for src, ch in AEM_SERIAL_SOURCES.items():
        d = drivers[src]
        assert d.name == "aem_serial" and d.channel == ch and d.mode == modes[src]
        assert d.stats.samples > 0
        assert d.stats.bad_frames == 0 and d.stats.skipped_bytes == 0 and d.stats.drops == 0
    assert sum(drivers[src].stats.samples for src in AEM_SERIAL_SOURCES) == st.aem_lines
    assert sessions and cmp.ve_cells >= 15
    assert cmp.ve_p95_abs is not None and cmp.ve_p95_abs <= 1.0
    assert not cmp.imbalance_found and not cmp.knock_found


@pytest.mark.parametrize(
    ("aem_mode", "expected"),
    [
        ("afr", [b"13.2\r\n", b"12.9\r\n"]),
        ("lambda", [b"0.90\r\n", b"0.88\r\n"]),
        (("afr", "lambda"), [b"13.2\r\n", b"0.88\r\n"]),
    ],
)
async def test_aem_serial_lines_on_the_wire(
    aem_mode: str | tuple[str, str], expected: list[bytes]
) -> None:
    modes = [aem_mode] * 2 if isinstance(aem_mode, str) else list(aem_mode)
    warming = float(SensorStatus.WARMING_UP)
    events = [
        # Warming up: no reading on either gauge (the serial line has no status field).
        SimEvent(0.0, "wideband", {"afr_front_status": warming, "afr_rear_status": warming}),
        SimEvent(
            0.01,
            "wideband",
            {
                "afr_front": 13.23,
                "afr_front_status": 0.0,
                "afr_rear": 12.94,
                "afr_rear_status": 0.0,
            },
        ),
    ]
    cell = VirtualCell(None, events=events, speed=1.0, wideband="aem_serial", aem_mode=aem_mode)
    await cell.start()
    try:
        srcs = cell.sources()
        gauges = [s for s in srcs if s["driver"] == "aem_serial"]
        assert [(s["name"], s["channel"], s["mode"]) for s in gauges] == [
            ("wb_front", "afr_front", modes[0]),
            ("wb_rear", "afr_rear", modes[1]),
        ]
        fds = {}
        for s in gauges:
            fd = os.open(s["port"], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
            fds[s["name"]] = fd
        try:
            await cell.run_until_done()
            await asyncio.sleep(0.05)
            got = [os.read(fds[name], 256) for name in AEM_SERIAL_SOURCES]
        finally:
            for fd in fds.values():
                os.close(fd)
    finally:
        await cell.close()
    assert got == expected
    assert cell.stats.aem_lines == 2 and cell.stats.aem_not_ready == 2
    # And the driver's own decoder reads them back in its configured mode.
    for line, mode in zip(got, modes, strict=True):
        dec = AemDecoder(VALID_RANGE[mode])
        assert len(dec.feed(line)) == 1 and dec.bad_frames == 0


def test_aem_serial_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="aem_mode"):
        VirtualCell(None, events=[], wideband="aem_serial", aem_mode="volts")
    with pytest.raises(ValueError, match="aem_mode"):
        VirtualCell(None, events=[], wideband="aem_serial", aem_mode=("afr", "volts"))
    with pytest.raises(ValueError, match="wideband"):
        VirtualCell(None, events=[], wideband="aem_can")

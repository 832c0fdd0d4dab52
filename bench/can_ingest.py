"""Benchmark: CAN decode into the core (codecs -> Samples -> Frame -> Core.feed), in-process.

Pre-builds a realistic mix of ``can.Message`` objects (default 200,000 frames): MegaSquirt
groups 0-3 at 100 Hz and 4, 6, 7 at 50 Hz, two AEMnet widebands at 100 Hz, two rusEFI
wideband controllers at 100 Hz with diagnostics at 10 Hz, all encoded with the drivers' own
encoders along a dyno-pull-like sweep. Every frame is offered to all three drivers (each
driver sees the whole bus, as on a real shared bus) through ``CanDriver.ingest``, the live
decode path; samples are cut into 20 ms micro-batches like the daemon's hub, turned into a
Frame with ``samples_to_frame`` and fed to ``dynoai_daemon.core.Core`` (also once more with
100 ms batches, since the core has a fixed cost per call). The last stage receives the
frames from a python-can ``virtual`` bus (``Bus.recv``) first, so python-can's receive is
in it too. Not measured here: the drivers' event-loop reader, the daemon's hub, arbiter,
alerts and raw recorder (``bench/daemon_load.py`` measures the daemon as a whole). Prints
frames/s per stage, each one's ratio to the codec-only baseline of the same run and to a
saturated 1 Mbit/s bus (9,009 frames/s). Target: ratio >= 10.

Run: .venv/bin/python bench/can_ingest.py [--frames N] [--batch-ms MS]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import can

from drivers import aemnet, megasquirt, rusefi_wbo
from drivers.can_base import CanDriver, CanFrame, frame_to_message
from dynoai_daemon.channels import Sample, samples_to_frame
from dynoai_daemon.config import GridConfig, TuningConfig
from dynoai_daemon.core import Core

SATURATED_1MBIT_FPS = 9009.0


def engine_state(t: float) -> dict[str, float]:
    """A repeating 10 s cycle: 2 s idle, 8 s pull from 2000 to 6000 rpm at rising MAP."""
    phase = t % 10.0
    if phase < 2.0:
        rpm, kpa, tps = 1000.0, 35.0, 2.0
    else:
        x = (phase - 2.0) / 8.0
        rpm, kpa, tps = 2000.0 + 4000.0 * x, 60.0 + 40.0 * x, 100.0
    wobble = 0.2 * math.sin(7.0 * t)
    return {
        "rpm": rpm,
        "map": kpa,
        "tps": tps,
        "afr_f": 13.0 + wobble,
        "afr_r": 13.2 - wobble,
        "mat": 95.0 + t * 0.01 % 20,
        "clt": 190.0,
    }


def build_frames(n: int) -> list[can.Message]:
    """Return ``n`` frames of the mix in time order (timestamps in seconds from 0)."""
    # (period s, phase offset s, encoder of the engine state at t)
    streams: list[tuple[float, float, object]] = []

    def ms_group(group: int) -> object:
        def enc(s: dict[str, float]) -> CanFrame:
            values = {
                0: {"rpm": s["rpm"], "pw1": 4.2, "pw2": 4.3, "seconds": 100},
                1: {"advance": 28.0, "afrtgt1": 13.0, "afrtgt2": 13.0},
                2: {"baro": 100.0, "map": s["map"], "mat": s["mat"], "clt": s["clt"]},
                3: {"tps": s["tps"], "batt": 13.8, "afr1": s["afr_f"], "afr2": s["afr_r"]},
                4: {"knock": 0.0, "egocor1": 100.0, "egocor2": 100.0, "aircor": 100.0},
                6: {"totalcor": 100.0, "ve1": 80.0, "ve2": 82.0, "iacstep": 10},
                7: {"cold_adv_deg": 0.0, "tpsdot": 5.0, "mapdot": 1.0, "rpmdot": 50.0},
            }[group]
            return megasquirt.encode_group(group, values)

        return enc

    for g in (0, 1, 2, 3):
        streams.append((0.01, 0.0005 * g, ms_group(g)))
    for g in (4, 6, 7):
        streams.append((0.02, 0.003 + 0.0005 * g, ms_group(g)))
    streams.append((0.01, 0.0061, lambda s: aemnet.encode_afr(0, s["afr_f"])))
    streams.append((0.01, 0.0063, lambda s: aemnet.encode_afr(1, s["afr_r"])))
    streams.append((0.01, 0.0071, lambda s: rusefi_wbo.encode(0, s["afr_f"] / 14.7)))
    streams.append((0.01, 0.0073, lambda s: rusefi_wbo.encode(1, s["afr_r"] / 14.7)))
    streams.append((0.1, 0.0081, lambda s: rusefi_wbo.encode_diag(0)))
    streams.append((0.1, 0.0083, lambda s: rusefi_wbo.encode_diag(1)))
    per_second = sum(1.0 / p for p, _, _ in streams)
    duration = n / per_second + 1.0
    timed: list[tuple[float, object]] = []
    for period, phase, enc in streams:
        k = 0
        while (t := phase + k * period) < duration:
            timed.append((t, enc))
            k += 1
    timed.sort(key=lambda te: te[0])
    out: list[can.Message] = []
    for t, enc in timed[:n]:
        frame = enc(engine_state(t))  # type: ignore[operator]
        out.append(frame_to_message(frame, timestamp=t))
    return out


def make_drivers() -> list[CanDriver]:
    """The three drivers a cell with this bus would run (constructors do no I/O)."""
    return [
        megasquirt.MegasquirtDriver(interface="virtual", channel="bench", source="ecu"),
        aemnet.AemNetDriver(interface="virtual", channel="bench", source="aem"),
        rusefi_wbo.RusefiWboDriver(
            interface="virtual",
            channel="bench",
            source="wbo",
            channel_map={"0": "afr_wbo0", "1": "afr_wbo1"},
        ),
    ]


def _received(bus: can.BusABC) -> Iterator[can.Message]:
    while (m := bus.recv(timeout=0)) is not None:
        yield m


def run(frames: list[can.Message], batch_s: float, stage: str) -> tuple[float, int, int]:
    """Time one pass; returns (seconds, samples, rows fed).

    Stages: ``codec``, ``frame`` (+ samples_to_frame), ``core`` (+ Core.feed), ``bus``
    (python-can virtual bus receive + all of ``core``).
    """
    drivers = make_drivers()
    ingests = [d.ingest for d in drivers]
    core = Core(grid=GridConfig(), tuning=TuningConfig(), station="bench")
    feed = core.feed if stage in ("core", "bus") else None
    to_frame = stage != "codec"
    source: Iterator[can.Message] = iter(frames)
    buses: list[can.BusABC] = []
    if stage == "bus":
        channel = f"bench-{uuid.uuid4().hex}"
        buses = [can.Bus(interface="virtual", channel=channel) for _ in range(2)]
        for m in frames:  # queued on the receiving bus; the sending is not timed
            buses[0].send(m)
        source = _received(buses[1])
    batch: list[Sample] = []
    n_samples = 0
    rows = 0
    t_cut = frames[0].timestamp + batch_s
    t0 = time.perf_counter()
    for i, m in enumerate(source):
        t = frames[i].timestamp  # the virtual bus re-stamps with the wall clock
        if t >= t_cut:
            n_samples += len(batch)
            if to_frame and batch:
                fr = samples_to_frame(batch)
                rows += len(fr)
                if feed is not None:
                    feed(fr)
            batch = []
            t_cut = t + batch_s
        for ingest in ingests:
            ingest(m, t, batch)
    n_samples += len(batch)
    if to_frame and batch:
        fr = samples_to_frame(batch)
        rows += len(fr)
        if feed is not None:
            feed(fr)
    elapsed = time.perf_counter() - t0
    for bus in buses:
        bus.shutdown()
    bad = sum(d.stats.bad_frames for d in drivers)
    decoded = sum(d.stats.messages for d in drivers)
    assert bad == 0 and decoded == len(frames), (bad, decoded, len(frames))
    return elapsed, n_samples, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--batch-ms", type=float, default=20.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    frames = build_frames(args.frames)
    build_s = time.perf_counter() - t0
    span = frames[-1].timestamp - frames[0].timestamp
    print(
        f"built {len(frames):,} frames ({len(frames) / span:,.0f} frames/s of bus time, "
        f"{span:,.1f} s) in {build_s:.2f} s"
    )
    batch_s = args.batch_ms / 1000.0
    # What a saturated bus looks like to the daemon: 20 ms of 9,009 frames/s is ~180 frames
    # per feed. The mix above is ~970 frames/s of bus time, so the same frame count per feed
    # is a batch of 180 / rate seconds of it.
    sat_s = batch_s * SATURATED_1MBIT_FPS / (len(frames) / span)
    stages: list[tuple[str, str, float]] = [
        ("codec", "codec", batch_s),
        ("+frame", "frame", batch_s),
        ("+core", "core", batch_s),
        ("+core@100ms", "core", 0.1),  # the core's fixed cost per feed() amortised
        ("+core@sat", "core", sat_s),
        ("bus+core@sat", "bus", sat_s),
    ]
    base = 0.0
    print(f"{'stage':<14}{'s':>7}{'frames/s':>12}{'samples/s':>12}{'x codec':>9}{'x 1Mbit':>9}")
    for label, stage, bs in stages:
        secs, n_samples, _ = run(frames, bs, stage)
        fps = len(frames) / secs
        base = base or fps
        ratio = fps / SATURATED_1MBIT_FPS
        print(
            f"{label:<14}{secs:>7.3f}{fps:>12,.0f}{n_samples / secs:>12,.0f}"
            f"{fps / base:>9.2f}{ratio:>8.1f}x{'' if ratio >= 10 else '  (target 10x NOT met)'}"
        )
    print(
        "x 1Mbit: against a saturated 1 Mbit/s bus (9,009 frames/s). Not in any stage: the "
        "drivers' event-loop reader, hub, arbiter, alerts, raw recorder (bench/daemon_load.py)."
    )


if __name__ == "__main__":
    main()

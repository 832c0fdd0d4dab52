"""Benchmark: Innovate MTS stream decoding against the serial line rate.

Builds a realistic MTS byte stream (default 2 MB): mostly two-sensor chain packets
(``B2 84``) along a rich-to-lean AFR sweep, every 50th packet an LM-2 style packet with
four aux words, every 200th a sensor-state packet (warming up, free-air O2 level, an error
code), and every 500th packet preceded by a few random garbage bytes (line noise). All
packets come from the codec's own encoder. It then times ``MtsDecoder.feed`` over the
stream in 64-byte and 4096-byte chunks (the sizes a busy and an idle event loop hand to
the reader), and the full live path ``InnovateMtsDriver.ingest`` (decode + Samples) in
64-byte chunks. Prints bytes/s, packets/s and each one's ratio to the line rate of
19200 baud 8N1 (1920 bytes/s), and checks that every packet was decoded and every garbage
byte counted.

Run: .venv/bin/python bench/serial_ingest.py [--mbytes 2] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.innovate_mts import (
    AuxItem,
    InnovateMtsDriver,
    MtsDecoder,
    encode_packet,
    lambda_item,
    status_item,
)
from dynoai_daemon.channels import Sample, SensorStatus

LINE_RATE_BPS = 19200 / 10  # 8N1: 10 bits per byte


def build_stream(nbytes: int, seed: int) -> tuple[bytes, int, int]:
    """Return (stream, packets, garbage bytes) of about ``nbytes`` bytes."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    size = packets = garbage = 0
    i = 0
    while size < nbytes:
        t = i * 0.08192
        lam_f = 0.85 + 0.1 * math.sin(0.3 * t) + rng.gauss(0, 0.005)
        lam_r = lam_f + 0.02 + rng.gauss(0, 0.005)
        if i % 500 == 499:
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
            # Keep the noise from ending in half a header so the count below is exact.
            junk = bytes(b & 0x7F for b in junk)
            parts.append(junk)
            garbage += len(junk)
            size += len(junk)
        if i % 200 == 199:
            state = [
                status_item(SensorStatus.WARMING_UP, rng.randint(0, 1000)),
                status_item(SensorStatus.O2_LEVEL, 209),
                status_item(SensorStatus.ERROR, rng.randint(1, 9)),
            ][(i // 200) % 3]
            pkt = encode_packet([state, lambda_item(lam_r)])
        elif i % 50 == 49:
            aux = [AuxItem(rng.randrange(1024)) for _ in range(4)]
            pkt = encode_packet([lambda_item(lam_f), *aux])
        else:
            pkt = encode_packet([lambda_item(lam_f), lambda_item(lam_r)])
        parts.append(pkt)
        size += len(pkt)
        packets += 1
        i += 1
    return b"".join(parts), packets, garbage


def time_decoder(stream: bytes, chunk: int) -> tuple[float, int, int]:
    """Return (seconds, packets, skipped bytes) for one pass of MtsDecoder.feed."""
    dec = MtsDecoder()
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(stream), chunk):
        n += len(dec.feed(stream[i : i + chunk]))
    dt = time.perf_counter() - t0
    return dt, n, dec.skipped_bytes


def time_driver(stream: bytes, chunk: int) -> tuple[float, int, int]:
    """Return (seconds, messages, samples) for the live decode path (decode + Samples)."""
    drv = InnovateMtsDriver(source="wb")
    out: list[Sample] = []
    t0 = time.perf_counter()
    for i in range(0, len(stream), chunk):
        drv.ingest(stream[i : i + chunk], 0.0, out)
        if len(out) > 100_000:
            out.clear()  # the hub would take them; keep memory flat
    dt = time.perf_counter() - t0
    return dt, drv.stats.messages, drv.stats.samples or 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    stream, packets, garbage = build_stream(int(args.mbytes * 1e6), args.seed)
    print(
        f"stream: {len(stream):,} bytes, {packets:,} packets, {garbage} garbage bytes "
        f"(= {len(stream) / LINE_RATE_BPS / 3600:.1f} h of 19200 baud)"
    )
    print(f"{'path':<28}{'bytes/s':>14}{'packets/s':>14}{'x line rate':>14}")

    def row(label: str, dt: float, n: int) -> None:
        bps = len(stream) / dt
        print(f"{label:<28}{bps:>14,.0f}{n / dt:>14,.0f}{bps / LINE_RATE_BPS:>14,.0f}")

    for chunk in (64, 4096):
        dt, n, skipped = time_decoder(stream, chunk)
        assert n == packets, (n, packets)
        assert skipped == garbage, (skipped, garbage)
        row(f"MtsDecoder.feed {chunk} B", dt, n)
    dt, n, _ = time_driver(stream, 64)
    assert n == packets, (n, packets)
    row("driver.ingest 64 B", dt, n)


if __name__ == "__main__":
    main()

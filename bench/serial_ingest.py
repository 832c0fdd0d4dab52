"""Benchmark: Innovate MTS stream decoding against the serial line rate, and resync cost.

Builds a realistic MTS byte stream (default 2 MB): mostly two-sensor chain packets
(``B2 84``) along a rich-to-lean AFR sweep, every 50th packet an LM-2 style packet with
four aux words, every 200th a sensor-state packet (warming up, free-air O2 level, an error
code); all packets come from the codec's own encoder. The same packets are laid out three
times: clean (the baseline), with light line noise (a burst every 500th packet) and with
heavy noise (a burst every 10th packet). A burst is real garbage: random bytes over the
whole 0-255 range (so header-like bytes with bit 7 set occur), and one burst in four is the
start of a real packet cut off mid-way (what a reconnect or a dropped byte leaves), so the
decoder has to resynchronise on false headers, not just skip 7-bit junk. It times
``MtsDecoder.feed`` over each stream in 64-byte and 4096-byte chunks (the sizes a busy and
an idle event loop hand to the reader), and the live path ``InnovateMtsDriver.ingest``
(decode + Samples) in 64-byte chunks. Prints bytes/s, packets/s, the ratio to the line rate
of 19200 baud 8N1 (1920 bytes/s) and to the clean baseline of the same run, the packets a
noisy stream lost (a false header may swallow the real packet after it) and the resync
cost: extra time per garbage byte against the clean stream.

Run: .venv/bin/python bench/serial_ingest.py [--mbytes 2] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
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


def build_packets(nbytes: int, seed: int) -> list[bytes]:
    """Return the encoded packets of about ``nbytes`` bytes of stream."""
    rng = random.Random(seed)
    out: list[bytes] = []
    size = 0
    i = 0
    while size < nbytes:
        t = i * 0.08192
        lam_f = 0.85 + 0.1 * math.sin(0.3 * t) + rng.gauss(0, 0.005)
        lam_r = lam_f + 0.02 + rng.gauss(0, 0.005)
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
        out.append(pkt)
        size += len(pkt)
        i += 1
    return out


def with_noise(packets: list[bytes], every: int, seed: int) -> tuple[bytes, int]:
    """Lay ``packets`` out with a garbage burst before every ``every``-th one.

    Returns:
        (stream, garbage bytes inserted).
    """
    if every <= 0:
        return b"".join(packets), 0
    rng = random.Random(seed)
    parts: list[bytes] = []
    garbage = 0
    for i, pkt in enumerate(packets):
        if i % every == every - 1:
            if rng.random() < 0.25:  # a real packet cut off mid-way: a header that lies
                other = packets[rng.randrange(len(packets))]
                junk = other[: rng.randint(2, len(other) - 1)]
            else:
                junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            parts.append(junk)
            garbage += len(junk)
        parts.append(pkt)
    return b"".join(parts), garbage


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
    """Return (seconds, messages, skipped bytes) for the live path (decode + Samples)."""
    drv = InnovateMtsDriver(source="wb")
    out: list[Sample] = []
    t0 = time.perf_counter()
    for i in range(0, len(stream), chunk):
        drv.ingest(stream[i : i + chunk], 0.0, out)
        if len(out) > 100_000:
            out.clear()  # the hub would take them; keep memory flat
    dt = time.perf_counter() - t0
    return dt, drv.stats.messages, drv.sync_stats().skipped_bytes


def accounting(packets: list[bytes], stream: bytes) -> tuple[int, int]:
    """Return (lost, phantom): sent packets not decoded, decoded packets never sent.

    The decoded packets are matched in order against the sent ones (a sent packet may be
    swallowed by a false header before it; a garbage burst may itself decode as a packet).
    """
    sent = [MtsDecoder().feed(p)[0].words for p in packets]
    got = [p.words for p in MtsDecoder().feed(stream)]
    j = lost = phantom = 0
    for words in got:
        ahead = next((k for k in range(j, min(j + 4, len(sent))) if sent[k] == words), None)
        if ahead is None:
            phantom += 1
            continue
        lost += ahead - j
        j = ahead + 1
    return lost + len(sent) - j, phantom


Timed = Callable[[bytes], tuple[float, int, int]]


def interleaved_best(repeat: int, fn: Timed, streams: list[bytes]) -> list[tuple[float, int, int]]:
    """The fastest of ``repeat`` runs per stream, the streams taking turns in each round.

    Taking turns spreads a busy machine's slow spells over all streams alike, so the
    ratios against the clean stream stay fair; the minimum drops the slow spells.
    """
    best: list[tuple[float, int, int] | None] = [None] * len(streams)
    for _ in range(repeat):
        for i, stream in enumerate(streams):
            r = fn(stream)
            prev = best[i]
            if prev is None or r[0] < prev[0]:
                best[i] = r
    return [b for b in best if b is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="runs per timing (best is kept)")
    args = ap.parse_args()
    packets = build_packets(int(args.mbytes * 1e6), args.seed)
    streams = {
        "clean": with_noise(packets, 0, args.seed),
        "noise/500": with_noise(packets, 500, args.seed),
        "noise/10": with_noise(packets, 10, args.seed),
    }
    clean = streams["clean"][0]
    print(
        f"{len(packets):,} packets, {len(clean):,} bytes clean "
        f"(= {len(clean) / LINE_RATE_BPS / 3600:.1f} h of 19200 baud)"
    )
    for name, (stream, garbage) in streams.items():
        lost, phantom = accounting(packets, stream)
        print(
            f"  {name:<10} {garbage:>8,} garbage bytes: {lost:,} packets lost to false "
            f"headers, {phantom:,} phantom packets decoded from garbage"
        )
    print(
        f"{'path':<33}{'bytes/s':>12}{'packets/s':>12}{'x line':>9}{'x clean':>9}"
        f"{'skipped B':>11}{'resync ns/B':>13}"
    )
    paths: list[tuple[str, Timed]] = [
        ("MtsDecoder.feed 64 B", lambda st: time_decoder(st, 64)),
        ("MtsDecoder.feed 4096 B", lambda st: time_decoder(st, 4096)),
        ("driver.ingest 64 B", lambda st: time_driver(st, 64)),
    ]
    for label, fn in paths:
        best = interleaved_best(args.repeat, fn, [st for st, _ in streams.values()])
        base_dt = 0.0
        for (name, (stream, garbage)), (dt, n, skipped) in zip(streams.items(), best, strict=True):
            if name == "clean":
                assert n == len(packets) and skipped == 0, (n, skipped)
                base_dt = dt
            bps = len(stream) / dt
            # the noisy stream carries the same packets plus the garbage: the extra time
            # is what resynchronising costs
            # (only where garbage is over 1 % of the stream: below that it drowns in noise)
            resync = (
                f"{(dt - base_dt) / garbage * 1e9:,.0f}" if garbage > len(stream) / 100 else "-"
            )
            print(
                f"{label + ' ' + name:<33}{bps:>12,.0f}{n / dt:>12,.0f}"
                f"{bps / LINE_RATE_BPS:>9,.0f}{base_dt / dt:>9.2f}{skipped:>11,}{resync:>13}"
            )


if __name__ == "__main__":
    main()

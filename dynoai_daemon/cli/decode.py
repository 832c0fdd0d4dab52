"""``dynoai decode --driver NAME CAPTURE``: decode a capture offline, like ``cantools decode``.

Raw bytes for serial drivers, a python-can log (candump ``.log``, ``.asc``, ``.blf``,
PCAN ``.trc``) for CAN drivers, a pcap or pcapng for JetDrive. Prints canonical CSV on
stdout, one row per decoded message with only that message's channels filled, and the
counts of messages, bad frames and skipped bytes on stderr. Values outside their channel's
plausible range (:data:`~dynoai_daemon.channels.PLAUSIBLE_RANGES`) are left out and
counted (``implausible_<channel>=n``); when most of a channel's values are implausible a
warning says so: the wrong driver for this bus, or another device's frames on the same
CAN id.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Any

from dynoai_daemon.channels import (
    CHANNEL_UNITS,
    PLAUSIBLE_RANGES,
    TIME_COLUMN,
    samples_to_frame,
    screen_samples,
)

#: Share of a channel's values that, when implausible, points at a wrong driver.
MOSTLY_IMPLAUSIBLE = 0.5


def add_parser(sub: Any) -> None:
    """Register ``decode``."""
    p: argparse.ArgumentParser = sub.add_parser("decode", help="decode a capture offline")
    p.add_argument("--driver", required=True, help="driver name (see `dynoai drivers`)")
    p.add_argument("--config", metavar="FILE", help="take the driver's options from this config")
    p.add_argument("--source", help="with --config: the source whose options to use")
    p.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a driver option (repeatable), e.g. -o stoich=14.7",
    )
    p.add_argument("capture", help="the capture file")
    p.set_defaults(handler=run)


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _fmt(v: float) -> str:
    if math.isnan(v):
        return ""
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(round(v, 6))


def run(args: argparse.Namespace) -> int:
    """Decode and print; exit 2 for an unknown driver or unreadable capture."""
    from drivers.registry import driver_class
    from dynoai_daemon.errors import InputError

    cls = driver_class(args.driver)
    options: dict[str, Any] = {}
    if args.config:
        from dynoai_daemon.config import load_settings

        settings = load_settings(args.config)
        for src in settings.sources:
            if src.driver == args.driver and (args.source in (None, src.name)):
                options.update(src.options())
                break
    for item in args.option:
        key, sep, val = item.partition("=")
        if not sep:
            raise InputError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = _value(val)
    decode = getattr(cls, "decode_capture", None)
    if decode is None:
        raise InputError(f"driver {args.driver!r} cannot decode captures")
    try:
        samples, stats = decode(args.capture, **options)
    except FileNotFoundError as exc:
        raise InputError(f"capture not found: {args.capture}") from exc
    totals: dict[str, int] = {}
    for smp in samples:
        totals[smp.channel] = totals.get(smp.channel, 0) + 1
    dropped: dict[str, int] = {}
    samples = screen_samples(samples, dropped)
    frame = samples_to_frame(samples)
    names = [c for c in CHANNEL_UNITS if c in frame.columns]
    names += sorted(c for c in frame.columns if c not in CHANNEL_UNITS)
    out = sys.stdout
    out.write(",".join([TIME_COLUMN, *names]) + "\n")
    cols = [frame.columns[n] for n in names]
    try:
        for i, t in enumerate(frame.t.tolist()):
            out.write(",".join([repr(round(t, 6)), *(_fmt(float(c[i])) for c in cols)]) + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error of the decode.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    extra = dict(getattr(stats, "extra", {}) or {})
    for ch, n in dropped.items():
        extra[f"implausible_{ch}"] = extra.get(f"implausible_{ch}", 0) + n
    print(
        f"messages={stats.messages} samples={len(samples)} bad_frames={stats.bad_frames} "
        f"skipped_bytes={stats.skipped_bytes}"
        + "".join(f" {k}={v}" for k, v in sorted(extra.items())),
        file=sys.stderr,
    )
    for ch, n in sorted(dropped.items()):
        if n > MOSTLY_IMPLAUSIBLE * totals[ch]:
            lo, hi = PLAUSIBLE_RANGES[ch]
            print(
                f"warning: {ch}: {n} of {totals[ch]} values outside {lo:g}..{hi:g}: "
                f"the wrong driver for this capture, or another device on the same CAN id",
                file=sys.stderr,
            )
    return 0

"""``dynoai decode --driver NAME CAPTURE``: decode a capture offline, like ``cantools decode``.

Raw bytes for serial drivers, a python-can log (candump ``.log``, ``.asc``, ``.blf``) for
CAN drivers, a pcap or pcapng for JetDrive. Prints canonical CSV on stdout, one row per
decoded message with only that message's channels filled, and the counts of messages,
bad frames and skipped bytes on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from dynoai_daemon.channels import CHANNEL_UNITS, TIME_COLUMN, samples_to_frame


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
    frame = samples_to_frame(samples)
    names = [c for c in CHANNEL_UNITS if c in frame.columns]
    names += sorted(c for c in frame.columns if c not in CHANNEL_UNITS)
    out = sys.stdout
    out.write(",".join([TIME_COLUMN, *names]) + "\n")
    cols = [frame.columns[n] for n in names]
    for i, t in enumerate(frame.t.tolist()):
        out.write(",".join([repr(round(t, 6)), *(_fmt(float(c[i])) for c in cols)]) + "\n")
    extra = getattr(stats, "extra", {}) or {}
    print(
        f"messages={stats.messages} samples={len(samples)} bad_frames={stats.bad_frames} "
        f"skipped_bytes={stats.skipped_bytes}"
        + "".join(f" {k}={v}" for k, v in sorted(extra.items())),
        file=sys.stderr,
    )
    return 0

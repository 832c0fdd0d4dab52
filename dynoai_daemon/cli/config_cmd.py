"""``dynoai config check FILE [--probe]``: validate a configuration; optionally open each source.

Without ``--probe`` nothing is opened. With it, every enabled source is opened once
(serial port, CAN interface, UDP socket) with reconnects off, then closed; each that
cannot be opened is named with the driver's reason (port or interface and the OS error)
and the exit status is 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
from typing import Any

from dynoai_daemon.config import Settings, load_settings
from dynoai_daemon.errors import ConfigError, DynoError


def add_parser(sub: Any) -> None:
    """Register ``config`` and its ``check`` action."""
    p: argparse.ArgumentParser = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    check = csub.add_parser("check", help="validate a config file; exit 2 naming bad fields")
    check.add_argument("file", help="TOML config file")
    check.add_argument(
        "--probe", action="store_true", help="also open every source once; exit 2 naming failures"
    )
    check.add_argument(
        "--probe-timeout", type=float, default=5.0, metavar="S", help="per source (default 5)"
    )
    check.set_defaults(handler=run_check)


def check_sources(settings: Settings, where: str) -> None:
    """Check every source names a registered driver and that its options build it.

    Raises:
        ConfigError: naming ``sources[i].driver`` or the driver's complaint.
    """
    from drivers.registry import REGISTRY, create_driver

    bad = []
    for i, src in enumerate(settings.sources):
        if src.driver not in REGISTRY:
            bad.append(f"sources[{i}].driver: unknown driver {src.driver!r}")
            continue
        try:
            create_driver(src.driver, source=src.name, **src.options())
        except DynoError as exc:
            bad.append(f"sources[{i}] ({src.name}): {exc}")
        except (TypeError, ValueError) as exc:
            bad.append(f"sources[{i}] ({src.name}): {exc}")
    if bad:
        raise ConfigError(f"{where}: " + "; ".join(bad))


async def _probe_one(driver: Any, limit_s: float) -> str | None:
    """Open and close one driver; return why it cannot be opened, or None."""
    try:
        async with asyncio.timeout(limit_s):
            await driver.open()
    except TimeoutError:
        return f"no answer within {limit_s:g} s opening {getattr(driver, 'link', '')}"
    except DynoError as exc:
        return str(exc)
    except Exception as exc:  # a vendor library's own exception: still a reason
        return repr(exc)
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
    return None


async def probe_sources(settings: Settings, limit_s: float) -> list[tuple[str, str]]:
    """Open every enabled source once; return ``[(source, reason)]`` for those that failed."""
    from drivers.registry import create_driver

    failed: list[tuple[str, str]] = []
    for src in settings.sources:
        if not src.enabled:
            continue
        driver = create_driver(src.driver, source=src.name, reconnect=False, **src.options())
        reason = await _probe_one(driver, limit_s)
        if reason is not None:
            failed.append((src.name, reason))
    return failed


def run_check(args: argparse.Namespace) -> int:
    """Validate ``args.file``; raises ConfigError (exit 2) naming every bad field."""
    settings = load_settings(args.file)
    check_sources(settings, args.file)
    if args.probe:
        if not (math.isfinite(args.probe_timeout) and args.probe_timeout > 0):
            raise ConfigError(f"--probe-timeout must be positive, not {args.probe_timeout}")
        failed = asyncio.run(probe_sources(settings, args.probe_timeout))
        if failed:
            raise ConfigError(
                f"{args.file}: cannot open "
                + "; ".join(f"source {name!r}: {why}" for name, why in failed)
            )
    opened = "opened" if args.probe else "not opened (--probe opens them)"
    print(
        f"ok: station {settings.station}, {len(settings.sources)} source(s) {opened}, "
        f"grid {len(settings.grid.rpm_axis)}x{len(settings.grid.map_axis)}"
    )
    return 0

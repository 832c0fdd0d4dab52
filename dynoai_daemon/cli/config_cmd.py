"""``dynoai config check FILE``: validate a configuration without starting anything."""

from __future__ import annotations

import argparse
from typing import Any

from dynoai_daemon.config import Settings, load_settings
from dynoai_daemon.errors import ConfigError, DynoError


def add_parser(sub: Any) -> None:
    """Register ``config`` and its ``check`` action."""
    p: argparse.ArgumentParser = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    check = csub.add_parser("check", help="validate a config file; exit 2 naming bad fields")
    check.add_argument("file", help="TOML config file")
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


def run_check(args: argparse.Namespace) -> int:
    """Validate ``args.file``; raises ConfigError (exit 2) naming every bad field."""
    settings = load_settings(args.file)
    check_sources(settings, args.file)
    print(
        f"ok: station {settings.station}, {len(settings.sources)} source(s), "
        f"grid {len(settings.grid.rpm_axis)}x{len(settings.grid.map_axis)}"
    )
    return 0

"""``dynoai config check FILE``: validate a configuration without starting anything."""

from __future__ import annotations

import argparse
from typing import Any

from dynoai_daemon.config import load_settings


def add_parser(sub: Any) -> None:
    """Register ``config`` and its ``check`` action."""
    p: argparse.ArgumentParser = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    check = csub.add_parser("check", help="validate a config file; exit 2 naming bad fields")
    check.add_argument("file", help="TOML config file")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Validate ``args.file``; raises ConfigError (exit 2) naming every bad field."""
    settings = load_settings(args.file)
    from drivers.registry import REGISTRY

    unknown = [s.name for s in settings.sources if s.driver not in REGISTRY]
    if unknown:
        from dynoai_daemon.errors import ConfigError

        bad = "; ".join(
            f"sources[{i}].driver: unknown driver {s.driver!r}"
            for i, s in enumerate(settings.sources)
            if s.name in unknown
        )
        raise ConfigError(f"{args.file}: {bad}")
    print(
        f"ok: station {settings.station}, {len(settings.sources)} source(s), "
        f"grid {len(settings.grid.rpm_axis)}x{len(settings.grid.map_axis)}"
    )
    return 0

"""``dynoai run --config FILE``: the daemon in the foreground (what systemd runs)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from dynoai_daemon.cli.common import settings_from_args


def add_parser(sub: Any) -> None:
    """Register ``run``."""
    p: argparse.ArgumentParser = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("--config", metavar="FILE", required=True, help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="override data_dir")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config (exit 2 naming bad fields), then run until SIGTERM/SIGINT."""
    from dynoai_daemon.config import session_context
    from dynoai_daemon.logs_setup import configure_logging
    from dynoai_daemon.service.daemon import Daemon

    settings = settings_from_args(args)
    session_context(settings)
    from dynoai_daemon.cli.config_cmd import check_sources

    check_sources(settings, args.config)
    configure_logging(args.log_level, station=settings.station)
    daemon = Daemon(settings, config_path=args.config)
    asyncio.run(daemon.run())
    return 0

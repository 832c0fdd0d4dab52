"""Helpers shared by subcommands: loading settings with CLI overrides, console output."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dynoai_daemon.config import Settings, load_settings


def add_config_args(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    """Add ``--config`` (and ``--data-dir``) to a subcommand parser."""
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR", help="where sessions and the dataset go")


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Load the config named by ``--config`` with ``--data-dir`` and other overrides."""
    dd = getattr(args, "data_dir", None)
    if dd is not None:
        overrides["data_dir"] = dd
    return load_settings(getattr(args, "config", None), **overrides)


def is_tty() -> bool:
    """True when stderr is a terminal (progress bars, colours)."""
    return sys.stderr.isatty()

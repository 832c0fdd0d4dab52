"""Helpers shared by subcommands: loading settings with CLI overrides, console output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dynoai_daemon.config import Settings, load_settings
from dynoai_daemon.errors import ConfigError


def add_config_args(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    """Add ``--config`` (and ``--data-dir``) to a subcommand parser."""
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR", help="where sessions and the dataset go")


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Load the config named by ``--config`` with ``--data-dir`` and other overrides.

    For a subcommand that has ``--data-dir`` (it writes there), the data directory is
    created now, so one that cannot be is a clear error instead of a failure mid-run.

    Raises:
        ConfigError: a bad config, or a data directory that cannot be created.
    """
    dd = getattr(args, "data_dir", None)
    if dd is not None:
        overrides["data_dir"] = dd
    settings = load_settings(getattr(args, "config", None), **overrides)
    if hasattr(args, "data_dir"):
        ensure_data_dir(settings, "--data-dir" if dd is not None else "data_dir")
    return settings


def ensure_data_dir(settings: Settings, where: str) -> Path:
    """Create ``settings.data_dir`` if needed.

    Raises:
        ConfigError: it cannot be created or is not a directory (names it and ``where``).
    """
    path = Path(settings.data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create data directory {path}: {exc.strerror or exc}, {where}",
            field="data_dir",
        ) from exc
    return path


def is_tty() -> bool:
    """True when stderr is a terminal (progress bars, colours)."""
    return sys.stderr.isatty()

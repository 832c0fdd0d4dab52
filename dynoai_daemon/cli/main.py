"""Entry point of the ``dynoai`` console script.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and a handler
``run(args) -> int``; modules are imported here but keep their heavy imports (sklearn,
python-can, the simulator) inside the handler. Errors derived from
:class:`~dynoai_daemon.errors.DynoError` print ``error: ...`` and exit 2 for bad input or 1
for runtime failures; a traceback only appears under ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from dynoai_daemon import __version__
from dynoai_daemon.errors import ConfigError, DriverNotAvailableError, DynoError, InputError

SUBCOMMANDS = (
    "run",
    "simulate",
    "replay",
    "watch",
    "report",
    "train",
    "predict",
    "decode",
    "drivers",
    "config_cmd",
    "tune",
    "collect",
    "dataset",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="dynoai",
        description="Live dyno data acquisition and V-twin tuning daemon.",
    )
    parser.add_argument("--version", action="version", version=f"dynoai {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"dynoai_daemon.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dynoai_daemon.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit status (0 ok, 1 runtime failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        rc: int = args.handler(args)
        return rc
    except (ConfigError, InputError, DriverNotAvailableError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DynoError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

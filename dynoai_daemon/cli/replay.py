"""``dynoai replay LOG...``: recorded logs through the same core, into sessions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dynoai_daemon.cli.common import add_config_args, is_tty, settings_from_args

FORMATS = ("auto", "canonical", "powervision", "winpep", "msl", "candump", "asc", "blf", "jetdrive")


def add_parser(sub: Any) -> None:
    """Register ``replay``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay", help="replay recorded logs through the core into sessions"
    )
    p.add_argument("logs", nargs="+", metavar="LOG")
    p.add_argument("--format", default="auto", choices=FORMATS)
    add_config_args(p)
    p.add_argument("--speed", type=float, default=None, help="pace: 1 = real time")
    p.add_argument("--publish", action="store_true", help="publish to MQTT as the daemon would")
    p.add_argument("--no-store", action="store_true", help="do not write sessions/dataset")
    p.set_defaults(handler=run)


def summary_line(session: Any) -> str:
    """One line per run: cells learned, worst imbalance, knock cells."""
    g = session.grid
    learned = 0
    if g is not None:
        learned = sum(
            1
            for cyl in (g.front, g.rear)
            for row in cyl.ve_correction_pct
            for v in row
            if v is not None
        )
    worst = session.max_cylinder_afr_delta
    knock_cells = sum(len(p.knock_cells) for p in session.patterns.knock_timing)
    pats = ", ".join(f"{k}={len(v)}" for k, v in session.patterns.model_dump().items() if v)
    return (
        f"run {session.session_id}: {learned} cell-cylinders learned, "
        f"worst imbalance {'-' if worst is None else f'{worst:.2f} AFR'}, "
        f"{knock_cells} knock cells, peak {session.peak_hp or '-'} hp"
        + (f"; patterns: {pats}" if pats else "")
    )


def run(args: argparse.Namespace) -> int:
    """Replay the logs; exit 2 on a malformed log (``error: file:line: what``)."""
    from dynoai_daemon.errors import InputError
    from dynoai_daemon.logs.replay import replay_logs

    if args.speed is not None and args.speed <= 0:
        raise InputError("--speed must be positive")
    if args.publish:
        raise InputError("--publish: replay to MQTT is not available yet; use dynoai simulate")
    settings = settings_from_args(args)
    progress: Any = None
    task: Any = None
    if is_tty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task("replaying", total=None)
    try:
        result = replay_logs(
            args.logs,
            settings,
            fmt=args.format,
            speed=args.speed,
            store=not args.no_store,
            on_session=lambda s: print(summary_line(s), flush=True),
            on_progress=(lambda n: progress.advance(task, n)) if progress else None,
        )
    finally:
        if progress is not None:
            progress.stop()
    print(
        f"{result.rows} rows from {result.files} file(s): {len(result.sessions)} session(s), "
        f"{result.discarded_runs} short run(s) discarded"
        + (f"; written under {settings.data_dir}" if not args.no_store else ""),
        file=sys.stderr,
    )
    return 0

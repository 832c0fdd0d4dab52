"""``dynoai report SESSION_OR_RUN... [-o OUT.html] [--png]``: the after-the-pull report.

Each argument is a session JSON file, a session or run id (looked up under
``<data_dir>/sessions``), or a data directory (all its sessions). Several sessions
overlay in the curves (before/after a tune change) and get a section each. Writes one
self-contained HTML file (no network at view time); ``--png`` also writes each figure as
``<OUT stem>-<figure>.png`` beside it. Default output: ``<session id>.html`` for one
session, ``<first>_vs_<last>.html`` for several, in the current directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dynoai_daemon.errors import InputError


def add_parser(sub: Any) -> None:
    """Register ``report``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "report", help="self-contained offline HTML report of sessions"
    )
    p.add_argument("items", nargs="+", metavar="SESSION_OR_RUN",
                   help="session JSON, session/run id, or data directory")  # fmt: skip
    p.add_argument("-o", "--output", metavar="OUT.html", help="output file")
    p.add_argument("--png", action="store_true", help="also write each figure as a PNG")
    p.add_argument("--config", metavar="FILE", help="TOML config (data_dir, tuning limits)")
    p.add_argument("--data-dir", metavar="DIR", help="where sessions/ and raw/ are")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the report; exit 2 on a bad argument or file."""
    from dynoai_daemon.cli.common import settings_from_args
    from dynoai_daemon.report import build_report
    from dynoai_daemon.report.data import resolve

    settings = settings_from_args(args)
    data_dir = Path(settings.data_dir)
    paths = resolve(list(args.items), data_dir)
    if not paths:
        raise InputError("no sessions to report")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise InputError(f"output is a directory, {out}", path=str(out))
    else:
        stems = [p.stem for p in paths]
        out = Path(f"{stems[0]}.html" if len(stems) == 1 else f"{stems[0]}_vs_{stems[-1]}.html")
    try:
        built = build_report(paths, out, settings, data_dir=data_dir, png=args.png)
    except OSError as exc:
        raise InputError(f"cannot write the report ({exc.strerror or exc}), {out}") from exc
    print(
        f"wrote {built.path} ({built.size / 1024:.0f} kB, {built.runs} session(s), "
        f"{len(built.figures)} figures: {', '.join(built.figures) or 'none'}) "
        f"in {built.seconds:.1f} s",
        file=sys.stderr,
    )
    for png in built.pngs:
        print(f"wrote {png}", file=sys.stderr)
    for note in built.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0

"""``dynoai tune show|apply``: a tune file's tables, and the tuner's loop on them.

``tune show TUNE [--json]`` prints the VE (and spark, AFR target) tables of a tune with
their axes; ``--json`` prints ``{"tables": {name: {rpm_axis, load_axis, load_unit,
values[rpm][load]}}}`` (a shared table under both cylinder names). ``tune apply --base
TUNE`` pools the given sessions (default: every session of the newest build in the data
directory) into one correction, applies it to the base tune's own tables and writes the
result in the output's format (by extension; default ``<base>-corrected.<ext>`` beside the
base), printing what changed, what was left alone and why, and which AFR target was used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dynoai_daemon.cli.common import add_config_args, settings_from_args


def add_parser(sub: Any) -> None:
    """Register ``tune`` with its ``show`` and ``apply`` actions."""
    p: argparse.ArgumentParser = sub.add_parser(
        "tune", help="show a tune's tables, or apply pooled corrections to it"
    )
    tsub = p.add_subparsers(dest="tune_command", metavar="ACTION")
    show = tsub.add_parser("show", help="print a tune file's VE/spark tables with axes")
    show.add_argument("tune", metavar="TUNE", help=".msq, .table, .vex, .pvv or .csv")
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    show.set_defaults(handler=run_show)
    ap = tsub.add_parser("apply", help="apply the sessions' pooled correction to a tune")
    ap.add_argument("--base", required=True, metavar="TUNE", help="the tune the runs were on")
    ap.add_argument(
        "--sessions",
        nargs="+",
        metavar="PATH",
        help="session JSON files or directories (default: every session of the newest "
        "build in the data dir)",
    )
    add_config_args(ap)
    ap.add_argument("-o", "--output", metavar="OUT", help="where to write (format by extension)")
    ap.add_argument(
        "--max-change",
        type=float,
        default=10.0,
        metavar="PCT",
        help="largest change of one cell per iteration, percent (default 10)",
    )
    ap.add_argument("--smooth", action="store_true", help="smooth the changed region (3x3)")
    ap.set_defaults(handler=run_apply)
    p.set_defaults(handler=lambda _a: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


# ----------------------------------------------------------------------------- show


def _num(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}"


def run_show(args: argparse.Namespace) -> int:
    """Print a tune's tables; exit 2 on a bad file."""
    from dynoai_daemon.tune import load_tune

    tune = load_tune(args.tune)
    if args.json:
        doc: dict[str, Any] = {"tables": {}}
        for name in tune.names():
            t = tune.get(name)
            assert t is not None
            doc["tables"][name] = {
                "rpm_axis": [float(v) for v in t.rpm_axis],
                "load_axis": [float(v) for v in t.load_axis],
                "load_unit": t.load_unit,
                "values": [[round(float(v), 6) for v in row] for row in t.values],
            }
        print(json.dumps(doc))
        return 0
    print(f"{args.tune}: {tune.format}; " + "; ".join(tune.notes))
    shown: set[int] = set()
    for name in tune.names():
        t = tune.get(name)
        assert t is not None
        if id(t) in shown:
            print(f"\n{name}: the same table as {tune.aliases.get(name, name)}")
            continue
        shown.add(id(t))
        d = t.decimals
        print(
            f"\n{name} ({t.source}): {t.shape[0]} rpm x {t.shape[1]} {t.load_unit}, "
            f"resolution {t.resolution:g}"
        )
        cells = [[_num(float(v), d) for v in row] for row in t.values]
        heads = [f"{v:g}" for v in t.load_axis]
        width = max(len(s) for s in [*heads, *(c for r in cells for c in r)]) + 1
        rw = max(len(f"{v:g}") for v in t.rpm_axis) + 1
        corner = "rpm\\" + t.load_unit
        print(f"{corner:>{rw}}" + "".join(f"{h:>{width}}" for h in heads))
        for r, row in zip(t.rpm_axis, cells, strict=True):
            print(f"{r:>{rw}g}" + "".join(f"{c:>{width}}" for c in row))
    return 0


# ---------------------------------------------------------------------------- apply


def _session_files(paths: list[str]) -> Iterator[Path]:
    from dynoai_daemon.errors import InputError

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            sub = p / "sessions" if (p / "sessions").is_dir() else p
            files = sorted(f for f in sub.glob("*.json") if not f.name.startswith("."))
            if not files:
                raise InputError(f"no session files (*.json), {raw}")
            yield from files
        elif p.is_file():
            yield p
        else:
            raise InputError(f"no such session file or directory, {raw}")


def _read_sessions(paths: list[str]) -> list[Any]:
    from pydantic import ValidationError

    from dynoai_daemon.errors import InputError
    from dynoai_daemon.models import TuningSession, format_errors

    out = []
    for f in _session_files(paths):
        try:
            out.append(TuningSession.model_validate_json(f.read_bytes()))
        except ValidationError as exc:
            raise InputError(f"invalid session: {format_errors(exc)}, {f}") from None
        except OSError as exc:
            raise InputError(f"cannot read session: {exc.strerror or exc}, {f}") from None
    return out


def _newest_build(data_dir: str) -> tuple[list[Any], str]:
    from dynoai_daemon.errors import InputError, StoreError
    from dynoai_daemon.store.files import SessionStore

    store = SessionStore(data_dir)
    try:
        sessions = list(store.iter_sessions())
    except StoreError as exc:
        raise InputError(f"cannot read the stored sessions: {exc}, {data_dir}") from None
    if not sessions:
        raise InputError(f"no sessions in the data directory, {data_dir}")
    newest = max(sessions, key=lambda s: s.timestamp_utc)
    key = newest.build_config.model_dump_json() if newest.build_config else None
    same = [
        s for s in sessions if (s.build_config.model_dump_json() if s.build_config else None) == key
    ]
    b = newest.build_config
    what = (
        f"build {b.engine_family} {b.displacement_ci:g} ci" + (f" {b.stage}" if b.stage else "")
        if b
        else "sessions without a build"
    )
    return same, f"{len(same)} of {len(sessions)} sessions in {data_dir} ({what}, the newest)"


def _default_output(base: str) -> Path:
    p = Path(base)
    return p.with_name(f"{p.stem}-corrected{p.suffix}")


def run_apply(args: argparse.Namespace) -> int:
    """Apply the pooled correction; exit 2 on bad input."""
    from dynoai_daemon.errors import InputError
    from dynoai_daemon.patterns.pooled import pool_sessions
    from dynoai_daemon.tune import format_of, load_tune, save_tune
    from dynoai_daemon.tune.apply import apply_correction

    if not (0.0 < args.max_change <= 50.0):
        raise InputError(f"--max-change must be within (0, 50] percent, got {args.max_change:g}")
    base = load_tune(args.base)
    out = Path(args.output) if args.output else _default_output(args.base)
    out_fmt = format_of(out)
    settings = settings_from_args(args)
    if args.sessions:
        sessions = _read_sessions(args.sessions)
        origin = f"{len(sessions)} session(s) given"
    else:
        sessions, origin = _newest_build(str(settings.data_dir))
    pooled = pool_sessions(sessions, settings.tuning)
    result = apply_correction(
        base,
        pooled,
        settings.tuning,
        sessions=[s for s in sessions if s.session_id in set(pooled.session_ids)],
        max_change_pct=args.max_change,
        smooth=args.smooth,
    )
    print(f"base: {args.base} ({base.format}); " + "; ".join(base.notes))
    skipped = ""
    if pooled.skipped:
        reasons: dict[str, int] = {}
        for why in pooled.skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        skipped = "; skipped " + ", ".join(f"{n} ({why})" for why, n in reasons.items())
    print(f"sessions: {origin}; {pooled.runs} pooled{skipped}")
    for cyl in ("front", "rear"):
        c = pooled.cylinder(cyl)
        print(
            f"  {cyl}: {int(c.sound.sum())} cells with a sound suggestion "
            f"({int(c.clamped.sum())} clamped), {int((c.weight > 0).sum())} with data"
        )
    print(f"AFR target: {result.target}")
    for ch in result.changes:
        print(ch.line())
    if out_fmt != base.format:
        print(f"note: {out} is a new .{out_fmt} document holding only the tables")
    save_tune(result.tune, out)
    print(f"wrote {out}: {result.cells_changed} cells changed")
    return 0


__all__ = ["add_parser", "run_apply", "run_show"]

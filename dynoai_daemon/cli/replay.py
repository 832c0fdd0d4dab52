"""``dynoai replay LOG...``: recorded logs through the same core, into sessions."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from dynoai_daemon.cli.common import add_config_args, is_tty, settings_from_args

FORMATS = (
    "auto", "canonical", "powervision", "winpep", "msl", "mlg", "csv",
    "candump", "asc", "blf", "trc", "jetdrive",
)  # fmt: skip


def add_parser(sub: Any) -> None:
    """Register ``replay``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay", help="replay recorded logs through the core into sessions"
    )
    p.add_argument("logs", nargs="+", metavar="LOG")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument(
        "--temp-unit",
        choices=("C", "F"),
        default=None,
        help="unit of temperature columns the log leaves blank (default: decided per log)",
    )
    p.add_argument(
        "--columns",
        metavar="CHANNEL=COLUMN[:UNIT],...",
        default=None,
        help="column map of a delimited log (implies --format csv), e.g. rpm=RPM,map_kpa=MAP:bar",
    )
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


def file_lines(rep: Any, tuning: Any) -> list[str]:
    """The per-file summary: format, capture time, decisions, drops, runs and gates."""
    lines = [
        f"{rep.path}: format {rep.format or '?'}, {rep.rows} rows, "
        f"{rep.runs} run(s) ({rep.discarded_runs} short), {len(rep.sessions)} session(s), "
        f"{rep.cells} cell-cylinders learned, {rep.seconds:.2f} s"
        + (
            f"; captured {rep.capture_utc:%Y-%m-%dT%H:%M:%SZ} ({rep.capture_from})"
            if rep.capture_utc is not None
            else ""
        )
    ]
    for note in rep.notes:
        lines.append(f"  decided: {note}")
    for note in rep.info:
        lines.append(f"  note: {note}")
    if rep.markers:
        lines.append(f"  markers: {rep.markers} (shown with the runs they fall in)")
    if rep.dropped:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(rep.dropped.items()))
        lines.append(f"  dropped as implausible: {parts}")
    for run_id, gates in rep.rejected.items():
        cells = rep.run_cells.get(run_id)
        head = f"  {run_id}: " + ("session failed" if cells is None else f"{cells} cells")
        if not gates:
            lines.append(head + (", every AFR reading passed" if cells else ", no AFR reading"))
        else:
            gate, n = max(gates.items(), key=lambda kv: kv[1])
            total = sum(gates.values())
            lines.append(f"{head}, most readings rejected by {gate} ({n} of {total})")
        a, b = rep.run_spans.get(run_id, (0.0, -1.0))
        lines += [f"    marker at {t:.1f} s: {text}" for t, text in rep.marker_list if a <= t <= b]
    if rep.runs == 0 and rep.rows:
        lines.append(
            f"  no run: rpm never above {tuning.run_start_rpm:g} with throttle above "
            f"{tuning.run_start_tps:g} % ({rep.outside_runs} AFR readings outside runs)"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    """Replay the logs; exit 2 when a log or a run's session failed (after writing the rest).

    Errors read ``error: file:line: what`` (a malformed log) or ``error: <file>: run <id>:
    <what>`` (a session that failed validation).
    """
    from dynoai_daemon.errors import InputError
    from dynoai_daemon.logs.delimited import parse_column_map
    from dynoai_daemon.logs.replay import replay_logs

    if args.speed is not None and not (math.isfinite(args.speed) and args.speed > 0):
        raise InputError(f"--speed must be a positive finite number, not {args.speed}")
    columns = parse_column_map(args.columns) if args.columns else None
    if columns is not None and args.format not in ("auto", "csv"):
        raise InputError(f"--columns needs --format csv (not {args.format})")
    if args.publish:
        return _replay_publish(args)
    settings = settings_from_args(args)
    progress: Any = None
    task: Any = None
    if is_tty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task("replaying", total=None)

    def on_file(rep: Any) -> None:
        for line in file_lines(rep, settings.tuning):
            print(line, flush=True)

    try:
        result = replay_logs(
            args.logs,
            settings,
            fmt=args.format,
            speed=args.speed,
            store=not args.no_store,
            on_session=lambda s: print(summary_line(s), flush=True),
            on_progress=(lambda n: progress.advance(task, n)) if progress else None,
            columns=columns,
            temp_unit=args.temp_unit,
            on_file=on_file,
        )
    finally:
        if progress is not None:
            progress.stop()
    if args.no_store:
        stored = "; nothing stored (--no-store)"
    elif result.sessions:
        new = len(result.sessions) - result.already_stored
        stored = (
            f"; {len(result.sessions)} session file(s) written under {settings.data_dir} "
            f"({new} new in the dataset"
        )
        stored += f", {result.already_stored} already there)" if result.already_stored else ")"
    else:
        stored = "; nothing written"
    print(
        f"{result.rows} rows from {result.files} file(s): {len(result.sessions)} session(s), "
        f"{result.discarded_runs} short run(s) discarded{stored}",
        file=sys.stderr,
    )
    for err in result.errors:
        print(f"error: {err}", file=sys.stderr)
    return 2 if result.errors else 0


def _replay_publish(args: argparse.Namespace) -> int:
    """Replay through a Daemon with no drivers, so MQTT gets exactly what live would."""
    import asyncio
    import time

    from dynoai_daemon.channels import Frame
    from dynoai_daemon.logs.delimited import parse_column_map
    from dynoai_daemon.logs.replay import FILE_GAP_S, open_log
    from dynoai_daemon.service.daemon import Daemon

    settings = settings_from_args(args)
    columns = parse_column_map(args.columns) if args.columns else None
    temp_unit = args.temp_unit or (
        None if settings.replay.temp_unit == "auto" else settings.replay.temp_unit
    )

    async def go() -> int:
        daemon = Daemon(
            settings, drivers={}, on_session=lambda s: print(summary_line(s), flush=True)
        )
        task = asyncio.create_task(daemon.run(), name="daemon")
        await daemon.ready.wait()
        offset = 0.0
        last = -float("inf")
        rows = 0
        for path in args.logs:
            # Units decided and implausible values blanked, as in a stored replay.
            frames = open_log(path, settings, args.format, columns=columns, temp_unit=temp_unit)
            first = True
            wall0 = time.monotonic()
            for frame in frames:
                if not len(frame):
                    continue
                if first:
                    offset = (last + FILE_GAP_S - float(frame.t[0])) if last > -1e300 else 0.0
                    first = False
                f = Frame(frame.t + offset, frame.columns)
                step = 200 if args.speed is None else 20
                for i in range(0, len(f), step):
                    part = f.slice(i, i + step)
                    if args.speed is not None:
                        due = wall0 + (float(part.t[0]) - float(f.t[0])) / args.speed
                        await asyncio.sleep(max(0.0, due - time.monotonic()))
                    daemon._feed(part)
                    rows += len(part)
                    await asyncio.sleep(0)
                last = float(f.t[-1])
            daemon._handle_events(daemon.core.stop_run("end_of_log"))
        await daemon.wait_sessions_idle()
        daemon.request_stop()
        await task
        st = daemon.hub.stats
        pub = daemon._publisher
        mq = pub.stats() if pub is not None else {}
        left = int(mq.get("outbox_depth", 0))
        sent = (
            f"{mq.get('published', 0)} message(s) published to {mq.get('url')}"
            if pub is not None
            else "MQTT disabled: nothing published"
        )
        if left:
            why = mq.get("last_error") or "broker unreachable"
            sent += f"; {left} still in the outbox ({why}), sent when the broker is back"
        print(
            f"{rows} rows replayed: {st.sessions} session(s), {st.alerts} alert(s); {sent}",
            file=sys.stderr,
        )
        return 0

    return asyncio.run(go())

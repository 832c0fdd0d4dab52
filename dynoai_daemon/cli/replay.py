"""``dynoai replay LOG...``: recorded logs through the same core, into sessions."""

from __future__ import annotations

import argparse
import math
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

    if args.speed is not None and not (math.isfinite(args.speed) and args.speed > 0):
        raise InputError(f"--speed must be a positive finite number, not {args.speed}")
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
    if args.no_store:
        stored = "; nothing stored (--no-store)"
    elif result.sessions:
        stored = f"; {len(result.sessions)} session file(s) written under {settings.data_dir}"
    else:
        stored = "; nothing written"
    print(
        f"{result.rows} rows from {result.files} file(s): {len(result.sessions)} session(s), "
        f"{result.discarded_runs} short run(s) discarded{stored}",
        file=sys.stderr,
    )
    return 0


def _replay_publish(args: argparse.Namespace) -> int:
    """Replay through a Daemon with no drivers, so MQTT gets exactly what live would."""
    import asyncio
    import time

    from dynoai_daemon.channels import Frame
    from dynoai_daemon.logs import read_log, sniff_format
    from dynoai_daemon.logs.replay import CAPTURE_FORMATS, FILE_GAP_S, capture_frames
    from dynoai_daemon.service.daemon import Daemon

    settings = settings_from_args(args)

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
            fmt = sniff_format(path) if args.format == "auto" else args.format
            frames: Any = (
                capture_frames(path, fmt, settings)
                if fmt in CAPTURE_FORMATS
                else read_log(path, format=fmt, stoich=settings.tuning.stoich_afr)
            )
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

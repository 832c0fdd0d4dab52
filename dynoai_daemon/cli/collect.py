"""``dynoai collect``: the fleet collector (MQTT -> PostgreSQL), or a one-off backfill.

``dynoai collect --url MQTT_URL --db POSTGRES_URL [--group NAME] [--id ID]`` runs the
collector in the foreground until SIGTERM/SIGINT (then drains: what was received is
committed and acknowledged, exit 0). ``dynoai collect --backfill DATA_DIR --db URL
[--station S]`` loads a station's data directory and prints what it stored; exit 2 if a
session was rejected (each is named), 1 if the database stayed unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynoai_daemon.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dynoai_daemon.collect.db import SessionDb


def add_parser(sub: Any) -> None:
    """Register ``collect``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "collect",
        help="collect sessions from many stations into PostgreSQL (or --backfill a data dir)",
        description=(
            "Central collector: MQTT 5 shared subscription $share/<group>/<base>/+/session/+, "
            "validated sessions inserted idempotently into PostgreSQL, acknowledged only "
            "after the commit. With --backfill: load a station's data directory instead."
        ),
    )
    p.add_argument("--db", metavar="POSTGRES_URL", required=True, help="the central store")
    p.add_argument("--url", metavar="MQTT_URL", help="broker, mqtt://[user@]host[:port]")
    p.add_argument("--backfill", metavar="DATA_DIR", help="load this data directory and exit")
    p.add_argument("--station", help="with --backfill: the station the sessions must be from")
    p.add_argument("--group", default="dynoai", help="shared-subscription group (dynoai)")
    p.add_argument(
        "--no-share",
        action="store_true",
        help=(
            "plain subscription instead of the shared one: every collector gets every "
            "session (the store absorbs the copies); for mosquitto, which forgets shared "
            "subscriptions when it restarts"
        ),
    )
    p.add_argument("--id", dest="collector_id", help="collector id (default: host name)")
    p.add_argument("--base-topic", default="dynoai", help="stations' base topic (dynoai)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", metavar="FILE", help="file with the broker password")
    p.add_argument("--ca-file", metavar="FILE", help="CA bundle for mqtts://")
    p.add_argument("--batch", type=int, default=100, help="sessions per transaction (100)")
    p.add_argument("--batch-wait", type=float, default=0.05, help="seconds to fill a batch (0.05)")
    p.add_argument(
        "--session-expiry",
        type=int,
        default=7 * 24 * 3600,
        help=(
            "seconds the broker keeps this collector's session and queue while it is away "
            "(1 week); 0 ends the session with the connection, only for a broker that "
            "re-dispatches a dead member's messages to the group (EMQX 5), never mosquitto"
        ),
    )
    p.add_argument("--health-interval", type=float, default=5.0, help="seconds between health (5)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="SIGTERM drain limit (10)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=run)


def _read_password(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise ConfigError(
            f"cannot read password file: {exc}, {path}", field="--password-file"
        ) from exc


def _check_args(args: argparse.Namespace) -> None:
    if args.url and args.backfill:
        raise ConfigError("give either --url (collect) or --backfill (load a data dir), not both")
    if not args.url and not args.backfill:
        raise ConfigError("give --url MQTT_URL to collect, or --backfill DATA_DIR")
    if args.station and not args.backfill:
        raise ConfigError("--station only applies to --backfill")
    if args.batch < 1:
        raise ConfigError("--batch must be at least 1")
    if args.session_expiry < 0:
        raise ConfigError("--session-expiry must not be negative")
    for name in ("batch_wait", "health_interval", "drain_timeout"):
        if not getattr(args, name) >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")


def run(args: argparse.Namespace) -> int:
    """Collect until SIGTERM/SIGINT, or backfill once."""
    from dynoai_daemon.collect.db import SessionDb, quiet_pool_logs
    from dynoai_daemon.collect.service import check_level, default_collector_id
    from dynoai_daemon.logs_setup import configure_logging

    _check_args(args)
    args.collector_id = check_level("id", args.collector_id or default_collector_id())
    db = SessionDb(args.db)  # validates the URL (exit 2 on a bad one)
    configure_logging(args.log_level, station=f"collector/{args.collector_id}")
    quiet_pool_logs()
    if args.backfill:
        return asyncio.run(_backfill(args, db))
    return asyncio.run(_collect(args, db))


async def _collect(args: argparse.Namespace, db: SessionDb) -> int:
    from dynoai_daemon.collect.service import Collector

    collector = Collector(
        mqtt_url=args.url,
        db=db,
        group=args.group,
        collector_id=args.collector_id,
        base_topic=args.base_topic,
        username=args.username,
        password=_read_password(args.password_file),
        ca_file=args.ca_file,
        session_expiry=args.session_expiry,
        batch_max=args.batch,
        batch_wait=args.batch_wait,
        health_interval=args.health_interval,
        drain_timeout=args.drain_timeout,
        share=not args.no_share,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, collector.stop)
    try:
        await collector.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    print(f"collect {collector.collector_id}: {collector.stats.summary()}", file=sys.stderr)
    return 0


async def _backfill(args: argparse.Namespace, db: SessionDb) -> int:
    from dynoai_daemon.collect.backfill import backfill, check_data_dir

    await asyncio.to_thread(check_data_dir, Path(args.backfill))
    await db.open()
    try:
        await db.migrate()
        report = await backfill(args.backfill, db, station=args.station, batch=args.batch)
    finally:
        await db.close()
    for where, reason, detail in report.rejected:
        print(f"error: rejected ({reason}): {detail}, {where}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    if report.rejected:
        raise InputError(f"{len(report.rejected)} sessions rejected", path=str(report.data_dir))
    return 0

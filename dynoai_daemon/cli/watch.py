"""``dynoai watch [--config FILE] [--url URL] [--station S]``: the live terminal view.

Reads only MQTT, so it works from any PC that reaches the station's broker. The config
(when given) supplies the broker URL and credentials, base topic, station and grid axes;
``--url`` and ``--station`` override them. With neither a config nor ``--station`` it
follows the first station that publishes under the base topic.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from typing import Any

from dynoai_daemon.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Register ``watch``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "watch", help="live terminal view of a station over MQTT"
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (broker, station, grid)")
    p.add_argument("--url", metavar="URL", help="broker, mqtt://host[:port] or mqtts://")
    p.add_argument(
        "--station", metavar="S", help="station id (default: the config's, else the first seen)"
    )
    p.set_defaults(handler=run)


def broker_from(settings: Any, url: str | None) -> Any:
    """The :class:`~dynoai_daemon.watch.app.Broker` for the settings and an optional URL.

    Raises:
        ConfigError: bad URL, unreadable password or CA file.
    """
    from dynoai_daemon.publish.mqtt import parse_url
    from dynoai_daemon.watch.app import Broker

    m = settings.mqtt
    host, port, tls, url_user = parse_url(url or m.url)
    password = None
    if m.password_file:
        try:
            lines = Path(m.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"cannot read MQTT password file {m.password_file}: {exc.strerror}",
                field="mqtt.password_file",
            ) from exc
        password = lines[0].strip() if lines else ""
    ctx = None
    if tls:
        try:
            ctx = ssl.create_default_context(cafile=m.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load CA file {m.ca_file}: {exc}", field="mqtt.ca_file"
            ) from exc
    return Broker(
        host, port, username=url_user or m.username or None, password=password, tls_context=ctx
    )


def run(args: argparse.Namespace) -> int:
    """Run the view until q."""
    from dynoai_daemon.config import load_settings
    from dynoai_daemon.watch.app import WatchApp
    from dynoai_daemon.watch.state import WatchState

    settings = load_settings(args.config)
    broker = broker_from(settings, args.url)
    station = args.station or (settings.station if args.config else None)
    if station is not None and (not station or any(c in station for c in "/+#")):
        raise ConfigError(f"--station must be one topic level: {station!r}", field="station")
    state = WatchState(
        base=settings.mqtt.base_topic,
        station=station,
        rpm_axis=[float(v) for v in settings.grid.rpm_axis],
        map_axis=[float(v) for v in settings.grid.map_axis],
        max_correction_pct=settings.tuning.max_correction_pct,
        min_weight=settings.tuning.min_weight,
    )
    WatchApp(state, broker).run()
    return 0

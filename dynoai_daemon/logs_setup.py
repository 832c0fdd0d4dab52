"""structlog configuration: JSON lines for journald/files, one short line on a terminal.

:func:`configure_logging` sets up structlog and the stdlib ``logging`` root together, so
that events from our structlog loggers and from libraries that use ``logging`` (paho,
asyncio) come out through one handler, in one format: one JSON object per line when
stderr is not a TTY (systemd's journal, files, pipes), and on a TTY one line per event
for people (:class:`PeopleRenderer`: local time, coloured level, the event, its details;
an alert reads ``ALERT kind cylinder at rpm / kPa: message``). Every event carries
``station`` (bound in the context variables, with a fallback processor for threads that do
not inherit the context), an ISO UTC timestamp, the level and the logger name; the terminal
line leaves out what is the same on every line. ``drop_events`` keeps named events off the
handler (``simulate`` prints alerts itself on a terminal, so the log does not repeat them).
"""

from __future__ import annotations

import json as _json
import logging
import math
import sys
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_HANDLER_NAME = "dynoai"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _station_adder(station: str) -> Processor:
    def add_station(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        event.setdefault("station", station)
        return event

    return add_station


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any, **_kw: Any) -> str:
    # Strict JSON (a NaN would make the line unparsable); anything odd becomes its str().
    return _json.dumps(_finite(obj), default=str, ensure_ascii=False, allow_nan=False)


_ANSI = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "error": "\x1b[1;31m",
    "critical": "\x1b[1;97;41m",
}
_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
#: Keys the terminal line does not repeat (the same on every line, or shown otherwise).
_HIDDEN = frozenset({"timestamp", "level", "logger", "station", "event", "id", "exception"})


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class PeopleRenderer:
    """One line per event for a terminal: ``HH:MM:SS level event key=value ...``.

    Args:
        colors: colour the level and the event with ANSI codes.
    """

    def __init__(self, colors: bool) -> None:
        self.colors = colors

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colors else text

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> str:
        """Render one event dict."""
        ts = str(event.get("timestamp") or "")
        clock = ts[11:19] if len(ts) >= 19 else ts
        level = str(event.get("level") or "info")
        name = str(event.get("event") or "")
        if name == "alert" and event.get("kind"):
            cell = ""
            if event.get("rpm") is not None and event.get("map_kpa") is not None:
                cell = f" at {_short(event['rpm'])} rpm / {_short(event['map_kpa'])} kPa"
            text = self._c(
                _ANSI["error"] if level in ("error", "critical") else _ANSI["warning"],
                f"ALERT {event['kind']} {event.get('cylinder') or '-'}{cell}",
            )
            line = f"{clock} {text}: {event.get('message') or ''}".rstrip()
        else:
            details = " ".join(
                f"{k}={_short(v)}"
                for k, v in event.items()
                if k not in _HIDDEN and v is not None and not k.startswith("_")
            )
            line = (
                f"{clock} {self._c(_ANSI.get(level, ''), f'{level:<7}')} "
                f"{self._c(_BOLD, name)}" + (f"  {details}" if details else "")
            )
        exc = event.get("exception")
        if exc:
            line += "\n" + str(exc)
        return line


class _DropEvents(logging.Filter):
    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return not (isinstance(msg, dict) and msg.get("event") in self.names)


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(LEVELS)}") from None


def configure_logging(
    level: str | int = "info",
    *,
    json: bool | None = None,
    station: str,
    stream: IO[str] | None = None,
    drop_events: tuple[str, ...] = (),
) -> None:
    """Configure structlog and stdlib logging for the process (idempotent).

    Args:
        level: minimum level, a name (``debug``..``critical``) or a ``logging`` number.
        json: True for JSON lines, False for the console renderer, None to choose by
            whether ``stream`` is a TTY.
        station: station id put on every event.
        stream: where to write; stderr when None.
        drop_events: event names not to write at all (e.g. ``("alert",)`` when the caller
            prints alerts itself).

    Raises:
        ValueError: unknown level name.
    """
    lvl = _level_number(level)
    out = stream if stream is not None else sys.stderr
    if json is None:
        isatty = getattr(out, "isatty", None)
        json = not (callable(isatty) and isatty())

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _station_adder(station),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        # No locals in tracebacks: they are noisy and could hold a secret.
        tail: list[Processor] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = PeopleRenderer(colors=bool(getattr(out, "isatty", bool)()))
        tail = [structlog.processors.format_exc_info]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    if drop_events:
        handler.addFilter(_DropEvents(frozenset(drop_events)))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    # paho logs every packet at DEBUG; keep it out unless we are debugging ourselves.
    logging.getLogger("mqtt").setLevel(max(lvl, logging.INFO))
    structlog.contextvars.bind_contextvars(station=station)


def bind(**values: Any) -> None:
    """Bind values (e.g. ``run=...``) to every later event of this task's context."""
    structlog.contextvars.bind_contextvars(**values)

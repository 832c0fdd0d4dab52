"""structlog configuration: JSON lines for journald/files, key-value pretty on a terminal.

:func:`configure_logging` sets up structlog and the stdlib ``logging`` root together, so
that events from our structlog loggers and from libraries that use ``logging`` (paho,
asyncio) come out through one handler, in one format: one JSON object per line when
stderr is not a TTY (systemd's journal, files, pipes), structlog's coloured key-value
console renderer on a TTY. Every event carries ``station`` (bound in the context
variables, with a fallback processor for threads that do not inherit the context), an ISO
UTC timestamp, the level and the logger name.
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
) -> None:
    """Configure structlog and stdlib logging for the process (idempotent).

    Args:
        level: minimum level, a name (``debug``..``critical``) or a ``logging`` number.
        json: True for JSON lines, False for the console renderer, None to choose by
            whether ``stream`` is a TTY.
        station: station id put on every event.
        stream: where to write; stderr when None.

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
        renderer = structlog.dev.ConsoleRenderer(colors=bool(getattr(out, "isatty", bool)()))
        tail = []

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

"""Recorded logs: readers of the supported formats and the canonical CSV writer.

``read_log(path, format="auto")`` returns a :class:`LogReader`, an iterable of
:class:`~dynoai_daemon.channels.Frame` chunks in canonical channels and units;
:class:`CanonicalWriter` streams the project's own CSV (the daemon's raw recorder);
``replay`` (a separate module) feeds logs through the core.
"""

from __future__ import annotations

from dynoai_daemon.logs.base import DEFAULT_CHUNK_ROWS, LogReader
from dynoai_daemon.logs.canonical import (
    DEFAULT_COLUMNS,
    CanonicalReader,
    CanonicalWriter,
    write_canonical,
)
from dynoai_daemon.logs.msl import MslReader
from dynoai_daemon.logs.powervision import PowerVisionReader
from dynoai_daemon.logs.readers import FORMATS, read_log, register_reader
from dynoai_daemon.logs.sniff import sniff_format
from dynoai_daemon.logs.winpep import WinPepReader

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_COLUMNS",
    "FORMATS",
    "CanonicalReader",
    "CanonicalWriter",
    "LogReader",
    "MslReader",
    "PowerVisionReader",
    "WinPepReader",
    "read_log",
    "register_reader",
    "sniff_format",
    "write_canonical",
]

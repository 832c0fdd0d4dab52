"""``read_log``: open a recorded log of any supported format as a stream of Frames.

Formats read here: ``canonical``, ``powervision``, ``winpep``, ``msl``, ``mlg`` (MLVLG
binary), ``csv`` (any delimited export). The CAN and capture formats that ``--format``
also names (``candump``, ``asc``, ``blf``, ``trc``, ``jetdrive``)
are recognised by :func:`~dynoai_daemon.logs.sniff.sniff_format` and read by whichever
module registers a reader for them with :func:`register_reader`; until then asking for one
is a clear error, not a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Protocol

from dynoai_daemon.errors import InputError
from dynoai_daemon.logs.base import DEFAULT_CHUNK_ROWS, LogReader
from dynoai_daemon.logs.canonical import CanonicalReader
from dynoai_daemon.logs.delimited import DelimitedReader
from dynoai_daemon.logs.mlg import MlgReader
from dynoai_daemon.logs.msl import MslReader
from dynoai_daemon.logs.powervision import PowerVisionReader
from dynoai_daemon.logs.sniff import sniff_format
from dynoai_daemon.logs.winpep import WinPepReader

#: Every format name ``--format`` accepts besides ``auto``.
FORMATS: Final[tuple[str, ...]] = (
    "canonical",
    "powervision",
    "winpep",
    "msl",
    "candump",
    "asc",
    "blf",
    "jetdrive",
    "mlg",
    "csv",
    "trc",
)


class ReaderFactory(Protocol):
    """Builds a LogReader; LogReader subclasses satisfy this."""

    def __call__(self, path: str | Path, *, chunk_rows: int, stoich: float) -> LogReader: ...


_READERS: dict[str, ReaderFactory] = {
    "canonical": CanonicalReader,
    "powervision": PowerVisionReader,
    "winpep": WinPepReader,
    "msl": MslReader,
    "mlg": MlgReader,
    "csv": DelimitedReader,
}


def register_reader(fmt: str, factory: ReaderFactory) -> None:
    """Make ``read_log(..., format=fmt)`` use ``factory`` (e.g. for CAN log formats)."""
    _READERS[fmt] = factory


def read_log(
    path: str | Path,
    *,
    format: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    stoich: float = 14.7,
) -> LogReader:
    """Open a recorded log for reading in chunks.

    The header is read and checked now; the data as the returned reader is iterated
    (each iteration reads the file again).

    Args:
        path: the log file.
        format: a name from :data:`FORMATS`, or ``"auto"`` to sniff it.
        chunk_rows: the most rows one Frame holds.
        stoich: stoichiometric AFR for converting lambda columns to AFR.

    Returns:
        A LogReader: iterable of Frames, with ``path``, ``format`` and ``rows_read``.

    Raises:
        InputError: the file cannot be read, or the format is unknown or has no reader.
        LogFormatError: the header is malformed (the data's errors come while iterating).
        ValueError: ``chunk_rows`` < 1 or ``stoich`` not positive.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("no such log file", path=str(p))
    fmt = sniff_format(p) if format == "auto" else format
    factory = _READERS.get(fmt)
    if factory is None:
        if fmt in FORMATS:
            raise InputError(f"format {fmt!r} has no log reader installed", path=str(p))
        raise InputError(
            f"unknown log format {fmt!r} (known: auto, {', '.join(FORMATS)})", path=str(p)
        )
    try:
        return factory(p, chunk_rows=chunk_rows, stoich=stoich)
    except OSError as exc:
        raise InputError(f"cannot read log: {exc.strerror or exc}", path=str(p)) from exc

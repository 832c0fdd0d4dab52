"""Tune files: read a tune's VE, spark and AFR target tables, write corrected ones back.

One module per format, each a pure reader and writer over the common
:class:`~dynoai_daemon.tune.model.TuneTables`: ``.msq`` (TunerStudio tune), ``.table``
(TunerStudio table export), ``.vex`` (VEX 1.0), ``.pvv`` (Power Vision) and ``.csv`` (a
plain grid). The format is chosen by the file's extension. :func:`save_tune` writes a tune
back into its own document (only changed cells differ) or, for another extension, a new
document of that format holding just the tables.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from dynoai_daemon.tune import csvgrid, msq, pvv, ts_table, vex
from dynoai_daemon.tune.model import TuneFormatError, TuneTable, TuneTables

FORMATS: dict[str, ModuleType] = {
    "msq": msq,
    "table": ts_table,
    "vex": vex,
    "pvv": pvv,
    "csv": csvgrid,
}


def format_of(path: str | os.PathLike[str]) -> str:
    """The format name of a path's extension.

    Raises:
        TuneFormatError: an extension no module reads.
    """
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise TuneFormatError(
            f"unknown tune format {('.' + ext) if ext else '(no extension)'}; "
            "use .msq, .table, .vex, .pvv or .csv",
            str(path),
        )
    return ext


def read_tune(data: bytes, path: str) -> TuneTables:
    """Parse tune bytes in the format of ``path``'s extension."""
    reader: Callable[[bytes, str], TuneTables] = FORMATS[format_of(path)].read
    return reader(data, path)


def load_tune(path: str | os.PathLike[str]) -> TuneTables:
    """Read a tune file.

    Raises:
        TuneFormatError: unknown extension, unreadable file or a malformed document.
    """
    p = str(path)
    fmt = format_of(p)
    try:
        data = Path(p).read_bytes()
    except OSError as exc:
        raise TuneFormatError(f"cannot read tune: {exc.strerror or exc}", p) from None
    out: TuneTables = FORMATS[fmt].read(data, p)
    return out


def tune_bytes(tune: TuneTables, fmt: str) -> bytes:
    """The bytes of ``tune`` in ``fmt``: its own document patched when the format is the
    one it was read from, else a new document of ``fmt``."""
    module = FORMATS[fmt]
    if tune.text is not None and tune.format == fmt:
        out: bytes = module.write(tune)
    else:
        out = module.dump(tune)
    return out


def save_tune(tune: TuneTables, path: str | os.PathLike[str]) -> Path:
    """Write ``tune`` to ``path`` (format by extension) atomically.

    Raises:
        TuneFormatError: unknown extension, a table the format cannot hold, or the file
            cannot be written.
    """
    p = str(path)
    data = tune_bytes(tune, format_of(p))
    target = Path(p)
    tmp = ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise TuneFormatError(f"cannot write tune: {exc.strerror or exc}", p) from None
    return target


__all__ = [
    "FORMATS",
    "TuneFormatError",
    "TuneTable",
    "TuneTables",
    "format_of",
    "load_tune",
    "read_tune",
    "save_tune",
    "tune_bytes",
]

"""Guess a log file's format from its first bytes (``--format auto``).

Rules, first match wins: BLF magic ``LOGG`` -> ``blf``; ``MLVLG`` -> ``mlg``; a pcap or pcapng magic
number -> ``jetdrive`` (a capture of the dyno's UDP stream); first line ``Dynojet Power Vision Log
File`` -> ``powervision``; candump lines ``(1699999999.123456) can0 123#...`` ->
``candump``; Vector ``date ...`` / ``base hex`` lines -> ``asc``; a PCAN-View
``;$FILEVERSION`` first line -> ``trc``; a comma header starting
with ``time_s`` -> ``canonical``; a tab-separated names row with a ``Time`` column (or the
``.msl`` extension with tabs) -> ``msl``; a comma header with a time column and at least
one other known channel name -> ``winpep``; a ``;``-separated header with a time column ->
``csv``. Anything else is an error that asks for ``--format``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from dynoai_daemon.channels import TIME_COLUMN
from dynoai_daemon.errors import InputError, LogFormatError
from dynoai_daemon.logs.base import decode_text
from dynoai_daemon.logs.mlg import MAGIC as MLG_MAGIC
from dynoai_daemon.logs.powervision import MAGIC
from dynoai_daemon.logs.units import ALIASES, normalize_name, split_unit
from dynoai_daemon.logs.winpep import find_time_column

SNIFF_BYTES = 16_384
_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_CANDUMP = re.compile(r"^\(\d+(\.\d+)?\)\s+\S+\s+[0-9A-Fa-f]{3,8}#")
_ASC = re.compile(r"^(date\s|base\s+(hex|dec)\b)", re.IGNORECASE)


def sniff_format(path: str | Path) -> str:
    """Return the format name of the log at ``path``.

    Returns:
        One of ``canonical``, ``powervision``, ``winpep``, ``msl``, ``candump``, ``asc``,
        ``blf``, ``jetdrive``.

    Raises:
        InputError: the file cannot be read.
        LogFormatError: no rule matches (line 1).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read log: {exc.strerror or exc}", path=str(p)) from exc
    if head.startswith(b"LOGG"):
        return "blf"
    if head.startswith(MLG_MAGIC):
        return "mlg"
    if head[:4] in _PCAP_MAGICS or head[:4] == _PCAPNG_MAGIC:
        return "jetdrive"
    raw_lines = head.split(b"\n")
    if len(raw_lines) > 1 and len(head) == SNIFF_BYTES:
        raw_lines = raw_lines[:-1]  # the last one may be cut short
    lines = [decode_text(r) for r in raw_lines[:100]]
    content = [ln for ln in lines if ln.strip()]
    if not content:
        raise LogFormatError("empty file: cannot tell the log format", path=str(p), line=1)
    first = content[0].strip()
    if MAGIC in first.strip('",').lower():
        return "powervision"
    if _CANDUMP.match(first):
        return "candump"
    if any(_ASC.match(ln.strip()) for ln in content[:5]):
        return "asc"
    if first.startswith(";$FILEVERSION") or (p.suffix.lower() == ".trc" and first[:1] == ";"):
        return "trc"
    if "," in first or first == TIME_COLUMN:
        try:
            names = [n.strip() for n in next(csv.reader([first]))]
        except csv.Error:
            names = []
        if names and names[0] == TIME_COLUMN:
            return "canonical"
    for ln in content[:50]:
        if "\t" not in ln:
            continue
        names = [f.strip().strip('"').strip() for f in ln.split("\t")]
        if find_time_column(names) is not None:
            return "msl"
    if p.suffix.lower() == ".msl" and any("\t" in ln for ln in content):
        return "msl"
    for ln in content[:50]:
        try:
            names = [n.strip() for n in next(csv.reader([ln]))]
        except csv.Error:
            continue
        ti = find_time_column(names)
        if ti is None:
            continue
        known = [
            n
            for i, n in enumerate(names)
            if i != ti and normalize_name(split_unit(n)[0]) in ALIASES
        ]
        if known:
            return "winpep"
    for ln in content[:50]:
        if ";" not in ln:
            continue
        names = [n.strip().strip('"') for n in ln.split(";")]
        if find_time_column(names) is not None:
            return "csv"
    raise LogFormatError(
        "cannot tell the log format; pass --format "
        "(canonical, powervision, winpep, msl, mlg, csv with --columns, candump, asc, blf, "
        "trc, jetdrive)",
        path=str(p),
        line=1,
    )

"""TunerStudio ``.table`` exports (one table per file): read, write changed cells back.

Sources followed: the layout TunerStudio's "Export Table" writes, as open-source tools
that exchange these files describe and read it (e.g. FoxTune's ``TableFileCodec``): a
``<tableData xmlns="http://www.EFIAnalytics.com/:table">`` root with ``<bibliography>``,
``<versionInfo fileFormat="1.0">`` and one ``<table rows cols>`` holding ``<xAxis>`` (RPM,
one value per line), ``<yAxis>`` (load, one per line) and ``<zValues>`` (one line per load
row, values space separated, rows in the order of ``<yAxis>``). Either axis may be written
descending; the reader turns it ascending and keeps the cells' places, so writing back
keeps the file's own order. A ``.table`` carries no units: the load is taken as kPa unless
the y axis is named for the throttle (``tps``/``throttle``: %). The file holds one table,
which is read as the VE table of both cylinders; the resolution is what the values show.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import numpy as np

from dynoai_daemon.tune.model import (
    LoadUnit,
    Slot,
    TuneFormatError,
    TuneTable,
    TuneTables,
    check_axis,
    format_fixed,
    infer_resolution,
    parse_number,
    patch_text,
    round_to,
)

NAMESPACE = "http://www.EFIAnalytics.com/:table"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _element(text: str, tag: str, path: str) -> tuple[dict[str, str], int, int]:
    m = re.search(rf"<{tag}\b([^>]*)>(.*?)</{tag}>", text, re.S)
    if m is None:
        raise TuneFormatError(f"not a TunerStudio table export (no <{tag}>)", path)
    attrs = dict(re.findall(r'([A-Za-z_][\w.-]*)="([^"]*)"', m.group(1)))
    return attrs, m.start(2), m.end(2)


def _tokens(text: str, start: int, end: int, what: str, path: str) -> list[tuple[str, Slot]]:
    out = [
        (m.group(0), Slot(m.start(), m.end()))  # positions in ``text`` already
        for m in _NUMBER.finditer(text, start, end)
    ]
    if not out:
        raise TuneFormatError(f"<{what}> holds no numbers", path)
    return out


def read(data: bytes, path: str) -> TuneTables:
    """Parse a ``.table`` export.

    Raises:
        TuneFormatError: not XML, not a ``<tableData>`` document, or the values do not
            fill the axes.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise TuneFormatError(f"not a TunerStudio table export (bad XML: {exc})", path) from None
    if not root.tag.endswith("tableData"):
        raise TuneFormatError(f"not a TunerStudio table export (root <{root.tag}>)", path)
    text = data.decode("utf-8", errors="surrogateescape")
    xa, xs, xe = _element(text, "xAxis", path)
    ya, ys, ye = _element(text, "yAxis", path)
    _, zs, ze = _element(text, "zValues", path)
    xt = _tokens(text, xs, xe, "xAxis", path)
    yt = _tokens(text, ys, ye, "yAxis", path)
    rpm = [parse_number(t, "xAxis", path) for t, _ in xt]
    load = [parse_number(t, "yAxis", path) for t, _ in yt]
    # zValues: one line per y bin.
    rows: list[list[tuple[str, Slot]]] = []
    pos = zs
    for line in text[zs:ze].split("\n"):
        toks = [(m.group(0), Slot(pos + m.start(), pos + m.end())) for m in _NUMBER.finditer(line)]
        if toks:
            rows.append(toks)
        pos += len(line) + 1
    if len(rows) != len(load) or any(len(r) != len(rpm) for r in rows):
        raise TuneFormatError(
            f"<zValues> is not {len(load)} rows of {len(rpm)} values ({len(rows)} rows found)",
            path,
        )
    # To [rpm][load], then ascending axes.
    tok = [[rows[j][i][0] for j in range(len(load))] for i in range(len(rpm))]
    slots = [[rows[j][i][1] for j in range(len(load))] for i in range(len(rpm))]
    vals = np.array([[parse_number(t, "zValues", path) for t in r] for r in tok], dtype=np.float64)
    if len(rpm) > 1 and rpm[0] > rpm[-1]:
        rpm, tok, slots, vals = rpm[::-1], tok[::-1], slots[::-1], vals[::-1, :]
    if len(load) > 1 and load[0] > load[-1]:
        load = load[::-1]
        tok = [r[::-1] for r in tok]
        slots = [r[::-1] for r in slots]
        vals = vals[:, ::-1]
    check_axis(rpm, "xAxis (rpm)", path)
    check_axis(load, "yAxis (load)", path)
    yname = ya.get("name", "")
    unit: LoadUnit = "%" if re.search(r"tps|throttle", yname, re.I) else "kPa"
    table = TuneTable(
        name="ve_front",
        rpm_axis=np.asarray(rpm),
        load_axis=np.asarray(load),
        load_unit=unit,
        values=np.ascontiguousarray(vals),
        resolution=infer_resolution([t for r in tok for t in r]),
        source=f"{xa.get('name', 'x')} x {yname or 'y'}",
        slots=slots,
        tokens=tok,
    )
    return TuneTables(
        format="table",
        tables={"ve_front": table},
        aliases={"ve_rear": "ve_front"},
        text=text,
        encoding="utf-8",
        path=path,
        notes=["one table, read as the VE table of both cylinders"],
    )


def _format(table: TuneTable, value: float, token: str) -> str:
    return format_fixed(value, table.decimals, token)


def write(tune: TuneTables) -> bytes:
    """The original export with the changed cells rewritten."""
    return patch_text(tune, _format).encode("utf-8", errors="surrogateescape")


def dump(tune: TuneTables) -> bytes:
    """A new ``.table`` of the VE table.

    Raises:
        TuneFormatError: the tune has different front and rear VE tables (a ``.table``
            holds one).
    """
    t = tune.get("ve_front")
    rear = tune.get("ve_rear")
    if t is None:
        raise TuneFormatError("no VE table to write", tune.path or ".table")
    if rear is not None and rear is not t and not np.array_equal(rear.values, t.values):
        raise TuneFormatError(
            "a .table holds one table but the front and rear VE tables differ "
            "(write .msq, .vex, .pvv or .csv)",
            tune.path or ".table",
        )
    vals = round_to(t.values, t.resolution)
    d = max(t.decimals, 1)
    ny, nx = t.shape[1], t.shape[0]
    yname = "tpsBins" if t.load_unit == "%" else "fuelLoad"
    out = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n',
        f'<tableData xmlns="{NAMESPACE}">\n',
        f'<bibliography author="dynoai" writeDate="'
        f'{datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")}"/>\n',
        '<versionInfo fileFormat="1.0"/>\n',
        f'<table cols="{nx}" rows="{ny}">\n',
        f'<xAxis cols="{nx}" name="rpm">\n',
        *(f"         {float(v):.1f} \n" for v in t.rpm_axis),
        "      </xAxis>\n",
        f'<yAxis name="{yname}" rows="{ny}">\n',
        *(f"         {float(v):.1f} \n" for v in t.load_axis),
        "      </yAxis>\n",
        f'<zValues cols="{nx}" rows="{ny}">\n',
        *(
            "         " + " ".join(f"{float(v):.{d}f}" for v in vals[:, j]) + " \n"
            for j in range(ny)
        ),
        "      </zValues>\n",
        "</table>\n",
        "</tableData>\n",
    ]
    return "".join(out).encode("utf-8")


__all__ = ["NAMESPACE", "dump", "read", "write"]

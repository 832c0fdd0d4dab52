"""TunerStudio ``.msq`` tunes (MegaSquirt MS2/MS3 and Speeduino): read the VE, spark and
AFR target tables, write changed cells back in place.

Sources followed: the real TunerStudio tunes Speeduino publishes in its repository
(``reference/Base Tunes/*.msq``, file format 5.0) and the table/axis constant names the
MegaSquirt INI files define (``veTable1`` on ``frpm_table1`` x ``fmap_table1``,
``advanceTable1`` on ``srpm_table1`` x ``smap_table1``, ``afrTable1`` on ``arpm_table1`` x
``amap_table1``) as open-source msq readers (MegaTunix, MSQ viewers) use them. A table is a
``<constant rows=".." cols=".." digits=".." name="..">`` whose text lists the values row by
row: the rows are the LOAD axis (row 0 = the first load bin) and the columns the RPM axis,
as the Speeduino tunes show (row 0 of ``veTable`` at 16 kPa holds the smallest VE).
``digits`` is the resolution. Which constants are which table:

* Speeduino (``veTable`` on ``rpmBins`` x ``fuelLoadBins``): one VE table for both
  cylinders; ``veTable2`` is Speeduino's secondary fuel table (blended or switched), not a
  rear-cylinder table, and is left alone. Spark ``advTable1`` (``rpmBins2`` x ``mapBins1``),
  AFR target ``afrTable`` (``rpmBinsAFR`` x ``loadBinsAFR``).
* MegaSquirt (``veTable1``): ``veTable1`` is the front cylinder, ``veTable2`` (when
  present) the rear (MS2/Extra and MS3 dual-table fuelling); with no ``veTable2`` the
  one table serves both. Spark ``advanceTable1`` (both), AFR target ``afrTable1``.

The load unit comes from the load bins' ``units`` (``kPa`` or ``%``) or, for Speeduino,
from ``algorithm`` (``"TPS"`` = alpha-N). Writing changes only the numbers of the cells
that changed, keeping every byte around them, so an unchanged tune round-trips
byte-identical.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from dynoai_daemon.tune.model import (
    LoadUnit,
    Slot,
    TuneFormatError,
    TuneTable,
    TuneTables,
    check_axis,
    decimals_of,
    infer_resolution,
    parse_number,
    patch_text,
    round_to,
)

ENCODING = "iso-8859-1"
_CONSTANT = re.compile(r"<constant\b([^>]*?)(?:/>|>(.*?)</constant>)", re.S)
_ATTR = re.compile(r'([A-Za-z_][\w.-]*)="([^"]*)"')
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

#: (table name, z constant, x (rpm) constant, y (load) constant) per family.
SPEEDUINO: tuple[tuple[str, str, str, str], ...] = (
    ("ve_front", "veTable", "rpmBins", "fuelLoadBins"),
    ("spark_front", "advTable1", "rpmBins2", "mapBins1"),
    ("afr_target", "afrTable", "rpmBinsAFR", "loadBinsAFR"),
)
MEGASQUIRT: tuple[tuple[str, str, str, str], ...] = (
    ("ve_front", "veTable1", "frpm_table1", "fmap_table1"),
    ("ve_rear", "veTable2", "frpm_table2", "fmap_table2"),
    ("spark_front", "advanceTable1", "srpm_table1", "smap_table1"),
    ("spark_rear", "advanceTable2", "srpm_table2", "smap_table2"),
    ("afr_target", "afrTable1", "arpm_table1", "amap_table1"),
)


@dataclass(frozen=True, slots=True)
class _Constant:
    attrs: dict[str, str]
    body: str
    body_start: int


def _constants(text: str) -> dict[str, _Constant]:
    out: dict[str, _Constant] = {}
    for m in _CONSTANT.finditer(text):
        attrs = dict(_ATTR.findall(m.group(1)))
        name = attrs.get("name")
        if name and name not in out:
            body = m.group(2) or ""
            out[name] = _Constant(attrs, body, m.start(2) if m.group(2) is not None else m.end())
    return out


def _numbers(c: _Constant, what: str, path: str) -> tuple[list[float], list[str], list[Slot]]:
    vals: list[float] = []
    toks: list[str] = []
    slots: list[Slot] = []
    for m in _NUMBER.finditer(c.body):
        toks.append(m.group(0))
        vals.append(parse_number(m.group(0), what, path))
        slots.append(Slot(c.body_start + m.start(), c.body_start + m.end()))
    return vals, toks, slots


def _load_unit(bins: _Constant, consts: dict[str, _Constant], path: str) -> LoadUnit:
    unit = bins.attrs.get("units", "").strip().lower()
    algo = consts.get("algorithm")
    if algo is not None and "tps" in algo.body.lower():
        return "%"
    if "kpa" in unit:
        return "kPa"
    if unit in ("%", "tps", "tps %", "% tps"):
        return "%"
    if algo is not None and "map" in algo.body.lower():
        return "kPa"
    raise TuneFormatError(
        f"load axis {bins.attrs.get('name')!r} in unit {bins.attrs.get('units', '')!r}: "
        "only kPa (MAP) or % (TPS) tables can be tuned",
        path,
    )


def _table(
    name: str, z: _Constant, x: _Constant, y: _Constant, consts: dict[str, _Constant], path: str
) -> TuneTable:
    zname = z.attrs.get("name", "?")
    rpm, _, _ = _numbers(x, x.attrs.get("name", "rpm bins"), path)
    load, _, _ = _numbers(y, y.attrs.get("name", "load bins"), path)
    check_axis(rpm, f"{zname}: rpm axis", path)
    check_axis(load, f"{zname}: load axis", path)
    vals, toks, slots = _numbers(z, zname, path)
    try:
        rows, cols = int(z.attrs["rows"]), int(z.attrs["cols"])
    except (KeyError, ValueError):
        raise TuneFormatError(f"{zname}: rows/cols missing or not integers", path) from None
    if rows != len(load) or cols != len(rpm):
        raise TuneFormatError(
            f"{zname}: {rows}x{cols} but {len(load)} load and {len(rpm)} rpm bins", path
        )
    if len(vals) != rows * cols:
        raise TuneFormatError(f"{zname}: {len(vals)} values for {rows}x{cols} cells", path)
    digits = z.attrs.get("digits")
    if digits is not None and digits.isdigit():
        res = 10.0 ** -int(digits)
    else:
        res = infer_resolution(toks)
    # Text rows are load, columns rpm: transpose to [rpm][load].
    grid = np.asarray(vals, dtype=np.float64).reshape(rows, cols).T
    slot_grid = [[slots[j * cols + i] for j in range(rows)] for i in range(cols)]
    tok_grid = [[toks[j * cols + i] for j in range(rows)] for i in range(cols)]
    return TuneTable(
        name=name,
        rpm_axis=np.asarray(rpm),
        load_axis=np.asarray(load),
        load_unit=_load_unit(y, consts, path),
        values=grid,
        resolution=res,
        source=zname,
        slots=slot_grid,
        tokens=tok_grid,
    )


def read(data: bytes, path: str) -> TuneTables:
    """Parse a TunerStudio tune.

    Raises:
        TuneFormatError: not XML, not an ``<msq>`` document, no VE table, or a table
            whose shape or numbers are wrong.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise TuneFormatError(f"not a TunerStudio tune (bad XML: {exc})", path) from None
    if not root.tag.endswith("msq"):
        raise TuneFormatError(f"not a TunerStudio tune (root <{root.tag}>)", path)
    text = data.decode(ENCODING)
    consts = _constants(text)
    family = MEGASQUIRT if "veTable1" in consts else SPEEDUINO
    tables: dict[str, TuneTable] = {}
    notes: list[str] = []
    for name, zn, xn, yn in family:
        if zn not in consts:
            continue
        if xn not in consts or yn not in consts:
            raise TuneFormatError(f"{zn}: axis constant {xn} or {yn} missing", path)
        tables[name] = _table(name, consts[zn], consts[xn], consts[yn], consts, path)
        notes.append(f"{name}: {zn} on {xn} x {yn}")
    if "ve_front" not in tables:
        raise TuneFormatError("no VE table (veTable or veTable1) in the tune", path)
    aliases: dict[str, str] = {}
    if "ve_rear" not in tables:
        aliases["ve_rear"] = "ve_front"
        notes.append("one VE table for both cylinders")
    if "spark_front" in tables and "spark_rear" not in tables:
        aliases["spark_rear"] = "spark_front"
    return TuneTables(
        format="msq",
        tables=tables,
        aliases=aliases,
        text=text,
        encoding=ENCODING,
        path=path,
        notes=notes,
    )


def _format(table: TuneTable, value: float, token: str) -> str:
    # TunerStudio writes Java doubles: at least one decimal ("39.0", "14.7").
    return repr(round(value, max(table.decimals, 1)))


def write(tune: TuneTables) -> bytes:
    """The original tune with the changed cells rewritten (byte-identical otherwise)."""
    return patch_text(tune, _format).encode(ENCODING)


def _block(name: str, rows: int, cols: int, digits: int, units: str, lines: list[str]) -> str:
    body = "".join(f"         {ln} \n" for ln in lines)
    return (
        f'        <constant cols="{cols}" digits="{digits}" name="{name}" rows="{rows}" '
        f'units="{units}">\n{body}      </constant>\n'
    )


def _axis_block(name: str, axis: np.ndarray, units: str) -> str:
    return _block(name, axis.size, 1, 0, units, [repr(round(float(v), 3)) for v in axis])


def dump(tune: TuneTables) -> bytes:
    """A new MegaSquirt-style tune holding only the tables (``veTable1``/``veTable2``,
    ``advanceTable1``/``advanceTable2``, ``afrTable1`` with their axis constants)."""
    parts = [
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n',
        '<msq xmlns="http://www.msefi.com/:msq">\n',
        f'    <bibliography author="dynoai" tuneComment="tables written by dynoai" '
        f'writeDate="{datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")}"/>\n',
        '    <versionInfo fileFormat="5.0" nPages="1" signature="dynoai tables"/>\n',
        '    <page number="0">\n',
    ]
    for name, zn, xn, yn in MEGASQUIRT:
        if name not in tune.tables:
            continue
        t = tune.tables[name]
        units = {"ve": "%", "sp": "deg", "af": "AFR"}[name[:2]]
        vals = round_to(t.values, t.resolution)
        lines = [
            " ".join(repr(round(float(v), max(t.decimals, 1))) for v in vals[:, j])
            for j in range(t.shape[1])
        ]
        parts.append(_axis_block(xn, t.rpm_axis, "RPM"))
        parts.append(_axis_block(yn, t.load_axis, t.load_unit))
        parts.append(_block(zn, t.shape[1], t.shape[0], decimals_of(t.resolution), units, lines))
    parts.append("    </page>\n</msq>\n")
    return "".join(parts).encode(ENCODING)


__all__ = ["dump", "read", "write"]

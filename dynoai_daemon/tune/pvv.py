"""Dynojet Power Vision ``.pvv`` exports of Harley-Davidson (Delphi) tunes: read, write.

Sources followed: a real Power Vision export of a Delphi tune (public, in the DynoAI_3
project) and the layout it shows: ``<PVV>`` holding ``<Item name units>`` elements, each
with ``<Columns units><Col label/>...</Columns>`` and ``<Rows units><Row label><Cell
value/>...</Row>...</Rows>``. Tables of interest: ``VE (MAP based/Front Cyl)`` / ``Rear
Cyl`` (columns kPa, rows ``RPMx1000``), the alpha-N ``VE (TPS based/Front Cyl)`` / ``Rear
Cyl`` (columns TPS %, read as ``ve_tps_front`` / ``ve_tps_rear``), ``Spark Advance (Front
Cyl)`` / ``(Rear Cyl)`` and the AFR target ``Air-Fuel Ratio``. Rows are RPM (x1000 when the
rows' unit says so), columns load. Delphi tables have a fixed size and pad unused
breakpoints by repeating the last one (``8, 8, 8`` rpm; ``100, 100`` kPa), so axes may
repeat; every cell is kept and written back in place. The file stores no resolution: it
is inferred from the values (0.5 % steps for VE, 0.25 deg for spark in that export).
Only the ``value`` attributes of changed cells are rewritten.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

import numpy as np

from dynoai_daemon.tune.model import (
    LoadUnit,
    Slot,
    TuneFormatError,
    TuneTable,
    TuneTables,
    check_axis,
    format_minimal,
    infer_resolution,
    parse_number,
    patch_text,
    round_to,
)

#: table name -> Power Vision item name
ITEMS: dict[str, str] = {
    "ve_front": "VE (MAP based/Front Cyl)",
    "ve_rear": "VE (MAP based/Rear Cyl)",
    "ve_tps_front": "VE (TPS based/Front Cyl)",
    "ve_tps_rear": "VE (TPS based/Rear Cyl)",
    "spark_front": "Spark Advance (Front Cyl)",
    "spark_rear": "Spark Advance (Rear Cyl)",
    "afr_target": "Air-Fuel Ratio",
}
_ITEM = re.compile(r"<Item\b([^>]*)>(.*?)</Item>", re.S)
_ATTR = re.compile(r'([A-Za-z_][\w.-]*)="([^"]*)"')
_ROW = re.compile(r"<Row\b([^>]*)>(.*?)</Row>", re.S)
_CELL = re.compile(r'<Cell\b[^>]*?\bvalue="([^"]*)"')
_COL = re.compile(r'<Col\b[^>]*?\blabel="([^"]*)"')


def _unescape(s: str) -> str:
    return s.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _unit(units: str, item: str, path: str) -> LoadUnit:
    u = units.strip().lower()
    if u in ("kilopascals", "kpa"):
        return "kPa"
    if u in ("%", "percent", "tps", "tps %"):
        return "%"
    raise TuneFormatError(f"{item}: load unit {units!r} is neither kPa nor %", path)


def _rpm_factor(units: str) -> float:
    return 1000.0 if "x1000" in units.lower().replace(" ", "") else 1.0


def _item_table(name: str, item: str, attrs_body: tuple[int, str], path: str) -> TuneTable:
    start, body = attrs_body
    cols_m = re.search(r"<Columns\b([^>]*)>(.*?)</Columns>", body, re.S)
    rows_m = re.search(r"<Rows\b([^>]*)>(.*?)</Rows>", body, re.S)
    if cols_m is None or rows_m is None:
        raise TuneFormatError(f"{item}: no <Columns> or <Rows>", path)
    col_units = dict(_ATTR.findall(cols_m.group(1))).get("units", "")
    row_units = dict(_ATTR.findall(rows_m.group(1))).get("units", "")
    load = [parse_number(v, f"{item} column", path) for v in _COL.findall(cols_m.group(2))]
    factor = _rpm_factor(row_units)
    rpm: list[float] = []
    toks: list[list[str]] = []
    slots: list[list[Slot]] = []
    base = start + rows_m.start(2)
    for rm in _ROW.finditer(rows_m.group(2)):
        label = dict(_ATTR.findall(rm.group(1))).get("label", "")
        rpm.append(parse_number(label, f"{item} row", path) * factor)
        rtoks: list[str] = []
        rslots: list[Slot] = []
        cbase = base + rm.start(2)
        for cm in _CELL.finditer(rm.group(2)):
            rtoks.append(_unescape(cm.group(1)))
            rslots.append(Slot(cbase + cm.start(1), cbase + cm.end(1)))
        if len(rtoks) != len(load):
            raise TuneFormatError(
                f"{item}: row {label}: {len(rtoks)} cells for {len(load)} columns", path
            )
        toks.append(rtoks)
        slots.append(rslots)
    check_axis(rpm, f"{item}: rows", path)
    check_axis(load, f"{item}: columns", path)
    vals = np.array([[parse_number(t, item, path) for t in r] for r in toks], dtype=np.float64)
    return TuneTable(
        name=name,
        rpm_axis=np.asarray(rpm),
        load_axis=np.asarray(load),
        load_unit=_unit(col_units, item, path),
        values=vals,
        resolution=infer_resolution([t for r in toks for t in r]),
        source=item,
        slots=slots,
        tokens=toks,
    )


def read(data: bytes, path: str) -> TuneTables:
    """Parse a Power Vision export.

    Raises:
        TuneFormatError: not XML, not a ``<PVV>`` document, no MAP-based VE table, or a
            table whose rows do not fill its columns.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise TuneFormatError(f"not a Power Vision file (bad XML: {exc})", path) from None
    if root.tag != "PVV":
        raise TuneFormatError(f"not a Power Vision file (root <{root.tag}>)", path)
    text = data.decode("utf-8", errors="surrogateescape")
    found: dict[str, tuple[int, str]] = {}
    for m in _ITEM.finditer(text):
        iname = _unescape(dict(_ATTR.findall(m.group(1))).get("name", ""))
        found.setdefault(iname, (m.start(2), m.group(2)))
    tables: dict[str, TuneTable] = {}
    notes: list[str] = []
    for name, item in ITEMS.items():
        if item in found:
            tables[name] = _item_table(name, item, found[item], path)
            notes.append(f"{name}: {item}")
    if "ve_front" not in tables and "ve_rear" not in tables:
        raise TuneFormatError("no 'VE (MAP based/...)' table in the Power Vision file", path)
    aliases: dict[str, str] = {}
    for a, b in (("ve_rear", "ve_front"), ("spark_rear", "spark_front")):
        if b in tables and a not in tables:
            aliases[a] = b
        elif a in tables and b not in tables:
            aliases[b] = a
    return TuneTables(
        format="pvv", tables=tables, aliases=aliases, text=text, encoding="utf-8",
        path=path, notes=notes,
    )  # fmt: skip


def _format(table: TuneTable, value: float, token: str) -> str:
    return format_minimal(value, table.decimals)


def write(tune: TuneTables) -> bytes:
    """The original export with the changed cells' values rewritten."""
    return patch_text(tune, _format).encode("utf-8", errors="surrogateescape")


def _item(name: str, t: TuneTable) -> str:
    vals = round_to(t.values, t.resolution)
    col_units = "Kilopascals" if t.load_unit == "kPa" else "%"
    units = {"ve": "%", "sp": "Degrees", "af": "AFR"}[name[:2]]
    out = [f'  <Item name={quoteattr(ITEMS[name])} units="{units}">\n']
    out.append(f'    <Columns units="{col_units}">\n')
    out += [f'      <Col label="{format_minimal(float(v), 3)}" />\n' for v in t.load_axis]
    out.append('    </Columns>\n    <Rows units="RPMx1000">\n')
    for i, r in enumerate(t.rpm_axis):
        out.append(f'      <Row label="{format_minimal(float(r) / 1000.0, 4)}">\n')
        out += [
            f'        <Cell value="{format_minimal(float(v), t.decimals)}" />\n' for v in vals[i]
        ]
        out.append("      </Row>\n")
    out.append("    </Rows>\n  </Item>\n")
    return "".join(out)


def dump(tune: TuneTables) -> bytes:
    """A new Power Vision file with the tables (a shared table as both cylinders')."""
    parts = ["<PVV>\n", "  <!--Written by dynoai-->\n"]
    for name in ITEMS:
        t = tune.get(name)
        if t is not None:
            parts.append(_item(name, t))
    parts.append("</PVV>")
    return "".join(parts).encode("utf-8")


__all__ = ["ITEMS", "dump", "read", "write"]

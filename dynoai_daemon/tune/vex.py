"""VEX 1.0 (``.vex``, "Engine Volumetric Efficiency Map Exchange", EVEME 1.0): read, write.

Sources followed: the EVEME 1.0 specification (Darren Clark and Eric Fahlgren, 07.14.02,
for the MegaSquirt project) and the reader/writer of its co-author in MegaTune's ``Vex.cpp``
(GPL; learned from, not copied). A plain ASCII file, case-insensitive, blank-delimited:
the first line is ``EVEME 1.0``; ``UserRev:``, ``UserComment:``, ``Date:``, ``Time:``
header lines; ``Page N`` starts map N (several maps in one file); optional ``Scale s`` and
``Translate t`` lines make a stored integer ``k`` mean ``(k + t) * s``; ``VE Table RPM
Range [n]`` is followed by n lines ``[ i] = rpm/100`` (RPM is written in hundreds);
``VE Table Load Range (MAP) [m]`` (or ``(TP)`` for alpha-N) by m lines of load bins; and
``VE Table [n][m]`` by a column-header line and m rows ``[ j] = v0 v1 ... v(n-1)``: one row
per LOAD bin, the columns RPM. Here page 0 is the front cylinder, page 1 the rear; a file
with one page is one table for both. The resolution is the ``Scale`` (1 without one).
Writing back replaces only the numbers of changed cells. RPM bins that are not whole
hundreds (750 rpm) are written as decimals (``7.5``), which MegaTune's reader accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from dynoai_daemon.tune.model import (
    LoadUnit,
    Slot,
    TuneFormatError,
    TuneTable,
    TuneTables,
    check_axis,
    format_minimal,
    parse_number,
    patch_text,
    round_to,
)

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_BRACKET = re.compile(r"\[\s*(\d+)\s*\]")


@dataclass
class _Page:
    number: int
    scale: float = 1.0
    translate: float = 0.0
    rpm: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    unit: LoadUnit = "kPa"
    rows: list[list[tuple[str, Slot]]] = field(default_factory=list)


def _lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pos = 0
    for line in text.split("\n"):
        out.append((pos, line))
        pos += len(line) + 1
    return out


def _value_after_eq(pos: int, line: str, what: str, path: str) -> tuple[str, Slot]:
    eq = line.find("=")
    if eq < 0:
        raise TuneFormatError(f"{what}: expected '[i] = value', got {line.strip()[:40]!r}", path)
    m = _NUMBER.search(line, eq + 1)
    if m is None:
        raise TuneFormatError(f"{what}: no number after '=' in {line.strip()[:40]!r}", path)
    return m.group(0), Slot(pos + m.start(), pos + m.end())


def _parse(text: str, path: str) -> list[_Page]:
    lines = _lines(text)
    if not lines or not lines[0][1].strip().upper().startswith("EVEME"):
        raise TuneFormatError("not a VEX file (first line is not 'EVEME 1.0')", path)
    pages: list[_Page] = []
    page: _Page | None = None
    k = 1
    while k < len(lines):
        _pos, raw = lines[k]
        line = raw.split("#", 1)[0].strip()
        up = line.upper()
        k += 1
        if not line:
            continue
        if up.startswith("PAGE"):
            m = _NUMBER.search(line)
            page = _Page(int(float(m.group(0))) if m else len(pages))
            pages.append(page)
            continue
        if page is None and up.startswith(("SCALE", "TRANSLATE", "VE TABLE")):
            page = _Page(0)
            pages.append(page)
        if page is None:
            continue  # header lines
        if up.startswith("SCALE"):
            page.scale = parse_number(line.split(None, 1)[-1], "Scale", path)
        elif up.startswith("TRANSLATE"):
            page.translate = parse_number(line.split(None, 1)[-1], "Translate", path)
        elif up.startswith("VE TABLE RPM RANGE") or up.startswith("VE TABLE LOAD RANGE"):
            m = _BRACKET.search(line)
            if m is None:
                raise TuneFormatError(f"{line[:40]!r}: missing [count]", path)
            n = int(m.group(1))
            if k + n > len(lines):
                raise TuneFormatError(f"{line[:40]!r}: file ends inside the range", path)
            vals = [
                parse_number(_value_after_eq(*lines[k + i], line[:30], path)[0], line[:30], path)
                for i in range(n)
            ]
            k += n
            if "RPM" in up:
                page.rpm = [v * 100.0 for v in vals]
            else:
                kind = line[line.find("(") + 1 : line.find(")")].strip().upper()
                if kind in ("TP", "TPS", "ALPHA-N", "%"):
                    page.unit = "%"
                elif kind not in ("MAP", "KPA", ""):
                    raise TuneFormatError(f"load range ({kind}): only MAP or TP can be tuned", path)
                page.load = vals
        elif up.startswith("VE TABLE"):
            if not page.rpm or not page.load:
                raise TuneFormatError("VE Table before its RPM and load ranges", path)
            k += 1  # the column header line
            if k + len(page.load) > len(lines):
                raise TuneFormatError("file ends inside the VE Table", path)
            for j in range(len(page.load)):
                lpos, lraw = lines[k + j]
                eq = lraw.find("=")
                toks = [
                    (m.group(0), Slot(lpos + m.start(), lpos + m.end()))
                    for m in _NUMBER.finditer(lraw, eq + 1 if eq >= 0 else len(lraw))
                ]
                if eq < 0 or len(toks) != len(page.rpm):
                    raise TuneFormatError(
                        f"VE Table row {j}: expected '[{j}] =' and {len(page.rpm)} values", path
                    )
                page.rows.append(toks)
            k += len(page.load)
    return [p for p in pages if p.rows]


def _table(name: str, p: _Page, path: str) -> TuneTable:
    rpm, load = list(p.rpm), list(p.load)
    tok = [[p.rows[j][i][0] for j in range(len(load))] for i in range(len(rpm))]
    slots = [[p.rows[j][i][1] for j in range(len(load))] for i in range(len(rpm))]
    raw = np.array([[parse_number(t, "VE Table", path) for t in r] for r in tok])
    if len(load) > 1 and load[0] > load[-1]:
        load = load[::-1]
        tok = [r[::-1] for r in tok]
        slots = [r[::-1] for r in slots]
        raw = raw[:, ::-1]
    check_axis(rpm, f"page {p.number}: rpm range", path)
    check_axis(load, f"page {p.number}: load range", path)
    table = TuneTable(
        name=name,
        rpm_axis=np.asarray(rpm),
        load_axis=np.asarray(load),
        load_unit=p.unit,
        values=(raw + p.translate) * p.scale,
        resolution=abs(p.scale) or 1.0,
        source=f"Page {p.number}",
        slots=slots,
        tokens=tok,
        store_scale=p.scale,
        store_offset=p.translate,
    )
    return table


def read(data: bytes, path: str) -> TuneTables:
    """Parse a VEX file: page 0 front, page 1 rear (one page: both).

    Raises:
        TuneFormatError: no ``EVEME`` header, no complete page, or malformed ranges/rows.
    """
    text = data.decode("latin-1")
    pages = _parse(text, path)
    if not pages:
        raise TuneFormatError("no complete VE table in the VEX file", path)
    tables = {"ve_front": _table("ve_front", pages[0], path)}
    aliases: dict[str, str] = {}
    notes = [f"ve_front: Page {pages[0].number}"]
    if len(pages) > 1:
        tables["ve_rear"] = _table("ve_rear", pages[1], path)
        notes.append(f"ve_rear: Page {pages[1].number}")
    else:
        aliases["ve_rear"] = "ve_front"
        notes.append("one page: one VE table for both cylinders")
    return TuneTables(
        format="vex", tables=tables, aliases=aliases, text=text, encoding="latin-1",
        path=path, notes=notes,
    )  # fmt: skip


def _format(table: TuneTable, value: float, token: str) -> str:
    k = value / table.store_scale - table.store_offset
    return format_minimal(round(k, 6), 0 if abs(k - round(k)) < 1e-6 else 6)


def write(tune: TuneTables) -> bytes:
    """The original VEX file with the changed cells rewritten."""
    return patch_text(tune, _format).encode("latin-1")


def _page(number: int, t: TuneTable) -> str:
    scale = t.resolution
    vals = np.round(round_to(t.values, t.resolution) / scale).astype(np.int64)
    kind = "TP" if t.load_unit == "%" else "MAP"
    out = [f"Page {number}\n"]
    if scale != 1.0:
        out.append(f"Scale {format_minimal(scale, 6)}\n")
    out.append(f"VE Table RPM Range              [{t.shape[0]:2d}]\n")
    out += [
        f"   [{i:3d}] = {format_minimal(float(v) / 100.0, 3):>3}\n"
        for i, v in enumerate(t.rpm_axis)
    ]
    out.append(f"VE Table Load Range ({kind})       [{t.shape[1]:2d}]\n")
    out += [f"   [{j:3d}] = {format_minimal(float(v), 3):>3}\n" for j, v in enumerate(t.load_axis)]
    out.append(f"VE Table                        [{t.shape[0]:3d}][{t.shape[1]:3d}]\n")
    out.append("          " + "".join(f" [{i:3d}]" for i in range(t.shape[0])) + "\n")
    for j in range(t.shape[1]):
        out.append(f"   [{j:3d}] =" + " ".join(f"{int(v):5d}" for v in vals[:, j]) + "\n")
    return "".join(out)


def dump(tune: TuneTables) -> bytes:
    """A new VEX file: page 0 = front VE, page 1 = rear VE (one page when shared)."""
    front = tune.get("ve_front")
    if front is None:
        raise TuneFormatError("no VE table to write", tune.path or ".vex")
    now = datetime.now(UTC)
    head = (
        "EVEME 1.0\nUserRev: 1.00\nUserComment: written by dynoai\n"
        f"Date: {now:%m-%d-%Y}\nTime: {now:%H:%M}\n"
    )
    body = _page(0, front)
    rear = tune.get("ve_rear")
    if rear is not None and rear is not front:
        body += _page(1, rear)
    return (head + body).encode("latin-1")


__all__ = ["dump", "read", "write"]

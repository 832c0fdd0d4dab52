"""A plain CSV grid of tables (``.csv``): this project's own spreadsheet-friendly format.

Layout (documented in the README): one or more blocks, each optionally introduced by a
line ``# <table name>`` (``ve_front``, ``ve_rear``, ``spark_front``, ``spark_rear``,
``afr_target``; other ``#`` lines are comments). A block's first row is ``rpm\\kPa`` (or
``rpm\\%`` for an alpha-N table) followed by the load breakpoints, each further row an
RPM breakpoint followed by that row's values: ``values[rpm][load]`` exactly as ``dynoai
tune show`` prints them. A block without a name line is the VE table of both cylinders;
``ve_front`` without ``ve_rear`` is also shared. Comma, semicolon or tab separated; blank
lines end a block. The resolution is the most decimals a block's values show. Writing
back replaces only changed numbers.
"""

from __future__ import annotations

import re

import numpy as np

from dynoai_daemon.tune.model import (
    TABLE_NAMES,
    LoadUnit,
    Slot,
    TuneFormatError,
    TuneTable,
    TuneTables,
    check_axis,
    format_fixed,
    parse_number,
    patch_text,
    round_to,
)

_SEP = re.compile(r"[,;\t]")


def _cells(line: str, pos: int) -> list[tuple[str, Slot]]:
    out: list[tuple[str, Slot]] = []
    start = 0
    for m in [*_SEP.finditer(line), None]:
        end = m.start() if m is not None else len(line)
        raw = line[start:end]
        stripped = raw.strip()
        lead = len(raw) - len(raw.lstrip())
        out.append((stripped, Slot(pos + start + lead, pos + start + lead + len(stripped))))
        if m is not None:
            start = m.end()
    return out


def _resolution(tokens: list[str]) -> float:
    d = max((len(t.split(".", 1)[1]) for t in tokens if "." in t), default=0)
    return 10.0**-d


def _block(name: str, lines: list[tuple[int, str]], path: str) -> TuneTable:
    head_pos, head = lines[0]
    head_cells = _cells(head, head_pos)
    corner = head_cells[0][0].lower().replace(" ", "")
    unit: LoadUnit
    if corner.endswith("%") or "tps" in corner:
        unit = "%"
    elif corner.endswith("kpa") or corner in ("rpm", ""):
        unit = "kPa"
    else:
        raise TuneFormatError(f"{name}: first cell {head_cells[0][0]!r} is not rpm\\kPa", path)
    load = [parse_number(t, f"{name} load axis", path) for t, _ in head_cells[1:]]
    rpm: list[float] = []
    toks: list[list[str]] = []
    slots: list[list[Slot]] = []
    for pos, line in lines[1:]:
        cells = _cells(line, pos)
        if len(cells) != len(load) + 1:
            raise TuneFormatError(
                f"{name}: row {cells[0][0]!r} has {len(cells) - 1} values for "
                f"{len(load)} load breakpoints",
                path,
            )
        rpm.append(parse_number(cells[0][0], f"{name} rpm axis", path))
        toks.append([t for t, _ in cells[1:]])
        slots.append([s for _, s in cells[1:]])
    check_axis(rpm, f"{name}: rpm", path)
    check_axis(load, f"{name}: load", path)
    vals = np.array([[parse_number(t, name, path) for t in r] for r in toks], dtype=np.float64)
    return TuneTable(
        name=name,
        rpm_axis=np.asarray(rpm),
        load_axis=np.asarray(load),
        load_unit=unit,
        values=vals,
        resolution=_resolution([t for r in toks for t in r]),
        source=f"csv block {name}",
        slots=slots,
        tokens=toks,
    )


def read(data: bytes, path: str) -> TuneTables:
    """Parse a CSV grid.

    Raises:
        TuneFormatError: not text, an unknown table name, ragged rows or bad numbers.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TuneFormatError("not a CSV grid (not UTF-8 text)", path) from None
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    name = ""
    cur: list[tuple[int, str]] = []
    pos = 0
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if stripped.startswith("#"):
            if cur:
                blocks.append((name, cur))
                cur = []
            word = stripped.lstrip("#").strip()
            if word in TABLE_NAMES:
                name = word  # else a comment
        elif not stripped.strip(",;\t "):
            if cur:
                blocks.append((name, cur))
                cur, name = [], ""
        else:
            cur.append((pos, line))
        pos += len(raw) + 1
    if cur:
        blocks.append((name, cur))
    if not blocks:
        raise TuneFormatError("no table in the CSV grid", path)
    tables: dict[str, TuneTable] = {}
    for bname, lines in blocks:
        key = bname or "ve_front"
        if key in tables:
            raise TuneFormatError(f"table {key} appears twice", path)
        if len(lines) < 2:
            raise TuneFormatError(f"{key}: needs a header row and at least one rpm row", path)
        tables[key] = _block(key, lines, path)
    if "ve_front" not in tables and "ve_rear" not in tables:
        raise TuneFormatError("no VE table in the CSV grid", path)
    aliases: dict[str, str] = {}
    for a, b in (("ve_rear", "ve_front"), ("spark_rear", "spark_front")):
        if b in tables and a not in tables:
            aliases[a] = b
        elif a in tables and b not in tables:
            aliases[b] = a
    notes = [f"{n}: csv block" for n in tables]
    return TuneTables(
        format="csv", tables=tables, aliases=aliases, text=text, encoding="utf-8",
        path=path, notes=notes,
    )  # fmt: skip


def _format(table: TuneTable, value: float, token: str) -> str:
    return format_fixed(value, table.decimals, token)


def write(tune: TuneTables) -> bytes:
    """The original CSV with the changed cells rewritten."""
    return patch_text(tune, _format).encode("utf-8")


def dump(tune: TuneTables) -> bytes:
    """A new CSV grid: every real table as a named block."""
    out: list[str] = []
    for name in TABLE_NAMES:
        t = tune.tables.get(name)
        if t is None:
            continue
        vals = round_to(t.values, t.resolution)
        unit = "kPa" if t.load_unit == "kPa" else "%"
        out.append(f"# {name}\n")
        out.append(f"rpm\\{unit}," + ",".join(f"{v:g}" for v in t.load_axis) + "\n")
        for i, r in enumerate(t.rpm_axis):
            out.append(f"{r:g}," + ",".join(f"{v:.{t.decimals}f}" for v in vals[i]) + "\n")
        out.append("\n")
    return "".join(out).encode("utf-8")


__all__ = ["dump", "read", "write"]

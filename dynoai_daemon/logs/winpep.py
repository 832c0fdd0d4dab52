"""WinPEP / DynoAI style wide CSV logs: one row per sample, named columns, no units row.

Columns are recognised by case-, space- and punctuation-insensitive aliases
(``timestamp``, ``rpm``, ``map``, ``torque``, ``afr cmd f``, ``measured afr f``,
``knock r``, ``timing_f``, ``ve_r``...; see :mod:`dynoai_daemon.logs.units`). A unit may
follow a name in brackets (``Torque (N-m)``, ``MAP [psi]``) and is then converted;
without one the canonical unit is assumed. Unrecognised columns (``afr cmd r``) are kept
under their sanitized name. Lines before the header row (the first row naming a time
column) are metadata and are kept in ``metadata``.

Time unit rule: a unit in the time column's name (``time (ms)``, ``timestamp_ms``) is
obeyed; otherwise the column is read as milliseconds when the median positive step of the
first 1000 rows is at least 1.0, else as seconds (a warning records the guess).
"""

from __future__ import annotations

import csv

from dynoai_daemon.logs.base import header_lines
from dynoai_daemon.logs.units import (
    TIME_ALIASES,
    map_columns,
    normalize_name,
    split_unit,
    time_scale,
)
from dynoai_daemon.logs.wide import WideCsvReader, WideLayout

HEADER_SEARCH_LINES = 50


def find_time_column(names: list[str]) -> int | None:
    """Index of the first column whose name (unit removed) is a time alias, or None."""
    for i, n in enumerate(names):
        base, _unit = split_unit(n)
        if normalize_name(base) in TIME_ALIASES or normalize_name(n) in TIME_ALIASES:
            return i
    return None


def time_column_scale(header: str) -> float | None:
    """Seconds per unit of a time column from its header, None when it does not say."""
    base, unit = split_unit(header)
    if unit:
        return time_scale(unit)
    norm = normalize_name(base)
    if norm.endswith("ms"):
        return 0.001
    if norm.endswith(("sec", "seconds")) or base.strip().lower().endswith("_s"):
        return 1.0
    return None


class WinPepReader(WideCsvReader):
    """Reader of WinPEP-style wide CSV (see module docstring).

    Attributes (besides the base's): metadata: the lines before the header row.
    """

    format = "winpep"

    def _layout(self) -> WideLayout:
        self.metadata: list[str] = []
        for lineno, offset, text in header_lines(self.path, HEADER_SEARCH_LINES):
            try:
                names = [n.strip() for n in next(csv.reader([text]))] if text.strip() else []
            except csv.Error as exc:
                raise self.error(f"unreadable line: {exc}", lineno) from exc
            ti = find_time_column(names) if len(names) >= 2 else None
            if ti is None:
                self.metadata.append(text)
                continue
            pairs = [split_unit(n) for n in names]
            plan = map_columns(pairs, self.stoich, skip=[ti])
            self.warnings.extend(plan.warnings)
            scale = time_column_scale(names[ti])
            if scale is None and split_unit(names[ti])[1]:
                raise self.error(f"time column {names[ti]!r}: unknown unit", lineno)
            return WideLayout(
                data_offset=offset,
                data_line=lineno + 1,
                delimiter=",",
                names=names,
                time_index=ti,
                time_scale=scale,
                outputs=plan.outputs,
            )
        raise self.error(
            f"no header row with a time column (timestamp/time) in the first "
            f"{HEADER_SEARCH_LINES} lines",
            1,
        )

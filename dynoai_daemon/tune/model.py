"""The common in-memory model of a tune file's tables, shared by every format module.

A :class:`TuneTables` holds the tables the tuner's loop reads and writes, by name
(``ve_front``, ``ve_rear``, ``spark_front``, ``spark_rear``, ``afr_target``, and for a
Power Vision file also the alpha-N ``ve_tps_front`` / ``ve_tps_rear``), each a
:class:`TuneTable` on its own axes (RPM ascending, load ascending, ``values[rpm][load]``)
with the resolution its file stores. A table the file holds once for both cylinders is
stored once and reached under both names through ``aliases``
(``{"ve_rear": "ve_front"}``), so it is written back once. The original document travels
with it: every cell remembers where its text lies in the file (:class:`Slot`), and a writer
replaces only the cells whose value changed, so a file written back with nothing to
correct is byte-identical and everything the project does not understand is untouched.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from dynoai_daemon.errors import InputError

FloatArray = npt.NDArray[np.float64]
LoadUnit = Literal["kPa", "%"]

#: Table names in display order.
TABLE_NAMES: tuple[str, ...] = (
    "ve_front",
    "ve_rear",
    "ve_tps_front",
    "ve_tps_rear",
    "spark_front",
    "spark_rear",
    "afr_target",
)
VE_NAMES: tuple[str, ...] = ("ve_front", "ve_rear", "ve_tps_front", "ve_tps_rear")
SPARK_NAMES: tuple[str, ...] = ("spark_front", "spark_rear")


class TuneFormatError(InputError):
    """A tune file cannot be read or written; prints as ``<what>, <file>``."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.where = path

    def __str__(self) -> str:
        return f"{self.args[0]}, {self.where}"


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one cell's number lies in the decoded document: ``text[start:end]``."""

    start: int
    end: int


def decimals_of(resolution: float) -> int:
    """Decimal places needed to write multiples of ``resolution`` exactly (max 6)."""
    for d in range(7):
        scaled = resolution * 10**d
        if abs(scaled - round(scaled)) < 1e-9:
            return d
    return 6


def round_to(values: FloatArray, resolution: float) -> FloatArray:
    """Round to the nearest multiple of ``resolution`` (then to its decimals, so that
    0.1 steps come out as 14.7, not 14.700000000000001)."""
    out: FloatArray = np.round(np.round(values / resolution) * resolution, decimals_of(resolution))
    return out


def infer_resolution(tokens: list[str]) -> float:
    """The coarsest of 1, 0.5, 0.25, 0.1, 0.05, 0.01, ... that every token is a multiple
    of (a file that stores no resolution, e.g. Power Vision: its values show it)."""
    vals = [float(t) for t in tokens]
    for res in (1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001):
        if all(abs(v / res - round(v / res)) < 1e-6 for v in vals):
            return res
    return 0.0001


@dataclass
class TuneTable:
    """One table on its own axes.

    Attributes:
        name: ``ve_front``, ``spark_rear``, ... (see :data:`TABLE_NAMES`).
        rpm_axis: RPM breakpoints, ascending (repeats allowed: Delphi tables pad unused
            breakpoints with the last value).
        load_axis: load breakpoints, ascending, in ``load_unit``.
        load_unit: ``"kPa"`` (MAP, speed density) or ``"%"`` (TPS, alpha-N).
        values: ``[rpm_index][load_index]``.
        resolution: the step the file stores (values are rounded to it).
        source: the name the file gives the table (``veTable``, ``VE (MAP based/Front
            Cyl)``, ``Page 1``, ...), for display.
        slots: where each cell's number lies in the document (``[rpm][load]``), when
            the table was read from one.
        tokens: the original text of each cell (``[rpm][load]``).
        original: the values as read (what "changed" compares against).
    """

    name: str
    rpm_axis: FloatArray
    load_axis: FloatArray
    load_unit: LoadUnit
    values: FloatArray
    resolution: float = 1.0
    source: str = ""
    slots: list[list[Slot]] | None = None
    tokens: list[list[str]] | None = None
    original: FloatArray | None = field(default=None, repr=False)
    #: a stored number k in the file means ``(k + store_offset) * store_scale`` (VEX)
    store_scale: float = 1.0
    store_offset: float = 0.0

    def __post_init__(self) -> None:
        self.rpm_axis = np.asarray(self.rpm_axis, dtype=np.float64)
        self.load_axis = np.asarray(self.load_axis, dtype=np.float64)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.original is None:
            self.original = self.values.copy()

    @property
    def shape(self) -> tuple[int, int]:
        """(rpm breakpoints, load breakpoints)."""
        return (int(self.rpm_axis.size), int(self.load_axis.size))

    @property
    def decimals(self) -> int:
        """Decimal places of the table's resolution."""
        return decimals_of(self.resolution)

    def changed(self) -> npt.NDArray[np.bool_]:
        """Cells whose (rounded) value differs from what the file held."""
        orig = self.original if self.original is not None else self.values
        new = round_to(self.values, self.resolution)
        return np.asarray(np.abs(new - orig) > self.resolution * 1e-6)

    def with_values(self, values: FloatArray) -> TuneTable:
        """A copy carrying new values (rounded to the resolution), same document slots."""
        return TuneTable(
            name=self.name,
            rpm_axis=self.rpm_axis.copy(),
            load_axis=self.load_axis.copy(),
            load_unit=self.load_unit,
            values=round_to(np.asarray(values, dtype=np.float64), self.resolution),
            resolution=self.resolution,
            source=self.source,
            slots=self.slots,
            tokens=self.tokens,
            original=self.original,
            store_scale=self.store_scale,
            store_offset=self.store_offset,
        )


@dataclass
class TuneTables:
    """The tables of one tune file plus its original document.

    Attributes:
        format: ``msq``, ``table``, ``vex``, ``pvv`` or ``csv``.
        tables: the real tables by name.
        aliases: names that are the same table in the file (``ve_rear -> ve_front``).
        text: the decoded original document (None for tables made in memory).
        encoding: how ``text`` encodes back to bytes.
        path: where it was read from (for messages).
        notes: what the reader decided (which constant is which table, ...).
    """

    format: str
    tables: dict[str, TuneTable]
    aliases: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    encoding: str = "utf-8"
    path: str = ""
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> TuneTable | None:
        """The table under ``name`` (following an alias), or None."""
        return self.tables.get(self.aliases.get(name, name))

    def names(self) -> list[str]:
        """Every table name present (aliases included), in display order."""
        have = set(self.tables) | set(self.aliases)
        return [n for n in TABLE_NAMES if n in have]

    def is_shared(self, name: str) -> bool:
        """True when ``name`` is one table the file holds for both cylinders."""
        return name in self.aliases or name in self.aliases.values()

    def replace(self, name: str, table: TuneTable) -> None:
        """Put a table back under its real name."""
        self.tables[self.aliases.get(name, name)] = table


def patch_text(tune: TuneTables, formatter: Callable[[TuneTable, float, str], str]) -> str:
    """The original document with the changed cells' text replaced.

    Args:
        tune: tables read from a document (``text`` and every table's ``slots`` set).
        formatter: ``(table, new value, original token) -> text`` in the file's style.
    """
    assert tune.text is not None
    edits: list[tuple[int, int, str]] = []
    for table in tune.tables.values():
        if table.slots is None or table.tokens is None:
            continue
        new = round_to(table.values, table.resolution)
        for i, j in zip(*np.nonzero(table.changed()), strict=True):
            slot = table.slots[int(i)][int(j)]
            token = table.tokens[int(i)][int(j)]
            edits.append((slot.start, slot.end, formatter(table, float(new[i, j]), token)))
    if not edits:
        return tune.text
    edits.sort()
    parts: list[str] = []
    pos = 0
    for start, end, repl in edits:
        parts.append(tune.text[pos:start])
        parts.append(repl)
        pos = end
    parts.append(tune.text[pos:])
    return "".join(parts)


def format_fixed(value: float, decimals: int, like: str = "") -> str:
    """``value`` with ``decimals`` places, at least as many as ``like`` shows."""
    shown = len(like.split(".", 1)[1]) if "." in like else 0
    d = max(decimals, shown)
    return f"{value:.{d}f}"


def format_minimal(value: float, decimals: int) -> str:
    """``value`` with at most ``decimals`` places and no trailing zeros (``80``, ``82.5``)."""
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def check_axis(values: list[float], what: str, path: str) -> None:
    """Raise unless ``values`` is non-empty, finite and non-decreasing."""
    if not values:
        raise TuneFormatError(f"{what}: empty axis", path)
    if any(not math.isfinite(v) for v in values):
        raise TuneFormatError(f"{what}: axis value is not a number", path)
    if any(b < a for a, b in itertools.pairwise(values)):
        raise TuneFormatError(f"{what}: axis is not in order", path)


def parse_number(token: str, what: str, path: str) -> float:
    """A float from a file's token, or a :class:`TuneFormatError` naming ``what``."""
    try:
        v = float(token)
    except ValueError:
        raise TuneFormatError(f"{what}: {token[:20]!r} is not a number", path) from None
    if not math.isfinite(v):
        raise TuneFormatError(f"{what}: {token[:20]!r} is not a finite number", path)
    return v


__all__ = [
    "SPARK_NAMES",
    "TABLE_NAMES",
    "VE_NAMES",
    "LoadUnit",
    "Slot",
    "TuneFormatError",
    "TuneTable",
    "TuneTables",
    "check_axis",
    "decimals_of",
    "format_fixed",
    "format_minimal",
    "infer_resolution",
    "parse_number",
    "patch_text",
    "round_to",
]

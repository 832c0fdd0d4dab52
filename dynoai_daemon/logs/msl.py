"""TunerStudio / MegaLogViewer ``.msl`` logs: tab-separated, title, names and units rows.

Layout: one or more title lines (often quoted: ``"MS3 Format 0566.05 ..."``,
``"Capture Date: ..."``), then the names row (the first row with a ``Time`` column), then
the units row (``s``, ``RPM``, ``kPa``, ``°F``, ``AFR``...), then tab-separated numbers.
``MARK 001 - ...`` lines that MegaLogViewer inserts between data rows are annotations:
counted in ``markers``, not data. A units row that is all numbers is taken as missing
(some exporters leave it out) and read as data.

Names are matched by the shared aliases (``RPM``, ``MAP``, ``TPS``, ``AFR``/``AFR1``,
``AFR2``, ``AFR Target 1``/``AFRTgt1``, ``MAT``, ``CLT``, ``Knock``, ``SPK Adv``/``Advance``,
``VE1``, ``VE2``, ``Batt V``, ``Lambda``...) and converted by the units row: ``°C`` to
degF, ``psi`` to kPa, lambda to AFR. A single advance column feeds both spark channels.
A column whose unit does not convert (``Knock`` in ``%``) is kept raw under its sanitized
name, with a warning.
"""

from __future__ import annotations

from dynoai_daemon.logs.base import capture_date, header_lines, parse_float
from dynoai_daemon.logs.units import map_columns, time_scale
from dynoai_daemon.logs.wide import WideCsvReader, WideLayout
from dynoai_daemon.logs.winpep import find_time_column

HEADER_SEARCH_LINES = 100
MARKER_PREFIX = "MARK"


def _fields(text: str) -> list[str]:
    return [f.strip().strip('"').strip() for f in text.split("\t")]


def _is_numeric_row(fields: list[str]) -> bool:
    try:
        vals = [parse_float(f) for f in fields]
    except ValueError:
        return False
    return any(v is not None for v in vals)


class MslReader(WideCsvReader):
    """Reader of MegaLogViewer ``.msl`` logs (see module docstring).

    Attributes (besides the base's): title: the lines before the names row.
    """

    format = "msl"

    def _layout(self) -> WideLayout:
        self.title: list[str] = []
        lines = header_lines(self.path, HEADER_SEARCH_LINES + 1)
        for lineno, offset, text in lines:
            names = _fields(text) if "\t" in text else []
            ti = find_time_column(names) if len(names) >= 2 else None
            if ti is None:
                self.title.append(text)
                continue
            names = [n or f"column_{i + 1}" for i, n in enumerate(names)]
            units = [""] * len(names)
            data_offset, data_line = offset, lineno + 1
            nxt = next(lines, None)
            if nxt is not None:
                u_lineno, u_offset, u_text = nxt
                u_fields = _fields(u_text)
                if u_text.strip() and not _is_numeric_row(u_fields):
                    if len(u_fields) > len(names):
                        raise self.error(
                            f"units row has {len(u_fields)} fields, names row {len(names)}",
                            u_lineno,
                        )
                    units = u_fields + [""] * (len(names) - len(u_fields))
                    data_offset, data_line = u_offset, u_lineno + 1
            scale = time_scale(units[ti]) if units[ti] else 1.0
            if scale is None:
                raise self.error(f"time column unit {units[ti]!r} is not a time unit", lineno + 1)
            plan = map_columns(list(zip(names, units, strict=True)), self.stoich, skip=[ti])
            self.warnings.extend(plan.warnings)
            self.source_units.update(plan.unit_of)
            self.capture_utc = capture_date(self.title)
            return WideLayout(
                data_offset=data_offset,
                data_line=data_line,
                delimiter="\t",
                names=names,
                time_index=ti,
                time_scale=scale,
                outputs=plan.outputs,
                marker_prefix=MARKER_PREFIX,
            )
        raise self.error(
            f"no tab-separated names row with a Time column in the first "
            f"{HEADER_SEARCH_LINES} lines",
            1,
        )

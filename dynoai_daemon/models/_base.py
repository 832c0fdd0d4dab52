"""Shared pieces of the schema: constrained value types, the common model config, errors.

A value without data is None, never 0; NaN given for an optional number becomes None
(``OptFloat`` and friends). :class:`_Model` rejects unknown keys, NaN and infinity, and
drops computed fields found in its own JSON so they are recomputed. Tables are
``[rpm_index][map_index]`` and must be rectangular. :func:`format_errors` renders a pydantic
error as ``field.path: message`` items for ``error: <what>, <where>`` lines.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)


def _nan_to_none(v: Any) -> Any:
    """NaN is the project's in-memory "absent" (channels.Frame); in the model it is None."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


_NanNone = BeforeValidator(_nan_to_none)

#: an optional float where NaN means "no data" and becomes None
OptFloat = Annotated[float | None, _NanNone]
Temperature = Annotated[float, Field(ge=-40.0, le=300.0)]
OptTemperature = Annotated[Temperature | None, _NanNone]
Afr = Annotated[Annotated[float, Field(ge=5.0, le=25.0)] | None, _NanNone]
_Pct = Annotated[float, Field(ge=-100.0, le=100.0)]
Percent = Annotated[_Pct | None, _NanNone]
NonNeg = Annotated[Annotated[float, Field(ge=0.0)] | None, _NanNone]


def _rectangular(name: str, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        raise ValueError(f"{name} must have at least one row")
    width = len(rows[0])
    if width == 0:
        raise ValueError(f"{name} rows must not be empty")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"{name} must be rectangular: row {i} has {len(row)} values, row 0 has {width}"
            )


def _shape(rows: Sequence[Sequence[Any]]) -> tuple[int, int]:
    return (len(rows), len(rows[0]) if rows else 0)


def _check_table(rows: list[list[float]]) -> list[list[float]]:
    _rectangular("table", rows)
    return rows


def _check_nested(rows: list[list[Any]]) -> list[list[Any]]:
    _rectangular("grid", rows)
    return rows


#: an ECU VE table, rows = RPM breakpoints, columns = MAP breakpoints, values 0..200 %
VETable = Annotated[
    list[list[Annotated[float, Field(ge=0.0, le=200.0)]]], AfterValidator(_check_table)
]
#: an ECU spark advance table in degrees BTDC (negative = ATDC)
SparkTable = Annotated[
    list[list[Annotated[float, Field(ge=-20.0, le=80.0)]]], AfterValidator(_check_table)
]
#: a per-cell overlay (corrections in %), None where a cell has no value
Overlay = Annotated[
    list[list[Percent]],
    AfterValidator(_check_nested),
]

RpmIdx = Annotated[int, Field(ge=0, le=255)]
KpaIdx = Annotated[int, Field(ge=0, le=255)]


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normalise_utc(v: Any) -> Any:
    """Accept an ISO-8601 string or datetime; return ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``.

    A naive time is taken as UTC (the seed writes UTC without always saying so).
    """
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v.strip())
        except ValueError as exc:
            raise ValueError(f"not an ISO-8601 time: {v!r}") from exc
    if isinstance(v, datetime):
        dt = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
        spec = "microseconds" if dt.microsecond else "seconds"
        return dt.replace(tzinfo=None).isoformat(timespec=spec) + "Z"
    return v


UtcTime = Annotated[str, BeforeValidator(_normalise_utc)]


class _Model(BaseModel):
    """Common config: unknown keys rejected, no NaN/inf, assignments validated."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        validate_assignment=True,
        use_enum_values=False,
        populate_by_name=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: Any) -> Any:
        # Our own JSON carries computed fields; they are recomputed, not inputs.
        if isinstance(data, dict) and cls.model_computed_fields:
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data


def _increasing(name: str, axis: Sequence[float]) -> None:
    if len(axis) < 1:
        raise ValueError(f"{name} must not be empty")
    if any(b <= a for a, b in itertools.pairwise(axis)):
        raise ValueError(f"{name} must be strictly increasing")


def format_errors(err: ValidationError) -> str:
    """Render a pydantic error as ``field.path: message`` items joined by ``; ``."""
    parts = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else ("." if loc else "") + str(part)
        parts.append(f"{loc or '(root)'}: {e['msg']}")
    return "; ".join(parts)

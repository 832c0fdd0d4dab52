"""Column names and units of foreign logs mapped onto canonical channels and units.

Every foreign reader (WinPEP, MegaLogViewer, Power Vision) names its columns its own way
and in its own units. This module holds the one alias table they share, the unit
conversions to the canonical units of :data:`~dynoai_daemon.channels.CHANNEL_UNITS`, and
:func:`map_columns`, which turns a list of (name, unit) pairs into a per-column plan of
output channels with a linear conversion ``value * scale + offset``. A column that matches
no alias, or whose unit cannot be converted, is kept under a sanitized name with its
values untouched, so nothing read from a log is thrown away.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from dynoai_daemon.channels import CANONICAL_CHANNELS, TIME_COLUMN

FT_LB_PER_NM: Final = 0.7375621492772654
HP_PER_KW: Final = 1.3410220895950278
HP_PER_PS: Final = 0.9863200706


def normalize_name(name: str) -> str:
    """Lower-case ``name`` and drop everything but letters, digits and ``+``.

    ``"AFR Cmd F"``, ``"afr_cmd_f"`` and ``"AFRcmdF"`` all become ``"afrcmdf"``; ``"B+"``
    keeps its plus so that it does not collapse to ``"b"``.
    """
    return re.sub(r"[^a-z0-9+]", "", name.lower())


def sanitize_name(name: str) -> str:
    """Return a channel name for an unmapped column: lower case, ``[a-z0-9_]`` only.

    ``"Gear Pos."`` becomes ``"gear_pos"``, ``"B+"`` becomes ``"b_plus"``; an empty result
    becomes ``"column"``.
    """
    s = name.strip().lower().replace("+", "_plus").replace("%", "_pct")
    s = re.sub(r"[^a-z0-9]+", "_", s).strip("_")
    return s or "column"


def split_unit(header: str) -> tuple[str, str]:
    """Split ``"Torque (ft-lb)"`` or ``"MAP [kPa]"`` into name and unit; else unit ``""``."""
    m = re.fullmatch(r"\s*(.*?)\s*[\(\[]\s*([^\)\]]*?)\s*[\)\]]\s*", header)
    if m and m.group(1):
        return m.group(1), m.group(2)
    return header.strip(), ""


def _unit_key(unit: str) -> str:
    u = unit.strip().lower().replace("°", "").replace("º", "").replace("·", "")
    return re.sub(r"[^a-z0-9%/λ]", "", u)


# Unit spelling (after _unit_key) -> (scale, offset) to the canonical unit, per quantity.
_TEMPERATURE: Final[dict[str, tuple[float, float]]] = {
    "": (1.0, 0.0),  # canonical degF assumed when a log gives no unit
    "f": (1.0, 0.0),
    "degf": (1.0, 0.0),
    "degreesf": (1.0, 0.0),
    "fahrenheit": (1.0, 0.0),
    "c": (1.8, 32.0),
    "degc": (1.8, 32.0),
    "degreesc": (1.8, 32.0),
    "celsius": (1.8, 32.0),
    "k": (1.8, 32.0 - 273.15 * 1.8),
    "kelvin": (1.8, 32.0 - 273.15 * 1.8),
}
_PRESSURE: Final[dict[str, tuple[float, float]]] = {
    "": (1.0, 0.0),
    "kpa": (1.0, 0.0),
    "psi": (6.894757293168361, 0.0),
    "psia": (6.894757293168361, 0.0),
    "inhg": (3.386388666666667, 0.0),
    "bar": (100.0, 0.0),
    "mbar": (0.1, 0.0),
    "hpa": (0.1, 0.0),
}
_IDENTITY: Final = (1.0, 0.0)
_SIMPLE: Final[dict[str, frozenset[str]]] = {
    "rpm": frozenset({"", "rpm", "1/min", "r/min", "revmin"}),
    "pct": frozenset({"", "%", "pct", "percent"}),
    "deg": frozenset({"", "deg", "degrees", "degbtdc", "btdc", "crankdeg"}),
    "volt": frozenset({"", "v", "volt", "volts"}),
}
_TORQUE: Final[dict[str, tuple[float, float]]] = {
    **dict.fromkeys(("", "ftlb", "lbft", "ftlbs", "lbsft", "ftlbf", "lbfft"), _IDENTITY),
    "nm": (FT_LB_PER_NM, 0.0),
}
_POWER: Final[dict[str, tuple[float, float]]] = {
    "": _IDENTITY,
    "hp": _IDENTITY,
    "bhp": _IDENTITY,
    "whp": _IDENTITY,
    "kw": (HP_PER_KW, 0.0),
    "ps": (HP_PER_PS, 0.0),
    "cv": (HP_PER_PS, 0.0),
}
_TIME: Final[dict[str, tuple[float, float]]] = {
    "s": _IDENTITY,
    "sec": _IDENTITY,
    "secs": _IDENTITY,
    "seconds": _IDENTITY,
    "ms": (0.001, 0.0),
    "msec": (0.001, 0.0),
    "milliseconds": (0.001, 0.0),
}
_LAMBDA_UNITS: Final = frozenset({"lambda", "λ", "lam"})
_AFR_UNITS: Final = frozenset({"afr", "a/f", "ratio", ":1", "1", "o2"})

_QUANTITY: Final[dict[str, str]] = {
    "rpm": "rpm",
    "map_kpa": "pressure",
    "baro_kpa": "pressure",
    "tps_pct": "pct",
    "ve_front": "pct",
    "ve_rear": "pct",
    "afr_front": "afr",
    "afr_rear": "afr",
    "afr_target": "afr",
    "knock_front_deg": "deg",
    "knock_rear_deg": "deg",
    "spark_front_deg": "deg",
    "spark_rear_deg": "deg",
    "iat_f": "temperature",
    "ect_f": "temperature",
    "torque_ftlb": "torque",
    "power_hp": "power",
    "vbatt_v": "volt",
}


def time_scale(unit: str) -> float | None:
    """Seconds per unit of a time column's ``unit`` (``"ms"`` -> 0.001), None if unknown."""
    conv = _TIME.get(_unit_key(unit))
    return None if conv is None else conv[0]


def conversion(
    channel: str, unit: str, stoich: float, *, lambda_default: bool = False
) -> tuple[float, float] | None:
    """Return ``(scale, offset)`` taking ``unit`` to ``channel``'s canonical unit.

    Args:
        channel: a canonical channel name.
        unit: the unit as the log spells it (``"°C"``, ``"kPa"``, ``"Lambda"``...); empty
            means the canonical unit, except for AFR channels when ``lambda_default``.
        stoich: stoichiometric AFR used to turn lambda into AFR.
        lambda_default: the column's name says lambda (``"Set Lambda"``), so an empty
            unit means lambda.

    Returns:
        The linear conversion, or None when the unit is not one this channel can take.
    """
    key = _unit_key(unit)
    quantity = _QUANTITY.get(channel)
    if quantity is None:
        return None
    if quantity == "afr":
        if key in _LAMBDA_UNITS or (key == "" and lambda_default):
            return (stoich, 0.0)
        return _IDENTITY if key in _AFR_UNITS or key == "" else None
    if quantity == "temperature":
        return _TEMPERATURE.get(key)
    if quantity == "pressure":
        return _PRESSURE.get(key)
    if quantity == "torque":
        return _TORQUE.get(key)
    if quantity == "power":
        return _POWER.get(key)
    return _IDENTITY if key in _SIMPLE[quantity] else None


@dataclass(frozen=True, slots=True)
class Alias:
    """Where a normalized column name goes: one or more channels, and lambda-by-name."""

    channels: tuple[str, ...]
    lambda_default: bool = False


def _alias_table() -> dict[str, Alias]:
    table: dict[str, Alias] = {normalize_name(c): Alias((c,)) for c in CANONICAL_CHANNELS}
    groups: dict[str, tuple[str, ...]] = {
        "rpm": ("rpm", "enginerpm", "enginespeed", "engspeed", "rpm1"),
        "map_kpa": ("map", "mapkpa", "manifoldpressure", "manifoldabsolutepressure"),
        "tps_pct": ("tps", "tp", "throttle", "throttleposition", "tpspct"),
        "afr_front": (
            "afr",
            "afr1",
            "afrf",
            "afrfront",
            "measuredafrf",
            "measuredafrfront",
            "wbo2f",
            "wbo2front",
            "wbo2",
            "afrfrt",
        ),
        "afr_rear": ("afr2", "afrr", "afrrear", "measuredafrr", "measuredafrrear", "wbo2r"),
        "afr_target": (
            "afrtarget",
            "afrtarget1",
            "afrtgt",
            "afrtgt1",
            "targetafr",
            "afrcmd",
            "afrcmdf",
            "afrcommandf",
            "afrcommand",
        ),
        "knock_front_deg": (
            "knock",
            "knockf",
            "knockfront",
            "knock1",
            "knockretard",
            "knockretard1",
            "knockret",
            "sparkknockf",
            "knockretardf",
        ),
        "knock_rear_deg": ("knockr", "knockrear", "knock2", "knockretard2", "sparkknockr"),
        "spark_front_deg": ("timingf", "sparkf", "advancef", "sparkadvancef", "spkadvf"),
        "spark_rear_deg": ("timingr", "sparkr", "advancer", "sparkadvancer", "spkadvr"),
        "iat_f": ("iat", "mat", "intakeairtemp", "intakeairtemperature", "iatf", "matf"),
        "ect_f": ("ect", "et", "clt", "coolant", "enginetemp", "enginetemperature", "cltf"),
        "ve_front": ("ve", "ve1", "vef", "vefront", "vefrt"),
        "ve_rear": ("ve2", "ver", "verear"),
        "torque_ftlb": ("torque", "tq", "enginetorque"),
        "power_hp": ("power", "hp", "horsepower"),
        "baro_kpa": ("baro", "barometer", "baropressure"),
        "vbatt_v": ("battery", "batt", "battv", "batteryv", "batteryvoltage", "vbatt", "b+"),
    }
    for channel, names in groups.items():
        for n in names:
            table[n] = Alias((channel,))
    for n in ("lambda", "lambda1", "lambdaf", "lambdafront"):
        table[n] = Alias(("afr_front",), lambda_default=True)
    for n in ("lambda2", "lambdar", "lambdarear"):
        table[n] = Alias(("afr_rear",), lambda_default=True)
    for n in ("setlambda", "lambdatarget", "lambdatarget1", "targetlambda", "lambdatgt"):
        table[n] = Alias(("afr_target",), lambda_default=True)
    # One ignition advance for the whole engine applies to both cylinders.
    for n in (
        "advance", "spkadv", "sparkadvance", "timing", "ignitionadvance", "ignadv", "sparkadv",
    ):  # fmt: skip
        table[n] = Alias(("spark_front_deg", "spark_rear_deg"))
    return table


ALIASES: Final[dict[str, Alias]] = _alias_table()
TIME_ALIASES: Final = frozenset(
    {"time", "times", "timestamp", "timesec", "timeseconds", "timems", "timestampms"}
)


@dataclass(frozen=True, slots=True)
class Output:
    """One output channel of a source column: ``value * scale + offset``."""

    channel: str
    scale: float = 1.0
    offset: float = 0.0


@dataclass
class ColumnPlan:
    """Per source column, the channels it feeds; plus warnings about kept-raw columns."""

    outputs: list[list[Output]]
    source_of: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: output channel -> the unit text of its source column (as the log spells it)
    unit_of: dict[str, str] = field(default_factory=dict)


def map_columns(
    columns: Sequence[tuple[str, str]], stoich: float, *, skip: Sequence[int] = ()
) -> ColumnPlan:
    """Decide the output channels of a foreign log's columns.

    A column whose normalized name is an alias and whose unit converts feeds that
    canonical channel; the first such column wins a channel, and single-channel aliases
    are placed before multi-channel ones (``Advance`` fills both spark channels only when
    no per-cylinder column exists). Every other column is kept, unconverted, under its
    sanitized name (made unique, never a canonical name).

    Args:
        columns: (name, unit) per source column, in file order.
        stoich: stoichiometric AFR for lambda columns.
        skip: column indexes not to map (the time column).

    Returns:
        The plan; ``source_of`` maps each output channel to the source column name.
    """
    outputs: list[list[Output]] = [[] for _ in columns]
    taken: set[str] = {TIME_COLUMN}
    plan = ColumnPlan(outputs)
    skipped = set(skip)
    for multi in (False, True):
        for i, (name, unit) in enumerate(columns):
            if i in skipped:
                continue
            alias = ALIASES.get(normalize_name(name))
            if alias is None or (len(alias.channels) > 1) != multi:
                continue
            for ch in alias.channels:
                if ch in taken:
                    continue
                conv = conversion(ch, unit, stoich, lambda_default=alias.lambda_default)
                if conv is None:
                    plan.warnings.append(
                        f"column {name!r}: unit {unit!r} is not convertible to {ch}; kept raw"
                    )
                    break
                outputs[i].append(Output(ch, conv[0], conv[1]))
                plan.source_of[ch] = name
                plan.unit_of[ch] = unit
                taken.add(ch)
    pending = [i for i in range(len(columns)) if i not in skipped and not outputs[i]]
    for i in pending:
        base = sanitize_name(columns[i][0])
        out = base
        n = 2
        while out in taken or out in CANONICAL_CHANNELS:
            out = f"{base}_{n}"
            n += 1
        taken.add(out)
        outputs[i].append(Output(out))
        plan.source_of[out] = columns[i][0]
    return plan

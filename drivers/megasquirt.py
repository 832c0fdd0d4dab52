"""MegaSquirt MS2/MS3 real-time CAN broadcast: shipped DBC, channel map, encoders and driver.

The broadcast (11-bit ids, base 0x5F0 = 1520 + group, big-endian) is described by
``drivers/dbc/megasquirt.dbc`` and decoded with :class:`~drivers.dbc_driver.DbcCodec`
(compiled struct decoders, checked against cantools by the tests). docs/contract.md's default map
turns ECU signals into canonical channels: rpm, map -> ``map_kpa``, tps -> ``tps_pct``, mat
-> ``iat_f``, clt -> ``ect_f`` (MS sends degF x10), afr1/afr2 -> ``afr_front``/``afr_rear``,
afrtgt1 -> ``afr_target``, knock retard (group 52) -> ``knock_front_deg`` (option
``knock_cylinder``: front, rear or both), ve1/ve2 -> ``ve_front``/``ve_rear``; we add baro
-> ``baro_kpa``, batt -> ``vbatt_v`` and advance -> ``spark_front_deg`` and
``spark_rear_deg`` (one advance for both cylinders). Other signals are dropped unless
``passthrough`` is set, which emits them as ``<source>_<signal>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Final

from cantools.database.can import Database

from drivers.can_base import CanDriver, CanFrame, parse_int
from drivers.dbc_driver import DbcCodec, Route, build_routes, load_packaged_dbc
from dynoai_daemon.errors import ConfigError

DBC_NAME: Final = "megasquirt.dbc"
DEFAULT_BASE_ID: Final = 0x5F0
GROUPS: Final[tuple[int, ...]] = (0, 1, 2, 3, 4, 6, 7, 31, 48, 52)
KNOCK_CYLINDERS: Final = ("front", "rear", "both")

DEFAULT_MAP: Final[dict[str, tuple[str, ...]]] = {
    "rpm": ("rpm",),
    "map": ("map_kpa",),
    "tps": ("tps_pct",),
    "mat": ("iat_f",),
    "clt": ("ect_f",),
    "afr1": ("afr_front",),
    "afr2": ("afr_rear",),
    "afrtgt1": ("afr_target",),
    "ve1": ("ve_front",),
    "ve2": ("ve_rear",),
    "baro": ("baro_kpa",),
    "batt": ("vbatt_v",),
    "advance": ("spark_front_deg", "spark_rear_deg"),
}


@lru_cache(maxsize=1)
def database() -> Database:
    """Return the shipped MegaSquirt DBC (loaded once; treat as read-only)."""
    return load_packaged_dbc(DBC_NAME)


def default_routes(knock_cylinder: str = "front") -> dict[str, list[Route]]:
    """Return docs/contract.md's default routes with knock retard on the chosen cylinder(s).

    Raises:
        ConfigError: ``knock_cylinder`` is not front, rear or both.
    """
    if knock_cylinder not in KNOCK_CYLINDERS:
        raise ConfigError(
            f"megasquirt: knock_cylinder must be one of {KNOCK_CYLINDERS}", field="knock_cylinder"
        )
    routes = {sig: [(ch, 1.0, 0.0) for ch in chans] for sig, chans in DEFAULT_MAP.items()}
    knock = {"front": ["knock_front_deg"], "rear": ["knock_rear_deg"]}.get(
        knock_cylinder, ["knock_front_deg", "knock_rear_deg"]
    )
    routes["knock_retard"] = [(ch, 1.0, 0.0) for ch in knock]
    return routes


def make_codec(
    *,
    base_id: int = DEFAULT_BASE_ID,
    knock_cylinder: str = "front",
    channel_map: Mapping[str, str | Sequence[str]] | None = None,
    passthrough_prefix: str | None = None,
    fast: bool = True,
) -> DbcCodec:
    """Build the MegaSquirt codec.

    Args:
        base_id: id of group 0 (the DBC's ids are shifted by ``base_id - 0x5F0``).
        knock_cylinder: which knock channel(s) the group-52 knock retard feeds.
        channel_map: signal -> channel overrides ("" drops a signal).
        passthrough_prefix: emit unmapped signals as ``<prefix>_<signal>``.
        fast: use the compiled struct decoders.

    Raises:
        ConfigError: bad base id, knock option or unknown signal.
    """
    db = database()
    routes = build_routes(db, default_routes(knock_cylinder), channel_map)
    return DbcCodec(
        db,
        routes,
        id_offset=base_id - DEFAULT_BASE_ID,
        extended=False,
        passthrough_prefix=passthrough_prefix,
        fast=fast,
    )


def group_message_name(group: int) -> str:
    """Return the DBC message name of broadcast group ``group``.

    Raises:
        ValueError: a group the DBC does not describe.
    """
    if group not in GROUPS:
        raise ValueError(f"megasquirt: group {group} is not in the DBC ({GROUPS})")
    return f"MS_Group{group}"


def encode_group(
    group: int, values: Mapping[str, float], base_id: int = DEFAULT_BASE_ID
) -> CanFrame:
    """Encode one broadcast group from physical signal values (others sent as 0).

    Raises:
        ValueError: unknown group or signal, or a value out of the DBC range.
    """
    name = group_message_name(group)
    arb, data, ext = _encoder().encode(name, values)
    return arb - DEFAULT_BASE_ID + base_id, data, ext


def encode_signals(values: Mapping[str, float], base_id: int = DEFAULT_BASE_ID) -> list[CanFrame]:
    """Encode every group that carries at least one of ``values`` (by DBC signal name).

    Raises:
        ValueError: a signal the DBC does not have, or a value out of range.
    """
    db = database()
    by_group: dict[int, dict[str, float]] = {}
    placed: set[str] = set()
    for g in GROUPS:
        msg = db.get_message_by_name(group_message_name(g))
        names = {s.name for s in msg.signals}
        chosen = {k: v for k, v in values.items() if k in names}
        if chosen:
            by_group[g] = chosen
            placed.update(chosen)
    missing = set(values) - placed
    if missing:
        raise ValueError(f"megasquirt: unknown signals {sorted(missing)}")
    return [encode_group(g, v, base_id) for g, v in by_group.items()]


@lru_cache(maxsize=1)
def _encoder() -> DbcCodec:
    return DbcCodec(database(), {}, extended=False)


class MegasquirtDriver(CanDriver):
    """MegaSquirt MS2/MS3 broadcast over CAN.

    Args:
        base_id: id of group 0 (``"0x5F0"`` or 1520 by default).
        knock_cylinder: ``front`` (default), ``rear`` or ``both`` for the knock retard.
        passthrough: emit unmapped signals as ``<source>_<signal>`` (default: drop them).
        fast: use the compiled struct decoders (False: cantools for every frame).
        **kwargs: :class:`~drivers.can_base.CanDriver` options; ``channel_map`` maps DBC
            signal names to channels.

    Raises:
        ConfigError: a bad option.
    """

    name = "megasquirt"

    def __init__(
        self,
        *,
        base_id: int | str = DEFAULT_BASE_ID,
        knock_cylinder: str = "front",
        passthrough: bool = False,
        fast: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.base_id = parse_int(base_id, what="base_id")
        if not 0 <= self.base_id <= 0x7FF - max(GROUPS):
            raise ConfigError(
                f"megasquirt: base_id {self.base_id:#x} leaves the 11-bit range", field="base_id"
            )
        self.codec = make_codec(
            base_id=self.base_id,
            knock_cylinder=knock_cylinder,
            channel_map=self.channel_map,
            passthrough_prefix=self.source if passthrough else None,
            fast=fast,
        )

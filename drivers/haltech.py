"""Speeduino / Haltech IC-7 style broadcast (frame 0x360): shipped DBC, encoder and driver.

Frame 0x360 (11-bit, big-endian): rpm u16, MAP kPa x10, TPS % x10, described by
``drivers/dbc/haltech.dbc`` and decoded with :class:`~drivers.dbc_driver.DbcCodec`.
Default map: rpm -> ``rpm``, map -> ``map_kpa``, tps -> ``tps_pct``. 0x360 is a busy id:
OEM ECUs (Subaru, Ford) send their own frames on it, which decode here as rpm 65,283 and
TPS 1,261 %; such values never reach the core (the base driver's plausibility screen drops
and counts them as ``implausible_<channel>``, and ``dynoai decode`` warns).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final

from cantools.database.can import Database

from drivers.can_base import CanDriver, CanFrame
from drivers.dbc_driver import DbcCodec, Route, build_routes, load_packaged_dbc

DBC_NAME: Final = "haltech.dbc"
FRAME_ID: Final = 0x360
MESSAGE: Final = "Haltech_0x360"
DEFAULT_ROUTES: Final[dict[str, list[Route]]] = {
    "rpm": [("rpm", 1.0, 0.0)],
    "map": [("map_kpa", 1.0, 0.0)],
    "tps": [("tps_pct", 1.0, 0.0)],
}


@lru_cache(maxsize=1)
def database() -> Database:
    """Return the shipped Haltech DBC (loaded once; treat as read-only)."""
    return load_packaged_dbc(DBC_NAME)


def make_codec(channel_map: dict[str, str] | None = None, *, fast: bool = True) -> DbcCodec:
    """Build the 0x360 codec with optional ``signal -> channel`` overrides.

    Raises:
        ConfigError: an override names an unknown signal.
    """
    routes = build_routes(database(), DEFAULT_ROUTES, channel_map)
    return DbcCodec(database(), routes, extended=False, fast=fast)


def encode(rpm: float, map_kpa: float, tps_pct: float) -> CanFrame:
    """Encode a 0x360 frame.

    Raises:
        ValueError: a value outside the frame's range.
    """
    return _encoder().encode(MESSAGE, {"rpm": rpm, "map": map_kpa, "tps": tps_pct})


@lru_cache(maxsize=1)
def _encoder() -> DbcCodec:
    return DbcCodec(database(), {}, extended=False)


class HaltechDriver(CanDriver):
    """Haltech / Speeduino 0x360 broadcast over CAN.

    Args:
        fast: use the compiled struct decoder.
        **kwargs: :class:`~drivers.can_base.CanDriver` options; ``channel_map`` maps
            ``rpm``/``map``/``tps`` to other channels.
    """

    name = "haltech"

    def __init__(self, *, fast: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.codec = make_codec(self.channel_map, fast=fast)

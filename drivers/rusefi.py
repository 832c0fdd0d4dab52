"""rusEFI / FOME verbose CAN broadcast: shipped DBC, unit conversions, encoders and driver.

The broadcast (base 0x200, little-endian) is described by ``drivers/dbc/rusefi.dbc``: +1 rpm
u16 and timing s16 x0.02, +2 TPS1 s16 x0.01 %, +3 MAP u16 / 30 kPa and CLT / IAT u8 - 40
degC, +4 battery volts x0.001, +5 knock count u16, +7 lambda 1/2 u16 x0.0001. Default map:
rpm, timing -> ``spark_front_deg``, tps1 -> ``tps_pct``, map -> ``map_kpa``, clt -> ``ect_f``
and iat -> ``iat_f`` (degC converted to degF), lambda1/lambda2 -> ``afr_front``/``afr_rear``
(x stoich), vbatt -> ``vbatt_v``, knock_count -> ``knock_count``. A lambda of 0 is rusEFI's
"no sensor": the AFR is then withheld and ``<afr>_status`` says INVALID; a real lambda comes
with ``<afr>_status`` NORMAL. Other signals are dropped unless ``passthrough`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Final

from cantools.database.can import Database

from drivers.can_base import ByteLike, CanDriver, CanFilter, CanFrame, Decoded, parse_int
from drivers.dbc_driver import DbcCodec, Route, build_routes, load_packaged_dbc
from dynoai_daemon.channels import STOICH_GASOLINE, SensorStatus, status_channel
from dynoai_daemon.errors import ConfigError

DBC_NAME: Final = "rusefi.dbc"
DEFAULT_BASE_ID: Final = 0x200
OFFSETS: Final[dict[int, str]] = {
    1: "RUSEFI_BASE1",
    2: "RUSEFI_BASE2",
    3: "RUSEFI_BASE3",
    4: "RUSEFI_BASE4",
    5: "RUSEFI_BASE5",
    7: "RUSEFI_BASE7",
}
LAMBDA_SIGNALS: Final = ("lambda1", "lambda2")

C_TO_F: Final = (1.8, 32.0)


@lru_cache(maxsize=1)
def database() -> Database:
    """Return the shipped rusEFI DBC (loaded once; treat as read-only)."""
    return load_packaged_dbc(DBC_NAME)


def default_routes(stoich: float = STOICH_GASOLINE) -> dict[str, list[Route]]:
    """Return the default signal routes with their unit conversions."""
    return {
        "rpm": [("rpm", 1.0, 0.0)],
        "timing": [("spark_front_deg", 1.0, 0.0)],
        "tps1": [("tps_pct", 1.0, 0.0)],
        "map": [("map_kpa", 1.0, 0.0)],
        "clt": [("ect_f", *C_TO_F)],
        "iat": [("iat_f", *C_TO_F)],
        "vbatt": [("vbatt_v", 1.0, 0.0)],
        "knock_count": [("knock_count", 1.0, 0.0)],
        "lambda1": [("afr_front", stoich, 0.0)],
        "lambda2": [("afr_rear", stoich, 0.0)],
    }


class RusefiCodec:
    """The rusEFI broadcast codec: a :class:`DbcCodec` plus lambda validity.

    Args:
        base_id: id of base+0.
        extended: 29-bit ids (rusEFI's ``rusefiVerbose29b``).
        stoich: AFR per lambda.
        channel_map: signal -> channel overrides ("" drops a signal).
        passthrough_prefix: emit unmapped signals as ``<prefix>_<signal>``.
        fast: use compiled struct decoders.

    Raises:
        ConfigError: bad stoich, base id or unknown signal.
    """

    def __init__(
        self,
        *,
        base_id: int = DEFAULT_BASE_ID,
        extended: bool = False,
        stoich: float = STOICH_GASOLINE,
        channel_map: Mapping[str, str | Sequence[str]] | None = None,
        passthrough_prefix: str | None = None,
        fast: bool = True,
    ) -> None:
        if not stoich > 0:
            raise ConfigError("rusefi: stoich must be positive", field="stoich")
        routes = build_routes(database(), default_routes(stoich), channel_map)
        self.inner = DbcCodec(
            database(),
            routes,
            id_offset=base_id - DEFAULT_BASE_ID,
            extended=extended,
            passthrough_prefix=passthrough_prefix,
            fast=fast,
        )
        self.counters = self.inner.counters
        self.counters.setdefault("lambda_invalid", 0)
        self._lambda_id = base_id + 7
        self._extended = extended
        self._afr_channels = {ch for sig in LAMBDA_SIGNALS for ch, _, _ in routes.get(sig, ())}

    def decode(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Decoded | None:
        """Decode a frame; None when not a rusEFI broadcast frame.

        Raises:
            ProtocolError: wrong DLC.
        """
        out = self.inner.decode(arbitration_id, data, is_extended)
        if out is None or arbitration_id != self._lambda_id or not self._afr_channels:
            return out
        fixed: Decoded = []
        for ch, v in out:
            if ch in self._afr_channels:
                ok = v > 0.0
                if ok:
                    fixed.append((ch, v))
                else:
                    self.counters["lambda_invalid"] += 1
                status = SensorStatus.NORMAL if ok else SensorStatus.INVALID
                fixed.append((status_channel(ch), float(status)))
            else:
                fixed.append((ch, v))
        return fixed

    def can_filters(self) -> list[CanFilter] | None:
        """Return acceptance filters of the routed broadcast frames (base + 1..7)."""
        return self.inner.can_filters()


@lru_cache(maxsize=1)
def _encoder() -> DbcCodec:
    return DbcCodec(database(), {}, extended=False)


def encode(
    offset: int, values: Mapping[str, float], base_id: int = DEFAULT_BASE_ID, extended: bool = False
) -> CanFrame:
    """Encode the broadcast frame at ``base_id + offset`` from physical signal values.

    Raises:
        ValueError: unknown offset or signal, or a value out of range.
    """
    if offset not in OFFSETS:
        raise ValueError(f"rusefi: offset +{offset} is not in the DBC ({sorted(OFFSETS)})")
    arb, data, _ = _encoder().encode(OFFSETS[offset], values)
    return arb - DEFAULT_BASE_ID + base_id, data, extended


class RusefiDriver(CanDriver):
    """rusEFI verbose broadcast over CAN.

    Args:
        base_id: id of base+0 (0x200 by default).
        extended: the ECU sends 29-bit ids.
        stoich: AFR per lambda for the lambda channels.
        passthrough: emit unmapped signals as ``<source>_<signal>`` (default: drop them).
        fast: use the compiled struct decoders.
        **kwargs: :class:`~drivers.can_base.CanDriver` options; ``channel_map`` maps DBC
            signal names to channels.

    Raises:
        ConfigError: a bad option.
    """

    name = "rusefi"

    def __init__(
        self,
        *,
        base_id: int | str = DEFAULT_BASE_ID,
        extended: bool = False,
        stoich: float = STOICH_GASOLINE,
        passthrough: bool = False,
        fast: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.base_id = parse_int(base_id, what="base_id")
        limit = 0x1FFFFFFF if extended else 0x7FF
        if not 0 <= self.base_id <= limit - max(OFFSETS):
            raise ConfigError(f"rusefi: base_id {self.base_id:#x} out of range", field="base_id")
        self.codec = RusefiCodec(
            base_id=self.base_id,
            extended=bool(extended),
            stoich=float(stoich),
            channel_map=self.channel_map,
            passthrough_prefix=self.source if passthrough else None,
            fast=fast,
        )

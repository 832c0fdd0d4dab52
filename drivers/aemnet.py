"""AEM X-Series / 30-0300 wideband over AEMnet CAN: pure codec, encoders and driver.

Frame (29-bit id 0x180 + n, n = 0..15, DLC 8, big-endian, 100 Hz): bytes 0-1 lambda u16
x0.0001, 2-3 O2 % s16 x0.001, 4 supply volts x0.1, 5 reserved, 6 flags (bit 1 LSU 4.9
detected, bit 5 free-air calibration in use, bit 7 lambda valid), 7 faults (bit 6 sensor
fault). The codec emits ``<afr channel>_status`` for every frame (NORMAL, INVALID when the
valid bit is clear or the lambda word is 0 or 0xFFFF, which real X-series gauges send in
free air with the valid bit set, FAULT when the fault bit is set) and the AFR (lambda x
stoich) only when the status is NORMAL, so that the core never learns from a cold or
failed sensor.
Default map (docs/contract.md): 0x180 -> ``afr_front``, 0x181 -> ``afr_rear``. Optionally the
AEM 30-2340 four-channel frame (29-bit id 0x1F, lambda 1-4 u16 x0.0001 big-endian) is
decoded, lambda1 -> ``afr_front`` and lambda2 -> ``afr_rear`` by default; it has no status
byte, so a lambda of 0 or 0xFFFF (no reading) is reported INVALID (our reading).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

from drivers.can_base import (
    ByteLike,
    CanDriver,
    CanFilter,
    CanFrame,
    Decoded,
    frame_filters,
    parse_int,
)
from dynoai_daemon.channels import STOICH_GASOLINE, SensorStatus
from dynoai_daemon.errors import ConfigError, ProtocolError

BASE_ID: Final = 0x180
MAX_CONTROLLERS: Final = 16
FOUR_CHANNEL_ID: Final = 0x1F
DLC: Final = 8

FLAG_LSU49: Final = 0x02
FLAG_FREE_AIR_CAL: Final = 0x20
FLAG_VALID: Final = 0x80
FAULT_SENSOR: Final = 0x40
#: Raw lambda words that are not a reading on any AEM path: 0 and 0xFFFF (free air).
NO_READING: Final = frozenset({0, 0xFFFF})

DEFAULT_CHANNELS: Final[dict[int, str]] = {0: "afr_front", 1: "afr_rear"}
DEFAULT_FOUR_CHANNELS: Final[dict[int, str]] = {1: "afr_front", 2: "afr_rear"}

_FRAME = struct.Struct(">HhBBBB")
_FOUR = struct.Struct(">HHHH")
_NORMAL = float(SensorStatus.NORMAL)
_INVALID = float(SensorStatus.INVALID)
_FAULT = float(SensorStatus.FAULT)


class AemNetCodec:
    """Pure AEMnet wideband codec.

    Args:
        channels: controller index (0..15) -> AFR channel.
        four_channels: 30-2340 lambda number (1..4) -> AFR channel; empty disables 0x1F.
        stoich: AFR per lambda.

    Raises:
        ConfigError: an index out of range or a non-positive stoich.
    """

    def __init__(
        self,
        channels: Mapping[int, str] | None = None,
        *,
        four_channels: Mapping[int, str] | None = None,
        stoich: float = STOICH_GASOLINE,
    ) -> None:
        if not stoich > 0:
            raise ConfigError("aemnet: stoich must be positive", field="stoich")
        chans = DEFAULT_CHANNELS if channels is None else channels
        for idx in chans:
            if not 0 <= idx < MAX_CONTROLLERS:
                raise ConfigError(
                    f"aemnet: controller index {idx} not in 0..15", field="channel_map"
                )
        for idx in four_channels or {}:
            if not 1 <= idx <= 4:
                raise ConfigError(f"aemnet: 30-2340 lambda {idx} not in 1..4", field="channel_map")
        self.stoich = float(stoich)
        self._by_id = {BASE_ID + i: (ch, ch + "_status") for i, ch in chans.items() if ch}
        self._four = sorted(
            (i - 1, ch, ch + "_status") for i, ch in (four_channels or {}).items() if ch
        )
        self.counters: dict[str, int] = {"lambda_invalid": 0, "sensor_fault": 0}

    def decode(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Decoded | None:
        """Decode an AEMnet frame; None for any other frame (including unmapped indexes).

        Raises:
            ProtocolError: DLC is not 8.
        """
        if not is_extended:
            return None
        names = self._by_id.get(arbitration_id)
        if names is not None:
            if len(data) != DLC:
                raise ProtocolError(f"AEMnet {arbitration_id:#x}: DLC {len(data)}, expected 8")
            lam, _o2, _supply, _res, flags, faults = _FRAME.unpack_from(data)
            if faults & FAULT_SENSOR:
                self.counters["sensor_fault"] += 1
                return [(names[1], _FAULT)]
            if not flags & FLAG_VALID:
                self.counters["lambda_invalid"] += 1
                return [(names[1], _INVALID)]
            if lam in NO_READING:
                # Free air / no reading, sent with the valid bit still set by X-series
                # gauges (a real gauge: 331 frames of 0xFFFF = AFR 96.3 at key-on).
                self.counters["lambda_no_reading"] = self.counters.get("lambda_no_reading", 0) + 1
                return [(names[1], _INVALID)]
            return [(names[0], lam / 10000.0 * self.stoich), (names[1], _NORMAL)]
        if arbitration_id == FOUR_CHANNEL_ID and self._four:
            if len(data) != DLC:
                raise ProtocolError(f"AEM 30-2340 0x1F: DLC {len(data)}, expected 8")
            lams = _FOUR.unpack_from(data)
            out: Decoded = []
            for i, ch, st in self._four:
                raw = lams[i]
                if raw in NO_READING:
                    self.counters["lambda_invalid"] += 1
                    out.append((st, _INVALID))
                else:
                    out.append((ch, raw / 10000.0 * self.stoich))
                    out.append((st, _NORMAL))
            return out
        return None

    def wanted_frames(self) -> list[tuple[int, bool]]:
        """Return the 29-bit ids this codec decodes: 0x180 + n of mapped sensors, and 0x1F."""
        ids = sorted(self._by_id)
        if self._four:
            ids.append(FOUR_CHANNEL_ID)
        return [(i, True) for i in ids]

    def can_filters(self) -> list[CanFilter] | None:
        """Return acceptance filters of :meth:`wanted_frames` (29-bit only)."""
        return frame_filters(self.wanted_frames())


def encode(
    index: int,
    lambda_: float,
    *,
    o2_pct: float = 0.0,
    supply_v: float = 13.8,
    valid: bool = True,
    fault: bool = False,
    lsu49: bool = True,
    free_air_cal: bool = False,
) -> CanFrame:
    """Encode an AEMnet UEGO frame for controller ``index``.

    Raises:
        ValueError: index or a value out of the frame's range.
    """
    if not 0 <= index < MAX_CONTROLLERS:
        raise ValueError(f"aemnet: index {index} not in 0..15")
    lam = round(lambda_ * 10000)
    o2 = round(o2_pct * 1000)
    sup = round(supply_v * 10)
    if not (0 <= lam <= 0xFFFF and -0x8000 <= o2 <= 0x7FFF and 0 <= sup <= 0xFF):
        raise ValueError(
            f"aemnet: value out of range (lambda {lambda_}, O2 {o2_pct}, V {supply_v})"
        )
    flags = (FLAG_VALID if valid else 0) | (FLAG_LSU49 if lsu49 else 0)
    flags |= FLAG_FREE_AIR_CAL if free_air_cal else 0
    faults = FAULT_SENSOR if fault else 0
    return BASE_ID + index, _FRAME.pack(lam, o2, sup, 0, flags, faults), True


def encode_afr(index: int, afr: float, stoich: float = STOICH_GASOLINE, **kwargs: Any) -> CanFrame:
    """Encode an AEMnet frame from an AFR (see :func:`encode` for the options)."""
    return encode(index, afr / stoich, **kwargs)


def encode_four_channel(lambdas: Sequence[float]) -> CanFrame:
    """Encode an AEM 30-2340 frame (id 0x1F) from up to four lambdas (missing: 0).

    Raises:
        ValueError: more than four values or a value out of range.
    """
    if len(lambdas) > 4:
        raise ValueError("aemnet: the 30-2340 carries four lambdas")
    raw = [round(x * 10000) for x in lambdas] + [0] * (4 - len(lambdas))
    if not all(0 <= r <= 0xFFFF for r in raw):
        raise ValueError(f"aemnet: lambda out of range in {list(lambdas)}")
    return FOUR_CHANNEL_ID, _FOUR.pack(*raw), True


def parse_channel_map(
    channel_map: Mapping[str, str], four_channel: bool
) -> tuple[dict[int, str], dict[int, str]]:
    """Turn a source's ``channel_map`` into controller and 30-2340 maps.

    Keys: a frame id (``"0x181"``), a controller index (``"1"``), or ``"lambda1"`` ..
    ``"lambda4"`` for the 30-2340; an empty value drops that sensor.

    Raises:
        ConfigError: a key that names none of these.
    """
    chans: dict[int, str] = {} if four_channel else dict(DEFAULT_CHANNELS)
    four: dict[int, str] = dict(DEFAULT_FOUR_CHANNELS) if four_channel else {}
    for key, ch in channel_map.items():
        k = str(key).strip().lower()
        if k.startswith("lambda"):
            four[parse_int(k[6:], what="channel_map")] = ch
            continue
        n = parse_int(k, what="channel_map")
        if BASE_ID <= n < BASE_ID + MAX_CONTROLLERS:
            n -= BASE_ID
        if not 0 <= n < MAX_CONTROLLERS:
            raise ConfigError(
                f"aemnet: channel_map key {key!r} is not 0x180..0x18F", field="channel_map"
            )
        chans[n] = ch
    return chans, four


class AemNetDriver(CanDriver):
    """AEMnet widebands (X-Series, 30-0300) and optionally the 30-2340, over CAN.

    Args:
        stoich: AFR per lambda (14.7 gasoline).
        four_channel: also decode the 30-2340 four-channel frame (id 0x1F); its lambda1 and
            lambda2 then feed ``afr_front``/``afr_rear`` and the 0x180 defaults are off.
        **kwargs: :class:`~drivers.can_base.CanDriver` options; ``channel_map`` keys are
            ids (``"0x181"``), indexes (``"1"``) or ``"lambda1"``..``"lambda4"``.

    Raises:
        ConfigError: a bad option.
    """

    name = "aemnet"

    def __init__(
        self, *, stoich: float = STOICH_GASOLINE, four_channel: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        chans, four = parse_channel_map(self.channel_map, bool(four_channel))
        self.codec = AemNetCodec(chans, four_channels=four, stoich=float(stoich))

"""rusEFI / FOME wideband controller over CAN: pure codec, encoders and driver.

Standard frame, 11-bit id 0x190 + 2N (N = controller index), little-endian, DLC 8: byte 0
protocol version (0xA0), byte 1 valid flag, bytes 2-3 lambda x0.0001, bytes 4-5 sensor
temperature degC. Diagnostic frame 0x191 + 2N: bytes 0-1 ESR ohm, 2-3 Nernst DC mV, 4 pump
duty (255 = 100 %), 5 status/fault code, 6 heater duty (255 = 100 %) (our reading, pinned
by tests). The codec emits ``<afr channel>_status`` (NORMAL or INVALID) on every standard
frame and the AFR (lambda x stoich) only when valid, plus ``<prefix>_wbo<N>_temp_c``;
diagnostics become ``<prefix>_wbo<N>_esr_ohm``, ``_nernst_v``, ``_pump_duty_pct``,
``_fault`` and ``_heater_duty_pct``, where the prefix is the source name. Default map
(docs/contract.md): index 0 -> ``afr_front``, 1 -> ``afr_rear``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
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

BASE_ID: Final = 0x190
MAX_CONTROLLERS: Final = 16
VERSION: Final = 0xA0
DLC: Final = 8
DEFAULT_CHANNELS: Final[dict[int, str]] = {0: "afr_front", 1: "afr_rear"}

_STD = struct.Struct("<BBHH")
_DIAG = struct.Struct("<HHBBB")
_NORMAL = float(SensorStatus.NORMAL)
_INVALID = float(SensorStatus.INVALID)


class RusefiWboCodec:
    """Pure rusEFI wideband codec.

    Args:
        channels: controller index -> AFR channel (an index not listed is not ours).
        stoich: AFR per lambda.
        prefix: prefix of the diagnostic channels (the source name).
        base_id: id of controller 0's standard frame.
        diagnostics: decode the 0x191 + 2N frames.

    Raises:
        ConfigError: an index out of range, a bad base id or a non-positive stoich.
    """

    def __init__(
        self,
        channels: Mapping[int, str] | None = None,
        *,
        stoich: float = STOICH_GASOLINE,
        prefix: str = "rusefi_wbo",
        base_id: int = BASE_ID,
        diagnostics: bool = True,
    ) -> None:
        if not stoich > 0:
            raise ConfigError("rusefi_wbo: stoich must be positive", field="stoich")
        if not 0 <= base_id <= 0x7FF - 2 * MAX_CONTROLLERS:
            raise ConfigError(f"rusefi_wbo: base_id {base_id:#x} out of range", field="base_id")
        chans = DEFAULT_CHANNELS if channels is None else channels
        for idx in chans:
            if not 0 <= idx < MAX_CONTROLLERS:
                raise ConfigError(f"rusefi_wbo: index {idx} not in 0..15", field="channel_map")
        self.stoich = float(stoich)
        self.counters: dict[str, int] = {"lambda_invalid": 0, "diagnostics": 0}
        self._std: dict[int, tuple[str, str, str]] = {}
        self._diag: dict[int, tuple[str, ...]] = {}
        for idx, ch in chans.items():
            if not ch:
                continue
            p = f"{prefix}_wbo{idx}"
            self._std[base_id + 2 * idx] = (ch, ch + "_status", p + "_temp_c")
            if diagnostics:
                self._diag[base_id + 2 * idx + 1] = (
                    p + "_esr_ohm",
                    p + "_nernst_v",
                    p + "_pump_duty_pct",
                    p + "_fault",
                    p + "_heater_duty_pct",
                )

    def decode(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Decoded | None:
        """Decode a wideband frame; None for any other frame.

        Raises:
            ProtocolError: DLC is not 8, or an unknown protocol version.
        """
        if is_extended:
            return None
        names = self._std.get(arbitration_id)
        if names is not None:
            if len(data) != DLC:
                raise ProtocolError(f"rusEFI WBO {arbitration_id:#x}: DLC {len(data)}, expected 8")
            version, valid, lam, temp = _STD.unpack_from(data)
            if version != VERSION:
                raise ProtocolError(
                    f"rusEFI WBO {arbitration_id:#x}: protocol version {version:#x}, expected 0xA0"
                )
            if valid:
                return [
                    (names[0], lam / 10000.0 * self.stoich),
                    (names[1], _NORMAL),
                    (names[2], float(temp)),
                ]
            self.counters["lambda_invalid"] += 1
            return [(names[1], _INVALID), (names[2], float(temp))]
        dnames = self._diag.get(arbitration_id)
        if dnames is not None:
            if len(data) != DLC:
                raise ProtocolError(f"rusEFI WBO diag {arbitration_id:#x}: DLC {len(data)}")
            esr, nernst_mv, pump, status, heater = _DIAG.unpack_from(data)
            self.counters["diagnostics"] += 1
            return [
                (dnames[0], float(esr)),
                (dnames[1], nernst_mv / 1000.0),
                (dnames[2], pump * 100.0 / 255.0),
                (dnames[3], float(status)),
                (dnames[4], heater * 100.0 / 255.0),
            ]
        return None

    def wanted_frames(self) -> list[tuple[int, bool]]:
        """Return the 11-bit ids decoded: base + 2N (and base + 2N + 1 with diagnostics)."""
        return [(i, False) for i in sorted({*self._std, *self._diag})]

    def can_filters(self) -> list[CanFilter] | None:
        """Return acceptance filters of :meth:`wanted_frames`."""
        return frame_filters(self.wanted_frames())


def encode(
    index: int, lambda_: float, temp_c: float = 780.0, *, valid: bool = True, version: int = VERSION
) -> CanFrame:
    """Encode a standard frame for controller ``index``.

    Raises:
        ValueError: a value outside the frame's range.
    """
    lam = round(lambda_ * 10000)
    temp = round(temp_c)
    if not (0 <= index < MAX_CONTROLLERS and 0 <= lam <= 0xFFFF and 0 <= temp <= 0xFFFF):
        raise ValueError(f"rusefi_wbo: out of range (index {index}, lambda {lambda_}, T {temp_c})")
    data = _STD.pack(version & 0xFF, 1 if valid else 0, lam, temp) + b"\x00\x00"
    return BASE_ID + 2 * index, data, False


def encode_diag(
    index: int,
    *,
    esr_ohm: float = 300.0,
    nernst_v: float = 0.45,
    pump_duty_pct: float = 50.0,
    status: int = 0,
    heater_duty_pct: float = 40.0,
) -> CanFrame:
    """Encode a diagnostic frame for controller ``index``.

    Raises:
        ValueError: a value outside the frame's range.
    """
    esr = round(esr_ohm)
    nernst = round(nernst_v * 1000)
    pump = round(pump_duty_pct * 255 / 100)
    heater = round(heater_duty_pct * 255 / 100)
    vals = (esr, nernst, pump, status, heater)
    limits = (0xFFFF, 0xFFFF, 0xFF, 0xFF, 0xFF)
    if not 0 <= index < MAX_CONTROLLERS or any(
        not 0 <= v <= m for v, m in zip(vals, limits, strict=True)
    ):
        raise ValueError(f"rusefi_wbo: diagnostic value out of range {vals}")
    return BASE_ID + 2 * index + 1, _DIAG.pack(*vals) + b"\x00", False


def parse_channel_map(channel_map: Mapping[str, str]) -> dict[int, str]:
    """Turn a source's ``channel_map`` (controller index -> channel) into the codec's map.

    Raises:
        ConfigError: a key that is not an index 0..15.
    """
    chans = dict(DEFAULT_CHANNELS)
    for key, ch in channel_map.items():
        k = str(key).strip().lower().removeprefix("wbo")
        n = parse_int(k, what="channel_map")
        if not 0 <= n < MAX_CONTROLLERS:
            raise ConfigError(
                f"rusefi_wbo: channel_map key {key!r} is not 0..15", field="channel_map"
            )
        chans[n] = ch
    return chans


class RusefiWboDriver(CanDriver):
    """rusEFI / FOME wideband controllers over CAN.

    Args:
        stoich: AFR per lambda.
        base_id: standard-frame id of controller 0 (0x190).
        diagnostics: decode the diagnostic frames.
        **kwargs: :class:`~drivers.can_base.CanDriver` options; ``channel_map`` keys are
            controller indexes (``"0"``, ``"wbo1"``).

    Raises:
        ConfigError: a bad option.
    """

    name = "rusefi_wbo"

    def __init__(
        self,
        *,
        stoich: float = STOICH_GASOLINE,
        base_id: int | str = BASE_ID,
        diagnostics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.codec = RusefiWboCodec(
            parse_channel_map(self.channel_map),
            stoich=float(stoich),
            prefix=self.source,
            base_id=parse_int(base_id, what="base_id"),
            diagnostics=bool(diagnostics),
        )

"""AEM UEGO gauge serial output (30-0300 and alike): codec and driver.

The gauge sends one ASCII line per reading at 9600 8N1, e.g. ``"14.7\\r\\n"``, in AFR or in
lambda depending on its display mode (the config says which; the line itself does not).
There is no status: a line that is not a plain decimal number, or falls outside the
plausible range of the configured mode, is counted as a bad line and skipped, never fatal.
:class:`AemDecoder` is the pure codec (:func:`encode_line` its inverse for simulators);
:class:`AemSerialDriver` reads a port with it and emits one AFR channel (default
``afr_front``) on the gasoline scale.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Final, Literal

from drivers.serial_base import LineCounters, LineSplitter, SerialDriver, check_positive
from dynoai_daemon.channels import STOICH_GASOLINE, Sample
from dynoai_daemon.errors import ConfigError

BAUDRATE: Final = 9600
#: Nominal line period used to time raw captures. *Unverified*: AEM does not document the
#: gauge's serial output rate; 10 lines/s matches captures published by users. Configurable
#: with ``nominal_period_s``.
NOMINAL_PERIOD_S: Final = 0.1
#: Plausible readings per display mode; anything outside is a bad line (a gauge set to
#: lambda while the config says AFR then shows up as bad lines instead of lean AFR 1.0).
VALID_RANGE: Final[dict[str, tuple[float, float]]] = {"afr": (5.0, 30.0), "lambda": (0.3, 3.0)}
MAX_LINE: Final = 32

# Plain decimals only: float() would also take "nan", "1e3" and "1_4.7".
_NUMBER_RE = re.compile(rb"[ \t]*([+]?(?:[0-9]{1,3}(?:\.[0-9]{0,4})?|\.[0-9]{1,4}))[ \t]*")


def parse_line(line: bytes) -> float | None:
    """Return the number on one gauge line (terminator removed), None if it is not one."""
    m = _NUMBER_RE.fullmatch(line)
    if m is None:
        return None
    v = float(m.group(1))
    return v if math.isfinite(v) else None


class AemDecoder(LineCounters):
    """Incremental decoder of the gauge's line stream.

    Args:
        valid_range: inclusive (low, high) of accepted readings; None accepts any
            positive number.

    Attributes:
        lines: readings decoded.
        bad_frames: lines that did not parse, were out of range, or were too long.
        out_of_range: the bad lines that parsed but fell outside ``valid_range``.
        skipped_bytes: bytes of the bad lines.
    """

    def __init__(self, valid_range: tuple[float, float] | None = None) -> None:
        self.valid_range = valid_range
        self._lines = LineSplitter(MAX_LINE)
        self.lines = 0
        self.out_of_range = 0
        self._bad = 0
        self._skipped = 0

    def _decode(self, lines: list[bytes]) -> list[float]:
        out: list[float] = []
        lo, hi = self.valid_range or (0.0, math.inf)
        for line in lines:
            v = parse_line(line)
            if v is None or v <= 0.0:
                self._bad += 1
                self._skipped += len(line)
                continue
            if not lo <= v <= hi:
                self._bad += 1
                self.out_of_range += 1
                self._skipped += len(line)
                continue
            out.append(v)
        self.lines += len(out)
        return out

    def feed(self, data: bytes | bytearray) -> list[float]:
        """Consume ``data``; return the readings of the lines it completes."""
        return self._decode(self._lines.feed(bytes(data)))

    def flush(self) -> list[float]:
        """End of stream: decode an unterminated last line."""
        return self._decode(self._lines.flush())


def encode_line(value: float, decimals: int = 1) -> bytes:
    """Return the gauge line for ``value`` (``b"14.7\\r\\n"``).

    Raises:
        ValueError: ``value`` is not finite or negative.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"cannot encode {value} as a gauge reading")
    return f"{value:.{decimals}f}\r\n".encode("ascii")


class AemSerialDriver(SerialDriver):
    """An AEM UEGO gauge's serial output on a port.

    Args:
        port: pyserial port or URL.
        baudrate: 9600 for the gauge.
        mode: ``"afr"`` or ``"lambda"``, as the gauge displays.
        channel: the AFR channel this gauge feeds (``afr_front`` or ``afr_rear``).
        stoich: in lambda mode the AFR reported is lambda x ``stoich``; AFR mode readings
            are passed through as the gauge shows them.
        nominal_period_s: line period for timing raw captures.
        valid_range: override of the plausible reading range of the mode.
        **kwargs: :class:`~drivers.serial_base.SerialDriver` and Driver options.

    Raises:
        ConfigError: an option is invalid.
    """

    name: ClassVar[str] = "aem_serial"

    def __init__(
        self,
        *,
        port: str = "",
        baudrate: int = BAUDRATE,
        mode: Literal["afr", "lambda"] = "afr",
        channel: str = "afr_front",
        stoich: float = STOICH_GASOLINE,
        nominal_period_s: float = NOMINAL_PERIOD_S,
        valid_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(port=port, baudrate=baudrate, **kwargs)
        if mode not in VALID_RANGE:
            raise ConfigError(f"{self.name}: mode must be 'afr' or 'lambda'", field="mode")
        if not isinstance(channel, str) or not channel:
            raise ConfigError(f"{self.name}: channel must be a non-empty name", field="channel")
        if valid_range is not None:
            try:
                lo, hi = (float(x) for x in valid_range)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{self.name}: valid_range must be [low, high]", field="valid_range"
                ) from None
            if not (0 <= lo < hi):
                raise ConfigError(
                    f"{self.name}: valid_range needs 0 <= low < high", field="valid_range"
                )
            valid_range = (lo, hi)
        self.mode = mode
        self.channel = self.map_channel(channel)
        self.stoich = check_positive("stoich", self.name, stoich)
        self.nominal_period_s = check_positive("nominal_period_s", self.name, nominal_period_s)
        self.valid_range = valid_range or VALID_RANGE[mode]

    def new_decoder(self) -> AemDecoder:
        """Return a fresh :class:`AemDecoder` for the configured mode."""
        return AemDecoder(self.valid_range)

    def message_samples(self, msg: Any, t: float, out: list[Sample]) -> bool:
        """Append the AFR sample of one reading."""
        v = float(msg)
        afr = v * self.stoich if self.mode == "lambda" else v
        out.append(Sample(t, self.channel, afr, self.source))
        return True


__all__ = [
    "BAUDRATE",
    "NOMINAL_PERIOD_S",
    "VALID_RANGE",
    "AemDecoder",
    "AemSerialDriver",
    "encode_line",
    "parse_line",
]

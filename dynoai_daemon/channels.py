"""Canonical channel names, their units, and the two shapes samples travel in.

A :class:`Sample` is one value of one channel at one time, as a driver produces it.
A :class:`Frame` is the columnar (wide) form the core consumes: one float64 column per
channel over a shared, non-decreasing time axis, with NaN where a row has no value for
that channel. Log readers produce Frames directly; the daemon's hub turns micro-batches of
Samples into Frames with :func:`samples_to_frame`.

Sensor state travels as ordinary channels: ``<afr channel>_status`` carries a
:class:`SensorStatus` code (0 = normal) and, for Innovate MTS, ``<afr channel>_detail`` the
raw word the sensor sent with it (O2 level, warm-up percent, error code). A channel with no
status column is taken as valid. The core never learns AFR while the latest status of that
channel is not ``NORMAL``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Canonical channels and their units, in canonical CSV column order.
CHANNEL_UNITS: Final[dict[str, str]] = {
    "rpm": "rpm",
    "map_kpa": "kPa",
    "tps_pct": "%",
    "afr_front": "AFR",
    "afr_rear": "AFR",
    "afr_target": "AFR",
    "knock_front_deg": "deg",
    "knock_rear_deg": "deg",
    "spark_front_deg": "deg",
    "spark_rear_deg": "deg",
    "iat_f": "degF",
    "ect_f": "degF",
    "ve_front": "%",
    "ve_rear": "%",
    "torque_ftlb": "lb-ft",
    "power_hp": "hp",
    "baro_kpa": "kPa",
    "vbatt_v": "V",
}
CANONICAL_CHANNELS: Final[tuple[str, ...]] = tuple(CHANNEL_UNITS)
TIME_COLUMN: Final = "time_s"

AFR_CHANNELS: Final[tuple[str, str]] = ("afr_front", "afr_rear")
KNOCK_CHANNELS: Final[tuple[str, str]] = ("knock_front_deg", "knock_rear_deg")
CYLINDERS: Final[tuple[str, str]] = ("front", "rear")
STATUS_SUFFIX: Final = "_status"
DETAIL_SUFFIX: Final = "_detail"
STOICH_GASOLINE: Final = 14.7


class SensorStatus(IntEnum):
    """Wideband sensor state carried in ``<channel>_status`` (0 = learnable).

    Codes 1-7 are the Innovate MTS function codes; the rest cover CAN widebands.
    """

    NORMAL = 0
    O2_LEVEL = 1  # MTS 001: free air, value is O2 in 0.1 %
    FREE_AIR_CAL = 2  # MTS 010: free-air calibration in progress
    NEEDS_CAL = 3  # MTS 011: needs free-air calibration
    WARMING_UP = 4  # MTS 100: detail = temperature in 0.1 % of operating temperature
    HEATER_CAL = 5  # MTS 101: detail = countdown
    ERROR = 6  # MTS 110: detail = error code
    RESERVED = 7  # MTS 111
    INVALID = 8  # CAN wideband says its lambda is not valid
    FAULT = 9  # CAN wideband reports a sensor fault


def status_channel(channel: str) -> str:
    """Return the name of the status channel that belongs to ``channel``."""
    return channel + STATUS_SUFFIX


def detail_channel(channel: str) -> str:
    """Return the name of the detail channel that belongs to ``channel``."""
    return channel + DETAIL_SUFFIX


@dataclass(slots=True, frozen=True)
class Sample:
    """One value of one channel.

    Attributes:
        t: seconds on the daemon's monotonic clock when the value arrived (after clock
            alignment for sources that have one).
        channel: canonical channel name (or a source-specific name the core ignores).
        value: the value in the channel's canonical unit; NaN is allowed and means
            "present but not usable".
        source: the configured source name that produced it.
        device_t: the device's own timestamp in seconds, when the protocol has one.
    """

    t: float
    channel: str
    value: float
    source: str = ""
    device_t: float | None = None


@dataclass(slots=True)
class Frame:
    """A columnar batch of samples: ``t`` plus one NaN-padded float64 column per channel.

    Invariants: ``t`` is float64 and non-decreasing; every column has ``len(t)`` rows.
    """

    t: FloatArray
    columns: dict[str, FloatArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @classmethod
    def empty(cls) -> Frame:
        """Return a frame with no rows and no columns."""
        return cls(np.empty(0, dtype=np.float64), {})

    @classmethod
    def from_columns(
        cls, t: npt.ArrayLike, columns: Mapping[str, npt.ArrayLike] | None = None
    ) -> Frame:
        """Build a frame from array-likes, converting to float64 and checking shapes.

        Raises:
            ValueError: when a column's length differs from ``t`` or ``t`` decreases.
        """
        tt = np.ascontiguousarray(t, dtype=np.float64)
        cols: dict[str, FloatArray] = {}
        for name, col in (columns or {}).items():
            arr = np.ascontiguousarray(col, dtype=np.float64)
            if arr.shape != tt.shape:
                raise ValueError(f"column {name!r} has {arr.shape[0]} rows, time has {tt.shape[0]}")
            cols[name] = arr
        if tt.size > 1 and bool(np.any(np.diff(tt) < 0)):
            raise ValueError("frame time must be non-decreasing")
        return cls(tt, cols)

    def slice(self, start: int, stop: int) -> Frame:
        """Return rows ``start:stop`` as a new frame (views, no copy)."""
        return Frame(self.t[start:stop], {k: v[start:stop] for k, v in self.columns.items()})

    def column(self, name: str) -> FloatArray | None:
        """Return the column ``name`` or None when the frame does not carry it."""
        return self.columns.get(name)

    def iter_samples(self, source: str = "") -> Iterable[Sample]:
        """Yield the frame's non-NaN cells as Samples, row by row."""
        names = list(self.columns)
        cols = [self.columns[n] for n in names]
        for i, t in enumerate(self.t.tolist()):
            for n, c in zip(names, cols, strict=True):
                v = float(c[i])
                if not math.isnan(v):
                    yield Sample(t, n, v, source)


def concat_frames(frames: Sequence[Frame]) -> Frame:
    """Concatenate frames in order; a channel missing in one frame is NaN there."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return Frame.empty()
    if len(frames) == 1:
        return frames[0]
    names: dict[str, None] = {}
    for f in frames:
        names.update(dict.fromkeys(f.columns))
    t = np.concatenate([f.t for f in frames])
    cols: dict[str, FloatArray] = {}
    for n in names:
        parts = []
        for f in frames:
            c = f.columns.get(n)
            parts.append(c if c is not None else np.full(len(f), np.nan))
        cols[n] = np.concatenate(parts)
    return Frame(t, cols)


def samples_to_frame(samples: Sequence[Sample]) -> Frame:
    """Turn samples into a frame: one row per distinct time, stable for equal times.

    Samples that share a time land on one row (a driver emits all channels of one message
    with one arrival time). Two values of one channel are never merged: when a row would
    get a second value for a channel, the later sample (in sequence order) opens a new
    row with the same time, so every reading reaches the core and the raw log. The input
    need not be sorted.
    """
    n = len(samples)
    if n == 0:
        return Frame.empty()
    ts = np.fromiter((s.t for s in samples), dtype=np.float64, count=n)
    order = np.argsort(ts, kind="stable")
    times: list[float] = []
    rows: list[int] = []
    row = -1
    row_t = math.nan
    seen: set[str] = set()
    for k in order.tolist():
        s = samples[k]
        t = s.t
        if t != row_t or s.channel in seen:
            row += 1
            row_t = t
            times.append(t)
            seen = set()
        seen.add(s.channel)
        rows.append(row)
    n_rows = row + 1
    cols: dict[str, FloatArray] = {}
    for k, r in zip(order.tolist(), rows, strict=True):
        s = samples[k]
        col = cols.get(s.channel)
        if col is None:
            col = np.full(n_rows, np.nan)
            cols[s.channel] = col
        col[r] = s.value
    return Frame(np.asarray(times, dtype=np.float64), cols)


#: Plausible physical range (inclusive) of each canonical channel, in its canonical unit.
#: A value outside it is not a reading of the engine but a wrong scale, a wrong driver, an
#: id collision or a sensor's "no reading" code; :func:`screen_frame` blanks it (NaN) and
#: counts it per channel. The ranges are wide on purpose (any street or race engine):
#:
#: ========================= ================ ==============================================
#: channel                   range            why
#: ========================= ================ ==============================================
#: rpm                       0 .. 15000       no piston engine on a dyno turns faster
#: map_kpa                   5 .. 450         deep vacuum to ~50 psi of boost (absolute)
#: baro_kpa                  50 .. 110        barometric pressure from sea level to 5 km
#: tps_pct                   -5 .. 105        a throttle in % with a little sensor slack
#: afr_front/rear/target     6 .. 25          lambda 0.41 .. 1.7 on gasoline; a wideband
#:                                            reads 6-25 or nothing (free air is ~96)
#: knock_front/rear_deg      0 .. 30          degrees of retard an ECU applies
#: spark_front/rear_deg      -20 .. 70        ignition advance, retarded to well advanced
#: iat_f                     -40 .. 300       degF; -40 is the open-circuit reading
#: ect_f                     -40 .. 320       degF; air-cooled heads run hotter than water
#: ve_front/rear             0 .. 255         VE in % (fits the ECU's byte tables)
#: torque_ftlb               -100 .. 3000     lb-ft at the roller, small negative on decel
#: power_hp                  -100 .. 3000     hp at the roller
#: vbatt_v                   0 .. 30          a 12 V or 24 V system
#: ========================= ================ ==============================================
PLAUSIBLE_RANGES: Final[dict[str, tuple[float, float]]] = {
    "rpm": (0.0, 15000.0),
    "map_kpa": (5.0, 450.0),
    "baro_kpa": (50.0, 110.0),
    "tps_pct": (-5.0, 105.0),
    "afr_front": (6.0, 25.0),
    "afr_rear": (6.0, 25.0),
    "afr_target": (6.0, 25.0),
    "knock_front_deg": (0.0, 30.0),
    "knock_rear_deg": (0.0, 30.0),
    "spark_front_deg": (-20.0, 70.0),
    "spark_rear_deg": (-20.0, 70.0),
    "iat_f": (-40.0, 300.0),
    "ect_f": (-40.0, 320.0),
    "ve_front": (0.0, 255.0),
    "ve_rear": (0.0, 255.0),
    "torque_ftlb": (-100.0, 3000.0),
    "power_hp": (-100.0, 3000.0),
    "vbatt_v": (0.0, 30.0),
}


def is_plausible(channel: str, value: float) -> bool:
    """True when ``value`` lies in ``channel``'s plausible range (or the channel has none).

    NaN is plausible (it already means "no value").
    """
    lim = PLAUSIBLE_RANGES.get(channel)
    if lim is None or math.isnan(value):
        return True
    return lim[0] <= value <= lim[1]


def screen_frame(frame: Frame, counts: dict[str, int] | None = None) -> Frame:
    """Blank (NaN) the implausible values of ``frame`` and count them per channel.

    The one function every log reader's frames and every driver's samples pass through
    (drivers via :func:`screen_samples`). Columns without a range are left alone.

    Args:
        frame: the rows; its columns are not modified (a changed column is copied).
        counts: channel -> values blanked so far; updated in place when given.

    Returns:
        ``frame`` itself when nothing was blanked, else a frame with new columns.
    """
    out: dict[str, FloatArray] | None = None
    for name, col in frame.columns.items():
        lim = PLAUSIBLE_RANGES.get(name)
        if lim is None or col.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            bad = (col < lim[0]) | (col > lim[1])
        n = int(np.count_nonzero(bad))
        if not n:
            continue
        if out is None:
            out = dict(frame.columns)
        fixed = np.array(col, dtype=np.float64, copy=True)
        fixed[bad] = np.nan
        out[name] = fixed
        if counts is not None:
            counts[name] = counts.get(name, 0) + n
    return frame if out is None else Frame(frame.t, out)


def screen_samples(samples: Sequence[Sample], counts: dict[str, int]) -> list[Sample]:
    """Drop the implausible samples of a driver's batch, counting them per channel."""
    kept: list[Sample] = []
    for s in samples:
        if is_plausible(s.channel, s.value):
            kept.append(s)
        else:
            counts[s.channel] = counts.get(s.channel, 0) + 1
    return kept

"""What the core hands out: open runs, closed runs, decel events, and feed results.

An :class:`OpenRun` accumulates while a pull lasts; when the run detector closes it, the
same object travels in a :class:`RunClosed` event to pattern extraction, which turns it
into a TuningSession. Nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from dynoai_daemon.core.accumulator import CylinderStats, HeatStats

FloatArray = npt.NDArray[np.float64]


@dataclass
class DecelEvent:
    """One closed-throttle deceleration and the AFR seen in its coast window."""

    start_t: float
    rpm_start: float
    window_start: float
    end_t: float = math.inf
    rpm_end: float = math.nan
    window_end: float = math.inf
    tps_min: float = math.nan
    afr_samples: int = 0
    spikes: int = 0
    afr_max: float = math.nan
    spike_excess_sum: float = 0.0  # sum of (afr - spike limit) over spiking samples

    @property
    def open(self) -> bool:
        """True while the throttle is still closed."""
        return math.isinf(self.end_t)


@dataclass
class OpenRun:
    """A run in progress (and, once closed, the record pattern extraction reads)."""

    run_id: str
    seq: int
    station: str
    start_t: float
    start_utc: datetime
    size: int
    front: CylinderStats = field(init=False)
    rear: CylinderStats = field(init=False)
    heat: HeatStats = field(init=False)
    last_t: float = math.nan
    end_t: float = math.nan
    rows: int = 0
    reason: str = ""
    aborted: bool = False
    manual: bool = False
    iat_start: float = math.nan
    iat_peak: float = math.nan
    iat_end: float = math.nan
    peak_power: float = math.nan
    peak_power_rpm: float = math.nan
    peak_torque: float = math.nan
    peak_torque_rpm: float = math.nan
    target_from_ecu: int = 0
    target_from_table: int = 0
    out_of_grid: int = 0  # learnable AFR samples that fell outside the grid's axes
    decels: list[DecelEvent] = field(default_factory=list)
    #: AFR readings in this run that a learning gate rejected, by gate (engine.GATES)
    rejected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.front = CylinderStats(self.size)
        self.rear = CylinderStats(self.size)
        self.heat = HeatStats(self.size)

    def cylinder(self, name: str) -> CylinderStats:
        """Return the stats of ``"front"`` or ``"rear"``."""
        return self.front if name == "front" else self.rear

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last row of the run."""
        end = self.end_t if not math.isnan(self.end_t) else self.last_t
        return 0.0 if math.isnan(end) else max(0.0, end - self.start_t)

    @property
    def target_source(self) -> str:
        """``"ecu"`` when most learned samples used the ECU's target, else ``"table"``."""
        return (
            "ecu"
            if self.target_from_ecu >= self.target_from_table and self.target_from_ecu
            else ("table")
        )


@dataclass(frozen=True)
class RunStarted:
    """A run opened at core time ``t``."""

    run_id: str
    t: float


@dataclass(frozen=True)
class RunClosed:
    """A run closed; ``run`` holds everything learned in it."""

    run: OpenRun


@dataclass(frozen=True)
class RunDiscarded:
    """A run closed shorter than ``min_run_s``; counted, not turned into a session."""

    run_id: str
    duration_s: float


CoreEvent = RunStarted | RunClosed | RunDiscarded


@dataclass
class AfrEvents:
    """AFR readings of one cylinder in a batch, with the engine state they belong to."""

    t: FloatArray
    afr: FloatArray
    rpm: FloatArray
    map_kpa: FloatArray
    learned: npt.NDArray[np.bool_]

    @classmethod
    def empty(cls) -> AfrEvents:
        """Return an empty set."""
        e = np.empty(0)
        return cls(e, e, e, e, np.empty(0, dtype=bool))


@dataclass
class FeedResult:
    """What one :meth:`Core.feed` call produced, for alerts and live publishing."""

    events: list[CoreEvent]
    t: FloatArray
    rpm: FloatArray
    map_kpa: FloatArray
    tps_pct: FloatArray
    iat_f: FloatArray
    afr: dict[str, AfrEvents]
    knock: dict[str, tuple[FloatArray, FloatArray, FloatArray, FloatArray]]
    status: dict[str, tuple[FloatArray, FloatArray]]

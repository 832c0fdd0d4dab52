"""Units decided per log, from its title and its own values, and said.

Foreign logs leave some units blank or store values scaled: TunerStudio temperature
columns have no unit (Speeduino and rusEFI log degC, MegaSquirt MS1/MS2/MS3 degF), and
MS2Extra stores ``AFR Target 1`` as AFR x 100. :class:`DecidedLog` wraps a
:class:`~dynoai_daemon.logs.base.LogReader`, looks once at its first 20,000 rows (or the
whole log when shorter, whatever the chunk size), decides, and applies the same decision
to every chunk, then blanks values outside the channels' plausible ranges
(:func:`~dynoai_daemon.channels.screen_frame`) and counts them per channel.

Rules:

* Temperatures (``iat_f``, ``ect_f``) whose column has no unit: the override
  (``--temp-unit`` / ``[replay] temp_unit``) wins; else the firmware named in the title
  (Speeduino, rusEFI, FOME: degC; MegaSquirt, MS1/MS2/MS3, MS2Extra, B&G: degF), checked
  against the coolant while the engine runs (median above 130 means degF whatever the
  title says; below 40 means degC); with no firmware named, a running coolant median at
  or below 110 is degC, above is degF.
* AFR channels: a median between 60 and 250 is AFR x 10, between 600 and 2500 AFR x 100
  (rescaled); a median between 0.5 and 1.6 in a column not already read as lambda is
  lambda (x stoich); a column that never changes over 50 or more readings is not a
  sensor (blanked).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from dynoai_daemon.channels import FloatArray, Frame, concat_frames, screen_frame
from dynoai_daemon.logs.base import LogReader

TEMP_CHANNELS: Final = ("iat_f", "ect_f")
AFR_CHANNELS: Final = ("afr_front", "afr_rear", "afr_target")
CELSIUS_FIRMWARE: Final = ("speeduino", "rusefi", "fome", "epicefi")
FAHRENHEIT_FIRMWARE: Final = ("megasquirt", "ms2extra", "ms3", "ms2", "ms1", "bowling", "b&g")
RUNNING_RPM: Final = 400.0
#: Rows looked at before deciding (whatever the chunk size).
DECIDE_ROWS: Final = 20_000
LAMBDA_UNITS: Final = frozenset({"lambda", "λ", "lam"})


def firmware_unit(title: list[str]) -> tuple[str | None, str | None]:
    """``(unit, firmware)`` that the title lines imply for blank temperature units."""
    text = " ".join(title).lower()
    for name in CELSIUS_FIRMWARE:
        if name in text:
            return "C", name
    for name in FAHRENHEIT_FIRMWARE:
        if name in text:
            return "F", name
    return None, None


@dataclass
class Decisions:
    """What was decided for one log, and what the screen dropped."""

    notes: list[str] = field(default_factory=list)
    temp_unit: str | None = None
    #: channel -> (scale, offset) applied to every chunk; None = channel blanked
    fixes: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


def _median(col: FloatArray | None, mask: npt.NDArray[np.bool_] | None = None) -> float | None:
    if col is None:
        return None
    v = col if mask is None else col[mask]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


class DecidedLog:
    """A LogReader's frames with per-log unit decisions applied and values screened.

    Args:
        reader: the log.
        temp_unit: ``"C"``/``"F"`` to force blank temperature units, None to decide.
        stoich: AFR per lambda.
    """

    def __init__(self, reader: LogReader, *, temp_unit: str | None = None, stoich: float = 14.7):
        self.reader = reader
        self.temp_unit = temp_unit
        self.stoich = stoich
        self.decisions = Decisions()
        self._decided = False

    def _decide(self, first: Frame) -> None:
        d = self.decisions
        r = self.reader
        if r.format == "canonical":
            return  # the project's own log: canonical units by definition
        blank = [
            c for c in TEMP_CHANNELS if c in first.columns and r.source_units.get(c, None) == ""
        ]
        if blank:
            unit, why = self._temp_unit(first, r.title)
            d.temp_unit = unit
            if unit == "C":
                for c in blank:
                    d.fixes[c] = (1.8, 32.0)
            cols = ", ".join(r.source_of.get(c, c) for c in blank)
            d.notes.append(f"temperatures ({cols}) have no unit: read as deg{unit} ({why})")
        for ch in AFR_CHANNELS:
            col = first.columns.get(ch)
            if col is None:
                continue
            fin = col[np.isfinite(col)]
            if fin.size == 0:
                continue
            src = r.source_of.get(ch, ch)
            med = float(np.median(fin))
            unit = r.source_units.get(ch, "").strip().lower()
            if fin.size >= 50 and float(fin.min()) == float(fin.max()):
                d.fixes[ch] = None
                d.notes.append(f"{src}: constant {med:g} over the log, not a sensor: ignored")
            elif 600.0 <= med <= 2500.0:
                d.fixes[ch] = (0.01, 0.0)
                d.notes.append(f"{src}: stored as AFR x 100 (median {med:g}): divided by 100")
            elif 60.0 <= med <= 250.0:
                d.fixes[ch] = (0.1, 0.0)
                d.notes.append(f"{src}: stored as AFR x 10 (median {med:g}): divided by 10")
            elif 0.5 <= med <= 1.6 and unit not in LAMBDA_UNITS and "lambda" not in src.lower():
                d.fixes[ch] = (self.stoich, 0.0)
                d.notes.append(f"{src}: values are lambda (median {med:g}): x {self.stoich:g}")

    def _temp_unit(self, first: Frame, title: list[str]) -> tuple[str, str]:
        if self.temp_unit is not None:
            return self.temp_unit, "forced"
        rpm = first.columns.get("rpm")
        clt = first.columns.get("ect_f")
        if clt is None:
            clt = first.columns.get("iat_f")
        running = None if rpm is None else (rpm > RUNNING_RPM)
        med = _median(clt, running if running is not None and running.any() else None)
        unit, fw = firmware_unit(title)
        if unit is not None:
            if med is not None and med > 130.0 and unit == "C":
                return "F", f"{fw} title, but running coolant median {med:.0f} is degF"
            if med is not None and med < 40.0 and unit == "F":
                return "C", f"{fw} title, but running coolant median {med:.0f} is degC"
            checked = "" if med is None else f", running coolant median {med:.0f}"
            return unit, f"firmware {fw}{checked}"
        if med is None:
            return "F", "no firmware named and no coolant values: degF assumed"
        if med <= 110.0:
            return "C", f"no firmware named; running coolant median {med:.0f} fits degC"
        return "F", f"no firmware named; running coolant median {med:.0f} fits degF"

    def _apply(self, frame: Frame) -> Frame:
        fixes = self.decisions.fixes
        if fixes:
            cols = dict(frame.columns)
            for ch, fx in fixes.items():
                col = cols.get(ch)
                if col is None:
                    continue
                if fx is None:
                    del cols[ch]
                else:
                    cols[ch] = col * fx[0] + fx[1]
            frame = Frame(frame.t, cols)
        return screen_frame(frame, self.decisions.dropped)

    def __iter__(self) -> Iterator[Frame]:
        self.decisions.dropped = {}
        ahead: list[Frame] = []
        rows = 0
        for frame in self.reader:
            if self._decided:
                yield self._apply(frame)
                continue
            ahead.append(frame)
            rows += len(frame)
            if rows >= DECIDE_ROWS:
                yield from self._release(ahead)
                ahead = []
        if ahead:
            yield from self._release(ahead)

    def _release(self, ahead: list[Frame]) -> Iterator[Frame]:
        if not self._decided:
            self._decide(concat_frames(ahead))
            self._decided = True
        for frame in ahead:
            yield self._apply(frame)

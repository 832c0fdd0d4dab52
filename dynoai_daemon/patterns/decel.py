"""Decel popping pattern from the run's closed-throttle decel events (docs/tuning.md).

An event pops when its coast window (after the snap, offset by the transport delay) holds
at least ``MIN_SPIKES`` readings leaner than 15.5 AFR, so one noisy reading is not a pop.
Severity 0-10 grows with the spike height above 15.5 and with how many readings spiked;
enrichment zones start from +22/+18/+12/+10 % for the bands 1500-2500/2500-3500/
3500-4500/4500-5500 rpm, scaled by severity / 7 (a severity-7 pop gets the base values,
as in the seed's example) and capped at 30 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dynoai_daemon.core.engine import SPIKE_AFR
from dynoai_daemon.core.runs import DecelEvent

MIN_SPIKES = 2
BANDS: tuple[tuple[float, float, float], ...] = (
    (1500.0, 2500.0, 0.22),
    (2500.0, 3500.0, 0.18),
    (3500.0, 4500.0, 0.12),
    (4500.0, 5500.0, 0.10),
)
MAX_ENRICHMENT = 0.30


def pop_severity(events: Sequence[DecelEvent]) -> int:
    """Return 0-10 from the spike height and count of popping events."""
    if not events:
        return 0
    height = max(e.afr_max - SPIKE_AFR for e in events)
    per_event = sum(e.spikes for e in events) / len(events)
    score = 3.0 * min(height, 2.0) + 4.0 * (1.0 - math.exp(-per_event / 6.0))
    return int(max(1, min(10, round(score))))


def extract(decels: Sequence[DecelEvent], decel_tps_pct: float) -> dict[str, Any] | None:
    """Return DecelPoppingPattern fields, or None when no decel event popped."""
    popping = [d for d in decels if d.spikes >= MIN_SPIKES and not math.isnan(d.afr_max)]
    if not popping:
        return None
    sev = pop_severity(popping)
    # The range spans every start and end rpm: an event's rpm can end above where it
    # started (the engine picks up during the coast), so neither side is assumed.
    rpms = [d.rpm_start for d in popping]
    rpms += [d.rpm_end for d in popping if not math.isnan(d.rpm_end)]
    rpm_hi = max(rpms)
    rpm_lo = min(max(min(rpms), 1500.0), rpm_hi)
    zones = []
    for lo, hi, base in BANDS:
        if hi > rpm_lo and lo < rpm_hi:
            pct = min(MAX_ENRICHMENT, base * sev / 7.0)
            zones.append((lo, hi, 0.0, float(decel_tps_pct), round(pct, 4)))
    tps_min = min((d.tps_min for d in popping if not math.isnan(d.tps_min)), default=0.0)
    return {
        "pop_severity": sev,
        "pop_rpm_range": (round(rpm_lo, 1), round(rpm_hi, 1)),
        "pop_throttle_position": round(tps_min, 2),
        "decel_afr_spike_max": round(max(d.afr_max for d in popping), 3),
        "enrichment_zones": zones,
        "decel_events": len(decels),
        "popping_events": len(popping),
    }

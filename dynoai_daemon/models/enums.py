"""The schema's vocabularies: engine family, stage, cam profile, objective, correction method.

Also the cam overlap categories (with their thresholds in degrees) and the names of the five
pattern kinds, in the seed's spelling.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class EngineFamily(StrEnum):
    """Harley-Davidson engine families (and ``other`` for anything else)."""

    TWIN_CAM = "twin_cam"
    MILWAUKEE_8 = "milwaukee_8"
    EVOLUTION = "evolution"
    SPORTSTER = "sportster"
    REVOLUTION_MAX = "revolution_max"
    OTHER = "other"


class StageLevel(StrEnum):
    """Build stage, stock to stage 4."""

    STOCK = "stock"
    STAGE_1 = "stage_1"
    STAGE_2 = "stage_2"
    STAGE_3 = "stage_3"
    STAGE_4 = "stage_4"


class CamProfile(StrEnum):
    """Common V-twin cams; ``other`` for one not listed (give its numbers in CamSpecification)."""

    STOCK = "stock"
    S_AND_S_475 = "s_and_s_475"
    S_AND_S_509 = "s_and_s_509"
    S_AND_S_510 = "s_and_s_510"
    S_AND_S_550 = "s_and_s_550"
    S_AND_S_585 = "s_and_s_585"
    S_AND_S_640 = "s_and_s_640"
    WOOD_TW_222 = "wood_tw_222"
    WOOD_TW_555 = "wood_tw_555"
    WOOD_TW_777 = "wood_tw_777"
    FUELING_465 = "fueling_465"
    FUELING_508 = "fueling_508"
    FUELING_574 = "fueling_574"
    FUELING_592 = "fueling_592"
    ANDREWS_21 = "andrews_21"
    ANDREWS_26 = "andrews_26"
    ANDREWS_37 = "andrews_37"
    ANDREWS_48 = "andrews_48"
    SE_204 = "se_204"
    SE_211 = "se_211"
    SE_255 = "se_255"
    SE8_462 = "se8_462"
    SE8_517 = "se8_517"
    SE8_550 = "se8_550"
    OTHER = "other"


class TuningObjective(StrEnum):
    """What a tuning session set out to do."""

    VE_OPTIMIZATION = "ve_optimization"
    CYLINDER_BALANCE = "cylinder_balance"
    DECEL_FIX = "decel_fix"
    TIMING_OPTIMIZATION = "timing_optimization"
    HEAT_SOAK_COMPENSATION = "heat_soak_compensation"
    FULL_TUNE = "full_tune"


class CorrectionMethod(StrEnum):
    """Power correction standard (docs/tuning.md, Power correction)."""

    SAE_J1349 = "sae_j1349"
    STD = "std"  # SAE J607
    DIN_70020 = "din_70020"


OverlapCategory = Literal["low", "moderate", "high"]

#: Cam overlap category thresholds in degrees, applied to the larger of front/rear
#: overlap: ``low`` below 15, ``moderate`` from 15 to 30 inclusive, ``high`` above 30.
OVERLAP_LOW_BELOW_DEG = 15.0
OVERLAP_HIGH_ABOVE_DEG = 30.0

PATTERN_KINDS: tuple[str, ...] = (
    "ve_scaling",
    "cylinder_imbalance",
    "decel_popping",
    "heat_soak",
    "knock_timing",
)


def overlap_category(overlap_deg: float | None) -> OverlapCategory | None:
    """Return the overlap category of an overlap in degrees (None when unknown)."""
    if overlap_deg is None:
        return None
    if overlap_deg < OVERLAP_LOW_BELOW_DEG:
        return "low"
    if overlap_deg <= OVERLAP_HIGH_ABOVE_DEG:
        return "moderate"
    return "high"

"""The user's data model: the seed's build, session, pattern and dataset structures.

Every structure of the user's seed design lives in this package as a pydantic 2 model
with the seed's field names (BuildConfiguration, TuningSession, the five pattern kinds,
TrainingDataset), plus the docs/contract.md extras a live run carries (``run``, ``grid``,
``patterns``). Values are validated to physically sensible ranges and errors name the
field. A value without data is None, never 0; NaN given for an optional number becomes
None and NaN is never serialised. Models reject unknown keys (a typo in a build file is
an error, not silently dropped) and computed fields that appear in their own JSON output
(``overlap_category``, ``power_correction_factor``, the dataset ``summary``) are accepted
back and recomputed, so ``model_validate_json(model_dump_json())`` restores equal objects.
Grids and tables are indexed ``[rpm_index][map_index]``.

One module per concern: ``_base`` (value types, common config, :func:`format_errors`),
``enums``, ``physics`` (power correction), ``build``, ``grid``, ``patterns``, ``session``,
``dataset``. The schema imports nothing of the project but :mod:`dynoai_daemon.errors`;
the files it is stored in are the store's business.
"""

from dynoai_daemon.models._base import format_errors
from dynoai_daemon.models.build import (
    BuildConfiguration,
    CamSpecification,
    DynoSessionMetadata,
    EnvironmentalConditions,
    build_id,
)
from dynoai_daemon.models.dataset import TrainingDataset
from dynoai_daemon.models.enums import (
    OVERLAP_HIGH_ABOVE_DEG,
    OVERLAP_LOW_BELOW_DEG,
    PATTERN_KINDS,
    CamProfile,
    CorrectionMethod,
    EngineFamily,
    StageLevel,
    TuningObjective,
    overlap_category,
)
from dynoai_daemon.models.grid import CylinderGrid, RunInfo, SessionGrid
from dynoai_daemon.models.patterns import (
    AnyPattern,
    CylinderImbalancePattern,
    DecelPoppingPattern,
    HeatSoakPattern,
    KnockTimingPattern,
    SessionPatterns,
    VEScalingPattern,
)
from dynoai_daemon.models.physics import (
    HPA_PER_INHG,
    correction_factor,
    f_to_c,
    inhg_to_hpa,
    vapor_pressure_hpa,
)
from dynoai_daemon.models.session import SESSION_ID_PATTERN, TuningSession

__all__ = [
    "HPA_PER_INHG",
    "OVERLAP_HIGH_ABOVE_DEG",
    "OVERLAP_LOW_BELOW_DEG",
    "PATTERN_KINDS",
    "SESSION_ID_PATTERN",
    "AnyPattern",
    "BuildConfiguration",
    "CamProfile",
    "CamSpecification",
    "CorrectionMethod",
    "CylinderGrid",
    "CylinderImbalancePattern",
    "DecelPoppingPattern",
    "DynoSessionMetadata",
    "EngineFamily",
    "EnvironmentalConditions",
    "HeatSoakPattern",
    "KnockTimingPattern",
    "RunInfo",
    "SessionGrid",
    "SessionPatterns",
    "StageLevel",
    "TrainingDataset",
    "TuningObjective",
    "TuningSession",
    "VEScalingPattern",
    "build_id",
    "correction_factor",
    "f_to_c",
    "format_errors",
    "inhg_to_hpa",
    "overlap_category",
    "vapor_pressure_hpa",
]

"""Where a session came from and its cells: RunInfo, CylinderGrid, SessionGrid (docs/contract.md).

A session's grid holds both cylinders' cell results on one RPM x MAP axis pair, indexed
``[rpm_index][map_index]``, with the sufficient statistics that let runs be pooled exactly.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, model_validator

from dynoai_daemon.models._base import (
    Afr,
    NonNeg,
    OptFloat,
    Percent,
    _increasing,
    _Model,
    _NanNone,
    _rectangular,
    _shape,
)


class RunInfo(_Model):
    """Where a session came from: one run of one station (docs/contract.md)."""

    run_id: str = Field(min_length=1)
    station: str = Field(min_length=1)
    start_s: float
    end_s: float
    samples: int = Field(ge=0)

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.end_s < self.start_s:
            raise ValueError("end_s must not be before start_s")
        return self


class CylinderGrid(_Model):
    """One cylinder's cell results, ``[rpm_index][map_index]`` (docs/contract.md)."""

    weight: list[list[Annotated[float, Field(ge=0.0)]]]
    afr_mean: list[list[Afr]]
    afr_target_mean: list[list[Afr]]
    ve_correction_pct: list[list[Percent]]
    afr_std: list[list[NonNeg]]
    knock_count: list[list[Annotated[int, Field(ge=0)]]]
    knock_max_deg: list[list[Annotated[float, Field(ge=0.0, le=90.0)]]]
    #: sufficient statistics of afr/target per cell, so runs can be pooled exactly
    #: (docs/tuning.md "Tuning sessions"): weighted mean, weighted std (population form,
    #: sqrt(sum w (x - m)^2 / sum w)) and the sum of squared weights
    ratio_mean: list[list[OptFloat]] | None = None
    ratio_std: list[list[NonNeg]] | None = None
    weight_sq: list[list[Annotated[float, Field(ge=0.0)]]] | None = None
    #: 95 % half-width (pp) of the cell's mean ratio, where it has one
    ve_correction_ci_pct: list[list[NonNeg]] | None = None
    #: the suggestion hit +/- max_correction_pct
    clamped: list[list[bool]] | None = None
    #: suggested new VE (current VE x ratio) where the ECU's VE was logged; may exceed the
    #: 0..200 of a table because it is a suggestion, so only 0..300 is enforced
    new_ve: (
        list[list[Annotated[Annotated[float, Field(ge=0.0, le=300.0)] | None, _NanNone]]] | None
    ) = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rpm cells, map cells)."""
        return _shape(self.weight)

    @model_validator(mode="after")
    def _same_shape(self) -> Self:
        _rectangular("weight", self.weight)
        shape = self.shape
        for name in (
            "afr_mean",
            "afr_target_mean",
            "ve_correction_pct",
            "afr_std",
            "knock_count",
            "knock_max_deg",
            "new_ve",
            "ratio_mean",
            "ratio_std",
            "weight_sq",
            "ve_correction_ci_pct",
            "clamped",
        ):
            rows = getattr(self, name)
            if rows is None:
                continue
            _rectangular(name, rows)
            if _shape(rows) != shape:
                raise ValueError(f"{name}: shape {_shape(rows)} differs from weight {shape}")
        return self


class SessionGrid(_Model):
    """The run's RPM x MAP grid with both cylinders' cells (docs/contract.md)."""

    rpm_axis: list[Annotated[float, Field(gt=0.0, le=20_000.0)]]
    map_axis: list[Annotated[float, Field(gt=0.0, le=400.0)]]
    front: CylinderGrid
    rear: CylinderGrid

    @model_validator(mode="after")
    def _axes(self) -> Self:
        _increasing("rpm_axis", self.rpm_axis)
        _increasing("map_axis", self.map_axis)
        want = (len(self.rpm_axis), len(self.map_axis))
        for cyl in ("front", "rear"):
            got = getattr(self, cyl).shape
            if got != want:
                raise ValueError(f"{cyl}: grid shape {got} does not match the axes {want}")
        return self

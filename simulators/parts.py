"""Parts -> true VE: the engine physics the fleet and ``[ecu]``-less scenarios use.

A build's parts (family, displacement, stage, cam durations/lift/LSA and the overlap per
cylinder, throttle body, exhaust layout, header length difference, compression) decide
its TRUE volumetric efficiency per cylinder over the RPM x MAP grid; the family's STOCK
build (stock cam, displacement and exhaust) decides the stock map the ECU ships with.
Their ratio is the correction a tuner finds on the dyno, so the corrections are a
function of the build and can be learned from it. The physics, each term a plain
documented formula (see ``docs/models.md``):

* peak VE: the family's head/valve-train base, plus the stage's intake/exhaust gain,
  plus lift, throttle-body size and exhaust layout (a 2-into-1 collector scavenges best);
* cam timing moves the torque peak: the intake closing angle (IVC, from intake duration
  and centreline) raises the VE peak's rpm, displacement lowers it (the same cam is
  "smaller" on a bigger engine); overlap widens the curve;
* overlap and reversion: at low rpm and low MAP the exhaust pushes back into the intake
  during overlap, the loss growing with overlap and manifold vacuum;
* exhaust: each cylinder's header has a tuned (resonant) rpm that falls as the header
  gets longer, so a rear header longer than the front moves the rear's bump down and
  leaves a front/rear difference around it; true duals with big overlap pull the rear's
  charge down at mid rpm / part load (no collector couples the pulses); 2-into-1 adds a
  midrange scavenging bump to both;
* the rear cylinder runs hotter: slightly less VE and an earlier knock limit;
* knock: the dynamic (effective) compression falls as IVC gets later; the ECU's spark
  is the family's stock spark for the stock engine on 91 octane;
* heat: each family's stock ECU corrects a fixed share of the intake-air density change
  (its IAT compensation), so a heat soak inflates VE by a family-specific amount.

Everything here is deterministic and vectorised over numpy grids; no randomness (the
fleet draws the parts, :mod:`simulators.fleet`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

STAGE_VE_GAIN = {"stock": 0.0, "stage_1": 3.0, "stage_2": 6.0, "stage_3": 9.0, "stage_4": 12.0}
EXHAUST_VE_GAIN = {"2-into-1": 2.0, "2-into-2": 0.0, "true_dual": 0.5}
#: Allowance between overlap at the lobes' seating points and the (duration - 2 LSA) of
#: the usual @0.053" durations.
OVERLAP_SEAT_ALLOWANCE_DEG = 12.0
#: Intake centreline = LSA - this (cams are usually ground a few degrees advanced).
CAM_ADVANCE_DEG = 4.0


@dataclass(frozen=True, slots=True)
class FamilyStock:
    """The stock engine of a family (what its ECU's stock map was calibrated for)."""

    displacement_ci: float
    compression_ratio: float
    intake_duration_deg: float
    exhaust_duration_deg: float
    lobe_separation_angle_deg: float
    lift_in: float
    throttle_body_mm: float
    exhaust_type: str
    base_ve: float
    iat_compensation: float


FAMILIES: dict[str, FamilyStock] = {
    "twin_cam": FamilyStock(96, 9.2, 210, 216, 108, 0.47, 46, "2-into-2", 80.0, 0.55),
    "milwaukee_8": FamilyStock(107, 10.0, 216, 222, 110, 0.50, 55, "2-into-1", 85.0, 0.8),
    "evolution": FamilyStock(80, 8.5, 206, 212, 108, 0.45, 44, "2-into-2", 76.0, 0.5),
    "sportster": FamilyStock(73, 9.7, 208, 214, 106, 0.46, 45, "2-into-2", 78.0, 0.65),
    "revolution_max": FamilyStock(76, 13.0, 230, 230, 112, 0.40, 58, "2-into-1", 92.0, 0.9),
    "other": FamilyStock(100, 9.5, 212, 218, 108, 0.48, 50, "2-into-2", 80.0, 0.7),
}


class CamLike(Protocol):
    """What the physics reads of a cam (scenario CamSpec or the seed's CamSpecification)."""

    @property
    def intake_duration_deg(self) -> float: ...
    @property
    def exhaust_duration_deg(self) -> float: ...
    @property
    def intake_lift_in(self) -> float: ...
    @property
    def exhaust_lift_in(self) -> float: ...
    @property
    def lobe_separation_angle_deg(self) -> float: ...
    @property
    def overlap_deg_front(self) -> float: ...
    @property
    def overlap_deg_rear(self) -> float: ...


class BuildLike(Protocol):
    """What the physics reads of a build (the scenario's BuildSpec)."""

    @property
    def engine_family(self) -> str: ...
    @property
    def displacement_ci(self) -> float: ...
    @property
    def compression_ratio(self) -> float: ...
    @property
    def stage(self) -> str: ...
    @property
    def cam_spec(self) -> CamLike: ...
    @property
    def throttle_body_mm(self) -> float: ...
    @property
    def exhaust_type(self) -> str: ...
    @property
    def header_length_delta_in(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Parts:
    """The numbers the physics uses, from a build or a family's stock engine."""

    family: str
    displacement_ci: float
    compression_ratio: float
    stage: str
    intake_duration_deg: float
    lsa_deg: float
    lift_in: float
    overlap_front: float
    overlap_rear: float
    throttle_body_mm: float
    exhaust_type: str
    header_delta_in: float

    @property
    def ivc_deg(self) -> float:
        """Intake valve closing, degrees after BDC (later = torque peak higher up)."""
        return self.lsa_deg - CAM_ADVANCE_DEG + self.intake_duration_deg / 2.0 - 180.0

    @property
    def effective_cr(self) -> float:
        """Dynamic compression proxy: a later intake closing bleeds off cylinder pressure."""
        return self.compression_ratio - 0.05 * (self.ivc_deg - 30.0)


def cam_overlap(intake_deg: float, exhaust_deg: float, lsa_deg: float) -> float:
    """Overlap (deg) of a cam from its durations and lobe separation angle."""
    return (intake_deg + exhaust_deg) / 2.0 - 2.0 * lsa_deg + OVERLAP_SEAT_ALLOWANCE_DEG


def family_stock(family: str) -> FamilyStock:
    """The stock engine of ``family`` (``other`` for an unknown one)."""
    return FAMILIES.get(family, FAMILIES["other"])


def stock_parts(family: str) -> Parts:
    """The family's stock engine as :class:`Parts`."""
    s = family_stock(family)
    ov = cam_overlap(s.intake_duration_deg, s.exhaust_duration_deg, s.lobe_separation_angle_deg)
    return Parts(
        family=family,
        displacement_ci=s.displacement_ci,
        compression_ratio=s.compression_ratio,
        stage="stock",
        intake_duration_deg=s.intake_duration_deg,
        lsa_deg=s.lobe_separation_angle_deg,
        lift_in=s.lift_in,
        overlap_front=ov,
        overlap_rear=ov,
        throttle_body_mm=s.throttle_body_mm,
        exhaust_type=s.exhaust_type,
        header_delta_in=0.0,
    )


def build_parts(build: BuildLike) -> Parts:
    """The physics' view of a build."""
    c = build.cam_spec
    return Parts(
        family=build.engine_family,
        displacement_ci=build.displacement_ci,
        compression_ratio=build.compression_ratio,
        stage=build.stage,
        intake_duration_deg=c.intake_duration_deg,
        lsa_deg=c.lobe_separation_angle_deg,
        lift_in=0.5 * (c.intake_lift_in + c.exhaust_lift_in),
        overlap_front=c.overlap_deg_front,
        overlap_rear=c.overlap_deg_rear,
        throttle_body_mm=build.throttle_body_mm,
        exhaust_type=build.exhaust_type,
        header_delta_in=build.header_length_delta_in,
    )


def _gauss(x: FloatArray, centre: float, width: float) -> FloatArray:
    out: FloatArray = np.exp(-(((x - centre) / width) ** 2))
    return out


def cylinder_ve(p: Parts, rpm: FloatArray, kpa: FloatArray, cylinder: str) -> FloatArray:
    """True VE (%) of one cylinder (``"front"`` or ``"rear"``) over (rpm, kpa) arrays."""
    fam = family_stock(p.family)
    overlap = p.overlap_front if cylinder == "front" else p.overlap_rear
    # Peak VE: heads/valves, stage, lift, throttle body and exhaust layout.
    peak = (
        fam.base_ve
        + STAGE_VE_GAIN.get(p.stage, 0.0)
        + 12.0 * (p.lift_in - 0.5)
        + 0.12 * (p.throttle_body_mm - fam.throttle_body_mm)
        + EXHAUST_VE_GAIN.get(p.exhaust_type, 0.0)
        + 0.08 * overlap
    )
    # Cam timing moves the torque peak; displacement pulls it down; overlap widens it.
    peak_rpm = float(
        np.clip(3300.0 + 70.0 * (p.ivc_deg - 30.0) - 10.0 * (p.displacement_ci - 100.0), 2400, 5800)
    )
    width = 3300.0 + 12.0 * overlap
    r = (rpm - peak_rpm) / width
    rpm_f = np.maximum(0.55, 1.0 - 0.45 * r * r)
    # Reversion: overlap at low rpm and high manifold vacuum.
    m = np.clip(kpa / 100.0, 0.15, 1.1)
    low_rpm = 1.3 - 0.3 * np.minimum(rpm / 4000.0, 1.0)
    revert = (0.16 + 0.006 * max(overlap, 0.0)) * np.maximum(0.0, 1.0 - m) ** 1.5 * low_rpm
    ve = peak * rpm_f * (1.0 - revert)
    # Header resonance: a longer primary tunes lower (rear = front + header delta).
    length = 0.0 if cylinder == "front" else p.header_delta_in
    h_amp = 0.01 if p.exhaust_type == "2-into-1" else 0.025
    ve = ve * (1.0 + h_amp * _gauss(rpm, 4200.0 - 90.0 * length, 700.0) * np.clip(m, 0.3, 1.0))
    # Collector scavenging of a 2-into-1 in the midrange at load.
    if p.exhaust_type == "2-into-1":
        ve = ve * (1.0 + 0.03 * _gauss(rpm, 3500.0, 900.0) * np.clip((m - 0.5) * 2.0, 0.0, 1.0))
    # True duals with much overlap: the rear's charge pulled down at mid rpm / part load.
    if p.exhaust_type == "true_dual" and cylinder == "rear":
        excess = max(0.0, overlap - 15.0)
        bump = _gauss(rpm, 3000.0, 700.0) * _gauss(kpa, 70.0, 13.0)
        ve = ve * (1.0 - 0.003 * excess * bump)
    # The rear runs hotter: a little less charge.
    if cylinder == "rear":
        ve = ve * 0.99
    out: FloatArray = ve
    return out


def ve_tables(p: Parts, rpm: FloatArray, kpa: FloatArray) -> tuple[FloatArray, FloatArray]:
    """True VE (%) of the front and rear cylinder of ``p`` over (rpm, kpa) grids."""
    return cylinder_ve(p, rpm, kpa, "front"), cylinder_ve(p, rpm, kpa, "rear")


def stock_ve_tables(family: str, rpm: FloatArray, kpa: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The family's stock VE map (front, rear), rounded to 0.1 as an ECU stores it."""
    f, r = ve_tables(stock_parts(family), rpm, kpa)
    return np.round(f, 1), np.round(r, 1)

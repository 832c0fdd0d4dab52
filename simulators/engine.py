"""The simulated V-twin: true and ECU tables, fuelling, torque, knock limit and heat.

Everything here is the engine's physics as a plain, deterministic model built from a
:class:`~simulators.scenario.Scenario`. Tables live on the grid axes of
``dynoai_daemon.config`` (bilinear between breakpoints, clamped at the edges): the TRUE
VE per cylinder (shaped by cam overlap, stage and exhaust: overlap raises and moves the
peak and hurts low-MAP reversion; high overlap on true duals pulls the rear down in a
scavenging region), the ECU's VE per cylinder (a shared base map times a smooth random
error field plus scenario biases), the AFR target, MBT and the ECU's spark, and the
knock-limited spark per cylinder. The ECU fuels as if its VE were right, so the actual
AFR of a cylinder is ``target * VE_true / VE_ecu`` times the heat-soak factor of an IAT
compensation that under-corrects. With ``ve_model = "parts"`` (a scenario without
``[ecu]``) the true VE and the compression the knock limit sees come from the build's
parts (:mod:`simulators.parts`) and the ECU runs the family's stock VE map and stock
spark. Scalar helpers are written for the physics loop in
:mod:`simulators.dyno`; vectorised ones for the sensor stage.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dynoai_daemon.config import DEFAULT_MAP_AXIS, DEFAULT_RPM_AXIS
from simulators import parts
from simulators.scenario import EcuTable, Scenario

FloatArray = npt.NDArray[np.float64]

RANKINE = 459.67
NM_PER_FTLB = 1.3558179
#: Indicated torque per cubic inch at 100 % VE, 100 kPa, best AFR and MBT spark.
K_INDICATED = 1.32
#: IAT and head temperature the ECU's spark table was calibrated at.
DESIGN_IAT_F = 100.0
DESIGN_HEAD_F = 300.0
REAR_HEAD_OFFSET_F = 25.0
REAR_KNOCK_OFFSET_DEG = 1.5
STAGE_VE_GAIN = {"stock": 0.0, "stage_1": 4.0, "stage_2": 9.0, "stage_3": 14.0, "stage_4": 18.0}

# Mode codes of the physics trace (what the dyno operator is doing).
MODE_IDLE, MODE_HOLD, MODE_PULL, MODE_DECEL, MODE_SOAK, MODE_APPROACH = range(6)


# ---------------------------------------------------------------------------- lookups


def interp2(
    table: FloatArray, rpm_axis: FloatArray, map_axis: FloatArray, rpm: FloatArray, kpa: FloatArray
) -> FloatArray:
    """Bilinear lookup of ``table[rpm_i][map_j]`` at many points, clamped at the edges."""
    x = np.clip(np.asarray(rpm, dtype=np.float64), rpm_axis[0], rpm_axis[-1])
    y = np.clip(np.asarray(kpa, dtype=np.float64), map_axis[0], map_axis[-1])
    i = np.clip(np.searchsorted(rpm_axis, x, side="right") - 1, 0, rpm_axis.size - 2)
    j = np.clip(np.searchsorted(map_axis, y, side="right") - 1, 0, map_axis.size - 2)
    fx = (x - rpm_axis[i]) / (rpm_axis[i + 1] - rpm_axis[i])
    fy = (y - map_axis[j]) / (map_axis[j + 1] - map_axis[j])
    out: FloatArray = (
        table[i, j] * (1 - fx) * (1 - fy)
        + table[i + 1, j] * fx * (1 - fy)
        + table[i, j + 1] * (1 - fx) * fy
        + table[i + 1, j + 1] * fx * fy
    )
    return out


def resample(table: EcuTable, rpm_axis: FloatArray, map_axis: FloatArray) -> FloatArray:
    """A loaded ECU table on the engine grid: bilinear at each grid breakpoint, clamped at
    the table's edges (exact when the table is on the grid's own axes)."""
    ra = np.asarray(table.rpm_axis, dtype=np.float64)
    ma = np.asarray(table.map_axis, dtype=np.float64)
    vals = np.asarray(table.values, dtype=np.float64)
    # Repeated breakpoints (padded Delphi axes) carry no information: keep the first.
    keep_r = np.concatenate(([True], np.diff(ra) > 1e-9))
    keep_m = np.concatenate(([True], np.diff(ma) > 1e-9))
    ra, ma, vals = ra[keep_r], ma[keep_m], vals[np.ix_(keep_r, keep_m)]
    if ra.size == 1:
        ra, vals = np.array([ra[0], ra[0] + 1.0]), np.vstack([vals, vals])
    if ma.size == 1:
        ma, vals = np.array([ma[0], ma[0] + 1.0]), np.hstack([vals, vals])
    rpm, kpa = np.meshgrid(rpm_axis, map_axis, indexing="ij")
    return interp2(vals, ra, ma, rpm, kpa)


class ScalarLookup:
    """Fast scalar bilinear lookups for the physics loop (plain floats, no numpy)."""

    def __init__(self, rpm_axis: FloatArray, map_axis: FloatArray) -> None:
        self.ra = [float(v) for v in rpm_axis]
        self.ma = [float(v) for v in map_axis]
        self.nr = len(self.ra)
        self.nm = len(self.ma)

    def locate(self, rpm: float, kpa: float) -> tuple[int, int, float, float]:
        """Return (i, j, fx, fy) of the cell containing (rpm, kpa), clamped."""
        ra, ma = self.ra, self.ma
        x = ra[0] if rpm < ra[0] else (ra[-1] if rpm > ra[-1] else rpm)
        y = ma[0] if kpa < ma[0] else (ma[-1] if kpa > ma[-1] else kpa)
        i = bisect_right(ra, x) - 1
        i = 0 if i < 0 else (self.nr - 2 if i > self.nr - 2 else i)
        j = bisect_right(ma, y) - 1
        j = 0 if j < 0 else (self.nm - 2 if j > self.nm - 2 else j)
        return i, j, (x - ra[i]) / (ra[i + 1] - ra[i]), (y - ma[j]) / (ma[j + 1] - ma[j])

    @staticmethod
    def at(table: list[list[float]], loc: tuple[int, int, float, float]) -> float:
        """Interpolate a nested-list table at a located point."""
        i, j, fx, fy = loc
        r0, r1 = table[i], table[i + 1]
        return (r0[j] * (1 - fx) + r1[j] * fx) * (1 - fy) + (
            r0[j + 1] * (1 - fx) + r1[j + 1] * fx
        ) * fy


# ---------------------------------------------------------------------- shape functions


def ve_shape(rpm: FloatArray, kpa: FloatArray, *, overlap: float, stage_gain: float) -> FloatArray:
    """Volumetric efficiency (%) of one cylinder with ``overlap`` degrees of cam overlap.

    More overlap raises the peak and moves it up the rev range, and costs more at low
    MAP and low rpm, where exhaust reverts into the intake.
    """
    peak_rpm = min(5200.0, max(3000.0, 2900.0 + 38.0 * overlap))
    peak = 78.0 + stage_gain + 0.22 * overlap
    width = 3300.0 + 15.0 * overlap
    r = (rpm - peak_rpm) / width
    rpm_f = np.maximum(0.55, 1.0 - 0.45 * r * r)
    m = np.clip(kpa / 100.0, 0.15, 1.1)
    low_rpm = 1.3 - 0.3 * np.minimum(rpm / 4000.0, 1.0)
    revert = (0.2 + 0.006 * overlap) * np.maximum(0.0, 1.0 - m) ** 1.5 * low_rpm
    out: FloatArray = peak * rpm_f * (1.0 - revert)
    return out


def soft_box(x: FloatArray, lo: float, hi: float, soft: float) -> FloatArray:
    """1 inside [lo, hi], falling smoothly to 0 outside over about ``soft`` units."""
    a = np.clip((x - lo) / soft, -50, 50)
    b = np.clip((hi - x) / soft, -50, 50)
    out: FloatArray = 1.0 / (1.0 + np.exp(-a)) / (1.0 + np.exp(-b))
    return out


def afr_torque_factor(afr: float) -> float:
    """Relative torque at an AFR: best near 12.8, falling faster on the lean side."""
    d = afr - 12.8
    f = 1.0 - (0.012 if d < 0 else 0.022) * d * d
    return 0.4 if f < 0.4 else f


def spark_torque_factor(deficit_deg: float) -> float:
    """Relative torque when spark is ``deficit_deg`` behind MBT (negative: past MBT)."""
    f = 1.0 - (0.0025 if deficit_deg >= 0 else 0.004) * deficit_deg * deficit_deg
    return 0.5 if f < 0.5 else f


def target_afr(kpa: FloatArray, table: tuple[tuple[float, float], ...]) -> FloatArray:
    """The AFR target by MAP, linear between the table's points, flat beyond."""
    xs = np.array([p[0] for p in table], dtype=np.float64)
    ys = np.array([p[1] for p in table], dtype=np.float64)
    out: FloatArray = np.interp(kpa, xs, ys)
    return out


def _smooth_field(
    rng: np.random.Generator, u: FloatArray, v: FloatArray, amplitude: float
) -> FloatArray:
    """A smooth random field over normalised (u, v) whose largest |value| is amplitude."""
    if amplitude <= 0:
        return np.zeros_like(u)
    f = np.zeros_like(u)
    for _ in range(4):
        p, q = rng.uniform(0.4, 1.8, size=2)
        ph = rng.uniform(0, 2 * math.pi)
        a = rng.uniform(0.4, 1.0) * rng.choice([-1.0, 1.0])
        f += a * np.cos(math.pi * (p * u + q * v * rng.choice([-1.0, 1.0])) + ph)
    peak = float(np.max(np.abs(f)))
    scaled: FloatArray = f / peak * amplitude if peak > 0 else f
    return scaled


# ------------------------------------------------------------------------------ engine


@dataclass
class EngineTables:
    """All tables, indexed ``[rpm_i][map_j]`` on ``rpm_axis`` x ``map_axis``."""

    rpm_axis: FloatArray
    map_axis: FloatArray
    ve_true_front: FloatArray
    ve_true_rear: FloatArray
    ve_ecu_front: FloatArray
    ve_ecu_rear: FloatArray
    afr_target: FloatArray
    mbt: FloatArray
    spark: FloatArray
    kls_front: FloatArray
    kls_rear: FloatArray
    torque_indicated: FloatArray

    @property
    def ratio_front(self) -> FloatArray:
        """True VE / ECU VE of the front cylinder (the perfect correction)."""
        out: FloatArray = self.ve_true_front / self.ve_ecu_front
        return out

    @property
    def ratio_rear(self) -> FloatArray:
        """True VE / ECU VE of the rear cylinder."""
        out: FloatArray = self.ve_true_rear / self.ve_ecu_rear
        return out


class EngineModel:
    """The engine of one scenario: tables plus the scalar physics the loop calls.

    Args:
        scenario: the validated scenario.
        rng: the generator for the ECU's random error field (consumed at construction).
    """

    def __init__(self, scenario: Scenario, rng: np.random.Generator) -> None:
        self.scenario = scenario
        b = scenario.build
        self.disp = b.displacement_ci
        self.baro_kpa = scenario.conditions.baro_kpa
        self.ambient_f = scenario.conditions.ambient_temp_f
        self.iat_ref_f = (
            scenario.conditions.iat_start_f
            if scenario.conditions.iat_start_f is not None
            else self.ambient_f + 5.0
        )
        self.overlap_front = b.cam_spec.overlap_deg_front
        self.overlap_rear = b.cam_spec.overlap_deg_rear
        self.overlap_mean = 0.5 * (self.overlap_front + self.overlap_rear)
        # A V-twin's single cam gives the cylinders different overlap, but each port and
        # head flows its own way too; only part of the overlap difference shows in VE.
        self.overlap_eff_front = self.overlap_mean + 0.35 * (self.overlap_front - self.overlap_mean)
        self.overlap_eff_rear = self.overlap_mean + 0.35 * (self.overlap_rear - self.overlap_mean)
        self.idle_rpm = b.cam_spec.idle_rpm_target
        # Big cams idle with less vacuum.
        self.idle_map_kpa = 32.0 + 0.25 * self.overlap_mean
        self.iat_comp = scenario.ecu.iat_compensation
        self.tables = self._build_tables(rng)
        self.lookup = ScalarLookup(self.tables.rpm_axis, self.tables.map_axis)
        t = self.tables
        self.l_torque = t.torque_indicated.tolist()
        self.l_spark = t.spark.tolist()
        self.l_mbt = t.mbt.tolist()
        self.l_kls_front = t.kls_front.tolist()
        self.l_kls_rear = t.kls_rear.tolist()

    # -- tables ---------------------------------------------------------------------

    def _build_tables(self, rng: np.random.Generator) -> EngineTables:
        sc = self.scenario
        b, ecu = sc.build, sc.ecu
        ra = np.array(DEFAULT_RPM_AXIS, dtype=np.float64)
        ma = np.array(DEFAULT_MAP_AXIS, dtype=np.float64)
        rpm, kpa = np.meshgrid(ra, ma, indexing="ij")
        gain = STAGE_VE_GAIN[b.stage]
        base = ve_shape(rpm, kpa, overlap=self.overlap_mean, stage_gain=gain)
        ve_f = ve_shape(rpm, kpa, overlap=self.overlap_eff_front, stage_gain=gain)
        ve_r = ve_shape(rpm, kpa, overlap=self.overlap_eff_rear, stage_gain=gain)
        # Exhaust scavenging: with much overlap the pulses of a true-dual system pull the
        # rear's charge down around mid rpm / part load; a 2-into-1 collector couples the
        # cylinders and keeps most of the effect away.
        excess = max(0.0, self.overlap_mean - 15.0)
        coupling = 1.0 if b.exhaust_type == "true_dual" else 0.35
        amp = (0.0025 * excess + 0.002 * abs(b.header_length_delta_in)) * coupling
        bump = np.exp(-(((rpm - 3000.0) / 700.0) ** 2) - ((kpa - 70.0) / 13.0) ** 2)
        ve_r = ve_r * (1.0 - amp * bump)
        ve_f = ve_f * (1.0 + 0.3 * amp * bump)
        # ECU tables: the shared base map with a smooth error field (mostly shared by both
        # cylinders, a little each), plus scenario biases, clipped to +/-12 %.
        u = (rpm - ra[0]) / (ra[-1] - ra[0])
        v = (kpa - ma[0]) / (ma[-1] - ma[0])
        shared = _smooth_field(rng, u, v, ecu.error_pct)
        err_f = shared + _smooth_field(rng, u, v, ecu.cylinder_error_pct) + ecu.bias_front_pct
        err_r = shared + _smooth_field(rng, u, v, ecu.cylinder_error_pct) + ecu.bias_rear_pct
        for rb in ecu.region_bias:
            w = soft_box(rpm, rb.rpm[0], rb.rpm[1], 120.0) * soft_box(
                kpa, rb.map_kpa[0], rb.map_kpa[1], 2.5
            )
            err_f = err_f + rb.front_pct * w
            err_r = err_r + rb.rear_pct * w
        base_f = base_r = base
        cr_true = cr_ecu = b.compression_ratio
        octane_ecu = b.octane_requirement
        if sc.ve_model == "parts":
            # True VE from the parts, the ECU on the family's stock map and stock spark.
            p, stock = parts.build_parts(b), parts.stock_parts(b.engine_family)
            ve_f, ve_r = parts.ve_tables(p, rpm, kpa)
            base_f, base_r = parts.stock_ve_tables(b.engine_family, rpm, kpa)
            cr_true, cr_ecu, octane_ecu = p.effective_cr, stock.effective_cr, 91.0
        ve_ecu_f = np.round(base_f * (1.0 + np.clip(err_f, -12, 12) / 100.0), 1)
        ve_ecu_r = np.round(base_r * (1.0 + np.clip(err_r, -12, 12) / 100.0), 1)
        # A loaded tune replaces the generated ECU tables (the error field above is still
        # drawn, so the rest of the scenario stays the same for the same seed).
        if ecu.ve_table_front is not None:
            ve_ecu_f = resample(ecu.ve_table_front, ra, ma)
        if ecu.ve_table_rear is not None:
            ve_ecu_r = resample(ecu.ve_table_rear, ra, ma)
        target = np.broadcast_to(target_afr(ma, ecu.target_table), rpm.shape).copy()
        # Spark: MBT falls with load; the knock-limited spark falls with load, lower
        # octane, higher compression, hotter air and hotter heads, and rises with rpm.
        m = np.clip((kpa - 20.0) / 85.0, 0.0, 1.0)
        mbt = (
            25.0
            + 17.0 * (1.0 - m)
            + 5.0 * np.minimum(rpm, 4000.0) / 4000.0
            - 1.0 * (b.compression_ratio - 10.0)
        )
        kls_req = self.knock_limit_base(rpm, m, octane_ecu, cr=cr_ecu)
        spark = np.minimum(mbt, kls_req - ecu.spark_margin_deg)
        # Idle and just off idle run retarded for stability.
        spark = np.minimum(spark, 12.0 + 10.0 * np.clip((rpm - 750.0) / 750.0, 0.0, 3.0))
        spark = np.round(spark, 1).astype(np.float64)
        if ecu.spark_table is not None:
            spark = resample(ecu.spark_table, ra, ma)
        kls = self.knock_limit_base(rpm, m, sc.fuel_octane, cr=cr_true)
        kls_f = kls
        kls_r = kls - REAR_KNOCK_OFFSET_DEG - 0.03 * REAR_HEAD_OFFSET_F
        # Indicated torque of both cylinders at the ECU's fuelling and spark, with the
        # intake air at its reference temperature (the loop applies density and knock).
        afr_f = target * ve_f / ve_ecu_f
        afr_r = target * ve_r / ve_ecu_r
        f_afr = np.vectorize(afr_torque_factor)
        g_spk = np.vectorize(spark_torque_factor)(mbt - spark)
        tq = (
            0.5
            * K_INDICATED
            * self.disp
            * (kpa / 100.0)
            * g_spk
            * (ve_f / 100.0 * f_afr(afr_f) + ve_r / 100.0 * f_afr(afr_r))
        )
        return EngineTables(
            rpm_axis=ra,
            map_axis=ma,
            ve_true_front=ve_f,
            ve_true_rear=ve_r,
            ve_ecu_front=ve_ecu_f,
            ve_ecu_rear=ve_ecu_r,
            afr_target=target,
            mbt=mbt,
            spark=spark,
            kls_front=kls_f,
            kls_rear=kls_r,
            torque_indicated=tq,
        )

    def knock_limit_base(
        self, rpm: FloatArray, m: FloatArray, octane: float, cr: float | None = None
    ) -> FloatArray:
        """Knock-limited spark (deg) at design IAT and head temperature (``cr``: the
        compression to use, default the build's)."""
        cr = self.scenario.build.compression_ratio if cr is None else cr
        out: FloatArray = (
            72.0
            - 46.0 * m
            + 1.6 * (rpm - 3000.0) / 1000.0
            + 1.5 * (octane - 91.0)
            - 2.5 * (cr - 10.0)
        )
        return out

    # -- scalar physics used by the loop --------------------------------------------

    def wot_map(self, rpm: float) -> float:
        """Manifold pressure at wide-open throttle (a little intake restriction)."""
        return self.baro_kpa * (0.985 - 0.025 * rpm / 6000.0)

    def closed_map(self, rpm: float) -> float:
        """Manifold pressure with the throttle shut: idle vacuum, deeper with rpm."""
        v = self.idle_map_kpa * (self.idle_rpm / max(rpm, 300.0)) ** 0.7
        return 17.0 if v < 17.0 else (self.idle_map_kpa if v > self.idle_map_kpa else v)

    @staticmethod
    def _tau(rpm: float) -> float:
        return 10.0 + 6.0 * rpm / 1000.0

    def map_for_tps(self, tps: float, rpm: float) -> float:
        """Steady-state MAP for a throttle position at an rpm."""
        ct, wot, tau = self.closed_map(rpm), self.wot_map(rpm), self._tau(rpm)
        h = (1.0 - math.exp(-max(tps, 0.0) / tau)) / (1.0 - math.exp(-100.0 / tau))
        return ct + (wot - ct) * min(h, 1.0)

    def tps_for_map(self, kpa: float, rpm: float) -> float:
        """Throttle position that holds ``kpa`` at ``rpm`` (0..100)."""
        ct, wot, tau = self.closed_map(rpm), self.wot_map(rpm), self._tau(rpm)
        h = (kpa - ct) / (wot - ct)
        if h <= 0:
            return 0.0
        if h >= 1:
            return 100.0
        return min(100.0, -tau * math.log(1.0 - h * (1.0 - math.exp(-100.0 / tau))))

    def friction_ftlb(self, rpm: float, kpa: float) -> float:
        """Friction plus pumping loss torque at the crank."""
        return (
            self.disp * (0.045 + 0.02 * rpm / 6000.0)
            + 0.12 * self.disp * max(0.0, self.baro_kpa - kpa) / 100.0
        )

    def density_ratio(self, iat_f: float) -> float:
        """Air density relative to the reference (starting) IAT."""
        return (self.iat_ref_f + RANKINE) / (iat_f + RANKINE)

    def heat_afr_factor(self, iat_f: FloatArray) -> FloatArray:
        """AFR multiplier from an ECU IAT compensation that corrects only part of the
        density change: < 1 (rich) when the air is hotter than the reference."""
        ref = self.iat_ref_f
        out: FloatArray = (ref + self.iat_comp * (iat_f - ref) + RANKINE) / (iat_f + RANKINE)
        return out

    def thermal_equilibrium(
        self, rpm: float, kpa: float, fan_cfm: float, ect_f: float
    ) -> tuple[float, float, float, float]:
        """Equilibrium head and intake temperatures and their time constants (s).

        Returns:
            (ect_eq, ect_tau, iat_eq, iat_tau). The intake air picks up engine heat the
            more, the less the fan and the engine's own airflow carry it away; at idle
            with the fan down it soaks, at speed fresh air pulls it back down.
        """
        flow = min(1.0, (rpm / 6000.0) * (kpa / self.baro_kpa))
        fan = min(1.0, fan_cfm / 5000.0)
        amb = self.ambient_f
        ect_eq = amb + 120.0 + 140.0 * flow + 60.0 * (1.0 - fan)
        exposure = 1.0 / (1.0 + fan_cfm / 1500.0 + 6.0 * flow)
        iat_eq = amb + 0.6 * exposure * max(0.0, ect_f - amb)
        return ect_eq, 90.0, iat_eq, 60.0 / (1.0 + 4.0 * flow + fan_cfm / 2500.0)

    def pop_severity(self) -> float:
        """Decel-popping propensity 0..1 from overlap, exhaust type and PAIR valve."""
        b = self.scenario.build
        ov = min(1.0, max(0.02, (self.overlap_mean - 8.0) / 50.0))
        s = ov * (1.6 if b.exhaust_type == "true_dual" else 1.0)
        s *= 1.4 if b.pair_valve_present else 1.0
        return min(1.0, s)


@dataclass
class PhysicsTrace:
    """The engine and dyno state at every physics step (the ground truth timeline).

    ``afr_front`` / ``afr_rear`` are the actual exhaust AFRs at the valve (before any
    transport delay or sensor), ``afr_true_*`` the same without heat soak and pops.
    """

    t: FloatArray
    rpm: FloatArray
    map_kpa: FloatArray
    tps: FloatArray
    iat_f: FloatArray
    ect_f: FloatArray
    torque_ftlb: FloatArray
    knock_front: FloatArray
    knock_rear: FloatArray
    mode: npt.NDArray[np.int8]
    afr_front: FloatArray = field(default_factory=lambda: np.empty(0))
    afr_rear: FloatArray = field(default_factory=lambda: np.empty(0))
    afr_true_front: FloatArray = field(default_factory=lambda: np.empty(0))
    afr_true_rear: FloatArray = field(default_factory=lambda: np.empty(0))
    afr_target: FloatArray = field(default_factory=lambda: np.empty(0))

    def __len__(self) -> int:
        return int(self.t.shape[0])


@dataclass(frozen=True, slots=True)
class PopEvent:
    """One decel lean spike in one cylinder's exhaust."""

    t: float
    cylinder: str
    rpm: float
    peak_afr: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class DecelWindow:
    """A closed-throttle decel: trace indexes [start, stop)."""

    start: int
    stop: int


def decel_windows(tps: FloatArray, rpm: FloatArray) -> list[DecelWindow]:
    """Find decels as docs/tuning.md defines them: TPS falls to <= 3 % from >= 10 % with RPM
    >= 1500, lasting until TPS reopens above 3 % or RPM drops below 1200."""
    out: list[DecelWindow] = []
    n = int(tps.shape[0])
    armed = False
    i = 0
    tl = tps.tolist()
    rl = rpm.tolist()
    while i < n:
        if tl[i] >= 10.0:
            armed = True
        elif armed and tl[i] <= 3.0:
            armed = False
            if rl[i] >= 1500.0:
                j = i
                while j < n and tl[j] <= 3.0 and rl[j] >= 1200.0:
                    j += 1
                out.append(DecelWindow(i, j))
                i = j
                continue
        i += 1
    return out


def exhaust_afr(
    engine: EngineModel, trace: PhysicsTrace, rng: np.random.Generator
) -> list[PopEvent]:
    """Fill the trace's AFR arrays and return the decel pops that were generated.

    Steady AFR per cylinder is ``target * VE_true / VE_ecu``; the actual exhaust AFR
    adds heat soak (an IAT compensation that under-corrects: rich when hot), a brief
    lean/rich excursion while MAP moves (wall wetting the ECU's enrichment does not
    cancel exactly), and decel lean spikes whose rate and height grow with the engine's
    pop severity.
    """
    t = engine.tables
    ra, ma = t.rpm_axis, t.map_axis
    target = target_afr(trace.map_kpa, engine.scenario.ecu.target_table)
    r_f = interp2(t.ve_true_front, ra, ma, trace.rpm, trace.map_kpa) / interp2(
        t.ve_ecu_front, ra, ma, trace.rpm, trace.map_kpa
    )
    r_r = interp2(t.ve_true_rear, ra, ma, trace.rpm, trace.map_kpa) / interp2(
        t.ve_ecu_rear, ra, ma, trace.rpm, trace.map_kpa
    )
    trace.afr_target = target
    trace.afr_true_front = target * r_f
    trace.afr_true_rear = target * r_r
    heat = engine.heat_afr_factor(trace.iat_f)
    dt = float(trace.t[1] - trace.t[0]) if len(trace) > 1 else 0.002
    dmap = np.gradient(trace.map_kpa, dt) if len(trace) > 1 else np.zeros(len(trace))
    k = max(1, round(0.05 / dt))
    dmap = np.convolve(dmap, np.ones(k) / k, mode="same")
    transient = 1.0 + np.clip(0.0003 * dmap, -0.06, 0.06)
    afr_f = trace.afr_true_front * heat * transient
    afr_r = trace.afr_true_rear * heat * transient
    pops: list[PopEvent] = []
    sev = engine.pop_severity()
    rate_max = 4.0 * sev**1.5
    times = trace.t
    for w in decel_windows(trace.tps, trace.rpm):
        t0 = float(times[w.start])
        t1 = float(times[w.stop - 1]) if w.stop > w.start else t0
        for cyl, arr in (("front", afr_f), ("rear", afr_r)):
            ts = t0 + float(rng.exponential(1.0 / rate_max)) if rate_max > 0 else t1 + 1
            while ts < t1:
                idx = min(int(np.searchsorted(times, ts)), len(trace) - 1)
                rpm_here = float(trace.rpm[idx])
                band = 1.0 if 1500.0 <= rpm_here <= 3500.0 else (0.6 if rpm_here > 3500 else 0.0)
                u_keep, u_peak, u_dur = rng.random(3)
                if u_keep < band:
                    peak = min(19.0, 14.8 + sev * 4.2 * (0.45 + 0.55 * u_peak))
                    dur = 0.12 + 0.23 * u_dur
                    _add_spike(times, arr, ts, dur, peak)
                    pops.append(PopEvent(ts, cyl, rpm_here, peak, dur))
                ts += float(rng.exponential(1.0 / rate_max))
    trace.afr_front = afr_f
    trace.afr_rear = afr_r
    return pops


def _add_spike(times: FloatArray, arr: FloatArray, ts: float, dur: float, peak: float) -> None:
    """Raise ``arr`` towards ``peak`` over [ts, ts+dur] with a fast rise and decay."""
    a = int(np.searchsorted(times, ts))
    b = int(np.searchsorted(times, ts + dur + 0.15))
    if a >= b:
        return
    tt = times[a:b] - ts
    rise = np.clip(tt / 0.02, 0.0, 1.0)
    decay = np.where(tt > dur, np.exp(-(tt - dur) / 0.03), 1.0)
    w = rise * decay
    seg = arr[a:b]
    arr[a:b] = np.maximum(seg, seg + (peak - seg) * w)

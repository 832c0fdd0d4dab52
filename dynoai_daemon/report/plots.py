"""The report's figures, drawn with matplotlib's object API (no pyplot, no global state).

Each function returns a :class:`~matplotlib.figure.Figure` or None when the data for it
is absent. Curves come from the raw run (forward filled); maps from the session grid.
Power and torque are taken from the pulls (throttle at or above ``WOT_TPS``), averaged
per ``RPM_BIN`` rpm, and multiplied by the session's weather correction factor when the
session carries conditions (the method is named in the legend). Several runs overlay in
one colour each, so a before/after pair reads at a glance. VE correction maps follow the
watch view's convention: red where the cylinder ran lean (the correction adds fuel), blue
where rich, paler where the confidence is lower, a black frame on a clamped cell.
matplotlib is chosen because it renders SVG that can be inlined in the HTML: no
JavaScript, nothing fetched at view time, a few tens of kB a figure, and PNG for free.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dynoai_daemon.report.data import FloatArray, ReportRun, finite

BoolArray = np.ndarray[Any, np.dtype[np.bool_]]

WOT_TPS = 80.0
MAX_POINTS = 2500
RPM_BIN = 100.0
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
CYLS = ("front", "rear")


def colour(k: int) -> str:
    """The colour of the k-th run."""
    return COLOURS[k % len(COLOURS)]


def svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, DOCTYPE or metadata."""
    buf = io.StringIO()
    # Text as <text> (the browser's sans-serif), not glyph paths: a third of the size.
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "dynoai"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, dpi=110)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text


def png(fig: Figure, path: str) -> None:
    """Write the figure as a PNG."""
    fig.savefig(path, format="png", dpi=110)


def _new(w: float = 9.0, h: float = 4.2) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig


def _thin(t: FloatArray, *ys: FloatArray | None) -> tuple[FloatArray, ...]:
    """At most MAX_POINTS points per line, keeping each stride's extreme (spikes stay)."""
    n = t.size
    if n <= MAX_POINTS:
        return (t, *(y if y is not None else np.full(n, np.nan) for y in ys))
    step = int(np.ceil(n / MAX_POINTS))
    m = (n // step) * step
    out = [t[:m:step]]
    for y in ys:
        if y is None:
            out.append(np.full(out[0].size, np.nan))
            continue
        blocks = np.nan_to_num(y[:m], nan=-np.inf).reshape(-1, step)
        pick = blocks.argmax(axis=1)
        vals = y[:m].reshape(-1, step)[np.arange(blocks.shape[0]), pick]
        out.append(vals)
    return tuple(out)


def _binned(x: FloatArray, y: FloatArray, width: float) -> tuple[FloatArray, FloatArray]:
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return np.zeros(0), np.zeros(0)
    b = np.round(x[ok] / width) * width
    keys, inv = np.unique(b, return_inverse=True)
    sums = np.bincount(inv, weights=y[ok])
    counts = np.bincount(inv)
    keep = counts >= 3
    return keys[keep], (sums / np.maximum(counts, 1))[keep]


def _pull_mask(run: ReportRun) -> BoolArray | None:
    rpm = run.column("rpm")
    if rpm is None:
        return None
    tps = run.column("tps_pct")
    mask = np.isfinite(rpm) & (rpm > 0)
    t = run.column("time_s")
    if t is not None and rpm.size > 25:
        # a sweep: rpm rising over a quarter second (the coast-down is not a pull)
        ahead = np.concatenate([rpm[25:], np.full(25, np.nan)])
        mask &= ~(ahead < rpm)
    if tps is not None and np.nanmax(np.nan_to_num(tps, nan=0.0)) >= WOT_TPS:
        mask &= tps >= WOT_TPS
    return mask


def correction_of(run: ReportRun) -> tuple[float, str]:
    """(factor, words) for the run's power correction."""
    cond = run.conditions()
    if cond is None:
        return 1.0, "uncorrected (conditions unknown)"
    cf = cond.correction_factor()
    method = {"sae_j1349": "SAE J1349", "std": "STD (SAE J607)", "din_70020": "DIN 70020"}
    name = method.get(str(cond.correction_method), str(cond.correction_method))
    return cf, f"{name} corrected, CF {cf:.3f}"


def power_figure(runs: list[ReportRun]) -> Figure | None:
    """Power and torque vs RPM, one colour per run."""
    fig = _new()
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    drawn = False
    names = set()
    for k, run in enumerate(runs):
        mask = _pull_mask(run)
        rpm = run.column("rpm")
        if mask is None or rpm is None:
            continue
        cf, words = correction_of(run)
        names.add(words)
        for col, axis, style, unit in (
            ("power_hp", ax, "-", "hp"),
            ("torque_ftlb", ax2, "--", "lb-ft"),
        ):
            y = run.column(col)
            if y is None:
                continue
            x, v = _binned(rpm[mask], y[mask] * cf, RPM_BIN)
            if x.size < 2:
                continue
            axis.plot(x, v, style, color=colour(k), lw=2, label=f"{unit} {run.label}")
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("RPM")
    ax.set_ylabel("power, hp (solid)")
    ax2.set_ylabel("torque, lb-ft (dashed)")
    ax.set_title("Power and torque vs RPM: " + "; ".join(sorted(names)))
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
    return fig


def afr_figure(runs: list[ReportRun]) -> Figure | None:
    """AFR front and rear vs RPM against the target, during the pulls."""
    fig = _new()
    ax = fig.add_subplot()
    drawn = False
    target_drawn = False
    for k, run in enumerate(runs):
        mask = _pull_mask(run)
        rpm = run.column("rpm")
        if mask is None or rpm is None:
            continue
        for cyl, style in (("front", "-"), ("rear", "--")):
            y = run.column(f"afr_{cyl}")
            if y is None:
                continue
            x, v = _binned(rpm[mask], y[mask], RPM_BIN)
            if x.size >= 2:
                ax.plot(x, v, style, color=colour(k), lw=1.8, label=f"{cyl} {run.label}")
                drawn = True
        tgt = run.column("afr_target")
        if tgt is not None:
            x, v = _binned(rpm[mask], tgt[mask], RPM_BIN)
            if x.size >= 2:
                ax.plot(
                    x, v, ":", color="black", lw=1.5,
                    label="target" if not target_drawn else None,
                )  # fmt: skip
                target_drawn = True
    if not drawn:
        return None
    ax.set_xlabel("RPM")
    ax.set_ylabel("AFR")
    ax.set_title(f"AFR vs RPM during the pulls (TPS >= {WOT_TPS:.0f} %), front solid, rear dashed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _grid(run: ReportRun) -> dict[str, Any] | None:
    g = run.session.get("grid")
    return g if isinstance(g, dict) and g.get("rpm_axis") and g.get("map_axis") else None


def _matrix(g: dict[str, Any], key: str, shape: tuple[int, int]) -> FloatArray:
    out = np.full(shape, np.nan)
    rows = g.get(key)
    if not isinstance(rows, list):
        return out
    for i, row in enumerate(rows[: shape[0]]):
        if isinstance(row, list):
            for j, v in enumerate(row[: shape[1]]):
                f = finite(v)
                if f is not None:
                    out[i, j] = f
                elif isinstance(v, bool):
                    out[i, j] = float(v)
    return out


def _axis_ticks(ax: Axes, rpm: list[float], kpa: list[float]) -> None:
    step_r = max(1, len(rpm) // 10)
    ax.set_xticks(np.arange(len(rpm))[::step_r] + 0.5)
    ax.set_xticklabels([f"{v:.0f}" for v in rpm][::step_r], fontsize=7, rotation=45)
    step_m = max(1, len(kpa) // 9)
    ax.set_yticks(np.arange(len(kpa))[::step_m] + 0.5)
    ax.set_yticklabels([f"{v:.0f}" for v in kpa][::step_m], fontsize=7)
    ax.set_xlabel("RPM")
    ax.set_ylabel("MAP, kPa")


def ve_figure(run: ReportRun, limit: float, min_weight: float) -> Figure | None:
    """VE correction heat maps of both cylinders, shaded by confidence."""
    g = _grid(run)
    if g is None:
        return None
    rpm = [float(v) for v in g["rpm_axis"]]
    kpa = [float(v) for v in g["map_axis"]]
    shape = (len(rpm), len(kpa))
    fig = _new(11.0, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"]
    any_cell = False
    for ax, cyl in zip(axes, CYLS, strict=True):
        cg = g.get(cyl)
        if not isinstance(cg, dict):
            continue
        corr = _matrix(cg, "ve_correction_pct", shape)
        weight = _matrix(cg, "weight", shape)
        ci = _matrix(cg, "ve_correction_ci_pct", shape)
        clamped = _matrix(cg, "clamped", shape)
        conf = np.where(
            np.isfinite(ci),
            np.clip(1.0 - ci / 10.0, 0.15, 1.0),
            np.clip(np.nan_to_num(weight) / (3.0 * min_weight), 0.15, 1.0),
        )
        rgba = cmap(norm(np.nan_to_num(corr)))
        rgba[..., 3] = np.where(np.isfinite(corr), conf, 0.0)
        seen = np.isfinite(weight) & (weight > 0) & ~np.isfinite(corr)
        rgba[seen] = (0.75, 0.75, 0.75, 0.5)  # visited, below the minimum weight
        ax.pcolormesh(
            np.arange(len(rpm) + 1),
            np.arange(len(kpa) + 1),
            np.transpose(rgba, (1, 0, 2)),
            rasterized=True,  # one embedded image, not a path per cell
        )
        small = len(rpm) * len(kpa) <= 400
        for i, j in zip(*np.nonzero(np.isfinite(corr)), strict=True):
            any_cell = True
            if small:
                ax.text(i + 0.5, j + 0.5, f"{corr[i, j]:+.0f}", ha="center", va="center",
                        fontsize=5.5, color="black")  # fmt: skip
            if clamped[i, j] == 1.0:
                ax.add_patch(Rectangle((i, j), 1, 1, fill=False, ec="black", lw=1.2))
        ax.set_title(f"{cyl}: VE correction %, {int(np.isfinite(corr).sum())} cells")
        _axis_ticks(ax, rpm, kpa)
        ax.set_xlim(0, len(rpm))
        ax.set_ylim(0, len(kpa))
    if not any_cell:
        return None
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes, shrink=0.85, label="VE correction % (red lean, blue rich)")
    fig.suptitle(
        f"{run.label}: paler = less confidence, grey = below {min_weight:g} weight, "
        "framed = clamped",
        fontsize=9,
    )
    return fig


def knock_figure(run: ReportRun) -> Figure | None:
    """Knock retard per cell (both cylinders) and the retard trace over the run."""
    g = _grid(run)
    t = run.column("time_s")
    traces = {c: run.column(f"knock_{c}_deg") for c in CYLS}
    has_trace = t is not None and any(
        v is not None and np.nanmax(np.nan_to_num(v, nan=0.0)) > 0 for v in traces.values()
    )
    has_cells = False
    mats: dict[str, FloatArray] = {}
    if g is not None:
        shape = (len(g["rpm_axis"]), len(g["map_axis"]))
        for c in CYLS:
            cg = g.get(c)
            if isinstance(cg, dict):
                m = _matrix(cg, "knock_max_deg", shape)
                mats[c] = m
                has_cells |= bool(np.nanmax(np.nan_to_num(m, nan=0.0)) > 0)
    if not (has_cells or has_trace):
        return None
    fig = _new(11.0, 4.2)
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.3])
    vmax = max([float(np.nanmax(np.nan_to_num(m))) for m in mats.values()] + [1.0])
    norm = Normalize(0.0, vmax)
    if g is not None and mats:
        rpm = [float(v) for v in g["rpm_axis"]]
        kpa = [float(v) for v in g["map_axis"]]
        for ax, c in zip(axes[:2], CYLS, strict=True):
            if c not in mats:
                continue
            shown = np.where(np.nan_to_num(mats[c]) > 0, mats[c], np.nan)
            mesh = ax.pcolormesh(
                np.arange(len(rpm) + 1), np.arange(len(kpa) + 1), shown.T,
                cmap="YlOrRd", norm=norm, rasterized=True,
            )  # fmt: skip
            ax.set_title(f"{c}: max knock retard, deg ({int(np.isfinite(shown).sum())} cells)")
            _axis_ticks(ax, rpm, kpa)
            ax.set_xlim(0, len(rpm))
            ax.set_ylim(0, len(kpa))
        fig.colorbar(mesh, ax=axes[:2], shrink=0.8, label="retard, deg")
    ax = axes[2]
    if has_trace and t is not None:
        t0 = float(t[0])
        for k, c in enumerate(CYLS):
            v = traces[c]
            if v is not None:
                tt, vv = _thin(t - t0, v)
                ax.plot(tt, vv, color=colour(k), lw=1, label=c)
        ax.legend(fontsize=7)
    ax.set_xlabel("time in run, s")
    ax.set_ylabel("knock retard, deg")
    ax.set_title("retard over the run")
    ax.grid(alpha=0.3)
    fig.suptitle(run.label, fontsize=9)
    return fig


def decel_figure(run: ReportRun, decel_tps: float) -> Figure | None:
    """AFR on the coast: closed-throttle overrun shaded, with the pops it showed."""
    t, rpm, tps = run.column("time_s"), run.column("rpm"), run.column("tps_pct")
    if t is None or rpm is None or tps is None:
        return None
    coast = (tps <= decel_tps) & (rpm >= 1500.0)
    if coast.sum() < 5:
        return None
    t0 = float(t[0])
    fig = _new(11.0, 3.8)
    ax = fig.add_subplot()
    for k, c in enumerate(CYLS):
        v = run.column(f"afr_{c}")
        if v is not None:
            tt, vv = _thin(t - t0, v)
            ax.plot(tt, vv, color=colour(k), lw=0.9, label=f"AFR {c}")
    tc, cc = _thin(t - t0, coast.astype(float))
    ax.fill_between(
        tc, 0, 1, where=cc > 0.5, color="orange", alpha=0.25,
        transform=ax.get_xaxis_transform(), label="coast (closed throttle)",
    )  # fmt: skip
    pats = (run.session.get("patterns") or {}).get("decel_popping") or []
    if pats:
        p = pats[0]
        spike = finite(p.get("decel_afr_spike_max"))
        if spike is not None:
            ax.axhline(spike, color="red", ls=":", lw=1, label=f"spike max {spike:.1f}")
    ax.set_ylim(9, 20)
    ax.set_xlabel("time in run, s")
    ax.set_ylabel("AFR")
    ax.set_title(f"{run.label}: decel / coast AFR (lean spikes are the pops)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def iat_figure(runs: list[ReportRun], soak_f: float) -> Figure | None:
    """Intake air temperature over each run."""
    fig = _new(9.0, 3.4)
    ax = fig.add_subplot()
    drawn = False
    for k, run in enumerate(runs):
        t, iat = run.column("time_s"), run.column("iat_f")
        if t is None or iat is None or not np.isfinite(iat).any():
            continue
        tt, vv = _thin(t - float(t[0]), iat)
        ax.plot(tt, vv, color=colour(k), lw=1.5, label=run.label)
        drawn = True
    if not drawn:
        return None
    ax.axhline(soak_f, color="red", ls=":", lw=1, label=f"heat-soak limit {soak_f:g} F")
    ax.set_xlabel("time in run, s")
    ax.set_ylabel("IAT, F")
    ax.set_title("Intake air temperature over the run")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig

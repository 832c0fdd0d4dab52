"""The session in sentences: what the patterns found, for the tuner reading the report.

Pure functions over a session's JSON (``patterns``, ``grid``), tolerant of missing
fields; each returns short plain sentences (HTML escaping is the caller's job).
"""

from __future__ import annotations

from typing import Any

from dynoai_daemon.report.data import finite


def _axis(session: dict[str, Any], name: str, idx: Any) -> str:
    grid = session.get("grid") or {}
    axis = grid.get(name) or []
    i = idx if isinstance(idx, int) else -1
    return f"{axis[i]:.0f}" if 0 <= i < len(axis) else f"#{idx}"


def _cell(session: dict[str, Any], i: Any, j: Any) -> str:
    return f"{_axis(session, 'rpm_axis', i)} rpm / {_axis(session, 'map_axis', j)} kPa"


def _pct(v: Any) -> str | None:
    f = finite(v)
    return None if f is None else f"{f:+.1f} %"


def grid_summary(session: dict[str, Any], limit: float) -> list[str]:
    """How much fuel each cylinder wants, from the session grid."""
    out = []
    grid = session.get("grid") or {}
    for cyl in ("front", "rear"):
        g = grid.get(cyl) or {}
        vals = [finite(v) for row in g.get("ve_correction_pct") or [] for v in row or []]
        vals_f = [v for v in vals if v is not None]
        if not vals_f:
            out.append(f"{cyl.capitalize()}: no cell reached the minimum weight.")
            continue
        lean = sum(1 for v in vals_f if v > 2)
        rich = sum(1 for v in vals_f if v < -2)
        clamped = sum(1 for row in g.get("clamped") or [] for v in row or [] if v is True)
        if not clamped:
            clamped = sum(1 for v in vals_f if abs(v) >= limit - 1e-9)
        mean = sum(vals_f) / len(vals_f)
        out.append(
            f"{cyl.capitalize()}: {len(vals_f)} cells learned, mean correction {mean:+.1f} %; "
            f"{lean} lean (> +2 %), {rich} rich (< -2 %), {clamped} at the "
            f"{limit:g} % clamp."
        )
    return out


def patterns(session: dict[str, Any]) -> list[str]:
    """One or more sentences per pattern the session found."""
    p = session.get("patterns") or {}
    out: list[str] = []
    for v in p.get("ve_scaling") or []:
        regions = [
            f"{name} {s}"
            for name, key in (
                ("idle", "ve_delta_idle"),
                ("cruise", "ve_delta_cruise"),
                ("midrange", "ve_delta_midrange"),
                ("WOT", "ve_delta_wot"),
            )
            if (s := _pct(v.get(key))) is not None
        ]
        fr = _pct(v.get("front_rear_ve_difference_pct"))
        out.append(
            "VE scaling: the engine wants "
            + (", ".join(regions) if regions else "no region-wide change")
            + (f"; front minus rear {fr}" if fr else "")
            + "."
        )
    for v in p.get("cylinder_imbalance") or []:
        cells = v.get("imbalance_cells") or []
        worst = max(cells, key=lambda c: abs(c[2]) if len(c) > 2 else 0, default=None)
        text = f"Cylinder imbalance ({v.get('severity') or 'unrated'}): {len(cells)} cells"
        if worst is not None and len(worst) > 2:
            side = "front richer" if worst[2] < 0 else "front leaner"
            text += f", worst {abs(worst[2]):.2f} AFR ({side}) at {_cell(session, *worst[:2])}"
        if v.get("primary_cause"):
            text += f"; likely cause: {v['primary_cause']}"
        out.append(text + ".")
    for v in p.get("decel_popping") or []:
        text = f"Decel popping: severity {v.get('pop_severity', '?')}/10"
        rng = v.get("pop_rpm_range")
        if isinstance(rng, list) and len(rng) == 2:
            text += (
                f" at {rng[0]:.0f} rpm"
                if rng[0] == rng[1]
                else f" between {rng[0]:.0f} and {rng[1]:.0f} rpm"
            )
        spike = finite(v.get("decel_afr_spike_max"))
        if spike is not None:
            text += f", AFR spiking to {spike:.1f} on the coast"
        if v.get("decel_events") is not None:
            text += f" ({v.get('popping_events', '?')} of {v['decel_events']} decels popped)"
        zones = v.get("enrichment_zones") or []
        if zones:
            text += "; enrich " + ", ".join(
                f"{z[0]:.0f}-{z[1]:.0f} rpm by {z[4] * 100:.0f} %"
                for z in zones
                if isinstance(z, list) and len(z) >= 5
            )
        out.append(text + ".")
    for v in p.get("heat_soak") or []:
        a, b = finite(v.get("iat_initial_f")), finite(v.get("iat_peak_f"))
        text = "Heat soak"
        if a is not None and b is not None:
            text += f": IAT {a:.0f} -> {b:.0f} F"
        mins = finite(v.get("iat_soak_time_min"))
        if mins is not None:
            text += f" over {mins:.1f} min"
        infl = _pct(v.get("ve_inflation_pct"))
        if infl:
            text += f"; VE reads {infl} high while hot"
        out.append(text + ".")
    for v in p.get("knock_timing") or []:
        front = v.get("knock_cells_front") or []
        rear = v.get("knock_cells_rear") or []
        sev = finite(v.get("knock_severity_max"))
        text = f"Knock: {len(front)} cells front, {len(rear)} rear"
        if sev is not None:
            text += f", up to {sev:.1f} deg retard"
        retards = v.get("timing_retards") or []
        if retards:
            worst = min(retards, key=lambda c: c[2] if len(c) > 2 else 0)
            text += (
                f"; pull timing in {len(retards)} cells "
                f"(most {worst[2]:+.1f} deg at {_cell(session, *worst[:2])})"
            )
        out.append(text + ".")
    if not out:
        out.append("No pattern found in this session.")
    return out


def flat(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A nested dict as ``(dotted key, value)`` rows, nulls left out."""
    rows: list[tuple[str, str]] = []
    if not isinstance(d, dict):
        return rows
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows.extend(flat(v, key + "."))
        elif v is not None and v != [] and v != {}:
            rows.append((key, str(v)))
    return rows

"""Rich text for the watch view: the cell grid, the live channels, alerts, sources.

Pure functions of a :class:`~dynoai_daemon.watch.state.WatchState` (no Textual here), so
the picture can be checked in tests. The grid is laid out as TunerStudio shows a VE
table: RPM across (in thousands), MAP down with high load on top, 4 characters a cell, so
the default 19 x 18 grid fits 80 columns. A cell's background is red when the cylinder
ran lean there (the correction adds fuel), blue when rich, stronger with the size of the
correction and paler with less confidence (the confidence interval when the daemon sends
one, else the weight against the minimum); cells below the minimum weight are grey. The
live cell is drawn black on yellow; ``!`` marks a correction at the clamp, ``k`` a cell
where knock was seen.
"""

from __future__ import annotations

import math
from typing import Literal

from rich.text import Text

from dynoai_daemon.watch.state import Cell, TuneCell, WatchState

Mode = Literal["correction", "hits", "afr"]
MODES: tuple[Mode, ...] = ("correction", "hits", "afr")
CELL_W = 4
LABEL_W = 3

_GREY = (48, 48, 48)
_LEAN = (205, 40, 40)
_RICH = (40, 90, 215)


def confidence(cell: Cell | TuneCell, min_weight: float) -> float:
    """0..1: how far to trust a cell's correction (from its CI, else its weight)."""
    if cell.ci_pct is not None:
        return max(0.15, min(1.0, 1.0 - cell.ci_pct / 10.0))
    w = getattr(cell, "weight", 3 * min_weight)
    return max(0.15, min(1.0, w / (3.0 * min_weight)))


def cell_colour(corr: float | None, conf: float, limit: float) -> str:
    """Background colour of a cell: lean red / rich blue, paler with low confidence."""
    if corr is None:
        return "rgb(48,48,48)"
    mag = min(1.0, abs(corr) / max(limit, 1e-9)) ** 0.6 * conf
    tgt = _LEAN if corr > 0 else _RICH
    r, g, b = (round(_GREY[k] + (tgt[k] - _GREY[k]) * mag) for k in range(3))
    return f"rgb({r},{g},{b})"


def _fmt(cell: Cell | None, mode: Mode) -> str:
    if cell is None:
        return " " * CELL_W
    if mode == "hits":
        return f"{min(cell.weight, 999):3.0f}" + ("k" if cell.knock_count else " ")
    if mode == "afr":
        return f"{cell.afr_mean:4.1f}" if cell.afr_mean is not None else "  - "
    if cell.correction_pct is None:
        return "  · "
    mark = "!" if cell.clamped else ("k" if cell.knock_count else " ")
    return f"{cell.correction_pct:+3.0f}"[-3:] + mark


def _axis_label(v: float, width: int, scale: float = 1.0, digits: int = 0) -> str:
    if not math.isfinite(v):
        return "?".rjust(width)
    return f"{v / scale:{width}.{digits}f}"[-width:]


def render_grid(
    state: WatchState,
    cylinder: str,
    mode: Mode,
    *,
    tune: bool = False,
) -> Text:
    """The RPM x MAP grid of one cylinder (or of the build's pooled correction)."""
    nr, nm = len(state.rpm_axis), len(state.map_axis)
    out = Text(no_wrap=True, overflow="crop")
    title = (
        f"{cylinder} pooled correction of the build (tune/current)"
        if tune
        else f"{cylinder}: {mode} [{state.grid_source}] kPa down, krpm across"
    )
    out.append(title[: LABEL_W + CELL_W * max(nr, 16)] + "\n", style="bold")
    live = None if tune else state.live_cell
    cells = state.cells.get(cylinder, {})
    tcells = state.tune.get(cylinder, {})
    for j in range(nm - 1, -1, -1):
        out.append(_axis_label(state.map_axis[j], LABEL_W), style="bold cyan")
        for i in range(nr):
            text: str
            colour: str
            if tune:
                t = tcells.get((i, j))
                text = f"{t.correction_pct:+3.0f} " if t is not None else "    "
                colour = (
                    cell_colour(
                        t.correction_pct,
                        confidence(t, state.min_weight),
                        state.max_correction_pct,
                    )
                    if t is not None
                    else "rgb(24,24,24)"
                )
            else:
                c = cells.get((i, j))
                text = _fmt(c, mode)
                colour = (
                    cell_colour(
                        c.correction_pct, confidence(c, state.min_weight), state.max_correction_pct
                    )
                    if c is not None
                    else "rgb(24,24,24)"
                )
            style = f"white on {colour}"
            if live == (i, j):
                style = "bold black on yellow"
                if text.strip() == "":
                    text = " <> "
            out.append(text, style=style)
        out.append("\n")
    out.append(" " * LABEL_W)
    for i in range(nr):
        out.append(_axis_label(state.rpm_axis[i], CELL_W, 1000.0, 1), style="bold cyan")
    return out


def _v(state: WatchState, key: str, fmt: str) -> str:
    v = state.live.get(key)
    return "--" if v is None else format(v, fmt)


def render_live(state: WatchState, *, compact: bool) -> Text:
    """Live channels; one line when compact (80 columns), a block otherwise."""
    tgt = state.live.get("afr_target")
    knock = max(
        (state.live.get(k) or 0.0 for k in ("knock_front_deg", "knock_rear_deg")), default=0.0
    )
    parts = [
        ("RPM", _v(state, "rpm", ".0f")),
        ("MAP", _v(state, "map_kpa", ".0f")),
        ("TPS", _v(state, "tps_pct", ".0f")),
        ("AFR F", _v(state, "afr_front", ".2f")),
        ("AFR R", _v(state, "afr_rear", ".2f")),
        ("tgt", "--" if tgt is None else f"{tgt:.2f}"),
        ("IAT", _v(state, "iat_f", ".0f")),
        ("knock", f"{knock:.1f}"),
    ]
    out = Text(no_wrap=True, overflow="crop")
    for n, (name, val) in enumerate(parts):
        style = "bold"
        if name.startswith("AFR") and tgt is not None and val != "--":
            err = float(val) - tgt
            style = "bold red" if err > 0.3 else ("bold blue" if err < -0.3 else "bold green")
        if name == "knock" and knock > 0:
            style = "bold red"
        if compact:
            out.append(f"{name} ", style="dim")
            out.append(val, style=style)
            out.append(" " if n < len(parts) - 1 else "")
        else:
            out.append(f"{name:>6} ", style="dim")
            out.append(f"{val:>7}\n", style=style)
    return out


def render_status(state: WatchState, connection: str, cylinder: str, view: str) -> Text:
    """The top line: station, cylinder and view, broker connection, daemon state, run.

    Ordered so that 80 columns cut the run id's tail, not what the keys change.
    """
    out = Text(no_wrap=True, overflow="crop")
    out.append(f"{state.station or '(any station)'} ", style="bold")
    out.append(f"{cylinder}/{view} ", style="cyan")
    conn_style = "green" if connection == "connected" else "bold red"
    out.append(f"[{connection}] ", style=conn_style)
    if state.daemon_state:
        out.append(
            f"daemon {state.daemon_state} ",
            style="green" if state.daemon_state == "online" else "red",
        )
    if state.run_id:
        cov = f"{state.cells_covered} cells, " if state.cells_covered is not None else ""
        out.append(f"run: {cov}{state.run_id}", style="bold yellow")
    else:
        out.append("no run", style="dim")
    return out


def render_alerts(state: WatchState, limit: int) -> Text:
    """The newest alerts, newest first."""
    out = Text(no_wrap=True, overflow="ellipsis")
    if not state.alerts:
        out.append("no alerts", style="dim")
        return out
    for a in list(state.alerts)[::-1][:limit]:
        sev = a.severity
        style = "bold red" if sev in ("critical", "high") else "yellow"
        out.append(a.text() + "\n", style=style)
    return out


def render_sources(state: WatchState) -> Text:
    """Each source's availability, rate and errors; the outbox depth."""
    out = Text(no_wrap=True, overflow="ellipsis")
    src = state.sources()
    if not src:
        out.append("no health yet", style="dim")
    for name, d in sorted(src.items()):
        online = d.get("availability")
        if online is None:
            online = "online" if d.get("online") else "offline"
        style = "green" if online == "online" else "bold red"
        extra = []
        msgs = d.get("messages")
        if isinstance(msgs, int | float):
            extra.append(f"{msgs:.0f} msgs")
        age = d.get("last_seen_age_s")
        if isinstance(age, int | float):
            extra.append(f"seen {age:.1f}s ago")
        errs = d.get("decode_errors") or d.get("bad_frames")
        if errs:
            extra.append(f"{errs} errors")
        if d.get("reason"):
            extra.append(str(d["reason"]))
        out.append(f"{name}: ", style="bold")
        out.append(online, style=style)
        out.append((" " + ", ".join(extra) if extra else "") + "\n")
    mq = state.health.get("mqtt")
    if isinstance(mq, dict) and "outbox_depth" in mq:
        out.append(f"outbox {mq['outbox_depth']}\n", style="dim")
    if state.last_session:
        s = state.last_session
        hp = s.get("peak_hp")
        out.append(
            f"last session {s.get('session_id')}"
            + (f", {hp:.0f} hp" if isinstance(hp, int | float) else "")
            + "\n",
            style="dim",
        )
    if state.tune_info or state.tune:
        n = sum(len(v) for v in state.tune.values())
        runs = state.tune_info.get("runs")
        out.append(
            f"build correction: {n} cells" + (f" from {runs} runs" if runs is not None else ""),
            style="magenta",
        )
    return out

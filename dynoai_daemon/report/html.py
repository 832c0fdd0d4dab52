"""One self-contained HTML file from the report's runs, figures and words.

Everything is inline: the figures are SVG elements, the style sheet is a ``<style>``
block, there is no script and no external reference, so the file opens offline and can
be mailed. :func:`build_report` is the whole pipeline (load, draw, assemble, write
atomically); it returns what it wrote, for the command's summary line.
"""

from __future__ import annotations

import html
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dynoai_daemon import __version__
from dynoai_daemon.config import Settings
from dynoai_daemon.report import plots, words
from dynoai_daemon.report.data import ReportRun, finite, load

#: Above this the report stops adding per-run sections (and says so).
MAX_BYTES = 5 * 1024 * 1024

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; }
.fig svg { max-width: 100%; height: auto; }
.note { color: #777; font-size: 0.85em; }
.sev-critical, .sev-high { color: #b00; font-weight: bold; }
.sev-medium, .sev-warning { color: #a60; }
ul.words li { margin: 0.2em 0; }
"""


@dataclass
class Built:
    """What :func:`build_report` wrote."""

    path: Path
    size: int
    runs: int
    figures: list[str] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, fmt: str = ".1f") -> str:
    f = finite(v)
    return "-" if f is None else format(f, fmt)


def _table(rows: list[tuple[str, str]], head: tuple[str, str] | None = None) -> str:
    if not rows:
        return '<p class="note">none</p>'
    out = ["<table>"]
    if head:
        out.append(f"<tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr>")
    out.extend(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    out.append("</table>")
    return "".join(out)


def _summary(runs: list[ReportRun]) -> str:
    cols = (
        "run", "time (UTC)", "peak hp", "peak lb-ft", "power correction", "AFR RMS err",
        "max F/R AFR delta", "knock events", "IAT start/peak F", "samples", "aborted",
    )  # fmt: skip
    out = ["<table><tr>", *(f"<th>{_e(c)}</th>" for c in cols), "</tr>"]
    for run in runs:
        s = run.session
        cf, name = plots.correction_of(run)
        hp, tq = finite(s.get("peak_hp")), finite(s.get("peak_torque"))
        hp_c = finite(s.get("peak_hp_corrected")) or (hp * cf if hp is not None else None)
        tq_c = finite(s.get("peak_torque_corrected")) or (tq * cf if tq is not None else None)
        info = s.get("run") or {}
        cells = (
            run.run_id,
            s.get("timestamp_utc") or "-",
            _num(hp_c),
            _num(tq_c),
            name,
            _num(s.get("afr_accuracy_rms_error"), ".3f"),
            _num(s.get("max_cylinder_afr_delta"), ".2f"),
            s.get("knock_events_total") if s.get("knock_events_total") is not None else "-",
            f"{_num(s.get('iat_start_f'), '.0f')} / {_num(s.get('iat_peak_f'), '.0f')}",
            info.get("samples", "-"),
            "yes" if s.get("aborted") else "no",
        )
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _alerts(run: ReportRun) -> str:
    note = f'<p class="note">{_e(run.alerts_note)}</p>' if run.alerts_note else ""
    if not run.alerts:
        return note + ("<p>No alerts.</p>" if run.raw is not None else "")
    t0 = finite((run.session.get("run") or {}).get("start_s")) or 0.0
    rows = ["<table><tr><th>t, s</th><th>kind</th><th>severity</th><th>cylinder</th>"
            "<th>cell</th><th>value</th><th>limit</th><th>message</th></tr>"]  # fmt: skip
    shown = run.alerts[:200]
    for a in shown:
        cell = (
            f"{a['rpm']:.0f} rpm / {a['map_kpa']:.0f} kPa"
            if finite(a.get("rpm")) is not None and finite(a.get("map_kpa")) is not None
            else "-"
        )
        t = finite(a.get("t"))
        sev = str(a.get("severity") or "")
        rows.append(
            "<tr>"
            f"<td>{_e('-' if t is None else f'{t - t0:.1f}')}</td><td>{_e(a.get('kind'))}</td>"
            f'<td class="sev-{_e(sev)}">{_e(sev)}</td><td>{_e(a.get("cylinder") or "-")}</td>'
            f"<td>{_e(cell)}</td><td>{_e(_num(a.get('value'), '.2f'))}</td>"
            f"<td>{_e(_num(a.get('threshold'), '.2f'))}</td><td>{_e(a.get('message') or '')}</td>"
            "</tr>"
        )
    rows.append("</table>")
    more = len(run.alerts) - len(shown)
    if more > 0:
        rows.append(f'<p class="note">and {more} more</p>')
    return note + "".join(rows)


class _Doc:
    def __init__(self, png_dir: Path | None, stem: str) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.figures: list[str] = []
        self.pngs: list[Path] = []
        self.png_dir = png_dir
        self.stem = stem

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text.encode("utf-8"))

    def figure(self, name: str, fig: Any) -> None:
        if fig is None:
            return
        self.add(f'<div class="fig" id="fig-{_e(name)}">{plots.svg(fig)}</div>')
        self.figures.append(name)
        if self.png_dir is not None:
            path = self.png_dir / f"{self.stem}-{name}.png"
            plots.png(fig, str(path))
            self.pngs.append(path)


def build_report(
    paths: list[Path],
    out: Path,
    settings: Settings,
    *,
    data_dir: Path | None = None,
    png: bool = False,
) -> Built:
    """Load the sessions, draw the figures and write one HTML file (atomically).

    Raises:
        InputError: a session file is not a session.
        OSError: the output cannot be written.
    """
    t_start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [load(p, settings, data_dir) for p in paths]
    runs.sort(key=lambda r: (str(r.session.get("timestamp_utc") or ""), r.run_id))
    tuning = settings.tuning
    doc = _Doc(out.parent if png else None, out.stem)
    notes: list[str] = []
    title = (
        f"dynoai report: {runs[0].run_id}"
        if len(runs) == 1
        else f"dynoai report: {len(runs)} runs, {runs[0].run_id} .. {runs[-1].run_id}"
    )
    doc.add(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="note">dynoai {_e(__version__)}, generated '
        f"{_e(datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%SZ'))}; "
        "self-contained: opens offline.</p>"
    )
    doc.add("<h2>Summary</h2>" + _summary(runs))
    doc.add("<h2>Power and torque</h2>")
    fig = plots.power_figure(runs)
    if fig is None:
        doc.add('<p class="note">no power or torque recorded in the raw run(s)</p>')
    doc.figure("power", fig)
    doc.add("<h2>AFR vs RPM</h2>")
    fig = plots.afr_figure(runs)
    if fig is None:
        doc.add('<p class="note">no AFR recorded in the raw run(s)</p>')
    doc.figure("afr", fig)
    doc.add("<h2>Intake air temperature</h2>")
    fig = plots.iat_figure(runs, tuning.heat_soak_iat_f)
    if fig is None:
        doc.add('<p class="note">no IAT recorded in the raw run(s)</p>')
    doc.figure("iat", fig)
    for k, run in enumerate(runs):
        if doc.size > MAX_BYTES * 0.8:
            notes.append(
                f"stopped at {k} of {len(runs)} run sections to stay under "
                f"{MAX_BYTES // (1024 * 1024)} MB"
            )
            doc.add(f'<p class="note">{_e(notes[-1])}</p>')
            break
        s = run.session
        doc.add(f'<h2 id="run-{_e(run.run_id)}">Run {_e(run.label)}</h2>')
        if run.raw_note:
            notes.append(f"{run.run_id}: {run.raw_note}")
            doc.add(f'<p class="note">{_e(run.raw_note)}</p>')
        doc.add('<h3>What the session found</h3><ul class="words">')
        for line in words.grid_summary(s, tuning.max_correction_pct) + words.patterns(s):
            doc.add(f"<li>{_e(line)}</li>")
        doc.add("</ul>")
        doc.add("<h3>VE correction</h3>")
        fig = plots.ve_figure(run, tuning.max_correction_pct, tuning.min_weight)
        if fig is None:
            doc.add('<p class="note">no cell reached the minimum weight</p>')
        doc.figure(f"ve-{k + 1}", fig)
        doc.add("<h3>Knock</h3>")
        fig = plots.knock_figure(run)
        if fig is None:
            doc.add("<p>No knock retard recorded.</p>")
        doc.figure(f"knock-{k + 1}", fig)
        doc.add("<h3>Decel and coast</h3>")
        fig = plots.decel_figure(run, tuning.decel_tps_pct)
        if fig is None:
            doc.add('<p class="note">no closed-throttle coast above 1500 rpm in this run</p>')
        doc.figure(f"decel-{k + 1}", fig)
        doc.add("<h3>Build and conditions</h3>")
        doc.add(_table(words.flat(s.get("build_config")), ("build", "")))
        cond = words.flat(s.get("conditions"))
        _cf, name = plots.correction_of(run)
        doc.add(_table(cond or [("conditions", "unknown: power shown uncorrected")],
                       ("conditions", name)))  # fmt: skip
        doc.add("<h3>Alerts</h3>" + _alerts(run))
    doc.add("</body></html>\n")
    text = "".join(doc.parts)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Built(
        path=out,
        size=len(text.encode("utf-8")),
        runs=len(runs),
        figures=doc.figures,
        pngs=doc.pngs,
        notes=notes,
        seconds=time.perf_counter() - t_start,
    )

"""Regenerate the small foreign-format fixtures under tests/data/logs/ (deterministic).

``ms2extra_x100_target.msl`` (MS2Extra 2.1.0p layout: unterminated quoted title, no units
row, ``AFR Target 1`` stored as AFR x 100, degF), ``speeduino_blank_degc.msl`` (Speeduino
title, units row with blank temperature units, values in degC) and
``romraider_semicolon.csv`` (``;``-separated, decimal comma, ``Time (msec)``, MAP in bar,
wideband in lambda), all from one synthetic log with known truth (VE 3 % short).

Run: .venv/bin/python -m tests.make_foreign_logs
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.synth import Plan, make_log

OUT = Path(__file__).parent / "data" / "logs"


def _dc(x: float, digits: int) -> str:
    return f"{x:.{digits}f}".replace(".", ",")


def main() -> None:
    ratio = np.ones((19, 18)) * 1.03
    steps: list[tuple[object, ...]] = [("idle", 1)]
    steps += [("hold", r, k, 2.0) for r in (2500, 3000) for k in (50, 80)]
    steps += [("idle", 6)]
    f = make_log(Plan(steps, rate_hz=20.0), ratio, ratio, seed=5, noise=0.03)
    t, c = f.t, f.columns
    n = len(t)
    names = ["Time", "RPM", "MAP", "TP", "AFR", "MAT", "CLT", "AFR Target 1", "SparkAdv"]
    lines = ['"MS2Extra Rel 2.1.0p', "\t".join(names)]
    for i in range(n):
        row = [
            f"{t[i]:.3f}", f"{c['rpm'][i]:.0f}", f"{c['map_kpa'][i]:.1f}",
            f"{c['tps_pct'][i]:.1f}", f"{c['afr_front'][i]:.1f}", "95.0", "186.0",
            f"{c['afr_target'][i] * 100:.0f}", "28.0",
        ]  # fmt: skip
        lines.append("\t".join(row))
    (OUT / "ms2extra_x100_target.msl").write_text("\n".join(lines) + "\n")
    names = ["Time", "RPM", "MAP", "TPS", "AFR", "Lambda", "IAT", "CLT", "AFR Target"]
    lines = [
        '"speeduino 202103: Speeduino 2021.03"',
        '"Capture Date: Wed Sep 07 10:54:56 CEST 2022"',
        "\t".join(names),
        "\t".join(["s", "rpm", "kpa", "%", "O2", "", "", "", "O2"]),
    ]
    for i in range(n):
        afr = c["afr_front"][i]
        row = [
            f"{t[i]:.3f}", f"{c['rpm'][i]:.0f}", f"{c['map_kpa'][i]:.0f}",
            f"{c['tps_pct'][i]:.0f}", f"{afr:.1f}", f"{afr / 14.7:.3f}", "35", "88",
            f"{c['afr_target'][i]:.1f}",
        ]  # fmt: skip
        lines.append("\t".join(row))
    (OUT / "speeduino_blank_degc.msl").write_text("\n".join(lines) + "\n")
    lines = [
        "Time (msec);Timing Advance (degrees);PLX Engine Speed (rpm);"
        "PLX Manifold Absolute Pressure (bar);PLX O2 - Wideband (Lambda);"
        "Throttle Opening Angle (%);Coolant Temperature (C)"
    ]
    for i in range(n):
        row = [
            f"{t[i] * 1000:.0f}", _dc(20.0, 2), f"{c['rpm'][i]:.0f}",
            _dc(c["map_kpa"][i] / 100, 3), _dc(c["afr_front"][i] / 14.7, 3),
            _dc(c["tps_pct"][i], 1), _dc(90.0, 1),
        ]  # fmt: skip
        lines.append(";".join(row))
    (OUT / "romraider_semicolon.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""``dynoai predict``: the pattern models' predictions for one build.

``--build FILE`` is a TOML file with a ``[build]`` table (a scenario file works),
validated as the seed's BuildConfiguration exactly as ``build/set`` is (a field left out
stays missing and the models impute it, never a simulator default); an
optional ``[conditions]`` table (ambient_temp_f, barometric_pressure_inhg, altitude_ft,
iat_peak_f) sets the day and an optional ``[heat_soak]`` table (iat_peak_f,
iat_soak_time_min, airflow_cfm, iat_initial_f) the soak to predict the inflation for.
Models come from ``--models`` (default ``./dynoai-data/models``) and are loaded only after
the folder, every type in every file and the card's scikit-learn version are checked.
Prints a table on a terminal or plain text otherwise; ``--json`` prints the predictions
with the kinds as top-level keys.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

DEFAULT_MODELS = "dynoai-data/models"


def add_parser(sub: Any) -> None:
    """Register ``predict``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "predict", help="predict VE deltas, imbalance, pops, heat soak, timing for a build"
    )
    p.add_argument("--build", required=True, metavar="BUILD.toml", help="file with a [build] table")
    p.add_argument("--models", metavar="DIR", help=f"model folder (default ./{DEFAULT_MODELS})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def read_build_file(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The build (validated as the seed's BuildConfiguration), conditions and heat inputs.

    Raises:
        InputError: unreadable file, bad TOML, no [build], or an invalid field (named).
    """
    from pydantic import ValidationError

    from dynoai_daemon.errors import InputError
    from dynoai_daemon.models import BuildConfiguration

    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"build file not readable: {exc.strerror or exc}, {path}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"build file is not valid TOML: {exc}, {path}") from exc
    raw = doc.get("build")
    if not isinstance(raw, dict):
        raise InputError(f"no [build] table, {path}")
    try:
        build = BuildConfiguration.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise InputError(f"build.{where}: {e['msg']}, {path}") from exc
    out = build.model_dump(mode="json")
    c_raw, h_raw = doc.get("conditions"), doc.get("heat_soak")
    cond: dict[str, Any] = c_raw if isinstance(c_raw, dict) else {}
    heat: dict[str, Any] = h_raw if isinstance(h_raw, dict) else {}
    for name, table in (("conditions", cond), ("heat_soak", heat)):
        for k, v in table.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                if name == "conditions" and k not in _NUMERIC_CONDITIONS:
                    continue
                raise InputError(f"{name}.{k} must be a number, {path}")
    return out, dict(cond), dict(heat)


_NUMERIC_CONDITIONS = {"ambient_temp_f", "barometric_pressure_inhg", "altitude_ft", "iat_peak_f"}


def run(args: argparse.Namespace) -> int:
    """Predict; exit 2 on a bad build file or a refused models folder."""
    from dynoai_daemon.ml.predict import predict_build
    from dynoai_daemon.ml.store import load_models

    build, cond, heat = read_build_file(args.build)
    models, card = load_models(args.models or DEFAULT_MODELS)
    pred = predict_build({k: m for k, m in models.items()}, build, conditions=cond, heat=heat)
    if args.json:
        print(json.dumps(pred, indent=1))
        return 0
    _print_table(pred, card)
    return 0


def _vu(d: dict[str, Any]) -> str:
    return f"{d['value']:+.2f} ± {d['uncertainty']:.2f}"


def _print_table(pred: dict[str, Any], card: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dynoai predictions", show_lines=False)
    table.add_column("model")
    table.add_column("prediction")
    table.add_column("value ± uncertainty", justify="right")
    ve = pred.get("ve_scaling", {})
    for k in ("ve_delta_idle", "ve_delta_cruise", "ve_delta_midrange", "ve_delta_wot"):
        if k in ve:
            table.add_row("ve_scaling", f"{k} (%)", _vu(ve[k]))
    imb = pred.get("cylinder_imbalance")
    if imb is not None:
        cells = imb["imbalance_cells"]
        shown = ", ".join(
            f"{c['rpm']:.0f}/{c['map_kpa']:.0f} {c['afr_delta']:+.2f}" for c in cells[:6]
        )
        table.add_row("cylinder_imbalance", "cells |rear-front| >= 0.5 AFR", shown or "none")
    dec = pred.get("decel_popping", {})
    if "pop_probability" in dec:
        p = dec["pop_probability"]
        table.add_row(
            "decel_popping", "pop probability", f"{p['value']:.2f} ± {p['uncertainty']:.2f}"
        )
    for z in dec.get("enrichment_zones", []):
        table.add_row(
            "decel_popping",
            f"enrichment {z['rpm_min']:.0f}-{z['rpm_max']:.0f} rpm (%)",
            f"{z['enrichment_pct']:+.1f} ± {z['uncertainty']:.1f}",
        )
    heat = pred.get("heat_soak")
    if heat is not None:
        table.add_row("heat_soak", "VE inflation (%)", _vu(heat["ve_inflation_pct"]))
    kn = pred.get("knock_timing", {})
    for k in (
        "safe_advance_idle",
        "safe_advance_cruise",
        "safe_advance_midrange",
        "safe_advance_wot",
    ):
        if k in kn:
            table.add_row("knock_timing", f"{k} (deg)", _vu(kn[k]))
    con = Console()
    con.print(table)
    con.print(
        f"models trained on dataset {str(card.get('dataset_digest', '?'))[:12]}", highlight=False
    )

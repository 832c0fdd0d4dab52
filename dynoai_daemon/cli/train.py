"""``dynoai train``: fit the five pattern models on the sessions of a data directory.

Reads ``<data-dir>/sessions/*.json`` one at a time (an iterable of session dicts, so a
database reader can take its place), builds the training tables, fits one model per
pattern kind with build-grouped cross-validation against the per-family baseline, prints
the CV table, and writes ``<models>/<kind>.skops`` and ``<models>/model_card.json``
(default ``<data-dir>/models``). Kinds without enough data are listed with the reason and
get no file. With ``--db URL`` the sessions come from the fleet collector's PostgreSQL
store instead, streamed through a server-side cursor (never all in memory at once).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "dynoai-data"


def add_parser(sub: Any) -> None:
    """Register ``train``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "train", help="fit the pattern models on stored sessions (grouped CV by build)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (its data_dir)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", metavar="DIR", help=f"sessions (default ./{DEFAULT_DATA_DIR})")
    src.add_argument(
        "--db",
        metavar="URL",
        help="read the sessions from the collector's PostgreSQL store instead (dynoai collect)",
    )
    p.add_argument("--models", metavar="DIR", help="output folder (default <data-dir>/models)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the forests")
    p.set_defaults(handler=run)


def data_dir_of(args: argparse.Namespace) -> Path:
    """The data directory: ``--data-dir``, else the config's, else ./dynoai-data."""
    if args.data_dir:
        return Path(args.data_dir)
    if getattr(args, "config", None):
        from dynoai_daemon.cli.common import settings_from_args

        return Path(settings_from_args(args).data_dir)
    return Path.cwd() / DEFAULT_DATA_DIR


def run(args: argparse.Namespace) -> int:
    """Train; exit 0 when at least one model was written, 2 when none could be."""
    from dynoai_daemon.collect.reader import iter_sessions
    from dynoai_daemon.errors import InputError
    from dynoai_daemon.ml.store import save_models
    from dynoai_daemon.ml.targets import collect, iter_session_files
    from dynoai_daemon.ml.training import KindResult, model_card, train_all, trained_models

    data_dir = data_dir_of(args)
    models_dir = Path(args.models) if args.models else data_dir / "models"
    t0 = time.perf_counter()
    where = "the database" if args.db else str(data_dir / "sessions")
    source = iter_sessions(args.db) if args.db else iter_session_files(data_dir)
    tables = collect(source)
    if tables.sessions == 0:
        raise InputError(f"no sessions to learn from, {where}")
    print(
        f"{tables.sessions} session(s) read from {where}"
        + (
            f", {tables.skipped_no_build} without a build (skipped)"
            if tables.skipped_no_build
            else ""
        )
    )
    print(
        f"{'model':20s} {'part':11s} {'metric':8s} {'cv model':>9s} {'baseline':>9s} "
        "folds builds sessions"
    )

    def show(r: KindResult) -> None:
        if r.skipped is not None:
            print(f"{r.kind:20s} not trained: {r.skipped}")
            return
        for p in r.parts:
            cv = p.cv
            mark = "better" if cv["model"] < cv["baseline"] else "NOT better"
            print(
                f"{r.kind:20s} {p.name:11s} {cv['metric']:8s} {cv['model']:9.4f} "
                f"{cv['baseline']:9.4f} {cv['folds']:5d} {r.n_builds:6d} {r.n_sessions:8d}  {mark}"
            )
        sys.stdout.flush()

    results = train_all(tables, seed=args.seed, on_kind=show)
    trained = trained_models(results)
    if not trained:
        raise InputError(f"no model could be trained from {tables.sessions} session(s), {data_dir}")
    card = model_card(results, tables)
    save_models(models_dir, trained, card)
    print(
        f"wrote {len(trained)} model(s) ({', '.join(trained)}) and model_card.json to "
        f"{models_dir} in {time.perf_counter() - t0:.1f} s"
    )
    return 0

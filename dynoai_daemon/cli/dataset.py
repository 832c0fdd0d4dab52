"""``dynoai dataset export``: the training dataset as the seed's ``dataset.json``.

The daemon keeps the dataset append-only in ``<data_dir>/dataset.jsonl`` (one line per
session); this writes the whole TrainingDataset JSON (sessions, pattern lists and
``summary``) on demand, atomically, to ``<data_dir>/dataset.json`` or ``-o FILE``.
"""

from __future__ import annotations

import argparse
from typing import Any

from dynoai_daemon.cli.common import add_config_args, settings_from_args
from dynoai_daemon.errors import InputError
from dynoai_daemon.store import SessionStore, StoreFileError, save_dataset


def add_parser(sub: Any) -> None:
    """Register ``dataset`` and its ``export`` action."""
    p: argparse.ArgumentParser = sub.add_parser("dataset", help="training dataset tools")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    exp = dsub.add_parser("export", help="write the dataset as TrainingDataset JSON")
    add_config_args(exp)
    exp.add_argument("-o", "--output", metavar="FILE", help="default: <data_dir>/dataset.json")
    exp.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export the dataset; prints what was written.

    Raises:
        InputError: the stored dataset is unreadable or invalid (exit 2).
        StoreFileError: the output cannot be written (exit 1).
    """
    settings = settings_from_args(args)
    store = SessionStore(settings.data_dir)
    try:
        dataset = store.load_dataset()
    except StoreFileError as exc:
        raise InputError(str(exc)) from exc

    out = save_dataset(dataset, args.output or store.export_path)
    summary = dataset.summary()
    counts = ", ".join(f"{k} {v}" for k, v in summary["pattern_counts"].items())
    print(f"exported {summary['total_sessions']} session(s) ({counts}) to {out}")
    return 0

"""``dynoai drivers``: the registered drivers and whether each can be built here."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``drivers``."""
    p: argparse.ArgumentParser = sub.add_parser("drivers", help="list the registered drivers")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per driver: name, kind, available or why not."""
    from drivers.registry import REGISTRY, available, driver_class

    del args
    status = available()
    for name in sorted(REGISTRY):
        why = status[name]
        if why is None:
            cls = driver_class(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:14s} {cls.kind:7s} available   {doc}")
        else:
            print(f"{name:14s} {'-':7s} unavailable {why}")
    return 0

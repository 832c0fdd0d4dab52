"""The synchronous, numpy-only tuning core: grid, gates, transport delay, runs.

Import :class:`Core` and feed it :class:`~dynoai_daemon.channels.Frame` batches; it emits
run events whose closed runs go to :mod:`dynoai_daemon.patterns` for session building.
"""

from dynoai_daemon.core.engine import Core, target_from_table, transport_delay_s
from dynoai_daemon.core.grid import Grid
from dynoai_daemon.core.runs import (
    CoreEvent,
    DecelEvent,
    FeedResult,
    OpenRun,
    RunClosed,
    RunDiscarded,
    RunStarted,
)

__all__ = [
    "Core",
    "CoreEvent",
    "DecelEvent",
    "FeedResult",
    "Grid",
    "OpenRun",
    "RunClosed",
    "RunDiscarded",
    "RunStarted",
    "target_from_table",
    "transport_delay_s",
]

"""One source per channel: which of several sources reporting the same channel is used.

A dyno cell often has the same quantity from two places: engine RPM from the ECU and from
the dyno's pickup, MAP from the ECU and a dyno-side sensor. Interleaving both into one
channel makes the channel jump between two readings with different latency and
calibration, so a cell's RPM or MAP would flicker between neighbouring cells (seen in a
fast decel as knock binned several hundred rpm away from where it happened).

The rule: the source listed first in the config (``[[sources]]`` order) owns a channel
while it keeps reporting it; a later-listed source's values of that channel are dropped
(counted as shadowed) unless the owner has been silent on that channel for ``hold_s``
seconds, in which case the later source takes over until the owner reports again. A
channel only one source reports is never touched. No I/O; the daemon calls
:meth:`ChannelArbiter.admit` on every sample before the core sees it.
"""

from __future__ import annotations

from collections.abc import Iterable

from dynoai_daemon.channels import Sample

#: Seconds a channel's owner may be silent before a lower-priority source takes over.
DEFAULT_HOLD_S = 0.5


class ChannelArbiter:
    """Chooses, per channel, the highest-priority source that is currently reporting it.

    Args:
        sources: source names, highest priority first (the config's order). A source not
            listed ranks after every listed one.
        hold_s: how long an owner's silence on a channel is tolerated before a
            lower-priority source's values are used instead.
    """

    def __init__(self, sources: Iterable[str], *, hold_s: float = DEFAULT_HOLD_S) -> None:
        self._rank = {name: i for i, name in enumerate(sources)}
        self._unranked = len(self._rank)
        self.hold_s = float(hold_s)
        #: channel -> (rank of the owning source, time of its last accepted value)
        self._owner: dict[str, tuple[int, float]] = {}
        #: values dropped because a higher-priority source owned the channel
        self.shadowed = 0

    def owner_of(self, channel: str) -> int | None:
        """The rank of the source that currently owns ``channel`` (None: nobody yet)."""
        cur = self._owner.get(channel)
        return None if cur is None else cur[0]

    def admit(self, s: Sample) -> bool:
        """True when ``s`` should reach the core; False (and counted) when shadowed."""
        rank = self._rank.get(s.source, self._unranked)
        cur = self._owner.get(s.channel)
        if cur is None or rank <= cur[0] or s.t - cur[1] > self.hold_s:
            self._owner[s.channel] = (rank, s.t)
            return True
        self.shadowed += 1
        return False

"""The one retry schedule of the project: capped exponential backoff with jitter.

Drivers (ports, buses, sockets) and the MQTT connection retry with the same
:class:`Backoff`. The delay doubles on every failure up to a cap; each wait is drawn
between half and all of the current step (jitter, so stations on one broker do not
retry in lock-step). :class:`RetryState` holds the failure count of one link and resets
it only after the link stayed healthy for ``healthy_s`` seconds, so a flapping port that
opens, sends a few bytes and drops again is retried at a growing interval instead of
every 0.1 s forever.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_HEALTHY_S = 10.0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter.

    Attributes:
        initial_s: the first step, in seconds.
        max_s: the cap, in seconds.
        factor: growth per failure.
        healthy_s: how long a link must stay up before its failure count resets.
    """

    initial_s: float = 0.2
    max_s: float = 10.0
    factor: float = 2.0
    healthy_s: float = DEFAULT_HEALTHY_S

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the wait before retry number ``attempt`` (0-based): in [step/2, step]."""
        step = min(self.max_s, self.initial_s * self.factor ** max(0, attempt))
        r = (rng or random).random()
        return step * (0.5 + 0.5 * r)


class RetryState:
    """Failure count of one link under a :class:`Backoff`.

    Args:
        backoff: the schedule.
    """

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.failures = 0
        self._up_since: float | None = None

    def up(self, now: float) -> None:
        """The link came up at ``now`` (monotonic seconds)."""
        self._up_since = now

    def failed(self, now: float) -> float:
        """The link failed (or would not open) at ``now``; return the wait before retrying.

        The count resets first if the link had been up for at least ``healthy_s``.
        """
        since, self._up_since = self._up_since, None
        if since is not None and now - since >= self.backoff.healthy_s:
            self.failures = 0
        delay = self.backoff.delay(self.failures)
        self.failures += 1
        return delay


__all__ = ["DEFAULT_HEALTHY_S", "Backoff", "RetryState"]

"""Reconnect and retry delays, shared by the daemons (broker links, webhook deliveries)."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(attempt: int, low: float, high: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Equal-jitter exponential backoff: half the capped delay plus a random part of the rest."""
    capped = min(high, low * 2.0 ** min(attempt, 30))
    return capped / 2 + rand() * capped / 2

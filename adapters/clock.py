"""Injected time: the one :class:`Clock` protocol of the code base. Production uses
:class:`SystemClock`; tests drive a :class:`FakeClock`.

It lives in ``adapters/`` (the bottom layer) so that the engine pools, the scraper and the
router take the same clock as the scheduler, the policies and the admission core above
them. Wall-clock ``time()`` is for what replicas share (limits, leases, deadlines);
``monotonic()`` for durations and scrape ages.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (limits, quotas, leases)."""

    def monotonic(self) -> float:
        """Monotonic seconds (durations)."""


class SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.perf_counter()


class FakeClock:
    """A clock that moves only when told to (``advance``)."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 0.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

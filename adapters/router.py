"""Which backend should take this request? The one with the most free predicted capacity.

The router only picks a *fallback*: admission (the shared queue's ledger) names the engine
of every request, and the router is asked only when that engine is gone or refused the
connection. Two views of an engine's load are combined:

* ``Backend.in_flight`` -- the requests this gateway is sending there now (no lag);
* the engine's ``/metrics`` -- requests running + waiting and KV-cache usage -- which also
  sees other replicas' traffic, but lags by up to a scrape.

Each quantity takes the *larger* of the two views (a fresh scrape only; older metrics are
ignored): ``seqs = max(in_flight, running + waiting)`` and
``used = kv_cache_usage_perc * kv_capacity_tokens`` (0 when not scraped).

Ranking, best first:

1. the request *fits*: ``free tokens >= footprint`` and at least one free sequence slot
   (unknown capacities count as infinite);
2. more free tokens left after placing it (``capacity - used - footprint``);
3. fewer requests (``seqs`` above);
4. configuration order (the order of ``candidates``).

When nothing fits the best-ranked backend is still returned: admission (whether to send at
all) is the gateway's decision, not the router's. Non-routable candidates are skipped.
"""

from __future__ import annotations

import math

from adapters.base import Backend
from adapters.clock import Clock, SystemClock

TYPE = "least-loaded"


class LeastLoadedRouter:
    """Most free predicted capacity; stateless apart from its clock. Safe to share."""

    def __init__(self, *, metrics_max_age_s: float = 5.0, clock: Clock | None = None) -> None:
        #: scraped metrics older than this (``clock.monotonic()`` seconds) are ignored
        self.metrics_max_age_s = metrics_max_age_s
        self._clock: Clock = clock or SystemClock()

    def load(self, b: Backend) -> tuple[float, float]:
        """``(used tokens, busy sequences)`` of ``b``, combining both views (module doc)."""
        used = 0.0
        seqs = float(b.in_flight)
        m = b.metrics
        if m.scraped_at > 0 and self._clock.monotonic() - m.scraped_at <= self.metrics_max_age_s:
            seqs = max(seqs, m.num_requests_running + m.num_requests_waiting)
            if b.kv_capacity_tokens is not None:
                used = max(used, m.kv_cache_usage_perc * b.kv_capacity_tokens)
        return used, seqs

    def _key(self, b: Backend, footprint: int) -> tuple[bool, float, float]:
        used, seqs = self.load(b)
        cap = math.inf if b.kv_capacity_tokens is None else float(b.kv_capacity_tokens)
        max_seqs = math.inf if b.max_num_seqs is None else float(b.max_num_seqs)
        headroom = cap - used - footprint
        fits = headroom >= 0 and max_seqs - seqs >= 1
        return fits, headroom, -seqs

    def pick(self, candidates: list[Backend], footprint_tokens: int) -> Backend | None:
        """The best routable backend of ``candidates``; ``None`` when there is none.

        Ties break on the order of ``candidates`` (the first wins).
        """
        best: Backend | None = None
        best_key: tuple[bool, float, float] | None = None
        for b in candidates:
            if not b.routable:
                continue
            key = self._key(b, footprint_tokens)
            if best_key is None or key > best_key:
                best, best_key = b, key
        return best

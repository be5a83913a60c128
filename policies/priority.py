"""``priority``: QoS class levels with aging — batch traffic is delayed, never starved.

Key (seconds; lower first)::

    key(r) = arrival(r) + level(r) * aging_s

Why this is aging. A request's *effective level* at time ``t`` is
``level - (t - arrival) / aging_s``: it rises by one level every ``aging_s`` seconds of wait.
For any common ``t``, ``key(r) = t + aging_s * effective_level(r, t)``, so ordering by key is
ordering by effective level, at every instant at once. The key does not depend on ``t``,
so it is computed once at enqueue and stored as a Redis sorted-set score (ZADD/ZPOPMIN);
nothing is ever re-scored.

The bound (proof). Let levels lie in ``[Lmin, Lmax]`` and ``B = (Lmax - Lmin) * aging_s``.
A request ``r'`` is served before a queued ``r`` only if ``key(r') <= key(r)``, i.e.
``arrival(r') <= arrival(r) + (level(r) - level(r')) * aging_s <= arrival(r) + B``.
Hence (1) ``r`` is never passed by a request that arrived more than ``B`` seconds after
it; (2) a request of a *lower* class (larger level) passes a higher-class ``r`` only if it
had already waited ``(level(r') - level(r)) * aging_s`` when ``r`` arrived; (3) on a
work-conserving single server, the work served before ``r`` is a subset of the work a FCFS
queue would serve before a request arriving at ``arrival(r) + B``, so ``r``'s wait is at most
``B`` plus that request's FCFS wait. Defaults (levels 0..2, ``aging_s = 5``): B = 10 s.

Reads: the request's ``level`` and ``arrival`` only (no tenant state, no accounting).
Parameters: ``aging_s`` (float > 0, default 5.0): seconds of wait worth one level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.base import Policy, QueuedRequest, TenantState
from policies.registry import check, parse_parameters

TYPE = "priority"


@dataclass(frozen=True, slots=True)
class PriorityParams:
    aging_s: float = 5.0

    def __post_init__(self) -> None:
        check("aging_s", self.aging_s)


class AgedLevel:
    """:class:`policies.base.OrderingPolicy`: ``arrival + level * aging_s`` (module doc)."""

    __slots__ = ("aging_s",)

    def __init__(self, aging_s: float) -> None:
        self.aging_s = aging_s

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        return req.arrival + req.level * self.aging_s

    def effective_level(self, req: QueuedRequest, now: float) -> float:
        """The level ``req`` has reached by ``now`` (for metrics and the admin API)."""
        return req.level - max(0.0, now - req.arrival) / self.aging_s

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        return max(0, max_level - min_level) * self.aging_s


def build(parameters: Mapping[str, Any]) -> Policy:
    p = parse_parameters(TYPE, parameters, PriorityParams)
    return Policy(TYPE, AgedLevel(p.aging_s))

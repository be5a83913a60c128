"""``fcfs``: one global queue in arrival order. The baseline every other policy is measured by.

Key: ``arrival``. Ties (same arrival) are broken by request id. Nothing is read from the
tenant's state and no per-tenant accounting is kept; admission (limits, capacity) is the
admission core's (:mod:`proxy.admission.core`). Aging bound: 0 (no request ever passes an
earlier one).

Parameters: none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.base import Policy, QueuedRequest, TenantState
from policies.registry import parse_parameters

TYPE = "fcfs"


@dataclass(frozen=True, slots=True)
class FcfsParams:
    """No parameters (unknown keys are still errors)."""


class ArrivalOrder:
    """:class:`policies.base.OrderingPolicy` by arrival time."""

    __slots__ = ()

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        return req.arrival

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        return 0.0


def build(parameters: Mapping[str, Any]) -> Policy:
    parse_parameters(TYPE, parameters, FcfsParams)
    return Policy(TYPE, ArrivalOrder())

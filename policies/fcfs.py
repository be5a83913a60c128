"""``fcfs``: one global queue in arrival order. The baseline every other policy is measured by.

Key: ``arrival``. Ties (same arrival) are broken by request id. Nothing is read from the
tenant's state and no per-tenant accounting is kept; admission is by predicted footprint
(:mod:`policies.admission`). Aging bound: 0 (no request ever passes an earlier one).

Parameters: ``retry_after_s`` (float, default 1.0): ``retry-after`` of a queue timeout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.admission import FootprintAdmission
from policies.base import Policy, QueuedRequest, TenantState
from policies.registry import check, parse_parameters

TYPE = "fcfs"


@dataclass(frozen=True, slots=True)
class FcfsParams:
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        check("retry_after_s", self.retry_after_s, strict=False)


class ArrivalOrder:
    """:class:`policies.base.OrderingPolicy` by arrival time. Also the in-tenant order of
    ``fair`` (VTC serves each tenant's own requests first come, first served)."""

    __slots__ = ()

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        return req.arrival

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        return 0.0


def build(parameters: Mapping[str, Any]) -> Policy:
    p = parse_parameters(TYPE, parameters, FcfsParams)
    return Policy(TYPE, ArrivalOrder(), FootprintAdmission(p.retry_after_s))

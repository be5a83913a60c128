"""``fair``: VTC — weighted virtual token counters per tenant (Sheng et al., OSDI '24).

Each tenant has a virtual counter of the service it received, in weighted tokens::

    charge(r) = (input_weight * prompt + output_weight * output) / weight(r)

charged with the *predicted* output (median, capped by ``max_tokens``) at admission and
corrected by ``output_weight * (actual - predicted) / weight`` at completion (or
cancellation), so the counter ends at the true cost. A tenant returning from idle is lifted
to the minimum counter of the backlogged tenants (to the system floor when none is), so
idleness banks no credit.

Order: exact VTC. The admission queue runs in ``"counter"`` order
(:mod:`proxy.admission.core`): at every grant it serves the backlogged tenant whose counter
is lowest, its own requests first come, first served (the key is 0.0), and a counter
change (a grant's charge, a release's correction) re-ranks that tenant at once. The
counters live in the queue (the Lua scripts on Redis), so every replica serves from one
ledger. There is no aging bound in seconds.

Guarantee (the VTC paper's bound for backlogged tenants): while tenants stay
backlogged, the difference between the weighted service any two of them have received is
bounded by a constant (of the order of the largest request's charge times the number of
engine sequences), whatever their request sizes and rates; with the completion correction
that holds for the true costs, not just the predicted ones.

Charges are additive increments; the lift is a ``max`` at enqueue.

Parameters: ``input_weight`` (default 1.0), ``output_weight`` (default 2.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.base import Policy, QueuedRequest, TenantState
from policies.registry import check, parse_parameters

TYPE = "fair"


@dataclass(frozen=True, slots=True)
class FairParams:
    input_weight: float = 1.0
    output_weight: float = 2.0

    def __post_init__(self) -> None:
        check("input_weight", self.input_weight, strict=False)
        check("output_weight", self.output_weight)


class VirtualTokenCounter:
    """:class:`~policies.base.ChargeModel` of VTC (module doc). Immutable."""

    __slots__ = ("input_weight", "output_weight")

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight

    def charge(self, req: QueuedRequest) -> float:
        """The grant charge of ``req``: prompt and predicted output, over its weight."""
        cost = self.input_weight * req.prompt_tokens + self.output_weight * req.predicted_output
        return cost / req.weight

    def correction(self, req: QueuedRequest, actual_output_tokens: int) -> float:
        """What release adds to the grant charge (negative if over-predicted)."""
        return self.output_weight * (actual_output_tokens - req.predicted_output) / req.weight


class TenantFifo:
    """Ordering of ``fair``: 0.0 for every request, so in the queue's counter order a
    tenant's own requests are served in arrival order (module doc)."""

    __slots__ = ()

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        return 0.0

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        return math.inf


def build(parameters: Mapping[str, Any]) -> Policy:
    p = parse_parameters(TYPE, parameters, FairParams)
    vtc = VirtualTokenCounter(p.input_weight, p.output_weight)
    return Policy(TYPE, TenantFifo(), fair_share=vtc, order="counter")

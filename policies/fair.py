"""``fair``: VTC — weighted virtual token counters per tenant (Sheng et al., OSDI '24).

Each tenant has a virtual counter of the service it received, in weighted tokens::

    charge(r) = (input_weight * prompt + output_weight * output) / weight(r)

charged with the *predicted* output (median, capped by ``max_tokens``) at admission and
corrected by ``output_weight * (actual - predicted) / weight`` at completion (or
cancellation), so the counter ends at the true cost. A tenant returning from idle is lifted
to the minimum counter of the backlogged tenants (to the system floor when none is), so
idleness banks no credit.

Queue key (the admission queue has one order over flows, see :mod:`proxy.admission.core`):
the tenant's *virtual finish time* at enqueue, ``virtual_counter + queued_charge`` (the
request's own charge included), as in start-time / weighted fair queueing: a burst is
spread over the virtual timeline and other tenants' requests interleave with it. Keys are
fixed at enqueue, so a correction moves only later requests; there is no aging bound in
seconds. (Exact VTC, which picks the backlogged tenant with the lowest counter at every
dispatch, needs the counters inside the admission core; not built yet.)

Guarantee: while tenants stay backlogged, their finish tags advance in proportion to the
service they receive over their weights, so the tokens they receive converge to the ratio
of their weights, whatever their request sizes (the completion correction settles wrong
predictions for later requests).

Charges are additive increments; the lift is a ``max`` at enqueue.

Parameters: ``input_weight`` (default 1.0), ``output_weight`` (default 2.0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
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


def system_floor(counters: Iterable[float], last_drained: float) -> float:
    """The engine's ``virtual_floor``: the minimum counter of the backlogged tenants, or
    ``last_drained`` (the counter of the tenant whose queue emptied last) when none is."""
    return min(counters, default=last_drained)


class VirtualTokenCounter:
    """:class:`Accounting` of VTC (module doc). Immutable."""

    __slots__ = ("input_weight", "output_weight")

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight

    def charge(self, req: QueuedRequest) -> float:
        """The admission charge of ``req``: prompt and predicted output, over its weight."""
        cost = self.input_weight * req.prompt_tokens + self.output_weight * req.predicted_output
        return cost / req.weight

    def correction(self, req: QueuedRequest, actual_output_tokens: int) -> float:
        """What completion adds to the admission charge (negative if over-predicted)."""
        return self.output_weight * (actual_output_tokens - req.predicted_output) / req.weight

    def on_enqueue(
        self,
        state: TenantState,
        req: QueuedRequest,
        backlogged: Mapping[str, TenantState],
        now: float,
    ) -> TenantState:
        counter = state.virtual_counter
        if state.name not in backlogged:
            floor = (s.virtual_counter for s in backlogged.values())
            counter = max(counter, system_floor(floor, state.virtual_floor))
        queued = state.queued_charge + self.charge(req)
        return replace(state, virtual_counter=counter, queued_charge=queued)

    def on_admit(self, state: TenantState, req: QueuedRequest, now: float) -> TenantState:
        c = self.charge(req)
        return replace(
            state,
            virtual_counter=state.virtual_counter + c,
            queued_charge=max(0.0, state.queued_charge - c),
        )

    def on_cancel(self, state: TenantState, req: QueuedRequest, now: float) -> TenantState:
        return replace(state, queued_charge=max(0.0, state.queued_charge - self.charge(req)))

    def on_complete(
        self, state: TenantState, req: QueuedRequest, actual_output_tokens: int, now: float
    ) -> TenantState:
        delta = self.correction(req, actual_output_tokens)
        return replace(state, virtual_counter=state.virtual_counter + delta)


class VirtualFinishOrder:
    """Ordering of ``fair``: ``max(virtual_floor, virtual_counter + queued_charge)``,
    evaluated after :meth:`VirtualTokenCounter.on_enqueue` (module doc)."""

    __slots__ = ()

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        return max(tenant.virtual_floor, tenant.virtual_counter + tenant.queued_charge)

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        return math.inf


def build(parameters: Mapping[str, Any]) -> Policy:
    p = parse_parameters(TYPE, parameters, FairParams)
    vtc = VirtualTokenCounter(p.input_weight, p.output_weight)
    return Policy(TYPE, VirtualFinishOrder(), accounting=vtc)

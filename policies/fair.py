"""``fair``: VTC — weighted virtual token counters per tenant (Sheng et al., OSDI '24).

Each tenant has a virtual counter of the service it received, in weighted tokens::

    charge(r) = (input_weight * prompt + output_weight * output) / weight(r)

charged with the *predicted* output (median, capped by ``max_tokens``) at admission and
corrected by ``output_weight * (actual - predicted) / weight`` at completion (or
cancellation), so the counter ends at the true cost. The next tenant served is the
backlogged tenant with the lowest counter (ties by name); inside a tenant's queue requests
are first come, first served. A tenant returning from idle is lifted to the minimum counter
of the backlogged tenants (to the system floor when none is), so idleness banks no credit.

Guarantee (VTC): while two tenants stay backlogged, their counters differ by at most one
request's charge, so the tokens they receive converge to the ratio of their weights,
whatever their request sizes and however wrong the predictions (the correction settles it).

Two queue shapes (parameter ``queue``):

* ``per-tenant`` (default, exact VTC): one queue per tenant ordered by arrival, and the
  selector picks the tenant at each dispatch with up-to-date counters. In Redis: backlogged
  tenants in a sorted set scored by counter (pick = lowest; lift target = lowest score).
* ``global``: one global queue, no selector. The key is the tenant's *virtual finish
  time* at enqueue, ``virtual_counter + queued_charge`` (the request's own charge
  included), as in start-time/weighted fair queueing: a burst is spread over the virtual
  timeline and other tenants' requests interleave with it. Keys are fixed at enqueue, so a
  correction moves only later requests; no aging bound in seconds.

Charges are ``HINCRBYFLOAT`` increments; the lift is a ``max`` in the enqueue script.

Parameters: ``input_weight`` (default 1.0), ``output_weight`` (default 2.0),
``queue`` (``per-tenant`` | ``global``), ``retry_after_s`` (default 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from policies.admission import FootprintAdmission
from policies.base import Policy, QueuedRequest, TenantState
from policies.fcfs import ArrivalOrder
from policies.registry import check, parse_parameters

TYPE = "fair"


@dataclass(frozen=True, slots=True)
class FairParams:
    input_weight: float = 1.0
    output_weight: float = 2.0
    queue: str = "per-tenant"
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.queue not in ("per-tenant", "global"):
            raise ValueError("queue: must be 'per-tenant' or 'global'")
        check("input_weight", self.input_weight, strict=False)
        check("output_weight", self.output_weight)
        check("retry_after_s", self.retry_after_s, strict=False)


def system_floor(counters: Iterable[float], last_drained: float) -> float:
    """The engine's ``virtual_floor``: the minimum counter of the backlogged tenants, or
    ``last_drained`` (the counter of the tenant whose queue emptied last) when none is."""
    return min(counters, default=last_drained)


class VirtualTokenCounter:
    """:class:`TenantSelector` and :class:`Accounting` of VTC (module doc). Immutable."""

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

    def pick(self, backlogged: Mapping[str, TenantState], now: float) -> str | None:
        best: tuple[float, str] | None = None
        for name, st in backlogged.items():
            if best is None or (st.virtual_counter, name) < best:
                best = (st.virtual_counter, name)
        return None if best is None else best[1]

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
    """``queue: global`` ordering: ``max(virtual_floor, virtual_counter + queued_charge)``,
    evaluated after :meth:`VirtualTokenCounter.on_enqueue` (module doc)."""

    __slots__ = ()

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        return max(tenant.virtual_floor, tenant.virtual_counter + tenant.queued_charge)

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        return math.inf


def build(parameters: Mapping[str, Any]) -> Policy:
    p = parse_parameters(TYPE, parameters, FairParams)
    vtc = VirtualTokenCounter(p.input_weight, p.output_weight)
    admission = FootprintAdmission(p.retry_after_s)
    if p.queue == "global":
        return Policy(TYPE, VirtualFinishOrder(), admission, accounting=vtc)
    return Policy(TYPE, ArrivalOrder(), admission, selector=vtc, accounting=vtc)

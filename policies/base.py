"""Scheduling contracts: value types and protocols only. No implementation.

Each protocol answers one question, in the manner of llm-d's flow-control framework:

* :class:`OrderingPolicy` — *which request in this queue next?* (a numeric queue key);
* :class:`ChargeModel` — *what does serving a request cost its tenant?* (fair share);
* :class:`Feasibility` — *until when can a request still meet its TTFT SLO?*

*Which flow next, may it run now, on which engine?* is not a policy's question: the
admission core (:mod:`proxy.admission.core`) answers it the same way for every policy --
flows per (tenant, model), served in key order (or, in ``"counter"`` order, by the lowest
tenant counter first: exact VTC), under each tenant's live concurrency limit and each
engine's capacity. The fair-share ledger (each tenant's virtual counter, the lift of a
tenant returning from idle, the charges of its queued requests) lives in the core too, so
it is one ledger whichever replica admits; a policy only says what a request costs.

Policies are stateless: everything that changes while the gateway runs (virtual counters,
in-flight counts, drift-adjusted limits) is a :class:`TenantState` snapshot the scheduler
builds and passes in. Every built-in is an immutable object, so all methods here are safe
to call concurrently from any task, thread or replica. Time is always an argument (``now``,
wall-clock seconds from the injected :class:`adapters.clock.Clock`), never read from the
system.

Levels follow ``ClassConfig.level``: lower is more important. Keys are ordered lower first;
the admission queue breaks equal keys by enqueue order, so the order over a queue is a
strict total order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from policies.drift import DriftParams


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting for admission: what the gateway knows about it at enqueue time."""

    id: str
    tenant: str
    #: wall-clock seconds when the request entered the queue
    arrival: float
    prompt_tokens: int
    #: estimator's median output length (ordering, fairness charges)
    predicted_output_p50: float
    #: estimator's conservative quantile (capacity)
    predicted_output_p90: float
    qos_class: str = "standard"
    level: int = 1
    #: the tenant's weight (> 0) when the request was enqueued; fairness charges divide by it
    weight: float = 1.0
    max_tokens: int | None = None
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    model: str = ""

    @property
    def predicted_output(self) -> float:
        """The median prediction, never above ``max_tokens`` (what fairness charges)."""
        cap = math.inf if self.max_tokens is None else float(self.max_tokens)
        return max(0.0, min(self.predicted_output_p50, cap))

    @property
    def footprint(self) -> int:
        """KV tokens the request may hold: prompt + conservative output (capped by max_tokens)."""
        cap = math.inf if self.max_tokens is None else float(self.max_tokens)
        return self.prompt_tokens + math.ceil(max(0.0, min(self.predicted_output_p90, cap)))


@dataclass(frozen=True, slots=True)
class TenantState:
    """Engine-owned per-tenant state that policies read (a snapshot; replace, never mutate)."""

    name: str
    level: int = 1
    #: VTC virtual counter: weighted tokens served (charged at grant, corrected at release),
    #: as the admission queue's ledger last showed it (lifted to the floor if below)
    virtual_counter: float = 0.0
    #: system virtual time: the minimum counter over backlogged tenants or, when none is
    #: backlogged, the counter of the tenant whose queue drained last (the lift target)
    virtual_floor: float = 0.0
    #: charges of the tenant's queued requests, this request's own included: the service
    #: it has asked for and not yet received
    queued_charge: float = 0.0
    in_flight: int = 0
    #: current (drift-adjusted) concurrency limit; None = unlimited
    limit: int | None = None
    queue_timeout_s: float = 30.0
    #: drift controller: actual / predicted output tokens over its window (1.0 = accurate)
    drift_ratio: float = 1.0
    #: drift controller: a drifting premium tenant is boosted instead of throttled
    boost: bool = False
    #: drift controller: the tenant may use elastic overflow capacity
    overflow: bool = False
    #: fraction of recent requests that met their SLOs (None = unknown)
    attainment: float | None = None


class OrderingPolicy(Protocol):
    """Which request in this queue next?"""

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        """The request's queue key: lower is served first.

        Called once, at enqueue, with the tenant's state at that moment; the engine stores
        the result (a Redis sorted-set score) and never recomputes it, so built-ins do not
        depend on ``now`` (aging is expressed as ``arrival + offset``). Always finite. Equal
        keys are broken by enqueue order. Pure: safe to call concurrently.
        """
        ...

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        """The aging bound B: with levels in ``[min_level, max_level]``, a queued request is
        never passed by a request that arrived more than B seconds after it; ``math.inf``
        when no such bound exists."""
        ...


class ChargeModel(Protocol):
    """What does serving a request cost its tenant? (fair share, in weighted tokens)

    The admission core adds :meth:`charge` to the tenant's virtual counter when the request
    is granted and :meth:`correction` when it is released, so the counter ends at the true
    cost; a granted request that is given back unserved is refunded its charge. Pure.
    """

    def charge(self, req: QueuedRequest) -> float:
        """The grant charge of ``req`` (finite, >= 0): its predicted cost over its weight."""
        ...

    def correction(self, req: QueuedRequest, actual_output_tokens: int) -> float:
        """What release adds to the grant charge once ``actual_output_tokens`` are known
        (negative when the prediction was too long)."""
        ...


class Feasibility(Protocol):
    """When can a queued request no longer meet its TTFT SLO? (SLO-feasibility admission)

    The admission queue applies :attr:`rule` to a request still queued at its
    :meth:`late_at`: ``"demote"`` moves it behind every request still on time (served when
    capacity is spare, else dropped at its queue timeout), ``"shed"`` refuses it at once
    (503 ``slo_unattainable``), so capacity goes to requests that can still make it.
    """

    rule: Literal["demote", "shed"]

    def late_at(self, req: QueuedRequest) -> float:
        """Wall-clock time after which ``req``, granted then, would miss its TTFT SLO;
        ``math.inf`` without one. Pure."""
        ...


@dataclass(frozen=True, slots=True)
class Policy:
    """What the registry builds from ``scheduler.policy``: the pieces of one policy.

    ``ordering.key`` is each request's score in the admission queue; ``fair_share``: charge
    requests to their tenants' virtual counters (the admission core keeps them; keys may
    read them through :class:`TenantState`); ``order``: the admission queue's order,
    ``"key"`` (every flow head by its key) or ``"counter"`` (the backlogged tenant with the
    lowest counter first, its own requests by key: exact VTC); ``drift``: run a
    :class:`policies.drift.DriftController` with these parameters; ``feasibility``: give
    each request a ``late_at`` and the queue a rule for it (:class:`Feasibility`).
    """

    type: str
    ordering: OrderingPolicy
    fair_share: ChargeModel | None = None
    #: proxy.admission.base.QueueOrder
    order: Literal["key", "counter"] = "key"
    drift: DriftParams | None = None
    feasibility: Feasibility | None = None

    def __post_init__(self) -> None:
        if self.order == "counter" and self.fair_share is None:
            raise ValueError("order 'counter' needs a fair_share charge model")


DriftAction = Literal["none", "decrease", "increase", "compensate", "restore", "slo_decrease"]


@dataclass(frozen=True, slots=True)
class DriftStatus:
    """One tenant as the drift controller sees it (for ``/metrics`` and the admin API)."""

    tenant: str
    level: int
    #: actual / predicted output tokens over the sliding window, relative to the tenant's
    #: baseline (1.0 until data arrives)
    ratio: float
    samples: int
    #: current concurrency limit (None = unlimited and untouched)
    limit: int | None
    base_limit: int | None
    state: Literal["warmup", "ok", "drifting", "recovering"]
    #: how often the change detector fired
    detections: int
    boost: bool
    overflow: bool
    last_action: DriftAction
    last_action_at: float | None
    decreases: int
    increases: int
    #: the tenant's usual actual / predicted ratio (what ``ratio`` is relative to)
    baseline: float = 1.0
    #: a more important level is under SLO pressure (drift may throttle this tenant)
    pressured: bool = False

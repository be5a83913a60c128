"""Scheduling contracts: value types and protocols only. No implementation.

Each protocol answers one question, in the manner of llm-d's flow-control framework:

* :class:`OrderingPolicy` — *which request in this queue next?* (a numeric queue key);
* :class:`Accounting` — *how does serving a request change its tenant's state?*

*Which flow next, may it run now, on which engine?* is not a policy's question: the
admission core (:mod:`proxy.admission.core`) answers it the same way for every policy --
flows per (tenant, model), served in key order, under each tenant's live concurrency
limit and each engine's capacity.

Policies are stateless: everything that changes while the gateway runs (virtual counters,
in-flight counts, drift-adjusted limits) is a :class:`TenantState` the engine owns, stores
(in memory or in Redis) and passes in; hooks return a new state instead of mutating one.
Every built-in is an immutable object, so all methods here are safe to call concurrently
from any task, thread or replica. Time is always an argument (``now``, wall-clock seconds
from the injected :class:`adapters.clock.Clock`), never read from the system.

Levels follow ``ClassConfig.level``: lower is more important. Keys are ordered lower first;
the admission queue breaks equal keys by enqueue order, so the order over a queue is a
strict total order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

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
    #: VTC virtual counter: weighted tokens served (charged at admit, corrected at completion)
    virtual_counter: float = 0.0
    #: system virtual time, the same in every snapshot: the minimum counter over backlogged
    #: tenants or, when none is backlogged, the counter of the tenant whose queue drained last
    virtual_floor: float = 0.0
    #: admission charges of the tenant's queued requests (added at enqueue, moved to the
    #: counter at admission, dropped at cancellation): the service it has asked for
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


class Accounting(Protocol):
    """How does queueing and serving a request change its tenant's state? (fair share)

    Every hook returns a new state for the same tenant and touches no other tenant. Charges
    are additive (new - old does not depend on old), so a shared store can apply them as
    increments (``HINCRBYFLOAT``); only :meth:`on_enqueue`'s lift is a ``max``. A request
    goes through ``on_enqueue``, then ``on_admit`` + ``on_complete`` or ``on_cancel``.
    """

    def on_enqueue(
        self,
        state: TenantState,
        req: QueuedRequest,
        backlogged: Mapping[str, TenantState],
        now: float,
    ) -> TenantState:
        """``req`` is enqueued (call before computing its key). A tenant returning from idle
        (not in ``backlogged``) is first lifted to the minimum counter of the backlogged
        tenants (``state.virtual_floor`` when none is), so idleness banks no credit; then
        ``req``'s charge is added to ``queued_charge``."""
        ...

    def on_admit(self, state: TenantState, req: QueuedRequest, now: float) -> TenantState:
        """``req`` was admitted: move its charge (prompt and predicted output) from
        ``queued_charge`` to the counter."""
        ...

    def on_cancel(self, state: TenantState, req: QueuedRequest, now: float) -> TenantState:
        """``req`` left the queue unserved (timeout, shed, disconnect): drop its charge."""
        ...

    def on_complete(
        self, state: TenantState, req: QueuedRequest, actual_output_tokens: int, now: float
    ) -> TenantState:
        """An admitted ``req`` finished (or was cancelled mid-stream) after
        ``actual_output_tokens``: correct the counter by actual minus predicted output."""
        ...


@dataclass(frozen=True, slots=True)
class Policy:
    """What the registry builds from ``scheduler.policy``: the pieces of one policy.

    ``ordering.key`` is each request's score in the admission queue; ``accounting`` (fair
    share) keeps the tenant state the key reads; ``drift``: run a
    :class:`policies.drift.DriftController` with these parameters.
    """

    type: str
    ordering: OrderingPolicy
    accounting: Accounting | None = None
    drift: DriftParams | None = None


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

"""The admission-queue contract: value types and the :class:`AdmissionQueue` protocol.

It answers one question: *which queued request may go to which engine now?* Requests wait
in **flows**, one per (tenant, model), each ordered by its items' ``score`` (lower first,
then enqueue order); the next flow served is the one whose head comes first in that same
order, so the grants follow one global order while a dispatch touches only the heads of
flows that can be served (a tenant at its concurrency limit is parked as a whole). The
rules live once, in :mod:`proxy.admission.core`; the memory queue runs that module and the
redis queue repeats it in Lua, and a differential test (``tests/proxy/admission/``) drives both
with the same random operations and asserts identical grants.

Time: every method that depends on time takes ``now`` (seconds since the epoch) from the
caller's injected clock. Replicas sharing one Redis are assumed to have NTP-synchronised
clocks; skew shifts lease and deadline expiry by the skew, nothing else.

Concurrency: every method is safe to call concurrently from many tasks on one event loop,
and (redis) from many replicas: each mutating method is one atomic step, so two replicas
dispatching at once grant every item at most once and never over-commit an engine.

Errors: like the :class:`~proxy.store.base.Store`, any method but :meth:`AdmissionQueue.aclose`
and :meth:`AdmissionQueue.wait_capacity` may raise
:class:`~proxy.store.base.StoreUnavailable` when the backend does not answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

if TYPE_CHECKING:
    from proxy.store.base import StoreStep


@dataclass(frozen=True, slots=True)
class QueueItem:
    """A request waiting for admission."""

    #: unique request id minted by the gateway (also the id of its hold once granted)
    id: str
    tenant: str
    #: the replica holding the client connection: its :meth:`AdmissionQueue.wait` gets the grant
    replica: str
    model: str
    #: policy key, lower first; ties broken by enqueue order (a store-assigned sequence)
    score: float
    #: tokens held on the engine if admitted (prompt + conservative predicted output);
    #: clamped to the engine's budget at grant time (a prediction larger than an engine
    #: is served once that engine is empty, never refused for it)
    footprint: int
    #: absolute time; once ``now > deadline`` the item is dropped and reported ``"expired"``
    deadline: float
    #: may fill an engine up to ``max_seqs``, past its ``soft_seqs`` (the top class under
    #: the TPOT governor: its requests never wait for a slot the governor holds back)
    exempt: bool = False
    #: weighted tokens added to the tenant's virtual counter when the item is granted (the
    #: fair-share charge; 0 for policies without one). See :class:`QueueOrder`.
    charge: float = 0.0
    #: absolute time after which the item can no longer meet its TTFT SLO if it started
    #: (feasibility); once ``now > late_at`` while queued the queue's :data:`LateRule` applies
    late_at: float = math.inf


#: how flows are ranked against each other: ``"key"`` by their head item's ``score``;
#: ``"counter"`` by the tenant's virtual counter plus the head's ``score`` (exact VTC: the
#: backlogged tenant that has received the least weighted service goes first)
QueueOrder: TypeAlias = Literal["key", "counter"]

#: what happens to a queued item past its ``late_at`` (SLO feasibility): ``"demote"`` it
#: behind every item still on time (its score + :data:`DEMOTED`: served when capacity is
#: spare, or dropped at its deadline), or ``"shed"`` it at once (reported ``"expired"``;
#: an item whose tenant is at its own concurrency limit is demoted instead)
LateRule: TypeAlias = Literal["demote", "shed"]
#: added to a demoted item's score; scores of items on time stay below ``DEMOTED / 2``
DEMOTED = 2.0**50


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """What admission may put on one engine. ``None`` = unlimited."""

    name: str
    models: tuple[str, ...]
    budget_tokens: int | None
    max_seqs: int | None
    #: False while the engine is draining, unhealthy or restarting
    routable: bool
    #: sequences that non-exempt items may fill (the TPOT governor's cap); None = max_seqs
    soft_seqs: int | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """An admitted item: it holds ``footprint`` tokens and one sequence on ``backend``."""

    id: str
    tenant: str
    replica: str
    backend: str
    #: the footprint as granted (later :meth:`AdmissionQueue.grow` calls do not change it)
    footprint: int


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's admission view: what the gateway holds on it and what it may hold."""

    name: str
    held_tokens: int
    seqs: int
    budget_tokens: int | None
    max_seqs: int | None
    #: routable as last reported *and* reported within its ``ttl_s``
    routable: bool
    #: the TPOT governor's cap as last reported (None: ungoverned or unknown)
    soft_seqs: int | None = None


@dataclass(frozen=True, slots=True)
class QueueCaps:
    """Depth limits checked at enqueue. ``None`` = no limit."""

    #: queued items in the whole queue (every tenant, every replica)
    max_queued: int | None = None
    #: queued items of one tenant
    max_queued_per_tenant: int | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Backlog and drain counters: queued items per backlogged tenant, grants made so far
    (per backlogged tenant and in total) since the queue's state was created; and the
    fair-share ledger: every charged tenant's virtual counter, the charges of each
    backlogged tenant's queued items, and the system floor (the lowest counter of the
    backlogged tenants, else the counter of the tenant whose queue drained last)."""

    queued: dict[str, int]
    granted: dict[str, int]
    granted_total: int
    counters: dict[str, float] = field(default_factory=dict)
    queued_charge: dict[str, float] = field(default_factory=dict)
    floor: float = 0.0


#: what :meth:`AdmissionQueue.enqueue` says: queued, already known (a no-op), or refused
#: because the tenant's or the whole queue's depth limit is reached
#: ``"refused"``: a store step run first (:class:`~proxy.store.base.StoreStep`) refused
EnqueueResult: TypeAlias = Literal["queued", "duplicate", "tenant_full", "full", "refused"]


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What :meth:`AdmissionQueue.enqueue_dispatch` did: queued or not (``result``), the
    grants its dispatch made (for any replica), and the reply of the store step it ran
    first (``None`` without one)."""

    result: EnqueueResult
    grants: list[Grant]
    store_reply: Any = None

#: what :meth:`AdmissionQueue.wait` resolves to: the grant, ``"expired"``, or ``None``
Outcome: TypeAlias = Grant | Literal["expired"]
WaitResult: TypeAlias = Grant | Literal["expired"] | None


class AdmissionQueue(Protocol):
    """The global admission queue and engine-capacity ledger.

    Lifecycle of an item: :meth:`enqueue` -> (:meth:`dispatch` grants it, or drops it as
    expired, or :meth:`cancel` removes it) -> while granted it holds capacity under a lease
    (:meth:`renew`, :meth:`grow`) -> :meth:`release`. Leases not renewed lapse and are
    reclaimed, so a crashed replica cannot leak capacity.

    Fair share (VTC, Sheng et al., OSDI '24) is kept here, shared by every replica: each
    tenant has a virtual counter of the weighted service it received (an item's ``charge``
    at grant, the ``correction`` at release). A tenant that becomes backlogged (its first
    queued item) is first lifted to the system floor -- the lowest counter of the
    backlogged tenants, else the counter of the tenant whose queue drained last -- so
    idleness banks no credit. Under ``"counter"`` order the flow of the backlogged tenant
    with the lowest counter goes first; under ``"key"`` order the counters are only
    reported (:meth:`stats`) for policies that read them.
    """

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Open connections, load scripts, subscribe. Raises on an unreachable backend."""

    async def aclose(self) -> None:
        """Release every resource; pending :meth:`wait` calls return ``None``. Idempotent."""

    # -- engines -----------------------------------------------------------------------
    async def set_engines(self, engines: list[EngineCapacity], now: float, ttl_s: float) -> None:
        """Upsert the capacity view of ``engines``, each valid until ``now + ttl_s``.

        An engine not refreshed within its ``ttl_s`` is treated as not routable. Leaving an
        engine out of the list does not drop holds on it (they are freed by :meth:`release`
        or lease expiry); an engine that is stale, unlisted and holds nothing is forgotten.
        Any change of the view wakes :meth:`wait_capacity` everywhere.
        """

    # -- queue -------------------------------------------------------------------------
    async def enqueue(self, item: QueueItem, now: float) -> EnqueueResult:
        """Queue ``item`` in its (tenant, model) flow, behind every item with a lower score
        or the same score.

        ``"duplicate"`` (a no-op) when ``item.id`` is already queued or holds a grant;
        ``"tenant_full"`` / ``"full"`` (nothing queued) when the tenant's or the whole
        queue's depth limit (:class:`QueueCaps`) is reached. Wakes :meth:`wait_capacity`
        everywhere when queued. An item enqueued past its deadline is dropped (and reported
        ``"expired"``) by the next :meth:`dispatch`.
        """

    #: whether :meth:`enqueue_dispatch` and :meth:`release_dispatch` run a ``store_step``
    #: (redis: the store's script, in the same round trip); else the caller runs it
    runs_store_steps: bool

    async def enqueue_dispatch(
        self, item: QueueItem, now: float, lease_ttl_s: float, max_grants: int = 64,
        store_step: StoreStep | None = None,
    ) -> Enqueued:
        """:meth:`enqueue` then, when queued, :meth:`dispatch` (``now``, ``lease_ttl_s``,
        ``max_grants``), as one atomic step: one round trip on Redis for a request's queueing
        and (when it fits) its grant. Wakes :meth:`wait_capacity` only when the dispatch
        stopped at ``max_grants`` (more may fit); otherwise it took everything that fits.

        ``store_step`` (only where :attr:`runs_store_steps`): the request's shaping, run
        first in the same step; when its reply's first field is not 1 (refused) nothing is
        queued (``"refused"``). Its reply is returned as ``store_reply``."""

    async def set_limits(self, limits: dict[str, int | None]) -> None:
        """Set tenants' concurrency limits (``None`` = unlimited), read by every later
        :meth:`dispatch` on every replica: a lower limit parks the tenant's queued items
        at once, a higher one un-parks them. A tenant never set is unlimited. Wakes
        :meth:`wait_capacity` everywhere when a limit changed."""

    async def cancel(self, item_id: str) -> bool:
        """Remove a queued item; ``False`` when it is not queued (granted: :meth:`release` it;
        expired or unknown: nothing to do). Wakes :meth:`wait_capacity` when it was queued."""

    async def dispatch(self, now: float, lease_ttl_s: float, max_grants: int = 64) -> list[Grant]:
        """Admit what fits now, atomically, in (score, enqueue order); the grants made.

        First, lapsed leases (expiry <= ``now``) are reclaimed, every other replica whose
        heartbeat lapsed (:meth:`heartbeat`) is reaped (in order of item id), and every
        queued item with ``now > deadline`` is dropped, wherever it stands, and its replica
        is told ``"expired"``. Then flow heads are taken in the queue's order (:data:`QueueOrder`:
        by (score, enqueue order), or by (tenant counter + score, enqueue order)):

        * a tenant holding ``>= limit`` granted items (:meth:`set_limits`) is parked: its
          flows are not looked at, and keep their places;
        * a flow whose model no routable, fresh engine serves waits, keeping its place;
        * otherwise the candidate engines are those serving the model with ``seqs < max_seqs``
          (and ``< soft_seqs`` unless the item is exempt) and ``held + min(footprint,
          budget) <= budget`` -- so an engine holding nothing takes any one item. The one
          with the most free tokens wins (unlimited = most; ties: fewer seqs, then name).
          Granted: the item leaves the queue, holds ``min(footprint, budget)`` tokens and one
          seq on that engine under a lease expiring at ``now + lease_ttl_s``, counts in its
          tenant's in-flight, adds its ``charge`` to its tenant's counter, and its replica is
          notified;
        * no candidate has room: the head **blocks** every engine serving its model -- no
          later item is granted on them (strict order: nothing overtakes the head). Flows
          whose engines are all blocked keep their places. With a single model this is
          "stop at the head"; with several, a full model does not stall the others.

        Stops after ``max_grants`` grants or once every served model is blocked. Its cost is
        O((grants + models) log n), independent of how many items wait behind the heads or
        in parked flows. An empty list means nothing could be admitted now. Grants for any
        replica are returned.
        """

    async def wait(self, item_id: str, timeout_s: float) -> WaitResult:
        """This replica's outcome for ``item_id``: its :class:`Grant`, ``"expired"``, or ``None``.

        Resolves as soon as this replica is told of the outcome (redis: one pub/sub
        subscription per instance). An outcome reached before the call is not lost: it is
        kept in a replica-local mailbox and in the shared state, which is checked first.
        ``None`` after ``timeout_s``, at once when ``item_id`` is neither queued nor granted
        nor recently expired (cancelled, released, unknown), and after :meth:`aclose`.
        """

    # -- holds -------------------------------------------------------------------------
    async def release(self, item_id: str, correction: float = 0.0) -> None:
        """Free whatever ``item_id`` holds: its engine tokens and seq and its tenant's
        in-flight slot (also dequeues it if still queued). ``correction`` (weighted tokens,
        may be negative) is added to the tenant's virtual counter when a hold was freed: the
        fair-share charge made at grant time settled against the real output. Idempotent.
        Wakes :meth:`wait_capacity` everywhere when something was freed."""

    async def release_dispatch(
        self, item_id: str, correction: float, now: float, lease_ttl_s: float,
        max_grants: int = 64, store_step: StoreStep | None = None,
    ) -> list[Grant]:
        """:meth:`release` then, when something was freed, :meth:`dispatch` into the room it
        made, as one atomic step (one round trip on Redis); the grants made, for any
        replica. Wakes :meth:`wait_capacity` only when the dispatch stopped at
        ``max_grants``. ``store_step`` (only where :attr:`runs_store_steps`): the request's
        token settlement, run first in the same step whatever the release finds."""

    async def move(self, item_id: str, engine: str) -> bool:
        """Move a hold (its footprint and sequence) to ``engine``: the request is served by
        a fallback because its granted engine failed. No capacity check (it is already
        running); ``False`` when not held or already there. Wakes :meth:`wait_capacity`
        everywhere when moved (the old engine has room again)."""

    async def grow(self, item_id: str, delta_tokens: int) -> None:
        """Charge ``delta_tokens`` more (or, negative, fewer) to the hold's engine.

        The footprint never goes below 0 and may exceed the engine's budget (live token
        drift): the engine then admits nothing new until it drains. A no-op when not held.
        A decrease wakes :meth:`wait_capacity` everywhere.
        """

    async def renew(self, item_ids: list[str], now: float, lease_ttl_s: float) -> int:
        """Extend the leases of holds still held at ``now`` to ``now + lease_ttl_s`` (never
        shortening one); returns how many were still held."""

    async def heartbeat(self, now: float, ttl_s: float) -> bool:
        """This replica is alive until ``now + ttl_s`` (never shortened). Once a replica's
        heartbeat has lapsed, the next :meth:`dispatch` by any other replica reaps it: its
        queued items are dropped (``"expired"``) and its holds freed, so a crashed replica's
        work costs the others nothing after ``ttl_s``. A replica that never beats is never
        reaped (its holds lapse with their leases). Returns False when this replica was not
        known alive: its first beat, or it had been reaped (its waiters will see
        ``"expired"`` and its holds are gone)."""

    async def leader(self, now: float) -> str | None:
        """The replica that publishes the shared controllers' decisions (the TPOT governor's
        caps on shared engines, the drift controller's limit changes): of the replicas alive
        at ``now``, the one whose unbroken run of heartbeats started first (ties: the
        smallest id), so a replica that joins never takes over from a live leader, and one
        whose heartbeat lapses hands over to the next oldest. None while none is alive."""

    async def wait_capacity(self, timeout_s: float) -> None:
        """Return on the next enqueue / cancel / release / grow-down / engine-view change
        notification (from any replica), or after ``timeout_s``. Spurious wake-ups are
        allowed; lease expiry is not notified, so dispatch loops use a finite timeout."""

    # -- views -------------------------------------------------------------------------
    async def loads(self, now: float) -> list[EngineLoad]:
        """Every known engine (in the view or still holding something), sorted by name,
        after reclaiming lapsed leases. An engine only known by its holds reports
        ``budget_tokens=None, max_seqs=None, routable=False``."""

    async def depth(self) -> dict[str, int]:
        """Queued items per tenant (tenants with none are absent). Items past their
        deadline count until the next :meth:`dispatch` drops them."""

    async def stats(self) -> QueueStats:
        """:class:`QueueStats`: :meth:`depth` plus grant counters, for drain rates."""

    async def in_flight(self, tenant: str, now: float) -> int:
        """Granted items of ``tenant`` whose lease is live at ``now`` (reclaims lapsed ones)."""

"""The admission core: the one place the admission rules are written (in Python).

Pure and clock-injected: no I/O, no awaiting, no reading of the system clock; every method
takes ``now`` from the caller and runs to completion, so on one event loop each call is
atomic. :class:`~proxy.admission.memory.MemoryQueue` is this class plus replica-local
delivery; :mod:`proxy.admission.redis` runs the same rules in Lua (``lua/*.lua``, which
mirror the functions here name for name) and ``tests/proxy/admission/test_differential.py``
checks that both make the same decisions on random operation sequences.

Shape, after llm-d's flow control (bands, flows, ordering):

* **flows**: one per (tenant, model) with something queued, a min-heap of
  ``(score, seq, id)`` (the policy's key, then enqueue order);
* **ready heaps**: one per model, holding the head of every flow of that model whose tenant
  is under its concurrency limit, under its rank: ``(score, seq)`` in ``"key"`` order,
  ``(counter + score, seq)`` in ``"counter"`` order (exact VTC). "Which flow next?" is the
  ready head that comes first over the models that still have engine room, which is
  exactly the global order over every item a dispatch may grant;
* **the fair-share ledger**: a virtual counter per charged tenant (charge at grant,
  correction at release), the lift to the system floor when a tenant becomes backlogged
  (the floor is the minimum of a heap over the backlogged tenants' counters), and the
  queued charge per backlogged tenant. A counter change re-ranks that tenant's flows only;
* **late items** (feasibility): a heap over the finite ``late_at`` of queued items; at
  dispatch every item past it is demoted (score + ``DEMOTED``, a new seq) or shed;
* **replicas**: heartbeats and the ids each replica owns, so a dead one is reaped at once;
* a tenant at its limit is **parked**: its flows leave the ready heaps (and come back when
  a hold is freed or its limit rises), so a throttled tenant's backlog costs nothing;
* every heap uses lazy deletion: an entry is live only if it still matches the current
  state (the item's seq, the flow's ready token), and heaps are rebuilt when more than half
  stale.

Dispatch therefore costs O((grants + models) log n), whatever the depth of the queue or the
number of tenants.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sized
from dataclasses import dataclass, field, replace

from proxy.admission.base import (
    DEMOTED,
    EngineCapacity,
    EngineLoad,
    EnqueueResult,
    Grant,
    LateRule,
    QueueCaps,
    QueueItem,
    QueueOrder,
    QueueStats,
)

#: how long an "expired" outcome stays visible to a late waiter
EXPIRED_MEMORY_S = 600.0


@dataclass(slots=True)
class _Hold:
    engine: str
    tenant: str
    replica: str
    footprint: int
    granted: int
    expiry: float

    def grant(self, item_id: str) -> Grant:
        return Grant(item_id, self.tenant, self.replica, self.engine, self.granted)


@dataclass(slots=True)
class _Flow:
    tenant: str
    model: str
    #: (score, seq, id); entries whose seq is not the item's are stale
    heap: list[tuple[float, int, str]] = field(default_factory=list)
    live: int = 0
    #: the (score, seq) this flow is listed under in its model's ready heap, else None
    ready: tuple[float, int] | None = None
    #: matches the live ready-heap entry of this flow (global counter: never reused)
    token: int = 0


@dataclass(slots=True)
class _Usable:
    """An engine as one dispatch sees it, updated as it grants."""

    name: str
    budget: int | None
    max_seqs: int | None
    soft_seqs: int | None
    held: int
    seqs: int

    def charge(self, footprint: int) -> int:
        """What ``footprint`` holds here: never more than the whole budget."""
        return footprint if self.budget is None else min(footprint, self.budget)

    def fits(self, footprint: int, exempt: bool) -> bool:
        if self.max_seqs is not None and self.seqs >= self.max_seqs:
            return False
        if not exempt and self.soft_seqs is not None and self.seqs >= self.soft_seqs:
            return False
        return self.budget is None or self.held + self.charge(footprint) <= self.budget

    def free(self) -> float:
        return math.inf if self.budget is None else float(self.budget - self.held)


def _too_stale(heap: Sized, live: int) -> bool:
    return len(heap) > 2 * live + 64


class AdmissionCore:
    """All admission state of one queue and the rules over it (module doc).

    Not thread-safe; one event loop. Outcomes are returned, never delivered: the caller
    (the memory queue) tells waiters.
    """

    def __init__(self, caps: QueueCaps | None = None, order: QueueOrder = "key",
                 late: LateRule = "demote") -> None:
        if order not in ("key", "counter"):
            raise ValueError(f"unknown queue order {order!r}")
        if late not in ("demote", "shed"):
            raise ValueError(f"unknown late rule {late!r}")
        self.caps = caps or QueueCaps()
        self.order: QueueOrder = order
        self.late: LateRule = late
        self._seq = 0
        self._token = 0
        self._items: dict[str, tuple[QueueItem, int]] = {}
        self._flows: dict[tuple[str, str], _Flow] = {}
        #: model -> (score, seq, token, tenant) of ready flow heads
        self._ready: dict[str, list[tuple[float, int, int, str]]] = {}
        #: model -> flows listed in its ready heap
        self._ready_live: dict[str, int] = {}
        #: tenant -> models of its non-empty flows
        self._tenant_models: dict[str, set[str]] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        #: (late_at, id) of queued items with a finite late_at; stale unless it matches
        self._late: list[tuple[float, str]] = []
        self._depth: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self._engines: dict[str, tuple[EngineCapacity, float]] = {}
        self._held: dict[str, int] = {}
        self._seqs: dict[str, int] = {}
        self._holds: dict[str, _Hold] = {}
        self._leases: list[tuple[float, int, str]] = []
        self._inflight: dict[str, int] = {}
        self._granted: dict[str, int] = {}
        self._granted_total = 0
        self._expired: OrderedDict[str, float] = OrderedDict()
        #: fair share: tenant -> virtual counter; backlogged tenant -> queued charge;
        #: (counter, tenant) of backlogged tenants, stale unless it matches the counter
        self._vc: dict[str, float] = {}
        self._qcharge: dict[str, float] = {}
        self._backlog: list[tuple[float, str]] = []
        self._last_drained = 0.0
        #: replica liveness: replica -> alive until; (alive until, replica), stale unless it
        #: matches; replica -> ids queued or held for it
        self._alive: dict[str, float] = {}
        self._alive_heap: list[tuple[float, str]] = []
        self._owned: dict[str, set[str]] = {}
        #: replica -> (start of its current unbroken run of beats, its heartbeat ttl)
        self._since: dict[str, tuple[float, float]] = {}

    # -- tenants -----------------------------------------------------------------------------
    def _limited(self, tenant: str) -> bool:
        limit = self._limits.get(tenant)
        return limit is not None and self._inflight.get(tenant, 0) >= limit

    def set_limits(self, limits: dict[str, int | None]) -> bool:
        """Set concurrency limits; True when one changed (``None`` = unlimited)."""
        changed = False
        for tenant, limit in limits.items():
            old = self._limits.get(tenant)
            if limit == old:
                continue
            if limit is None:
                del self._limits[tenant]
            else:
                self._limits[tenant] = max(0, int(limit))
            changed = True
            self._tenant_sync(tenant)
        return changed

    def _tenant_sync(self, tenant: str) -> None:
        for model in sorted(self._tenant_models.get(tenant, ())):
            self._flow_sync(self._flows[(tenant, model)])

    # -- flows -------------------------------------------------------------------------------
    def _head(self, flow: _Flow) -> tuple[float, int, str] | None:
        heap = flow.heap
        while heap:
            _, seq, item_id = heap[0]
            found = self._items.get(item_id)
            if found is not None and found[1] == seq:
                return heap[0]
            heapq.heappop(heap)
        return None

    def _flow_sync(self, flow: _Flow) -> None:
        """List the flow's head in its model's ready heap iff it has one and its tenant is
        under its limit; forget the flow once empty."""
        if _too_stale(flow.heap, flow.live):
            flow.heap = [e for e in flow.heap
                         if (f := self._items.get(e[2])) is not None and f[1] == e[1]]
            heapq.heapify(flow.heap)
        head = self._head(flow) if flow.live > 0 else None
        want = None
        if head is not None and not self._limited(flow.tenant):
            want = (self._rank(flow.tenant, head[0]), head[1])
        if want != flow.ready:
            model = flow.model
            live = self._ready_live.get(model, 0) + (want is not None) - (flow.ready is not None)
            self._ready_live[model] = live
            self._token += 1
            flow.token = self._token
            flow.ready = want
            ready = self._ready.setdefault(model, [])
            if want is not None:
                heapq.heappush(ready, (want[0], want[1], flow.token, flow.tenant))
            if _too_stale(ready, live):
                ready[:] = [e for e in ready if self._ready_valid(e, model)]
                heapq.heapify(ready)
        if flow.live <= 0:
            del self._flows[(flow.tenant, flow.model)]
            models = self._tenant_models[flow.tenant]
            models.discard(flow.model)
            if not models:
                del self._tenant_models[flow.tenant]

    def _rank(self, tenant: str, score: float) -> float:
        return self._vc.get(tenant, 0.0) + score if self.order == "counter" else score

    def _ready_valid(self, entry: tuple[float, int, int, str], model: str) -> bool:
        flow = self._flows.get((entry[3], model))
        return flow is not None and flow.token == entry[2] and flow.ready is not None

    def _ready_top(self, model: str) -> tuple[float, int, int, str] | None:
        heap = self._ready.get(model)
        while heap:
            if self._ready_valid(heap[0], model):
                return heap[0]
            heapq.heappop(heap)
        return None

    # -- fair share --------------------------------------------------------------------------
    def _floor(self) -> float:
        """The lowest counter of the backlogged tenants, else the last drained one's."""
        heap = self._backlog
        while heap:
            vc, tenant = heap[0]
            if tenant in self._depth and self._vc.get(tenant, 0.0) == vc:
                return vc
            heapq.heappop(heap)
        return self._last_drained

    def _backlog_push(self, tenant: str) -> None:
        heapq.heappush(self._backlog, (self._vc.get(tenant, 0.0), tenant))
        if _too_stale(self._backlog, len(self._depth)):
            self._backlog = [(self._vc.get(t, 0.0), t) for t in self._depth]
            heapq.heapify(self._backlog)

    def _count(self, tenant: str, delta: float) -> None:
        """Add ``delta`` to the tenant's counter; a backlogged tenant's flows re-rank."""
        if delta == 0:
            return
        self._vc[tenant] = self._vc.get(tenant, 0.0) + delta
        if tenant in self._depth:
            self._backlog_push(tenant)
            if self.order == "counter":
                self._tenant_sync(tenant)

    # -- replicas ----------------------------------------------------------------------------
    def _own(self, replica: str, item_id: str) -> None:
        self._owned.setdefault(replica, set()).add(item_id)

    def _disown(self, replica: str, item_id: str) -> None:
        owned = self._owned.get(replica)
        if owned is not None:
            owned.discard(item_id)
            if not owned:
                del self._owned[replica]

    def heartbeat(self, replica: str, now: float, ttl_s: float) -> bool:
        """``replica`` is alive until ``now + ttl_s`` (never shortened); False when it was
        not known alive: its first beat, or it was declared dead and reaped. A first beat,
        or one after the last lapsed, starts its unbroken run of beats (see :meth:`_reap`)."""
        known = replica in self._alive
        old = self._alive.get(replica, -math.inf)
        if old < now:
            self._since[replica] = (now, ttl_s)
        else:
            self._since[replica] = (self._since[replica][0], ttl_s)
        until = max(old, now + ttl_s)
        self._alive[replica] = until
        heapq.heappush(self._alive_heap, (until, replica))
        if _too_stale(self._alive_heap, len(self._alive)):
            self._alive_heap = [(u, r) for r, u in self._alive.items()]
            heapq.heapify(self._alive_heap)
        return known

    def _reap(self, now: float, caller: str | None) -> list[QueueItem]:
        """Forget every replica but ``caller`` whose heartbeat lapsed before ``now``: drop
        its queued items (returned, as expired: nobody waits for them) and free its holds. A
        replica that never beat is never reaped (its holds still have leases).

        Only a caller that has itself beaten without a break for at least its heartbeat ttl
        reaps: after an outage of the store every replica's beat lapsed at once, and none
        is dead; each gets a ttl to beat again before the others may judge it."""
        out: list[QueueItem] = []
        if not self._may_reap(now, caller):
            return out
        heap, keep = self._alive_heap, []
        while heap and heap[0][0] < now:
            until, replica = heapq.heappop(heap)
            if self._alive.get(replica) != until:
                continue
            if replica == caller:  # slow, not dead: it is dispatching
                keep.append((until, replica))
                continue
            del self._alive[replica]
            del self._since[replica]
            for item_id in sorted(self._owned.pop(replica, ())):
                found = self._items.get(item_id)
                if found is not None:
                    self._dequeue(item_id)
                    self._expired[item_id] = now
                    out.append(found[0])
                else:
                    self._drop_hold(item_id)
        for entry in keep:
            heapq.heappush(heap, entry)
        return out

    def _may_reap(self, now: float, caller: str | None) -> bool:
        """``caller`` is alive at ``now`` and has beaten without a break for its ttl."""
        if caller is None or self._alive.get(caller, -math.inf) < now:
            return False
        since, ttl = self._since[caller]
        return now - since >= ttl

    def leader(self, now: float) -> str | None:
        """Of the replicas alive at ``now``, the one whose unbroken run of beats started
        first (ties: the smallest id); None when none is (AdmissionQueue.leader)."""
        best: tuple[float, str] | None = None
        for replica, until in self._alive.items():
            if until < now:
                continue
            key = (self._since[replica][0], replica)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]

    def alive(self) -> dict[str, float]:
        """Replicas known alive, with the time they are alive until."""
        return dict(self._alive)

    # -- engines -----------------------------------------------------------------------------
    def set_engines(self, engines: list[EngineCapacity], now: float, ttl_s: float) -> bool:
        """Upsert the capacity view; True when it changed (AdmissionQueue.set_engines)."""
        fresh_until = now + ttl_s
        changed = False
        for cap in engines:
            old = self._engines.get(cap.name)
            if old is None or old[0] != cap or old[1] <= now:
                changed = True
            self._engines[cap.name] = (cap, fresh_until)
        listed = {cap.name for cap in engines}
        for name, (_, fresh) in list(self._engines.items()):
            if name not in listed and fresh <= now and name not in self._seqs:
                del self._engines[name]
        return changed

    # -- queue -------------------------------------------------------------------------------
    def enqueue(self, item: QueueItem) -> EnqueueResult:
        if item.id in self._items or item.id in self._holds:
            return "duplicate"
        caps = self.caps
        if caps.max_queued_per_tenant is not None and \
                self._depth.get(item.tenant, 0) >= caps.max_queued_per_tenant:
            return "tenant_full"
        if caps.max_queued is not None and len(self._items) >= caps.max_queued:
            return "full"
        self._seq += 1
        seq = self._seq
        if item.tenant not in self._depth:  # becomes backlogged: lifted to the floor
            floor = self._floor()
            if self._vc.get(item.tenant, 0.0) < floor:
                self._vc[item.tenant] = floor
            self._depth[item.tenant] = 0
            self._backlog_push(item.tenant)
        if item.charge:
            self._qcharge[item.tenant] = self._qcharge.get(item.tenant, 0.0) + item.charge
        self._items[item.id] = (item, seq)
        self._own(item.replica, item.id)
        key = (item.tenant, item.model)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(item.tenant, item.model)
            self._tenant_models.setdefault(item.tenant, set()).add(item.model)
        heapq.heappush(flow.heap, (item.score, seq, item.id))
        flow.live += 1
        heapq.heappush(self._deadlines, (item.deadline, seq, item.id))
        if item.late_at != math.inf:
            heapq.heappush(self._late, (item.late_at, item.id))
        self._depth[item.tenant] = self._depth.get(item.tenant, 0) + 1
        self._flow_sync(flow)
        return "queued"

    def _dequeue(self, item_id: str) -> QueueItem | None:
        entry = self._items.pop(item_id, None)
        if entry is None:
            return None
        item = entry[0]
        self._disown(item.replica, item_id)
        left = self._depth[item.tenant] - 1
        if left > 0:
            self._depth[item.tenant] = left
            if item.charge:
                self._qcharge[item.tenant] -= item.charge
        else:  # drained: its counter is the floor while nobody is backlogged
            del self._depth[item.tenant]
            self._qcharge.pop(item.tenant, None)
            self._last_drained = self._vc.get(item.tenant, 0.0)
        flow = self._flows[(item.tenant, item.model)]
        flow.live -= 1
        self._flow_sync(flow)
        return item

    def cancel(self, item_id: str) -> bool:
        if self._dequeue(item_id) is None:
            return False
        self._compact()
        return True

    def queued(self, item_id: str) -> bool:
        return item_id in self._items

    def expired(self, item_id: str) -> bool:
        return item_id in self._expired

    def _expire(self, now: float) -> list[QueueItem]:
        out = []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, seq, item_id = heapq.heappop(heap)
            found = self._items.get(item_id)
            if found is not None and found[1] == seq:
                self._dequeue(item_id)
                self._expired[item_id] = now
                out.append(found[0])
        while self._expired:
            item_id, at = next(iter(self._expired.items()))
            if at > now - EXPIRED_MEMORY_S:
                break
            del self._expired[item_id]
        return out

    def _overdue(self, now: float) -> list[QueueItem]:
        """Apply the late rule to every queued item past its ``late_at`` (in (late_at, id)
        order): demoted ones move behind every item on time (a new seq: last among the
        demoted); shed ones are dropped and returned, as expired. An item whose tenant is at
        its own concurrency limit is demoted even under "shed": the tenant's limit, not the
        engines' capacity, is what holds it back, and it is served once a slot frees."""
        out = []
        heap = self._late
        while heap and heap[0][0] < now:
            late_at, item_id = heapq.heappop(heap)
            found = self._items.get(item_id)
            if found is None or found[0].late_at != late_at:
                continue
            item = found[0]
            if self.late == "shed" and not self._limited(item.tenant):
                self._dequeue(item_id)
                self._expired[item_id] = now
                out.append(item)
                continue
            self._seq += 1
            moved = replace(item, score=item.score + DEMOTED, late_at=math.inf)
            self._items[item_id] = (moved, self._seq)
            flow = self._flows[(item.tenant, item.model)]
            heapq.heappush(flow.heap, (moved.score, self._seq, item_id))
            heapq.heappush(self._deadlines, (moved.deadline, self._seq, item_id))
            self._flow_sync(flow)
        return out

    def _compact(self) -> None:
        """Rebuild the deadline and lease heaps once mostly stale (never mid-dispatch);
        flow and ready heaps are filtered where they grow (:meth:`_flow_sync`)."""
        live = len(self._items)
        if _too_stale(self._deadlines, live):
            self._deadlines = [(i.deadline, s, i.id) for i, s in self._items.values()]
            heapq.heapify(self._deadlines)
        if len(self._late) > 2 * live + 64:
            self._late = [(i.late_at, i.id) for i, _ in self._items.values()
                          if i.late_at != math.inf]
            heapq.heapify(self._late)
        if _too_stale(self._leases, len(self._holds)):
            self._leases = [(h.expiry, 0, i) for i, h in self._holds.items()]
            heapq.heapify(self._leases)

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(
        self, now: float, lease_ttl_s: float, max_grants: int = 64, replica: str | None = None
    ) -> tuple[list[Grant], list[QueueItem]]:
        """Admit what fits now (AdmissionQueue.dispatch): the grants made and the items
        dropped as expired (or as a dead replica's), in that order of the work.
        ``replica``: the caller, which is alive whatever its heartbeat says (it reaps others
        only after an unbroken run of its own beats, :meth:`_reap`)."""
        self._reclaim(now)
        expired = self._reap(now, replica) + self._expire(now) + self._overdue(now)
        if not any(self._ready_live.values()):  # no ready flow: nothing to read or grant
            self._compact()
            return [], expired
        usable: dict[str, _Usable] = {}
        by_model: dict[str, list[_Usable]] = {}
        for name in sorted(self._engines):
            cap, fresh_until = self._engines[name]
            if not cap.routable or now >= fresh_until:
                continue
            u = usable[name] = _Usable(name, cap.budget_tokens, cap.max_seqs, cap.soft_seqs,
                                       self._held.get(name, 0), self._seqs.get(name, 0))
            for model in cap.models:
                by_model.setdefault(model, []).append(u)
        grants: list[Grant] = []
        blocked: set[str] = set()
        dead: set[str] = set()  # models with no ready flow or no open engine this dispatch
        expiry = now + lease_ttl_s
        while len(grants) < max_grants:
            best: tuple[float, int, int, str] | None = None
            best_model = ""
            for model, cands in by_model.items():
                if model in dead:
                    continue
                top = self._ready_top(model)
                if top is None or all(u.name in blocked for u in cands):
                    dead.add(model)
                    continue
                if best is None or top[:2] < best[:2]:
                    best, best_model = top, model
            if best is None:
                break
            flow = self._flows[(best[3], best_model)]
            head = self._head(flow)
            assert head is not None
            item = self._items[head[2]][0]
            engine: _Usable | None = None
            for u in by_model[best_model]:
                if u.name in blocked or not u.fits(item.footprint, item.exempt):
                    continue
                if engine is None or u.free() > engine.free() or \
                        (u.free() == engine.free() and u.seqs < engine.seqs):
                    engine = u
            if engine is None:
                blocked.update(u.name for u in by_model[best_model])
                continue
            grants.append(self._grant(item, engine, expiry))
        self._compact()
        return grants, expired

    def _grant(self, item: QueueItem, engine: _Usable, expiry: float) -> Grant:
        charge = engine.charge(item.footprint)
        self._holds[item.id] = hold = _Hold(engine.name, item.tenant, item.replica, charge,
                                            charge, expiry)
        heapq.heappush(self._leases, (expiry, 0, item.id))
        engine.held += charge
        engine.seqs += 1
        self._held[engine.name] = engine.held
        self._seqs[engine.name] = engine.seqs
        self._inflight[item.tenant] = self._inflight.get(item.tenant, 0) + 1
        self._granted[item.tenant] = self._granted.get(item.tenant, 0) + 1
        self._granted_total += 1
        if item.charge:
            self._vc[item.tenant] = self._vc.get(item.tenant, 0.0) + item.charge
        self._dequeue(item.id)  # also re-lists the flow's next head
        self._own(item.replica, item.id)  # now as a hold
        if item.charge and item.tenant in self._depth:
            self._backlog_push(item.tenant)
            if self.order == "counter":
                self._tenant_sync(item.tenant)
        if self._limited(item.tenant):
            self._tenant_sync(item.tenant)
        return hold.grant(item.id)

    # -- holds -------------------------------------------------------------------------------
    def grant_of(self, item_id: str) -> Grant | None:
        hold = self._holds.get(item_id)
        return None if hold is None else hold.grant(item_id)

    def _unhold(self, engine: str, footprint: int) -> None:
        """Take one sequence and ``footprint`` tokens off ``engine`` (forgotten at zero)."""
        seqs = self._seqs.get(engine, 0) - 1
        if seqs > 0:
            self._seqs[engine] = seqs
            self._held[engine] = self._held.get(engine, 0) - footprint
        else:
            self._seqs.pop(engine, None)
            self._held.pop(engine, None)

    def _drop_hold(self, item_id: str, correction: float = 0.0) -> bool:
        hold = self._holds.pop(item_id, None)
        if hold is None:
            return False
        self._disown(hold.replica, item_id)
        self._count(hold.tenant, correction)
        self._unhold(hold.engine, hold.footprint)
        n = self._inflight.get(hold.tenant, 0) - 1
        if n > 0:
            self._inflight[hold.tenant] = n
        else:
            self._inflight.pop(hold.tenant, None)
        limit = self._limits.get(hold.tenant)
        if limit is not None and max(n, 0) == limit - 1:
            self._tenant_sync(hold.tenant)  # just fell under its limit: un-park
        return True

    def _reclaim(self, now: float) -> None:
        heap = self._leases
        while heap and heap[0][0] <= now:
            expiry, _, item_id = heapq.heappop(heap)
            hold = self._holds.get(item_id)
            if hold is not None and hold.expiry == expiry:
                self._drop_hold(item_id)

    def release(self, item_id: str, correction: float = 0.0) -> bool:
        """Free the hold (settling its charge by ``correction``) and dequeue; True when
        something was freed."""
        freed = self._drop_hold(item_id, correction)
        freed = self._dequeue(item_id) is not None or freed
        if freed:
            self._compact()
        return freed

    def move(self, item_id: str, engine: str) -> bool:
        """Move a hold to ``engine`` (a fallback after its engine failed); True when moved."""
        hold = self._holds.get(item_id)
        if hold is None or hold.engine == engine:
            return False
        self._unhold(hold.engine, hold.footprint)
        self._seqs[engine] = self._seqs.get(engine, 0) + 1
        self._held[engine] = self._held.get(engine, 0) + hold.footprint
        hold.engine = engine
        return True

    def grow(self, item_id: str, delta_tokens: int) -> bool:
        """Charge ``delta_tokens`` more to the hold; True when its footprint shrank."""
        hold = self._holds.get(item_id)
        if hold is None:
            return False
        footprint = max(0, hold.footprint + delta_tokens)
        self._held[hold.engine] = self._held.get(hold.engine, 0) + footprint - hold.footprint
        shrunk = footprint < hold.footprint
        hold.footprint = footprint
        return shrunk

    def renew(self, item_ids: list[str], now: float, lease_ttl_s: float) -> int:
        expiry = now + lease_ttl_s
        renewed = 0
        for item_id in item_ids:
            hold = self._holds.get(item_id)
            if hold is not None and hold.expiry > now:
                if expiry > hold.expiry:
                    hold.expiry = expiry
                    heapq.heappush(self._leases, (expiry, 0, item_id))
                renewed += 1
        self._compact()
        return renewed

    # -- views -------------------------------------------------------------------------------
    def loads(self, now: float) -> list[EngineLoad]:
        self._reclaim(now)
        out: list[EngineLoad] = []
        for name in sorted(self._engines.keys() | self._seqs.keys()):
            held, seqs = self._held.get(name, 0), self._seqs.get(name, 0)
            eng = self._engines.get(name)
            if eng is None:
                out.append(EngineLoad(name, held, seqs, None, None, False))
                continue
            cap, fresh = eng
            routable = cap.routable and now < fresh
            out.append(EngineLoad(name, held, seqs, cap.budget_tokens, cap.max_seqs, routable,
                                  cap.soft_seqs))
        return out

    def depth(self) -> dict[str, int]:
        return dict(self._depth)

    def stats(self) -> QueueStats:
        granted = {t: self._granted.get(t, 0) for t in self._depth}
        return QueueStats(dict(self._depth), granted, self._granted_total, dict(self._vc),
                          dict(self._qcharge), self._floor())

    def in_flight(self, tenant: str, now: float) -> int:
        self._reclaim(now)
        return self._inflight.get(tenant, 0)

"""The embedded admission queue: one process, heaps and dicts, no services.

Why choose it: a single gateway process. Nothing is shared between processes; use the redis
queue for replicas. Every method runs to completion without awaiting anything, so each one
is atomic on the event loop. Decisions are identical to the redis queue's (its Lua scripts
repeat this logic step for step; ``tests/test_queue_redis.py`` checks it).

Order: a min-heap of ``(score, seq, id)`` with lazy deletion (cancelled, granted and expired
entries go stale and are dropped when met or on compaction). :meth:`dispatch` pops items in
order and pushes the skipped ones back, so it costs O((granted + skipped) log n).
Deadlines and leases are min-heaps too, so expiry costs O(expired log n).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass

from proxy.store.queue_base import (
    EngineCapacity,
    EngineLoad,
    Grant,
    QueueItem,
    WaitResult,
)
from proxy.store.queue_mailbox import Bell, Mailbox, Snapshot

TYPE = "memory"

#: how long an "expired" outcome stays visible to a late :meth:`MemoryQueue.wait`
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
class _Engine:
    cap: EngineCapacity
    fresh_until: float


@dataclass(slots=True)
class _Usable:
    """An engine as one dispatch sees it, updated as it grants."""

    name: str
    budget: int | None
    max_seqs: int | None
    held: int
    seqs: int
    soft_seqs: int | None = None

    def fits(self, footprint: int, exempt: bool = False) -> bool:
        if self.max_seqs is not None and self.seqs >= self.max_seqs:
            return False
        if not exempt and self.soft_seqs is not None and self.seqs >= self.soft_seqs:
            return False
        return self.budget is None or self.held + footprint <= self.budget or self.seqs == 0

    def free(self) -> float:
        return math.inf if self.budget is None else float(self.budget - self.held)


def _too_stale(heap: list[tuple[float, int, str]], live: int) -> bool:
    return len(heap) > 2 * live + 64


class MemoryQueue:
    """:class:`~proxy.store.queue_base.AdmissionQueue` in process memory (one event loop).

    ``replica_id`` only names this process; every outcome is delivered locally.
    """

    def __init__(self, replica_id: str = "local") -> None:
        self.replica_id = replica_id
        self._seq = 0
        self._items: dict[str, tuple[QueueItem, int]] = {}
        self._order: list[tuple[float, int, str]] = []
        self._deadlines: list[tuple[float, int, str]] = []
        self._depth: dict[str, int] = {}
        self._engines: dict[str, _Engine] = {}
        self._held: dict[str, int] = {}
        self._seqs: dict[str, int] = {}
        self._holds: dict[str, _Hold] = {}
        self._leases: list[tuple[float, int, str]] = []
        self._inflight: dict[str, int] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()
        self._mailbox = Mailbox()
        self._bell = Bell()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._mailbox.close()
        self._bell.ring()

    # -- engines -------------------------------------------------------------------------
    async def set_engines(self, engines: list[EngineCapacity], now: float, ttl_s: float) -> None:
        fresh_until = now + ttl_s
        changed = False
        for cap in engines:
            old = self._engines.get(cap.name)
            if old is None or old.cap != cap or old.fresh_until <= now:
                changed = True
            self._engines[cap.name] = _Engine(cap, fresh_until)
        listed = {cap.name for cap in engines}
        for name, eng in list(self._engines.items()):
            if name not in listed and eng.fresh_until <= now and name not in self._seqs:
                del self._engines[name]
        if changed:
            self._bell.ring()

    # -- queue ---------------------------------------------------------------------------
    async def enqueue(self, item: QueueItem, now: float) -> None:
        if item.id in self._items or item.id in self._holds:
            return
        self._seq += 1
        self._items[item.id] = (item, self._seq)
        heapq.heappush(self._order, (item.score, self._seq, item.id))
        heapq.heappush(self._deadlines, (item.deadline, self._seq, item.id))
        self._depth[item.tenant] = self._depth.get(item.tenant, 0) + 1
        self._bell.ring()

    def _dequeue(self, item_id: str) -> QueueItem | None:
        entry = self._items.pop(item_id, None)
        if entry is None:
            return None
        item = entry[0]
        left = self._depth[item.tenant] - 1
        if left > 0:
            self._depth[item.tenant] = left
        else:
            del self._depth[item.tenant]
        return item

    def _compact(self) -> None:
        """Rebuild heaps that hold more stale entries than live ones (never mid-scan)."""
        live = len(self._items)
        if _too_stale(self._order, live):
            self._order = [(i.score, s, i.id) for i, s in self._items.values()]
            heapq.heapify(self._order)
        if _too_stale(self._deadlines, live):
            self._deadlines = [(i.deadline, s, i.id) for i, s in self._items.values()]
            heapq.heapify(self._deadlines)
        if _too_stale(self._leases, len(self._holds)):
            self._leases = [(h.expiry, 0, i) for i, h in self._holds.items()]
            heapq.heapify(self._leases)

    async def cancel(self, item_id: str) -> bool:
        self._mailbox.discard(item_id)
        if self._dequeue(item_id) is None:
            return False
        self._compact()
        self._bell.ring()
        return True

    def _queued(self, entry: tuple[float, int, str]) -> QueueItem | None:
        found = self._items.get(entry[2])
        return found[0] if found is not None and found[1] == entry[1] else None

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] < now:
            entry = heapq.heappop(heap)
            if self._queued(entry) is not None:
                self._dequeue(entry[2])
                self._expired[entry[2]] = now
                self._mailbox.deliver(entry[2], "expired")
        while self._expired:
            item_id, at = next(iter(self._expired.items()))
            if at > now - EXPIRED_MEMORY_S:
                break
            del self._expired[item_id]

    async def dispatch(self, now: float, lease_ttl_s: float, max_grants: int = 64) -> list[Grant]:
        self._reclaim(now)
        self._expire(now)
        usable: list[_Usable] = []
        by_model: dict[str, list[_Usable]] = {}
        for name in sorted(self._engines):
            cap, fresh_until = self._engines[name].cap, self._engines[name].fresh_until
            if not cap.routable or now >= fresh_until:
                continue
            u = _Usable(
                name,
                cap.budget_tokens,
                cap.max_seqs,
                self._held.get(name, 0),
                self._seqs.get(name, 0),
                cap.soft_seqs,
            )
            usable.append(u)
            for model in cap.models:
                by_model.setdefault(model, []).append(u)

        grants: list[Grant] = []
        blocked: set[str] = set()
        kept: list[tuple[float, int, str]] = []
        order = self._order
        while order and len(grants) < max_grants and len(blocked) < len(usable):
            entry = heapq.heappop(order)
            item = self._queued(entry)
            if item is None:
                continue  # stale
            kept.append(entry)
            limit = item.concurrency_limit
            if limit is not None and self._inflight.get(item.tenant, 0) >= limit:
                continue
            best: _Usable | None = None
            open_ = False
            for u in by_model.get(item.model, ()):
                if u.name in blocked:
                    continue
                open_ = True
                if u.fits(item.footprint, item.exempt) and (
                    best is None
                    or u.free() > best.free()
                    or (u.free() == best.free() and u.seqs < best.seqs)
                ):
                    best = u
            if best is not None:
                kept.pop()
                grants.append(self._grant(item, best, now + lease_ttl_s))
            elif open_:
                blocked.update(u.name for u in by_model[item.model])
        for entry in kept:
            heapq.heappush(order, entry)
        self._compact()
        return grants

    def _grant(self, item: QueueItem, engine: _Usable, expiry: float) -> Grant:
        self._dequeue(item.id)
        hold = _Hold(engine.name, item.tenant, item.replica, item.footprint, item.footprint, expiry)
        self._holds[item.id] = hold
        heapq.heappush(self._leases, (expiry, 0, item.id))
        engine.held += item.footprint
        engine.seqs += 1
        self._held[engine.name] = engine.held
        self._seqs[engine.name] = engine.seqs
        self._inflight[item.tenant] = self._inflight.get(item.tenant, 0) + 1
        grant = hold.grant(item.id)
        self._mailbox.deliver(item.id, grant)
        return grant

    async def wait(self, item_id: str, timeout_s: float) -> WaitResult:
        async def snapshot() -> Snapshot:
            hold = self._holds.get(item_id)
            if hold is not None:
                return hold.grant(item_id)
            if item_id in self._expired:
                return "expired"
            return "queued" if item_id in self._items else None

        return await self._mailbox.wait(item_id, timeout_s, snapshot)

    # -- holds ---------------------------------------------------------------------------
    def _drop_hold(self, item_id: str) -> bool:
        hold = self._holds.pop(item_id, None)
        if hold is None:
            return False
        seqs = self._seqs.get(hold.engine, 0) - 1
        if seqs > 0:
            self._seqs[hold.engine] = seqs
            self._held[hold.engine] = self._held.get(hold.engine, 0) - hold.footprint
        else:
            self._seqs.pop(hold.engine, None)
            self._held.pop(hold.engine, None)
        n = self._inflight.get(hold.tenant, 0) - 1
        if n > 0:
            self._inflight[hold.tenant] = n
        else:
            self._inflight.pop(hold.tenant, None)
        return True

    def _reclaim(self, now: float) -> None:
        heap = self._leases
        while heap and heap[0][0] <= now:
            expiry, _, item_id = heapq.heappop(heap)
            hold = self._holds.get(item_id)
            if hold is not None and hold.expiry == expiry:
                self._drop_hold(item_id)

    async def release(self, item_id: str) -> None:
        self._mailbox.discard(item_id)
        freed = self._drop_hold(item_id)
        freed = self._dequeue(item_id) is not None or freed
        if freed:
            self._compact()
            self._bell.ring()

    async def grow(self, item_id: str, delta_tokens: int) -> None:
        hold = self._holds.get(item_id)
        if hold is None:
            return
        footprint = max(0, hold.footprint + delta_tokens)
        self._held[hold.engine] = self._held.get(hold.engine, 0) + footprint - hold.footprint
        shrunk = footprint < hold.footprint
        hold.footprint = footprint
        if shrunk:
            self._bell.ring()

    async def renew(self, item_ids: list[str], now: float, lease_ttl_s: float) -> int:
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

    async def wait_capacity(self, timeout_s: float) -> None:
        await self._bell.wait(timeout_s)

    # -- views ---------------------------------------------------------------------------
    async def loads(self, now: float) -> list[EngineLoad]:
        self._reclaim(now)
        out: list[EngineLoad] = []
        for name in sorted(self._engines.keys() | self._seqs.keys()):
            held, seqs = self._held.get(name, 0), self._seqs.get(name, 0)
            eng = self._engines.get(name)
            if eng is None:
                out.append(EngineLoad(name, held, seqs, None, None, False))
                continue
            cap = eng.cap
            routable = cap.routable and now < eng.fresh_until
            out.append(EngineLoad(name, held, seqs, cap.budget_tokens, cap.max_seqs, routable))
        return out

    async def depth(self) -> dict[str, int]:
        return dict(self._depth)

    async def in_flight(self, tenant: str, now: float) -> int:
        self._reclaim(now)
        return self._inflight.get(tenant, 0)

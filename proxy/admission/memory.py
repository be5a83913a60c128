"""The embedded admission queue: one process, no services.

Why choose it: a single gateway process. Nothing is shared between processes; use the redis
queue for replicas. It is :class:`~proxy.admission.core.AdmissionCore` (the admission rules)
plus replica-local delivery of outcomes (:class:`~proxy.admission.mailbox.Mailbox`) and
capacity wake-ups (:class:`~proxy.admission.mailbox.Bell`). Every method runs to completion
without awaiting anything, so each one is atomic on the event loop.
"""

from __future__ import annotations

from proxy.admission.base import (
    EngineCapacity,
    EngineLoad,
    Enqueued,
    EnqueueResult,
    Grant,
    LateRule,
    QueueCaps,
    QueueItem,
    QueueOrder,
    QueueStats,
    WaitResult,
)
from proxy.admission.core import AdmissionCore
from proxy.admission.mailbox import Bell, Mailbox, Snapshot
from proxy.store.base import StoreStep

TYPE = "memory"


def _no_steps(step: StoreStep | None) -> None:
    if step is not None:
        raise TypeError("the memory queue runs no store steps (runs_store_steps is False)")


class MemoryQueue:
    """:class:`~proxy.admission.base.AdmissionQueue` in process memory (one event loop).

    ``replica_id`` only names this process; every outcome is delivered locally.
    """

    runs_store_steps = False

    def __init__(
        self, replica_id: str = "local", caps: QueueCaps | None = None, order: QueueOrder = "key",
        late: LateRule = "demote",
    ) -> None:
        self.replica_id = replica_id
        self.core = AdmissionCore(caps, order, late)
        self._mailbox = Mailbox()
        self._bell = Bell()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._mailbox.close()
        self._bell.ring()

    # -- engines and limits ----------------------------------------------------------------
    async def set_engines(self, engines: list[EngineCapacity], now: float, ttl_s: float) -> None:
        if self.core.set_engines(engines, now, ttl_s):
            self._bell.ring()

    async def set_limits(self, limits: dict[str, int | None]) -> None:
        if self.core.set_limits(limits):
            self._bell.ring()

    # -- queue ---------------------------------------------------------------------------
    async def enqueue(self, item: QueueItem, now: float) -> EnqueueResult:
        result = self.core.enqueue(item)
        if result == "queued":
            self._bell.ring()
        return result

    async def enqueue_dispatch(
        self, item: QueueItem, now: float, lease_ttl_s: float, max_grants: int = 64,
        store_step: StoreStep | None = None,
    ) -> Enqueued:
        _no_steps(store_step)
        result = self.core.enqueue(item)
        if result != "queued":
            return Enqueued(result, [])
        return Enqueued(result, self._dispatch(now, lease_ttl_s, max_grants))

    async def cancel(self, item_id: str) -> bool:
        self._mailbox.discard(item_id)
        if not self.core.cancel(item_id):
            return False
        self._bell.ring()
        return True

    async def dispatch(self, now: float, lease_ttl_s: float, max_grants: int = 64) -> list[Grant]:
        return self._dispatch(now, lease_ttl_s, max_grants, wake=False)

    def _dispatch(
        self, now: float, lease_ttl_s: float, max_grants: int, wake: bool = True
    ) -> list[Grant]:
        """Dispatch and deliver; ``wake``: ring the bell if ``max_grants`` stopped it."""
        grants, expired = self.core.dispatch(now, lease_ttl_s, max_grants, self.replica_id)
        for item in expired:
            self._mailbox.deliver(item.id, "expired")
        for grant in grants:
            self._mailbox.deliver(grant.id, grant)
        if wake and len(grants) >= max_grants:
            self._bell.ring()
        return grants

    async def wait(self, item_id: str, timeout_s: float) -> WaitResult:
        core = self.core

        async def snapshot() -> Snapshot:
            grant = core.grant_of(item_id)
            if grant is not None:
                return grant
            if core.expired(item_id):
                return "expired"
            return "queued" if core.queued(item_id) else None

        return await self._mailbox.wait(item_id, timeout_s, snapshot)

    # -- holds ---------------------------------------------------------------------------
    async def release(self, item_id: str, correction: float = 0.0) -> None:
        self._mailbox.discard(item_id)
        if self.core.release(item_id, correction):
            self._bell.ring()

    async def release_dispatch(
        self, item_id: str, correction: float, now: float, lease_ttl_s: float,
        max_grants: int = 64, store_step: StoreStep | None = None,
    ) -> list[Grant]:
        _no_steps(store_step)
        self._mailbox.discard(item_id)
        if not self.core.release(item_id, correction):
            return []
        return self._dispatch(now, lease_ttl_s, max_grants)

    async def move(self, item_id: str, engine: str) -> bool:
        moved = self.core.move(item_id, engine)
        if moved:
            self._bell.ring()
        return moved

    async def grow(self, item_id: str, delta_tokens: int) -> None:
        if self.core.grow(item_id, delta_tokens):
            self._bell.ring()

    async def heartbeat(self, now: float, ttl_s: float) -> bool:
        return self.core.heartbeat(self.replica_id, now, ttl_s)

    async def leader(self, now: float) -> str | None:
        return self.core.leader(now)

    async def renew(self, item_ids: list[str], now: float, lease_ttl_s: float) -> int:
        return self.core.renew(item_ids, now, lease_ttl_s)

    async def wait_capacity(self, timeout_s: float) -> None:
        await self._bell.wait(timeout_s)

    # -- views ---------------------------------------------------------------------------
    async def loads(self, now: float) -> list[EngineLoad]:
        return self.core.loads(now)

    async def depth(self) -> dict[str, int]:
        return self.core.depth()

    async def stats(self) -> QueueStats:
        return self.core.stats()

    async def in_flight(self, tenant: str, now: float) -> int:
        return self.core.in_flight(tenant, now)

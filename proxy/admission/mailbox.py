"""Replica-local delivery of admission outcomes and capacity wake-ups, on one event loop.

Both queues use it: the memory queue from :meth:`dispatch`, the redis queue from its
dispatch (outcomes for its own replica) and from its single pub/sub reader task (outcomes
dispatched by other replicas, capacity notifications).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal, TypeAlias

from proxy.admission.base import Outcome, WaitResult

#: what the shared state says about an item: its outcome, still ``"queued"``, or ``None``
#: (not queued, not granted, not recently expired)
Snapshot: TypeAlias = Outcome | Literal["queued"] | None


class _Slot:
    __slots__ = ("event", "outcome", "users")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.outcome: Outcome | None = None
        self.users = 0


class Mailbox:
    """Outcomes per item id: handed to a registered waiter, else kept for a later one.

    Kept outcomes nobody claims (a waiter that already got its answer from the shared
    state, a request that went away) are evicted oldest first beyond ``capacity``.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._kept: OrderedDict[str, Outcome] = OrderedDict()
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    async def wait(
        self, item_id: str, timeout_s: float, snapshot: Callable[[], Awaitable[Snapshot]]
    ) -> WaitResult:
        """:meth:`~proxy.admission.base.AdmissionQueue.wait` on top of ``snapshot``.

        The slot is registered before the shared state is read, so an outcome published
        after the read reaches the slot, and one reached before it is in the read.
        """
        if self._closed:
            return None
        slot = self.register(item_id)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        try:
            while not self._closed:
                slot.event.clear()
                outcome = slot.outcome or self.take(item_id)
                if outcome is None:
                    state = await snapshot()
                    if state != "queued":
                        self.discard(item_id)
                        # None: granted and released already? then what was delivered
                        return slot.outcome if state is None else state
                    outcome = slot.outcome  # delivered while reading
                if outcome is not None:
                    return outcome
                remaining = end - loop.time()
                if remaining <= 0:
                    return None
                try:
                    async with asyncio.timeout(remaining):
                        await slot.event.wait()
                except TimeoutError:
                    return slot.outcome
            return slot.outcome
        finally:
            self.unregister(item_id, slot)

    def close(self) -> None:
        """Pending and later :meth:`wait` calls return ``None``."""
        self._closed = True
        self.wake_all()

    def deliver(self, item_id: str, outcome: Outcome) -> None:
        slot = self._slots.get(item_id)
        if slot is not None:
            slot.outcome = outcome
            slot.event.set()
            return
        self._kept[item_id] = outcome
        self._kept.move_to_end(item_id)
        while len(self._kept) > self._capacity:
            self._kept.popitem(last=False)

    def take(self, item_id: str) -> Outcome | None:
        """The kept outcome of ``item_id`` (removed), or ``None``."""
        return self._kept.pop(item_id, None)

    def discard(self, item_id: str) -> None:
        self._kept.pop(item_id, None)

    def register(self, item_id: str) -> _Slot:
        """A slot that :meth:`deliver` fills from now on; pair with :meth:`unregister`."""
        slot = self._slots.get(item_id)
        if slot is None:
            slot = self._slots[item_id] = _Slot()
        slot.users += 1
        return slot

    def unregister(self, item_id: str, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users <= 0 and self._slots.get(item_id) is slot:
            del self._slots[item_id]

    def wake_all(self) -> None:
        """Wake every waiter without an outcome: re-check the shared state (messages may
        have been lost, or the queue closes)."""
        for slot in self._slots.values():
            slot.event.set()

    def __len__(self) -> int:
        return len(self._kept)


class Bell:
    """Rings "capacity may have changed": each ring wakes everyone waiting at that moment."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    async def wait(self, timeout_s: float) -> bool:
        """Wait for the next :meth:`ring`; ``False`` after ``timeout_s``."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await event.wait()
            return True
        except TimeoutError:
            return False

    def ring(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

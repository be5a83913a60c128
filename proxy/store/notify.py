"""Per-tenant "a lease may have been released" broadcast on one event loop.

Both stores wake :meth:`~proxy.store.base.Store.wait_release` callers through it: the memory
store from :meth:`release`, the redis store from its single pub/sub reader task.
"""

from __future__ import annotations

import asyncio


class ReleaseBoard:
    """Waiters block on a per-tenant :class:`asyncio.Event`; a notification wakes all of them.

    Each notification retires the tenant's event, so later waiters wait for the next one.
    Events exist only while someone waits. Use from one event loop only.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}

    async def wait(self, tenant: str, timeout_s: float) -> bool:
        """Wait for the next :meth:`notify` of ``tenant``; ``False`` after ``timeout_s``."""
        event = self._events.get(tenant)
        if event is None:
            event = self._events[tenant] = asyncio.Event()
        self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            left = self._waiting[tenant] - 1
            if left:
                self._waiting[tenant] = left
            else:
                del self._waiting[tenant]
                self._events.pop(tenant, None)

    def notify(self, tenant: str) -> None:
        event = self._events.pop(tenant, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        """Wake every waiter (e.g. notifications may have been lost, or the store closes)."""
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    def waiters(self, tenant: str) -> int:
        return self._waiting.get(tenant, 0)

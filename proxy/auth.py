"""Authentication: ``Authorization: Bearer <key>`` -> tenant, with a short in-process cache.

The cache maps a key's digest to its tenant for ``ttl_s`` seconds. Admin writes (a revoked
or new key, a changed tenant) are announced to every replica, which drops its cache at once
(:func:`proxy.gateway.follow_changes`); ``ttl_s`` bounds how long a change takes to arrive
when an announcement is lost. Unknown keys are cached negatively for the same time, so a
client hammering with a bad key does not hammer the store.

Known and unknown keys live in two caches, each a bounded LRU (``max_entries``): a flood of
random bad keys evicts only the least recently seen bad keys, never a tenant's good one,
and never flushes the cache whole.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from adapters.clock import Clock
from adapters.errors import AuthenticationFailed, StoreUnavailable
from proxy.keys import digest, display_prefix
from proxy.store.base import Store, Tenant
from proxy.store.base import StoreUnavailable as StoreDown

_MAX_ENTRIES = 100_000
log = logging.getLogger("driftsched.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: Tenant
    key_id: str
    key_prefix: str


def bearer_token(header: bytes | None) -> str:
    if not header:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it in the Authorization header "
            "(Authorization: Bearer YOUR_KEY).",
            code=None,
        )
    raw = header.decode("latin-1").strip()
    scheme, _, token = raw.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Authorization header must be 'Bearer YOUR_KEY'.")
    return token


class _LRU:
    """digest -> (expiry, value), at most ``size`` entries; the least recently used goes."""

    __slots__ = ("_d", "size")

    def __init__(self, size: int) -> None:
        self._d: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self.size = size

    def get(self, key: str, now: float) -> tuple[float, Principal | None] | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._d[key]
            return None
        self._d.move_to_end(key)
        return hit

    def put(self, key: str, value: tuple[float, Principal | None]) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


class Authenticator:
    """Not thread-safe; one event loop (concurrent ``authenticate`` calls are fine)."""

    def __init__(self, store: Store, clock: Clock, ttl_s: float,
                 max_entries: int = _MAX_ENTRIES) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl_s
        self._known = _LRU(max_entries)
        self._unknown = _LRU(max_entries)

    def invalidate(self) -> None:
        """Drop every cached entry (after an admin change, this replica's or announced)."""
        self._known.clear()
        self._unknown.clear()

    async def authenticate(self, key: str) -> Principal:
        d = digest(key)
        now_m = self._clock.monotonic()
        hit = self._known.get(d, now_m) or self._unknown.get(d, now_m)
        if hit is not None:
            principal = hit[1]
        else:
            principal = await self._lookup(d)
            entry = (now_m + self._ttl, principal)
            (self._known if principal is not None else self._unknown).put(d, entry)
        if principal is None:
            raise AuthenticationFailed(f"Incorrect API key provided: {display_prefix(key)}.")
        return principal

    async def _lookup(self, d: str) -> Principal | None:
        try:
            record = await self._store.get_key_by_digest(d)
            if record is None or not record.active(self._clock.time()):
                return None
            tenant = await self._store.get_tenant(record.tenant)
        except StoreDown as e:
            log.warning("store lookup failed during authentication: %s", e)
            raise StoreUnavailable("The gateway's state store is unavailable; retry shortly.") from e
        if tenant is None:
            return None
        return Principal(tenant=tenant, key_id=record.key_id, key_prefix=record.prefix)

"""The negative auth cache is an LRU apart from the known keys: random bad keys cannot evict
a tenant's key (it was one dict, flushed whole at 100,000 entries)."""

from __future__ import annotations

import pytest

from adapters.clock import FakeClock
from adapters.errors import AuthenticationFailed
from proxy.auth import Authenticator
from proxy.keys import new_key, seeded_record
from proxy.store.base import Tenant
from proxy.store.memory import MemoryStore


async def test_bad_keys_do_not_evict_good_ones() -> None:
    store = MemoryStore()
    await store.start()
    clock = FakeClock()
    await store.put_tenant(Tenant(name="t"))
    key, rec = new_key("t", clock.time())
    await store.put_key(rec)
    auth = Authenticator(store, clock, ttl_s=60.0)  # the default size: 100,000
    assert (await auth.authenticate(key)).tenant.name == "t"
    await store.delete_tenant("t", clock.time())  # only a store lookup would see it now
    for i in range(100_050):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"dsk-bad{i:05d}-x")
    # still cached: the flood did not flush it (the lookup would now fail)
    assert (await auth.authenticate(key)).tenant.name == "t"
    auth.invalidate()
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(key)


async def test_the_negative_cache_is_a_bounded_lru() -> None:
    store = MemoryStore()
    await store.start()
    clock = FakeClock()
    auth = Authenticator(store, clock, ttl_s=60.0, max_entries=3)
    for k in ("k1", "k2", "k3", "k1", "k4"):  # k1 seen again: k2 is the least recent
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(k)
    # k1 and k2 become real keys: only an entry no longer cached sees that
    await store.put_tenant(Tenant(name="t"))
    for k in ("k1", "k2"):
        await store.put_key(seeded_record(k, "t", clock.time()))
    assert (await auth.authenticate("k2")).tenant.name == "t"  # evicted: looked up
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate("k1")  # recently used: still cached as unknown

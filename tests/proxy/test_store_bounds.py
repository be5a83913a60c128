"""Token arithmetic in both stores stays exact and in range, whatever the caller passes
(Lua numbers are doubles: the Redis store once charged ``max_completion_tokens: 10**30`` as
1e30 and its correction took the tenant's day back to 0)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.config import StoreConfig
from proxy.store import build_store
from proxy.store.base import Limits, Store
from proxy.store.buckets import MAX_CHARGE

T0 = 19_700 * 86400.0 + 3600.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        cfg = StoreConfig(type="memory")
    else:
        cfg = StoreConfig(type="redis", url=request.getfixturevalue("redis_server"),
                          prefix=request.getfixturevalue("redis_prefix"))
    s = build_store(cfg)
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


async def today(store: Store) -> int:
    return (await store.get_usage("t", T0)).tokens_today


async def test_an_absurd_charge_is_refused_and_changes_nothing(store: Store) -> None:
    assert (await store.try_acquire("t", 180, Limits(), T0)).ok
    for tokens in (10**30, MAX_CHARGE + 1):
        d = await store.try_acquire("t", tokens, Limits(), T0)
        assert not d.ok and d.reason == "too_large"
    assert await today(store) == 180


async def test_large_legal_charges_stay_exact(store: Store) -> None:
    assert (await store.try_acquire("t", 180, Limits(), T0)).ok
    assert (await store.try_acquire("t", MAX_CHARGE, Limits(tpm=None), T0)).ok
    await store.reconcile("t", 7 - MAX_CHARGE, Limits(), T0)
    assert await today(store) == 187


async def test_corrections_are_clamped_and_the_day_never_negative(store: Store) -> None:
    assert (await store.try_acquire("t", 100, Limits(tpm=1000), T0)).ok
    await store.reconcile("t", -(10**30), Limits(tpm=1000), T0)
    assert await today(store) == 0
    await store.reconcile("t", 10**30, Limits(tpm=1000), T0)
    used = await today(store)
    assert 0 < used <= 2**53  # clamped, not 1e30, still an exact integer
    assert (await store.try_acquire("t", -5, Limits(), T0)).ok  # a negative charge is 0
    assert await today(store) == used

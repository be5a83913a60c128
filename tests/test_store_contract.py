"""The Store contract, run against every implementation (memory and a real redis-server).

Time is driven through the ``now`` arguments; nothing sleeps except the wait_release checks.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from proxy.config import StoreConfig
from proxy.store import build_store
from proxy.store.base import KeyRecord, Limits, Store, Tenant, Usage

DAY = 86400.0
#: 01:00 UTC on some day; every test moves time forward from here
T0 = 19_700 * DAY + 3600.0
TTL = 30.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        cfg = StoreConfig(type="memory")
    else:
        url = request.getfixturevalue("redis_server")
        cfg = StoreConfig(type="redis", url=url, prefix=request.getfixturevalue("redis_prefix"))
    s = build_store(cfg)
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


def make_tenant(name: str = "acme", **kw: object) -> Tenant:
    return Tenant(name=name).with_changes(**kw)


def make_key(key_id: str, tenant: str = "acme", *, created_at: float = 0.0) -> KeyRecord:
    return KeyRecord(
        key_id=key_id,
        tenant=tenant,
        digest=f"digest-{key_id}",
        prefix=f"dsk-{key_id}",
        name=f"key {key_id}",
        created_at=created_at,
    )


async def acquire(
    store: Store, lease: str, tokens: int = 1, limits: Limits | None = None, now: float = T0
) -> tuple[bool, str | None, float]:
    d = await store.try_acquire("acme", lease, tokens, limits or Limits(), now, TTL)
    return d.ok, d.reason, d.retry_after_s


# -- lifecycle -----------------------------------------------------------------------------
async def test_ping_and_double_close(store: Store) -> None:
    assert await store.ping() is True
    await store.aclose()
    await store.aclose()


# -- tenants -------------------------------------------------------------------------------
async def test_tenant_crud(store: Store) -> None:
    assert await store.get_tenant("acme") is None
    assert await store.list_tenants() == []
    acme = make_tenant("acme", rpm=60, allowed_models=["m1"], ttft_slo_ms=500.0)
    await store.put_tenant(make_tenant("zeta"))
    await store.put_tenant(acme)
    assert await store.get_tenant("acme") == acme
    assert [t.name for t in await store.list_tenants()] == ["acme", "zeta"]

    changed = acme.with_changes(rpm=120, qos_class="premium")
    await store.put_tenant(changed)
    assert await store.get_tenant("acme") == changed

    assert await store.delete_tenant("acme", now=T0) is True
    assert await store.get_tenant("acme") is None
    assert await store.delete_tenant("acme", now=T0) is False
    assert [t.name for t in await store.list_tenants()] == ["zeta"]


async def test_delete_tenant_revokes_its_keys_only(store: Store) -> None:
    await store.put_tenant(make_tenant("acme"))
    await store.put_tenant(make_tenant("zeta"))
    await store.put_key(make_key("k1", "acme", created_at=1.0))
    early = make_key("k2", "acme", created_at=2.0)
    await store.put_key(replace(early, revoked_at=T0 - 100))
    await store.put_key(make_key("k3", "zeta", created_at=3.0))

    assert await store.delete_tenant("acme", now=T0)
    k1, k2, k3 = [await store.get_key(i) for i in ("k1", "k2", "k3")]
    assert k1 is not None and k1.revoked_at == T0 and not k1.active(T0)
    assert k2 is not None and k2.revoked_at == T0 - 100  # the earlier revocation stands
    assert k3 is not None and k3.revoked_at is None and k3.active(T0)
    by_digest = await store.get_key_by_digest("digest-k1")
    assert by_digest is not None and by_digest.revoked_at == T0
    assert [k.key_id for k in await store.list_keys(tenant="acme")] == ["k1", "k2"]


async def test_delete_tenant_zeroes_cumulative_usage(store: Store) -> None:
    await store.put_tenant(make_tenant("acme"))
    await store.record_usage("acme", T0, requests=3, tokens_in=10)
    await store.delete_tenant("acme", now=T0)
    assert (await store.get_usage("acme", T0)).requests == 0


# -- keys ----------------------------------------------------------------------------------
async def test_key_crud_and_indexes(store: Store) -> None:
    assert await store.get_key("k1") is None
    assert await store.get_key_by_digest("digest-k1") is None
    k1 = make_key("k1", created_at=5.0)
    await store.put_key(k1)
    assert await store.get_key("k1") == k1
    assert await store.get_key_by_digest("digest-k1") == k1

    rotated = replace(k1, digest="digest-new", expires_at=T0)
    await store.put_key(rotated)
    assert await store.get_key_by_digest("digest-k1") is None
    assert await store.get_key_by_digest("digest-new") == rotated

    moved = replace(rotated, tenant="zeta")
    await store.put_key(moved)
    assert await store.list_keys(tenant="acme") == []
    assert await store.list_keys(tenant="zeta") == [moved]


async def test_list_keys_filters_and_sorts_by_creation(store: Store) -> None:
    for key_id, tenant, created in [
        ("b2", "acme", 3.0),
        ("a1", "acme", 1.0),
        ("c3", "zeta", 2.0),
        ("a9", "zeta", 4.0),
    ]:
        await store.put_key(make_key(key_id, tenant, created_at=created))

    def ids(records: list[KeyRecord]) -> list[str]:
        return [r.key_id for r in records]

    assert ids(await store.list_keys()) == ["a1", "c3", "b2", "a9"]
    assert ids(await store.list_keys(tenant="acme")) == ["a1", "b2"]
    assert ids(await store.list_keys(prefix="dsk-a")) == ["a1", "a9"]
    assert ids(await store.list_keys(tenant="zeta", prefix="dsk-a")) == ["a9"]
    assert await store.list_keys(tenant="nobody") == []
    assert await store.list_keys(prefix="nope") == []


# -- try_acquire: success and state ---------------------------------------------------------
async def test_success_charges_every_limit(store: Store) -> None:
    limits = Limits(rpm=60, tpm=6000, max_concurrency=2, daily_token_quota=10_000)
    d = await store.try_acquire("acme", "l1", 100, limits, T0, TTL)
    assert d.ok and d.reason is None and d.retry_after_s == 0
    assert d.state.limit_requests == 60 and d.state.remaining_requests == 59
    assert d.state.reset_requests_s == pytest.approx(1.0)  # one request refills in 1 s
    assert d.state.limit_tokens == 6000 and d.state.remaining_tokens == 5900
    assert d.state.reset_tokens_s == pytest.approx(1.0)  # 100 tokens at 100/s
    assert d.quota_remaining == 9900
    usage = await store.get_usage("acme", T0)
    assert usage.in_flight == 1 and usage.tokens_today == 100

    later = await store.try_acquire("acme", "l2", 50, limits, T0 + 0.5, TTL)
    assert later.ok
    assert later.state.remaining_requests == 58  # 59 + 0.5 refilled - 1 = 58.5
    assert later.state.reset_requests_s == pytest.approx(1.5)
    assert later.state.remaining_tokens == 5900  # 5900 + 50 - 50
    assert later.quota_remaining == 9850


async def test_unlimited_still_holds_a_lease(store: Store) -> None:
    d = await store.try_acquire("acme", "l1", 10**9, Limits(), T0, TTL)
    assert d.ok
    assert d.state.limit_requests is None and d.state.limit_tokens is None
    assert d.quota_remaining is None
    assert await store.in_flight("acme", T0) == 1


async def test_acquiring_a_held_lease_is_a_free_noop(store: Store) -> None:
    limits = Limits(rpm=10, tpm=1000, max_concurrency=1, daily_token_quota=5000)
    first = await store.try_acquire("acme", "l1", 100, limits, T0, TTL)
    again = await store.try_acquire("acme", "l1", 100, limits, T0, TTL)
    assert again.ok
    assert again.state == first.state and again.quota_remaining == first.quota_remaining
    assert await store.in_flight("acme", T0) == 1


async def test_tenants_are_independent(store: Store) -> None:
    limits = Limits(rpm=1, max_concurrency=1)
    assert (await store.try_acquire("acme", "l1", 1, limits, T0, TTL)).ok
    assert (await store.try_acquire("zeta", "l1", 1, limits, T0, TTL)).ok
    assert not (await store.try_acquire("acme", "l2", 1, limits, T0, TTL)).ok


# -- try_acquire: each refusal, its retry_after, and nothing charged ------------------------
async def test_too_large_for_tpm_or_quota(store: Store) -> None:
    assert await acquire(store, "l1", 601, Limits(tpm=600)) == (False, "too_large", math.inf)
    assert await acquire(store, "l1", 101, Limits(daily_token_quota=100)) == (
        False,
        "too_large",
        math.inf,
    )
    assert await store.in_flight("acme", T0) == 0
    assert (await store.get_usage("acme", T0)).tokens_today == 0
    assert (await acquire(store, "l1", 600, Limits(tpm=600, daily_token_quota=600)))[0]


async def test_quota_waits_until_utc_midnight_and_resets_there(store: Store) -> None:
    limits = Limits(daily_token_quota=1000)
    before_midnight = 19_701 * DAY - 10.0
    assert (await acquire(store, "l1", 900, limits, before_midnight))[0]
    ok, reason, retry = await acquire(store, "l2", 200, limits, before_midnight)
    assert (ok, reason) == (False, "quota") and retry == pytest.approx(10.0)
    assert (await acquire(store, "l3", 100, limits, before_midnight))[0]  # exactly full
    d = await store.try_acquire("acme", "l4", 1, limits, 19_701 * DAY - 0.001, TTL)
    assert d.reason == "quota" and d.quota_remaining == 0

    d = await store.try_acquire("acme", "l5", 200, limits, 19_701 * DAY, TTL)
    assert d.ok and d.quota_remaining == 800
    usage = await store.get_usage("acme", 19_701 * DAY)
    assert usage.tokens_today == 200
    assert (await store.get_usage("acme", before_midnight)).tokens_today == 1000


async def test_concurrency_refusal_and_release(store: Store) -> None:
    limits = Limits(rpm=100, max_concurrency=2)
    assert (await acquire(store, "l1", limits=limits))[0]
    assert (await acquire(store, "l2", limits=limits))[0]
    d = await store.try_acquire("acme", "l3", 1, limits, T0, TTL)
    assert (d.ok, d.reason, d.retry_after_s) == (False, "concurrency", 0.0)
    assert d.state.remaining_requests == 98  # the refusal charged nothing
    assert await store.release("acme", "l1") is True
    assert (await acquire(store, "l3", limits=limits))[0]
    assert await store.in_flight("acme", T0) == 2


async def test_rpm_retry_after_is_the_real_wait(store: Store) -> None:
    limits = Limits(rpm=2)  # one request per 30 s
    assert (await acquire(store, "l1", limits=limits))[0]
    assert (await acquire(store, "l2", limits=limits))[0]
    ok, reason, retry = await acquire(store, "l3", limits=limits, now=T0 + 6)
    assert (ok, reason) == (False, "rpm") and retry == pytest.approx(24.0)
    assert (await acquire(store, "l3", limits=limits, now=T0 + 29.9))[1] == "rpm"
    assert (await acquire(store, "l3", limits=limits, now=T0 + 30))[0]


async def test_tpm_retry_after_is_the_real_wait(store: Store) -> None:
    limits = Limits(tpm=600)  # 10 tokens/s
    assert (await acquire(store, "l1", 500, limits))[0]
    ok, reason, retry = await acquire(store, "l2", 200, limits)
    assert (ok, reason) == (False, "tpm") and retry == pytest.approx(10.0)
    assert (await acquire(store, "l2", 200, limits, T0 + 9.9))[1] == "tpm"
    d = await store.try_acquire("acme", "l2", 200, limits, T0 + 10, TTL)
    assert d.ok and d.state.remaining_tokens == 0
    assert d.state.reset_tokens_s == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        # quota exhausted, concurrency full, rpm and tpm empty: quota is checked first
        (Limits(rpm=1, tpm=100, max_concurrency=1, daily_token_quota=100), "quota"),
        (Limits(rpm=1, tpm=100, max_concurrency=1), "concurrency"),
        (Limits(rpm=1, tpm=100), "rpm"),
        (Limits(tpm=100), "tpm"),
    ],
)
async def test_refusal_order(store: Store, limits: Limits, expected: str) -> None:
    assert (await acquire(store, "l1", 100, limits))[0]
    assert (await acquire(store, "l2", 100, limits))[1] == expected


async def test_all_or_nothing(store: Store) -> None:
    limits = Limits(rpm=10, tpm=1000, max_concurrency=5, daily_token_quota=10_000)
    first = await store.try_acquire("acme", "l1", 900, limits, T0, TTL)
    refused = await store.try_acquire("acme", "l2", 200, limits, T0, TTL)
    assert refused.reason == "tpm"  # quota, concurrency and rpm would have allowed it
    assert refused.state == first.state
    assert refused.quota_remaining == first.quota_remaining == 9100
    usage = await store.get_usage("acme", T0)
    assert (usage.in_flight, usage.tokens_today) == (1, 900)
    assert await store.release("acme", "l2") is False


# -- leases ---------------------------------------------------------------------------------
async def test_leases_expire_and_free_their_slot(store: Store) -> None:
    limits = Limits(max_concurrency=1)
    await store.try_acquire("acme", "l1", 1, limits, T0, 10.0)
    assert await store.in_flight("acme", T0 + 9.9) == 1
    assert (await acquire(store, "l2", limits=limits, now=T0 + 9.9))[1] == "concurrency"
    assert await store.in_flight("acme", T0 + 10) == 0
    assert (await acquire(store, "l2", limits=limits, now=T0 + 10))[0]
    assert await store.renew([("acme", "l1")], T0 + 10, 10.0) == 0


async def test_renew_extends_only_leases_still_held(store: Store) -> None:
    await store.try_acquire("acme", "a1", 1, Limits(), T0, 10.0)
    await store.try_acquire("acme", "a2", 1, Limits(), T0, 10.0)
    await store.try_acquire("zeta", "z1", 1, Limits(), T0, 10.0)
    await store.release("acme", "a2")
    leases = [("acme", "a1"), ("acme", "a2"), ("zeta", "z1"), ("nobody", "x"), ("acme", "x")]
    assert await store.renew(leases, T0 + 5, 10.0) == 2
    assert await store.in_flight("acme", T0 + 14.9) == 1
    assert await store.in_flight("zeta", T0 + 14.9) == 1
    assert await store.in_flight("acme", T0 + 15) == 0
    assert await store.renew([], T0, 10.0) == 0
    # renewing never shortens a lease
    await store.try_acquire("acme", "long", 1, Limits(), T0, 100.0)
    assert await store.renew([("acme", "long")], T0 + 1, 10.0) == 1
    assert await store.in_flight("acme", T0 + 99) == 1


async def test_release_is_idempotent(store: Store) -> None:
    await store.try_acquire("acme", "l1", 1, Limits(), T0, TTL)
    assert await store.release("acme", "l1") is True
    assert await store.release("acme", "l1") is False
    assert await store.release("nobody", "l1") is False
    assert await store.in_flight("acme", T0) == 0


async def test_wait_release_is_woken_by_a_release(store: Store) -> None:
    await store.try_acquire("acme", "l1", 1, Limits(max_concurrency=1), T0, TTL)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter = asyncio.create_task(store.wait_release("acme", 10.0))
    other = asyncio.create_task(store.wait_release("zeta", 0.3))
    await asyncio.sleep(0.02)
    assert await store.release("acme", "l1")
    await asyncio.wait_for(waiter, 2.0)
    assert loop.time() - started < 2.0
    assert not other.done()  # another tenant's release does not wake it
    await other


async def test_wait_release_times_out(store: Store) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.wait_release("acme", 0.05)
    assert 0.04 <= loop.time() - started < 1.0


# -- reconcile --------------------------------------------------------------------------------
async def test_reconcile_up_makes_a_debt_paid_by_refill(store: Store) -> None:
    limits = Limits(tpm=600, daily_token_quota=10_000)
    assert (await acquire(store, "l1", 500, limits))[0]
    await store.reconcile("acme", 300, limits, T0)  # used 800 of a 600 bucket
    d = await store.try_acquire("acme", "l2", 10, limits, T0, TTL)
    assert (d.reason, d.retry_after_s) == ("tpm", pytest.approx(21.0))  # (10 + 200) / 10
    assert d.state.remaining_tokens == 0 and d.state.reset_tokens_s == pytest.approx(80.0)
    assert d.quota_remaining == 9200
    assert (await store.get_usage("acme", T0)).tokens_today == 800
    assert (await acquire(store, "l2", 10, limits, T0 + 21))[0]


async def test_reconcile_down_refunds_up_to_capacity(store: Store) -> None:
    limits = Limits(tpm=600, daily_token_quota=1000)
    assert (await acquire(store, "l1", 500, limits))[0]
    await store.reconcile("acme", -5000, limits, T0)
    assert (await store.get_usage("acme", T0)).tokens_today == 0
    d = await store.try_acquire("acme", "l2", 600, limits, T0, TTL)
    assert d.ok and d.state.remaining_tokens == 0  # refilled to 600, not beyond
    assert d.quota_remaining == 400


async def test_reconcile_moves_the_quota(store: Store) -> None:
    limits = Limits(daily_token_quota=1000)
    assert (await acquire(store, "l1", 900, limits))[0]
    assert (await acquire(store, "l2", 600, limits))[1] == "quota"
    await store.reconcile("acme", -500, limits, T0)
    assert (await acquire(store, "l2", 600, limits))[0]
    await store.reconcile("acme", 0, limits, T0)
    assert (await store.get_usage("acme", T0)).tokens_today == 1000


# -- usage ------------------------------------------------------------------------------------
async def test_usage_counters(store: Store) -> None:
    assert await store.get_usage("acme", T0) == Usage()
    await store.record_usage("acme", T0, requests=1, tokens_in=10, tokens_out=20)
    await store.record_usage("acme", T0, requests=1, errors=1, tokens_in=5)
    await store.record_usage("acme", T0)
    await store.try_acquire("acme", "l1", 30, Limits(), T0, TTL)
    assert await store.get_usage("acme", T0) == Usage(
        requests=2, errors=1, tokens_in=15, tokens_out=20, tokens_today=30, in_flight=1
    )
    assert await store.get_usage("zeta", T0) == Usage()


async def test_finish_releases_reconciles_and_counts_in_one_call(store: Store) -> None:
    now = 1_700_000_000.0
    limits = Limits(tpm=1000, max_concurrency=1, daily_token_quota=10_000)
    assert (await store.try_acquire("fin", "l1", 300, limits, now, 30)).ok
    assert not (await store.try_acquire("fin", "l2", 10, limits, now, 30)).ok  # slot taken
    await store.finish("fin", "l1", -200, limits, now, requests=1, tokens_in=40, tokens_out=60)
    u = await store.get_usage("fin", now)
    assert (u.requests, u.tokens_in, u.tokens_out, u.in_flight) == (1, 40, 60, 0)
    assert u.tokens_today == 100  # 300 charged, 200 refunded
    d = await store.try_acquire("fin", "l2", 10, limits, now, 30)
    assert d.ok and d.state.remaining_tokens == 1000 - 100 - 10
    await store.finish("fin", None, 0, limits, now, errors=1)
    assert (await store.get_usage("fin", now)).errors == 1

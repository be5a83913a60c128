"""The Store contract, run against every implementation (memory and a real redis-server).

Time is driven through the ``now`` arguments; nothing sleeps.
"""

from __future__ import annotations

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
    store: Store, tokens: int = 1, limits: Limits | None = None, now: float = T0
) -> tuple[bool, str | None, float]:
    d = await store.try_acquire("acme", tokens, limits or Limits(), now)
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
    limits = Limits(rpm=60, tpm=6000, daily_token_quota=10_000)
    d = await store.try_acquire("acme", 100, limits, T0)
    assert d.ok and d.reason is None and d.retry_after_s == 0
    assert d.state.limit_requests == 60 and d.state.remaining_requests == 59
    assert d.state.reset_requests_s == pytest.approx(1.0)  # one request refills in 1 s
    assert d.state.limit_tokens == 6000 and d.state.remaining_tokens == 5900
    assert d.state.reset_tokens_s == pytest.approx(1.0)  # 100 tokens at 100/s
    assert d.quota_remaining == 9900
    usage = await store.get_usage("acme", T0)
    assert usage.tokens_today == 100

    later = await store.try_acquire("acme", 50, limits, T0 + 0.5)
    assert later.ok
    assert later.state.remaining_requests == 58  # 59 + 0.5 refilled - 1 = 58.5
    assert later.state.reset_requests_s == pytest.approx(1.5)
    assert later.state.remaining_tokens == 5900  # 5900 + 50 - 50
    assert later.quota_remaining == 9850


async def test_unlimited_charges_nothing_visible(store: Store) -> None:
    d = await store.try_acquire("acme", 10**9, Limits(), T0)
    assert d.ok
    assert d.state.limit_requests is None and d.state.limit_tokens is None
    assert d.quota_remaining is None


async def test_tenants_are_independent(store: Store) -> None:
    limits = Limits(rpm=1)
    assert (await store.try_acquire("acme", 1, limits, T0)).ok
    assert (await store.try_acquire("zeta", 1, limits, T0)).ok
    assert not (await store.try_acquire("acme", 1, limits, T0)).ok


# -- try_acquire: each refusal, its retry_after, and nothing charged ------------------------
async def test_too_large_for_tpm_or_quota(store: Store) -> None:
    assert await acquire(store, 601, Limits(tpm=600)) == (False, "too_large", math.inf)
    assert await acquire(store, 101, Limits(daily_token_quota=100)) == (
        False,
        "too_large",
        math.inf,
    )
    assert (await store.get_usage("acme", T0)).tokens_today == 0
    assert (await acquire(store, 600, Limits(tpm=600, daily_token_quota=600)))[0]


async def test_quota_waits_until_utc_midnight_and_resets_there(store: Store) -> None:
    limits = Limits(daily_token_quota=1000)
    before_midnight = 19_701 * DAY - 10.0
    assert (await acquire(store, 900, limits, before_midnight))[0]
    ok, reason, retry = await acquire(store, 200, limits, before_midnight)
    assert (ok, reason) == (False, "quota") and retry == pytest.approx(10.0)
    assert (await acquire(store, 100, limits, before_midnight))[0]  # exactly full
    d = await store.try_acquire("acme", 1, limits, 19_701 * DAY - 0.001)
    assert d.reason == "quota" and d.quota_remaining == 0

    d = await store.try_acquire("acme", 200, limits, 19_701 * DAY)
    assert d.ok and d.quota_remaining == 800
    usage = await store.get_usage("acme", 19_701 * DAY)
    assert usage.tokens_today == 200
    assert (await store.get_usage("acme", before_midnight)).tokens_today == 1000


async def test_rpm_retry_after_is_the_real_wait(store: Store) -> None:
    limits = Limits(rpm=2)  # one request per 30 s
    assert (await acquire(store, limits=limits))[0]
    assert (await acquire(store, limits=limits))[0]
    ok, reason, retry = await acquire(store, limits=limits, now=T0 + 6)
    assert (ok, reason) == (False, "rpm") and retry == pytest.approx(24.0)
    assert (await acquire(store, limits=limits, now=T0 + 29.9))[1] == "rpm"
    assert (await acquire(store, limits=limits, now=T0 + 30))[0]


async def test_tpm_retry_after_is_the_real_wait(store: Store) -> None:
    limits = Limits(tpm=600)  # 10 tokens/s
    assert (await acquire(store, 500, limits))[0]
    ok, reason, retry = await acquire(store, 200, limits)
    assert (ok, reason) == (False, "tpm") and retry == pytest.approx(10.0)
    assert (await acquire(store, 200, limits, T0 + 9.9))[1] == "tpm"
    d = await store.try_acquire("acme", 200, limits, T0 + 10)
    assert d.ok and d.state.remaining_tokens == 0
    assert d.state.reset_tokens_s == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        # quota exhausted, rpm and tpm empty: quota is checked first
        (Limits(rpm=1, tpm=100, daily_token_quota=100), "quota"),
        (Limits(rpm=1, tpm=100), "rpm"),
        (Limits(tpm=100), "tpm"),
    ],
)
async def test_refusal_order(store: Store, limits: Limits, expected: str) -> None:
    assert (await acquire(store, 100, limits))[0]
    assert (await acquire(store, 100, limits))[1] == expected


async def test_all_or_nothing(store: Store) -> None:
    limits = Limits(rpm=10, tpm=1000, daily_token_quota=10_000)
    first = await store.try_acquire("acme", 900, limits, T0)
    refused = await store.try_acquire("acme", 200, limits, T0)
    assert refused.reason == "tpm"  # quota and rpm would have allowed it
    assert refused.state == first.state
    assert refused.quota_remaining == first.quota_remaining == 9100
    assert (await store.get_usage("acme", T0)).tokens_today == 900


# -- reconcile --------------------------------------------------------------------------------
async def test_reconcile_up_makes_a_debt_paid_by_refill(store: Store) -> None:
    limits = Limits(tpm=600, daily_token_quota=10_000)
    assert (await acquire(store, 500, limits))[0]
    await store.reconcile("acme", 300, limits, T0)  # used 800 of a 600 bucket
    d = await store.try_acquire("acme", 10, limits, T0)
    assert (d.reason, d.retry_after_s) == ("tpm", pytest.approx(21.0))  # (10 + 200) / 10
    assert d.state.remaining_tokens == 0 and d.state.reset_tokens_s == pytest.approx(80.0)
    assert d.quota_remaining == 9200
    assert (await store.get_usage("acme", T0)).tokens_today == 800
    assert (await acquire(store, 10, limits, T0 + 21))[0]


async def test_reconcile_down_refunds_up_to_capacity(store: Store) -> None:
    limits = Limits(tpm=600, daily_token_quota=1000)
    assert (await acquire(store, 500, limits))[0]
    await store.reconcile("acme", -5000, limits, T0)
    assert (await store.get_usage("acme", T0)).tokens_today == 0
    d = await store.try_acquire("acme", 600, limits, T0)
    assert d.ok and d.state.remaining_tokens == 0  # refilled to 600, not beyond
    assert d.quota_remaining == 400


async def test_reconcile_moves_the_quota(store: Store) -> None:
    limits = Limits(daily_token_quota=1000)
    assert (await acquire(store, 900, limits))[0]
    assert (await acquire(store, 600, limits))[1] == "quota"
    await store.reconcile("acme", -500, limits, T0)
    assert (await acquire(store, 600, limits))[0]
    await store.reconcile("acme", 0, limits, T0)
    assert (await store.get_usage("acme", T0)).tokens_today == 1000


# -- usage ------------------------------------------------------------------------------------
async def test_usage_counters(store: Store) -> None:
    assert await store.get_usage("acme", T0) == Usage()
    await store.record_usage("acme", T0, requests=1, tokens_in=10, tokens_out=20)
    await store.record_usage("acme", T0, requests=1, errors=1, tokens_in=5)
    await store.record_usage("acme", T0)
    await store.try_acquire("acme", 30, Limits(), T0)
    assert await store.get_usage("acme", T0) == Usage(
        requests=2, errors=1, tokens_in=15, tokens_out=20, tokens_today=30
    )
    assert await store.get_usage("zeta", T0) == Usage()


async def test_finish_reconciles_and_counts_in_one_call(store: Store) -> None:
    now = 1_700_000_000.0
    limits = Limits(tpm=1000, daily_token_quota=10_000)
    assert (await store.try_acquire("fin", 300, limits, now)).ok
    await store.finish("fin", -200, limits, now, requests=1, tokens_in=40, tokens_out=60)
    u = await store.get_usage("fin", now)
    assert (u.requests, u.tokens_in, u.tokens_out) == (1, 40, 60)
    assert u.tokens_today == 100  # 300 charged, 200 refunded
    d = await store.try_acquire("fin", 10, limits, now)
    assert d.ok and d.state.remaining_tokens == 1000 - 100 - 10
    await store.finish("fin", 0, limits, now, errors=1)
    assert (await store.get_usage("fin", now)).errors == 1


# -- the seed marker ---------------------------------------------------------------------------
async def test_the_seed_marker_is_kept_until_the_data_is_lost(store: Store) -> None:
    assert await store.seeded() is None  # a new store
    await store.mark_seeded("2:abc")
    assert await store.seeded() == "2:abc"
    await store.put_tenant(make_tenant("acme"))
    assert await store.delete_tenant("acme")  # an admin deleting a tenant keeps the marker
    assert await store.seeded() == "2:abc"

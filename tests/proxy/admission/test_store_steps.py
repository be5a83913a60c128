"""Store steps: the store's shaping and settlement, run inside the Redis queue's enqueue and
release scripts (one round trip per step of a request), decide exactly as the store's own
scripts do.

Two stores on one real Redis, under different prefixes, get the same random sequence of
requests: one shapes with :meth:`RedisStore.try_acquire` and settles with
:meth:`RedisStore.finish`, the other through :meth:`RedisQueue.enqueue_dispatch` and
:meth:`RedisQueue.release_dispatch` with the store's steps. Every decision, every usage
counter and every later decision (the buckets' state) must agree; a refused step queues
nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.admission.base import EngineCapacity, QueueItem
from proxy.admission.redis import RedisQueue
from proxy.store.base import Limits
from proxy.store.redis import RedisStore

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
LIMITS = [
    Limits(rpm=3, tpm=500, daily_token_quota=2000),
    Limits(rpm=None, tpm=200, daily_token_quota=None),
    Limits(rpm=2, tpm=None, daily_token_quota=600),
]


@dataclass
class Pair:
    plain: RedisStore
    stepped: RedisStore
    queue: RedisQueue


async def _pair(url: str, prefix: str) -> Pair:
    plain = RedisStore(url, prefix=f"{prefix}-plain")
    stepped = RedisStore(url, prefix=f"{prefix}-stepped")
    queue = RedisQueue("r1", url, prefix=f"{prefix}-stepped")
    for part in (plain, stepped, queue):
        await part.start()
    await queue.set_engines([EngineCapacity("e1", ("m",), None, None, True)], T0, 1e6)
    return Pair(plain, stepped, queue)


async def _close(p: Pair) -> None:
    for part in (p.queue, p.plain, p.stepped):
        await part.aclose()


request = st.tuples(
    st.sampled_from(["acme", "beta"]),
    st.integers(0, 2),  # limits
    st.sampled_from([0, 1, 40, 150, 450, 700, 3000]),  # tokens charged at arrival
    st.sampled_from([0.0, 0.0, 0.5, 7.0, 31.0]),  # seconds since the previous request
    st.sampled_from([-150, -1, 0, 0, 25, 300]),  # actual - charged, settled at the end
    st.integers(0, 3),  # completion tokens (usage)
)


async def play(url: str, prefix: str, sequence: list[tuple]) -> None:  # type: ignore[type-arg]
    p = await _pair(url, prefix)
    now = T0
    try:
        for n, (tenant, li, tokens, dt, delta, out) in enumerate(sequence):
            now += dt
            limits = LIMITS[li]
            want = await p.plain.try_acquire(tenant, tokens, limits, now)
            item = QueueItem(f"i{n}", tenant, "r1", "m", 0.0, 10, now + 60)
            done = await p.queue.enqueue_dispatch(
                item, now, 30.0, store_step=p.stepped.acquire_step(tenant, tokens, limits, now))
            assert p.stepped.decision_of(done.store_reply, limits) == want, n
            if not want.ok:
                assert done.result == "refused" and done.grants == []
                assert await p.queue.depth() == {}
                continue
            assert done.result == "queued" and [g.id for g in done.grants] == [item.id]
            counts = {"requests": 1, "errors": n % 2, "tokens_in": tokens, "tokens_out": out}
            await p.plain.finish(tenant, delta, limits, now, **counts)
            step = p.stepped.finish_step(tenant, delta, limits, now, **counts)
            await p.queue.release_dispatch(item.id, 0.0, now, 30.0, store_step=step)
            assert await p.queue.in_flight(tenant, now) == 0
            for t in ("acme", "beta"):
                assert await p.stepped.get_usage(t, now) == await p.plain.get_usage(t, now)
    finally:
        await _close(p)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(request, min_size=5, max_size=60))
def test_stepped_shaping_and_settlement_decide_as_the_store(
    redis_server: str, redis_prefix: str, sequence: list[tuple],  # type: ignore[type-arg]
) -> None:
    asyncio.run(play(redis_server, f"{redis_prefix}-{abs(hash(tuple(sequence)))}", sequence))


def test_a_refused_step_queues_nothing_and_a_passed_one_is_granted(
    redis_server: str, redis_prefix: str
) -> None:
    async def run() -> None:
        p = await _pair(redis_server, redis_prefix)
        try:
            limits = Limits(rpm=1, tpm=None, daily_token_quota=None)
            first = await p.queue.enqueue_dispatch(
                QueueItem("a", "acme", "r1", "m", 0.0, 10, T0 + 60), T0, 30.0,
                store_step=p.stepped.acquire_step("acme", 5, limits, T0))
            assert first.result == "queued" and [g.id for g in first.grants] == ["a"]
            assert p.stepped.decision_of(first.store_reply, limits).ok
            second = await p.queue.enqueue_dispatch(
                QueueItem("b", "acme", "r1", "m", 0.0, 10, T0 + 60), T0, 30.0,
                store_step=p.stepped.acquire_step("acme", 5, limits, T0))
            decision = p.stepped.decision_of(second.store_reply, limits)
            assert second.result == "refused" and not decision.ok and decision.reason == "rpm"
            assert 59 < decision.retry_after_s <= 60
            assert await p.queue.depth() == {} and await p.queue.in_flight("acme", T0) == 1
        finally:
            await _close(p)

    asyncio.run(run())

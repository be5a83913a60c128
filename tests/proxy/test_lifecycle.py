"""RequestLifecycle without uvicorn: the app's own lifespan builds the real parts (memory store,
memory admission queue, scheduler, shaper) around a fake clock and an in-test pool of two
engines (the HTTP edge is not involved: the lifecycle never forwards)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.base import Backend
from adapters.clock import FakeClock
from adapters.errors import ContextLengthExceeded, QueueFull, QueueTimeout, SloUnattainable
from proxy.app import DriftSchedApp, create_app
from proxy.auth import Principal
from proxy.gateway import Gateway
from proxy.lifecycle import Outcome, RequestLifecycle
from proxy.requests import parse_request
from tests.harness import make_settings


class TwoEngines:
    """A BackendPool of two always-healthy engines (nothing is launched or probed)."""

    def __init__(self, max_num_seqs: int = 4) -> None:
        self._backends = [
            Backend(name=n, url=f"http://{n}.invalid", models=("m",), kv_capacity_tokens=10_000,
                    max_num_seqs=max_num_seqs, max_model_len=4096, state="healthy")
            for n in ("e1", "e2")
        ]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def backends(self) -> list[Backend]:
        return self._backends

    def models(self) -> list[str]:
        return ["m"]

    def candidates(self, model: str) -> list[Backend]:
        return [b for b in self._backends if b.routable and b.serves(model)]


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    base = make_settings(tenants=[
        {"name": "a", "max_concurrency": 1, "queue_timeout_s": 2, "api_keys": ["dsk-a" + "a" * 40]},
        {"name": "b", "api_keys": ["dsk-b" + "b" * 40]},
    ])
    settings = base.model_copy(update={"scheduler": base.scheduler.model_copy(
        update={"max_queued_per_tenant": 2})})
    app: DriftSchedApp = create_app(settings, clock=FakeClock(), pool_factory=lambda s: TwoEngines())
    async with app.api.router.lifespan_context(app.api):
        assert app.gateway is not None
        yield app.gateway


async def life(gw: Gateway, tenant: str, content: str = "hello", **body: Any) -> RequestLifecycle:
    principal: Principal = await gw.authenticate(f"dsk-{tenant}" + tenant * 40)
    raw = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    req = parse_request("chat", json.dumps({**raw, **body}).encode())
    return RequestLifecycle(gw, principal, req, gw.clock.monotonic())


async def holds(gw: Gateway) -> dict[str, tuple[int, int]]:
    return {x.name: (x.held_tokens, x.seqs) for x in await gw.scheduler.queue.loads(gw.clock.time())}


async def test_begin_grants_with_a_minted_id_and_settle_frees_everything(gw: Gateway) -> None:
    one, two = await life(gw, "b"), await life(gw, "b")
    assert len(one.id) == 32 and one.id != two.id
    await one.begin()
    assert one.stage == "upstream" and one.admitted is not None
    assert one.admitted.grant.id == one.id
    assert sum(s for _, s in (await holds(gw)).values()) == 1
    assert (await gw.store.get_usage("b", gw.clock.time())).tokens_today > 0  # charged
    one.upstream_reached = True  # the engine served it: the charge settles to real usage
    await one.settle(Outcome(status=200, usage={"prompt_tokens": 2, "completion_tokens": 5}))
    assert all(v == (0, 0) for v in (await holds(gw)).values())
    assert (await gw.store.get_usage("b", gw.clock.time())).tokens_today == 7  # reconciled


async def test_the_live_limit_makes_the_second_request_wait_for_the_first(gw: Gateway) -> None:
    first, second = await life(gw, "a"), await life(gw, "a")
    await first.begin()
    waiting = asyncio.create_task(second.begin())
    await asyncio.sleep(0.05)
    assert not waiting.done() and second.stage == "queued"
    await first.settle(Outcome(status=200, usage={"prompt_tokens": 2, "completion_tokens": 1}))
    await asyncio.wait_for(waiting, 2)
    assert second.admitted is not None
    await second.settle(Outcome(status=499))  # the client went away: nothing stays held
    assert all(v == (0, 0) for v in (await holds(gw)).values())
    assert await gw.scheduler.queue.in_flight("a", gw.clock.time()) == 0


async def test_a_prompt_that_fits_no_engine_is_refused_before_anything_is_charged(
    gw: Gateway,
) -> None:
    big = await life(gw, "b", "x" * 20_000)  # ~5000 tokens > max_model_len 4096
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 4096 tokens"):
        await big.begin()
    assert big.admitted is None
    assert (await gw.store.get_usage("b", gw.clock.time())).tokens_today == 0  # not charged
    assert await gw.scheduler.queue.depth() == {}
    too_long = await life(gw, "b", "hi", max_tokens=5000)
    with pytest.raises(ContextLengthExceeded, match="in the completion"):
        await too_long.begin()


async def test_a_fallback_moves_the_hold(gw: Gateway) -> None:
    one = await life(gw, "b")
    await one.begin()
    assert one.admitted is not None
    granted = one.admitted.grant.backend
    engine = await one.next_engine()
    assert engine is not None and engine.name == granted
    # the granted engine refused the connection: the next one is the other, and so is the hold
    fallback = await one.next_engine()
    assert fallback is not None and fallback.name != granted
    assert (await holds(gw))[fallback.name][1] == 1
    assert (await holds(gw)).get(granted, (0, 0))[1] == 0
    assert await one.next_engine() is None  # both tried
    await one.settle(Outcome(status=502))
    assert all(v == (0, 0) for v in (await holds(gw)).values())


async def test_a_full_tenant_queue_is_a_429_with_a_retry_after(gw: Gateway) -> None:
    running = await life(gw, "a")
    await running.begin()
    queued = [await life(gw, "a") for _ in range(2)]
    tasks = [asyncio.create_task(q.begin()) for q in queued]
    await asyncio.sleep(0.05)
    over = await life(gw, "a")
    with pytest.raises(QueueFull) as err:
        await over.begin()
    assert err.value.status == 429 and err.value.code == "queue_full"
    assert 1 <= float(err.value.headers["retry-after"]) <= 60
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await running.settle(Outcome(status=200, usage={"prompt_tokens": 1, "completion_tokens": 1}))
    assert await gw.scheduler.queue.depth() == {}


async def test_a_queue_timeout_is_a_503(gw: Gateway) -> None:
    running, late = await life(gw, "a"), await life(gw, "a")
    await running.begin()
    with pytest.raises(QueueTimeout) as err:
        await asyncio.wait_for(late.begin(), 10)  # queue_timeout_s 2 (real time)
    assert err.value.status == 503 and 1 <= float(err.value.headers["retry-after"]) <= 60
    await late.settle(Outcome(status=503))
    await running.settle(Outcome(status=200, usage={"prompt_tokens": 1, "completion_tokens": 1}))
    assert all(v == (0, 0) for v in (await holds(gw)).values())


def test_drain_rates_follow_the_grant_counters() -> None:
    from proxy.admission.base import QueueStats
    from proxy.scheduler import DrainRates

    d = DrainRates(half_life_s=1.0)
    d.observe(QueueStats({"a": 10}, {"a": 0}, 0), 0.0)
    assert d.total == 0.0 and d.of("a") == 0.0
    for t in range(1, 30):  # a steady 4 grants/s, all of them a's
        d.observe(QueueStats({"a": 10}, {"a": 4 * t}, 4 * t), float(t))
    assert d.total == pytest.approx(4.0, rel=0.01) and d.of("a") == pytest.approx(4.0, rel=0.01)
    d.observe(QueueStats({}, {}, 4 * 29), 30.0)  # a drained: no longer tracked
    assert d.of("a") == 0.0 and d.total < 4.0


@pytest.fixture
async def shedding_gw() -> AsyncIterator[Gateway]:
    """driftsched with ``feasibility: shed``; tenant p (premium, TTFT SLO 1 s, no limit of
    its own) on two engines of one sequence each."""
    base = make_settings(tenants=[
        {"name": "p", "qos_class": "premium", "queue_timeout_s": 20,
         "api_keys": ["dsk-p" + "p" * 40]},
    ])
    settings = base.model_copy(update={"scheduler": base.scheduler.model_copy(update={
        "policy": base.scheduler.policy.model_copy(update={
            "type": "driftsched", "parameters": {"feasibility": "shed"}})})})
    app: DriftSchedApp = create_app(settings, clock=FakeClock(),
                                    pool_factory=lambda s: TwoEngines(max_num_seqs=1))
    async with app.api.router.lifespan_context(app.api):
        assert app.gateway is not None
        yield app.gateway


async def test_a_request_past_its_ttft_slo_is_shed(shedding_gw: Gateway) -> None:
    """Held back by engine capacity past its TTFT SLO: shed at once. (Held back by its own
    tenant's limit it would be demoted: tests/proxy/admission/test_contract.py.)"""
    gw = shedding_gw
    assert gw.settings.classes["premium"].ttft_slo_ms == 1000
    one, two, late = await life(gw, "p"), await life(gw, "p"), await life(gw, "p")
    await one.begin()
    await two.begin()  # both engines' only sequence taken
    waiting = asyncio.create_task(late.begin())
    await asyncio.sleep(0.3)
    assert not waiting.done() and await gw.scheduler.queue.depth() == {"p": 1}
    assert isinstance(gw.clock, FakeClock)
    gw.clock.advance(1.5)  # no longer startable within its 1 s TTFT SLO
    with pytest.raises(SloUnattainable) as err:
        await asyncio.wait_for(waiting, 5)  # shed by the next dispatch, not at its 20 s timeout
    assert err.value.status == 503 and err.value.code == "slo_unattainable"
    assert 1 <= float(err.value.headers["retry-after"]) <= 60
    assert await gw.scheduler.queue.depth() == {}
    await late.settle(Outcome(status=503))
    for done in (one, two):
        await done.settle(Outcome(status=200, usage={"prompt_tokens": 1, "completion_tokens": 1}))
    assert all(v == (0, 0) for v in (await holds(gw)).values())


async def test_an_enqueue_whose_reply_was_lost_is_withdrawn_once_the_store_answers(
    gw: Gateway,
) -> None:
    """The store ran the enqueue (the request was granted) but the connection failed before
    its reply: the client gets 503 store_unavailable, and the capacity loop's retry frees
    what nobody waits for, instead of leaving it held until its lease lapses."""
    from adapters.errors import StoreUnavailable
    from proxy.store.base import StoreUnavailable as StoreDown

    queue = gw.scheduler.queue
    real = queue.enqueue_dispatch

    async def lost_reply(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise StoreDown("redis: connection reset by peer")

    queue.enqueue_dispatch = lost_reply  # type: ignore[method-assign]
    one = await life(gw, "b")
    with pytest.raises(StoreUnavailable):
        await one.begin()
    assert sum(s for _, s in (await holds(gw)).values()) == 1  # a ghost grant
    queue.enqueue_dispatch = real  # type: ignore[method-assign]
    await gw.scheduler.retry_releases()
    assert all(v == (0, 0) for v in (await holds(gw)).values())
    assert await queue.in_flight("b", gw.clock.time()) == 0

"""The AdmissionQueue contract, run against every implementation (memory and a real redis).

Time is driven through the ``now`` arguments; nothing sleeps except the wake-up checks.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from proxy.admission.base import (
    AdmissionQueue,
    EngineCapacity,
    EngineLoad,
    Enqueued,
    Grant,
    QueueCaps,
    QueueItem,
)
from proxy.admission.build import build_queue
from proxy.admission.memory import MemoryQueue
from proxy.config import StoreConfig

T0 = 1_700_000_000.0
TTL = 30.0
ENGINE_TTL = 10.0
REPLICA = "r1"


BOTH = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


async def _started(request: pytest.FixtureRequest, **build: Any) -> AsyncIterator[AdmissionQueue]:
    """A started queue of the kind ``request.param`` names, built with ``build``."""
    if request.param == "memory":
        cfg = StoreConfig(type="memory")
    else:
        url = request.getfixturevalue("redis_server")
        cfg = StoreConfig(type="redis", url=url, prefix=request.getfixturevalue("redis_prefix"))
    q = build_queue(cfg, REPLICA, **build)
    await q.start()
    try:
        yield q
    finally:
        await q.aclose()


@pytest.fixture(params=BOTH)
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[AdmissionQueue]:
    async for q in _started(request):
        yield q


async def _queue_like(
    request: pytest.FixtureRequest, like: AdmissionQueue, caps: QueueCaps
) -> AdmissionQueue:
    """Another queue of the same kind as ``like`` (own state), built with ``caps``."""
    if isinstance(like, MemoryQueue):
        cfg = StoreConfig(type="memory")
    else:
        url = request.getfixturevalue("redis_server")
        cfg = StoreConfig(type="redis", url=url, prefix=request.getfixturevalue("redis_prefix") + "c")
    q = build_queue(cfg, REPLICA, caps=caps)
    await q.start()
    return q


def make_item(
    item_id: str,
    score: float = 0.0,
    *,
    tenant: str = "acme",
    footprint: int = 100,
    model: str = "m",
    deadline: float = T0 + 60,
    replica: str = REPLICA,
) -> QueueItem:
    return QueueItem(item_id, tenant, replica, model, score, footprint, deadline)


def make_engine(
    name: str = "e1",
    budget: int | None = 1000,
    max_seqs: int | None = None,
    *,
    models: tuple[str, ...] = ("m",),
    routable: bool = True,
) -> EngineCapacity:
    return EngineCapacity(name, models, budget, max_seqs, routable)


async def enqueue(q: AdmissionQueue, *items: QueueItem, now: float = T0) -> None:
    for item in items:
        await q.enqueue(item, now)


async def dispatch_ids(
    q: AdmissionQueue, now: float = T0, max_grants: int = 64, ttl: float = TTL
) -> list[str]:
    return [g.id for g in await q.dispatch(now, ttl, max_grants)]


def load_of(loads: list[EngineLoad], name: str) -> tuple[int, int]:
    (found,) = [load for load in loads if load.name == name]
    return found.held_tokens, found.seqs


# -- order ------------------------------------------------------------------------------------
async def test_empty_queue_and_no_engines(queue: AdmissionQueue) -> None:
    assert await queue.dispatch(T0, TTL) == []
    assert await queue.depth() == {}
    assert await queue.loads(T0) == []
    await enqueue(queue, make_item("a"))
    assert await queue.dispatch(T0, TTL) == []  # no engine at all: nothing, no error
    assert await queue.depth() == {"acme": 1}


async def test_strict_order_by_score(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("c", 3.0), make_item("a", -1.5), make_item("b", 2.0))
    assert await dispatch_ids(queue, max_grants=1) == ["a"]
    assert await dispatch_ids(queue) == ["b", "c"]
    assert await queue.depth() == {}


async def test_ties_broken_by_enqueue_order(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    ids = ["z", "b", "y", "a", "x"]
    await enqueue(queue, *(make_item(i, 1.0) for i in ids), make_item("first", 0.5))
    assert await dispatch_ids(queue) == ["first", *ids]


async def test_grant_fields_and_depth(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", tenant="acme"), make_item("b", 1, tenant="zeta"))
    assert await queue.depth() == {"acme": 1, "zeta": 1}
    grants = await queue.dispatch(T0, TTL)
    assert grants == [
        Grant("a", "acme", REPLICA, "e1", 100),
        Grant("b", "zeta", REPLICA, "e1", 100),
    ]
    assert await queue.depth() == {}
    assert await queue.in_flight("acme", T0) == 1
    assert load_of(await queue.loads(T0), "e1") == (200, 2)


async def test_enqueue_twice_is_a_noop(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a", 5.0), make_item("b", 6.0), make_item("a", 0.0))
    assert await queue.depth() == {"acme": 2}
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    assert await dispatch_ids(queue) == ["a", "b"]  # "a" kept its first score
    await enqueue(queue, make_item("a", 0.0))  # granted: still a no-op
    assert await queue.depth() == {}


async def test_max_grants(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await enqueue(queue, *(make_item(f"i{n}", n) for n in range(5)))
    assert await dispatch_ids(queue, max_grants=2) == ["i0", "i1"]
    assert await dispatch_ids(queue, max_grants=0) == []
    assert await dispatch_ids(queue) == ["i2", "i3", "i4"]


async def test_a_long_queue_is_scanned_in_order(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await queue.set_limits({"acme": 1})
    items = [make_item(f"i{n:03}", n, tenant="acme" if n % 3 else "zeta") for n in range(150)]
    await enqueue(queue, *reversed(items))
    # acme may hold one at a time: only its first item is admitted
    expected = [i.id for i in items if i.tenant == "zeta" or i.id == "i001"]
    assert await dispatch_ids(queue, max_grants=40) == expected[:40]
    assert await dispatch_ids(queue, max_grants=64) == expected[40:]
    assert await queue.depth() == {"acme": 99}
    await queue.release("i001")
    assert await dispatch_ids(queue) == ["i002"]


# -- tenant concurrency -------------------------------------------------------------------------
async def test_tenant_at_its_limit_is_skipped_and_keeps_its_place(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await queue.set_limits({"acme": 1})
    await enqueue(queue, make_item("a1", 0), make_item("a2", 1))
    await enqueue(queue, make_item("z1", 2, tenant="zeta"))
    assert await dispatch_ids(queue) == ["a1", "z1"]  # a2 skipped, z1 behind it admitted
    assert await queue.depth() == {"acme": 1}
    assert await queue.in_flight("acme", T0) == 1


async def test_concurrency_skip_then_release_restores_order(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await queue.set_limits({"acme": 1})
    await enqueue(queue, make_item("a1", 0), make_item("a2", 1))
    assert await dispatch_ids(queue) == ["a1"]
    await enqueue(queue, make_item("z1", 2, tenant="zeta"), make_item("z2", 3, tenant="zeta"))
    assert await dispatch_ids(queue, max_grants=1) == ["z1"]
    await queue.release("a1")
    assert await dispatch_ids(queue) == ["a2", "z2"]  # a2 kept its place ahead of z2
    assert await queue.in_flight("acme", T0) == 1


async def test_zero_never_admits_and_unset_is_unlimited(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await queue.set_limits({"zero": 0})
    await enqueue(queue, make_item("z0", 0, tenant="zero"), make_item("a1", 1))
    await enqueue(queue, make_item("a2", 2), make_item("a3", 3))
    assert await dispatch_ids(queue) == ["a1", "a2", "a3"]  # acme has no limit
    assert await queue.depth() == {"zero": 1}


async def test_a_lower_limit_parks_queued_items_at_once(queue: AdmissionQueue) -> None:
    """Limits are read at dispatch, not copied into items: a cut reaches queued requests."""
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await queue.set_limits({"acme": 6})
    await enqueue(queue, *(make_item(f"a{n}", n) for n in range(8)))
    assert await dispatch_ids(queue, max_grants=2) == ["a0", "a1"]
    await queue.set_limits({"acme": 2})
    assert await dispatch_ids(queue) == []  # 2 held: at the new limit
    await queue.release("a0")
    await queue.set_limits({"acme": 1})
    assert await dispatch_ids(queue) == []  # still 1 held
    await queue.release("a1")
    assert await dispatch_ids(queue) == ["a2"]
    await queue.set_limits({"acme": None})  # unlimited again: everything left goes
    assert await dispatch_ids(queue) == ["a3", "a4", "a5", "a6", "a7"]


async def test_a_higher_limit_unparks_and_keeps_order(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await queue.set_limits({"acme": 1})
    await enqueue(queue, make_item("a0", 0), make_item("a1", 1), make_item("a2", 5))
    await enqueue(queue, make_item("z0", 2, tenant="zeta"), make_item("z1", 6, tenant="zeta"))
    assert await dispatch_ids(queue, max_grants=2) == ["a0", "z0"]
    await queue.set_limits({"acme": 3})
    assert await dispatch_ids(queue) == ["a1", "a2", "z1"]
    assert await queue.in_flight("acme", T0) == 3


async def test_limits_span_models(queue: AdmissionQueue) -> None:
    """A tenant's limit counts its holds on every model; its flows park together."""
    engines = [make_engine("e1", None, models=("m",)), make_engine("e2", None, models=("n",))]
    await queue.set_engines(engines, T0, ENGINE_TTL)
    await queue.set_limits({"acme": 2})
    await enqueue(queue, make_item("m0", 0), make_item("n0", 1, model="n"))
    await enqueue(queue, make_item("m1", 2), make_item("n1", 3, model="n"))
    assert await dispatch_ids(queue) == ["m0", "n0"]
    await queue.release("n0")
    assert await dispatch_ids(queue) == ["m1"]


# -- caps ---------------------------------------------------------------------------------------
async def test_depth_caps_refuse_at_enqueue(
    request: pytest.FixtureRequest, queue: AdmissionQueue
) -> None:
    caps = QueueCaps(max_queued=3, max_queued_per_tenant=2)
    q = await _queue_like(request, queue, caps)
    try:
        assert await q.enqueue(make_item("a1"), T0) == "queued"
        assert await q.enqueue(make_item("a2"), T0) == "queued"
        assert await q.enqueue(make_item("a3"), T0) == "tenant_full"
        assert await q.enqueue(make_item("a1"), T0) == "duplicate"
        assert await q.enqueue(make_item("z1", tenant="zeta"), T0) == "queued"
        assert await q.enqueue(make_item("y1", tenant="yota"), T0) == "full"
        assert await q.depth() == {"acme": 2, "zeta": 1}
        await q.cancel("a1")
        assert await q.enqueue(make_item("y1", tenant="yota"), T0) == "queued"
    finally:
        await q.aclose()


async def test_stats_count_grants(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a1"), make_item("a2", 1), make_item("z1", 2, tenant="zeta"))
    assert await dispatch_ids(queue, max_grants=2) == ["a1", "a2"]
    stats = await queue.stats()
    assert stats.queued == {"zeta": 1}
    assert stats.granted == {"zeta": 0}
    assert stats.granted_total == 2
    await enqueue(queue, make_item("a3", 3))
    assert (await queue.stats()).granted == {"acme": 2, "zeta": 0}


# -- capacity -----------------------------------------------------------------------------------
async def test_head_of_line_blocks_smaller_items(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("held", 0, footprint=700))
    assert await dispatch_ids(queue) == ["held"]
    await enqueue(queue, make_item("big", 1, footprint=400), make_item("small", 2, footprint=10))
    assert await dispatch_ids(queue) == []  # small fits but must not overtake big
    await queue.release("held")
    assert await dispatch_ids(queue) == ["big", "small"]
    assert load_of(await queue.loads(T0), "e1") == (410, 2)


async def test_footprint_equal_to_free_space_fits(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine(budget=1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", 0, footprint=600), make_item("b", 1, footprint=400))
    await enqueue(queue, make_item("c", 2, footprint=1))
    assert await dispatch_ids(queue) == ["a", "b"]


async def test_oversize_item_is_clamped_to_the_budget(queue: AdmissionQueue) -> None:
    """A predicted footprint beyond the engine's budget holds the whole budget: it goes to
    an empty engine (and blocks what follows until then), never starves."""
    await queue.set_engines([make_engine(budget=1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("small", 0, footprint=10), make_item("huge", 1, footprint=5000))
    await enqueue(queue, make_item("after", 2, footprint=10))
    assert await dispatch_ids(queue) == ["small"]  # huge waits for an empty engine
    await queue.release("small")
    grants = await queue.dispatch(T0, TTL)
    assert [(g.id, g.footprint) for g in grants] == [("huge", 1000)]
    assert load_of(await queue.loads(T0), "e1") == (1000, 1)


async def test_most_free_tokens_wins(queue: AdmissionQueue) -> None:
    engines = [make_engine("e1", 1000), make_engine("e2", 2000), make_engine("e3", 500)]
    await queue.set_engines(engines, T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", 0, footprint=1500), make_item("b", 1, footprint=300))
    await enqueue(queue, make_item("c", 2, footprint=300), make_item("d", 3, footprint=300))
    grants = await queue.dispatch(T0, TTL)
    # a: e2 (2000 free; 500 left); b: e1 (1000; 700 left); c: e1 (700; 400 left);
    # d: e2 and e3 both have 500 free, e3 has fewer seqs
    assert [(g.id, g.backend) for g in grants] == [
        ("a", "e2"),
        ("b", "e1"),
        ("c", "e1"),
        ("d", "e3"),
    ]


async def test_ties_on_free_tokens_go_to_fewer_seqs_then_name(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("b", None), make_engine("a", None)], T0, ENGINE_TTL)
    await enqueue(queue, *(make_item(f"i{n}", n) for n in range(4)))
    grants = await queue.dispatch(T0, TTL)
    assert [g.backend for g in grants] == ["a", "b", "a", "b"]


async def test_max_seqs(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None, max_seqs=2)], T0, ENGINE_TTL)
    await enqueue(queue, *(make_item(f"i{n}", n, footprint=1) for n in range(4)))
    assert await dispatch_ids(queue) == ["i0", "i1"]
    await queue.release("i0")
    assert await dispatch_ids(queue) == ["i2"]
    assert load_of(await queue.loads(T0), "e1") == (2, 2)


async def test_soft_seqs_hold_back_all_but_exempt_items(queue: AdmissionQueue) -> None:
    """The TPOT governor's soft cap: ordinary items stop at ``soft_seqs``, exempt ones (the
    top class) go on up to ``max_seqs``; a blocked ordinary head blocks what follows."""
    cap = EngineCapacity("e1", ("m",), None, 4, True, soft_seqs=2)
    await queue.set_engines([cap], T0, ENGINE_TTL)
    await enqueue(queue, *(make_item(f"o{n}", n, footprint=1) for n in range(3)))
    assert await dispatch_ids(queue) == ["o0", "o1"]
    await enqueue(queue, replace(make_item("x0", -2, footprint=1), exempt=True),
                  replace(make_item("x1", -1, footprint=1), exempt=True),
                  replace(make_item("x2", -0.5, footprint=1), exempt=True))
    assert await dispatch_ids(queue) == ["x0", "x1"]  # max_seqs still binds
    assert load_of(await queue.loads(T0), "e1") == (4, 4)
    await queue.release("o0")
    await queue.release("o1")
    await queue.release("x0")
    assert await dispatch_ids(queue) == ["x2"]  # then 2 held: the soft cap stops o2
    await queue.release("x1")
    await queue.release("x2")
    assert await dispatch_ids(queue) == ["o2"]


async def test_max_seqs_overrides_the_empty_engine_rule(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 10, max_seqs=0)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", footprint=100))
    assert await dispatch_ids(queue) == []


async def test_non_routable_and_stale_engines_are_ignored(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("off", None, routable=False)], T0, ENGINE_TTL)
    await queue.set_engines([make_engine("old", None)], T0 - 20, ENGINE_TTL)  # stale at T0
    await enqueue(queue, make_item("a"))
    assert await dispatch_ids(queue) == []
    loads = {load.name: load.routable for load in await queue.loads(T0)}
    assert loads == {"off": False, "old": False}
    assert await dispatch_ids(queue, now=T0 - 15) == ["a"]  # "old" was fresh back then


async def test_engine_fresh_until_exactly_ttl(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", 0), make_item("b", 1))
    assert await dispatch_ids(queue, now=T0 + ENGINE_TTL - 0.001, max_grants=1) == ["a"]
    assert await dispatch_ids(queue, now=T0 + ENGINE_TTL) == []
    await queue.set_engines([make_engine("e1", None)], T0 + ENGINE_TTL, ENGINE_TTL)
    assert await dispatch_ids(queue, now=T0 + ENGINE_TTL) == ["b"]


async def test_unserved_model_is_skipped_not_blocking(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("other", 0, model="nobody-serves-me"), make_item("a", 1))
    assert await dispatch_ids(queue) == ["a"]
    assert await queue.depth() == {"acme": 1}
    await queue.set_engines([make_engine("e2", 100, models=("nobody-serves-me",))], T0, 5)
    assert await dispatch_ids(queue) == ["other"]  # it kept its place until an engine came


async def test_a_full_model_does_not_stall_other_models(queue: AdmissionQueue) -> None:
    engines = [
        make_engine("ea", 100, models=("a",)),
        make_engine("eb", 100, models=("b",)),
        make_engine("eab", 100, models=("a", "b")),
    ]
    await queue.set_engines(engines, T0, ENGINE_TTL)
    await enqueue(queue, make_item("a1", 0, model="a", footprint=100))
    await enqueue(queue, make_item("a2", 1, model="a", footprint=100))
    await enqueue(queue, make_item("a3", 2, model="a", footprint=100))  # blocks ea and eab
    await enqueue(queue, make_item("b1", 3, model="b", footprint=50))  # only eb is open to it
    await enqueue(queue, make_item("b2", 4, model="b", footprint=50))
    await enqueue(queue, make_item("b3", 5, model="b", footprint=50))  # eb full: all blocked
    grants = await queue.dispatch(T0, TTL)
    assert [(g.id, g.backend) for g in grants] == [
        ("a1", "ea"),
        ("a2", "eab"),
        ("b1", "eb"),
        ("b2", "eb"),
    ]
    await queue.release("b1")
    assert await dispatch_ids(queue) == ["b3"]  # a3 still waits; eab stays reserved for it


async def test_removing_an_engine_keeps_its_holds(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000), make_engine("e2", 10)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", footprint=400))
    assert [g.backend for g in await queue.dispatch(T0, TTL)] == ["e1"]
    await queue.set_engines([make_engine("e2", 10)], T0 + 11, ENGINE_TTL)
    loads = await queue.loads(T0 + 11)
    assert [(x.name, x.held_tokens, x.seqs, x.routable) for x in loads] == [
        ("e1", 400, 1, False),
        ("e2", 0, 0, True),
    ]
    await queue.release("a")
    await queue.set_engines([make_engine("e2", 10)], T0 + 12, ENGINE_TTL)
    assert [x.name for x in await queue.loads(T0 + 12)] == ["e2"]  # stale + empty: forgotten


# -- expiry and cancel --------------------------------------------------------------------------
async def test_items_past_their_deadline_expire(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 100)], T0, 100)
    await enqueue(queue, make_item("head", 0, footprint=100), make_item("blocked", 1))
    await enqueue(queue, make_item("late", 2, deadline=T0 + 5, tenant="zeta"))
    assert await dispatch_ids(queue) == ["head"]
    assert await dispatch_ids(queue, now=T0 + 5) == []  # now == deadline: still queued
    assert await queue.depth() == {"acme": 1, "zeta": 1}
    assert await dispatch_ids(queue, now=T0 + 5.001) == []  # dropped though behind the head
    assert await queue.depth() == {"acme": 1}
    assert await queue.wait("late", 1.0) == "expired"  # reported after the fact too
    assert await queue.cancel("late") is False


async def test_expiry_wakes_a_waiter(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a", deadline=T0))
    waiter = asyncio.create_task(queue.wait("a", 5.0))
    await asyncio.sleep(0.02)
    await queue.dispatch(T0 + 1, TTL)
    assert await asyncio.wait_for(waiter, 2.0) == "expired"


async def test_cancel(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a", 0), make_item("b", 1))
    assert await queue.cancel("a") is True
    assert await queue.cancel("a") is False
    assert await queue.cancel("nobody") is False
    assert await queue.depth() == {"acme": 1}
    await queue.set_engines([make_engine(budget=None)], T0, ENGINE_TTL)
    assert await dispatch_ids(queue) == ["b"]
    assert await queue.cancel("b") is False  # granted: release it instead
    assert await queue.wait("a", 1.0) is None  # cancelled: nothing to wait for


async def test_cancelling_the_blocking_head_unblocks(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 100)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("h", 0, footprint=60), make_item("big", 1, footprint=60))
    await enqueue(queue, make_item("s", 2, footprint=40))
    assert await dispatch_ids(queue) == ["h"]
    assert await queue.cancel("big")
    assert await dispatch_ids(queue) == ["s"]


# -- holds: release, grow, leases ---------------------------------------------------------------
async def test_release_frees_and_is_idempotent(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", footprint=300), make_item("b", 1, footprint=200))
    await queue.dispatch(T0, TTL)
    await queue.release("a")
    await queue.release("a")
    await queue.release("nobody")
    assert load_of(await queue.loads(T0), "e1") == (200, 1)
    assert await queue.in_flight("acme", T0) == 1
    await queue.release("b")
    assert load_of(await queue.loads(T0), "e1") == (0, 0)
    assert await queue.in_flight("acme", T0) == 0


async def test_release_of_a_queued_item_dequeues_it(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a"))
    await queue.release("a")
    assert await queue.depth() == {}


async def test_release_enqueue_and_cancel_wake_capacity_waiters(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a"))
    await queue.dispatch(T0, TTL)
    loop = asyncio.get_running_loop()
    for action in (queue.release("a"), queue.enqueue(make_item("b"), T0), queue.cancel("b")):
        waiters = [asyncio.create_task(queue.wait_capacity(10.0)) for _ in range(3)]
        await asyncio.sleep(0.02)
        started = loop.time()
        await action
        await asyncio.wait_for(asyncio.gather(*waiters), 2.0)
        assert loop.time() - started < 2.0


async def test_enqueue_dispatch_grants_in_the_same_step(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 250)], T0, ENGINE_TTL)
    done = await queue.enqueue_dispatch(make_item("a", footprint=200), T0, TTL)
    assert done.result == "queued" and [g.id for g in done.grants] == ["a"]
    assert done.store_reply is None
    assert isinstance(await queue.wait("a", 0.0), Grant)  # delivered before anyone waited
    # no room: queued, no grant; a duplicate or a refused item dispatches nothing
    assert await queue.enqueue_dispatch(make_item("b", footprint=200), T0, TTL) \
        == Enqueued("queued", [])
    assert await queue.enqueue_dispatch(make_item("b"), T0, TTL) == Enqueued("duplicate", [])
    assert await queue.depth() == {"acme": 1}


async def test_release_dispatch_grants_into_the_room_it_made(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 250)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", footprint=200), make_item("b", footprint=200),
                  make_item("c", footprint=40, replica="r2"))
    assert await dispatch_ids(queue) == ["a"]  # b blocks the engine: c does not overtake
    grants = await queue.release_dispatch("a", 0.0, T0, TTL)
    assert [g.id for g in grants] == ["b", "c"]  # the other replica's grant is returned too
    assert grants[1].replica == "r2"
    assert await queue.release_dispatch("a", 0.0, T0, TTL) == []  # idempotent, nothing freed
    assert load_of(await queue.loads(T0), "e1") == (240, 2)


async def test_combined_steps_wake_waiters_only_past_max_grants(queue: AdmissionQueue) -> None:
    """The step took all that fits: no other dispatch is woken, unless it hit max_grants."""
    await queue.set_engines([make_engine("e1", None)], T0, ENGINE_TTL)
    waiter = asyncio.create_task(queue.wait_capacity(0.3))
    await asyncio.sleep(0.02)
    assert len((await queue.enqueue_dispatch(make_item("a"), T0, TTL)).grants) == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    await waiter
    assert loop.time() - started > 0.2  # not woken: it timed out
    await enqueue(queue, make_item("b"), make_item("c"))
    await asyncio.sleep(0.05)  # (plain enqueues wake: let those rings pass)
    waiter = asyncio.create_task(queue.wait_capacity(5.0))
    await asyncio.sleep(0.02)
    started = loop.time()
    assert [g.id for g in await queue.release_dispatch("a", 0.0, T0, TTL, 1)] == ["b"]
    await asyncio.wait_for(waiter, 2.0)  # max_grants reached: c may fit, others are woken
    assert loop.time() - started < 2.0


async def test_wait_capacity_times_out(queue: AdmissionQueue) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await queue.wait_capacity(0.05)
    assert 0.04 <= loop.time() - started < 1.0


async def test_grow_charges_the_engine(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", 0, footprint=500), make_item("b", 1, footprint=400))
    assert await dispatch_ids(queue) == ["a", "b"]
    await enqueue(queue, make_item("c", 2, footprint=100))
    await queue.grow("a", 150)  # drift: 1050 held of 1000
    assert load_of(await queue.loads(T0), "e1") == (1050, 2)
    assert await dispatch_ids(queue) == []
    await queue.grow("a", -10_000)  # never below 0
    assert load_of(await queue.loads(T0), "e1") == (400, 2)
    assert await dispatch_ids(queue) == ["c"]
    await queue.grow("nobody", 5)
    await queue.release("a")  # frees what it holds now (0), not what it was granted
    assert load_of(await queue.loads(T0), "e1") == (500, 2)


async def test_grant_keeps_its_granted_footprint(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", footprint=100))
    await queue.dispatch(T0, TTL)
    await queue.grow("a", 50)
    assert await queue.wait("a", 1.0) == Grant("a", "acme", REPLICA, "e1", 100)


async def test_lapsed_leases_are_reclaimed(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000)], T0, 100)
    await queue.set_limits({"acme": 1})
    await enqueue(queue, make_item("a", 0, footprint=600))
    await enqueue(queue, make_item("b", 1, footprint=600))
    assert await dispatch_ids(queue, ttl=10.0) == ["a"]
    assert await queue.in_flight("acme", T0 + 9.9) == 1
    assert await dispatch_ids(queue, now=T0 + 9.9) == []
    # the replica holding "a" crashed: nobody renews, the lease lapses at T0 + 10
    assert await queue.in_flight("acme", T0 + 10) == 0
    assert load_of(await queue.loads(T0 + 10), "e1") == (0, 0)
    assert await dispatch_ids(queue, now=T0 + 10) == ["b"]
    await queue.release("a")  # late release of a reclaimed hold changes nothing
    assert load_of(await queue.loads(T0 + 10), "e1") == (600, 1)
    assert await queue.renew(["a"], T0 + 10, 10.0) == 0


async def test_renew_extends_only_holds_still_held(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None)], T0, 100)
    await enqueue(queue, make_item("a", 0), make_item("b", 1), make_item("c", 2))
    await queue.dispatch(T0, 10.0)
    await queue.release("b")
    assert await queue.renew(["a", "b", "nobody"], T0 + 5, 10.0) == 1
    assert await queue.in_flight("acme", T0 + 14.9) == 1  # c lapsed at T0 + 10
    assert await queue.renew(["a"], T0 + 6, 1.0) == 1  # never shortens
    assert await queue.in_flight("acme", T0 + 14.9) == 1
    assert await queue.in_flight("acme", T0 + 15) == 0
    assert await queue.renew([], T0, 10.0) == 0


# -- wait -----------------------------------------------------------------------------------------
async def test_wait_gets_a_grant_made_before_it_was_called(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a"), make_item("b", 1))
    await queue.dispatch(T0, TTL)
    await asyncio.sleep(0.02)
    assert await queue.wait("a", 0.01) == Grant("a", "acme", REPLICA, "e1", 100)
    assert await queue.wait("a", 0.01) == Grant("a", "acme", REPLICA, "e1", 100)  # still held
    assert await queue.wait("b", 0.01) == Grant("b", "acme", REPLICA, "e1", 100)


async def test_wait_is_woken_by_dispatch(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a"))
    waiters = [asyncio.create_task(queue.wait("a", 5.0)) for _ in range(2)]
    await asyncio.sleep(0.02)
    await queue.set_engines([make_engine("e1", None)], T0, ENGINE_TTL)
    await queue.dispatch(T0, TTL)
    results = await asyncio.wait_for(asyncio.gather(*waiters), 2.0)
    assert results == [Grant("a", "acme", REPLICA, "e1", 100)] * 2


async def test_wait_times_out_and_returns_at_once_for_unknown_ids(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await queue.wait("a", 0.05) is None
    assert 0.04 <= loop.time() - started < 1.0
    started = loop.time()
    assert await queue.wait("nobody", 10.0) is None
    assert loop.time() - started < 1.0


async def test_released_grant_is_no_longer_waitable(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a"))
    await queue.dispatch(T0, TTL)
    await queue.release("a")
    assert await queue.wait("a", 0.5) is None


async def test_close_ends_pending_waits(queue: AdmissionQueue) -> None:
    await enqueue(queue, make_item("a"))
    waiter = asyncio.create_task(queue.wait("a", 10.0))
    await asyncio.sleep(0.02)
    await queue.aclose()
    assert await asyncio.wait_for(waiter, 2.0) is None
    await queue.aclose()


async def test_move_carries_the_hold_to_another_engine(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", 1000), make_engine("e2", 1000)], T0, ENGINE_TTL)
    await enqueue(queue, make_item("a", footprint=300))
    (g,) = await queue.dispatch(T0, TTL)
    other = "e2" if g.backend == "e1" else "e1"
    assert await queue.move("a", g.backend) is False  # already there
    assert await queue.move("a", other) is True
    assert load_of(await queue.loads(T0), other) == (300, 1)
    assert g.backend not in {x.name for x in await queue.loads(T0) if x.seqs}
    await queue.release("a")
    assert [(x.held_tokens, x.seqs) for x in await queue.loads(T0)] == [(0, 0), (0, 0)]
    assert await queue.move("a", "e1") is False  # not held


# -- fair share (the ledger; counter order is exact VTC) ------------------------------------
@pytest.fixture(params=BOTH)
async def vtc(request: pytest.FixtureRequest) -> AsyncIterator[AdmissionQueue]:
    """A queue in ``counter`` order."""
    async for q in _started(request, order="counter"):
        yield q


def charged(item_id: str, tenant: str, charge: float, score: float = 0.0) -> QueueItem:
    return replace(make_item(item_id, score, tenant=tenant), charge=charge)


async def serve_one_at_a_time(q: AdmissionQueue, n: int) -> list[str]:
    """Grant one, release it (no correction), n times: the order a single sequence serves."""
    out = []
    for _ in range(n):
        (g,) = await q.dispatch(T0, TTL, 1)
        out.append(g.id)
        await q.release(g.id)
    return out


async def test_counter_order_serves_the_lowest_counter(vtc: AdmissionQueue) -> None:
    await vtc.set_engines([make_engine("e1", None, max_seqs=1)], T0, ENGINE_TTL)
    await enqueue(vtc, *(charged(f"a{i}", "acme", 100.0) for i in range(3)))
    await enqueue(vtc, *(charged(f"z{i}", "zeta", 10.0) for i in range(5)))
    # counters tie at 0: the earlier enqueue first; then zeta (10, 20, ...) until it passes
    # acme's 100; within a tenant, first come first served
    assert await serve_one_at_a_time(vtc, 8) == ["a0", "z0", "z1", "z2", "z3", "z4", "a1", "a2"]
    stats = await vtc.stats()
    assert stats.counters == {"acme": 300.0, "zeta": 50.0}
    assert stats.queued == {} and stats.queued_charge == {}


async def test_key_order_keeps_keys_but_counts(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None, max_seqs=1)], T0, ENGINE_TTL)
    await enqueue(queue, charged("a0", "acme", 100.0, 0), charged("a1", "acme", 100.0, 1),
                  charged("z0", "zeta", 10.0, 2))
    assert await serve_one_at_a_time(queue, 3) == ["a0", "a1", "z0"]
    assert (await queue.stats()).counters == {"acme": 200.0, "zeta": 10.0}


async def test_a_correction_re_ranks_its_tenant(vtc: AdmissionQueue) -> None:
    await vtc.set_engines([make_engine("e1", None, max_seqs=2)], T0, ENGINE_TTL)
    await enqueue(vtc, charged("a0", "acme", 100.0), charged("z0", "zeta", 100.0))
    assert sorted(await dispatch_ids(vtc)) == ["a0", "z0"]
    await enqueue(vtc, charged("z1", "zeta", 100.0), charged("a1", "acme", 100.0))
    await vtc.release("a0", 250.0)  # acme's answer was far longer than predicted
    assert (await vtc.stats()).counters["acme"] == 350.0
    assert await dispatch_ids(vtc) == ["z1"]  # zeta (100) before acme (350), though a1 ...
    await vtc.release("z0", -90.0)  # ... and an over-prediction is given back
    stats = await vtc.stats()
    assert stats.counters == {"acme": 350.0, "zeta": 110.0}
    assert stats.queued_charge == {"acme": 100.0}


async def test_a_tenant_back_from_idle_is_lifted_to_the_floor(vtc: AdmissionQueue) -> None:
    """Idleness banks no credit: a tenant that becomes backlogged starts at the lowest
    counter of the backlogged tenants (else the counter of the tenant drained last)."""
    await vtc.set_engines([make_engine("e1", None, max_seqs=1)], T0, ENGINE_TTL)
    await enqueue(vtc, *(charged(f"a{i}", "acme", 100.0) for i in range(6)))
    assert await serve_one_at_a_time(vtc, 4) == ["a0", "a1", "a2", "a3"]
    stats = await vtc.stats()
    assert stats.floor == 400.0 and stats.queued_charge == {"acme": 200.0}
    await enqueue(vtc, charged("z0", "zeta", 100.0), charged("z1", "zeta", 100.0))
    assert (await vtc.stats()).counters["zeta"] == 400.0  # lifted from 0, not 400 ahead
    # from equal counters the two alternate instead of zeta taking four turns in a row
    assert await serve_one_at_a_time(vtc, 4) == ["a4", "z0", "a5", "z1"]
    # nobody backlogged: the floor is the counter of the tenant that drained last
    assert (await vtc.stats()).floor == 600.0
    await enqueue(vtc, charged("n0", "newco", 1.0))
    assert (await vtc.stats()).counters["newco"] == 600.0
    # a tenant above the floor keeps its counter when it comes back
    await vtc.release((await vtc.dispatch(T0, TTL))[0].id, 1000.0)
    await enqueue(vtc, charged("n1", "newco", 1.0), charged("a6", "acme", 1.0))
    # ... and then is the floor that acme, idle since, is lifted to
    assert (await vtc.stats()).counters == {"acme": 1601.0, "zeta": 600.0, "newco": 1601.0}
    assert await serve_one_at_a_time(vtc, 2) == ["n1", "a6"]


async def test_cancel_and_expiry_drop_queued_charges(vtc: AdmissionQueue) -> None:
    await enqueue(vtc, charged("a0", "acme", 5.0), charged("a1", "acme", 7.0))
    await enqueue(vtc, replace(charged("a2", "acme", 11.0), deadline=T0 + 1))
    assert (await vtc.stats()).queued_charge == {"acme": 23.0}
    assert await vtc.cancel("a0")
    assert (await vtc.stats()).queued_charge == {"acme": 18.0}
    await vtc.dispatch(T0 + 2, TTL)  # no engine: nothing granted, a2 expires
    stats = await vtc.stats()
    assert stats.queued_charge == {"acme": 7.0} and stats.counters.get("acme", 0.0) == 0.0


async def test_a_refunded_grant_costs_nothing(vtc: AdmissionQueue) -> None:
    await vtc.set_engines([make_engine("e1", None)], T0, ENGINE_TTL)
    await enqueue(vtc, charged("a0", "acme", 40.0))
    assert await dispatch_ids(vtc) == ["a0"]
    assert (await vtc.stats()).counters == {"acme": 40.0}
    await vtc.release("a0", -40.0)  # granted while its client gave up
    await vtc.release("a0", 500.0)  # a second release of the same hold changes nothing
    assert (await vtc.stats()).counters == {"acme": 0.0}


# -- feasibility: items past their late_at ----------------------------------------------------
@pytest.fixture(params=BOTH)
async def shedding(request: pytest.FixtureRequest) -> AsyncIterator[AdmissionQueue]:
    """A queue whose late rule is ``shed``."""
    async for q in _started(request, late="shed"):
        yield q


def late(item_id: str, score: float, late_at: float = math.inf, **kw: Any) -> QueueItem:
    return replace(make_item(item_id, score, **kw), late_at=late_at)


async def test_a_late_item_is_demoted_behind_those_on_time(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None, max_seqs=1)], T0, ENGINE_TTL)
    await enqueue(queue, late("a", 0, T0 + 1), late("b", 1), late("c", 2, T0 + 1),
                  late("d", 3, T0 + 5, tenant="zeta"))
    assert await dispatch_ids(queue, T0 + 1) == ["a"]  # on time at T0 + 1 (late after it)
    await queue.release("a")
    # c is late now: b and d (still on time) go first, then c, although its score is lower
    order = []
    for _ in range(3):
        order += await dispatch_ids(queue, T0 + 2)
        await queue.release(order[-1])
    assert order == ["b", "d", "c"]
    assert await queue.depth() == {}


async def test_demoted_items_keep_their_order_and_deadline(queue: AdmissionQueue) -> None:
    await queue.set_engines([make_engine("e1", None, max_seqs=1)], T0, ENGINE_TTL)
    await enqueue(queue, late("hold", -1))
    assert await dispatch_ids(queue) == ["hold"]  # the engine is busy from here on
    await enqueue(queue, late("x", 5, T0 + 2), late("y", 1, T0 + 1),
                  late("z", 0, T0 + 1, deadline=T0 + 4))
    assert await dispatch_ids(queue, T0 + 3) == []  # y, z then x demoted, in that order
    assert await queue.wait("z", 0.01) is None
    assert await dispatch_ids(queue, T0 + 5) == []  # z reached its deadline, demoted or not
    assert await queue.wait("z", 0.01) == "expired"
    await queue.release("hold")
    await enqueue(queue, late("w", 9))  # on time, so ahead of every demoted item
    got = []
    for _ in range(3):
        got += await dispatch_ids(queue, T0 + 5)
        await queue.release(got[-1])
    assert got == ["w", "y", "x"]  # demoted: in the order they became late


async def test_a_late_item_is_shed_by_the_shed_rule(shedding: AdmissionQueue) -> None:
    await shedding.set_engines([make_engine("e1", None, max_seqs=1)], T0, ENGINE_TTL)
    await enqueue(shedding, late("hold", -1))
    assert await dispatch_ids(shedding) == ["hold"]
    await enqueue(shedding, late("a", 0, T0 + 1), late("b", 1))
    assert await dispatch_ids(shedding, T0 + 1) == []
    assert await shedding.depth() == {"acme": 2}  # not late yet at T0 + 1
    assert await dispatch_ids(shedding, T0 + 1.5) == []
    assert await shedding.wait("a", 0.01) == "expired"  # shed, at once
    assert await shedding.depth() == {"acme": 1}
    await shedding.release("hold")
    assert await dispatch_ids(shedding, T0 + 2) == ["b"]


async def test_the_shed_rule_demotes_a_tenant_held_back_by_its_own_limit(
    shedding: AdmissionQueue,
) -> None:
    """Late because its tenant is at its concurrency limit, not for lack of engine room: the
    item is kept (demoted) and served once its tenant has a free slot."""
    await shedding.set_engines([make_engine("e1", None, max_seqs=8)], T0, ENGINE_TTL)
    await shedding.set_limits({"acme": 1})
    await enqueue(shedding, late("a1", 0), late("a2", 1, T0 + 1), late("z", 2, T0 + 1,
                                                                        tenant="zeta"))
    assert await dispatch_ids(shedding, T0) == ["a1", "z"]  # z on time; a2 waits for acme
    await enqueue(shedding, late("z2", 3, T0 + 1, tenant="zeta", footprint=100))
    await shedding.set_limits({"zeta": 1})  # z2 now waits for zeta's slot too
    assert await dispatch_ids(shedding, T0 + 2) == []  # both late, both held by their limits
    assert await shedding.depth() == {"acme": 1, "zeta": 1}  # demoted, not shed
    await shedding.release("a1")
    assert await dispatch_ids(shedding, T0 + 2) == ["a2"]

"""Redis-only properties of the admission queue: several instances and processes share one
order and one capacity ledger without races, outcomes reach the replica that holds the
request, one pub/sub connection per instance, key layout. (Identical decisions to the memory
queue: ``test_differential.py``.)"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.crc import key_slot

from proxy.admission.base import EngineCapacity, Grant, QueueItem
from proxy.admission.redis import RedisQueue
from proxy.store.base import StoreUnavailable
from tests.conftest import free_port

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
QueueFactory = Callable[[str], Awaitable[RedisQueue]]


@pytest.fixture
async def new_queue(redis_server: str, redis_prefix: str) -> AsyncIterator[QueueFactory]:
    """Started RedisQueues sharing one prefix, each with its own pool and replica id."""
    opened: list[RedisQueue] = []

    async def make(replica: str) -> RedisQueue:
        q = RedisQueue(replica, redis_server, prefix=redis_prefix)
        await q.start()
        opened.append(q)
        return q

    yield make
    for q in opened:
        await q.aclose()


@pytest.fixture
async def raw(redis_server: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server, decode_responses=True)
    yield r
    await r.aclose()


def item(
    item_id: str,
    replica: str,
    score: float = 0.0,
    *,
    tenant: str = "acme",
    footprint: int = 100,
    deadline: float = T0 + 600,
) -> QueueItem:
    return QueueItem(item_id, tenant, replica, "m", score, footprint, deadline)


ENGINES = [
    EngineCapacity("e1", ("m",), 1000, 4, True),
    EngineCapacity("e2", ("m",), 600, 3, True),
]


# -- outcomes reach the replica holding the request --------------------------------------------
async def test_grant_by_one_instance_reaches_the_others_wait(new_queue: QueueFactory) -> None:
    a, b = await new_queue("ra"), await new_queue("rb")
    await a.set_engines(ENGINES, T0, 60)
    await b.enqueue(item("early", "rb"), T0)
    await b.enqueue(item("late", "rb", 1), T0)
    waiter = asyncio.create_task(b.wait("early", 5.0))
    await asyncio.sleep(0.05)
    grants = await a.dispatch(T0, 30)
    assert [g.id for g in grants] == ["early", "late"]
    assert await asyncio.wait_for(waiter, 2.0) == Grant("early", "acme", "rb", "e1", 100)
    await asyncio.sleep(0.05)  # "late" arrives through pub/sub before anyone waits for it
    assert b._mailbox.take("late") == Grant("late", "acme", "rb", "e1", 100)
    assert await b.wait("late", 0.01) == Grant("late", "acme", "rb", "e1", 100)  # from Redis
    assert await a.wait("late", 0.01) == Grant("late", "acme", "rb", "e1", 100)  # any replica


async def test_expiry_by_one_instance_reaches_the_others_wait(new_queue: QueueFactory) -> None:
    a, b = await new_queue("ra"), await new_queue("rb")
    await b.enqueue(item("x", "rb", deadline=T0), T0)
    await b.enqueue(item("y", "rb", deadline=T0), T0)
    waiter = asyncio.create_task(b.wait("x", 5.0))
    await asyncio.sleep(0.05)
    assert await a.dispatch(T0 + 1, 30) == []
    assert await asyncio.wait_for(waiter, 2.0) == "expired"
    assert await b.wait("y", 0.01) == "expired"


# -- replica liveness ----------------------------------------------------------------------
async def test_a_silent_replica_is_reaped_by_the_next_dispatch(new_queue: QueueFactory) -> None:
    """No ghost grants: once a replica's heartbeat lapses, the next dispatch by another
    replica drops its queued items and frees its holds, and their room goes to the living."""
    live, dead = await new_queue("live"), await new_queue("dead")
    await live.set_engines([EngineCapacity("e1", ("m",), 1000, 2, True)], T0, 600)
    assert not await dead.heartbeat(T0, 2.0)  # first beat
    assert await dead.heartbeat(T0 + 1, 2.0)  # alive until T0 + 3
    assert not await live.heartbeat(T0, 0.5)
    await dead.enqueue(item("d1", "dead"), T0)
    await dead.enqueue(item("d2", "dead", tenant="zeta"), T0)
    assert [g.id for g in await live.dispatch(T0, 30)] == ["d1", "d2"]  # engine full
    await dead.enqueue(item("d3", "dead"), T0)
    await live.enqueue(item("l1", "live"), T0)
    assert await live.dispatch(T0 + 3, 30) == []  # dead is alive until T0 + 3 inclusive
    # dead beats no more; live beats on, without a break (the right to judge others)
    for n in range(1, 8):
        assert await live.heartbeat(T0 + n * 0.4, 0.5)
    grants = await live.dispatch(T0 + 3.01, 30)
    assert [g.id for g in grants] == ["l1"]  # d1, d2 freed, d3 dropped before l1 was looked at
    assert await live.depth() == {}
    assert await live.in_flight("zeta", T0 + 3.01) == 0
    assert await dead.wait("d3", 0.01) == "expired"  # what a revived "dead" would see
    assert not await dead.heartbeat(T0 + 4, 2.0)  # it learns it was reaped
    await dead.release("d1")  # its late release frees nothing more
    (load,) = await live.loads(T0 + 4)
    assert (load.held_tokens, load.seqs) == (100, 1)


async def test_the_oldest_live_replica_leads_and_hands_over_when_it_lapses(
    new_queue: QueueFactory,
) -> None:
    """The leader (who publishes the shared controllers' decisions) is the live replica
    whose unbroken run of beats started first: a replica that joins never takes over, one
    that lapses hands over to the next oldest, and coming back it starts a new run (it does
    not take the lead back)."""
    a, b, c = await new_queue("ra"), await new_queue("rb"), await new_queue("rc")
    assert await a.leader(T0) is None  # nobody has beaten
    await b.heartbeat(T0 + 0.1, 1.0)
    await a.heartbeat(T0 + 0.2, 1.0)
    assert await c.leader(T0 + 0.2) == "rb"  # the first to beat, not the smallest id
    for n in range(1, 4):
        await a.heartbeat(T0 + 0.2 + n * 0.5, 1.0)
        await c.heartbeat(T0 + 0.2 + n * 0.5, 1.0)
        if n < 2:
            await b.heartbeat(T0 + 0.1 + n * 0.5, 1.0)
    # b beat last at T0 + 0.6, alive until T0 + 1.6 inclusive
    assert await c.leader(T0 + 1.6) == "rb"
    assert await c.leader(T0 + 1.61) == "ra"
    await b.heartbeat(T0 + 1.8, 1.0)  # back, with a new run of beats
    assert await b.leader(T0 + 1.8) == "ra"
    # ties go to the smallest id
    d, e = await new_queue("rd"), await new_queue("re")
    await e.heartbeat(T0 + 10, 1.0)
    await d.heartbeat(T0 + 10, 1.0)
    assert await d.leader(T0 + 10.5) == "rd"


async def test_after_a_store_outage_no_replica_reaps_another_before_it_could_beat(
    new_queue: QueueFactory,
) -> None:
    """An outage of the store lapses every heartbeat at once: the first replica back must not
    declare the others dead (dropping their queue, freeing the holds of running streams)
    before they had a ttl to beat again; one that never comes back is reaped after that."""
    a, b, c = await new_queue("ra"), await new_queue("rb"), await new_queue("rc")
    await a.set_engines([EngineCapacity("e1", ("m",), None, None, True)], T0, 600)
    for q in (a, b, c):
        await q.heartbeat(T0, 1.5)
        await q.heartbeat(T0 + 1.4, 1.5)  # each has an unbroken run of 1.4 s...
    await b.enqueue(item("b1", "rb"), T0 + 1.4)
    await a.dispatch(T0 + 1.4, 30)  # b1 is held: b streams it
    await b.enqueue(item("b2", "rb", tenant="zeta"), T0 + 1.4)
    await a.set_limits({"zeta": 0})  # b2 waits in the queue
    # ... then the store is gone for 3 s: every beat lapses; a is back first
    assert await a.heartbeat(T0 + 4.4, 1.5)  # a is still known (nobody reaped it)
    await a.dispatch(T0 + 4.5, 30)
    assert await a.in_flight("acme", T0 + 4.5) == 1  # b's hold is still there
    assert await a.depth() == {"zeta": 1}  # and its queued item
    await b.heartbeat(T0 + 4.6, 1.5)  # b is back; c never comes back
    for n in range(1, 6):
        await a.heartbeat(T0 + 4.4 + n * 0.3, 1.5)
        await b.heartbeat(T0 + 4.6 + n * 0.3, 1.5)
    await a.dispatch(T0 + 6.0, 30)  # a has beaten 1.6 s unbroken: c is reaped, b is not
    assert await a.in_flight("acme", T0 + 6.0) == 1 and await a.depth() == {"zeta": 1}
    assert not await c.heartbeat(T0 + 6.1, 1.5)  # c learns it was declared dead


async def test_waits_survive_a_lost_subscription(new_queue: QueueFactory, raw: Redis) -> None:
    a, b = await new_queue("ra"), await new_queue("rb")
    await a.set_engines(ENGINES, T0, 60)
    await raw.client_kill_filter(_type="pubsub")
    for n in range(2):
        await b.enqueue(item(f"i{n}", "rb"), T0)
        waiter = asyncio.create_task(b.wait(f"i{n}", 5.0))
        await asyncio.sleep(0.2)
        await a.dispatch(T0, 30)
        assert isinstance(await asyncio.wait_for(waiter, 2.0), Grant)
    channel = b._capacity
    assert await raw.pubsub_numsub(channel) == [(channel, 2)]


async def test_one_subscription_per_instance(new_queue: QueueFactory, raw: Redis) -> None:
    before = len(await raw.client_list(_type="pubsub"))
    a, b = await new_queue("ra"), await new_queue("rb")
    for n in range(20):
        await b.enqueue(item(f"i{n}", "rb"), T0)
    waiters = [asyncio.create_task(q.wait(f"i{n}", 0.2)) for q in (a, b) for n in range(20)]
    waiters += [asyncio.create_task(q.wait_capacity(0.2)) for q in (a, b) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert await raw.pubsub_numsub(a._capacity, a._mine, b._mine) == [
        (a._capacity, 2),
        (a._mine, 1),
        (b._mine, 1),
    ]
    assert len(await raw.client_list(_type="pubsub")) == before + 2
    await asyncio.gather(*waiters)


async def test_capacity_notifications_cross_instances(new_queue: QueueFactory) -> None:
    a, b = await new_queue("ra"), await new_queue("rb")
    await a.set_engines(ENGINES, T0, 60)
    await a.enqueue(item("x", "ra", footprint=300), T0)
    await a.dispatch(T0, 30)
    actions: list[tuple[Callable[[], Awaitable[object]], bool]] = [
        (lambda: a.grow("x", -100), True),
        (lambda: a.grow("x", +100), False),  # more held: nothing to wake up for
        (lambda: a.release("x"), True),
        (lambda: a.release("x"), False),  # nothing freed
        (lambda: a.enqueue(item("y", "ra"), T0), True),
        (lambda: a.cancel("y"), True),
        (lambda: a.set_engines(ENGINES, T0, 60), False),  # unchanged view
        (lambda: a.set_engines(ENGINES[:1], T0 + 1, 60), False),
        (lambda: a.set_engines([replace(ENGINES[0], max_seqs=9)], T0 + 1, 60), True),
    ]
    for n, (action, wakes) in enumerate(actions):
        waiter = asyncio.create_task(b.wait_capacity(5.0))
        await asyncio.sleep(0.02)
        await action()
        if wakes:
            await asyncio.wait_for(waiter, 2.0)
        else:
            await asyncio.sleep(0.1)
            assert not waiter.done(), n
            waiter.cancel()


# -- one order, one ledger, no races -----------------------------------------------------------
async def test_concurrent_dispatchers_never_overcommit(new_queue: QueueFactory) -> None:
    """3 instances dispatch and release concurrently; each item is granted exactly once,
    and what is held (as seen by the callers) never exceeds a budget, seq or tenant limit."""
    replicas = ["r0", "r1", "r2"]
    queues = [await new_queue(r) for r in replicas]
    await queues[0].set_engines(ENGINES, T0, 600)
    caps = {e.name: e for e in ENGINES}
    rng = random.Random(11)
    items = [
        item(
            f"i{n}",
            rng.choice(replicas),
            rng.choice([0.0, 1.0, 2.0]),
            tenant=f"t{n % 4}",
            footprint=rng.randint(50, 400),
        )
        for n in range(120)
    ]
    await queues[0].set_limits({f"t{n}": 2 for n in range(4)})
    by_id = {i.id: i for i in items}
    await asyncio.gather(*(queues[n % 3].enqueue(i, T0) for n, i in enumerate(items)))

    granted: Counter[str] = Counter()
    backend: dict[str, str] = {}
    held: dict[str, Grant] = {}  # granted and not yet being released: a subset of the truth
    released: set[str] = set()
    violations: list[str] = []

    async def dispatcher(q: RedisQueue) -> None:
        while len(granted) < len(items):
            for g in await q.dispatch(T0, 60.0, max_grants=rng.choice([1, 3, 64])):
                granted[g.id] += 1
                backend[g.id] = g.backend
                if g.id in released:  # its owner was faster than this reply
                    continue
                held[g.id] = g
                on = [h for h in held.values() if h.backend == g.backend]
                cap = caps[g.backend]
                if sum(h.footprint for h in on) > (cap.budget_tokens or 0):
                    violations.append(f"tokens on {g.backend}")
                if len(on) > (cap.max_seqs or 0):
                    violations.append(f"seqs on {g.backend}")
                tenant = by_id[g.id].tenant
                if sum(by_id[h.id].tenant == tenant for h in held.values()) > 2:
                    violations.append(f"limit of {tenant}")
            await q.wait_capacity(0.05)

    async def owner(q: RedisQueue, item_id: str) -> tuple[str, str]:
        g = await q.wait(item_id, 20.0)
        await asyncio.sleep(rng.random() * 0.004)
        released.add(item_id)
        held.pop(item_id, None)
        await q.release(item_id)
        return item_id, g.backend if isinstance(g, Grant) else repr(g)

    async def receiver(q: RedisQueue) -> list[tuple[str, str]]:
        mine = [i.id for i in items if i.replica == q.replica_id]
        return await asyncio.gather(*(owner(q, i) for i in mine))

    received, _ = await asyncio.wait_for(
        asyncio.gather(
            asyncio.gather(*(receiver(q) for q in queues)),
            asyncio.gather(*(dispatcher(q) for q in queues)),
        ),
        20.0,
    )
    assert violations == []
    assert granted == Counter({i.id: 1 for i in items})
    assert sorted(x for per in received for x in per) == sorted(backend.items())
    loads = await queues[1].loads(T0)
    assert [(x.held_tokens, x.seqs) for x in loads] == [(0, 0), (0, 0)]
    assert await queues[2].depth() == {}
    assert [await queues[0].in_flight(f"t{n}", T0) for n in range(4)] == [0, 0, 0, 0]


#: one OS process: a replica that dispatches for everyone and holds its own items briefly
_REPLICA = """
import asyncio, json, random, sys, time
from redis.asyncio import Redis
from proxy.admission.base import Grant
from proxy.admission.redis import RedisQueue

async def main(url, prefix, replica, ids, now):
    q = RedisQueue(replica, url, prefix=prefix)
    await q.start()
    r = Redis.from_url(url)
    await r.rpush(prefix + ":ready", replica)
    assert await r.blpop([prefix + ":go"], timeout=20) is not None
    rng = random.Random(replica)
    dispatched, received, left = [], [], set(ids)

    async def hold(item_id):
        g = await q.wait(item_id, 20.0)
        assert isinstance(g, Grant), (item_id, g)
        start = time.monotonic()
        await asyncio.sleep(rng.random() * 0.004)
        received.append([item_id, g.backend, g.footprint, start, time.monotonic()])
        await q.release(item_id)
        left.discard(item_id)

    holders = [asyncio.create_task(hold(i)) for i in ids]
    while left:
        for g in await q.dispatch(now, 60.0, max_grants=rng.choice([1, 2, 64])):
            dispatched.append([g.id, g.backend])
        await q.wait_capacity(0.05)
    await asyncio.gather(*holders)
    await r.aclose()
    await q.aclose()
    print(json.dumps({"dispatched": dispatched, "received": received}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]),
                 float(sys.argv[5])))
"""


def test_processes_share_one_order_and_ledger(redis_server: str, redis_prefix: str) -> None:
    rng = random.Random(5)
    items = [
        item(f"i{n}", f"p{n % 2}", rng.random(), footprint=rng.randint(20, 300)) for n in range(80)
    ]

    async def setup() -> None:
        q = RedisQueue("setup", redis_server, prefix=redis_prefix)
        await q.start()
        await q.set_engines(ENGINES, T0, 600)
        for i in items:
            await q.enqueue(i, T0)
        await q.aclose()

    asyncio.run(setup())
    procs = []
    for replica in ("p0", "p1"):
        ids = json.dumps([i.id for i in items if i.replica == replica])
        argv = [sys.executable, "-c", _REPLICA, redis_server, redis_prefix, replica, ids, repr(T0)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    r = redis_sync.Redis.from_url(redis_server)
    try:
        for _ in procs:
            assert r.blpop([f"{redis_prefix}:ready"], timeout=30) is not None
        r.rpush(f"{redis_prefix}:go", "go", "go")
        outs = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
    finally:
        r.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    dispatched = [tuple(d) for out in outs for d in out["dispatched"]]
    assert Counter(i for i, _ in dispatched) == Counter(i.id for i in items)  # exactly once
    assert all(out["dispatched"] for out in outs)  # both processes granted some
    received = [x for out in outs for x in out["received"]]
    assert sorted((i, b) for i, b, *_ in received) == sorted(dispatched)
    # held intervals as the owners saw them lie inside the real holds: never over budget
    caps = {e.name: e for e in ENGINES}
    for name, cap in caps.items():
        events = sorted(
            (t, +1 if start else -1, fp)
            for _, b, fp, t0, t1 in received
            if b == name
            for t, start in ((t0, True), (t1, False))
        )
        tokens = seqs = 0
        for _, sign, fp in events:  # at equal times -1 sorts first: a release, then a grant
            tokens += sign * fp
            seqs += sign
            assert tokens <= (cap.budget_tokens or 0) and seqs <= (cap.max_seqs or 0), name


# -- layout and failures -------------------------------------------------------------------------
async def test_keys_live_under_the_prefix_in_one_slot(
    new_queue: QueueFactory, raw: Redis, redis_prefix: str
) -> None:
    q = await new_queue("r1")
    await q.set_engines(ENGINES, T0, 60)
    for n in range(3):
        await q.enqueue(item(f"i{n}", "r1", deadline=T0 + 10 * n), T0)
    await q.dispatch(T0 + 1.5, 30, max_grants=1)  # one expired, one granted, one queued
    keys = [k async for k in raw.scan_iter(match=f"{redis_prefix}:*")]
    assert len(keys) >= 13  # the fixed keys plus the flow's zset, ready zset and tenant set
    assert any(":flow:" in k for k in keys) and any(":ready:" in k for k in keys)
    assert all(k.startswith(f"{redis_prefix}:{{q}}:") for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_shared_client_is_left_open(redis_server: str, redis_prefix: str) -> None:
    client = Redis.from_url(redis_server, decode_responses=False)
    q = RedisQueue("r1", prefix=redis_prefix, client=client)
    await q.start()
    await q.set_engines(ENGINES, T0, 60)
    await q.enqueue(item("a", "r1"), T0)
    assert await q.dispatch(T0, 30) == [Grant("a", "acme", "r1", "e1", 100)]
    assert await q.depth() == {}
    assert [x.held_tokens for x in await q.loads(T0)] == [100, 0]
    await q.aclose()
    assert await client.ping()
    await client.aclose()


async def test_unreachable_redis_is_reported_not_hung() -> None:
    q = RedisQueue("r1", f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1.0)
    with pytest.raises(StoreUnavailable):
        await q.start()
    await q.aclose()

"""Differential test: the memory queue (the admission core) and the Redis queue (the same rules
in Lua) make identical decisions on random operation sequences (Hypothesis).

Every operation of :class:`~proxy.admission.base.AdmissionQueue` is drawn: enqueue (with
depth caps and fair-share charges; alone or with a dispatch in the same step), cancel,
dispatch, release (with charge corrections; alone or with a dispatch in the same step),
move, grow, renew, limit changes, engine-view changes, replica heartbeats (items of three
replicas; a lapsed one is reaped), items past their ``late_at`` (demoted or shed) and clock
steps, under both queue orders (``key`` and ``counter``: exact VTC). After each one both queues must agree on its
result, on the depth, the stats (the fair-share ledger to the last bit) and every engine's
load.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.admission.base import EngineCapacity, LateRule, QueueCaps, QueueItem, QueueOrder
from proxy.admission.memory import MemoryQueue
from proxy.admission.redis import RedisQueue

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
TENANTS = ["acme", "zeta", "équipe/ü", "t:3"]
MODELS = ["m1", "org/m:2"]
ENGINES = ["e1", "e2", "e3"]
#: r1 dispatches; r2 and r3 own items too, beat or fall silent and are reaped
REPLICAS = ["r1", "r2", "r3"]
CAPS = QueueCaps(max_queued=40, max_queued_per_tenant=16)
_prefixes = itertools.count()

engine_spec = st.tuples(
    st.sampled_from(ENGINES),
    st.lists(st.sampled_from(MODELS), min_size=1, max_size=2, unique=True),
    st.sampled_from([None, 300, 1000, 2000]),  # budget
    st.sampled_from([None, 1, 2, 4]),  # max_seqs
    st.sampled_from([None, 1, 3]),  # soft_seqs
    st.booleans(),  # routable (mostly)
)
enqueue_op = st.tuples(
        st.just("enqueue"),
        st.integers(0, len(TENANTS) - 1),
        st.integers(0, len(MODELS) - 1),
        st.sampled_from([0.0, 1.0, 2.0, 2.5, 5.0, -1.0]),  # score (ties are common)
        st.integers(0, 2500),  # footprint (some beyond every budget)
        st.booleans(),  # exempt
        st.sampled_from([0.0, 5.0, 30.0, 300.0]),  # deadline offset
        st.sampled_from([0.0, 0.0, 100.0, 1 / 3, 1234.5678, 1e-9]),  # fair-share charge
        st.sampled_from([0, 0, 1, 2]),  # replica
        st.sampled_from([math.inf, math.inf, 0.5, 2.0, 2.0, 10.0]),  # late_at offset
        st.sampled_from([None, None, 8.0]),  # dispatch in the same step, with this lease
)
dispatch_op = st.tuples(st.just("dispatch"), st.sampled_from([2.0, 8.0, 30.0]),
                        st.sampled_from([1, 2, 64]))
# enqueues and dispatches are drawn most often, so queues grow deep and engines fill
ops = st.one_of(
    enqueue_op, enqueue_op, enqueue_op, enqueue_op, dispatch_op, dispatch_op,
    st.tuples(st.just("engines"), st.lists(engine_spec, max_size=3, unique_by=lambda e: e[0]),
              st.sampled_from([5.0, 60.0])),
    st.tuples(st.just("release"), st.integers(0, 1000),
              st.sampled_from([0.0, -50.25, 0.1, 300.0, -1e6]),  # charge correction
              st.sampled_from([None, 8.0])),  # dispatch in the same step, with this lease
    st.tuples(st.just("move"), st.integers(0, 1000), st.sampled_from(ENGINES)),
    st.tuples(st.just("grow"), st.integers(0, 1000), st.integers(-400, 400)),
    st.tuples(st.just("renew"), st.integers(0, 1000)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("limits"), st.integers(0, len(TENANTS) - 1),
              st.sampled_from([None, 0, 1, 2, 3])),
    st.tuples(st.just("clock"), st.sampled_from([0.3, 1.0, 4.0, 20.0])),
    st.tuples(st.just("in_flight"), st.integers(0, len(TENANTS) - 1)),
    st.tuples(st.just("heartbeat"), st.integers(0, len(REPLICAS) - 1),
              st.sampled_from([0.5, 2.0, 30.0])),
)


@dataclass
class Run:
    mem: MemoryQueue
    red: RedisQueue
    #: the other replicas' queues on the same Redis (their heartbeats)
    others: dict[str, RedisQueue]
    now: float = T0
    ids: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)


async def step(run: Run, op: tuple, n: int) -> None:  # type: ignore[type-arg]
    mem, red = run.mem, run.red
    kind = op[0]
    if kind == "enqueue":
        _, t, m, score, footprint, exempt, dl, charge, r, late, lease = op
        item = QueueItem(f"i{n}", TENANTS[t], REPLICAS[r], MODELS[m], score, footprint,
                         run.now + dl, exempt, charge, run.now + late)
        run.ids.append(item.id)
        if lease is None:
            assert await mem.enqueue(item, run.now) == await red.enqueue(item, run.now)
        else:
            em = await mem.enqueue_dispatch(item, run.now, lease)
            assert em == await red.enqueue_dispatch(item, run.now, lease)
            run.granted += [g.id for g in em.grants]
    elif kind == "dispatch":
        gm = await mem.dispatch(run.now, op[1], op[2])
        gr = await red.dispatch(run.now, op[1], op[2])
        assert gm == gr
        run.granted += [g.id for g in gm]
    elif kind == "engines":
        engines = [EngineCapacity(name, tuple(models), budget, max_seqs, routable, soft)
                   for name, models, budget, max_seqs, soft, routable in op[1]]
        await mem.set_engines(engines, run.now, op[2])
        await red.set_engines(engines, run.now, op[2])
    elif kind == "move" and run.granted:
        victim = run.granted[op[1] % len(run.granted)]
        assert await mem.move(victim, op[2]) == await red.move(victim, op[2])
    elif kind in ("release", "grow", "renew") and run.granted:
        victim = run.granted[op[1] % len(run.granted)]
        if kind == "release":
            run.granted.remove(victim)
            if op[3] is None:
                await mem.release(victim, op[2])
                await red.release(victim, op[2])
            else:
                gm = await mem.release_dispatch(victim, op[2], run.now, op[3])
                assert gm == await red.release_dispatch(victim, op[2], run.now, op[3])
                run.granted += [g.id for g in gm]
        elif kind == "grow":
            await mem.grow(victim, op[2])
            await red.grow(victim, op[2])
        else:
            ids = [victim, "nobody"]
            assert await mem.renew(ids, run.now, 8.0) == await red.renew(ids, run.now, 8.0)
    elif kind == "cancel" and run.ids:
        victim = run.ids[op[1] % len(run.ids)]
        assert await mem.cancel(victim) == await red.cancel(victim)
    elif kind == "limits":
        limits = {TENANTS[op[1]]: op[2]}
        await mem.set_limits(limits)
        await red.set_limits(limits)
    elif kind == "heartbeat":
        replica = REPLICAS[op[1]]
        known = run.mem.core.heartbeat(replica, run.now, op[2])
        red_q = run.red if replica == "r1" else run.others[replica]
        assert known == await red_q.heartbeat(run.now, op[2])
    elif kind == "clock":
        run.now += op[1]
    elif kind == "in_flight":
        t = TENANTS[op[1]]
        assert await mem.in_flight(t, run.now) == await red.in_flight(t, run.now)
    assert await mem.depth() == await red.depth()
    assert await mem.stats() == await red.stats()
    assert await mem.loads(run.now) == await red.loads(run.now)
    assert await mem.leader(run.now) == await red.leader(run.now)


async def play(
    url: str, prefix: str, sequence: list[tuple], order: QueueOrder,  # type: ignore[type-arg]
    late: LateRule = "demote",
) -> None:
    red = RedisQueue("r1", url, prefix=prefix, caps=CAPS, order=order, late=late)
    await red.start()
    others = {r: RedisQueue(r, url, prefix=prefix, caps=CAPS, order=order, late=late)
              for r in REPLICAS[1:]}
    for q in others.values():
        await q.start()
    run = Run(MemoryQueue("r1", CAPS, order, late), red, others)
    try:
        await run.mem.set_engines([EngineCapacity("e1", tuple(MODELS), 1000, 4, True)], T0, 60)
        await red.set_engines([EngineCapacity("e1", tuple(MODELS), 1000, 4, True)], T0, 60)
        for n, op in enumerate(sequence):
            try:
                await step(run, op, n)
            except AssertionError as e:
                raise AssertionError(f"operation {n}: {op!r}") from e
    finally:
        await run.mem.aclose()
        await red.aclose()
        for q in others.values():
            await q.aclose()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(ops, min_size=30, max_size=200),
       order=st.sampled_from(["key", "counter"]), late=st.sampled_from(["demote", "shed"]))
def test_memory_and_redis_decide_alike(
    redis_server: str, redis_prefix: str, sequence: list[tuple],  # type: ignore[type-arg]
    order: QueueOrder, late: LateRule,
) -> None:
    asyncio.run(play(redis_server, f"{redis_prefix}-d{next(_prefixes)}", sequence, order, late))


@pytest.mark.parametrize(("order", "late"), [("key", "demote"), ("counter", "shed")])
def test_a_long_mixed_run_decides_alike(
    redis_server: str, redis_prefix: str, order: QueueOrder, late: LateRule
) -> None:
    """One long fixed run (many tenants backlogged at once, parks and un-parks, expiry)."""
    seq: list[tuple] = [("engines", [("e1", MODELS, 2000, 4, 3, True),  # type: ignore[type-arg]
                                     ("e2", ["m1"], 1000, 2, None, True)], 60.0)]
    for n in range(300):
        seq.append(("enqueue", n % 4, n % 2, float(n % 7), (n * 97) % 1300, n % 11 == 0,
                    [5.0, 30.0, 300.0][n % 3], (n * 37 % 500) / 7, n % 5 % 3,
                    [math.inf, 3.0, 8.0][n % 3], 8.0 if n % 6 == 1 else None))
        if n % 13 == 0:
            seq.append(("heartbeat", n % 3, [2.0, 30.0][n // 13 % 2]))
        if n % 5 == 0:
            seq.append(("limits", n % 4, [None, 1, 2, 3][(n // 5) % 4]))
        if n % 3 == 0:
            seq.append(("dispatch", 8.0, 64))
        if n % 4 == 0:
            seq.append(("release", n, (n % 9 - 4) * 12.5, 8.0 if n % 8 == 0 else None))
        if n % 17 == 0:
            seq.append(("clock", 4.0))
        if n % 29 == 0:
            seq.append(("engines", [("e1", MODELS, 2000, 4, 3, True),
                                    ("e2", ["m1"], 1000, 2, None, True)], 60.0))
    asyncio.run(play(redis_server, f"{redis_prefix}-long-{order}", seq, order, late))

"""Replicas decide as one (:mod:`proxy.scheduler`): every replica applies every replica's
completions to its controllers, and one of them, the leader, publishes the decisions. A
follower publishes the TPOT governor's cap the queue holds for a shared engine (the
leader's) and governs only the engines it launched; it writes a tenant's limit the first
time it sees the tenant, not the changes after; when the leader's heartbeat lapses it takes
over, starting from the caps it adopted, and publishes every limit once.

Several replicas on one queue are modelled by one memory queue whose core also holds the
other replica's heartbeats (the differential test shows the Redis queue decides alike)."""

from __future__ import annotations

from typing import Any

from adapters.base import Backend
from adapters.clock import FakeClock
from policies.registry import build_policy
from proxy.admission.base import EngineCapacity
from proxy.admission.memory import MemoryQueue
from proxy.config import Settings
from proxy.scheduler import Scheduler
from proxy.store.base import Tenant

TTL = 1.5


class Pool:
    def __init__(self, *backends: Backend) -> None:
        self._backends = list(backends)

    def backends(self) -> list[Backend]:
        return self._backends


def _scheduler(clock: FakeClock, queue: MemoryQueue, pool: Pool) -> Scheduler:
    return Scheduler(settings=Settings.model_validate({}), clock=clock, queue=queue,
                     pool=pool, policy=build_policy({"type": "driftsched"}),  # type: ignore[arg-type]
                     estimator=None, drift=None, replica_id="b")  # type: ignore[arg-type]


async def test_a_follower_publishes_the_leaders_caps_and_takes_over_warm() -> None:
    clock = FakeClock()
    now = clock.time()
    queue = MemoryQueue("b")
    shared = Backend("ext", "http://x", ("m",), kind="external", max_num_seqs=64)
    own = Backend("sim-0", "http://y", ("m",), kind="sim", max_num_seqs=64)
    sch = _scheduler(clock, queue, Pool(shared, own))
    written: list[dict[str, int | None]] = []
    set_limits = queue.set_limits

    async def spy(limits: dict[str, int | None]) -> None:
        written.append(dict(limits))
        await set_limits(limits)

    queue.set_limits = spy  # type: ignore[method-assign]

    queue.core.heartbeat("a", now, TTL)  # a beat first: it leads
    await queue.heartbeat(now, TTL)
    await sch.follow_leader(now)
    assert (sch.leader, sch.leading) == ("a", False)
    # a published its cap on the shared engine
    queue.core.set_engines([EngineCapacity("ext", ("m",), None, 64, True, 12)], now, 5.0)
    sch.loads_snapshot = await queue.loads(now)
    caps = {c.name: c for c in sch.capacities()}
    assert caps["ext"].soft_seqs == 12  # the leader's, published unchanged
    assert caps["sim-0"].soft_seqs == 16  # its own engine: its own governor (slow start)
    assert not sch.governs(shared) and sch.governs(own)

    # limits: the first sight of a tenant is written, a later change only by the leader
    acme: Any = Tenant(name="acme", max_concurrency=4)
    sch.tenant_state(acme)
    await sch.publish_limits(["acme"])
    sch.tenant_state(Tenant(name="acme", max_concurrency=2))
    await sch.publish_limits(["acme"])
    assert written == [{"acme": 4}]

    # a's heartbeat lapses; b beats on and takes over, from the cap it adopted
    for _ in range(3):
        clock.advance(0.6)
        await queue.heartbeat(clock.time(), TTL)
    await sch.follow_leader(clock.time())
    assert (sch.leader, sch.leading) == ("b", True)
    assert sch.governs(shared)
    caps = {c.name: c for c in sch.capacities()}
    assert caps["ext"].soft_seqs == 12  # warm: the cap a set, now b's to change
    await sch.publish_limits()
    assert written[-1] == {"acme": 2}  # every limit once, as b's controller sees it


async def test_one_replica_leads_itself() -> None:
    clock = FakeClock()
    queue = MemoryQueue("b")
    sch = _scheduler(clock, queue, Pool())
    await sch.start()
    try:
        assert sch.leading
    finally:
        await sch.stop()


def test_other_replicas_completions_feed_this_replicas_controllers() -> None:
    """:meth:`Scheduler.apply` on events from the bus: a tenant only another replica served
    is tracked with the base limit the event carries; the SLO window counts its outcomes and
    the governor's outer loop its streams' TPOT, as if they were this replica's."""
    from policies.drift import DriftController, DriftParams
    from proxy.completions import Completion

    clock = FakeClock()
    settings = Settings.model_validate({"scheduler": {"slo_min_samples": 5}})
    drift = DriftController(DriftParams(warmup=0, warmup_s=0.0), clock=clock)
    sch = Scheduler(settings=settings, clock=clock, queue=MemoryQueue("b"), pool=Pool(),  # type: ignore[arg-type]
                    policy=build_policy({"type": "driftsched"}), estimator=None,  # type: ignore[arg-type]
                    drift=drift, replica_id="b")
    headroom = sch.governor.headroom
    for i in range(25):
        clock.advance(0.1)
        # premium, 0.2 s per token against a 100 ms TPOT SLO: a miss
        sch.apply(Completion("zeta", 0, 6, i % 5 != 0, 0.2, 50.0, 60.0))
    st = drift.status("zeta")
    assert st.base_limit == 6 and sch.limit_of("zeta") == 6
    assert st.samples == DriftParams().window  # its log ratios fill the window
    assert sch.slo.attainment(clock.time()) == {0: (0.8, 25)}
    assert sch.governor.headroom < headroom  # the p95 TPOT is over the SLO: tightened
    # an event that feeds the estimator only (replayed from before this replica started)
    sch.apply(Completion("eta", None, actual=60.0))
    assert "eta" not in drift.statuses() and sch.slo.attainment(clock.time())[0][1] == 25

"""What the scheduler publishes as each engine's admission budget (``Scheduler.capacities``):
KV capacity x ``kv_budget_fraction``; for an engine the pool launched whose capacity is not
scraped yet, one request at a time (an unknown budget would count as unlimited and take a
whole start-up burst); an endpoint that never reports one stays unlimited."""

from __future__ import annotations

from adapters.base import Backend, EngineMetrics
from adapters.clock import FakeClock
from policies.registry import build_policy
from proxy.admission.memory import MemoryQueue
from proxy.config import Settings
from proxy.scheduler import Scheduler


class Pool:
    def __init__(self, *backends: Backend) -> None:
        self._backends = list(backends)

    def backends(self) -> list[Backend]:
        return self._backends


async def test_a_launched_engine_takes_one_request_until_its_capacity_is_scraped() -> None:
    clock = FakeClock()
    launched = Backend("sim-0", "http://a", ("m",), kind="sim", max_num_seqs=256)
    configured = Backend("sim-1", "http://b", ("m",), kind="sim", max_num_seqs=256,
                         kv_capacity_tokens=10_000)
    external = Backend("ext", "http://c", ("m",), kind="external", max_num_seqs=256)
    settings = Settings.model_validate({"scheduler": {"kv_budget_fraction": 0.9}})
    sch = Scheduler(settings=settings, clock=clock, queue=MemoryQueue("r"),
                    pool=Pool(launched, configured, external),  # type: ignore[arg-type]
                    policy=build_policy({"type": "fcfs"}), estimator=None,  # type: ignore[arg-type]
                    drift=None, replica_id="r")
    await sch.follow_leader(clock.time())
    budgets = {c.name: c.budget_tokens for c in sch.capacities()}
    assert budgets == {"sim-0": 1, "sim-1": 9_000, "ext": None}
    # the first scrape: its capacity is known (the pool sets both)
    launched.metrics = EngineMetrics(scraped_at=12.5)
    launched.kv_capacity_tokens = 467_000
    assert {c.name: c.budget_tokens for c in sch.capacities()}["sim-0"] == 420_300
    # scraped, but the engine does not report a capacity: nothing more to wait for
    launched.kv_capacity_tokens = None
    assert {c.name: c.budget_tokens for c in sch.capacities()}["sim-0"] is None

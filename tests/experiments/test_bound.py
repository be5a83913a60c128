"""experiments.bound: the capacity bound on each class's attainment, shared out in level
order, and the report's table."""

from __future__ import annotations

import pytest

from experiments.bound import ClassLoad, bound_rows, bounds, class_loads
from experiments.workload_file import Request


def _loads(*spec: tuple[str, float, float]) -> list[ClassLoad]:
    return [ClassLoad(name, 100, offered, cap) for name, offered, cap in spec]


def test_classes_are_served_in_level_order_until_the_pool_is_full() -> None:
    # premium asks 0.25 of the pool, standard 0.5, batch 0.75: batch gets what is left
    b = bounds(_loads(("premium", 5, 20), ("standard", 10, 20), ("batch", 15, 20)))
    assert b == {"premium": 1.0, "standard": 1.0, "batch": pytest.approx(0.25 / 0.75)}
    # with a queue timeout's worth of extra time (1.25 of the window) batch gets 0.5 / 0.75
    b = bounds(_loads(("premium", 5, 20), ("standard", 10, 20), ("batch", 15, 20)), 1.25)
    assert b["batch"] == pytest.approx(0.5 / 0.75)
    # the top class alone asking for more than the pool: it gets all of it, nobody else any
    b = bounds(_loads(("premium", 40, 20), ("standard", 1, 20)))
    assert b == {"premium": 0.5, "standard": 0.0}
    # a class that asks for nothing (no capacity estimate) is not bounded
    assert bounds(_loads(("premium", 0, 20), ("batch", 5, 0)))["batch"] == 1.0


def test_the_table_shows_each_policy_as_a_share_of_the_bound() -> None:
    loads = _loads(("premium", 5, 20), ("batch", 30, 20))  # batch: 1.5 of the pool
    metrics = {"p": {"classes": {"premium": {"attainment": 0.9, "met": 90},
                                 "batch": {"attainment": 0.25, "met": 25}}}}  # fmt: skip
    head, rows = bound_rows(loads, metrics)
    assert head[-1] == "p (share of bound)"
    assert rows[0][-2:] == ["1.000", "0.900 (0.90)"]
    assert rows[1][-2:] == ["0.500", "0.250 (0.50)"]  # batch: 0.75 of the pool left / 1.5
    # all: (100 + 50) of 200 can meet their SLO; p met 115
    assert rows[2][-2:] == ["0.750", f"{115 / 200:.3f} ({115 / 150:.2f})"]


def _req(i: int, cls: str, at: float, prompt: int, out: int) -> Request:
    return Request(f"r{i}", at, cls[:4], cls, None, "x", None, out, prompt)


def test_class_loads_measure_each_class_on_its_own_mix() -> None:
    # premium: short requests; batch: long prompts and answers, so the pool serves fewer
    reqs = [_req(i, "premium", i * 0.5, 100, 50) for i in range(30)]
    reqs += [_req(100 + i, "batch", i * 0.5, 2000, 400) for i in range(30)]
    loads = class_loads(reqs, ["premium", "standard", "batch"], 10.0, engines=2,
                        profile="llama3-8b-a100", n_requests=400)
    assert [c.name for c in loads] == ["premium", "batch"]  # standard sent nothing
    prem, batch = loads
    assert (prem.requests, prem.offered_req_s) == (20, 2.0)  # arrivals before 10 s only
    assert batch.capacity_req_s < prem.capacity_req_s / 3

"""experiments.fairness: token spreading, water-filling, Jain's index, fair shares, VTC's
service difference -- hand-computed values on small inputs, edge cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.fairness import (
    fair_share_jain,
    jain,
    maxmin_fair,
    service,
    service_difference,
    spread_tokens,
)
from tests.experiments.builders import failed, make_req

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)


# -- spread_tokens ---------------------------------------------------------------------------
def test_spread_tokens_counts_the_overlap_in_proportion() -> None:
    r = make_req(at=0.0, ttft=10.0, decode=40.0, out=80)  # tokens over [10, 50]
    assert spread_tokens(r, 0.0, 100.0) == pytest.approx(80.0)
    assert spread_tokens(r, 0.0, 30.0) == pytest.approx(40.0)
    assert spread_tokens(r, 30.0, 60.0) == pytest.approx(40.0)
    assert spread_tokens(r, 50.0, 60.0) == 0.0
    assert spread_tokens(r, 60.0, 70.0) == 0.0


def test_spread_tokens_of_a_failure_is_zero() -> None:
    assert spread_tokens(failed(at=1.0), 0.0, 10.0) == 0.0


def test_an_instant_answer_on_a_window_edge_counts_in_one_window_only() -> None:
    # every token in one event: first token == done == 60 s; windows are [lo, hi)
    r = make_req(at=59.5, ttft=0.5, decode=0.0, out=8)
    assert spread_tokens(r, 0.0, 60.0) + spread_tokens(r, 60.0, 120.0) == 8.0
    assert spread_tokens(r, 60.0, 120.0) == 8.0


# -- maxmin_fair ---------------------------------------------------------------------------
def test_maxmin_fair_weighted_water_filling() -> None:
    # 90 over demands 10 / 100 / 100, weights 1 / 1 / 2: a is satisfied, b and c split 80 1:2
    fair = maxmin_fair({"a": 10, "b": 100, "c": 100}, {"a": 1, "b": 1, "c": 2}, 90)
    assert fair == pytest.approx({"a": 10, "b": 80 / 3, "c": 160 / 3})


def test_maxmin_fair_several_rounds() -> None:
    # 60 over 5 / 15 / 100 (equal weights): 20 each -> a gets 5; 27.5 each -> b gets 15;
    # c gets the remaining 40
    fair = maxmin_fair({"a": 5, "b": 15, "c": 100}, {"a": 1, "b": 1, "c": 1}, 60)
    assert fair == pytest.approx({"a": 5, "b": 15, "c": 40})


def test_maxmin_fair_enough_for_everyone_gives_the_demands() -> None:
    assert maxmin_fair({"a": 5, "b": 7}, {"a": 1, "b": 1}, 100) == {"a": 5, "b": 7}


def test_maxmin_fair_ties_split_equally() -> None:
    assert maxmin_fair({"a": 50, "b": 50}, {"a": 1, "b": 1}, 30) == pytest.approx(
        {"a": 15, "b": 15}
    )


def test_maxmin_fair_zero_demand_and_zero_capacity() -> None:
    assert maxmin_fair({"a": 0, "b": 10}, {"a": 1, "b": 1}, 4) == {"a": 0.0, "b": 4.0}
    assert maxmin_fair({"a": 3, "b": 10}, {"a": 1, "b": 1}, 0) == {"a": 0.0, "b": 0.0}
    assert maxmin_fair({}, {}, 10) == {}


def test_maxmin_fair_rejects_a_non_positive_weight() -> None:
    with pytest.raises(ValueError, match="weight"):
        maxmin_fair({"a": 3, "b": 10}, {"a": 0, "b": 1}, 5)


_demands = st.dictionaries(
    st.sampled_from("abcdefgh"), st.floats(0, 1e4, allow_nan=False), min_size=1
)


@SETTINGS
@given(
    demand=_demands,
    weights=st.lists(st.floats(0.1, 10), min_size=8, max_size=8),
    capacity=st.floats(0, 5e4),
)
def test_maxmin_fair_properties(
    demand: dict[str, float], weights: list[float], capacity: float
) -> None:
    w = {t: weights["abcdefgh".index(t)] for t in demand}
    fair = maxmin_fair(demand, w, capacity)
    assert set(fair) == set(demand)
    # sums to the capacity, or to the total demand when that is smaller
    assert sum(fair.values()) == pytest.approx(min(capacity, sum(demand.values())), abs=1e-6)
    for t in demand:
        assert -1e-9 <= fair[t] <= demand[t] + 1e-6  # never more than asked
    # max-min: a tenant left short has the highest allocation per weight of anyone
    short = [t for t in demand if fair[t] < demand[t] - 1e-6]
    for s in short:
        for t in demand:
            assert fair[s] / w[s] >= fair[t] / w[t] - 1e-6


# -- jain ----------------------------------------------------------------------------------
def test_jain_hand_values() -> None:
    assert jain([]) is None
    assert jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0]) == pytest.approx(0.5)
    assert jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # the floor, 1 / n
    assert jain([1.0, 3.0]) == pytest.approx(16 / (2 * 10))
    assert jain([0.0, 0.0]) == 1.0  # everyone got nothing: equal (the convention)


@SETTINGS
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30), st.floats(0.1, 100))
def test_jain_is_between_one_over_n_and_one_and_scale_free(xs: list[float], k: float) -> None:
    j = jain(xs)
    assert j is not None
    assert 1 / len(xs) - 1e-9 <= j <= 1 + 1e-9
    if any(x > 1e-3 for x in xs):
        assert jain([k * x for x in xs]) == pytest.approx(j, rel=1e-6)


# -- fair_share_jain -----------------------------------------------------------------------
def test_service_is_prompt_plus_twice_output() -> None:
    assert service(10, 20) == 50.0
    assert service(None, 20) == 40.0
    assert service(None, None) == 0.0


def test_fair_share_jain_one_tenant_is_fair() -> None:
    f = fair_share_jain([make_req("a", out=10), make_req("a", out=30)], {})
    assert f["tenants"] == 1 and f["jain"] == pytest.approx(1.0)
    assert f["served_over_fair"] == {"a": pytest.approx(1.0)}


def test_fair_share_jain_hand_computed() -> None:
    # a and b each ask for 2 requests of service 10 + 2 * 20 = 50 (demand 100 each);
    # a is served both, b one (its second times out): 150 served, fair share 75 each
    reqs = [make_req("a", prompt=10, out=20), make_req("a", prompt=10, out=20),
            make_req("b", prompt=10, out=20), failed("b", prompt=10, out=20)]  # fmt: skip
    f = fair_share_jain(reqs, {})
    assert f["demand"] == {"a": 100.0, "b": 100.0} and f["served"] == {"a": 100.0, "b": 50.0}
    assert f["served_over_fair"] == pytest.approx({"a": 100 / 75, "b": 50 / 75})
    assert f["jain"] == pytest.approx((4 / 3 + 2 / 3) ** 2 / (2 * (16 / 9 + 4 / 9)))


def test_fair_share_jain_follows_the_weights() -> None:
    # b has weight 2 and gets twice a's service out of 150 over equal demands of 200: fair
    reqs = [make_req("a", prompt=0, out=25), failed("a", prompt=0, out=75),
            make_req("b", prompt=0, out=50), failed("b", prompt=0, out=50)]  # fmt: skip
    f = fair_share_jain(reqs, {"a": 1.0, "b": 2.0})
    assert f["served_over_fair"] == pytest.approx({"a": 1.0, "b": 1.0})
    assert f["jain"] == pytest.approx(1.0)


def test_fair_share_jain_nothing_served_or_nothing_sent() -> None:
    f = fair_share_jain([failed("a"), failed("b")], {})
    assert f["tenants"] == 2 and f["jain"] is None and f["served_over_fair"] == {}
    assert fair_share_jain([], {})["jain"] is None


def test_fair_share_jain_counts_actual_usage_as_served() -> None:
    # the engine's usage, not the workload's expected lengths, is what was served
    r = make_req("a", prompt=10, out=5, expected_prompt=10, expected_out=50)
    f = fair_share_jain([r], {})
    assert f["demand"] == {"a": 110.0} and f["served"] == {"a": 20.0}


# -- service_difference --------------------------------------------------------------------
def test_service_difference_hand_computed() -> None:
    # a: prompt 10, 61 tokens over [20, 80] -> window [0, 60): 10 + 2 * 61 * 40/60
    # b (weight 2): prompt 100, 50 tokens over [6, 30] -> (100 + 100) / 2 = 100
    a = make_req("a", at=10.0, ttft=10.0, decode=60.0, prompt=10, out=61)
    b = make_req("b", at=5.0, ttft=1.0, decode=24.0, prompt=100, out=50)
    sd = service_difference([a, b], {"a": 1.0, "b": 2.0})
    want = 100.0 - (10 + 2 * 61 * 40 / 60)
    # window [60, 120) has no arrivals: not counted
    assert sd == {"max": pytest.approx(want), "mean": pytest.approx(want)}


def test_service_difference_over_two_windows() -> None:
    # both tenants arrive in both windows; a is served in each, b only in the second
    reqs = [make_req("a", at=1.0, ttft=1.0, decode=0.0, prompt=10, out=0),
            failed("b", at=2.0),
            make_req("a", at=61.0, ttft=1.0, decode=0.0, prompt=10, out=0),
            make_req("b", at=62.0, ttft=1.0, decode=0.0, prompt=40, out=0)]  # fmt: skip
    sd = service_difference(reqs, {})
    assert sd == {"max": pytest.approx(30.0), "mean": pytest.approx(20.0)}  # 10 and 30


def test_service_difference_of_one_tenant_or_none_is_undefined() -> None:
    assert service_difference([make_req("a"), make_req("a", at=5.0)], {}) == {
        "max": None,
        "mean": None,
    }
    assert service_difference([], {}) == {"max": None, "mean": None}


def test_service_difference_an_answer_on_the_run_end_is_counted() -> None:
    # the last token lands exactly on the end of the last window
    a = make_req("a", at=50.0, ttft=10.0, decode=0.0, prompt=0, out=5)  # done at 60
    b = make_req("b", at=50.0, ttft=1.0, decode=0.0, prompt=0, out=0)
    assert service_difference([a, b], {})["max"] == pytest.approx(10.0)

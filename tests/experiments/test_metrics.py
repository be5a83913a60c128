"""experiments.metrics: SLO met, attainment, goodput, throughput, makespan, rolling
attainment and recovery, drift reaction, estimator accuracy, per-tenant attainment fairness
and engine busy share -- hand-computed values on small inputs and the edge cases."""

from __future__ import annotations

import pytest

from experiments.metrics import (
    WARMUP_S,
    attainment_fairness,
    busy_share,
    compute,
    estimator_accuracy,
    group_stats,
    limit_reaction,
    makespan,
    pct,
    queue_times,
    recovery,
    rolling_attainment,
    slo_met,
)
from experiments.rundata import Access, DriftAction
from tests.experiments.builders import SLOS, failed, make_req, make_run, slos_for

PREMIUM = SLOS["premium"]  # TTFT 1 s, TPOT 0.1 s


def test_pct_interpolates_and_is_none_when_empty() -> None:
    assert pct([], 50) is None
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert pct([0.0, 10.0], 99) == pytest.approx(9.9)


# -- slo_met ---------------------------------------------------------------------------------
def test_slo_met_bounds_are_inclusive() -> None:
    # TTFT exactly 1 s, TPOT exactly (1.0 s / 10 gaps) = 0.1 s: met
    assert slo_met(make_req(ttft=1.0, decode=1.0, out=11), PREMIUM)
    assert not slo_met(make_req(ttft=1.01, decode=1.0, out=11), PREMIUM)
    assert not slo_met(make_req(ttft=0.1, decode=1.1, out=11), PREMIUM)


def test_slo_met_one_token_answer_has_zero_tpot() -> None:
    assert slo_met(make_req(ttft=0.5, decode=5.0, out=1), PREMIUM)


def test_slo_met_failures_miss_and_no_slo_means_success() -> None:
    assert not slo_met(failed(), PREMIUM)
    assert not slo_met(failed(), SLOS["batch"])
    assert slo_met(make_req(ttft=100.0, decode=100.0), SLOS["batch"])
    assert not slo_met(make_req(ttft=None), PREMIUM)


# -- makespan ------------------------------------------------------------------------------
def test_makespan_first_dispatch_to_last_end() -> None:
    reqs = [make_req(at=2.0, ttft=0.5, decode=1.5), make_req(at=5.0, ttft=1.0, decode=4.0)]
    assert makespan(reqs) == pytest.approx(10.0 - 2.0)


def test_makespan_counts_a_failure_that_ends_last() -> None:
    # a request shed at 12 s was still the system's work until then
    reqs = [make_req(at=0.0, ttft=0.5, decode=0.5), failed(at=12.0)]
    assert makespan(reqs) == pytest.approx(12.0)


def test_makespan_ignores_requests_never_dispatched() -> None:
    # the generator never sent it (overflow, or cancelled before its time): its end is
    # when the replay stopped, not work of the system
    never = failed(at=50.0, error="loadgen_overflow", status=0, dispatched=False)
    assert makespan([make_req(at=0.0, ttft=0.5, decode=0.5), never]) == pytest.approx(1.0)


def test_makespan_empty_and_nothing_dispatched() -> None:
    assert makespan([]) == 0.0
    assert makespan([failed(dispatched=False, status=0, error="cancelled")]) == 0.0


# -- group_stats -----------------------------------------------------------------------------
def test_group_stats_hand_computed() -> None:
    reqs = [
        make_req("a", at=0.0, ttft=0.2, decode=1.0, out=11),  # met
        make_req("a", at=1.0, ttft=0.4, decode=0.5, out=6),  # met
        make_req("a", at=2.0, ttft=2.0, decode=1.0, out=11),  # TTFT miss, still served
        failed("a", at=3.0),  # a miss
    ]
    slos = slos_for({"a": "premium"})
    span = makespan(reqs)
    assert span == pytest.approx(5.0)  # 0 -> 2 + 2 + 1
    s = group_stats(reqs, slos, span, window_s=4.0)
    assert (s["n"], s["ok"], s["met"]) == (4, 3, 2)
    assert s["attainment"] == 0.5
    assert s["goodput_req_s"] == pytest.approx(2 / 5.0)
    assert s["output_tokens"] == 28
    assert s["throughput_tok_s"] == pytest.approx(28 / 5.0)
    assert s["ttft_p50"] == pytest.approx(0.4) and s["tpot_p50"] == pytest.approx(0.1)
    assert s["errors"] == {"queue_timeout": 1}
    # in-window: 11 + 6 tokens, and of the third [4, 5] nothing falls in [0, 4)
    assert s["throughput_window_tok_s"] == pytest.approx(17 / 4.0)


def test_group_stats_splits_a_request_spanning_the_window_end() -> None:
    r = make_req(at=0.0, ttft=8.0, decode=4.0, out=20)  # tokens over [8, 12]
    s = group_stats([r], slos_for({"acme": "batch"}), makespan([r]), window_s=10.0)
    assert s["throughput_window_tok_s"] == pytest.approx(10 / 10.0)
    assert s["throughput_tok_s"] == pytest.approx(20 / 12.0)


def test_group_stats_no_requests() -> None:
    s = group_stats([], {}, 0.0, 10.0)
    assert s["n"] == 0 and s["attainment"] is None and s["attainment_after_warmup"] is None
    assert s["ttft_p99"] is None and s["goodput_req_s"] is None
    assert s["throughput_tok_s"] is None and s["output_tokens"] == 0


def test_group_stats_all_failed() -> None:
    reqs = [failed(at=1.0), failed(at=2.0, error="rate_limited", status=429)]
    s = group_stats(reqs, slos_for({"acme": "premium"}), makespan(reqs), 10.0)
    assert s["attainment"] == 0.0 and s["ok"] == 0 and s["goodput_req_s"] == 0.0
    assert s["throughput_tok_s"] == 0.0 and s["ttft_p50"] is None
    assert s["errors"] == {"queue_timeout": 1, "rate_limited": 1}


def test_group_stats_attainment_after_warmup() -> None:
    reqs = [make_req(at=WARMUP_S - 1, ttft=5.0), make_req(at=WARMUP_S, ttft=0.1)]
    s = group_stats(reqs, slos_for({"acme": "premium"}), makespan(reqs), 60.0)
    assert s["attainment"] == 0.5 and s["attainment_after_warmup"] == 1.0


# -- per-tenant attainment fairness, engine busy share --------------------------------------
def test_attainment_fairness() -> None:
    f = attainment_fairness({"a": {"attainment": 1.0}, "b": {"attainment": 0.5},
                             "c": {"attainment": None}})  # fmt: skip
    assert f["jain"] == pytest.approx(1.5**2 / (2 * 1.25))
    assert (f["min"], f["min_tenant"]) == (0.5, "b")
    assert attainment_fairness({}) == {"jain": None, "min": None, "min_tenant": None}
    one = attainment_fairness({"a": {"attainment": 0.3}})
    assert one["jain"] == 1.0 and one["min"] == 0.3


def test_busy_share() -> None:
    engines = [{"sim:busy_seconds_total": 8.0}, {"sim:busy_seconds_total": 4.0}]
    assert busy_share(engines, 10.0) == pytest.approx(12 / 20)
    assert busy_share(engines, 0.0) is None
    assert busy_share([], 10.0) is None
    # a real vLLM engine reports no busy time: unknown, not 0
    assert busy_share([{"sim:busy_seconds_total": 8.0}, {}], 10.0) is None


# -- time series -----------------------------------------------------------------------------
def test_rolling_attainment_window_is_open_on_the_left() -> None:
    slos = slos_for({"acme": "premium"})
    reqs = [make_req(at=5.0, ttft=5.0), make_req(at=7.0, ttft=0.1), make_req(at=10.0)]
    times, values = rolling_attainment(reqs, slos, end_s=15.0, window_s=10.0, step_s=5.0)
    assert times == [10.0, 15.0]
    # (0, 10]: all three, the one at 5 a miss; (5, 15]: the ones at 7 and 10
    assert values == [pytest.approx(2 / 3), 1.0]
    times, values = rolling_attainment(reqs, slos, end_s=10.0, window_s=11.0, step_s=1.0)
    assert times == [] and values == []
    # a request arriving at exactly 0 belongs to the first window, [0, 10]
    at_0 = [make_req(at=0.0, ttft=5.0)]
    _, values = rolling_attainment(at_0, slos, end_s=30.0, window_s=10.0, step_s=10.0)
    assert values == [0.0, None, None]


def test_rolling_attainment_of_no_requests_is_none() -> None:
    _, values = rolling_attainment([], {}, end_s=12.0, window_s=10.0, step_s=1.0)
    assert values == [None, None, None]


def test_rolling_attainment_and_recovery() -> None:
    slos = slos_for({"acme": "premium"})
    # one request per second; those arriving in [20, 30) miss their TTFT SLO
    reqs = [make_req(at=float(t), ttft=5.0 if 20 <= t < 30 else 0.1, decode=0.5)
            for t in range(60)]  # fmt: skip
    times, values = rolling_attainment(reqs, slos, 60.0)
    assert values[times.index(15.0)] == 1.0 and values[times.index(29.0)] == 0.0
    rec = recovery(times, values, onset=20.0, end=60.0)
    # the window (t - 10, t] is clean again from t = 39
    assert rec["min"] == 0.0 and rec["first_s"] == rec["sustained_s"] == 19.0


def test_recovery_never_dipped() -> None:
    rec = recovery([1.0, 2.0, 3.0], [1.0, 0.96, 1.0], onset=0.0, end=3.0)
    assert rec == {"min": 0.96, "first_s": 0.0, "sustained_s": 0.0}


def test_recovery_dips_twice() -> None:
    times = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
    values = [1.0, 0.5, 0.97, 0.9, None, 0.99]
    rec = recovery(times, values, onset=10.0, end=15.0)
    # first back at 12 (2 s); last low at 13, the next sample is 15 (None is skipped)
    assert rec == {"min": 0.5, "first_s": 2.0, "sustained_s": 5.0}


def test_recovery_never_recovers_and_no_data() -> None:
    rec = recovery([1.0, 2.0], [0.9, 0.8], onset=0.0, end=2.0)
    assert rec == {"min": 0.8, "first_s": None, "sustained_s": None}
    assert recovery([1.0], [None], onset=0.0, end=2.0) == {
        "min": None, "first_s": None, "sustained_s": None,
    }  # fmt: skip


def test_limit_reaction_first_throttling_action_on_the_tenant_after_onset() -> None:
    actions = [
        DriftAction(12.0, "globex", "decrease", 3.0, 8),
        DriftAction(9.0, "globex", "decrease", 3.0, 16),  # before the onset
        DriftAction(10.5, "initech", "decrease", 3.0, 8),  # another tenant
        DriftAction(11.0, "globex", "increase", 1.0, 32),  # not a throttling action
    ]
    took, a = limit_reaction(actions, "globex", onset=10.0)
    assert took == pytest.approx(2.0) and a is actions[0]
    assert limit_reaction(actions, "globex", onset=20.0) == (None, None)


# -- estimator ----------------------------------------------------------------------------
def _acc(rid: str, out: int | None, p50: float | None, p90: float | None = None,
         status: int = 200, *, at: float | None = None, took: float | None = None,
         cap: int | None = None) -> Access:  # fmt: skip
    """An access-log line: arrival ``at`` at the gateway, finished ``took`` later."""
    return Access(rid, status, out, p50, p90, None, took, arrival_s=at, max_tokens=cap)


TENANT_MEAN = "per-tenant mean"
ALL = {"all": lambda _: True}


def test_estimator_accuracy_hand_computed() -> None:
    # each request finishes before the next one arrives: sequential, like prequential
    access = [_acc("1", 100, 150.0, 200.0, at=0.0, took=1.0),
              _acc("2", 300, 150.0, 200.0, at=2.0, took=1.0),
              _acc("3", 50, 100.0, 40.0, status=429, at=4.0, took=1.0),  # not a success
              _acc("4", 200, 250.0, 300.0, at=6.0, took=1.0)]  # fmt: skip
    tenant_of = {"1": "a", "2": "a", "3": "a", "4": "a"}
    e = estimator_accuracy(access, tenant_of, ALL)["all"]
    assert e["n"] == 3
    assert e["mae"] == pytest.approx((50 + 150 + 50) / 3)
    assert e["p90_coverage"] == pytest.approx(2 / 3)
    assert e["tenants"]["a"]["n"] == 3 and e["tau_within"] == e["tau"]
    # per-tenant mean: the prior 256, then 100, then (100 + 300) / 2
    assert e["baselines"][TENANT_MEAN]["mae"] == pytest.approx((156 + 200 + 0) / 3)
    assert e["tau"] is not None and e["baselines"][TENANT_MEAN]["tau"] is not None


def test_estimator_baseline_sees_only_completions_finished_before_the_arrival() -> None:
    # "1" arrives at 0 and finishes at 6; "2" arrives at 5, while "1" still runs, and is
    # logged after it (completion order: 1, 2). Fed in completion order, the baseline of
    # "2" would have learnt 1's 1000 tokens; as of 2's arrival it knows nothing: the prior.
    access = [_acc("1", 1000, 500.0, at=0.0, took=6.0), _acc("2", 100, 500.0, at=5.0, took=5.0),
              _acc("3", 10, 500.0, at=10.0, took=1.0)]  # fmt: skip
    tenant_of = {"1": "a", "2": "a", "3": "a"}
    scopes = {"two": lambda rid: rid == "2", "three": lambda rid: rid == "3"}
    e = estimator_accuracy(access, tenant_of, scopes)
    two = e["two"]["baselines"]
    for name in (TENANT_MEAN, "per-tenant EWMA (a=0.1)", "StatisticRegressor(Mean) = global mean"):
        assert two[name]["mae"] == pytest.approx(256 - 100), name
    # "2" finished at exactly 10, when "3" arrived: not seen either (strictly before)
    assert e["three"]["baselines"][TENANT_MEAN]["mae"] == pytest.approx(1000 - 10)


def test_estimator_global_mean_ewma_and_max_tokens_by_hand() -> None:
    # tenants a and b alternate, each request done before the next arrives
    access = [_acc("1", 100, 1.0, at=0.0, took=0.5),
              _acc("2", 400, 2.0, at=1.0, took=0.5, cap=500),
              _acc("3", 200, 3.0, at=2.0, took=0.5),
              _acc("4", 50, 4.0, at=3.0, took=0.5, cap=64)]  # fmt: skip
    tenant_of = {"1": "a", "2": "b", "3": "a", "4": "b"}
    e = estimator_accuracy(access, tenant_of, ALL)["all"]["baselines"]
    g = e["StatisticRegressor(Mean) = global mean"]
    # global mean: 256, 100, 250, 233.3
    assert g["mae"] == pytest.approx((156 + 300 + 50 + (700 / 3 - 50)) / 4)
    w = e["per-tenant EWMA (a=0.1)"]
    # a: 256, then 100 (the first sets it); b: 256, then 400
    assert w["tenants"]["a"]["mae"] == pytest.approx((156 + 100) / 2)
    assert w["tenants"]["b"]["mae"] == pytest.approx((144 + 350) / 2)
    m = e["max_tokens"]
    assert m["n"] == 2 and m["mae"] == pytest.approx((100 + 14) / 2)
    assert m["tenants"] == {"b": {"n": 2, "mae": pytest.approx(57.0), "tau": 1.0}}


def test_estimator_falls_back_to_the_client_times() -> None:
    # an access log without arrival times: the client's dispatch and done times order them
    access = [_acc("1", 1000, 500.0), _acc("2", 100, 500.0)]
    client = {"1": (0.0, 6.0), "2": (5.0, 10.0)}
    e = estimator_accuracy(access, {"1": "a", "2": "a"}, {"two": lambda r: r == "2"}, client)
    assert e["two"]["baselines"][TENANT_MEAN]["mae"] == pytest.approx(156.0)
    assert estimator_accuracy(access, {"1": "a", "2": "a"}, ALL)["all"] == {"n": 0}


def test_estimator_accuracy_filter_still_feeds_the_baseline() -> None:
    access = [_acc("1", 100, 150.0, at=0.0, took=1.0), _acc("2", 300, 150.0, at=2.0, took=1.0)]
    e = estimator_accuracy(access, {"1": "a", "2": "a"}, {"2": lambda rid: rid == "2"})["2"]
    assert e["n"] == 1 and e["baselines"][TENANT_MEAN]["mae"] == pytest.approx(200.0)
    assert e["tau"] is None  # one point: no rank correlation


def test_estimator_accuracy_nothing_to_score() -> None:
    assert estimator_accuracy([], {}, ALL) == {"all": {"n": 0}}
    one = [_acc("1", 10, None, at=0.0, took=1.0)]
    assert estimator_accuracy(one, {"1": "a"}, ALL) == {"all": {"n": 0}}


def test_queue_times() -> None:
    access = [Access("1", 200, 5, None, None, 0.5, 2.0),
              Access("2", 503, None, None, None, None, 30.0),  # shed from the queue
              Access("3", 429, None, None, None, None, 0.01)]  # fmt: skip
    assert queue_times(access) == {"1": 0.5, "2": 30.0}


# -- compute ---------------------------------------------------------------------------------
def test_compute_one_run() -> None:
    reqs = [
        make_req("acme", "premium", at=0.0, ttft=0.2, decode=1.0, out=11),
        make_req("acme", "premium", at=1.0, ttft=2.0, decode=1.0, out=11),  # TTFT miss
        make_req("globex", "standard", at=0.5, ttft=0.5, decode=2.0, out=21),
        failed("initech", "standard", at=2.0),
    ]
    run = make_run(reqs, weights={"acme": 2.0},
                   engines=[{"sim:busy_seconds_total": 3.0}, {"sim:busy_seconds_total": 1.0}])  # fmt: skip
    m = compute(run, {"duration_s": 4.0})
    assert m["makespan_s"] == pytest.approx(4.0)  # 0 -> 1 + 2 + 1
    assert m["all"]["attainment"] == 0.5 and m["classes"]["premium"]["attainment"] == 0.5
    assert m["classes"]["standard"]["attainment"] == 0.5
    assert m["all"]["output_tokens"] == 43
    assert m["engine_busy_share"] == pytest.approx(4 / 8)
    assert m["class_levels"] == {"premium": 0, "standard": 1}
    std = m["fairness"]["classes"]["standard"]
    assert std["tenants"] == 2
    assert std["attainment_jain"] == pytest.approx(0.5)  # globex 1.0, initech 0.0
    assert std["attainment_min"] == 0.0 and std["attainment_min_tenant"] == "initech"
    assert m["fairness"]["classes"]["premium"]["attainment_jain"] == 1.0  # one tenant
    assert m["fairness"]["all"]["attainment_jain"] == pytest.approx(1.5**2 / (3 * 1.25))
    assert m["drift"] == [] and m["estimator"]["all"] == {"n": 0}


def test_compute_without_requests() -> None:
    m = compute(make_run([]), {"duration_s": 10.0})
    assert m["makespan_s"] == 0.0 and m["all"]["n"] == 0 and m["all"]["attainment"] is None
    assert m["classes"] == {} and m["fairness"]["all"]["jain"] is None
    assert m["engine_busy_share"] is None

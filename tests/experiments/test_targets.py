"""experiments.targets and experiments.summary: PASS/MISS with margins on hand-made
summaries, the mean and worst over seeds, and summary.json's tables."""

from __future__ import annotations

import json
from typing import Any

import pytest

from experiments.metrics import compute
from experiments.report import _estimator_table
from experiments.rundata import Access
from experiments.summary import (
    ESTIMATOR_COLUMNS,
    combine,
    document,
    estimator_rows,
    pick,
    read_table,
    summarize,
    summarize_policy,
)
from experiments.targets import over_seeds, targets, top_class
from tests.experiments.builders import failed, make_req, make_run

CLASSES = ["premium", "standard", "batch"]


def _summary(ds_premium: float | None = 0.995, fc_premium: float | None = 0.5,
             ds_tok: float = 1000.0, fc_tok: float = 1000.0, ds_goodput: float = 10.0,
             fc_failed: int = 0, **ds_all: Any) -> dict[str, Any]:  # fmt: skip
    def policy(att: float | None, tok: float, goodput: float, failed: int) -> dict[str, Any]:
        return {
            "premium": {"attainment": att, "tenants": 1, "service_jain": 1.0},
            "standard": {"attainment": 0.9, "attainment_min": 0.5, "tenants": 2,
                         "service_jain": 0.97},
            "batch": {"attainment": 0.5, "tenants": 1, "service_jain": None},
            "all": {
                "n": 100,
                "failed": failed,
                "goodput_req_s": goodput,
                "throughput_tok_s": tok / 100,
                "throughput_window_tok_s": tok / 90,
                "output_tokens": tok,
            },
        }

    ds = policy(ds_premium, ds_tok, ds_goodput, 0)
    fc = policy(fc_premium, fc_tok, 8.0, fc_failed)
    pr = policy(0.9, fc_tok, 9.0, 0)  # the best baseline by goodput
    ablation = policy(0.9, fc_tok, 99.0, 0)  # an ablation of ours: not a baseline
    ds["all"].update(ds_all)
    return {"fcfs": fc, "priority": pr, "driftsched": ds, "driftsched-no-governor": ablation}


def _by_name(ts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in ts}


def test_top_class() -> None:
    assert top_class(["gold", "premium"]) == "premium"
    assert top_class(["gold", "silver"]) == "gold"
    assert top_class([]) == ""


def test_targets_pass_and_miss_with_margins() -> None:
    ts = _by_name(targets(_summary(ds_premium=0.985, fc_premium=0.70, ds_tok=960.0), CLASSES,
                          drift=False))  # fmt: skip
    t = ts["premium attainment, driftsched"]
    assert t["verdict"] == "MISS" and t["margin"] == pytest.approx(-0.005)
    t = ts["goodput driftsched / best baseline"]  # priority's 9, not the ablation's 99
    assert t["value"] == pytest.approx(10 / 9) and t["margin"] == pytest.approx(10 / 9 - 1)
    assert "best: priority" in t["threshold"] and "overloaded" not in t["threshold"]
    t = ts["output tokens served driftsched / fcfs"]
    assert t["value"] == pytest.approx(0.96) and t["margin"] == pytest.approx(-0.01)
    t = ts["lowest tenant's attainment / class mean within standard, driftsched"]
    assert t["value"] == pytest.approx(0.5 / 0.9) and t["verdict"] == "PASS"
    t = ts["(context) premium attainment, fcfs"]  # exactly on the threshold passes
    assert t["verdict"] == "PASS" and t["margin"] == pytest.approx(0.0, abs=1e-12)
    assert ts["(context) fair-share Jain within standard, driftsched"]["margin"] == \
        pytest.approx(0.02)
    # a class of one tenant has no within-class targets
    assert not any("within premium" in k or "within batch" in k for k in ts)
    assert not any("drift onset" in k for k in ts)


def test_an_overloaded_run_wants_more_goodput() -> None:
    # fcfs failing 6 % of the requests: overloaded, goodput must be 1.15x the best baseline
    t = _by_name(targets(_summary(fc_failed=6), CLASSES, drift=False))[
        "goodput driftsched / best baseline"]
    assert t["verdict"] == "MISS" and t["margin"] == pytest.approx(10 / 9 - 1.15)
    assert "overloaded" in t["threshold"] and "fcfs fails 6%" in t["threshold"]
    t = _by_name(targets(_summary(fc_failed=6, ds_goodput=10.5), CLASSES, drift=False))[
        "goodput driftsched / best baseline"]
    assert t["verdict"] == "PASS"


def test_targets_without_a_baseline_are_not_applicable() -> None:
    s = _summary()
    for name in ("fcfs", "priority"):
        del s[name]
    ts = _by_name(targets(s, CLASSES, drift=False))
    assert ts["(context) premium attainment, fcfs"]["verdict"] == "n/a"
    assert ts["output tokens served driftsched / fcfs"]["verdict"] == "n/a"
    assert ts["goodput driftsched / best baseline"]["verdict"] == "n/a"
    assert ts["premium attainment, driftsched"]["verdict"] == "PASS"
    zero = _by_name(targets(_summary(fc_tok=0.0), CLASSES, drift=False))
    assert zero["output tokens served driftsched / fcfs"]["verdict"] == "n/a"
    assert targets({}, [], drift=False)[0]["verdict"] == "n/a"


@pytest.mark.parametrize(
    ("recovered", "seconds", "verdict", "margin"),
    [
        (1.0, 12.0, "PASS", 18.0),
        (1.0, 31.0, "MISS", -1.0),
        (0.0, None, "MISS", -1.0),  # never recovered
        (0.5, 10.0, "MISS", -1.0),  # the mean of two seeds, one never recovered
        (None, None, "n/a", None),  # no rolling samples after the onset: nothing to judge
    ],
)
def test_drift_recovery_target(
    recovered: float | None, seconds: float | None, verdict: str, margin: float | None
) -> None:
    s = _summary(drift_recovered=recovered, drift_recovery_s=seconds)
    (t,) = [t for t in targets(s, CLASSES, drift=True) if "drift onset" in t["target"]]
    assert t["verdict"] == verdict and t["margin"] == (
        None if margin is None else pytest.approx(margin)
    )
    if recovered is not None and recovered < 1:
        assert t["value"] is None  # the report says "never recovered"


def test_over_seeds() -> None:
    seeds = {0: _summary(ds_premium=1.0), 1: _summary(ds_premium=0.99),
             2: _summary(ds_premium=None)}  # fmt: skip
    mean = pick(combine(list(seeds.values())), "mean")
    assert mean["driftsched"]["premium"]["attainment"] == pytest.approx(0.995)
    ts = over_seeds(targets(mean, CLASSES, False),
                    {k: targets(v, CLASSES, False) for k, v in seeds.items()})  # fmt: skip
    t = _by_name(ts)["premium attainment, driftsched"]
    assert t["verdict"] == "PASS" and t["margin"] == pytest.approx(0.005)
    assert t["worst_margin"] == pytest.approx(0.0) and t["seeds_passed"] == "2/3"
    assert t["seed_margins"][2] is None


# -- summary -----------------------------------------------------------------------------
def test_combine_mean_worst_and_missing_values() -> None:
    a = {"p": {"all": {"attainment": 0.8, "ttft_p99": 2.0, "engine_busy_share": None}}}
    b = {"p": {"all": {"attainment": 0.6, "ttft_p99": 3.0, "engine_busy_share": None}},
         "q": {"all": {"attainment": 1.0}}}  # fmt: skip
    c = combine([a, b])
    att = c["p"]["all"]["attainment"]
    assert att["mean"] == pytest.approx(0.7) and att["worst"] == 0.6 and att["seeds"] == [0.8, 0.6]
    assert c["p"]["all"]["ttft_p99"]["worst"] == 3.0  # lower is better: the highest
    assert c["p"]["all"]["engine_busy_share"] == {"mean": None, "worst": None,
                                                  "seeds": [None, None]}  # fmt: skip
    # q ran in one seed only: its numbers are that seed's
    assert c["q"]["all"]["attainment"] == {"mean": 1.0, "worst": 1.0, "seeds": [None, 1.0]}
    assert pick(c, "worst")["p"]["all"]["attainment"] == 0.6


def _metrics() -> dict[str, Any]:
    reqs = [make_req("acme", "premium", at=0.0, ttft=0.2, decode=1.0, out=11),
            make_req("globex", "standard", at=0.5, ttft=0.5, decode=2.0, out=21),
            failed("initech", "standard", at=2.0)]  # fmt: skip
    run = make_run(reqs, engines=[{"sim:busy_seconds_total": 1.0}])
    return {"fcfs": compute(run, {"duration_s": 3.0})}


def test_summarize_policy_takes_compute_s_numbers() -> None:
    m = _metrics()["fcfs"]
    s = summarize_policy(m)
    assert set(s) == {"premium", "standard", "all"}
    assert s["standard"]["attainment"] == 0.5 and s["standard"]["failed"] == 1
    assert s["standard"]["tenants"] == 2 and s["standard"]["attainment_jain"] == 0.5
    assert s["all"]["output_tokens"] == 32 and s["all"]["makespan_s"] == m["makespan_s"]
    assert s["all"]["engine_busy_share"] == pytest.approx(1.0 / m["makespan_s"])
    assert s["all"]["drift_recovered"] is None  # no drift event
    assert "makespan_s" not in s["premium"]


def test_summary_document_round_trip_and_size() -> None:
    s = summarize(_metrics())
    one = json.loads(json.dumps(document({"scenario": "x"}, ["premium", "standard"], {4: s}, [])))
    assert one["seeds"] == [4] and "mean" not in one
    back = read_table(one)
    assert back["fcfs"]["standard"]["attainment"] == 0.5
    assert back["fcfs"]["all"]["engine_busy_share"] == pytest.approx(
        s["fcfs"]["all"]["engine_busy_share"], rel=1e-3
    )
    several = document({"scenario": "x"}, ["premium", "standard"], {0: s, 1: s}, [])
    assert read_table(several, "worst") == read_table(several, "mean")
    assert read_table(several, "1")["fcfs"]["all"]["attainment"] == pytest.approx(2 / 3, rel=1e-3)
    with pytest.raises(KeyError):
        read_table(several, "7")
    assert len(json.dumps(several, separators=(",", ":"))) < 2000


def _estimator_metrics() -> dict[str, Any]:
    """A run whose access log has predictions (no arrival times: the client's are used)."""
    reqs = [make_req("acme", "premium", at=0.0, ttft=0.2, decode=1.0, out=11),
            make_req("acme", "premium", at=2.0, ttft=0.2, decode=1.0, out=30),
            make_req("globex", "standard", at=2.5, ttft=0.5, decode=2.0, out=21),
            make_req("globex", "standard", at=6.0, ttft=0.5, decode=2.0, out=5)]  # fmt: skip
    caps = {reqs[2].request_id: 64, reqs[3].request_id: 64}
    access = [Access(r.request_id, 200, r.completion_tokens, float(10 * i + 5), None, None, None,
                     max_tokens=caps.get(r.request_id)) for i, r in enumerate(reqs)]  # fmt: skip
    return {"fcfs": compute(make_run(reqs, access=access), {"duration_s": 8.0})}


def test_estimator_rows_in_the_summary_and_table_in_the_report() -> None:
    metrics = _estimator_metrics()
    rows = estimator_rows(metrics)
    cols = list(ESTIMATOR_COLUMNS)
    by_scope = {r[1]: dict(zip(cols, r, strict=True)) for r in rows}
    assert list(by_scope) == ["all", "within", "tenant:acme", "tenant:globex"]
    a = by_scope["all"]
    assert a["n"] == 4 and a["max_tokens_n"] == 2 and a["gateway_tau"] is not None
    # the per-tenant mean: acme 256 then 11; globex 256 then 21
    assert a["tenant_mean_mae"] == pytest.approx((245 + 19 + 235 + 16) / 4, rel=1e-3)
    assert by_scope["within"]["gateway_mae"] is None
    assert by_scope["tenant:globex"]["max_tokens_mae"] == pytest.approx((43 + 59) / 2, rel=1e-3)
    assert [r[1] for r in estimator_rows(metrics, tenants=False)] == ["all", "within"]
    doc = document({"scenario": "x"}, ["premium", "standard"], {0: summarize(metrics)}, [],
                   {0: rows})  # fmt: skip
    assert doc["columns"]["estimator"] == cols and doc["estimator"]["0"] == rows
    table = "\n".join(_estimator_table(metrics["fcfs"]))
    for needle in ("| all | 4 |", "| within tenant (tau) |", "| tenant globex | 2 |",
                   "per-tenant EWMA (a=0.1)", "max_tokens (n)", "(2) |"):  # fmt: skip
        assert needle in table, needle

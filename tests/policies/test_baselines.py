"""policies.baselines: the baselines by hand, the as-of-arrival rule, scoring and the
offline evaluation's use of them."""

from __future__ import annotations

import pytest

from policies import estimator_eval
from policies.baselines import (
    GLOBAL_MEAN,
    MAX_TOKENS,
    PRIOR_TOKENS,
    TENANT_EWMA,
    TENANT_MEAN,
    GlobalMean,
    Item,
    MaxTokens,
    TenantMean,
    as_of_arrival,
    prequential,
    score,
    tau_b,
)
from policies.ewma import TenantEWMA


def _x(tenant: str = "a", cap: int | None = None) -> dict[str, object]:
    return {"tenant": tenant, "max_tokens": cap}


def test_global_mean_and_tenant_mean_by_hand() -> None:
    g, t = GlobalMean(), TenantMean()
    assert g.predict_one(_x()) == t.predict_one(_x()) == PRIOR_TOKENS
    for tenant, y in (("a", 100.0), ("b", 400.0), ("a", 200.0)):
        g.learn_one(_x(tenant), y)
        t.learn_one(_x(tenant), y)
    assert g.predict_one(_x("c")) == pytest.approx(700 / 3)
    assert t.predict_one(_x("a")) == pytest.approx(150.0)
    assert t.predict_one(_x("b")) == 400.0 and t.predict_one(_x("c")) == PRIOR_TOKENS


def test_tenant_ewma_by_hand() -> None:
    w = TenantEWMA(alpha=0.1)
    assert w.predict_one(_x()) == PRIOR_TOKENS
    for y in (100.0, 200.0, 50.0):
        w.learn_one(_x(), y)
    # 100 (the first sets it), 100 + 0.1 x 100 = 110, 110 + 0.1 x (50 - 110) = 104
    assert w.predict_one(_x()) == pytest.approx(104.0)
    assert w.predict_one(_x("b")) == PRIOR_TOKENS


def test_max_tokens_predicts_only_a_cap() -> None:
    m = MaxTokens()
    assert m.predict_one(_x(cap=512)) == 512.0 and m.predict_one(_x()) is None


def test_as_of_arrival_sees_only_what_finished_before() -> None:
    items = [
        Item(_x(), 1000.0, arrival=0.0, finish=6.0),
        Item(_x(), 100.0, arrival=5.0, finish=10.0),  # 0 still runs: not seen
        Item(_x(), 10.0, arrival=10.0, finish=11.0),  # 1 ends at its arrival: not seen
        Item(_x(), 10.0, arrival=10.5, finish=12.0),
    ]
    p = as_of_arrival(items)
    assert p[TENANT_MEAN] == [PRIOR_TOKENS, PRIOR_TOKENS, 1000.0, 550.0]
    assert p[GLOBAL_MEAN] == [PRIOR_TOKENS, PRIOR_TOKENS, 1000.0, 550.0]
    # learned in finish order, not list order: 1000 at 6, then 100 at 10
    assert p[TENANT_EWMA] == [PRIOR_TOKENS, PRIOR_TOKENS, 1000.0, pytest.approx(910.0)]
    assert p[MAX_TOKENS] == [None] * 4


def test_prequential_predicts_each_row_before_learning_it() -> None:
    p = prequential([_x("a"), _x("b", 64), _x("a")], [100.0, 50.0, 300.0])
    assert p[TENANT_MEAN] == [PRIOR_TOKENS, PRIOR_TOKENS, 100.0]
    assert p[GLOBAL_MEAN] == [PRIOR_TOKENS, 100.0, 75.0]
    assert p[MAX_TOKENS] == [None, 64.0, None]


def test_score_within_tenant_tau_is_weighted_by_n() -> None:
    pred = [1.0, 2.0, 3.0, 1.0, 2.0, 5.0, 5.0, None]
    act = [1.0, 2.0, 3.0, 2.0, 1.0, 1.0, 2.0, 9.0]
    tenants = ["a", "a", "a", "b", "b", "c", "c", "c"]
    s = score(pred, act, tenants)
    assert s["n"] == 7  # the None is not scored
    assert s["tenants"]["a"] == {"n": 3, "mae": 0.0, "tau": 1.0}
    assert s["tenants"]["b"]["tau"] == -1.0
    assert s["tenants"]["c"]["tau"] is None and s["tenants"]["c"]["mae"] == 3.5
    # c's tau is undefined (a constant prediction): (3 x 1 + 2 x -1) / 5
    assert s["tau_within"] == pytest.approx(0.2)
    assert s["mae"] == pytest.approx((0 + 0 + 0 + 1 + 1 + 4 + 3) / 7)


def test_score_without_predictions() -> None:
    s = score([None, None], [1.0, 2.0], ["a", "a"])
    assert s == {"n": 0, "mae": None, "tau": None, "tau_within": None, "tenants": {}}
    assert tau_b([1.0], [1.0]) is None and tau_b([1.0, 1.0], [1.0, 2.0]) is None


def test_offline_eval_scores_the_shared_baselines() -> None:
    rows = [estimator_eval.Row(_x(t, cap), y, t, False)
            for t, cap, y in (("a", None, 100.0), ("b", 64, 50.0), ("a", None, 300.0),
                              ("b", 64, 60.0))]  # fmt: skip
    res = estimator_eval.result(MAX_TOKENS, prequential([r.x for r in rows], [r.y for r in rows])
                                [MAX_TOKENS], rows, "tenants")  # fmt: skip
    assert res["n"] == 2 and res["mae"] == pytest.approx((14 + 4) / 2)
    mean = estimator_eval.result(TENANT_MEAN, [256.0, 256.0, 100.0, 50.0], rows, "tenants")
    assert mean["n"] == 4 and mean["tenants"]["a"]["mae"] == pytest.approx((156 + 200) / 2)

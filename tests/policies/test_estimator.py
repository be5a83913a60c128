"""Output-token estimator: docstring examples, learning, drift, persistence, cost, eval CLI."""

from __future__ import annotations

import doctest
import json
import math
import pickle
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import policies.estimator as estimator_module
import policies.features as features_module
from policies import estimator_eval
from policies.estimator import Estimate, OutputTokenEstimator
from policies.ewma import TenantEWMA
from policies.features import RequestFeatures, prompt_text

# tenant -> median output tokens; prompts asking for "brief" halve it, "detailed" doubles it
LEVELS = {"chat": 60.0, "support": 250.0, "writer": 900.0}
STYLES = {"brief": 0.5, "plain": 1.0, "detailed": 2.0}
TOPICS = ["tides", "compilers", "tax law", "sourdough", "orbits", "jazz", "databases"]


def make_requests(
    n: int,
    seed: int = 0,
    shift: tuple[str, int, float] | None = None,
) -> list[tuple[dict[str, Any], float]]:
    """``n`` (features, actual tokens) pairs from a seeded tenant mix with lognormal noise.

    ``shift=(tenant, at, factor)``: that tenant's lengths are multiplied by ``factor`` from
    request ``at`` on.
    """
    rng = random.Random(seed)
    fx = RequestFeatures()
    out = []
    for i in range(n):
        tenant = rng.choice(list(LEVELS))
        style = rng.choice(list(STYLES))
        prompt = f"please give a {style} answer about {rng.choice(TOPICS)}"
        y = LEVELS[tenant] * STYLES[style] * math.exp(rng.gauss(0.0, 0.4))
        if shift is not None and tenant == shift[0] and i >= shift[1]:
            y *= shift[2]
        req = {"prompt": prompt, "prompt_tokens": len(prompt) // 4, "tenant": tenant}
        out.append((fx.transform_one(req), float(round(y))))
    return out


def prequential(model: Any, stream: list[tuple[dict[str, Any], float]]) -> list[float]:
    preds = []
    for x, y in stream:
        preds.append(model.predict_one(x))
        model.learn_one(x, y)
    return preds


def mae(p: list[float], y: list[float]) -> float:
    return statistics.fmean(abs(a - b) for a, b in zip(p, y, strict=True))


@pytest.mark.parametrize("module", [estimator_module, features_module])
def test_docstring_examples(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_prior_before_learning_and_unknown_tenant() -> None:
    est = OutputTokenEstimator(prior_tokens=300)
    x = RequestFeatures().transform_one({"prompt": "hi", "prompt_tokens": 1, "tenant": "new"})
    assert est.predict_one(x) == pytest.approx(300)
    assert est.ratio("new") == 1.0
    assert not est.drift_detected("new")
    assert est.drift_state("new").completions == 0


def test_deterministic() -> None:
    stream = make_requests(600, seed=3)
    a = prequential(OutputTokenEstimator(), stream)
    b = prequential(OutputTokenEstimator(), stream)
    assert a == b
    fx1, fx2 = RequestFeatures(), RequestFeatures(cache_size=1)
    req = {"prompt": "Explain the tides, please. Explain!", "prompt_tokens": 9}
    assert fx1.transform_one(req) == fx2.transform_one(req) == fx2.transform_one(req)


def test_features_survive_json() -> None:
    """Completion events may travel as JSON (a Redis Stream): same dict, same estimate."""
    est = OutputTokenEstimator()
    prequential(est, make_requests(300, seed=8))
    req = {
        "prompt": "a detailed answer",
        "prompt_tokens": 4,
        "tenant": "chat",
        "model": "m",
        "n_messages": 3,
        "max_tokens": 512,
    }
    x = RequestFeatures().transform_one(req)
    y = json.loads(json.dumps(x))
    assert y == x
    assert est.estimate_one(y) == est.estimate_one(x)


def test_learning_beats_prior_and_tenant_ewma() -> None:
    stream = make_requests(3000, seed=1)
    ys = [y for _, y in stream]
    late = slice(1000, None)
    est = prequential(OutputTokenEstimator(), stream)
    ewma = prequential(TenantEWMA(), stream)
    assert mae(est[late], ys[late]) < 0.8 * mae([256.0] * len(ys[late]), ys[late])
    assert mae(est[late], ys[late]) < mae(ewma[late], ys[late])
    y = np.array(ys[late])
    assert estimator_eval.tau(np.array(est[late]), y) > estimator_eval.tau(np.array(ewma[late]), y)


def test_quantiles_ordered_calibrated_and_capped() -> None:
    stream = make_requests(3000, seed=2)
    est = OutputTokenEstimator(quantile=0.9)
    covered = 0
    for x, y in stream[:2000]:
        est.learn_one(x, y)
    for x, y in stream[2000:]:
        e = est.estimate_one(x)
        assert e.p50 <= e.p90
        covered += y <= e.p90
    assert 0.8 <= covered / 1000 <= 0.97
    x = dict(stream[0][0], max_tokens=16.0)
    assert est.estimate_one(x) == Estimate(16.0, 16.0)


def test_shift_reconverges_within_200_and_is_detected() -> None:
    shift_at = 3000
    stream = make_requests(3000 + 3 * 600, seed=4, shift=("support", shift_at, 4.0))
    est = OutputTokenEstimator()
    log_err: list[float] = []  # log((1+y)/(1+p50)) of the shifted tenant after the shift
    detected_after = None
    before: dict[str, int] = {}
    for i, (x, y) in enumerate(stream):
        if i == shift_at:
            before = {t: est.drift_state(t).detections for t in LEVELS}
        p = est.predict_one(x)
        est.learn_one(x, y)
        if x["tenant"] == "support" and i >= shift_at:
            log_err.append(math.log1p(y) - math.log1p(p))
            if detected_after is None and est.drift_detected("support"):
                detected_after = len(log_err)
                assert est.ratio("support") > 1.5
    assert detected_after is not None and detected_after <= 100
    # the 50 completions after the 200th post-shift one are unbiased again (within ~20%)
    assert abs(statistics.median(log_err[200:250])) < 0.2
    # the shift does not raise alarms on the other tenants
    assert est.drift_state("chat").detections == before["chat"]
    assert est.drift_state("writer").detections == before["writer"]


def test_dump_load_round_trip(tmp_path: Path) -> None:
    stream = make_requests(800, seed=5)
    est = OutputTokenEstimator()
    prequential(est, stream[:500])
    path = tmp_path / "sub" / "estimator.pkl"
    est.dump(path)
    assert [p.name for p in path.parent.iterdir()] == ["estimator.pkl"]  # no temp left over
    restored = OutputTokenEstimator.load(path)
    assert prequential(restored, stream[500:]) == prequential(est, stream[500:])
    assert restored.tenants() == est.tenants()
    assert OutputTokenEstimator.loads(est.dumps()).predict_one(stream[0][0]) == est.predict_one(
        stream[0][0]
    )


def test_load_rejects_foreign_pickles(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"format": 999}))
    with pytest.raises(ValueError, match="format"):
        OutputTokenEstimator.load(path)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        OutputTokenEstimator(quantile=1.0)
    with pytest.raises(ValueError):
        OutputTokenEstimator().learn_one({"tenant": "a"}, -1)
    with pytest.raises(ValueError):
        OutputTokenEstimator().learn_one({"tenant": "a"}, float("nan"))
    with pytest.raises(ValueError):
        RequestFeatures(n_buckets=1000)


def test_prompt_text_takes_last_user_message() -> None:
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    assert prompt_text(msgs) == "second"
    assert prompt_text([{"role": "system", "content": "x"}]) == ""


def test_prediction_cost_budget() -> None:
    """Generous bounds (CPU time, so other processes do not count): p50 < 200 µs."""
    stream = make_requests(1500, seed=6)
    est = OutputTokenEstimator()
    prequential(est, stream[:1000])
    fx = RequestFeatures()
    long_prompt = " ".join(f"word{i} and more text" for i in range(400))
    feat_ns, pred_ns = [], []
    for i, (x, _) in enumerate(stream[1000:]):
        req = {
            "prompt": long_prompt if i % 10 == 0 else "write a short poem about the sea",
            "prompt_tokens": 50,
            "tenant": x["tenant"],
        }
        t0 = time.thread_time_ns()
        fx.transform_one(req)
        t1 = time.thread_time_ns()
        est.estimate_one(x)
        pred_ns.append(time.thread_time_ns() - t1)
        feat_ns.append(t1 - t0)
    assert statistics.median(pred_ns) / 1e3 < 200
    assert statistics.median(feat_ns) / 1e3 < 200


def test_eval_command_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    if not estimator_eval.DEFAULT_DATA.exists():
        pytest.skip(f"{estimator_eval.DEFAULT_DATA} not present")
    assert estimator_eval.main(["--limit", "500", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for needle in [
        "## sharegpt: 500 rows",
        "## tenants: 500 rows",
        "driftsched estimator",
        "per-tenant EWMA",
        "StatisticRegressor(Mean)",
        "max_tokens",
        "| MAE |",
        "request path",
    ]:
        assert needle in out


def test_eval_help() -> None:
    with pytest.raises(SystemExit) as exc:
        estimator_eval.main(["--help"])
    assert exc.value.code == 0

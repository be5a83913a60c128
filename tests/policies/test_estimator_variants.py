"""The ablation estimators (:mod:`policies.estimator_variants`) and how the gateway picks one
(:mod:`proxy.estimation`): their predictions, that the real estimator never learns from the
oracle's feature, and that a dump is restored only as the kind that wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.errors import InvalidRequest
from policies.estimator import Estimate, OutputTokenEstimator
from policies.estimator_variants import ORACLE_FEATURE, OracleEstimator, TenantMeanEstimator
from policies.features import RequestFeatures
from proxy.config import EstimatorConfig
from proxy.estimation import KINDS, load_estimator, with_oracle_length
from proxy.requests import parse_request

FX = RequestFeatures()


def feats(tenant: str = "acme", prompt: str = "write a story", max_tokens: int | None = None,
          oracle: int | None = None) -> dict[str, float | str]:  # fmt: skip
    return FX.transform_one({"prompt": prompt, "prompt_tokens": 5, "tenant": tenant,
                             "max_tokens": max_tokens, ORACLE_FEATURE: oracle})  # fmt: skip


def test_the_oracle_predicts_the_true_length_clipped_to_max_tokens() -> None:
    est = OracleEstimator()
    assert est.estimate_one(feats(oracle=321)) == Estimate(321.0, 321.0)
    assert est.estimate_one(feats(oracle=321, max_tokens=100)) == Estimate(100.0, 100.0)
    assert est.estimate_one(feats(oracle=0)) == Estimate(1.0, 1.0)  # an engine emits one
    assert (est.hits, est.misses) == (3, 0)


def test_the_oracle_without_a_length_falls_back_to_the_river_estimate_and_counts_it() -> None:
    est, river = OracleEstimator(), OutputTokenEstimator()
    for y in (50, 60, 70, 80):
        est.learn_one(feats(), y)
        river.learn_one(feats(), y)
    assert est.estimate_one(feats()) == river.estimate_one(feats())
    assert (est.hits, est.misses) == (0, 1)


def test_the_river_estimator_never_learns_from_the_oracle_feature() -> None:
    with_truth, without = OutputTokenEstimator(), OutputTokenEstimator()
    for i, y in enumerate((10, 900, 40, 700, 20, 800) * 20):
        with_truth.learn_one(feats(prompt=f"p {i % 7}", oracle=y), y)
        without.learn_one(feats(prompt=f"p {i % 7}"), y)
    for p in ("p 1", "p 3", "new"):
        assert with_truth.estimate_one(feats(prompt=p, oracle=5)) == without.estimate_one(
            feats(prompt=p))


def test_the_tenant_mean_predicts_the_prior_then_each_tenants_running_mean() -> None:
    est = TenantMeanEstimator(prior_tokens=256.0, quantile=0.9, window=4)
    assert est.estimate_one(feats("acme")) == Estimate(256.0, 256.0)
    for y in (100, 200, 300, 400, 1000):  # the window keeps the last 4 for the p90
        est.learn_one(feats("acme", prompt=f"anything {y}"), y)
    e = est.estimate_one(feats("acme", prompt="whatever the prompt says"))
    assert e.p50 == pytest.approx(400.0)  # the mean of all five
    assert e.p90 == pytest.approx(400 + (1000 - 400) * 0.7)  # 0.9 quantile of 200..1000
    assert est.estimate_one(feats("acme", max_tokens=300)) == Estimate(300.0, 300.0)
    assert est.estimate_one(feats("globex")) == Estimate(256.0, 256.0)  # its own history
    est.learn_one(feats("globex"), 10)
    assert est.estimate_one(feats("globex")) == Estimate(10.0, 10.0)
    assert est.drift_state("acme").completions == 5  # the drift signals still learn


def test_the_tenant_mean_refuses_what_the_estimator_refuses() -> None:
    with pytest.raises(ValueError, match="finite"):
        TenantMeanEstimator().learn_one(feats(), float("nan"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_estimator_builds_the_configured_kind_and_restores_only_that_kind(
    kind: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "est.pkl")
    est = load_estimator(EstimatorConfig(kind=kind, path=path, prior_tokens=100.0))
    assert type(est) is KINDS[kind] and est.prior_tokens == 100.0
    est.learn_one(feats(), 42)
    est.dump(path)
    again = load_estimator(EstimatorConfig(kind=kind, path=path))
    assert type(again) is KINDS[kind] and again.drift_state("acme").completions == 1
    for other in KINDS:
        if other != kind:  # another kind's dump: start cold as the configured kind
            cold = load_estimator(EstimatorConfig(kind=other, path=path))
            assert type(cold) is KINDS[other] and cold.tenants() == []


def test_the_claimed_length_is_parsed_from_the_header_and_refused_when_malformed() -> None:
    req = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    assert req.oracle_output_tokens is None
    assert with_oracle_length(req, None) is req
    assert with_oracle_length(req, b" 123 ").oracle_output_tokens == 123
    for bad in (b"-1", b"1.5", b"abc", b"", str(2**31).encode()):
        with pytest.raises(InvalidRequest, match="x-oracle-output-tokens"):
            with_oracle_length(req, bad)


def test_docstring_examples() -> None:
    import doctest

    import policies.estimator_variants as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0

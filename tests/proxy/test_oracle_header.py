"""The client's claimed output length (``x-oracle-output-tokens``) reaches the estimator only
when the gateway is configured with ``scheduler.estimator.kind: oracle``, through the same
request path as the real estimator's features (a real engine process over loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from policies.estimator import Estimate
from policies.estimator_variants import OracleEstimator
from proxy.config import settings_from_dict
from tests.harness import ADMIN_KEY, GatewayThread, Proc, start_stub

pytestmark = pytest.mark.e2e

KEY = "dsk-oracle00-" + "o" * 40
BODY = {"model": "stub", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc: Proc
    proc, url = start_stub(tmp_path_factory.mktemp("stub"), chunks=4)
    yield url
    proc.stop()


def gateway(stub: str, kind: str) -> GatewayThread:
    return GatewayThread(settings_from_dict({
        "server": {"access_log": False, "auth_cache_ttl_s": 0},
        "admin": {"api_key": ADMIN_KEY},
        "store": {"type": "memory"},
        "upstreams": [{"name": "stub0", "url": stub, "models": ["stub"]}],
        "tenants": [{"name": "t", "api_keys": [KEY]}],
        "scheduler": {"estimator": {"kind": kind}},
    }))  # fmt: skip


def spy(g: GatewayThread) -> list[tuple[dict[str, Any], Estimate]]:
    """Every (features, estimate) the gateway's estimator answers from now on."""
    assert g.app.gateway is not None
    est = g.app.gateway.scheduler.estimator
    seen: list[tuple[dict[str, Any], Estimate]] = []
    real = est.estimate_one

    def estimate_one(x: Any) -> Estimate:
        e = real(x)
        seen.append((dict(x), e))
        return e

    est.estimate_one = estimate_one  # type: ignore[method-assign]
    return seen


def post(g: GatewayThread, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(g.url + "/v1/chat/completions", json=BODY, timeout=10,
                      headers={"authorization": f"Bearer {KEY}", **headers})  # fmt: skip


def test_an_oracle_gateway_predicts_the_claimed_length(stub: str) -> None:
    g = gateway(stub, "oracle")
    try:
        assert g.app.gateway is not None
        est = g.app.gateway.scheduler.estimator
        assert isinstance(est, OracleEstimator)
        seen = spy(g)
        assert post(g, {"x-oracle-output-tokens": "7"}).status_code == 200
        assert post(g, {"x-oracle-output-tokens": "900"}).status_code == 200
        assert post(g, {}).status_code == 200  # no claim: River's estimate, counted
        r = post(g, {"x-oracle-output-tokens": "lots"})
        assert r.status_code == 400 and "x-oracle-output-tokens" in r.text
        assert [e for _, e in seen[:2]] == [Estimate(7.0, 7.0), Estimate(50.0, 50.0)]
        assert seen[0][0]["oracle_output_tokens"] == 7.0
        assert "oracle_output_tokens" not in seen[2][0]
        assert (est.hits, est.misses) == (2, 1)
    finally:
        g.stop()


def test_any_other_gateway_never_reads_the_header(stub: str) -> None:
    g = gateway(stub, "river")
    try:
        seen = spy(g)
        assert post(g, {"x-oracle-output-tokens": "7"}).status_code == 200
        assert post(g, {"x-oracle-output-tokens": "lots"}).status_code == 200
        assert all("oracle_output_tokens" not in x for x, _ in seen) and len(seen) == 2
        assert seen[0][1].p50 == pytest.approx(50.0)  # the prior (256), clipped to max_tokens
    finally:
        g.stop()

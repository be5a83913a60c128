"""One generic suite, run against every policy the registry knows, dispatching through the
production admission core (:class:`tests.policy_builders.CoreQueue`)."""

from __future__ import annotations

import math
import random
from dataclasses import FrozenInstanceError, replace
from typing import Any

import pytest

from policies.base import Policy
from policies.registry import PolicyConfigError, Registry, build_policy, register_builtins
from tests.policy_builders import (
    T0,
    VARIANT_IDS,
    VARIANTS,
    CoreQueue,
    make_policy,
    make_request,
    make_requests,
    make_tenant,
    random_tenant,
)


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def policy(request: pytest.FixtureRequest) -> Policy:
    type_, params = request.param
    return make_policy(type_, params)


def run(policy: Policy, seed: int, n: int = 60) -> list[str]:
    """Enqueue ``n`` random requests, then dispatch everything one at a time (completing
    each with a random true length); the ids in dispatch order."""
    rng = random.Random(seed)
    q = CoreQueue(policy)
    for req in sorted(make_requests(rng, n), key=lambda r: r.arrival):
        q.enqueue(req)
    out = []
    now = T0 + 200
    while got := q.dispatch(now, max_grants=1):
        (req,) = got
        q.complete(req, rng.randrange(2000), now)
        out.append(req.id)
    assert not q.queued
    return out


def test_registry_lists_the_builtins() -> None:
    assert register_builtins().types() == ("driftsched", "fair", "fcfs", "priority")
    assert Registry().types() == ()  # nothing registers itself at import


def test_empty_queue_gives_nothing(policy: Policy) -> None:
    assert CoreQueue(policy).dispatch(T0) == []


def test_deterministic_with_a_seeded_rng(policy: Policy) -> None:
    first = run(policy, seed=7)
    assert first == run(policy, seed=7)
    assert len(set(first)) == len(first) == 60


def test_dispatch_follows_keys_then_enqueue_order(policy: Policy) -> None:
    """The core serves in (key, enqueue order): a strict total order, whatever the
    tenants' flows (duplicated keys on purpose: ties go to the earlier enqueue). In counter
    order (``fair``) the tenants' counters come first: tests/proxy/admission/test_contract.py
    and the fair-share property."""
    if policy.order == "counter":
        pytest.skip("counter order: served by tenant counters, not keys alone")
    rng = random.Random(3)
    q = CoreQueue(policy)
    reqs = sorted(make_requests(rng, 200), key=lambda r: r.arrival)
    reqs += [replace(r, id=r.id + "x") for r in reqs[:20]]
    keys = {r.id: q.enqueue(r) for r in reqs}
    assert all(math.isfinite(k) for k in keys.values())
    enqueued = {r.id: n for n, r in enumerate(reqs)}
    expected = sorted(keys, key=lambda i: (keys[i], enqueued[i]))
    assert [r.id for r in q.dispatch(T0 + 200)] == expected


def test_keys_are_finite_on_extreme_inputs(policy: Policy) -> None:
    tenants = [
        make_tenant("a", drift_ratio=math.inf, virtual_counter=1e18),
        make_tenant("a", drift_ratio=math.nan, virtual_floor=1e18),
        make_tenant("a", boost=True, drift_ratio=0.0),
    ]
    reqs = [
        make_request(0, prompt=0, p50=0.0),
        make_request(1, prompt=10**7, p50=1e9, max_tokens=1, ttft_slo_s=0.0, tpot_slo_s=0.0),
        make_request(2, level=-3, ttft_slo_s=1e9, tpot_slo_s=1e9),
    ]
    for t in tenants:
        for r in reqs:
            assert math.isfinite(policy.ordering.key(r, t, T0))


def test_aging_bound_holds_through_the_core(policy: Policy) -> None:
    bound = policy.ordering.max_overtake_s(0, 2)
    if math.isinf(bound):
        pytest.skip("no aging bound in seconds (fair)")
    rng = random.Random(5)
    for r1 in make_requests(rng, 60):
        for later in make_requests(rng, 3):
            r2 = replace(later, id=later.id + "L", tenant=r1.tenant,
                         arrival=r1.arrival + bound + 0.001)
            q = CoreQueue(policy)
            q.states = {r1.tenant: random_tenant(rng, r1.tenant)}
            q.enqueue(r1)
            q.states = {r1.tenant: random_tenant(rng, r1.tenant)}
            q.enqueue(r2)
            assert [r.id for r in q.dispatch(r2.arrival)] == [r1.id, r2.id]


def test_requests_are_immutable(policy: Policy) -> None:
    req = make_request()
    with pytest.raises(FrozenInstanceError):
        req.arrival = 0.0  # type: ignore[misc]


def test_a_tenant_at_its_limit_does_not_block_others(policy: Policy) -> None:
    q = CoreQueue(policy)
    q.core.set_limits({"a": 1})
    q.enqueue(make_request(0, "a", arrival=T0))
    q.enqueue(make_request(1, "a", arrival=T0 + 0.5))
    q.enqueue(make_request(2, "b", arrival=T0 + 1))
    assert {r.id for r in q.dispatch(T0 + 1)} == {"r00000", "r00002"}
    assert q.dispatch(T0 + 2) == []  # a holds its one slot; its second request keeps its place
    q.complete(make_request(0, "a", arrival=T0), 10, T0 + 2)
    assert [r.id for r in q.dispatch(T0 + 2)] == ["r00001"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "nope"}, "scheduler.policy.type: unknown policy 'nope'"),
        ({"type": "fcfs", "paramters": {}}, "scheduler.policy.paramters: unknown key"),
        ({"type": "priority", "parameters": {"agin_s": 1}}, "parameters.agin_s: unknown"),
        ({"type": "priority", "parameters": {"aging_s": 0}}, "parameters.aging_s: must be"),
        ({"type": "priority", "parameters": {"aging_s": "x"}}, "parameters.aging_s: expected"),
        ({"type": "fair", "parameters": {"queue": "global"}}, "parameters.queue: unknown"),
        ({"type": "driftsched", "parameters": {"drift": {"beta": 2}}}, "drift.beta: must be"),
        ({"type": "driftsched", "parameters": {"drift": {"betta": 1}}}, "drift.betta: unknown"),
        ({"type": "driftsched", "parameters": {"max_boost": 1.5}}, "max_boost: expected an int"),
        ({"type": "driftsched", "parameters": {"drift": 3}}, "parameters.drift: must be a mapping"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message.replace(".", r"\.")):
        build_policy(config)


def test_policy_config_defaults_build() -> None:
    assert build_policy({}).type == "fcfs"
    p = build_policy({"type": "driftsched", "parameters": {"drift": {"overflow": True}}})
    assert p.drift is not None and p.drift.overflow
    # the drift controller off: ``drift: false`` or ``drift: {enabled: false}``; true: defaults
    for off in (False, {"enabled": False}):
        assert build_policy({"type": "driftsched", "parameters": {"drift": off}}).drift is None
    assert build_policy({"type": "driftsched", "parameters": {"drift": True}}).drift is not None
    with pytest.raises(ValueError, match="already registered"):
        register_builtins(register_builtins())

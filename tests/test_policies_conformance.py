"""One generic suite, run against every policy the registry knows (and fair's global queue)."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import FrozenInstanceError, replace
from typing import Any

import pytest

from policies import dispatch
from policies.base import Admit, CapacityView, Entry, Policy, Shed, TenantState, Wait
from policies.registry import PolicyConfigError, Registry, build_policy, register_builtins
from tests.policy_builders import (
    T0,
    VARIANT_IDS,
    VARIANTS,
    enqueue,
    make_policy,
    make_request,
    make_requests,
    make_tenant,
    open_view,
    random_tenant,
)


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def policy(request: pytest.FixtureRequest) -> Policy:
    type_, params = request.param
    return make_policy(type_, params)


def run(policy: Policy, seed: int, n: int = 60) -> list[str]:
    """Enqueue ``n`` random requests, then dispatch everything; the ids in dispatch order."""
    rng = random.Random(seed)
    states: dict[str, TenantState] = {}
    queued: list[Entry] = []
    for req in sorted(make_requests(rng, n), key=lambda r: r.arrival):
        enqueue(policy, req, states, queued)
    out = []
    now = T0 + 10
    while (s := dispatch.step(policy, queued, states, open_view, now)) is not None:
        queued.remove(s.entry)
        req = s.entry.req
        assert isinstance(s.decision, Admit)
        if policy.accounting is not None:
            st = policy.accounting.on_admit(states[req.tenant], req, now)
            st = policy.accounting.on_complete(st, req, rng.randrange(2000), now)
            states[req.tenant] = st
        out.append(req.id)
    assert not queued
    return out


def test_registry_lists_the_builtins() -> None:
    assert register_builtins().types() == ("driftsched", "fair", "fcfs", "priority")
    assert Registry().types() == ()  # nothing registers itself at import


def test_empty_queue_gives_none(policy: Policy) -> None:
    assert dispatch.step(policy, [], {}, open_view, T0) is None
    if policy.selector is not None:
        assert policy.selector.pick({}, T0) is None


def test_deterministic_with_a_seeded_rng(policy: Policy) -> None:
    first = run(policy, seed=7)
    assert first == run(policy, seed=7)
    assert sorted(first) == sorted(run(policy, seed=7))
    assert len(set(first)) == len(first) == 60


def test_order_is_a_strict_total_order(policy: Policy) -> None:
    rng = random.Random(3)
    tenants = {n: random_tenant(rng, n) for n in "abc"}
    reqs = make_requests(rng, 200)
    # duplicated keys on purpose: ties must be broken by arrival, then id
    reqs += [replace(r, id=r.id + "x") for r in reqs[:20]]
    entries = [dispatch.enqueue(policy, r, tenants[r.tenant], T0) for r in reqs]
    assert all(math.isfinite(e.key) for e in entries)
    orders = [dispatch.order(e) for e in entries]
    assert len(set(orders)) == len(orders)  # antisymmetric: no two entries compare equal
    expected = sorted(entries, key=dispatch.order)
    for _ in range(5):  # the order does not depend on the order of the input
        rng.shuffle(entries)
        assert sorted(entries, key=dispatch.order) == expected
    ties = [e for e in expected if e.req.id.endswith("x")]
    for e in ties:
        twin = next(x for x in expected if x.req.id == e.req.id[:-1])
        assert expected.index(twin) < expected.index(e)


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


def test_aging_bound_holds_on_keys(policy: Policy) -> None:
    bound = policy.ordering.max_overtake_s(0, 2)
    if math.isinf(bound):
        pytest.skip("no aging bound in seconds (fair, global queue)")
    rng = random.Random(5)
    for r1 in make_requests(rng, 100):
        for later in make_requests(rng, 5):
            r2 = replace(later, tenant=r1.tenant, arrival=r1.arrival + bound + 0.001)
            e1 = dispatch.enqueue(policy, r1, random_tenant(rng, r1.tenant), T0)
            e2 = dispatch.enqueue(policy, r2, random_tenant(rng, r1.tenant), T0)
            assert dispatch.order(e1) < dispatch.order(e2)


def test_tenant_states_are_independent(policy: Policy) -> None:
    rng = random.Random(11)
    a, b = random_tenant(rng, "a"), random_tenant(rng, "b")
    req = make_request(1, "a", level=0, ttft_slo_s=1.0, tpot_slo_s=0.1)
    key = policy.ordering.key(req, a, T0)
    for _ in range(10):
        b = random_tenant(rng, "b")  # whatever happens to b, a's key is the same
        assert policy.ordering.key(req, a, T0) == key
    if policy.accounting is not None:
        acc = policy.accounting
        states = {"a": a, "b": b}
        snapshot = dict(states)
        for new in (
            acc.on_enqueue(a, req, {"b": b}, T0),
            acc.on_admit(a, req, T0),
            acc.on_cancel(a, req, T0),
            acc.on_complete(a, req, 500, T0),
        ):
            assert new.name == "a"
            assert replace(new, virtual_counter=0.0, queued_charge=0.0) == replace(
                a, virtual_counter=0.0, queued_charge=0.0
            )
        assert states == snapshot and states["b"] is b


def test_inputs_are_not_mutated(policy: Policy) -> None:
    rng = random.Random(13)
    states = {n: random_tenant(rng, n) for n in "abc"}
    entries = [dispatch.enqueue(policy, r, states[r.tenant], T0) for r in make_requests(rng, 30)]
    before_states, before_entries = copy.deepcopy(states), list(entries)
    dispatch.step(policy, entries, states, open_view, T0)
    if policy.selector is not None:
        policy.selector.pick(states, T0)
    assert states == before_states and entries == before_entries
    with pytest.raises(FrozenInstanceError):
        entries[0].req.arrival = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("view", "tenant", "waited", "expected"),
    [
        (CapacityView(make_tenant()), {}, 0.0, Admit(300)),
        (CapacityView(make_tenant()), {}, 30.0, Shed("timeout", 1.0)),
        (CapacityView(make_tenant(), budget_tokens=99), {}, 0.0, Shed("too_large", math.inf)),
        (CapacityView(make_tenant(), budget_tokens=150), {}, 0.0, Admit(150)),
        (CapacityView(make_tenant(), free_seqs=0), {}, 0.0, Wait("seqs")),
        (CapacityView(make_tenant(), free_tokens=299), {}, 0.0, Wait("tokens")),
        (CapacityView(make_tenant(), free_tokens=300, free_seqs=1), {}, 0.0, Admit(300)),
        (CapacityView(make_tenant()), {"limit": 2, "in_flight": 2}, 0.0, Wait("tenant_limit")),
        (
            CapacityView(make_tenant(), free_seqs=0, overflow_free=True),
            {"overflow": True},
            0.0,
            Admit(300, overflow=True),
        ),
    ],
)
def test_admission(
    policy: Policy, view: CapacityView, tenant: dict[str, Any], waited: float, expected: object
) -> None:
    req = make_request(prompt=100, p50=80, p90=200)
    view = replace(view, tenant=replace(view.tenant, **tenant))
    assert policy.admission.decide(req, view, T0 + waited) == expected


def test_a_tenant_at_its_limit_does_not_block_others(policy: Policy) -> None:
    states = {"a": make_tenant("a", limit=1, in_flight=1), "b": make_tenant("b")}
    queued: list[Entry] = []
    enqueue(policy, make_request(0, "a", arrival=T0), states, queued)
    enqueue(policy, make_request(1, "b", arrival=T0 + 1), states, queued)
    s = dispatch.step(policy, queued, states, open_view, T0 + 1)
    assert s is not None and s.entry.req.tenant == "b"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "nope"}, "scheduler.policy.type: unknown policy 'nope'"),
        ({"type": "fcfs", "paramters": {}}, "scheduler.policy.paramters: unknown key"),
        ({"type": "priority", "parameters": {"agin_s": 1}}, "parameters.agin_s: unknown"),
        ({"type": "priority", "parameters": {"aging_s": 0}}, "parameters.aging_s: must be"),
        ({"type": "priority", "parameters": {"aging_s": "x"}}, "parameters.aging_s: expected"),
        ({"type": "fair", "parameters": {"queue": "heap"}}, "parameters.queue: must be"),
        ({"type": "driftsched", "parameters": {"drift": {"beta": 2}}}, "drift.beta: must be"),
        ({"type": "driftsched", "parameters": {"drift": {"betta": 1}}}, "drift.betta: unknown"),
        ({"type": "driftsched", "parameters": {"max_boost": 1.5}}, "max_boost: expected an int"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message.replace(".", r"\.")):
        build_policy(config)


def test_policy_config_defaults_build() -> None:
    assert build_policy({}).type == "fcfs"
    p = build_policy({"type": "driftsched", "parameters": {"drift": {"overflow": True}}})
    assert p.drift is not None and p.drift.overflow
    with pytest.raises(ValueError, match="already registered"):
        register_builtins(register_builtins())

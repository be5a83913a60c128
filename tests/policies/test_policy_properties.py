"""Hypothesis properties of the policies, dispatched through the production admission core:
aging bounds the wait, class precedence, fair shares follow weights, no starvation."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.clock import FakeClock
from policies.base import Policy, QueuedRequest, TenantState
from tests.policy_builders import T0, CoreQueue, make_policy, make_request, make_tenant

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

#: (gap to the previous arrival, level, tenant, prompt tokens, predicted output, has SLO)
arrivals = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]),
        st.integers(0, 2),
        st.sampled_from("abc"),
        st.integers(0, 3000),
        st.floats(0, 2000),
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)
aged = st.sampled_from(
    [
        ("priority", {"aging_s": 2.0}),
        ("priority", {"aging_s": 0.5}),
        ("driftsched", {"aging_s": 1.0, "max_slack_s": 2.0, "max_debt_s": 1.0}),
    ]
)


def simulate(
    policy: Policy, reqs: list[QueuedRequest], service_s: float, states: dict[str, TenantState]
) -> list[tuple[QueuedRequest, float, list[QueuedRequest]]]:
    """One work-conserving server (one engine sequence), identical service times. For each
    request in start order: (request, start time, requests still queued when it started)."""
    pending = sorted(reqs, key=lambda r: r.arrival)
    q = CoreQueue(policy, max_seqs=1)
    q.states = states
    out: list[tuple[QueuedRequest, float, list[QueuedRequest]]] = []
    now, free_at = T0, T0
    running: QueuedRequest | None = None
    while pending or q.queued:
        now = max(free_at, now if q.queued else pending[0].arrival)
        if running is not None:
            q.complete(running, 1, now)
            running = None
        while pending and pending[0].arrival <= now:
            q.enqueue(pending.pop(0))
        (running,) = q.dispatch(now)
        out.append((running, now, list(q.queued.values())))
        free_at = now + service_s
    return out


def build(spec: list[tuple[float, int, str, int, float, bool]]) -> list[QueuedRequest]:
    t, reqs = T0, []
    for i, (gap, level, tenant, prompt, p50, slo) in enumerate(spec):
        t += gap
        ttft, tpot = ([1.0, 3.0, None][level], [0.1, 0.2, None][level]) if slo else (None, None)
        reqs.append(make_request(i, tenant, arrival=t, level=level, prompt=prompt, p50=p50,
                                 ttft_slo_s=ttft, tpot_slo_s=tpot))  # fmt: skip
    return reqs


def fresh_states(boosted: str) -> dict[str, TenantState]:
    return {n: make_tenant(n, queue_timeout_s=math.inf, boost=n in boosted) for n in "abc"}


@SETTINGS
@given(spec=arrivals, cfg=aged, service_s=st.sampled_from([0.2, 1.0, 2.5]), boosted=st.text("abc"))
def test_aging_bounds_the_wait(
    spec: list[tuple[float, int, str, int, float, bool]],
    cfg: tuple[str, dict[str, float]],
    service_s: float,
    boosted: str,
) -> None:
    """No request is passed by one that arrived more than B later, so its wait is at most
    B plus the FCFS wait of a request arriving B later (identical service times)."""
    policy = make_policy(*cfg)
    bound = policy.ordering.max_overtake_s(0, 2)
    reqs = build(spec)
    for started, start, still_queued in simulate(policy, reqs, service_s, fresh_states(boosted)):
        for waiting in still_queued:
            assert started.arrival <= waiting.arrival + bound + 1e-6
        # FCFS start of a phantom arriving at arrival + B, behind every earlier arrival
        horizon = started.arrival + bound
        earlier = sorted([r.arrival for r in reqs if r.arrival <= horizon] + [horizon])
        m = len(earlier)
        phantom_start = max(a + (m - 1 - i) * service_s for i, a in enumerate(earlier))
        assert start - started.arrival <= bound + (phantom_start - horizon) + 1e-6


@SETTINGS
@given(
    spec=arrivals, aging_s=st.sampled_from([0.5, 2.0, 10.0]), service_s=st.sampled_from([0.5, 2.0])
)
def test_a_higher_class_never_waits_behind_a_lower_one_beyond_the_bound(
    spec: list[tuple[float, int, str, int, float, bool]], aging_s: float, service_s: float
) -> None:
    """If a lower class starts while a higher-class request waits, the lower one had already
    waited (level difference) * aging_s when the higher one arrived."""
    policy = make_policy("priority", {"aging_s": aging_s})
    for started, _, still_queued in simulate(policy, build(spec), service_s, fresh_states("")):
        for waiting in still_queued:
            if waiting.level < started.level:
                head_start = (started.level - waiting.level) * aging_s
                assert waiting.arrival - started.arrival >= head_start - 1e-6


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
    slots=st.sampled_from([1, 3]),
)
def test_fair_shares_converge_to_weights_under_backlog(
    weights: list[float], seed: int, slots: int
) -> None:
    policy = make_policy("fair")
    assert policy.order == "counter" and policy.fair_share is not None
    rng, clock = random.Random(seed), FakeClock(T0)
    names = [f"t{i}" for i in range(len(weights))]
    w = dict(zip(names, weights, strict=True))
    q = CoreQueue(policy, max_seqs=slots)
    q.states = {n: make_tenant(n, queue_timeout_s=math.inf) for n in names}
    actual: dict[str, int] = {}
    running: list[tuple[float, QueuedRequest]] = []
    served = dict.fromkeys(names, 0.0)
    counter = 0

    def submit(tenant: str) -> None:
        nonlocal counter
        counter += 1
        out = rng.randrange(1, 1500)
        req = make_request(counter, tenant, arrival=clock.time(), weight=w[tenant],
                           prompt=rng.randrange(0, 1000), p50=out * rng.uniform(0.3, 3.0))  # fmt: skip
        actual[req.id] = out
        q.enqueue(req, clock.time())

    for n in names:
        for _ in range(2):
            submit(n)
    max_cost = 0.0
    for _ in range(500):
        if len(running) == slots:  # complete the earliest, charge the truth
            running.sort(key=lambda x: x[0])
            done_at, req = running.pop(0)
            clock.advance(max(0.0, done_at - clock.time()))
            q.complete(req, actual[req.id], clock.time())
        (req,) = q.dispatch(clock.time(), max_grants=1)  # one sequence frees at a time
        cost = req.prompt_tokens + 2 * actual[req.id]
        served[req.tenant] += cost
        max_cost = max(max_cost, cost / w[req.tenant])
        running.append((clock.time() + cost * 1e-4, req))
        submit(req.tenant)  # stay backlogged
    normalised = [served[n] / w[n] for n in names]
    assert max(normalised) - min(normalised) <= (slots + 3) * max_cost
    assert max(normalised) / min(normalised) <= 1.15

"""Builders for the scheduling-policy tests: requests, tenant states, policies, a service loop."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from policies import dispatch
from policies.base import CapacityView, Entry, Policy, QueuedRequest, TenantState
from policies.registry import build_policy, register_builtins

T0 = 1_700_000_000.0

#: every registered type with its defaults, plus the non-default queue shape of ``fair``
VARIANTS: list[tuple[str, dict[str, Any]]] = [(t, {}) for t in register_builtins().types()] + [
    ("fair", {"queue": "global"})
]
VARIANT_IDS = [t + ("-" + "-".join(map(str, p.values())) if p else "") for t, p in VARIANTS]


def make_policy(type_: str, parameters: Mapping[str, Any] | None = None) -> Policy:
    return build_policy({"type": type_, "parameters": dict(parameters or {})})


def make_request(
    i: int = 0,
    tenant: str = "a",
    *,
    arrival: float = T0,
    level: int = 1,
    prompt: int = 100,
    p50: float = 100.0,
    p90: float | None = None,
    weight: float = 1.0,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
    max_tokens: int | None = None,
) -> QueuedRequest:
    return QueuedRequest(
        id=f"r{i:05d}",
        tenant=tenant,
        arrival=arrival,
        prompt_tokens=prompt,
        predicted_output_p50=p50,
        predicted_output_p90=2 * p50 if p90 is None else p90,
        qos_class={0: "premium", 1: "standard"}.get(level, "batch"),
        level=level,
        weight=weight,
        max_tokens=max_tokens,
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        model="m",
    )


def make_tenant(name: str = "a", **kw: Any) -> TenantState:
    return TenantState(name=name, **kw)


def make_requests(
    rng: random.Random, n: int, tenants: Iterable[str] = ("a", "b", "c")
) -> list[QueuedRequest]:
    """``n`` requests with random tenants, levels, sizes, SLOs and (sometimes equal) arrivals."""
    names = list(tenants)
    out = []
    for i in range(n):
        level = rng.choice([0, 1, 2])
        out.append(
            make_request(
                i,
                rng.choice(names),
                arrival=T0 + rng.choice([0.0, 0.5, float(rng.randrange(120))]),
                level=level,
                prompt=rng.randrange(0, 4000),
                p50=rng.uniform(0, 1500),
                weight=rng.choice([0.5, 1.0, 3.0]),
                ttft_slo_s=[1.0, 3.0, None][level],
                tpot_slo_s=[0.1, 0.2, None][level],
            )
        )
    return out


def random_tenant(rng: random.Random, name: str) -> TenantState:
    return make_tenant(
        name,
        virtual_counter=rng.uniform(0, 50_000),
        virtual_floor=rng.uniform(0, 20_000),
        queued_charge=rng.uniform(0, 5_000),
        drift_ratio=rng.choice([0.5, 1.0, 4.0]),
        boost=rng.random() < 0.3,
    )


def open_view(req: QueuedRequest, tenant: TenantState) -> CapacityView:
    """Unbounded capacity: only tenant limits and timeouts apply."""
    return CapacityView(tenant=tenant)


def enqueue(
    policy: Policy, req: QueuedRequest, states: dict[str, TenantState], queued: list[Entry]
) -> None:
    """Enqueue as the engine does: accounting first (lift, queued charge), then the key."""
    backlogged_names = {e.req.tenant for e in queued}
    backlogged = {n: states[n] for n in backlogged_names}
    floor = min((s.virtual_counter for s in backlogged.values()), default=None)
    st = states.get(req.tenant) or make_tenant(req.tenant)
    if floor is not None:
        st = replace(st, virtual_floor=floor)
    if policy.accounting is not None:
        st = policy.accounting.on_enqueue(st, req, backlogged, req.arrival)
    states[req.tenant] = st
    queued.append(dispatch.enqueue(policy, req, st, req.arrival))

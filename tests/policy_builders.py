"""Builders for the scheduling-policy tests: requests, tenant states, policies, and
:class:`CoreQueue`, the production admission core driven synchronously (what the policy
suites dispatch through: the code that admits traffic, not a model of it)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from policies.base import Policy, QueuedRequest, TenantState
from policies.registry import build_policy, register_builtins
from proxy.admission.base import EngineCapacity, QueueItem
from proxy.admission.core import AdmissionCore

T0 = 1_700_000_000.0

#: every registered type with its defaults
VARIANTS: list[tuple[str, dict[str, Any]]] = [(t, {}) for t in register_builtins().types()]
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


class CoreQueue:
    """The admission core (:class:`~proxy.admission.core.AdmissionCore`) with one engine,
    fed as the scheduler feeds it: accounting at enqueue (lift, queued charge), then the
    policy's key as the item's score. ``max_seqs`` None: unbounded capacity."""

    def __init__(self, policy: Policy, max_seqs: int | None = None) -> None:
        self.policy = policy
        self.core = AdmissionCore()
        self.core.set_engines([EngineCapacity("e", ("m",), None, max_seqs, True)], T0, 1e12)
        self.states: dict[str, TenantState] = {}
        self.queued: dict[str, QueuedRequest] = {}

    def enqueue(self, req: QueuedRequest, now: float | None = None) -> float:
        """Queue ``req`` (at its arrival unless ``now``); returns its key."""
        now = req.arrival if now is None else now
        backlogged = {n: self.states[n] for n in {r.tenant for r in self.queued.values()}}
        floor = min((s.virtual_counter for s in backlogged.values()), default=None)
        st = self.states.get(req.tenant) or make_tenant(req.tenant)
        if floor is not None:
            st = replace(st, virtual_floor=floor)
        if self.policy.accounting is not None:
            st = self.policy.accounting.on_enqueue(st, req, backlogged, now)
        self.states[req.tenant] = st
        key = self.policy.ordering.key(req, st, now)
        result = self.core.enqueue(
            QueueItem(req.id, req.tenant, "r", "m", key, req.footprint, math.inf))
        assert result == "queued", result
        self.queued[req.id] = req
        return key

    def dispatch(self, now: float, max_grants: int = 1 << 30) -> list[QueuedRequest]:
        """Grant what the core admits now; admitted requests are charged (``on_admit``)."""
        grants, expired = self.core.dispatch(now, 1e12, max_grants)
        assert not expired
        out = []
        for g in grants:
            req = self.queued.pop(g.id)
            if self.policy.accounting is not None:
                st = self.states[req.tenant]
                self.states[req.tenant] = self.policy.accounting.on_admit(st, req, now)
            out.append(req)
        return out

    def complete(self, req: QueuedRequest, actual_output: int, now: float) -> None:
        self.core.release(req.id)
        if self.policy.accounting is not None:
            st = self.states[req.tenant]
            self.states[req.tenant] = self.policy.accounting.on_complete(st, req, actual_output, now)

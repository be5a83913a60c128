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
from proxy.scheduler import FairLedger

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
    fed as the scheduler feeds it: the core in the policy's order, each item with its
    fair-share charge and the policy's key over the ledger as the scheduler reads it
    (:class:`~proxy.scheduler.FairLedger`, here read afresh at every enqueue), corrections at
    release. ``states``: the tenants' other fields (level, boost, ...). ``max_seqs`` None:
    unbounded capacity."""

    def __init__(self, policy: Policy, max_seqs: int | None = None) -> None:
        self.policy = policy
        self.core = AdmissionCore(order=policy.order)
        self.core.set_engines([EngineCapacity("e", ("m",), None, max_seqs, True)], T0, 1e12)
        self.states: dict[str, TenantState] = {}
        self.queued: dict[str, QueuedRequest] = {}
        self.ledger = FairLedger()

    def charge(self, req: QueuedRequest) -> float:
        fs = self.policy.fair_share
        return fs.charge(req) if fs is not None else 0.0

    def state(self, req: QueuedRequest) -> TenantState:
        """The tenant's state as the key sees it when ``req`` is enqueued."""
        st = self.states.get(req.tenant) or make_tenant(req.tenant)
        self.ledger.observe(self.core.stats())
        vc, floor, queued = self.ledger.position(req.tenant)
        return replace(st, virtual_counter=vc, virtual_floor=floor,
                       queued_charge=queued + self.charge(req))

    def enqueue(self, req: QueuedRequest, now: float | None = None) -> float:
        """Queue ``req`` (at its arrival unless ``now``); returns its key."""
        now = req.arrival if now is None else now
        key = self.policy.ordering.key(req, self.state(req), now)
        result = self.core.enqueue(QueueItem(req.id, req.tenant, "r", "m", key, req.footprint,
                                             math.inf, charge=self.charge(req)))
        assert result == "queued", result
        self.queued[req.id] = req
        return key

    def dispatch(self, now: float, max_grants: int = 1 << 30) -> list[QueuedRequest]:
        """Grant what the core admits now (the core charges each grant)."""
        grants, expired = self.core.dispatch(now, 1e12, max_grants)
        assert not expired
        return [self.queued.pop(g.id) for g in grants]

    def complete(self, req: QueuedRequest, actual_output: int, now: float) -> None:
        fs = self.policy.fair_share
        self.core.release(req.id, fs.correction(req, actual_output) if fs is not None else 0.0)

    def counter(self, tenant: str) -> float:
        return self.core.stats().counters.get(tenant, 0.0)

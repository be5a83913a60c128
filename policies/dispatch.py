"""Reference semantics of one dispatch step: *which queued request leaves the queue next?*

The memory queue runs this directly; the Redis queue (sorted sets + Lua) must produce the
same result, and its contract tests compare against it.

Order. Entries are ordered by ``(key, member(req))``. :func:`member` is the sorted-set
member: the arrival in whole microseconds, zero-padded, then ``:`` and the id, so a sorted
set's lexicographic tie-break on equal scores *is* "ties by arrival, then id".

Step (:func:`step`). Candidates come in policy order — the global order when the policy has
no selector, else the head of the tenant the selector picks among the backlogged tenants.
Each candidate is put to ``policy.admission``:

* ``Admit`` or ``Shed``: that is the step's result (the caller removes the entry, applies
  the decision and calls again);
* ``Wait("tenant_limit")``: the tenant is skipped for this step (its later requests too) —
  a tenant at its limit must not block other tenants;
* ``Wait("seqs" | "tokens")``: the step ends with ``None``: capacity is released in order,
  so a large request at the head is never starved by smaller ones behind it. (One model;
  with several, a store may block only the engines that serve the head's model.)

An empty queue gives ``None``. Requests not at the head time out through their waiter's own
timer (the caller), not here. Pure functions; nothing is mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from policies.base import (
    Admit,
    CapacityView,
    Entry,
    Policy,
    QueuedRequest,
    Shed,
    TenantState,
    Wait,
)

ViewFn = Callable[[QueuedRequest, TenantState], CapacityView]


@dataclass(frozen=True, slots=True)
class Step:
    """The entry that leaves the queue and what happens to it."""

    entry: Entry
    decision: Admit | Shed


def member(req: QueuedRequest) -> str:
    """The sorted-set member of ``req``: ``<arrival in µs, 20 digits>:<id>``."""
    return f"{max(0, round(req.arrival * 1_000_000)):020d}:{req.id}"


def order(entry: Entry) -> tuple[float, str]:
    """The strict total order of entries: key, then arrival, then id."""
    return (entry.key, member(entry.req))


def enqueue(policy: Policy, req: QueuedRequest, tenant: TenantState, now: float) -> Entry:
    """The entry to store for ``req``: its key computed once, with the state at enqueue."""
    return Entry(policy.ordering.key(req, tenant, now), req)


def step(
    policy: Policy,
    entries: Iterable[Entry],
    tenants: Mapping[str, TenantState],
    view: ViewFn,
    now: float,
) -> Step | None:
    """One dispatch step (module doc). ``tenants`` must hold every queued tenant."""
    blocked: set[str] = set()
    for entry in _candidates(policy, entries, tenants, blocked, now):
        tenant = tenants[entry.req.tenant]
        decision = policy.admission.decide(entry.req, view(entry.req, tenant), now)
        if isinstance(decision, Wait):
            if decision.reason != "tenant_limit":
                return None
            blocked.add(tenant.name)
            continue
        return Step(entry, decision)
    return None


def _candidates(
    policy: Policy,
    entries: Iterable[Entry],
    tenants: Mapping[str, TenantState],
    blocked: set[str],
    now: float,
) -> Iterable[Entry]:
    ordered = sorted(entries, key=order)
    if policy.selector is None:
        yield from (e for e in ordered if e.req.tenant not in blocked)
        return
    heads: dict[str, Entry] = {}
    for e in ordered:
        heads.setdefault(e.req.tenant, e)
    while True:
        backlogged = {n: tenants[n] for n in heads if n not in blocked}
        name = policy.selector.pick(backlogged, now)
        if name is None:
            return
        if name not in backlogged:
            raise ValueError(f"selector picked {name!r}, which is not backlogged")
        yield heads[name]
        blocked.add(name)

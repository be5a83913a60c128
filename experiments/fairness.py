"""Fairness of one run: max-min fair shares, Jain's index over them, VTC's service difference.

Service is VTC's cost, ``input_weight * prompt + output_weight * output`` tokens (1 and 2).
A tenant's *demand* is the service of everything it sent (the workload's true lengths); what
it was *served* counts its successful requests (the engine's usage). Within a group of tenants
(a class, or all), the service the group received is shared by weighted water-filling over the
demands (:func:`maxmin_fair`), and Jain's index is taken over served / fair share: 1 when every
tenant got exactly its max-min fair share, whatever the demands (raw Jain over served tokens
would punish unequal demand).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.rundata import Req

VTC_WINDOW_S = 60.0
INPUT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0


def spread_tokens(r: Req, lo: float, hi: float) -> float:
    """Output tokens of ``r`` streamed within [lo, hi) (evenly over first token..done); an
    answer whose tokens all came at one instant counts where that instant falls, so that
    adjacent windows never count it twice."""
    if not r.ok or r.first_token_s is None or r.done_s is None or not r.completion_tokens:
        return 0.0
    a, b = r.first_token_s, r.done_s
    if b <= a:
        return float(r.completion_tokens) if lo <= a < hi else 0.0
    overlap = max(0.0, min(b, hi) - max(a, lo))
    return r.completion_tokens * overlap / (b - a)


def maxmin_fair(
    demand: Mapping[str, float], weight: Mapping[str, float], capacity: float
) -> dict[str, float]:
    """Weighted max-min fair allocation of ``capacity`` (water-filling): no tenant gets more
    than it asked for, and the rest is shared in proportion to the weights. The shares sum
    to ``min(capacity, total demand)``; a tenant with no demand gets 0. Raises
    :class:`ValueError` for a tenant with demand and a weight <= 0."""
    alloc = {t: 0.0 for t in demand}
    active = {t for t, d in demand.items() if d > 0}
    bad = sorted(t for t in active if not weight[t] > 0)
    if bad:
        raise ValueError(f"maxmin_fair: weight of {', '.join(bad)} must be > 0")
    left = capacity
    while active and left > 1e-9:
        per_weight = left / sum(weight[t] for t in active)
        done = {t for t in active if demand[t] - alloc[t] <= per_weight * weight[t]}
        if not done:
            for t in active:
                alloc[t] += per_weight * weight[t]
            break
        for t in done:
            left -= demand[t] - alloc[t]
            alloc[t] = demand[t]
        active -= done
    return alloc


def jain(xs: Sequence[float]) -> float | None:
    """Jain's index (sum x)^2 / (n sum x^2) of non-negative ``xs``: 1 when all are equal,
    1/n when one has everything; None for no values, 1 when all are 0 (equal)."""
    if not xs:
        return None
    s2 = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * s2) if s2 > 0 else 1.0


def service(prompt: int | None, output: int | None) -> float:
    return INPUT_WEIGHT * (prompt or 0) + OUTPUT_WEIGHT * (output or 0)


def fair_share_jain(reqs: Sequence[Req], weights: Mapping[str, float]) -> dict[str, Any]:
    """Jain's index of served / max-min fair share over the tenants of ``reqs``."""
    demand: dict[str, float] = defaultdict(float)
    served: dict[str, float] = defaultdict(float)
    for r in reqs:
        demand[r.tenant] += service(r.expected_prompt_tokens, r.expected_output_tokens)
        if r.ok:
            served[r.tenant] += service(r.prompt_tokens, r.completion_tokens)
    w = {t: weights.get(t, 1.0) for t in demand}
    fair = maxmin_fair(demand, w, sum(served.values()))
    ratios = {t: served[t] / fair[t] for t in demand if fair[t] > 0}
    return {
        "tenants": len(demand),
        "jain": jain(list(ratios.values())),
        "served_over_fair": ratios,
        "demand": dict(demand),
        "served": dict(served),
    }


def service_difference(
    reqs: Sequence[Req], weights: Mapping[str, float], window_s: float = VTC_WINDOW_S
) -> dict[str, Any]:
    """VTC's service difference in ``window_s`` windows (see :data:`DEFINITIONS`)."""
    end = max((r.done_s or r.intended_s for r in reqs), default=0.0)
    n_win = max(1, math.ceil(end / window_s))
    tenants = sorted({r.tenant for r in reqs})
    got = [dict.fromkeys(tenants, 0.0) for _ in range(n_win)]
    active: list[set[str]] = [set() for _ in range(n_win)]
    for r in reqs:
        active[min(n_win - 1, int(r.intended_s // window_s))].add(r.tenant)
        if not r.ok or r.first_token_s is None:
            continue
        w = weights.get(r.tenant, 1.0)
        k = min(n_win - 1, int(r.first_token_s // window_s))
        got[k][r.tenant] += INPUT_WEIGHT * (r.prompt_tokens or 0) / w
        for i in range(n_win):
            # the last window is closed on the right: an answer ending on the run's end counts
            lo, hi = i * window_s, (i + 1) * window_s if i < n_win - 1 else math.inf
            got[i][r.tenant] += OUTPUT_WEIGHT * spread_tokens(r, lo, hi) / w
    diffs = [
        max(got[i][t] for t in active[i]) - min(got[i][t] for t in active[i])
        for i in range(n_win)
        if len(active[i]) >= 2
    ]
    return {"max": max(diffs) if diffs else None, "mean": float(np.mean(diffs)) if diffs else None}

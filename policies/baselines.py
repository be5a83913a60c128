"""The output-length baselines the estimator must beat, and the one way both are scored.

One implementation for both evaluations, so that their tables mean the same thing:

- **live** (:mod:`experiments.metrics`): each request's baselines are predicted as of its
  arrival at the gateway, from exactly the completions that *finished before* that arrival
  (the gateway's estimator could not have seen any other);
- **offline** (:mod:`policies.estimator_eval`): prequential in arrival order, every row
  predicted before it is learned -- the same rule with each row finishing as it arrives.

The baselines follow River's API (``predict_one`` / ``learn_one``) on the feature dict's
``tenant`` and ``max_tokens``; before they have history they predict :data:`PRIOR_TOKENS`,
the gateway estimator's own prior:

- ``global mean``: River's ``StatisticRegressor(Mean())`` over every tenant's completions;
- ``per-tenant mean``: the same, one per tenant;
- ``per-tenant EWMA``: :class:`policies.ewma.TenantEWMA`, ``alpha`` :data:`EWMA_ALPHA`
  (0.1: a memory of ~10 completions, what VTC-style schedulers use; the first completion
  sets it);
- ``max_tokens``: the request's cap, and no prediction where the request set none (it is
  scored on the capped requests only; its ``n`` says how many).

:func:`score`: n, MAE, Kendall's tau-b, overall and per tenant, and the within-tenant tau
(the n-weighted mean of the per-tenant taus), over the items that have a prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from river import dummy, stats
from scipy.stats import kendalltau

from policies.ewma import TenantEWMA

#: what every baseline predicts before it has history (the gateway estimator's prior)
PRIOR_TOKENS = 256.0
#: the per-tenant EWMA's weight of the newest completion
EWMA_ALPHA = 0.1

GLOBAL_MEAN = "StatisticRegressor(Mean) = global mean"
TENANT_MEAN = "per-tenant mean"
TENANT_EWMA = f"per-tenant EWMA (a={EWMA_ALPHA:g})"
MAX_TOKENS = "max_tokens"
#: short names, for compact tables (summary.json)
SHORT = {GLOBAL_MEAN: "global_mean", TENANT_MEAN: "tenant_mean", TENANT_EWMA: "tenant_ewma",
         MAX_TOKENS: "max_tokens"}  # fmt: skip


class Baseline(Protocol):
    def predict_one(self, x: Mapping[str, Any]) -> float | None: ...
    def learn_one(self, x: Mapping[str, Any], y: float) -> None: ...


class GlobalMean:
    """River's ``StatisticRegressor(Mean())``, or ``prior`` before the first completion."""

    def __init__(self, prior: float = PRIOR_TOKENS) -> None:
        self.prior = prior
        self._mean = stats.Mean()
        self._m = dummy.StatisticRegressor(self._mean)

    def predict_one(self, x: Mapping[str, Any]) -> float:
        p = self._m.predict_one(dict(x))
        return self.prior if p is None or not self._mean.n else float(p)

    def learn_one(self, x: Mapping[str, Any], y: float) -> None:
        self._m.learn_one(dict(x), y)


class TenantMean:
    """Per-tenant running mean (a ``Mean()`` per tenant), or ``prior`` for a new tenant."""

    def __init__(self, prior: float = PRIOR_TOKENS) -> None:
        self.prior = prior
        self._m: dict[str, stats.Mean] = {}

    def predict_one(self, x: Mapping[str, Any]) -> float:
        m = self._m.get(str(x.get("tenant", "")))
        return self.prior if m is None or m.n == 0 else float(m.get())

    def learn_one(self, x: Mapping[str, Any], y: float) -> None:
        self._m.setdefault(str(x.get("tenant", "")), stats.Mean()).update(y)


class MaxTokens:
    """The request's ``max_tokens``; None (no prediction) when it set none."""

    def predict_one(self, x: Mapping[str, Any]) -> float | None:
        cap = x.get("max_tokens")
        return None if cap is None else float(cap)

    def learn_one(self, x: Mapping[str, Any], y: float) -> None:
        pass


def baselines(prior: float = PRIOR_TOKENS, alpha: float = EWMA_ALPHA) -> dict[str, Baseline]:
    """Fresh instances of every baseline, by display name (the order of the tables)."""
    return {
        GLOBAL_MEAN: GlobalMean(prior),
        TENANT_MEAN: TenantMean(prior),
        TENANT_EWMA: TenantEWMA(alpha, prior),
        MAX_TOKENS: MaxTokens(),
    }


@dataclass(frozen=True, slots=True)
class Item:
    """One completed request: what its predictors read (``x``: ``tenant``, ``max_tokens``),
    its actual output tokens, when it arrived and when it finished (any one clock)."""

    x: Mapping[str, Any]
    actual: float
    arrival: float
    finish: float


def as_of_arrival(items: Sequence[Item]) -> dict[str, list[float | None]]:
    """Every baseline's prediction for every item, made at its arrival from exactly the
    items that finished strictly before it (learned in finish order; at equal times an
    arrival comes first). An item never sees its own outcome. Prequential order is the
    special case ``finish = arrival``."""
    models = baselines()
    out: dict[str, list[float | None]] = {name: [None] * len(items) for name in models}
    events = sorted(
        [(it.arrival, 0, i) for i, it in enumerate(items)]
        + [(it.finish, 1, i) for i, it in enumerate(items)]
    )
    for _, kind, i in events:
        it = items[i]
        for name, m in models.items():
            if kind == 0:
                out[name][i] = m.predict_one(it.x)
            else:
                m.learn_one(it.x, it.actual)
    return out


def prequential(
    xs: Sequence[Mapping[str, Any]], ys: Sequence[float]
) -> dict[str, list[float | None]]:
    """:func:`as_of_arrival` for a stream in arrival order: row ``i`` sees rows ``< i``."""
    return as_of_arrival([Item(x, float(y), float(i), float(i))
                          for i, (x, y) in enumerate(zip(xs, ys, strict=True))])  # fmt: skip


def tau_b(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float | None:
    """Kendall's tau-b; None with fewer than 2 points or a constant side (undefined)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(kendalltau(a, b).statistic)


def _one(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    if not len(p):
        return {"n": 0, "mae": None, "tau": None}
    return {"n": len(p), "mae": float(np.mean(np.abs(p - y))), "tau": tau_b(p, y)}


def score(
    pred: Sequence[float | None], actual: Sequence[float], tenants: Sequence[str]
) -> dict[str, Any]:
    """``{n, mae, tau, tau_within, tenants: {tenant: {n, mae, tau}}}`` over the items with a
    prediction (not None). ``tau_within``: the mean of the per-tenant taus weighted by their
    ``n``, over the tenants whose tau is defined (None if none is)."""
    keep = [i for i, p in enumerate(pred) if p is not None]
    p = np.array([pred[i] for i in keep], dtype=float)
    y = np.array([actual[i] for i in keep], dtype=float)
    ts = [tenants[i] for i in keep]
    out = _one(p, y)
    per: dict[str, dict[str, Any]] = {}
    for t in sorted(set(ts)):
        idx = np.array([j for j, u in enumerate(ts) if u == t])
        per[t] = _one(p[idx], y[idx])
    defined = [(s["n"], s["tau"]) for s in per.values() if s["tau"] is not None]
    total = sum(n for n, _ in defined)
    out["tau_within"] = sum(n * v for n, v in defined) / total if total else None
    out["tenants"] = per
    return out

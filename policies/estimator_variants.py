"""Two estimators that answer the estimator's question differently, for ablations.

One question, as :class:`policies.estimator.OutputTokenEstimator`'s: *how many tokens will
this request produce?* Both are that estimator with ``estimate_one`` replaced, so the
gateway runs them through the same code path (features, clipping to ``max_tokens``,
learning, drift signals, persistence); only the prediction differs. Choose one with
``scheduler.estimator.kind`` (``proxy/estimation.py``); the default, ``river``, is the
real estimator. Neither is meant for service:

- :class:`OracleEstimator` (``oracle``): the request's true output length, read from the
  feature ``oracle_output_tokens``, which the gateway fills from the client's
  ``x-oracle-output-tokens`` header only when this kind is configured (a claim no
  production gateway should trust). ``p50 = p90 =`` the length; a request without it gets
  the River estimate (counted in ``misses``). What a perfect estimator would buy.
- :class:`TenantMeanEstimator` (``tenant-mean``): the tenant's running mean of completed
  output lengths for ``p50`` (River's ``StatisticRegressor(Mean())`` per tenant, the
  baseline the estimator is evaluated against) and, for ``p90``, the ``quantile`` of the
  tenant's last ``window`` lengths (never below the mean); ``prior_tokens`` for both
  before the tenant's first completion. What the prompt model buys over the tenant's
  history.

Both keep learning the River model underneath (``learn_one`` calls the parent's), so the
drift signals (``ratio``, ``drift_detected``, the admin view) are the real estimator's; the
drift controller judges the prediction the scheduler used, which it is given directly.

>>> est = TenantMeanEstimator(prior_tokens=256)
>>> est.estimate_one({"tenant": "acme"}).p50
256.0
>>> for y in (100, 200, 300):
...     est.learn_one({"tenant": "acme"}, y)
>>> e = est.estimate_one({"tenant": "acme", "max_tokens": 1000.0})
>>> e.p50, e.p90
(200.0, 280.0)
>>> OracleEstimator().estimate_one({"tenant": "acme", "oracle_output_tokens": 42.0})
Estimate(p50=42.0, p90=42.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from policies.estimator import Estimate, OutputTokenEstimator, _Window

__all__ = ["ORACLE_FEATURE", "OracleEstimator", "TenantMeanEstimator"]

#: the feature that carries a request's true output length (only with ``kind: oracle``)
ORACLE_FEATURE = "oracle_output_tokens"


def _cap(x: Mapping[str, Any]) -> float:
    return float(x.get("max_tokens") or math.inf)


class OracleEstimator(OutputTokenEstimator):
    """The true output length where the request carries it (module doc)."""

    TYPE = "oracle"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: estimates made from the true length, and without one (River's estimate instead)
        self.hits = 0
        self.misses = 0

    def estimate_one(self, x: Mapping[str, Any]) -> Estimate:
        y = x.get(ORACLE_FEATURE)
        if y is None:
            self.misses += 1
            return super().estimate_one(x)
        self.hits += 1
        v = min(max(1.0, float(y)), _cap(x))  # an engine emits at least one token
        return Estimate(v, v)


class TenantMeanEstimator(OutputTokenEstimator):
    """The tenant's running mean (``p50``) and recent quantile (``p90``) (module doc)."""

    TYPE = "tenant-mean"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._recent: dict[str, _Window] = {}

    def estimate_one(self, x: Mapping[str, Any]) -> Estimate:
        name = str(x.get("tenant", ""))
        n = self._n.get(name, 0)
        if n == 0:
            p50 = p90 = float(self.prior_tokens)
        else:
            p50 = self._sum[name] / n
            p90 = max(p50, self._recent[name].quantile(self.quantile))
        cap = _cap(x)
        return Estimate(min(p50, cap), min(p90, cap))

    def learn_one(  # type: ignore[override]
        self, x: Mapping[str, Any], y: float, **kwargs: Any
    ) -> None:
        super().learn_one(x, y)  # validates y; keeps the drift signals
        name = str(x.get("tenant", ""))
        self._sum[name] = self._sum.get(name, 0.0) + float(y)
        self._n[name] = self._n.get(name, 0) + 1
        if name not in self._recent:
            self._recent[name] = _Window(self.window)
        self._recent[name].add(float(y))

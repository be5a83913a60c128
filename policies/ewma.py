"""Per-tenant EWMA of output length: a baseline output-token estimator.

The gateway does not run it: it is one of the baselines to beat (:mod:`policies.baselines`),
scored beside the learned estimator by ``driftsched estimator-eval`` and in every experiment
report. It follows River's
API (``predict_one`` / ``learn_one``) like the estimator it is compared with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TYPE = "ewma"


class TenantEWMA:
    """``predict_one({"tenant": t})`` -> the tenant's EWMA of output tokens (or the prior)."""

    def __init__(self, alpha: float = 0.1, prior: float = 256.0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.prior = prior
        self._mean: dict[str, float] = {}

    def predict_one(self, x: Mapping[str, Any]) -> float:
        return self._mean.get(str(x.get("tenant", "")), self.prior)

    def learn_one(self, x: Mapping[str, Any], y: float) -> None:
        t = str(x.get("tenant", ""))
        m = self._mean.get(t)
        self._mean[t] = float(y) if m is None else m + self.alpha * (float(y) - m)

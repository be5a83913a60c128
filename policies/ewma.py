"""Per-tenant EWMA of output length: the baseline output-token estimator.

This is the predictor VTC uses, and the fallback the gateway uses when no learned estimator
is configured. It follows River's API (``predict_one`` / ``learn_one``) so a River model can
replace it without touching the gateway.
"""

from __future__ import annotations

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

    def predict_one(self, x: dict[str, Any]) -> float:
        return self._mean.get(str(x.get("tenant", "")), self.prior)

    def learn_one(self, x: dict[str, Any], y: float) -> None:
        t = str(x.get("tenant", ""))
        m = self._mean.get(t)
        self._mean[t] = float(y) if m is None else m + self.alpha * (float(y) - m)

"""Online output-token estimator: a shared River text model plus fast per-tenant terms.

One question: *how many tokens will this request produce?* ``estimate_one`` answers with a
median (``p50``, for ordering) and a conservative quantile (``p90``, for capacity), both
clipped to the request's ``max_tokens``. The model works on ``log1p(output tokens)``:

    log1p(y) ~ shared(x) + level[tenant] + residual quantile[tenant]

* ``shared`` -- a River regressor (default: linear, AdaGrad, Huber loss) over the prompt
  features of :class:`policies.features.RequestFeatures`, learned from every tenant.
* ``level`` -- the tenant's mean log residual: a running mean that is restarted whenever the
  tenant's drift detector fires, so it re-converges within tens of completions after a shift
  and stays smooth (window ``level_window``) otherwise.
* residual quantiles -- the tenant's recent residuals (``window``), shrunk toward all
  tenants' residuals while the tenant is new; they turn the mean into a median and a p90.

Drift: each tenant has a River drift detector (default ``ADWIN``) on the log of
(1 + actual) / (1 + predicted); ``drift_detected(tenant)`` and ``ratio(tenant)`` expose it
to the drift controller.

Concurrency: every method is synchronous and never awaits, so predictions and learning may
interleave freely on one event loop; predictions never change state. It is not
thread-safe: the gateway learns on its event loop, in the scheduler's background learning
task (:meth:`proxy.scheduler.Scheduler.learn`), never on the request path.

>>> from policies.features import RequestFeatures
>>> fx = RequestFeatures()
>>> est = OutputTokenEstimator()
>>> x = fx.transform_one({"prompt": "Write a long essay on tides", "prompt_tokens": 7,
...                       "tenant": "acme"})
>>> round(est.predict_one(x))  # the prior before any learning
256
>>> for _ in range(300):
...     est.learn_one(x, 900)
>>> e = est.estimate_one(x)
>>> 800 < e.p50 <= e.p90 < 1000, est.ratio("acme") > 0.9
(True, True)
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from river import base, drift, linear_model, optim

__all__ = ["DriftState", "Estimate", "OutputTokenEstimator", "write_atomic"]

TYPE = "river"
_FORMAT = 1
#: not numeric features of the shared model (``oracle_output_tokens``: the true length an
#: ablation's oracle reads, :mod:`policies.estimator_variants`; never learned from)
_SPECIAL = frozenset({"tenant", "model", "max_tokens", "oracle_output_tokens"})
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Estimate:
    """Predicted output tokens: ``p50`` orders the queue, ``p90`` reserves capacity."""

    p50: float
    p90: float


@dataclass(frozen=True, slots=True)
class DriftState:
    """A tenant's drift view. ``ratio`` is the geometric mean of (1+actual)/(1+predicted)."""

    tenant: str
    completions: int
    ratio: float
    drift_detected: bool
    detections: int


class _Window:
    """The last ``size`` values, kept sorted too, for cheap quantile reads."""

    __slots__ = ("fifo", "size", "sorted")

    def __init__(self, size: int) -> None:
        self.size = size
        self.fifo: deque[float] = deque()
        self.sorted: list[float] = []

    def add(self, v: float) -> None:
        if len(self.fifo) == self.size:
            del self.sorted[bisect.bisect_left(self.sorted, self.fifo.popleft())]
        self.fifo.append(v)
        bisect.insort(self.sorted, v)

    def quantile(self, q: float) -> float:
        s = self.sorted
        if not s:
            return 0.0
        pos = q * (len(s) - 1)
        i = int(pos)
        return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (pos - i)


class _Tenant:
    __slots__ = ("detections", "detector", "level", "level_n", "n", "ratio", "resid", "since")

    def __init__(self, detector: base.DriftDetector, window: int, ratio_window: int) -> None:
        self.detector = detector
        self.level = 0.0  # mean log residual of this tenant vs the shared model
        self.level_n = 0  # completions in the level's current run (reset on drift)
        self.resid = _Window(window)  # log(1+y) - prediction, for quantiles
        self.ratio: deque[float] = deque(maxlen=ratio_window)
        self.n = 0
        self.detections = 0
        self.since = -1  # completions since the detector last fired; -1: never


class OutputTokenEstimator(base.Regressor):
    """River regressor of output tokens with per-tenant levels, quantiles and drift.

    Parameters
    ----------
    model
        River regressor for log1p(tokens) over the numeric features (tenant-debiased).
        Default: ``LinearRegression(AdaGrad(0.1), Huber(1.0))`` starting at ``prior_tokens``.
    quantile
        The conservative quantile reported as ``Estimate.p90``.
    detector
        River drift detector prototype, cloned per tenant. Default ``ADWIN(clock=4)``.
    prior_tokens
        Prediction before anything is learned.
    level_window
        Memory of a tenant's level when no drift is detected (completions).
    window
        Residuals kept per tenant for its quantiles; all tenants together keep 4x as many.
    shrinkage
        Pseudo-count pulling a new tenant's level and quantiles toward the shared ones.
    ratio_window
        Completions over which ``ratio(tenant)`` is averaged.
    drift_hold
        ``drift_detected(tenant)`` stays true for this many of the tenant's completions
        after its detector fires.
    """

    def __init__(
        self,
        model: base.Regressor | None = None,
        quantile: float = 0.9,
        detector: base.DriftDetector | None = None,
        prior_tokens: float = 256.0,
        level_window: int = 500,
        window: int = 500,
        shrinkage: float = 10.0,
        ratio_window: int = 50,
        drift_hold: int = 50,
    ) -> None:
        if not 0.5 <= quantile < 1:
            raise ValueError("quantile must be in [0.5, 1)")
        if min(level_window, window, ratio_window, drift_hold) < 1 or shrinkage < 0:
            raise ValueError("windows must be >= 1 and shrinkage >= 0")
        self.model = model
        self.quantile = quantile
        self.detector = detector
        self.prior_tokens = prior_tokens
        self.level_window = level_window
        self.window = window
        self.shrinkage = shrinkage
        self.ratio_window = ratio_window
        self.drift_hold = drift_hold
        self._model: base.Regressor = (
            model.clone()
            if model is not None
            else linear_model.LinearRegression(
                optimizer=optim.AdaGrad(0.1),
                loss=optim.losses.Huber(1.0),
                intercept_init=math.log1p(prior_tokens),
                intercept_lr=0.01,
            )
        )
        if detector is None:
            detector = drift.ADWIN(clock=4)  # type: ignore[no-untyped-call]
        self._detector = detector
        self._tenants: dict[str, _Tenant] = {}
        self._resid = _Window(4 * window)

    # -- request path -----------------------------------------------------------------------

    def _numeric(self, x: Mapping[str, Any]) -> dict[Hashable, Any]:
        xs = cast(dict[Hashable, Any], dict(x))  # River types feature names as Hashable
        for k in _SPECIAL:
            xs.pop(k, None)
        m = x.get("model")
        if m:
            xs[f"model={m}"] = 1.0
        return xs

    def _mean(self, x: Mapping[str, Any]) -> tuple[float, _Tenant | None]:
        t = self._tenants.get(str(x.get("tenant", "")))
        mu = float(self._model.predict_one(self._numeric(x)))
        if t is not None:
            mu += t.level
        return mu, t

    def _offset(self, t: _Tenant | None, q: float) -> float:
        g = self._resid.quantile(q)
        if t is None:
            return g
        n = len(t.resid.fifo)
        return (n * t.resid.quantile(q) + self.shrinkage * g) / (n + self.shrinkage)

    def estimate_one(self, x: Mapping[str, Any]) -> Estimate:
        """``Estimate(p50, p90)`` in tokens, clipped to ``[0, max_tokens]``. Microseconds."""
        mu, t = self._mean(x)
        cap = float(x.get("max_tokens") or math.inf)
        p50 = math.expm1(max(0.0, mu + self._offset(t, 0.5)))
        p90 = math.expm1(max(0.0, mu + self._offset(t, self.quantile)))
        return Estimate(min(p50, cap), min(max(p50, p90), cap))

    def predict_one(self, x: Mapping[str, Any], **kwargs: Any) -> float:  # type: ignore[override]
        """The median estimate (``estimate_one(x).p50``)."""
        return self.estimate_one(x).p50

    # -- completion path --------------------------------------------------------------------

    def learn_one(  # type: ignore[override]
        self, x: Mapping[str, Any], y: float, **kwargs: Any
    ) -> None:
        """Learn one completion: ``x`` as given to ``predict_one``, ``y`` the actual tokens."""
        if not y >= 0 or math.isinf(y):
            raise ValueError(f"output tokens must be finite and >= 0, got {y!r}")
        name = str(x.get("tenant", ""))
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant(
                self._detector.clone(), self.window, self.ratio_window
            )
        xs = self._numeric(x)
        target = math.log1p(max(0.0, float(y)))
        shared = float(self._model.predict_one(xs))
        d = target - shared - t.level  # log (1+actual)/(1+predicted mean)
        t.n += 1
        t.ratio.append(d)
        t.resid.add(d)
        self._resid.add(d)
        t.detector.update(d)
        if t.since >= 0:
            t.since += 1
        if t.detector.drift_detected:
            t.detections += 1
            t.since = 0
            t.level_n = 0  # restart the level's running mean: re-converge fast
            t.resid = _Window(self.window)
        self._model.learn_one(xs, target - t.level)
        t.level_n = min(t.level_n + 1, self.level_window)
        t.level += (target - shared - t.level) / (t.level_n + self.shrinkage)

    # -- drift signals ----------------------------------------------------------------------

    def tenants(self) -> list[str]:
        """Tenants seen by ``learn_one``, in first-seen order."""
        return list(self._tenants)

    def ratio(self, tenant: str) -> float:
        """Geometric mean of (1+actual)/(1+predicted) over the tenant's last completions.

        "predicted" is the central estimate (``exp`` of the log-space mean) at learning time.
        1.0 when predictions are calibrated or the tenant is unknown; > 1 means the tenant
        produces more than predicted.
        """
        t = self._tenants.get(tenant)
        if t is None or not t.ratio:
            return 1.0
        return math.exp(sum(t.ratio) / len(t.ratio))

    def drift_detected(self, tenant: str) -> bool:
        """True during the ``drift_hold`` completions after the tenant's detector fired."""
        t = self._tenants.get(tenant)
        return t is not None and 0 <= t.since < self.drift_hold

    def drift_state(self, tenant: str) -> DriftState:
        t = self._tenants.get(tenant)
        return DriftState(
            tenant=tenant,
            completions=0 if t is None else t.n,
            ratio=self.ratio(tenant),
            drift_detected=self.drift_detected(tenant),
            detections=0 if t is None else t.detections,
        )

    # -- persistence ------------------------------------------------------------------------

    def dumps(self) -> bytes:
        """The estimator as bytes (pickle). Holds the GIL ~0.1 s per 100k learned weights."""
        return pickle.dumps({"format": _FORMAT, "estimator": self}, pickle.HIGHEST_PROTOCOL)

    @classmethod
    def loads(cls, data: bytes) -> OutputTokenEstimator:
        """Restore from ``dumps`` output. Pickle: only load bytes you wrote yourself."""
        state = pickle.loads(data)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not an estimator dump of format {_FORMAT}")
        est = state["estimator"]
        if type(est) is not cls:  # an ablation's dump is not restored as the real one
            raise ValueError(f"the dump holds {type(est).__name__}, not {cls.__name__}")
        return est

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write ``dumps()`` to ``path`` atomically (temp file in the folder, fsync, rename)."""
        write_atomic(Path(path), self.dumps())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OutputTokenEstimator:
        """Restore an estimator written by ``dump``."""
        return cls.loads(Path(path).read_bytes())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

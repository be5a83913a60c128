"""The drift controller: per-tenant AIMD on concurrency, driven by output-length drift.

Per tenant: the drift ratio, the geometric mean of ``(1 + actual) / (1 + predicted)`` output
tokens over the last ``window`` completions (robust to a cold estimator's wild first
predictions, which a ratio of sums lets dominate the window), and a River change detector
(``adwin``, or ``page-hinkley`` in mode ``up``) fed with each completion's log ratio. From ``min_samples`` completions on, each
completion (:meth:`DriftController.observe`) may act:

* drifting — the window's mean log ratio exceeds ``log(threshold)`` by ``confidence``
  standard errors (single requests scatter widely around a good prediction; noise must not
  throttle a tenant): limit <- ``max(min_limit, floor(limit * beta))``, at once
  when the detector just fired, else at most once per ``cooldown`` completions. A detection
  also trims the window to its last ``min_samples`` entries, so the ratio shows the new
  regime at once. A tenant of level <= ``compensate_level`` (premium) is never throttled:
  it gets ``boost`` (``driftsched`` raises it ``max_boost`` levels) and, if ``overflow``,
  elastic overflow capacity.
* ratio <= ``recover_below`` (the estimator caught up): limit += ``increase`` per
  ``cooldown`` completions, up to the configured limit; boost/overflow are withdrawn.
  Between the two thresholds nothing changes (hysteresis).

SLO hook (:meth:`~DriftController.on_attainment`): when a level's SLO attainment is under
``attainment_target``, each non-compensated tenant of a larger level gets one decrease and
no increase for ``attainment_hold_s``. A tenant without a configured limit counts as
``unlimited_as`` (reported ``None`` while untouched). Every action is recorded
(:class:`policies.base.DriftStatus`); time comes from the injected clock. Not thread-safe:
event loop only. Replicas fed the same completion stream in the same order agree.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from policies.base import Clock, DriftAction, DriftStatus, TenantState
from policies.registry import check


@dataclass(frozen=True, slots=True)
class DriftParams:
    window: int = 20
    #: a tenant's first completions only train the estimator (its cold-start errors are
    #: not drift): the controller starts watching after this many
    warmup: int = 20
    #: standard errors the mean log ratio must clear log(threshold) by to count as drift
    confidence: float = 1.5
    min_samples: int = 10
    threshold: float = 1.5
    recover_below: float = 1.2
    beta: float = 0.5
    increase: int = 1
    cooldown: int = 5
    min_limit: int = 1
    unlimited_as: int = 64
    detector: str = "adwin"
    compensate_level: int = 0
    overflow: bool = False
    attainment_target: float = 0.9
    attainment_hold_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("window", "min_samples", "increase", "cooldown", "min_limit", "unlimited_as"):
            check(name, getattr(self, name))
        check("warmup", self.warmup, strict=False)
        check("confidence", self.confidence, strict=False)
        check("recover_below", self.recover_below)
        check("threshold", self.threshold, self.recover_below)
        check("attainment_hold_s", self.attainment_hold_s, strict=False)
        for ok, why in (
            (self.min_samples <= self.window, "min_samples: must be <= window"),
            (0.0 < self.beta < 1.0, "beta: must be in (0, 1)"),
            (self.detector in _DETECTORS, "detector: must be 'adwin' or 'page-hinkley'"),
            (0.0 <= self.attainment_target <= 1.0, "attainment_target: must be in [0, 1]"),
        ):
            if not ok:
                raise ValueError(why)


class _Detector(Protocol):
    @property
    def drift_detected(self) -> bool: ...

    def update(self, x: float) -> None: ...


def _adwin() -> _Detector:
    from river import drift  # imported on first use: river's import takes seconds

    return drift.ADWIN()  # type: ignore[no-untyped-call]


def _page_hinkley() -> _Detector:
    from river import drift

    return drift.PageHinkley(mode="up")


_DETECTORS: dict[str, Callable[[], _Detector]] = {"adwin": _adwin, "page-hinkley": _page_hinkley}


class _Track:
    """Mutable per-tenant record; only the controller touches it."""

    def __init__(self, p: DriftParams, level: int, base: int | None) -> None:
        self.level, self.base, self.ceiling = level, base, base or p.unlimited_as
        self.limit = self.ceiling
        #: per completion: log((1 + actual) / (1 + predicted)), clipped to +-log(16)
        self.window: deque[float] = deque()
        self.sum_log = self.sum_sq = 0.0
        self.detector = _DETECTORS[p.detector]()
        self.detections = self.decreases = self.increases = self.since_change = 0
        self.seen = 0
        self.boost = self.overflow = False
        self.last_action: DriftAction = "none"
        self.last_action_at: float | None = None
        self.hold_until = -math.inf


class DriftController:
    """Per-tenant drift ratio, change detection and AIMD concurrency limits (module doc)."""

    def __init__(self, params: DriftParams | None = None, *, clock: Clock) -> None:
        self.params = params or DriftParams()
        self._clock = clock
        self._tracks: dict[str, _Track] = {}

    def configure(self, tenant: str, level: int, base_limit: int | None) -> None:
        """Declare or update a tenant (idempotent; call whenever its config is read)."""
        t = self._tracks.get(tenant)
        if t is None:
            self._tracks[tenant] = _Track(self.params, level, base_limit)
            return
        new = base_limit or self.params.unlimited_as
        t.limit = new if t.limit == t.ceiling else min(t.limit, new)
        t.level, t.base, t.ceiling = level, base_limit, new

    def observe(self, tenant: str, predicted: float, actual: float) -> DriftAction:
        """A completion of ``tenant``: predicted (median) vs actual output tokens. Returns
        the action taken now. ``KeyError`` for a tenant never configured."""
        p, t = self.params, self._tracks[tenant]
        t.seen += 1
        if t.seen <= p.warmup:
            return "none"
        pred, act = max(float(predicted), 1.0), max(float(actual), 0.0)
        lr = min(_MAX_LOG, max(-_MAX_LOG, math.log((1.0 + act) / (1.0 + pred))))
        t.window.append(lr)
        t.sum_log += lr
        t.sum_sq += lr * lr
        t.detector.update(lr)
        detected = bool(t.detector.drift_detected)
        t.detections += detected
        keep = p.min_samples if detected else p.window
        while len(t.window) > keep:
            old = t.window.popleft()
            t.sum_log -= old
            t.sum_sq -= old * old
        t.since_change += 1
        if len(t.window) < p.min_samples:
            return "none"
        ratio = _ratio(t)
        # drifting = the window's mean log ratio is above log(threshold) with confidence
        # (its lower bound, ``confidence`` standard errors down): single requests' lengths
        # vary a lot around any prediction, and noise must not look like drift
        drifting = _lower_bound(t, p.confidence) > math.log(p.threshold)
        if drifting and t.level <= p.compensate_level:
            if t.boost:
                return "none"
            t.boost, t.overflow = True, p.overflow
            return self._record(t, "compensate")
        if drifting and (detected or t.since_change >= p.cooldown):
            return self._decrease(t, "decrease")
        if ratio > p.recover_below:
            return "none"
        if t.boost:
            t.boost = t.overflow = False
            return self._record(t, "restore")
        if t.limit >= t.ceiling or t.since_change < p.cooldown or self._clock.time() < t.hold_until:
            return "none"
        t.limit, t.since_change = min(t.ceiling, t.limit + p.increase), 0
        t.increases += 1
        return self._record(t, "increase")

    def on_attainment(self, level: int, attainment: float) -> tuple[str, ...]:
        """SLO attainment of class ``level`` was measured. Below target, throttle each
        non-compensated tenant of a larger level once per ``attainment_hold_s`` and hold
        its recovery for as long. Returns the tenants throttled now (sorted)."""
        p, now = self.params, self._clock.time()
        if attainment >= p.attainment_target:
            return ()
        hit = []
        for name in sorted(self._tracks):
            t = self._tracks[name]
            if t.level > level and t.level > p.compensate_level and now >= t.hold_until:
                self._decrease(t, "slo_decrease")
                t.hold_until = now + p.attainment_hold_s
                hit.append(name)
        return tuple(hit)

    def limit(self, tenant: str) -> int | None:
        """The tenant's current concurrency limit (None: unlimited and untouched)."""
        t = self._tracks[tenant]
        return None if t.base is None and t.limit >= t.ceiling else t.limit

    def annotate(self, state: TenantState) -> TenantState:
        """``state`` with the controller's limit, ratio, boost and overflow filled in."""
        t = self._tracks.get(state.name)
        if t is None:
            return state
        ratio = _ratio(t) if len(t.window) >= self.params.min_samples else 1.0
        limit = self.limit(state.name)
        return replace(state, limit=limit, drift_ratio=ratio, boost=t.boost, overflow=t.overflow)

    def status(self, tenant: str) -> DriftStatus:
        t, p = self._tracks[tenant], self.params
        state: Literal["warmup", "ok", "drifting", "recovering"] = "ok"
        if len(t.window) < p.min_samples:
            state = "warmup"
        elif _ratio(t) > p.threshold:
            state = "drifting"
        elif t.boost or t.limit < t.ceiling:
            state = "recovering"
        return DriftStatus(
            tenant, t.level, _ratio(t), len(t.window), self.limit(tenant), t.base, state,
            t.detections, t.boost, t.overflow, t.last_action, t.last_action_at,
            t.decreases, t.increases,
        )  # fmt: skip

    def statuses(self) -> dict[str, DriftStatus]:
        return {name: self.status(name) for name in sorted(self._tracks)}

    def _decrease(self, t: _Track, action: DriftAction) -> DriftAction:
        t.since_change = 0
        new = max(self.params.min_limit, math.floor(t.limit * self.params.beta))
        if new == t.limit:
            return "none"
        t.limit, t.decreases = new, t.decreases + 1
        return self._record(t, action)

    def _record(self, t: _Track, action: DriftAction) -> DriftAction:
        t.last_action, t.last_action_at = action, self._clock.time()
        return action


_MAX_LOG = math.log(16.0)


def _lower_bound(t: _Track, z: float) -> float:
    """Mean log ratio minus ``z`` standard errors (the window's samples)."""
    n = len(t.window)
    if n == 0:
        return 0.0
    mean = t.sum_log / n
    var = max(0.0, t.sum_sq / n - mean * mean)
    return mean - z * math.sqrt(var / n)


def _ratio(t: _Track) -> float:
    """Geometric mean of (1 + actual) / (1 + predicted) over the window: robust to a few
    wild predictions (a cold estimator's prior), symmetric in over/under-prediction."""
    return math.exp(t.sum_log / len(t.window)) if t.window else 1.0

"""The drift controller: per-tenant AIMD on concurrency, driven by output-length drift and
by the SLO attainment of more important classes.

**Signal.** Per completion, the log ratio ``log((1 + actual) / (1 + predicted))`` output
tokens. A tenant *drifts* when the mean of its last ``window`` log ratios rises above its
own **baseline** (the tenant's usual log ratio: a running mean, then an exponential mean
over ``baseline_window`` completions, fed with the samples that leave the window, and held
still while the tenant drifts, for at most ``baseline_window`` completions) by more
than ``log(threshold)``, with ``confidence`` standard errors to spare. Relative to the
baseline, not to 1: an estimator that is persistently off for a tenant (a cold start, a
population it has not learnt, stale predictions made at enqueue under a deep queue) is
miscalibrated, not drifting, and throttling for it only wastes capacity; a *change* of the
tenant's outputs against what the estimator predicts for it is drift. ``ratio`` (status,
metrics, ``driftsched``'s slack) is ``exp(window mean - baseline)``. A River change detector
(``adwin``, or ``page-hinkley`` in mode ``up``) on the log ratios trims the window to its
last ``min_samples`` entries when it fires, so the ratio shows a new regime at once. The
first ``warmup`` completions, and those of the first ``warmup_s`` seconds, only train the
estimator; detection starts once
``min_samples`` samples have reached the baseline.

**Gate** (``gate``). With ``"slo"`` (default), a drifting tenant is throttled only while a
more important level is under **SLO pressure** (:meth:`~DriftController.on_attainment`
reported an attainment under ``attainment_target`` within the last ``attainment_hold_s``):
the limit exists to keep those classes within their SLOs, and while they are, cutting a
tenant only wastes capacity (under sustained overload, false alarms from length noise and
completion order otherwise throttle tenants that do not drift). ``"none"``: act on drift
alone.

**Actions**, per completion (:meth:`~DriftController.observe`):

* drifting and gated through: limit <- ``max(min_limit, floor(limit * beta))``, at once
  when the detector just fired, else at most once per ``cooldown`` completions; never twice
  within ``cooldown_s`` seconds (a limit acts as in-flight requests finish). A tenant of
  level <= ``compensate_level`` (premium) is never throttled: it gets ``boost``
  (``driftsched`` raises it ``max_boost`` levels) and, if ``overflow``, elastic overflow
  capacity (ungated: it costs nobody capacity).
* ratio <= ``recover_below`` (the estimator caught up), or no SLO pressure on a more
  important level: the limit grows, at most once per ``cooldown`` completions and
  ``cooldown_s`` seconds, by ``increase`` while under pressure (additive) and doubling
  without (multiplicative: a tenant cut to 1 completes too few requests to climb back one
  by one); :meth:`~DriftController.tick` (the gateway calls it every second) does the same
  without waiting for completions. Boost/overflow are withdrawn when the ratio is back. Between the two thresholds, under pressure, nothing changes.

**SLO hook** (:meth:`~DriftController.on_attainment`): the gateway reports each level's
rolling attainment. Under ``attainment_target`` the level is under pressure for
``attainment_hold_s``, and each *drifting* non-compensated tenant of a larger level gets
one decrease (``slo_decrease``) and no increase for ``attainment_hold_s``. A tenant without
a configured limit counts as ``unlimited_as`` (reported ``None`` while untouched). Every
action is recorded (:class:`policies.base.DriftStatus`); time comes from the injected clock.
Not thread-safe: event loop only. Replicas fed the same completion stream in the same order
agree.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from adapters.clock import Clock
from policies.base import DriftAction, DriftStatus, TenantState
from policies.registry import check


@dataclass(frozen=True, slots=True)
class DriftParams:
    window: int = 20
    #: a tenant's first completions only train the estimator (its cold-start errors are
    #: not drift): the controller starts watching after this many
    warmup: int = 20
    #: ... and every completion within this many seconds of its first: during a tenant's
    #: ramp-up its short answers finish first, its long ones later, and that order is not
    #: drift
    warmup_s: float = 30.0
    #: completions the baseline (the tenant's usual log ratio) averages over
    baseline_window: int = 200
    #: standard errors the mean log ratio must clear log(threshold) by to count as drift
    confidence: float = 1.5
    min_samples: int = 10
    threshold: float = 1.5
    recover_below: float = 1.2
    beta: float = 0.5
    increase: int = 1
    cooldown: int = 5
    #: seconds between two limit changes of a tenant: a limit acts as its in-flight
    #: requests finish, so AIMD steps once per such "round trip", not once per completion
    cooldown_s: float = 5.0
    min_limit: int = 1
    unlimited_as: int = 64
    detector: str = "adwin"
    compensate_level: int = 0
    overflow: bool = False
    #: "slo": throttle a drifting tenant only while a more important level misses its SLO
    #: target; "none": on drift alone
    gate: str = "slo"
    attainment_target: float = 0.95
    attainment_hold_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("window", "min_samples", "increase", "cooldown", "min_limit",
                     "unlimited_as", "baseline_window"):
            check(name, getattr(self, name))
        check("warmup", self.warmup, strict=False)
        check("warmup_s", self.warmup_s, strict=False)
        check("confidence", self.confidence, strict=False)
        check("recover_below", self.recover_below)
        check("threshold", self.threshold, self.recover_below)
        check("attainment_hold_s", self.attainment_hold_s, strict=False)
        check("cooldown_s", self.cooldown_s, strict=False)
        for ok, why in (
            (self.min_samples <= self.window, "min_samples: must be <= window"),
            (0.0 < self.beta < 1.0, "beta: must be in (0, 1)"),
            (self.detector in _DETECTORS, "detector: must be 'adwin' or 'page-hinkley'"),
            (self.gate in ("slo", "none"), "gate: must be 'slo' or 'none'"),
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
        #: the tenant's usual log ratio (and its variance), from the samples that left the
        #: window
        self.baseline = self.baseline_var = 0.0
        self.baseline_n = 0
        #: the last verdict, and completions the baseline has been held still for
        self.drifting = False
        self.frozen = 0
        self.detector = _DETECTORS[p.detector]()
        self.detections = self.decreases = self.increases = self.since_change = 0
        self.seen = 0
        self.first_at: float | None = None
        self.boost = self.overflow = False
        self.last_action: DriftAction = "none"
        self.last_action_at: float | None = None
        self.hold_until = -math.inf
        #: when the limit last changed (cooldown_s)
        self.changed_at = -math.inf


class DriftController:
    """Per-tenant drift ratio, change detection and AIMD concurrency limits (module doc)."""

    def __init__(self, params: DriftParams | None = None, *, clock: Clock) -> None:
        self.params = params or DriftParams()
        self._clock = clock
        self._tracks: dict[str, _Track] = {}
        #: level -> until when it counts as under SLO pressure
        self._pressure: dict[int, float] = {}

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
        now = self._clock.time()
        if t.first_at is None:
            t.first_at = now
        if t.seen <= p.warmup or now - t.first_at < p.warmup_s:
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
            # while the tenant drifts under pressure the baseline holds still (else it would
            # absorb the drift it acts on), for at most baseline_window completions: then
            # the new level is the tenant's normal. Without pressure it is absorbed: a
            # drift nobody suffered from is the tenant's new normal, not a later alarm.
            if t.drifting and t.frozen < p.baseline_window and self._pressured(t):
                t.frozen += 1
                continue
            t.baseline_n += 1
            a = 1.0 / min(t.baseline_n, p.baseline_window)
            d = old - t.baseline
            t.baseline += a * d
            t.baseline_var = (1.0 - a) * (t.baseline_var + a * d * d)
        t.since_change += 1
        if len(t.window) < p.min_samples or t.baseline_n < p.min_samples:
            return "none"
        drifting = t.drifting = self._drifting(t)
        if not drifting:
            t.frozen = 0
        if drifting and t.level <= p.compensate_level:
            if t.boost:
                return "none"
            t.boost, t.overflow = True, p.overflow
            return self._record(t, "compensate")
        pressured = self._pressured(t)
        now = self._clock.time()
        if (drifting and pressured and (detected or t.since_change >= p.cooldown)
                and now - t.changed_at >= p.cooldown_s):
            return self._decrease(t, "decrease")
        settled = _ratio(t) <= p.recover_below
        if not settled and (pressured or t.level <= p.compensate_level):
            return "none"
        if t.boost and settled:
            t.boost = t.overflow = False
            return self._record(t, "restore")
        if t.since_change < p.cooldown:
            return "none"
        return self._increase(t, pressured, now)

    def tick(self) -> tuple[tuple[str, DriftAction], ...]:
        """Time-based recovery (call about once a second): a throttled tenant completes few
        requests, so it must not depend on its completions to grow back. Each tenant under
        its ceiling, out of its hold and with ``cooldown_s`` since its last change grows
        (doubling without pressure, by ``increase`` with pressure if its ratio is back under
        ``recover_below``). Returns (tenant, action) for the tenants changed."""
        now, p, out = self._clock.time(), self.params, []
        for name in sorted(self._tracks):
            t = self._tracks[name]
            if t.limit >= t.ceiling or t.level <= p.compensate_level:
                continue
            pressured = self._pressured(t)
            if pressured and not (self._ready(t) and _ratio(t) <= p.recover_below):
                continue
            if self._increase(t, pressured, now) != "none":
                out.append((name, t.last_action))
        return tuple(out)

    def _increase(self, t: _Track, pressured: bool, now: float) -> DriftAction:
        p = self.params
        if t.limit >= t.ceiling or now < t.hold_until or now - t.changed_at < p.cooldown_s:
            return "none"
        step = p.increase if pressured else max(p.increase, t.limit)
        t.limit, t.since_change, t.changed_at = min(t.ceiling, t.limit + step), 0, now
        t.increases += 1
        return self._record(t, "increase")

    def on_attainment(self, level: int, attainment: float) -> tuple[str, ...]:
        """SLO attainment of class ``level`` was measured. Below target, the level is under
        pressure for ``attainment_hold_s``, and each drifting non-compensated tenant of a
        larger level is throttled once per ``attainment_hold_s`` (its recovery held as long).
        Returns the tenants throttled now (sorted)."""
        p, now = self.params, self._clock.time()
        if attainment >= p.attainment_target:
            return ()
        self._pressure[level] = now + p.attainment_hold_s
        hit = []
        for name in sorted(self._tracks):
            t = self._tracks[name]
            if (t.level > level and t.level > p.compensate_level and now >= t.hold_until
                    and self._ready(t) and self._drifting(t)):
                if self._decrease(t, "slo_decrease") != "none":
                    hit.append(name)
                t.hold_until = now + p.attainment_hold_s
        return tuple(hit)

    def under_pressure(self) -> tuple[int, ...]:
        """Levels whose SLO attainment was under target within ``attainment_hold_s``."""
        now = self._clock.time()
        return tuple(sorted(lv for lv, until in self._pressure.items() if until > now))

    def limit(self, tenant: str) -> int | None:
        """The tenant's current concurrency limit (None: unlimited and untouched)."""
        t = self._tracks[tenant]
        return None if t.base is None and t.limit >= t.ceiling else t.limit

    def annotate(self, state: TenantState) -> TenantState:
        """``state`` with the controller's limit, ratio, boost and overflow filled in."""
        t = self._tracks.get(state.name)
        if t is None:
            return state
        ratio = _ratio(t) if self._ready(t) else 1.0
        limit = self.limit(state.name)
        return replace(state, limit=limit, drift_ratio=ratio, boost=t.boost, overflow=t.overflow)

    def status(self, tenant: str) -> DriftStatus:
        t, p = self._tracks[tenant], self.params
        state: Literal["warmup", "ok", "drifting", "recovering"] = "ok"
        ready = self._ready(t)
        if not ready:
            state = "warmup"
        elif _ratio(t) > p.threshold:
            state = "drifting"
        elif t.boost or t.limit < t.ceiling:
            state = "recovering"
        return DriftStatus(
            tenant, t.level, _ratio(t) if ready else 1.0, len(t.window), self.limit(tenant),
            t.base, state, t.detections, t.boost, t.overflow, t.last_action, t.last_action_at,
            t.decreases, t.increases, math.exp(t.baseline), self._pressured(t),
        )  # fmt: skip

    def statuses(self) -> dict[str, DriftStatus]:
        return {name: self.status(name) for name in sorted(self._tracks)}

    def _ready(self, t: _Track) -> bool:
        m = self.params.min_samples
        return len(t.window) >= m and t.baseline_n >= m

    def _drifting(self, t: _Track) -> bool:
        """The window's mean log ratio exceeds the baseline by log(threshold), with
        ``confidence`` standard errors to spare (single requests' lengths vary a lot around
        any prediction, and noise must not look like drift)."""
        p = self.params
        n = len(t.window)
        mean = t.sum_log / n
        var_w = max(0.0, t.sum_sq / n - mean * mean)
        # the baseline is an estimate too: a running mean, then an exponential one whose
        # variance is that of a mean of ~2N - 1 samples
        n_b = t.baseline_n if t.baseline_n < p.baseline_window else 2 * p.baseline_window - 1
        se = math.sqrt(var_w / n + t.baseline_var / n_b)
        return mean - t.baseline - p.confidence * se > math.log(p.threshold)

    def _pressured(self, t: _Track) -> bool:
        if self.params.gate == "none":
            return True
        now = self._clock.time()
        return any(lv < t.level and until > now for lv, until in self._pressure.items())

    def _decrease(self, t: _Track, action: DriftAction) -> DriftAction:
        t.since_change = 0
        new = max(self.params.min_limit, math.floor(t.limit * self.params.beta))
        if new == t.limit:
            return "none"
        t.limit, t.decreases, t.changed_at = new, t.decreases + 1, self._clock.time()
        return self._record(t, action)

    def _record(self, t: _Track, action: DriftAction) -> DriftAction:
        t.last_action, t.last_action_at = action, self._clock.time()
        return action


_MAX_LOG = math.log(16.0)


def _ratio(t: _Track) -> float:
    """``exp(window mean - baseline)``: the geometric mean of (1 + actual) / (1 + predicted)
    over the window, relative to the tenant's usual one; robust to a few wild predictions,
    symmetric in over/under-prediction."""
    return math.exp(t.sum_log / len(t.window) - t.baseline) if t.window else 1.0

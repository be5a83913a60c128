"""Token-bucket and UTC-day arithmetic shared by the stores, and the decision they produce.

A bucket of capacity ``c`` (a per-minute limit) holds at most ``c`` tokens and refills at
``c / 60`` tokens per second; it is stored as ``(tokens, last)`` and refilled lazily from the
caller's ``now``. A bucket seen for the first time is full. ``tokens`` may go negative after a
positive :meth:`~proxy.store.base.Store.reconcile` (a debt paid by refill).

The Lua scripts in ``lua/`` repeat this arithmetic operation for operation, so both stores
give bit-identical answers for the same inputs.

**Bounds.** Lua numbers are doubles, exact for integers up to 2**53 only, so the arithmetic
is kept inside that range in both stores: a charge above :data:`MAX_CHARGE` is refused as
``too_large`` (nothing charged) and a negative one charges nothing; a correction is clamped
to ±:data:`MAX_DELTA`; the day counter stays in 0..:data:`MAX_COUNTER`. (Without them one
request with ``max_tokens: 10**30`` charged 1e30 and its correction took the tenant's whole
day back to 0: a quota bypass.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.store.base import Decision, Limits, LimitState, Reason

DAY_S = 86400.0
#: the largest charge one request may make (far above any engine's context)
MAX_CHARGE = 2**40
#: the largest correction one request may make (charge and real usage both bounded)
MAX_DELTA = 2 * MAX_CHARGE
#: the largest value a token counter holds (integers stay exact in a double)
MAX_COUNTER = 2**53 - 1


def charge_of(tokens: int) -> int:
    """A charge as the stores take it: ``tokens`` below 0 count as 0."""
    return max(0, tokens)


def clamp_delta(delta: int) -> int:
    return max(-MAX_DELTA, min(MAX_DELTA, delta))


def clamp_counter(value: int) -> int:
    return max(0, min(MAX_COUNTER, value))


def utc_day(now: float) -> int:
    """Days since the epoch, UTC (the quota period ``now`` falls in)."""
    return math.floor(now / DAY_S)


def next_midnight(now: float) -> float:
    """Epoch seconds of the next 00:00 UTC after ``now``."""
    return (utc_day(now) + 1) * DAY_S


@dataclass(slots=True)
class Bucket:
    tokens: float
    last: float


def refill(bucket: Bucket | None, capacity: int, now: float) -> Bucket:
    """The bucket as of ``now`` (a new one when ``bucket`` is ``None``); never above capacity.

    ``last`` never moves backwards, so a replica whose clock lags cannot refill twice.
    """
    if bucket is None:
        return Bucket(float(capacity), now)
    tokens, last = bucket.tokens, bucket.last
    if now > last:
        tokens = tokens + (now - last) * capacity / 60
        last = now
    return Bucket(min(tokens, float(capacity)), last)


def wait_s(have: float, need: float, capacity: int) -> float:
    """Seconds until a bucket holding ``have`` tokens holds ``need``."""
    return (need - have) * 60 / capacity


def _reset_s(tokens: float | None, capacity: int | None) -> float:
    if tokens is None or capacity is None:
        return 0.0
    return max(0.0, wait_s(tokens, capacity, capacity))


def _remaining(tokens: float | None) -> int:
    return 0 if tokens is None else max(0, math.floor(tokens))


def decision(
    limits: Limits,
    *,
    reason: Reason | None,
    retry_after_s: float,
    rpm_tokens: float | None,
    tpm_tokens: float | None,
    used_today: int,
) -> Decision:
    """A :class:`Decision` from the bucket levels after the decision (charged or not)."""
    rpm = limits.rpm if rpm_tokens is not None else None
    tpm = limits.tpm if tpm_tokens is not None else None
    state = LimitState(
        limit_requests=rpm,
        remaining_requests=_remaining(rpm_tokens),
        reset_requests_s=_reset_s(rpm_tokens, rpm),
        limit_tokens=tpm,
        remaining_tokens=_remaining(tpm_tokens),
        reset_tokens_s=_reset_s(tpm_tokens, tpm),
    )
    quota = limits.daily_token_quota
    return Decision(
        ok=reason is None,
        reason=reason,
        retry_after_s=retry_after_s,
        state=state,
        quota_remaining=None if quota is None else max(0, quota - used_today),
    )

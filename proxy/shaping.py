"""Rate shaping: RPM/TPM buckets and the daily quota, via the store.

:class:`Shaper` turns a store :class:`~proxy.store.base.Decision` into a charge or the right
429, settles the charge with real usage at the end, and renders OpenAI's ``x-ratelimit-*``
headers. It holds nothing while a request runs: concurrency (the tenant's live limit) and
engine capacity are held once, by the admission queue (:mod:`proxy.admission`).
"""

from __future__ import annotations

import logging
from typing import Any

from adapters.clock import Clock
from adapters.errors import QuotaExceeded, RateLimited, StoreUnavailable
from proxy.store.base import Decision, Limits, LimitState, Store, StoreStep, Tenant
from proxy.store.base import StoreUnavailable as StoreDown

log = logging.getLogger("driftsched.shaping")


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    total = round(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return (f"{h}h" if h else "") + f"{m}m{s}s"


def ratelimit_headers(state: LimitState) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if state.limit_requests is not None:
        out += [
            (b"x-ratelimit-limit-requests", str(state.limit_requests).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, state.remaining_requests)).encode()),
            (b"x-ratelimit-reset-requests", format_reset(state.reset_requests_s).encode()),
        ]
    if state.limit_tokens is not None:
        out += [
            (b"x-ratelimit-limit-tokens", str(state.limit_tokens).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, state.remaining_tokens)).encode()),
            (b"x-ratelimit-reset-tokens", format_reset(state.reset_tokens_s).encode()),
        ]
    return out


def _headers_dict(state: LimitState) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in ratelimit_headers(state)}


class Shaper:
    def __init__(self, store: Store, clock: Clock, fail_open: bool = False) -> None:
        self._store = store
        self._fail_open = fail_open
        self._clock = clock

    async def acquire(self, tenant: Tenant, tokens: int, limits: Limits) -> Decision:
        """Charge every limit, or raise the right 429 (the real wait in ``retry-after``)."""
        try:
            d = await self._store.try_acquire(tenant.name, tokens, limits, self._clock.time())
        except StoreDown as e:
            if self._fail_open:
                log.warning("store unavailable, admitting without limits (fail_open): %s", e)
                return Decision(ok=True)
            log.warning("store unavailable, refusing (fail_open is false): %s", e)
            raise StoreUnavailable(
                "The gateway's state store is unavailable; limits cannot be checked."
            ) from e
        return self._judged(tenant, tokens, limits, d)

    def step(self, tenant: Tenant, tokens: int, limits: Limits) -> StoreStep | None:
        """:meth:`acquire` as a store step for the admission queue to run first in its
        enqueue (one round trip for both); ``None`` when the store has none (memory)."""
        return self._store.acquire_step(tenant.name, tokens, limits, self._clock.time())

    def judge(self, tenant: Tenant, tokens: int, limits: Limits, reply: Any) -> Decision:
        """The decision of a :meth:`step`'s reply: as :meth:`acquire`'s (raises its 429)."""
        return self._judged(tenant, tokens, limits, self._store.decision_of(reply, limits))

    def finish_step(
        self, tenant: str, delta_tokens: int, limits: Limits, *,
        requests: int, errors: int, tokens_in: int, tokens_out: int,
    ) -> StoreStep | None:
        """:meth:`finish` as a store step for the queue's release; ``None`` when the store
        has none (memory: call :meth:`finish`) or there is nothing to settle."""
        return self._store.finish_step(
            tenant, delta_tokens, limits, self._clock.time(),
            requests=requests, errors=errors, tokens_in=tokens_in, tokens_out=tokens_out,
        )

    def _judged(self, tenant: Tenant, tokens: int, limits: Limits, d: Decision) -> Decision:
        if d.ok:
            return d
        hdrs = _headers_dict(d.state)
        if d.reason == "too_large":
            raise RateLimited(
                f"Request too large for tenant {tenant.name!r}: it needs about {tokens} "
                f"tokens, more than the limit of {limits.tpm or limits.daily_token_quota}.",
                retry_after_s=60.0,
                limit_type="tokens",
                code="request_too_large",
                headers=hdrs,
                should_retry=False,
            )
        if d.reason == "quota":
            raise QuotaExceeded(
                f"Tenant {tenant.name!r} has used its daily token quota "
                f"({limits.daily_token_quota} tokens); it resets at 00:00 UTC.",
                retry_after_s=d.retry_after_s,
                headers=hdrs,
            )
        kind = "requests" if d.reason == "rpm" else "tokens"
        limit = limits.rpm if d.reason == "rpm" else limits.tpm
        raise RateLimited(
            f"Rate limit reached for tenant {tenant.name!r} on {kind} per min: "
            f"limit {limit}. Please try again in {format_reset(d.retry_after_s)}.",
            retry_after_s=d.retry_after_s,
            limit_type=kind,
            headers=hdrs,
        )

    async def finish(
        self, tenant: str, delta_tokens: int, limits: Limits, *,
        requests: int, errors: int, tokens_in: int, tokens_out: int,
    ) -> None:
        """Correct the token charge by ``delta_tokens`` and count usage, in one store call.
        Store failures are logged: the usage of this request is then lost."""
        try:
            await self._store.finish(
                tenant, delta_tokens, limits, self._clock.time(),
                requests=requests, errors=errors, tokens_in=tokens_in, tokens_out=tokens_out,
            )
        except StoreDown as e:
            log.warning("request accounting failed: %s", e)

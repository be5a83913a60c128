"""Rate shaping: RPM/TPM buckets, concurrency leases and the daily quota, via the store.

:class:`Shaper` turns a store :class:`~proxy.store.base.Decision` into admission or the right
429/503, waits (notified, not polling) for a concurrency slot up to the tenant's queue
timeout, renews the leases this replica holds, and renders OpenAI's ``x-ratelimit-*``
headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from proxy.clock import Clock
from proxy.errors import QueueTimeout, QuotaExceeded, RateLimited, StoreUnavailable
from proxy.store.base import Decision, Limits, LimitState, Store, Tenant
from proxy.store.base import StoreUnavailable as StoreDown

log = logging.getLogger("driftsched.shaping")

#: longest single wait for a release notification before re-checking (expired leases)
_RECHECK_S = 1.0


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
    def __init__(self, store: Store, clock: Clock, lease_ttl_s: float, fail_open: bool = False) -> None:
        self._store = store
        self._fail_open = fail_open
        self._clock = clock
        self._ttl = lease_ttl_s
        #: leases held by this replica: lease_id -> tenant
        self.held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self, tenant: Tenant, lease_id: str, tokens: int, limits: Limits) -> Decision:
        """Charge every limit and hold a concurrency lease, or raise the right error.

        Waits for a concurrency slot up to ``tenant.queue_timeout_s``; RPM/TPM refusals are
        immediate 429s carrying the real wait. Cancellation while waiting holds nothing.
        """
        deadline = self._clock.monotonic() + tenant.queue_timeout_s
        while True:
            try:
                d = await self._store.try_acquire(
                    tenant.name, lease_id, tokens, limits, self._clock.time(), self._ttl
                )
            except StoreDown as e:
                if self._fail_open:
                    log.warning("store unavailable, admitting without limits (fail_open): %s", e)
                    return Decision(ok=True)
                log.warning("store unavailable, refusing (fail_open is false): %s", e)
                raise StoreUnavailable(
                    "The gateway's state store is unavailable; limits cannot be checked."
                ) from e
            if d.ok:
                self.held[lease_id] = tenant.name
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
            if d.reason in ("rpm", "tpm"):
                kind = "requests" if d.reason == "rpm" else "tokens"
                limit = limits.rpm if d.reason == "rpm" else limits.tpm
                raise RateLimited(
                    f"Rate limit reached for tenant {tenant.name!r} on {kind} per min: "
                    f"limit {limit}. Please try again in {format_reset(d.retry_after_s)}.",
                    retry_after_s=d.retry_after_s,
                    limit_type=kind,
                    headers=hdrs,
                )
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise QueueTimeout(
                    f"Tenant {tenant.name!r} is at its concurrency limit "
                    f"({limits.max_concurrency}) and no slot freed within "
                    f"{tenant.queue_timeout_s:g}s.",
                    retry_after_s=1.0,
                )
            await self._store.wait_release(tenant.name, min(remaining, _RECHECK_S))

    async def finish(
        self, tenant: str, lease_id: str | None, delta_tokens: int, limits: Limits, *,
        requests: int, errors: int, tokens_in: int, tokens_out: int,
    ) -> None:
        """Free the lease (if this replica holds it), correct the token charge by
        ``delta_tokens`` and count usage, in one store call. Store failures are logged: the
        lease then expires on its own and the usage of this request is lost."""
        held = lease_id is not None and self.held.pop(lease_id, None) is not None
        try:
            await self._store.finish(
                tenant, lease_id if held else None, delta_tokens, limits, self._clock.time(),
                requests=requests, errors=errors, tokens_in=tokens_in, tokens_out=tokens_out,
            )
        except StoreDown as e:
            log.warning("request accounting failed; its lease expires in %.0fs: %s", self._ttl, e)

    # -- lease renewal -------------------------------------------------------------------
    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_loop(), name="lease-renewer")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            if not self.held:
                continue
            try:
                await self._store.renew(
                    [(t, lid) for lid, t in self.held.items()], self._clock.time(), self._ttl
                )
            except Exception:
                log.exception("lease renewal failed; leases expire in %.0fs", self._ttl)

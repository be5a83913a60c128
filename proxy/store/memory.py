"""The embedded store: one process, plain dicts, no services.

Why choose it: a single gateway process (development, tests, small deployments). State is
lost on restart and is not shared between processes; use the redis store for replicas.

Every method runs to completion without awaiting anything, so each one is atomic on the
event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.store.base import Decision, KeyRecord, Limits, OnChange, Reason, Tenant, Usage
from proxy.store.buckets import (
    MAX_CHARGE,
    Bucket,
    charge_of,
    clamp_counter,
    clamp_delta,
    decision,
    next_midnight,
    refill,
    utc_day,
    wait_s,
)

TYPE = "memory"


@dataclass(slots=True)
class _Limited:
    """Limit state of one tenant."""

    rpm: Bucket | None = None
    tpm: Bucket | None = None
    #: UTC day -> tokens charged against that day's quota (today and yesterday kept)
    days: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    def add_today(self, now: float, delta: int) -> int:
        day = utc_day(now)
        used = clamp_counter(self.days.get(day, 0) + delta)
        self.days = {d: n for d, n in self.days.items() if d >= day - 1}
        self.days[day] = used
        return used


class MemoryStore:
    """:class:`~proxy.store.base.Store` in process memory. Safe for many tasks on one loop."""

    def __init__(self) -> None:
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._by_digest: dict[str, str] = {}
        self._limited: dict[str, _Limited] = {}
        self._seeded: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def seeded(self) -> str | None:
        return self._seeded

    async def mark_seeded(self, marker: str) -> None:
        self._seeded = marker

    # -- tenants -------------------------------------------------------------------------
    async def put_tenant(self, tenant: Tenant) -> None:
        self._tenants[tenant.name] = tenant

    async def get_tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    async def list_tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    async def delete_tenant(self, name: str, now: float | None = None) -> bool:
        when = time.time() if now is None else now
        for rec in list(self._keys.values()):
            if rec.tenant == name and (rec.revoked_at is None or rec.revoked_at > when):
                self._keys[rec.key_id] = replace(rec, revoked_at=when)
        st = self._limited.get(name)
        if st is not None:
            st.requests = st.errors = st.tokens_in = st.tokens_out = 0
        return self._tenants.pop(name, None) is not None

    # -- keys ----------------------------------------------------------------------------
    async def put_key(self, record: KeyRecord) -> None:
        old = self._keys.get(record.key_id)
        if old is not None and old.digest != record.digest:
            self._by_digest.pop(old.digest, None)
        self._keys[record.key_id] = record
        self._by_digest[record.digest] = record.key_id

    async def get_key_by_digest(self, digest: str) -> KeyRecord | None:
        key_id = self._by_digest.get(digest)
        return None if key_id is None else self._keys.get(key_id)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(
        self, tenant: str | None = None, prefix: str | None = None
    ) -> list[KeyRecord]:
        found = [
            r
            for r in self._keys.values()
            if (tenant is None or r.tenant == tenant)
            and (prefix is None or r.prefix.startswith(prefix))
        ]
        return sorted(found, key=lambda r: (r.created_at, r.key_id))

    # -- limits ------------------------------------------------------------------------------
    def _state(self, tenant: str) -> _Limited:
        st = self._limited.get(tenant)
        if st is None:
            st = self._limited[tenant] = _Limited()
        return st

    async def try_acquire(self, tenant: str, tokens: int, limits: Limits, now: float) -> Decision:
        tokens = charge_of(tokens)
        st = self._state(tenant)
        rpm = None if limits.rpm is None else refill(st.rpm, limits.rpm, now)
        tpm = None if limits.tpm is None else refill(st.tpm, limits.tpm, now)
        used = st.days.get(utc_day(now), 0)
        quota = limits.daily_token_quota

        reason: Reason | None = None
        retry = 0.0
        if tokens > MAX_CHARGE or (limits.tpm is not None and tokens > limits.tpm) or (
            quota is not None and tokens > quota
        ):
            reason, retry = "too_large", math.inf
        elif quota is not None and used + tokens > quota:
            reason, retry = "quota", next_midnight(now) - now
        elif rpm is not None and limits.rpm is not None and rpm.tokens < 1:
            reason, retry = "rpm", wait_s(rpm.tokens, 1, limits.rpm)
        elif tpm is not None and limits.tpm is not None and tpm.tokens < tokens:
            reason, retry = "tpm", wait_s(tpm.tokens, tokens, limits.tpm)
        else:
            if rpm is not None:
                rpm.tokens -= 1
                st.rpm = rpm
            if tpm is not None:
                tpm.tokens -= tokens
                st.tpm = tpm
            used = st.add_today(now, tokens)
        return decision(
            limits,
            reason=reason,
            retry_after_s=retry,
            rpm_tokens=None if rpm is None else rpm.tokens,
            tpm_tokens=None if tpm is None else tpm.tokens,
            used_today=used,
        )

    async def announce(self, kind: str, name: str) -> None:
        return None  # one process: the admin API already dropped what this one cached

    async def watch(self, on_change: OnChange) -> None:
        await asyncio.Event().wait()  # no other process to hear from

    def acquire_step(self, tenant: str, tokens: int, limits: Limits, now: float) -> None:
        return None  # no script to run in another's: try_acquire is already in-process

    def decision_of(self, reply: Any, limits: Limits) -> Decision:
        raise TypeError("the memory store has no steps")

    def finish_step(
        self, tenant: str, delta_tokens: int, limits: Limits, now: float,
        *, requests: int = 0, errors: int = 0, tokens_in: int = 0, tokens_out: int = 0,
    ) -> None:
        return None

    async def finish(
        self, tenant: str, delta_tokens: int, limits: Limits, now: float,
        *, requests: int = 0, errors: int = 0, tokens_in: int = 0, tokens_out: int = 0,
    ) -> None:
        await self.reconcile(tenant, delta_tokens, limits, now)
        await self.record_usage(tenant, now, requests=requests, errors=errors,
                                tokens_in=tokens_in, tokens_out=tokens_out)

    async def reconcile(self, tenant: str, delta_tokens: int, limits: Limits, now: float) -> None:
        delta_tokens = clamp_delta(delta_tokens)
        if delta_tokens == 0:
            return
        st = self._state(tenant)
        if limits.tpm is not None:
            b = refill(st.tpm, limits.tpm, now)
            b.tokens = min(b.tokens - delta_tokens, float(limits.tpm))
            st.tpm = b
        st.add_today(now, delta_tokens)

    # -- usage ---------------------------------------------------------------------------
    async def record_usage(
        self,
        tenant: str,
        now: float,
        *,
        requests: int = 0,
        errors: int = 0,
        tokens_in: int = 0,
        tokens_out: int = 0,
    ) -> None:
        st = self._state(tenant)
        st.requests += requests
        st.errors += errors
        st.tokens_in += tokens_in
        st.tokens_out += tokens_out

    async def get_usage(self, tenant: str, now: float) -> Usage:
        st = self._limited.get(tenant)
        if st is None:
            return Usage()
        return Usage(
            requests=st.requests,
            errors=st.errors,
            tokens_in=st.tokens_in,
            tokens_out=st.tokens_out,
            tokens_today=st.days.get(utc_day(now), 0),
        )

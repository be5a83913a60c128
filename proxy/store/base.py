"""The state-store contract: value types and the :class:`Store` protocol. No implementation.

Two implementations satisfy it (``memory`` for one process, ``redis`` for N replicas) and one
contract test-suite (``tests/proxy/test_store_contract.py``) runs against both.

Time: every method that depends on time takes ``now`` (seconds since the epoch) from the
caller's injected clock, so tests can drive time. Replicas sharing one Redis are assumed to
have NTP-synchronised clocks (skew of a few ms is harmless for per-minute buckets).

Concurrency: every method is safe to call concurrently from many tasks, and (redis) from many
processes; :meth:`Store.try_acquire` is atomic — either every limit is charged or none is.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Protocol

Reason = Literal["rpm", "tpm", "quota", "too_large"]


class StoreUnavailable(Exception):
    """The backend did not answer (connection refused, lost or timed out).

    Any :class:`Store` method but :meth:`Store.ping` and :meth:`Store.aclose` may raise it;
    the gateway decides between failing open and a 503 (``store.fail_open``).
    """


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant: QoS class, quotas and SLOs. ``None`` for a limit means unlimited."""

    name: str
    qos_class: str = "standard"
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    daily_token_quota: int | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    queue_timeout_s: float = 30.0
    #: empty tuple = every model the backends serve
    allowed_models: tuple[str, ...] = ()
    created_at: float = 0.0

    def allows(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def to_json(self) -> str:
        d = asdict(self)
        d["allowed_models"] = list(self.allowed_models)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Tenant:
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tenant:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["allowed_models"] = tuple(kw.get("allowed_models") or ())
        return cls(**kw)

    def with_changes(self, **changes: Any) -> Tenant:
        if "allowed_models" in changes and changes["allowed_models"] is not None:
            changes["allowed_models"] = tuple(changes["allowed_models"])
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as stored: only its SHA-256 digest, never the key itself."""

    key_id: str
    tenant: str
    digest: str
    #: first characters of the key, safe to show and log (e.g. ``dsk-1a2b3c4d``)
    prefix: str
    name: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None
    #: a rotated key keeps working until this time (grace period), then is invalid
    expires_at: float | None = None

    def active(self, now: float) -> bool:
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> KeyRecord:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class Limits:
    """The rate limits and quota to charge one request against. (Concurrency is not here:
    the admission queue enforces it, with the tenant's live limit.)"""

    rpm: int | None = None
    tpm: int | None = None
    daily_token_quota: int | None = None

    @classmethod
    def of(cls, t: Tenant) -> Limits:
        return cls(rpm=t.rpm, tpm=t.tpm, daily_token_quota=t.daily_token_quota)


@dataclass(frozen=True, slots=True)
class LimitState:
    """What the ``x-ratelimit-*`` headers report. ``None`` limit = unlimited (no header)."""

    limit_requests: int | None = None
    remaining_requests: int = 0
    #: seconds until the request bucket is full again
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """Result of :meth:`Store.try_acquire`.

    ``ok``: every limit was charged. Otherwise nothing was charged, ``reason`` says which
    limit refused first (checked in the order too_large, quota, rpm, tpm) and
    ``retry_after_s`` is the real wait until that limit would allow this request (``inf``
    for ``too_large``).
    """

    ok: bool
    reason: Reason | None = None
    retry_after_s: float = 0.0
    state: LimitState = field(default_factory=LimitState)
    #: tokens left in today's quota after this decision (None = no quota)
    quota_remaining: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Cumulative per-tenant counters since the tenant was created (and for today)."""

    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    #: tokens charged today (UTC) by try_acquire and corrected by reconcile, the same counter
    #: the daily quota checks (kept with or without a quota)
    tokens_today: int = 0


@dataclass(frozen=True, slots=True)
class StoreStep:
    """One store script, as a step that another script on the same Redis runs first (the
    admission queue's enqueue or release: both in one round trip). ``script`` names the
    store script (``try_acquire``, ``reconcile``); ``keys`` and ``args`` are its KEYS and
    ARGV, as the store would send them."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str, ...]


#: what :meth:`Store.watch` calls for each change: ``(kind, name)``
OnChange = Callable[[str, str], Awaitable[None]]


class Store(Protocol):
    """Shared state for the gateway: tenants, keys, rate limits, quotas and usage counters.
    (Concurrency and engine holds are the admission queue's, :mod:`proxy.admission`.)"""

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Open connections, load scripts. Raises on an unreachable backend."""

    async def aclose(self) -> None:
        """Release every resource. Safe to call twice."""

    async def ping(self) -> bool:
        """True when the store answers now (used by ``/readyz``). Never raises."""

    async def seeded(self) -> str | None:
        """The marker :meth:`mark_seeded` last wrote, or ``None`` when the store holds none:
        a new store, or one that lost its data (a Redis restarted without persistence)."""

    async def mark_seeded(self, marker: str) -> None:
        """Record that the configured tenants and keys were written (``marker`` says what)."""

    # -- changes -----------------------------------------------------------------------
    async def announce(self, kind: str, name: str) -> None:
        """Tell every gateway on this store that a ``kind`` (``tenant``, ``key``) named
        ``name`` changed (an admin write), so each drops what it cached of it at once."""

    async def watch(self, on_change: OnChange) -> None:
        """Run until cancelled, calling ``on_change(kind, name)`` for every announcement
        (any replica's, this one's included), and ``("all", "")`` whenever some may have
        been missed (a lost subscription, at its reconnect). Memory: nothing to watch."""

    # -- tenants -----------------------------------------------------------------------
    async def put_tenant(self, tenant: Tenant) -> None:
        """Create or replace a tenant."""

    async def get_tenant(self, name: str) -> Tenant | None:
        """The tenant, or ``None`` when unknown."""

    async def list_tenants(self) -> list[Tenant]:
        """Every tenant, sorted by name."""

    async def delete_tenant(self, name: str, now: float | None = None) -> bool:
        """Delete the tenant, zero its cumulative usage counters and revoke all its keys.

        Keys get ``revoked_at = now`` (``time.time()`` when ``None``) unless already revoked
        earlier; their records stay listable. Limit state (buckets, today's quota use)
        is kept and expires by itself. ``False`` when the tenant did not exist (its keys are
        revoked anyway).
        """

    # -- keys --------------------------------------------------------------------------
    async def put_key(self, record: KeyRecord) -> None:
        """Store a key record (indexed by ``key_id`` and by ``digest``)."""

    async def get_key_by_digest(self, digest: str) -> KeyRecord | None:
        """The record with this digest (active or not), or ``None``."""

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The record with this id, or ``None``."""

    async def list_keys(self, tenant: str | None = None, prefix: str | None = None) -> list[KeyRecord]:
        """Records filtered by tenant and/or key prefix (``startswith``), sorted by creation."""

    # -- limits ------------------------------------------------------------------------
    async def try_acquire(self, tenant: str, tokens: int, limits: Limits, now: float) -> Decision:
        """Atomically check the quota, RPM and TPM; charge all of them or none.

        On success one request is taken from the RPM bucket and ``tokens`` from the TPM
        bucket and the daily quota.
        """

    def acquire_step(self, tenant: str, tokens: int, limits: Limits, now: float) -> StoreStep | None:
        """:meth:`try_acquire` as a :class:`StoreStep` (its reply read by :meth:`decision_of`),
        or ``None`` when this store has no steps (memory): then call :meth:`try_acquire`."""

    def decision_of(self, reply: Any, limits: Limits) -> Decision:
        """The :class:`Decision` of an :meth:`acquire_step`'s reply."""

    def finish_step(
        self, tenant: str, delta_tokens: int, limits: Limits, now: float,
        *, requests: int = 0, errors: int = 0, tokens_in: int = 0, tokens_out: int = 0,
    ) -> StoreStep | None:
        """:meth:`finish` as a :class:`StoreStep`, or ``None`` when this store has no steps
        (then call :meth:`finish`) or there is nothing to do."""

    async def reconcile(self, tenant: str, delta_tokens: int, limits: Limits, now: float) -> None:
        """Correct the TPM bucket and daily quota by ``actual - charged`` tokens.

        Positive deltas charge more (the bucket may go negative: a debt paid by refill);
        negative deltas refund, never above the bucket's capacity.
        """

    async def finish(
        self, tenant: str, delta_tokens: int, limits: Limits, now: float,
        *, requests: int = 0, errors: int = 0, tokens_in: int = 0, tokens_out: int = 0,
    ) -> None:
        """End of a request in one step: :meth:`reconcile` and :meth:`record_usage`. Redis
        sends both in one round trip; each part is atomic on its own."""

    # -- usage -------------------------------------------------------------------------
    async def record_usage(
        self, tenant: str, now: float, *, requests: int = 0, errors: int = 0,
        tokens_in: int = 0, tokens_out: int = 0
    ) -> None:
        """Add to the tenant's cumulative counters."""

    async def get_usage(self, tenant: str, now: float) -> Usage:
        """Counters for the tenant (zeros when unknown), with today's tokens."""

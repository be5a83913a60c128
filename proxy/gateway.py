"""The gateway's parts, built together and owned by one app (no module-level state)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from adapters.base import BackendPool, Router
from adapters.clock import Clock
from adapters.upstream import UpstreamClients
from proxy.auth import Authenticator, Principal
from proxy.config import Settings
from proxy.keys import seeded_record
from proxy.metrics import GatewayMetrics
from proxy.scheduler import Scheduler
from proxy.shaping import Shaper
from proxy.store.base import Store, Tenant
from proxy.store.base import StoreUnavailable as StoreDown

log = logging.getLogger("driftsched.gateway")


@dataclass(eq=False)
class Gateway:
    settings: Settings
    clock: Clock
    store: Store
    auth: Authenticator
    shaper: Shaper
    pool: BackendPool
    router: Router
    clients: UpstreamClients
    metrics: GatewayMetrics
    scheduler: Scheduler
    started_at: float = 0.0

    async def authenticate(self, key: str) -> Principal:
        return await self.auth.authenticate(key)

    def pool_models(self) -> list[str]:
        return self.pool.models()


async def seed_tenants(settings: Settings, store: Store, now: float) -> None:
    """Create or update the tenants (and keys) listed in the configuration."""
    for tc in settings.tenants:
        cls = settings.classes[tc.qos_class]
        existing = await store.get_tenant(tc.name)
        tenant = Tenant(
            name=tc.name,
            qos_class=tc.qos_class,
            weight=tc.weight,
            rpm=tc.rpm,
            tpm=tc.tpm,
            max_concurrency=tc.max_concurrency,
            daily_token_quota=tc.daily_token_quota,
            ttft_slo_ms=tc.ttft_slo_ms if tc.ttft_slo_ms is not None else cls.ttft_slo_ms,
            tpot_slo_ms=tc.tpot_slo_ms if tc.tpot_slo_ms is not None else cls.tpot_slo_ms,
            queue_timeout_s=tc.queue_timeout_s,
            allowed_models=tuple(tc.allowed_models),
            created_at=existing.created_at if existing else now,
        )
        await store.put_tenant(tenant)
        for key in tc.api_keys:
            rec = seeded_record(key, tc.name, now)
            old = await store.get_key(rec.key_id)
            if old is None:
                await store.put_key(rec)
    await store.mark_seeded(seed_marker(settings))
    if settings.tenants:
        log.info("seeded tenants from config", extra={"tenants": [t.name for t in settings.tenants]})


def seed_marker(settings: Settings) -> str:
    """What :func:`seed_tenants` writes to the store once done: the configured tenants."""
    names = ",".join(sorted(t.name for t in settings.tenants))
    return f"{len(settings.tenants)}:{hashlib.sha256(names.encode()).hexdigest()[:16]}"


async def watch_seed(settings: Settings, store: Store, clock: Clock, every_s: float) -> None:
    """Re-seed the configured tenants and keys whenever the store has lost them (its seed
    marker is gone: a Redis restarted without persistence), so their keys work again
    without a gateway restart. Tenants the admin API deleted are not brought back while
    the marker stands. Runs until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            if await store.seeded() is None:
                log.warning("the store lost the configured tenants and keys; seeding them again")
                await seed_tenants(settings, store, clock.time())
        except StoreDown as e:
            log.debug("seed check skipped: %s", e)
        except Exception:
            log.exception("seed check failed")


async def follow_changes(gw: Gateway) -> None:
    """Apply the admin writes of every replica (:meth:`Store.watch`) as they are announced:
    drop the cached tenants and keys (a revoked key stops at once, a new one works at once)
    and give a changed tenant's queued requests its new limit. Runs until cancelled."""

    async def on_change(kind: str, name: str) -> None:
        gw.auth.invalidate()
        if kind != "tenant":
            return
        try:
            tenant = await gw.store.get_tenant(name)
            if tenant is not None:
                await gw.scheduler.tenant_changed(tenant)
        except StoreDown as e:
            log.warning("applying a change of tenant %r failed: %s", name, e)
        except Exception:
            log.exception("applying a change of tenant %r failed", name)

    await gw.store.watch(on_change)

"""The gateway's parts, built together and owned by one app (no module-level state)."""

from __future__ import annotations

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
    if settings.tenants:
        log.info("seeded tenants from config", extra={"tenants": [t.name for t in settings.tenants]})

"""``create_app(settings)``: the ASGI application.

``/v1/*`` goes straight to the raw-ASGI hot path (:mod:`proxy.openai_api`); everything else
(``/admin``, ``/healthz``, ``/readyz``, ``/metrics``, OpenAPI docs) is a FastAPI app. Either
way an exception becomes an error in OpenAI's shape, logged once (the FastAPI side's last
resort is :meth:`DriftSchedApp._api`). The
FastAPI lifespan builds and tears down every part: store, engine pool, HTTP clients, lease
renewal. Nothing lives at module level, so tests can build as many apps as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.base import BackendPool
from adapters.clock import Clock, SystemClock
from adapters.errors import InternalError, UpstreamUnavailable
from adapters.upstream import UpstreamClients
from policies.base import Policy
from policies.drift import DriftController
from policies.registry import build_policy
from proxy.admission.base import QueueCaps
from proxy.admission.build import build_queue
from proxy.auth import Authenticator
from proxy.completions import build_completion_bus
from proxy.config import Settings
from proxy.estimation import load_estimator, save_estimator, save_estimator_periodically
from proxy.gateway import Gateway, follow_changes, seed_tenants, watch_seed
from proxy.metrics import GatewayMetrics
from proxy.openai_api import OpenAIHandler
from proxy.scheduler import Scheduler
from proxy.server import body_deadline
from proxy.shaping import Shaper
from proxy.store import build_store
from proxy.store.base import StoreUnavailable

log = logging.getLogger("driftsched.app")
#: methods whose body the admin API reads (under ``server.body_timeout_s``)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

PoolFactory = Callable[[Settings], BackendPool]


def _default_pool(settings: Settings, clock: Clock) -> BackendPool:
    from adapters.pool import build_pool

    return build_pool(settings.pool, settings.upstreams, clock)


class DriftSchedApp:
    """The ASGI entry point; ``gateway`` is set while the lifespan runs."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        pool_factory: PoolFactory | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        #: builds the engine pool; the default one runs on this app's clock
        self.pool_factory: PoolFactory = pool_factory or (
            lambda s: _default_pool(s, self.clock))
        self.gateway: Gateway | None = None
        #: this process among the replicas sharing a store (grants are addressed to it)
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._handler: OpenAIHandler | None = None
        #: fire-and-forget tasks started by admin calls (kept referenced until done)
        self.background: set[asyncio.Task[Any]] = set()
        # the docs are admin routes (behind the admin key) unless admin.public_docs
        public = settings.admin.public_docs
        self.api = FastAPI(
            title="DriftSched gateway",
            version="0.1.0",
            lifespan=self._lifespan,
            docs_url="/admin/docs" if public else None,
            openapi_url="/admin/openapi.json" if public else None,
            redoc_url=None,
        )
        self.api.state.app = self
        _install_routes(self)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            handler = self._handler
            if handler is None:
                err = UpstreamUnavailable("gateway is starting or stopping")
                body = err.body()
                await send({"type": "http.response.start", "status": err.status,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            await handler(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        await self._api(scope, receive, send)

    async def _api(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The FastAPI app, with a last resort: Starlette re-raises an exception after its
        handler (:func:`proxy.admin.install_error_handlers`) has rendered and logged it;
        it stops here instead of reaching the server's log a second time. One that no
        handler rendered gets a 500 in OpenAI's shape."""
        started = False
        if scope["method"] in _BODY_METHODS:
            receive = body_deadline(receive, self.settings.server.body_timeout_s)

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.api(scope, receive, tracked)
        except Exception as e:
            if started:
                return  # rendered (and logged) by the admin error handler
            log.error("unexpected error outside the admin API's handlers", exc_info=e)
            body = InternalError(f"internal error: {type(e).__name__}").body()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        settings, clock = self.settings, self.clock
        store = build_store(settings.store)
        await store.start()
        sc = settings.scheduler
        caps = QueueCaps(max_queued=sc.max_queued, max_queued_per_tenant=sc.max_queued_per_tenant)
        policy = build_scheduling_policy(settings)
        late = policy.feasibility.rule if policy.feasibility is not None else "demote"
        queue = build_queue(settings.store, self.replica_id, caps=caps, order=policy.order,
                            late=late)
        await queue.start()
        metrics = GatewayMetrics()
        pool = self.pool_factory(settings)
        clients = UpstreamClients()
        shaper = Shaper(store, clock, settings.store.fail_open)
        estimator = load_estimator(settings.scheduler.estimator)
        drift = DriftController(policy.drift, clock=clock) if policy.drift is not None else None
        scheduler = Scheduler(settings=settings, clock=clock, queue=queue, pool=pool,
                              policy=policy, estimator=estimator, drift=drift,
                              replica_id=self.replica_id,
                              completions=build_completion_bus(settings.store, self.replica_id))
        saver: asyncio.Task[None] | None = None
        seeder: asyncio.Task[None] | None = None
        follower: asyncio.Task[None] | None = None
        try:
            await seed_tenants(settings, store, clock.time())
            from adapters.router import LeastLoadedRouter

            gw = Gateway(
                settings=settings,
                clock=clock,
                store=store,
                auth=Authenticator(store, clock, settings.server.auth_cache_ttl_s),
                shaper=shaper,
                pool=pool,
                router=LeastLoadedRouter(clock=clock),
                clients=clients,
                metrics=metrics,
                scheduler=scheduler,
                started_at=clock.time(),
            )
            metrics.add_backends(pool.backends)
            metrics.add_scheduler(scheduler)
            await pool.start()
            await scheduler.start()
            saver = asyncio.create_task(save_estimator_periodically(
                estimator, settings.scheduler.estimator))
            if settings.tenants:
                seeder = asyncio.create_task(watch_seed(settings, store, clock,
                                                        settings.store.seed_check_s))
            follower = asyncio.create_task(follow_changes(gw), name="follow-changes")
            self.gateway = gw
            self._handler = OpenAIHandler(gw)
            # everything built so far lives as long as the app: move it out of the cyclic
            # GC's reach, so gen-2 collections under load stay short (tail latency)
            gc.collect()
            gc.freeze()
            log.info("gateway started", extra={
                "store": settings.store.type,
                "backends": [b.name for b in pool.backends()],
            })
            yield
        finally:
            self._handler = None
            self.gateway = None
            for task in (saver, seeder, follower):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            save_estimator(estimator, settings.scheduler.estimator)
            await scheduler.stop()
            await pool.stop()
            await clients.aclose()
            await queue.aclose()
            await store.aclose()
            log.info("gateway stopped")


def build_scheduling_policy(settings: Settings) -> Policy:
    """The configured policy (``scheduler.policy``)."""
    return build_policy(settings.scheduler.policy.model_dump())


def _install_routes(app: DriftSchedApp) -> None:
    api = app.api

    @api.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness: the store answers and holds the configured tenants (its seed marker;
        re-seeded within ``store.seed_check_s`` when lost), and at least one backend takes
        traffic."""
        gw = app.gateway
        if gw is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        store_ok = await gw.store.ping()
        seeded = True
        if store_ok and gw.settings.tenants:
            try:
                seeded = await gw.store.seeded() is not None
            except StoreUnavailable:
                store_ok = seeded = False
        backends = {b.name: b.state for b in gw.pool.backends()}
        ready = store_ok and seeded and any(s == "healthy" for s in backends.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "store": store_ok, "seeded": seeded,
             "backends": backends},
            status_code=200 if ready else 503,
        )

    @api.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        """Prometheus metrics of this replica."""
        gw = app.gateway
        if gw is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from proxy.admin import build_admin_router

    api.include_router(build_admin_router(app))


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    pool_factory: PoolFactory | None = None,
) -> DriftSchedApp:
    return DriftSchedApp(settings, clock=clock, pool_factory=pool_factory)

"""Admin REST API under ``/admin``: tenants, keys, usage, backends.

Protected by the admin key (``Authorization: Bearer <admin key>``), distinct from tenant
keys; the OpenAPI docs too (``/admin/docs``, ``/admin/openapi.json``), unless
``admin.public_docs`` is set. Errors use the same OpenAI error shape as ``/v1``, every one
counted (``driftsched_http_errors_total{surface="admin"}``); an unexpected one is logged once.
Bodies are strict JSON (no ``NaN``/``Infinity``, no lone surrogates) and every number is
finite and bounded. A key is returned in clear exactly once, by the call that creates (or
rotates) it; afterwards only its prefix is shown.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.config import UpstreamConfig
from adapters.errors import (
    AuthenticationFailed,
    GatewayError,
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
)
from proxy.admin_ui import build_ui_router
from proxy.config import (
    Concurrency,
    DailyQuota,
    ModelName,
    QueueTimeout,
    Rpm,
    SloMs,
    TenantFields,
    Tpm,
    Weight,
)
from proxy.gateway import Gateway
from proxy.keys import new_key
from proxy.requests import decode_json
from proxy.store.base import KeyRecord, Tenant
from proxy.store.base import StoreUnavailable as StoreDown

if TYPE_CHECKING:
    from proxy.app import DriftSchedApp


log = logging.getLogger("driftsched.admin")


async def _changed(gw: Gateway, kind: str, name: str) -> None:
    """An admin write changed a tenant or key: drop this replica's cached copies now, and
    announce it so that every other replica does too (:func:`proxy.gateway.on_change`). A
    failed announcement is logged; the others then see the change within their
    ``auth_cache_ttl_s``."""
    gw.auth.invalidate()
    try:
        await gw.store.announce(kind, name)
    except StoreDown as e:
        log.warning("announcing a %s change to the other replicas failed: %s", kind, e)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TenantIn(TenantFields):
    """Body of ``POST /admin/tenants``: the same fields (and bounds) as a tenant in the YAML
    file."""


class TenantPatch(_Body):
    qos_class: str | None = Field(None, max_length=64)
    weight: Weight | None = None
    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_concurrency: Concurrency | None = None
    daily_token_quota: DailyQuota | None = None
    ttft_slo_ms: SloMs | None = None
    tpot_slo_ms: SloMs | None = None
    queue_timeout_s: QueueTimeout | None = None
    allowed_models: list[ModelName] | None = Field(None, max_length=1000)


class KeyIn(_Body):
    name: str = Field("", max_length=100)


class RotateIn(_Body):
    #: seconds the old key keeps working after rotation (0 = revoked now)
    grace_s: float = Field(0.0, ge=0, le=30 * 86400)


class BackendIn(UpstreamConfig):
    """Body of ``POST /admin/backends``: an upstream as in the YAML file, numbers finite and
    the URL one that parses (``http://[::1`` passed the YAML check and broke the pool's
    scrape loop)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("url")
    @classmethod
    def _parses(cls, v: str) -> str:
        try:
            url = httpx.URL(v)
        except (httpx.InvalidURL, ValueError) as e:
            raise ValueError(f"not a valid URL: {e}") from None
        if url.scheme in ("http", "https") and not url.host:
            raise ValueError("not a valid URL: no host")
        if url.port is not None and not 0 < url.port < 65536:
            raise ValueError("not a valid URL: port out of range")
        return v


class TenantOut(BaseModel):
    name: str
    qos_class: str
    weight: float
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    daily_token_quota: int | None
    ttft_slo_ms: float | None
    tpot_slo_ms: float | None
    queue_timeout_s: float
    allowed_models: list[str]
    created_at: float


class KeyOut(BaseModel):
    key_id: str
    tenant: str
    prefix: str
    name: str
    created_at: float
    revoked_at: float | None
    expires_at: float | None
    active: bool


class NewKeyOut(KeyOut):
    #: the key itself: shown once, store it now
    key: str


class UsageOut(BaseModel):
    tenant: str
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    tokens_today: int
    in_flight: int


def _tenant_out(t: Tenant) -> TenantOut:
    return TenantOut(**{**{f: getattr(t, f) for f in TenantOut.model_fields if f != "allowed_models"},
                        "allowed_models": list(t.allowed_models)})


def _key_out(r: KeyRecord, now: float) -> KeyOut:
    return KeyOut(key_id=r.key_id, tenant=r.tenant, prefix=r.prefix, name=r.name,
                  created_at=r.created_at, revoked_at=r.revoked_at, expires_at=r.expires_at,
                  active=r.active(now))


def _error_response(req: Request, err: GatewayError) -> JSONResponse:
    """The one rendering of an error outside ``/v1``: OpenAI's shape, counted."""
    app = getattr(req.app.state, "app", None)
    gw = app.gateway if app is not None else None
    if gw is not None:
        gw.metrics.http_errors.labels("admin", str(err.status)).inc()
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)


def install_error_handlers(api: FastAPI) -> None:
    async def gateway_error(req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return _error_response(req, exc)

    async def validation_error(req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return _error_response(
            req, InvalidRequest(f"{param or 'request'}: {first.get('msg')}", param=param))

    async def http_error(req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err: GatewayError = NotFound(str(exc.detail), code="unknown_url")
        else:
            err = InvalidRequest(str(exc.detail), code=None)
            err.status = exc.status_code
        return _error_response(req, err)

    async def store_down(req: Request, exc: Exception) -> JSONResponse:
        log.warning("store unavailable in admin API: %s", exc)
        return _error_response(req, StoreUnavailable("The state store is unavailable."))

    async def unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error in admin API", exc_info=exc)
        return _error_response(req, InternalError(f"internal error: {type(exc).__name__}"))

    api.add_exception_handler(GatewayError, gateway_error)
    api.add_exception_handler(StoreDown, store_down)
    api.add_exception_handler(Exception, unexpected)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(StarletteHTTPException, http_error)


def _gateway(request: Request) -> Gateway:
    gw: Gateway | None = request.app.state.app.gateway
    if gw is None:
        raise GatewayError("gateway is not running")
    return gw


GW = Annotated[Gateway, Depends(_gateway)]


def build_admin_router(app: DriftSchedApp) -> APIRouter:
    install_error_handlers(app.api)
    # the operator page: a shell without data, so outside the admin key (proxy/admin_ui.py)
    app.api.include_router(build_ui_router())

    async def require_admin(request: Request) -> None:
        configured = app.settings.admin.api_key
        if configured is None:
            raise PermissionDenied(
                "The admin API is disabled: set admin.api_key (or DRIFTSCHED_ADMIN_KEY).",
                code="admin_disabled",
            )
        # headers arrive as latin-1 text; compare bytes, constant-time, whatever they hold
        header = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, token = header.partition(b" ")
        expected = configured.get_secret_value().encode("utf-8")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), expected):
            raise AuthenticationFailed("Invalid admin key.", code="invalid_admin_key")

    async def strict_body(request: Request) -> None:
        """Refuse what FastAPI's parser lets through: NaN/Infinity, lone surrogates."""
        if request.method in ("POST", "PUT", "PATCH"):
            raw = await request.body()
            if raw:
                decode_json(raw)

    router = APIRouter(prefix="/admin", tags=["admin"],
                       dependencies=[Depends(require_admin), Depends(strict_body)])

    if not app.settings.admin.public_docs:
        @router.get("/openapi.json", include_in_schema=False)
        async def openapi_spec() -> JSONResponse:
            return JSONResponse(app.api.openapi())

        @router.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/admin/openapi.json",
                                       title="DriftSched admin API")

    async def _tenant_or_404(gw: Gateway, name: str) -> Tenant:
        t = await gw.store.get_tenant(name)
        if t is None:
            raise NotFound(f"tenant {name!r} not found", code="tenant_not_found")
        return t

    def _check_class(gw: Gateway, qos_class: str) -> None:
        if qos_class not in gw.settings.classes:
            raise InvalidRequest(
                f"unknown qos_class {qos_class!r}; known: {sorted(gw.settings.classes)}",
                param="qos_class",
            )

    # -- tenants -------------------------------------------------------------------------
    @router.get("/tenants", response_model=list[TenantOut])
    async def list_tenants(gw: GW) -> list[TenantOut]:
        return [_tenant_out(t) for t in await gw.store.list_tenants()]

    @router.post("/tenants", response_model=TenantOut, status_code=201)
    async def create_tenant(body: TenantIn, gw: GW) -> TenantOut:
        _check_class(gw, body.qos_class)
        if await gw.store.get_tenant(body.name) is not None:
            err = InvalidRequest(f"tenant {body.name!r} already exists", code="tenant_exists",
                                 param="name")
            err.status = 409
            raise err
        cls = gw.settings.classes[body.qos_class]
        data = body.model_dump()
        data["ttft_slo_ms"] = data["ttft_slo_ms"] if data["ttft_slo_ms"] is not None else cls.ttft_slo_ms
        data["tpot_slo_ms"] = data["tpot_slo_ms"] if data["tpot_slo_ms"] is not None else cls.tpot_slo_ms
        tenant = Tenant.from_dict({**data, "created_at": gw.clock.time()})
        await gw.store.put_tenant(tenant)
        await _changed(gw, "tenant", tenant.name)
        return _tenant_out(tenant)

    @router.get("/tenants/{name}", response_model=TenantOut)
    async def get_tenant(name: str, gw: GW) -> TenantOut:
        return _tenant_out(await _tenant_or_404(gw, name))

    @router.patch("/tenants/{name}", response_model=TenantOut)
    async def update_tenant(name: str, body: TenantPatch, gw: GW) -> TenantOut:
        t = await _tenant_or_404(gw, name)
        changes = body.model_dump(exclude_unset=True)
        if "qos_class" in changes:
            if changes["qos_class"] is None:
                raise InvalidRequest("qos_class cannot be null", param="qos_class")
            _check_class(gw, changes["qos_class"])
        for required in ("weight", "queue_timeout_s"):
            if required in changes and changes[required] is None:
                raise InvalidRequest(f"{required} cannot be null", param=required)
        if "allowed_models" in changes and changes["allowed_models"] is None:
            changes["allowed_models"] = []
        t = t.with_changes(**changes)
        await gw.store.put_tenant(t)
        await gw.scheduler.tenant_changed(t)  # queued requests see a new limit at once
        await _changed(gw, "tenant", t.name)
        return _tenant_out(t)

    @router.delete("/tenants/{name}", status_code=204)
    async def delete_tenant(name: str, gw: GW) -> None:
        if not await gw.store.delete_tenant(name, gw.clock.time()):
            raise NotFound(f"tenant {name!r} not found", code="tenant_not_found")
        await _changed(gw, "tenant", name)

    @router.get("/tenants/{name}/usage", response_model=UsageOut)
    async def tenant_usage(name: str, gw: GW) -> UsageOut:
        await _tenant_or_404(gw, name)
        now = gw.clock.time()
        u = await gw.store.get_usage(name, now)
        in_flight = await gw.scheduler.queue.in_flight(name, now)  # holds: the queue's ledger
        return UsageOut(tenant=name, requests=u.requests, errors=u.errors, tokens_in=u.tokens_in,
                        tokens_out=u.tokens_out, tokens_today=u.tokens_today, in_flight=in_flight)

    @router.get("/usage", response_model=list[UsageOut])
    async def all_usage(gw: GW) -> list[UsageOut]:
        out = []
        now = gw.clock.time()
        for t in await gw.store.list_tenants():
            u = await gw.store.get_usage(t.name, now)
            in_flight = await gw.scheduler.queue.in_flight(t.name, now)
            out.append(UsageOut(tenant=t.name, requests=u.requests, errors=u.errors,
                                tokens_in=u.tokens_in, tokens_out=u.tokens_out,
                                tokens_today=u.tokens_today, in_flight=in_flight))
        return out

    # -- keys ----------------------------------------------------------------------------
    @router.post("/tenants/{name}/keys", response_model=NewKeyOut, status_code=201)
    async def create_key(name: str, gw: GW, body: KeyIn | None = None) -> NewKeyOut:
        await _tenant_or_404(gw, name)
        now = gw.clock.time()
        key, rec = new_key(name, now, (body or KeyIn()).name)
        await gw.store.put_key(rec)
        await _changed(gw, "key", rec.key_id)  # it may be cached as unknown
        return NewKeyOut(key=key, **_key_out(rec, now).model_dump())

    @router.get("/keys", response_model=list[KeyOut])
    async def list_keys(
        gw: GW,
        tenant: Annotated[str | None, Query()] = None,
        prefix: Annotated[str | None, Query()] = None,
    ) -> list[KeyOut]:
        now = gw.clock.time()
        return [_key_out(r, now) for r in await gw.store.list_keys(tenant=tenant, prefix=prefix)]

    async def _key_or_404(gw: Gateway, key_id: str) -> KeyRecord:
        r = await gw.store.get_key(key_id)
        if r is None:
            raise NotFound(f"key {key_id!r} not found", code="key_not_found")
        return r

    @router.get("/keys/{key_id}", response_model=KeyOut)
    async def get_key(key_id: str, gw: GW) -> KeyOut:
        return _key_out(await _key_or_404(gw, key_id), gw.clock.time())

    @router.delete("/keys/{key_id}", response_model=KeyOut)
    async def revoke_key(key_id: str, gw: GW) -> KeyOut:
        r = await _key_or_404(gw, key_id)
        now = gw.clock.time()
        if r.revoked_at is None:
            r = KeyRecord(**{**_as_dict(r), "revoked_at": now})
            await gw.store.put_key(r)
        await _changed(gw, "key", key_id)
        return _key_out(r, now)

    @router.post("/keys/{key_id}/rotate", response_model=NewKeyOut, status_code=201)
    async def rotate_key(key_id: str, gw: GW, body: RotateIn | None = None) -> NewKeyOut:
        old = await _key_or_404(gw, key_id)
        now = gw.clock.time()
        if not old.active(now):
            raise InvalidRequest(f"key {key_id!r} is revoked or expired", code="key_inactive")
        await _tenant_or_404(gw, old.tenant)
        grace = (body or RotateIn()).grace_s
        retired = KeyRecord(**{**_as_dict(old),
                               **({"revoked_at": now} if grace == 0 else {"expires_at": now + grace})})
        key, rec = new_key(old.tenant, now, old.name)
        await gw.store.put_key(rec)
        await gw.store.put_key(retired)
        await _changed(gw, "key", key_id)
        return NewKeyOut(key=key, **_key_out(rec, now).model_dump())

    # -- scheduler -----------------------------------------------------------------------
    @router.get("/scheduler")
    async def scheduler_view(gw: GW) -> dict[str, Any]:
        """Active policy, queue depth per tenant, admission holds per engine, the TPOT
        governor's caps, each class level's rolling SLO attainment, the drift controller's
        view of every tenant (ratio, limit, detector state, last action), and which replica
        publishes the shared decisions (``leader``)."""
        sch = gw.scheduler
        now = gw.clock.time()
        drift = {}
        if sch.drift is not None:
            drift = {name: asdict(st) for name, st in sch.drift.statuses().items()}
        return {
            "policy": sch.policy.type,
            "replica": sch.replica_id,
            "leader": sch.leader,
            "queue_depth": await sch.queue.depth(),
            "engines": [asdict(x) for x in await sch.queue.loads(now)],
            "governor": {
                "target_tpot_s": sch.governor.target_s,
                "engines": {n: {"cap": g.cap, "max_seqs": g.max_seqs, "tpot_s": g.tpot_s,
                                "decreases": g.decreases, "increases": g.increases}
                            for n, g in sorted(sch.governor.engines.items())},
            },
            "slo_attainment": {str(lv): {"attainment": a, "requests": n}
                               for lv, (a, n) in sorted(sch.attainment_snapshot.items())},
            "drift_pressure": list(sch.drift.under_pressure()) if sch.drift else [],
            "drift": drift,
            "estimator": {t: asdict(sch.estimator.drift_state(t)) for t in sch.estimator.tenants()},
        }

    # -- backends ------------------------------------------------------------------------
    @router.get("/backends")
    async def backends(gw: GW) -> list[dict[str, Any]]:
        snap = getattr(gw.pool, "snapshot", None)
        if callable(snap):
            return list(snap())
        return [{"name": b.name, "url": b.url, "state": b.state, "models": list(b.models),
                 "in_flight": b.in_flight} for b in gw.pool.backends()]

    @router.post("/backends", status_code=201)
    async def add_backend(body: BackendIn, gw: GW) -> dict[str, Any]:
        add = getattr(gw.pool, "add_external", None) or getattr(gw.pool, "add", None)
        if add is None:
            raise InvalidRequest("this pool does not accept external backends", code="unsupported")
        if any(b.name == body.name for b in gw.pool.backends()):
            err = InvalidRequest(f"backend {body.name!r} already exists", code="backend_exists")
            err.status = 409
            raise err
        res = add(body)
        if inspect.isawaitable(res):
            await res
        return {"name": body.name, "url": body.url, "models": body.models}

    async def _pool_op(gw: Gateway, op: str, name: str) -> None:
        if not any(b.name == name for b in gw.pool.backends()):
            raise NotFound(f"backend {name!r} not found", code="backend_not_found")
        fn = getattr(gw.pool, op, None)
        if fn is None:
            raise InvalidRequest(f"this pool does not support {op}", code="unsupported")
        res = fn(name)
        if inspect.isawaitable(res):
            await res

    @router.delete("/backends/{name}", status_code=204)
    async def remove_backend(name: str, gw: GW) -> None:
        await _pool_op(gw, "remove", name)
        await gw.clients.drop(name)

    @router.post("/backends/{name}/drain")
    async def drain_backend(name: str, gw: GW, wait: bool = False) -> dict[str, Any]:
        """Stop routing new requests to the backend; ``wait=true`` returns when it is idle."""
        if wait:
            await _pool_op(gw, "drain", name)
        else:
            if not any(b.name == name for b in gw.pool.backends()):
                raise NotFound(f"backend {name!r} not found", code="backend_not_found")
            fn = getattr(gw.pool, "drain", None)
            if fn is None:
                raise InvalidRequest("this pool does not support drain", code="unsupported")
            task = asyncio.create_task(fn(name))
            app.background.add(task)
            task.add_done_callback(app.background.discard)
            await asyncio.sleep(0)
        b = next(b for b in gw.pool.backends() if b.name == name)
        return {"name": name, "state": b.state, "in_flight": b.in_flight}

    @router.post("/backends/{name}/undrain")
    async def undrain_backend(name: str, gw: GW) -> dict[str, Any]:
        await _pool_op(gw, "undrain", name)
        b = next(b for b in gw.pool.backends() if b.name == name)
        return {"name": name, "state": b.state}

    return router


def _as_dict(r: KeyRecord) -> dict[str, Any]:
    return {f: getattr(r, f) for f in KeyRecord.__dataclass_fields__}

"""The hot path: OpenAI-compatible ``/v1/*`` as a plain ASGI handler.

Written against raw ASGI (no routing or dependency injection per request) because this is
where the gateway's added latency lives. This module does the HTTP side only: authenticate,
read and validate the body, then hand the request to a
:class:`~proxy.lifecycle.RequestLifecycle` (refuse / shape / queue / grant), forward it to
the engine that lifecycle names, relay the response (SSE bytes as they come), render
errors in OpenAI's shape, and let the lifecycle settle it.

A watcher task waits on ``receive()`` for ``http.disconnect`` in parallel with the work; a
client that goes away at any stage (queued, waiting for the engine, mid-stream) cancels the
work, which closes the upstream request and releases every slot and token it held.

Two limits of ``server`` are enforced here, each by one timer per request (nothing per
chunk): the body must arrive within ``body_timeout_s`` of the headers (else 408 and the
connection closed), and a request runs at most ``max_request_duration_s`` (else the work is
cancelled like a disconnect, which releases what it holds, and the client gets 504
``deadline_exceeded``, as an SSE error event when the stream has begun). A client that stops
reading is the server's to catch (:mod:`proxy.server`: its connection is aborted, which
reads here as a disconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from adapters.errors import (
    BodyTooLarge,
    ClientTimeout,
    DeadlineExceeded,
    GatewayError,
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
)
from adapters.sse import StreamTap, error_event
from adapters.upstream import (
    UpstreamConnectFailed,
    map_exception,
    open_request,
    upstream_status_error,
)
from proxy.auth import Principal, bearer_token
from proxy.estimation import ORACLE_HEADER, with_oracle_length
from proxy.lifecycle import Outcome, RequestLifecycle, mint_id
from proxy.requests import MAX_TOKENS, PATHS, UPSTREAM_PATH, ParsedRequest, parse_request
from proxy.tokens import PromptTokens

if TYPE_CHECKING:
    from adapters.base import Backend
    from proxy.gateway import Gateway

Scope = dict[str, Any]
Receive = Any
Send = Any

log = logging.getLogger("driftsched.access")
errlog = logging.getLogger("driftsched.gateway")

_RID_OK = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_JSON = (b"content-type", b"application/json")


@dataclass(slots=True)
class Ctx:
    """HTTP state of one request (what was sent, what was seen), for rendering and logs."""

    #: the id echoed in ``x-request-id``: the client's (validated), else the minted one
    rid: str
    endpoint: str
    t0: float
    #: the event loop's clock at arrival (the max-duration timer runs on it)
    started: float
    principal: Principal | None = None
    req: ParsedRequest | None = None
    life: RequestLifecycle | None = None
    out: Outcome = field(default_factory=Outcome)
    response_started: bool = False
    #: the last body message is being sent (a disconnect after it is the normal end)
    ended: bool = False
    stage: str = "auth"
    #: the client went away (the watcher cancelled the work)
    gone: bool = False
    #: ``server.max_request_duration_s`` passed (its timer cancelled the work)
    expired: bool = False
    #: cancellations this handler asked for (it takes back as many: :func:`_absorb`)
    cancels: int = 0
    #: the work has seen its cancellation, or is settling: cancel it no more
    stopping: bool = False

    @property
    def rl_headers(self) -> list[tuple[bytes, bytes]]:
        return self.life.rl_headers if self.life is not None else []


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


#: seconds between cancellations of work that runs on after being cancelled
_RECANCEL_S = 0.05


def _absorb(ctx: Ctx, task: asyncio.Task[Any]) -> bool:
    """Take back this handler's cancellations of ``task``; whether none is left (nobody else,
    such as the server shutting down, cancelled it too)."""
    left = task.cancelling()
    for _ in range(ctx.cancels):
        left = task.uncancel()
    ctx.cancels = 0
    return left == 0


def _endpoint_label(path: str) -> str:
    """The metrics/log label of a path that is not a completion endpoint (bounded set)."""
    return "models" if path == "/v1/models" or path.startswith("/v1/models/") else "unknown"


#: the ``usage`` counts the gateway reads (settling, access log); each an int in range
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def clean_usage(usage: Any) -> dict[str, Any] | None:
    """An engine's ``usage`` reduced to its counts that are integers in 0..MAX_TOKENS
    (``None`` when none is): a malformed report reads as "unknown", it cannot break
    settling."""
    if not isinstance(usage, dict):
        return None
    out = {k: v for k in _USAGE_KEYS
           if type(v := usage.get(k)) is int and 0 <= v <= MAX_TOKENS}
    return out or None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


class OpenAIHandler:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.tokens = PromptTokens(gw.settings)
        #: an ablation's estimator reads the client's claimed output length (never in service)
        self._oracle = gw.settings.scheduler.estimator.kind == "oracle"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        rid_in = _header(scope, b"x-request-id")
        # the client's id is only echoed and logged; queue, holds and charges use a minted one
        rid = rid_in.decode() if rid_in and _RID_OK.match(rid_in) else mint_id()
        ctx = Ctx(rid=rid, endpoint=PATHS.get(path) or _endpoint_label(path),
                  t0=self.gw.clock.monotonic(), started=asyncio.get_running_loop().time())
        try:
            await self._handle(scope, receive, send, ctx)
        except Exception as e:
            # the one backstop: whatever escaped the stages is a logged, counted 500 in
            # OpenAI's shape (or the end of a stream already started), never a bare 500
            errlog.exception("unexpected error", extra={"request_id": rid})
            err = InternalError(f"internal error: {type(e).__name__}")
            with contextlib.suppress(Exception):  # the client may be gone: nothing left to do
                if not ctx.response_started:
                    await self._send_error(send, ctx, err)
                elif not ctx.ended:
                    await self._stream_error(send, ctx, err)
            self._finish_log(ctx)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, ctx: Ctx) -> None:
        path: str = scope["path"]
        endpoint = PATHS.get(path)
        if endpoint is None:
            if path == "/v1/models" or path.startswith("/v1/models/"):
                await self._models(scope, send, ctx)
            else:
                await self._send_error(send, ctx, NotFound(
                    f"Invalid URL ({scope['method']} {path})", code="unknown_url"))
            self._finish_log(ctx)
            return
        if scope["method"] != "POST":
            err = InvalidRequest(f"Method {scope['method']} not allowed on {path}; use POST.",
                                 code="method_not_allowed")
            err.status = 405
            await self._send_error(send, ctx, err)
            self._finish_log(ctx)
            return
        try:
            ctx.principal = await self.gw.authenticate(bearer_token(_header(scope, b"authorization")))
            ctx.stage = "body"
            raw = await self._read_body(scope, receive)
            ctx.req = req = parse_request(endpoint, raw)
            if self._oracle:
                ctx.req = req = with_oracle_length(req, _header(scope, ORACLE_HEADER))
            self._check_model(ctx.principal, req.model)
            ctx.req = req = await self.tokens.count(req)
        except GatewayError as e:
            await self._send_error(send, ctx, e)
            self._finish_log(ctx)
            return
        except ClientGone:
            ctx.out.status = 499
            self._finish_log(ctx)
            return

        # Watch for a disconnect while serving: when receive() says the client went away
        # before the response ended, cancel this task (the work releases what it holds).
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop() -> None:
            # cancel the work, and again while it runs on: a library may swallow a
            # cancellation (redis-py's asyncio client does, for a command cancelled in
            # flight), and the work would then run to its end for a client long gone
            if ctx.stopping or ctx.ended or task.done():
                return
            ctx.cancels += 1
            task.cancel()
            loop.call_later(_RECANCEL_S, stop)

        def on_message(f: asyncio.Future[dict[str, Any]]) -> None:
            if f.cancelled() or f.exception() is not None or ctx.ended:
                return
            if f.result().get("type") == "http.disconnect":
                ctx.gone = True
                assert ctx.principal is not None
                stage = ctx.life.stage if ctx.life is not None else ctx.stage
                self.gw.metrics.disconnects.labels(ctx.principal.tenant.name, stage).inc()
                stop()

        def on_deadline() -> None:
            if not ctx.ended and not ctx.gone:
                ctx.expired = True
                stop()  # _serve renders the 504

        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(on_message)
        limit = self.gw.settings.server.max_request_duration_s
        timer = None if limit is None else loop.call_at(ctx.started + limit, on_deadline)
        try:
            await self._serve(ctx, send)
        except asyncio.CancelledError:
            if not ctx.gone or not _absorb(ctx, task):
                raise  # not (only) ours: the server is cancelling us
        finally:
            watch.cancel()
            if timer is not None:
                timer.cancel()

    # -- stages ------------------------------------------------------------------------
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        server = self.gw.settings.server
        limit = server.max_body_bytes
        cl = _header(scope, b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise BodyTooLarge(f"Request body of {int(cl)} bytes exceeds the limit of {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(server.body_timeout_s):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except TimeoutError:
            raise ClientTimeout(f"The request body did not arrive within "
                                f"{server.body_timeout_s:g} s (server.body_timeout_s).") from None

    def _check_model(self, principal: Principal, model: str) -> None:
        if model not in self.gw.pool_models():
            raise NotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        if not principal.tenant.allows(model):
            raise PermissionDenied(
                f"Tenant {principal.tenant.name!r} may not use model `{model}`.", param="model"
            )

    async def _serve(self, ctx: Ctx, send: Send) -> None:
        gw = self.gw
        assert ctx.principal is not None and ctx.req is not None
        tenant = ctx.principal.tenant
        ctx.life = life = RequestLifecycle(gw, ctx.principal, ctx.req, ctx.t0)
        try:
            await life.begin()
            await self._forward(ctx, send, life)
        except GatewayError as e:
            if life.admitted is None:  # refused before reaching an engine (400, 429, 503)
                gw.metrics.rejections.labels(tenant.name, e.code or "error").inc()
            if ctx.response_started:
                await self._stream_error(send, ctx, e)
            else:
                await self._send_error(send, ctx, e)
        except asyncio.CancelledError:
            ctx.stopping = True
            task = asyncio.current_task()
            assert task is not None
            if not ctx.expired or ctx.gone or not _absorb(ctx, task):
                ctx.out.status = 499  # client closed request (or the server is stopping)
                raise
            # server.max_request_duration_s: the work is stopped, its hold released below
            limit = gw.settings.server.max_request_duration_s
            err: GatewayError = DeadlineExceeded(f"The request ran longer than the gateway allows "
                                   f"({limit:g} s, server.max_request_duration_s).")
            errlog.warning("request deadline exceeded", extra={
                "request_id": ctx.rid, "id": life.id, "stage": life.stage})
            if ctx.response_started:
                await self._stream_error(send, ctx, err)
            else:
                await self._send_error(send, ctx, err)
        except Exception as e:
            errlog.exception("unexpected error", extra={"request_id": ctx.rid, "id": life.id})
            err = InternalError(f"internal error: {type(e).__name__}")
            if ctx.response_started:
                await self._stream_error(send, ctx, err)
            else:
                await self._send_error(send, ctx, err)
        finally:
            ctx.stopping = True
            if ctx.ended:
                # the response is out: a disconnect no longer cancels us (see __call__),
                # so settling runs inline, without a shielding task per request
                await self._complete(ctx)
            else:
                await asyncio.shield(self._complete(ctx))

    async def _forward(self, ctx: Ctx, send: Send, life: RequestLifecycle) -> None:
        gw = self.gw
        req = ctx.req
        assert req is not None
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "x-request-id": life.id,
        }
        last: GatewayError | None = None
        while True:
            backend = await life.next_engine()
            if backend is None:
                if last is not None:
                    raise last
                raise UpstreamUnavailable(f"No healthy backend serves model `{req.model}` right now.")
            backend.in_flight += 1
            try:
                try:
                    resp = await open_request(
                        gw.clients, backend, UPSTREAM_PATH[req.endpoint],
                        self._body_for(ctx, backend), headers,
                    )
                except UpstreamConnectFailed as e:
                    gw.metrics.upstream_errors.labels(backend.name, e.code or "connect").inc()
                    errlog.warning("could not connect to backend", extra={
                        "request_id": ctx.rid, "backend": backend.name,
                        "detail": str(e.__cause__ or e)})
                    last = e
                    continue
                life.upstream_reached = True
                try:
                    if req.stream:
                        await self._relay_stream(ctx, send, resp, backend)
                    else:
                        await self._relay_body(ctx, send, resp, backend)
                finally:
                    await resp.aclose()
                return
            finally:
                backend.in_flight -= 1

    def _body_for(self, ctx: Ctx, backend: Backend) -> bytes:
        """The bytes to send: the client's, plus vLLM's ``priority`` (the class level) for
        engines scheduling by priority when the client did not set one."""
        req = ctx.req
        assert req is not None and ctx.principal is not None
        if (not backend.supports_priority or req.priority is not None
                or not self.gw.settings.scheduler.pass_priority or req.endpoint == "embeddings"):
            return req.body
        body = json.loads(req.body)
        body["priority"] = self.gw.settings.classes[ctx.principal.tenant.qos_class].level
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    async def _relay_body(self, ctx: Ctx, send: Send, resp: httpx.Response, backend: Backend) -> None:
        try:
            body = await resp.aread()
        except httpx.HTTPError as e:
            err = self._upstream_failed(ctx, backend, e)
            raise err from e
        if resp.status_code >= 400:
            err = upstream_status_error(resp.status_code, body, backend)
            if isinstance(err, UpstreamError):
                self.gw.metrics.upstream_errors.labels(backend.name, f"http_{resp.status_code}").inc()
            raise err
        try:
            obj = json.loads(body)
        except ValueError:
            self.gw.metrics.upstream_errors.labels(backend.name, "invalid_json").inc()
            raise UpstreamError(f"backend {backend.name!r} returned invalid JSON") from None
        ctx.out.usage = clean_usage(obj.get("usage")) if isinstance(obj, dict) else None
        ctx.out.first_byte_at = self.gw.clock.monotonic()
        ctx.out.status = 200
        headers = [
            (b"content-type", resp.headers.get("content-type", "application/json").encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", ctx.rid.encode()),
            *ctx.rl_headers,
        ]
        ctx.response_started = True
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        ctx.ended = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_stream(self, ctx: Ctx, send: Send, resp: httpx.Response, backend: Backend) -> None:
        if resp.status_code != 200:
            try:
                body = await resp.aread()
            except httpx.HTTPError as e:
                raise self._upstream_failed(ctx, backend, e) from e
            err = upstream_status_error(resp.status_code, body, backend)
            if isinstance(err, UpstreamError):
                self.gw.metrics.upstream_errors.labels(backend.name, f"http_{resp.status_code}").inc()
            raise err
        assert ctx.req is not None
        tap = StreamTap(strip_usage=ctx.req.strip_usage)
        out = ctx.out
        out.status = 200
        ctx.response_started = True
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-request-id", ctx.rid.encode()),
                *ctx.rl_headers,
            ],
        })
        clock = self.gw.clock
        life = ctx.life
        assert life is not None
        try:
            async for chunk in resp.aiter_raw():
                data = tap.feed(chunk)
                if data:
                    if out.first_byte_at is None:
                        out.first_byte_at = clock.monotonic()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    out.streamed_events = events = tap.events
                    if events > life.grow_mark:  # token drift, charged as it happens
                        await life.streamed(events)
        except httpx.HTTPError as e:
            err = self._upstream_failed(ctx, backend, e)
            out.usage, out.streamed_events = clean_usage(tap.usage), tap.events
            raise UpstreamError(f"stream from backend {backend.name!r} broke: {err.message}") from e
        out.usage, out.streamed_events = clean_usage(tap.usage), tap.events
        rest = tap.flush()
        if tap.error is not None:
            # the engine reported an error inside the stream (relayed to the client as it
            # came): the request failed, whatever the 200 of the headers said
            self.gw.metrics.upstream_errors.labels(backend.name, "stream_error").inc()
            errlog.warning("engine error in stream", extra={
                "request_id": ctx.rid, "backend": backend.name,
                "error": str(tap.error.get("message"))[:200]})
            out.status = UpstreamError.status
        if not tap.done and tap.error is None:
            self.gw.metrics.upstream_errors.labels(backend.name, "stream_truncated").inc()
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            raise UpstreamError(f"backend {backend.name!r} closed the stream before [DONE]")
        ctx.ended = True
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    def _upstream_failed(self, ctx: Ctx, backend: Backend, exc: httpx.HTTPError) -> GatewayError:
        """An engine I/O failure: counted, logged with its detail (addresses stay in the
        log), and the client's error, which names the backend only."""
        err = map_exception(exc, backend)
        self.gw.metrics.upstream_errors.labels(backend.name, err.code or "error").inc()
        errlog.warning("backend request failed", extra={
            "request_id": ctx.rid, "backend": backend.name, "code": err.code,
            "detail": f"{type(exc).__name__}: {exc}"})
        return err

    # -- completion ----------------------------------------------------------------------
    async def _complete(self, ctx: Ctx) -> None:
        """Let the lifecycle settle the request, then log it. Runs even when cancelled."""
        life = ctx.life
        if life is not None:
            try:
                await life.settle(ctx.out)
            except Exception:
                errlog.exception("accounting failed", extra={"request_id": ctx.rid, "id": life.id})
                if life.admitted is not None:
                    # settling stopped part-way: free the engine hold at least (releasing is
                    # idempotent), or the scheduler would renew it forever
                    try:
                        await self.gw.scheduler.complete(life.admitted, None)
                    except Exception:
                        errlog.exception("releasing the hold failed",
                                         extra={"request_id": ctx.rid, "id": life.id})
        self._finish_log(ctx)

    def _finish_log(self, ctx: Ctx) -> None:
        if ctx.principal is not None:
            t = ctx.principal.tenant
            tenant = t.name
            self.gw.metrics.tenant(tenant, t.qos_class).requests(ctx.endpoint, ctx.out.status).inc()
        else:
            tenant = "-"
            self.gw.metrics.requests.labels(tenant, ctx.endpoint, str(ctx.out.status)).inc()
        if not self.gw.settings.server.access_log:
            return
        out, life = ctx.out, ctx.life
        usage = out.usage or {}
        adm = life.admitted if life is not None else None
        admitted_at = life.admitted_at if life is not None else None
        now = self.gw.clock.monotonic()
        arrival_unix = self.gw.clock.time() - (now - ctx.t0)
        log.info("request", extra={
            "request_id": ctx.rid,
            "id": life.id if life is not None else None,
            "tenant": tenant,
            "key": ctx.principal.key_prefix if ctx.principal else None,
            "endpoint": ctx.endpoint,
            "model": ctx.req.model if ctx.req else None,
            "stream": ctx.req.stream if ctx.req else None,
            "status": out.status,
            "backend": life.backend.name if life is not None and life.backend else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "qos_class": ctx.principal.tenant.qos_class if ctx.principal else None,
            "max_tokens": ctx.req.max_tokens if ctx.req else None,
            "predicted_p50": round(adm.estimate.p50, 1) if adm else None,
            "predicted_p90": round(adm.estimate.p90, 1) if adm else None,
            "queue_ms": round((admitted_at - ctx.t0) * 1000, 2) if admitted_at else None,
            "ttft_ms": round((out.first_byte_at - ctx.t0) * 1000, 2)
            if out.first_byte_at else None,
            "duration_ms": round((now - ctx.t0) * 1000, 2),
            # wall clock at arrival: the live estimator evaluation orders arrivals and ends
            "arrival_unix": round(arrival_unix, 4),
        })

    # -- responses ---------------------------------------------------------------------
    async def _send_error(self, send: Send, ctx: Ctx, err: GatewayError) -> None:
        ctx.out.status = err.status
        self.gw.metrics.http_errors.labels("v1", str(err.status)).inc()
        body = err.body()
        headers = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", ctx.rid.encode()),
            *ctx.rl_headers,
            *[(k.encode(), v.encode()) for k, v in err.headers.items()],
        ]
        ctx.response_started = True
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        ctx.ended = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream_error(self, send: Send, ctx: Ctx, err: GatewayError) -> None:
        """An error after the SSE headers went out: an error event, then end of stream."""
        ctx.out.status = err.status
        self.gw.metrics.http_errors.labels("v1", str(err.status)).inc()
        ctx.ended = True
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": error_event(err.to_dict()),
                        "more_body": False})

    async def _models(self, scope: Scope, send: Send, ctx: Ctx) -> None:
        try:
            if scope["method"] != "GET":
                err = InvalidRequest("Use GET for /v1/models.", code="method_not_allowed")
                err.status = 405
                raise err
            principal = await self.gw.authenticate(bearer_token(_header(scope, b"authorization")))
            ctx.principal = principal
            models = [m for m in self.gw.pool_models() if principal.tenant.allows(m)]
            created = int(self.gw.started_at)
            path: str = scope["path"]
            if path.startswith("/v1/models/"):
                mid = path[len("/v1/models/"):]
                if mid not in models:
                    raise NotFound(f"The model `{mid}` does not exist or you do not have access to it.")
                payload: dict[str, Any] = {"id": mid, "object": "model", "created": created,
                                           "owned_by": "driftsched"}
            else:
                payload = {"object": "list", "data": [
                    {"id": m, "object": "model", "created": created, "owned_by": "driftsched"}
                    for m in models
                ]}
        except GatewayError as e:
            await self._send_error(send, ctx, e)
            return
        body = json.dumps(payload).encode()
        ctx.out.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": [
            _JSON, (b"content-length", str(len(body)).encode()), (b"x-request-id", ctx.rid.encode()),
        ]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

"""The simulator's HTTP face: vLLM's OpenAI-compatible routes over a :class:`Driver`.

Routes: ``GET /health`` (200, empty), ``GET /version``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /metrics``.

Status codes follow vLLM: 400 for a body that does not validate, ``n != 1``, a prompt that
leaves no room in ``max_model_len``, ``max_tokens`` past ``max_model_len``, or a non-zero
``priority`` when the scheduling policy is not ``priority``; 404 for an unknown model. Errors
use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

A client that disconnects (streaming or not) has its request aborted in the engine, which
frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from adapters.sim.driver import Driver, TokenStream
from adapters.sim.engine import Engine, SimRequest
from adapters.sim.metrics import SimMetrics
from adapters.sim.protocol import (
    ChatBody,
    ChunkWriter,
    CompletionBody,
    Kind,
    error_body,
    full_response,
)
from adapters.sim.settings import SimSettings
from adapters.sim.workload import OutputLengths, count_prompt_tokens, prompt_key

log = logging.getLogger("adapters.sim")

VERSION = "0.32.0+sim"


def _error(status: int, message: str, param: str | None = None) -> Response:
    return Response(error_body(status, message, param=param), status, media_type="application/json")


async def _watch_disconnect(receive: Receive, stream: TokenStream) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.disconnected = True
            stream.event.set()
            return


class _GenerationResponse(Response):
    """Waits on a request's tokens and writes them (one JSON body, or SSE events)."""

    def __init__(
        self,
        sim: _Sim,
        stream: TokenStream,
        kind: Kind,
        model: str,
        streaming: bool,
        include_usage: bool,
    ) -> None:
        self.sim, self.stream, self.kind, self.model = sim, stream, kind, model
        self.streaming, self.include_usage = streaming, include_usage
        self.rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + stream.req.request_id
        self.created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        watcher = asyncio.create_task(_watch_disconnect(receive, stream))
        try:
            if self.streaming:
                await self._send_stream(send)
            else:
                await self._send_full(send)
        finally:
            watcher.cancel()
            if not stream.req.finished:
                self.sim.driver.abort(stream.req.request_id)

    async def _send_full(self, send: Send) -> None:
        stream, req = self.stream, self.stream.req
        while not req.finished:
            await stream.event.wait()
            stream.event.clear()
            if stream.disconnected:
                return
        body = full_response(
            self.kind,
            self.rid,
            self.created,
            self.model,
            req.prompt_tokens,
            req.generated,
            req.finish_reason,
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _send_stream(self, send: Send) -> None:
        stream, req = self.stream, self.stream.req
        w = ChunkWriter(self.kind, self.rid, self.created, self.model, self.include_usage)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        while True:
            await stream.event.wait()
            stream.event.clear()
            if stream.disconnected:
                return
            generated, done = req.generated, req.finished
            new = generated - stream.sent
            if new <= 0 and not done:
                continue
            out = w.role() if stream.sent == 0 and self.kind == "chat" else ""
            stream.sent = generated
            if done:
                out += w.tokens(new, req.finish_reason)
                if self.include_usage:
                    out += w.usage(req.prompt_tokens, generated)
                out += w.done()
                await send({"type": "http.response.body", "body": out.encode()})
                return
            await send(
                {
                    "type": "http.response.body",
                    "body": out.encode() + w.tokens(new).encode(),
                    "more_body": True,
                }
            )


class _Sim:
    """Per-app state: settings, driver, metrics and the handlers that use them."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.names = settings.names
        self.max_model_len = settings.model_len
        self.lengths = OutputLengths(seed=settings.seed)
        self.driver = Driver(
            self._engine, time_scale=settings.time_scale, on_finish=self._on_finish
        )
        self.metrics = SimMetrics(self.driver, self.names[0])
        self.created = int(time.time())

    def _engine(self, clock: Any) -> Engine:
        s = self.settings
        return Engine(
            s.profile_obj,
            clock=clock,
            kv_capacity_tokens=s.kv_tokens,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            policy=s.scheduling_policy,
        )

    def _on_finish(self, req: SimRequest) -> None:
        self.metrics.observe_finished(req)

    # -- routes -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return Response(orjson.dumps({"version": VERSION}), media_type="application/json")

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.settings.model,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": self.created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.names
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "text")

    async def _generate(self, request: Request, kind: Kind) -> Response:
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            return _error(400, f"invalid JSON body: {e}")
        body: ChatBody | CompletionBody
        try:
            body = (
                ChatBody.model_validate(data)
                if kind == "chat"
                else CompletionBody.model_validate(data)
            )
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            return _error(400, f"{loc}: {first['msg']}", param=loc or None)
        model = body.model or self.names[0]
        if model not in self.names:
            return _error(404, f"The model `{model}` does not exist.", param="model")
        if body.stream_options is not None and not body.stream:
            return _error(
                400,
                "Stream options can only be defined when `stream=True`.",
                param="stream_options",
            )
        if body.n != 1:
            return _error(400, "The simulator supports only n=1.", param="n")
        if body.priority != 0 and self.settings.scheduling_policy != "priority":
            return _error(
                400,
                f"Got priority {body.priority} but Priority scheduling is not enabled.",
                param="priority",
            )
        source: Any = body.messages if isinstance(body, ChatBody) else body.prompt
        if (
            isinstance(body, CompletionBody)
            and isinstance(source, list)
            and len(source) > 1
            and all(isinstance(p, str) for p in source)
        ):
            return _error(400, "The simulator supports one prompt per request.", param="prompt")
        prompt_tokens = count_prompt_tokens(source)
        max_len = self.max_model_len
        if prompt_tokens >= max_len:
            return _error(
                400,
                f"This model's maximum context length is {max_len} tokens. However, "
                f"your request has {prompt_tokens} input tokens. Please reduce the length "
                "of the input messages.",
                param="messages" if kind == "chat" else "prompt",
            )
        limit = body.limit()
        if limit is not None and prompt_tokens + limit > max_len:
            return _error(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This "
                f"model's maximum context length is {max_len} tokens and your request has "
                f"{prompt_tokens} input tokens ({limit} > {max_len} - {prompt_tokens}).",
                param="max_tokens",
            )
        cap = limit if limit is not None else max_len - prompt_tokens
        if body.ignore_eos:
            out, reason = cap, "length"
        else:
            truth = self.lengths.true_length(prompt_key(source))
            out, reason = (cap, "length") if truth > cap else (truth, "stop")
        req = SimRequest(
            uuid.uuid4().hex,
            prompt_tokens,
            out,
            "stop" if reason == "stop" else "length",
            priority=body.priority,
        )
        include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        every = self.settings.tokens_per_event if body.stream else None
        stream = self.driver.submit(req, every=every)
        return _GenerationResponse(self, stream, kind, model, body.stream, include_usage)

    async def _load_workload(self) -> None:
        path = self.settings.workload
        if path is not None:
            self.lengths = await asyncio.to_thread(
                OutputLengths.from_jsonl, path, seed=self.settings.seed
            )
            log.info("workload %s: %d known prompts", path, len(self.lengths))


def _exit_if_died(task: asyncio.Task[None]) -> None:
    """A dead step loop would hang every request: die loudly so the pool restarts us."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("step loop died", exc_info=task.exception())
        os._exit(70)


def create_app(settings: SimSettings) -> Starlette:
    """A Starlette app serving one simulated engine; the step loop runs in its lifespan."""
    sim = _Sim(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sim._load_workload()
        task = asyncio.create_task(sim.driver.run(), name="sim-step-loop")
        task.add_done_callback(_exit_if_died)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = Starlette(
        routes=[
            Route("/health", sim.health, methods=["GET"]),
            Route("/version", sim.version, methods=["GET"]),
            Route("/v1/models", sim.models, methods=["GET"]),
            Route("/metrics", sim.metrics_route, methods=["GET"]),
            Route("/v1/chat/completions", sim.chat, methods=["POST"]),
            Route("/v1/completions", sim.completions, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.sim = sim
    return app

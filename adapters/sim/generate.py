"""``POST /v1/chat/completions`` and ``/v1/completions`` as a raw ASGI handler.

The hot path of the simulator: one :class:`Generation` validates a body, turns it into a
:class:`~adapters.sim.engine.SimRequest` (true output length from the workload, capped by
``max_tokens``), submits it to the driver, and writes the tokens as they come, calling ASGI
``send`` directly (no framework wrappers per SSE event).

Validation follows vLLM's statuses: 400 for a body that does not validate, ``n != 1``,
``stream_options`` without ``stream``, a prompt that leaves no room in ``max_model_len``,
``max_tokens`` past ``max_model_len``, a non-zero ``priority`` when the scheduling policy is
not ``priority``; 404 for an unknown model. A client that disconnects, streaming or not, has
its request aborted in the engine (its KV is freed at once).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from adapters.sim.driver import Driver, TokenStream
from adapters.sim.engine import SimRequest
from adapters.sim.protocol import (
    ChatBody,
    ChunkWriter,
    CompletionBody,
    Kind,
    error_body,
    full_response,
)
from adapters.sim.settings import SimSettings
from adapters.sim.workload import OutputLengths, prompt_key
from adapters.tokens import HEURISTIC

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class HTTPError(Exception):
    """A request the simulator refuses, with vLLM's status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


async def send_json(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The request body; ``None`` if the client went away first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _watch_disconnect(receive: Receive, stream: TokenStream) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.disconnected = True
            stream.event.set()
            return


class Generation:
    """Turns generation requests into engine requests and their tokens into responses."""

    def __init__(self, settings: SimSettings, driver: Driver) -> None:
        self.settings = settings
        self.driver = driver
        self.names = settings.names
        self.max_model_len = settings.model_len
        #: replaced by the workload file's lengths at start-up (see ``server.create_app``)
        self.lengths = OutputLengths(seed=settings.seed)
        #: replaced by ``--tokenizer``'s counter at start-up (the gateway's counting code)
        self.counter = HEURISTIC

    async def __call__(self, scope: Scope, receive: Receive, send: Send, kind: Kind) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            req, model, streaming, include_usage = self.prepare(raw, kind)
        except HTTPError as e:
            await send_json(send, e.status, error_body(e.status, e.message, param=e.param))
            return
        stream = self.driver.submit(
            req, every=self.settings.tokens_per_event if streaming else None
        )
        watcher = asyncio.create_task(_watch_disconnect(receive, stream))
        try:
            rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + req.request_id
            if streaming:
                w = ChunkWriter(kind, rid, int(time.time()), model, include_usage)
                await self._send_stream(send, stream, w, kind)
            else:
                await self._send_full(send, stream, kind, rid, model)
        finally:
            watcher.cancel()
            if not req.finished:
                self.driver.abort(req.request_id)

    def prepare(self, raw: bytes, kind: Kind) -> tuple[SimRequest, str, bool, bool]:
        """Validate a body: (engine request, model name, stream?, include usage?)."""
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"invalid JSON body: {e}") from e
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
            raise HTTPError(400, f"{loc}: {first['msg']}", loc or None) from e
        model = body.model or self.names[0]
        if model not in self.names:
            raise HTTPError(404, f"The model `{model}` does not exist.", "model")
        if body.stream_options is not None and not body.stream:
            raise HTTPError(
                400, "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        if body.n != 1:
            raise HTTPError(400, "The simulator supports only n=1.", "n")
        if body.priority != 0 and self.settings.scheduling_policy != "priority":
            raise HTTPError(
                400,
                f"Got priority {body.priority} but Priority scheduling is not enabled.",
                "priority",
            )
        source: Any = body.messages if isinstance(body, ChatBody) else body.prompt
        if (
            isinstance(body, CompletionBody)
            and isinstance(source, list)
            and len(source) > 1
            and all(isinstance(p, str) for p in source)
        ):
            raise HTTPError(400, "The simulator supports one prompt per request.", "prompt")
        prompt_tokens = self.counter.count(source)
        max_len = self.max_model_len
        if prompt_tokens >= max_len:
            raise HTTPError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, your request "
                f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.",
                "messages" if kind == "chat" else "prompt",
            )
        limit = body.limit()
        if limit is not None and prompt_tokens + limit > max_len:
            raise HTTPError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This model's "
                f"maximum context length is {max_len} tokens and your request has {prompt_tokens} "
                f"input tokens ({limit} > {max_len} - {prompt_tokens}).",
                "max_tokens",
            )
        cap = limit if limit is not None else max_len - prompt_tokens
        if body.ignore_eos:
            out, capped = cap, True
        else:
            truth = self.lengths.true_length(prompt_key(source))
            out, capped = min(truth, cap), truth > cap
        req = SimRequest(
            uuid.uuid4().hex,
            prompt_tokens,
            out,
            "length" if capped else "stop",
            priority=body.priority,
        )
        include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        return req, model, body.stream, include_usage

    @staticmethod
    async def _send_full(send: Send, stream: TokenStream, kind: Kind, rid: str, model: str) -> None:
        req = stream.req
        while not req.finished:
            await stream.event.wait()
            stream.event.clear()
            if stream.disconnected:
                return
        body = full_response(
            kind, rid, int(time.time()), model, req.prompt_tokens, req.generated, req.finish_reason
        )
        await send_json(send, 200, body)

    @staticmethod
    async def _send_stream(send: Send, stream: TokenStream, w: ChunkWriter, kind: Kind) -> None:
        req = stream.req
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        while True:
            await stream.event.wait()
            stream.event.clear()
            if stream.disconnected:
                return
            generated, done = req.generated, req.finished
            new = generated - stream.sent
            if new <= 0 and not done:
                continue
            out = w.role() if stream.sent == 0 and kind == "chat" else ""
            stream.sent = generated
            if not done:
                out += w.tokens(new)
                await send({"type": "http.response.body", "body": out.encode(), "more_body": True})
                continue
            out += w.tokens(new, req.finish_reason)
            if w.include_usage:
                out += w.usage(req.prompt_tokens, generated)
            out += w.done()
            await send({"type": "http.response.body", "body": out.encode()})
            return

"""Streaming OpenAI clients for the load generator; each fills a :class:`Record`.

One question per client: *send this prepared request now and record what comes back.*
All three run on the caller's event loop and are safe to call concurrently from many tasks.

- :class:`RawClient` (default): HTTP/1.1 over ``asyncio`` protocols with ``httptools`` (the
  C parser uvicorn uses); the SSE bytes are handled inside ``data_received``, so a token
  costs no task switch, and requests are pre-rendered bytes. Keep-alive connections are
  reused only while idle for under ``IDLE_REUSE_S`` (below uvicorn's 5 s keep-alive), so a
  request never races a server closing its idle socket.
- :class:`HttpxClient`: ``httpx.AsyncClient`` with an unbounded pool, ``aiter_lines``.
- :class:`OpenAIClient`: the official ``openai`` SDK (``AsyncOpenAI``, ``max_retries=0``),
  one client per API key; the slowest (it builds a pydantic object per event).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any, Protocol

import httptools
import httpx

from experiments.record import CONNECT_ERROR, STREAM_BROKEN, Record

perf = time.perf_counter
IDLE_REUSE_S = 2.0
MAX_ERROR_BODY = 65536


#: the request's true output length, sent with every request; only a gateway configured
#: with ``scheduler.estimator.kind: oracle`` reads it (proxy/estimation.py ORACLE_HEADER)
ORACLE_HEADER = "x-oracle-output-tokens"


class Prepared:
    """A request ready to go: path, JSON body (dict and bytes) and headers (with
    ``output_tokens``, the true length as :data:`ORACLE_HEADER`)."""

    __slots__ = ("body", "headers", "key", "path", "raw", "wire")

    def __init__(
        self,
        path: str,
        body: dict[str, Any],
        key: str,
        request_id: str,
        output_tokens: int | None = None,
    ) -> None:
        self.path, self.body, self.key = path, body, key
        self.raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        self.headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
        if output_tokens is not None:
            self.headers[ORACLE_HEADER] = str(output_tokens)
        #: the whole HTTP/1.1 request, rendered ahead of time by :meth:`RawClient.prepare`
        self.wire = b""


class Client(Protocol):
    def prepare(self, req: Prepared) -> None:
        """Do ahead of time whatever makes sending cheaper (called before the replay)."""

    async def send(self, req: Prepared, rec: Record, t0: float) -> None:
        """Send ``req`` and fill ``rec`` (times relative to ``t0``); never raises for HTTP
        or connection failures (they become ``rec.error``); cancellation propagates."""

    async def aclose(self) -> None: ...


class _Conn(asyncio.Protocol):
    """One keep-alive connection, at most one exchange in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.rec: Record | None = None
        self.t0 = 0.0
        self.waiter: asyncio.Future[bool] | None = None
        self._headers: dict[str, str] = {}
        self._stream = False
        self._tail = b""
        self._err = bytearray()
        self._now = 0.0
        self._any = False

    def begin(self, raw: bytes, rec: Record, t0: float) -> asyncio.Future[bool]:
        assert self.transport is not None
        self.rec, self.t0 = rec, t0
        self._headers, self._stream, self._tail, self._any = {}, False, b"", False
        self._err = bytearray()
        self.waiter = asyncio.get_running_loop().create_future()
        rec.sent_s = perf() - t0
        self.transport.write(raw)
        return self.waiter

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._now = perf() - self.t0
        self._any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._end(STREAM_BROKEN)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._end(STREAM_BROKEN if self._any else CONNECT_ERROR)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.rec is not None:
            self.rec.on_headers(self.parser.get_status_code(), self._headers)
            self._stream = self.rec.status == 200 and self._headers.get(
                "content-type", ""
            ).startswith("text/event-stream")

    def on_body(self, body: bytes) -> None:
        rec = self.rec
        if rec is None:
            return
        if not self._stream:
            if len(self._err) < MAX_ERROR_BODY:
                self._err += body
            return
        lines = (self._tail + body).split(b"\n")
        self._tail = lines.pop()
        now = self._now
        for line in lines:
            if line:
                rec.on_line(line.rstrip(b"\r"), now)

    def on_message_complete(self) -> None:
        rec = self.rec
        if rec is not None:
            if self._tail:
                rec.on_line(self._tail.rstrip(b"\r"), self._now)
                self._tail = b""
            if rec.status == 200 and not self._stream:
                rec.error = "not_a_stream"
            elif rec.status != 200:
                rec.on_error_body(bytes(self._err))
            rec.finish(self._now)
        keep = self.parser.should_keep_alive()
        self.rec = None
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(keep)

    def _end(self, code: str) -> None:
        self.closed = True
        rec, self.rec = self.rec, None
        if rec is not None:
            rec.fail(code, perf() - self.t0)
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(False)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.rec = None
        if self.transport is not None:
            self.transport.abort()


class RawClient:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: collections.deque[_Conn] = collections.deque()
        self.opened = 0

    def prepare(self, req: Prepared) -> None:
        req.wire = self.render(req)

    def render(self, req: Prepared) -> bytes:
        head = [
            f"POST {req.path} HTTP/1.1",
            f"host: {self.host}:{self.port}",
            "content-type: application/json",
            "accept: text/event-stream",
            f"content-length: {len(req.raw)}",
        ]
        head += [f"{k}: {v}" for k, v in req.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + req.raw

    async def _conn(self) -> _Conn:
        now = perf()
        while self._idle:
            c = self._idle.pop()
            if not c.closed and now - c.idle_since < IDLE_REUSE_S:
                return c
            c.abort()
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Conn, self.host, self.port)
        self.opened += 1
        return proto

    async def send(self, req: Prepared, rec: Record, t0: float) -> None:
        raw = req.wire or self.render(req)
        try:
            conn = await self._conn()
        except OSError:
            rec.fail(CONNECT_ERROR, perf() - t0)
            return
        try:
            keep = await conn.begin(raw, rec, t0)
        except BaseException:
            conn.abort()
            raise
        if keep and not conn.closed:
            conn.idle_since = perf()
            self._idle.append(conn)
        elif not conn.closed:
            conn.abort()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().abort()


class HttpxClient:
    def __init__(self, base_url: str) -> None:
        self._c = httpx.AsyncClient(
            base_url=base_url,
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=256, keepalive_expiry=IDLE_REUSE_S
            ),
            timeout=httpx.Timeout(None),
        )

    def prepare(self, req: Prepared) -> None:
        return None

    async def send(self, req: Prepared, rec: Record, t0: float) -> None:
        headers = {**req.headers, "content-type": "application/json"}
        try:
            rec.sent_s = perf() - t0
            async with self._c.stream("POST", req.path, content=req.raw, headers=headers) as r:
                rec.on_headers(r.status_code, {k.lower(): v for k, v in r.headers.items()})
                if r.status_code != 200:
                    rec.on_error_body(await r.aread())
                else:
                    async for line in r.aiter_lines():
                        if line:
                            rec.on_line(line.encode(), perf() - t0)
            rec.finish(perf() - t0)
        except httpx.HTTPError:
            rec.fail(STREAM_BROKEN if rec.status else CONNECT_ERROR, perf() - t0)

    async def aclose(self) -> None:
        await self._c.aclose()


class OpenAIClient:
    def __init__(self, base_url: str) -> None:
        import openai

        self._openai = openai
        self._base = base_url.rstrip("/") + "/v1"
        self._clients: dict[str, Any] = {}

    def _client(self, key: str) -> Any:
        if key not in self._clients:  # the SDK's own HTTP client (its pool: 1000 connections)
            self._clients[key] = self._openai.AsyncOpenAI(
                api_key=key, base_url=self._base, max_retries=0, timeout=None
            )
        return self._clients[key]

    def prepare(self, req: Prepared) -> None:
        self._client(req.key)

    async def send(self, req: Prepared, rec: Record, t0: float) -> None:
        openai = self._openai
        body = dict(req.body)
        known = {
            k: body.pop(k)
            for k in (
                "model",
                "messages",
                "prompt",
                "max_tokens",
                "stream",
                "stream_options",
                "temperature",
                "top_p",
                "seed",
                "stop",
                "presence_penalty",
                "frequency_penalty",
            )
            if k in body
        }
        api = (
            self._client(req.key).chat.completions
            if "messages" in known
            else self._client(req.key).completions
        )
        try:
            rec.sent_s = perf() - t0
            stream = await api.create(
                **known,
                extra_body=body or None,
                extra_headers={k: v for k, v in req.headers.items() if k != "authorization"},
            )
            rec.status = 200
            async for chunk in stream:
                now = perf() - t0
                rec.n_events += 1
                if rec.first_token_s is None and any(
                    (getattr(c, "delta", None) and c.delta.content) or getattr(c, "text", None)
                    for c in chunk.choices
                ):
                    rec.first_token_s = now
                rec.on_chunk(chunk.model_dump(exclude_none=True))
            rec.saw_done = True  # the SDK ends the iteration at data: [DONE]
            rec.finish(perf() - t0)
        except openai.APIStatusError as e:
            rec.on_headers(e.status_code, {k.lower(): v for k, v in e.response.headers.items()})
            rec.on_error_body(e.response.content)
            rec.finish(perf() - t0)
        except openai.APIError:
            rec.fail(STREAM_BROKEN if rec.status else CONNECT_ERROR, perf() - t0)

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()


def make_client(kind: str, base_url: str) -> RawClient | HttpxClient | OpenAIClient:
    if kind == "raw":
        u = httpx.URL(base_url)
        return RawClient(u.host, u.port or (443 if u.scheme == "https" else 80))
    if kind == "httpx":
        return HttpxClient(base_url)
    if kind == "openai":
        return OpenAIClient(base_url)
    raise ValueError(f"unknown client {kind!r}; choose raw, httpx or openai")

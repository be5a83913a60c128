"""A lean HTTP/1.1 transport for httpx: asyncio protocols, ``httptools``, an O(1) pool.

Why: httpcore's pool walks every connection on every request and asks each idle one whether
its socket is readable (a ``select`` per connection), so its cost grows with the number of
connections — measured here, a pass-through fell from ~990 req/s at 1 client to ~370 req/s
at 64. This transport keeps idle connections in a LIFO deque (O(1) to take and give back),
learns that the engine closed a connection from the event loop (``connection_lost``) instead
of polling, and parses responses with ``httptools`` (the C parser uvicorn uses).

Plugged into ``httpx.AsyncClient(transport=...)``, so callers keep httpx's API and
exceptions: ``ConnectError`` / ``ConnectTimeout`` (nothing was sent), ``PoolTimeout``,
``ReadTimeout``, ``ReadError`` (the connection broke mid-response), ``RemoteProtocolError``
(no or malformed response). Timeouts come from the client (``request.extensions["timeout"]``).

Scope: plain ``http://`` to engines on a trusted network (no TLS, no proxies, no HTTP/2, no
``Expect: 100-continue``). A reused keep-alive connection that turns out to be closed
before any response byte arrives is retried once on a new connection (the engine closed it
while idle, so it never saw the request). Idle connections are closed after
``keepalive_expiry`` seconds — keep it below the engine's own keep-alive timeout (uvicorn,
and so vLLM, closes after 5 s). One event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

#: pause reading from the engine while this many body bytes wait for the consumer
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class _Stale(Exception):
    """A reused connection was closed before any response byte arrived."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying at most one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._counted = True  # counts in pool.n_open until closed
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.got_bytes = False
        self.error: Exception | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.must_close = False
        self.keep_alive = False
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {e}"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closed()
        if not self.complete:
            if not self.got_bytes:
                self._wake(_Stale())
            elif not self.head_done:
                self._wake(
                    httpx.RemoteProtocolError(
                        "server disconnected before the end of the response headers"
                    )
                )
            else:
                self._wake(httpx.ReadError(f"connection lost mid-response: {exc or 'closed'}"))

    # -- httptools callbacks ---------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True
        self._wake(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake(None)

    def on_message_complete(self) -> None:
        self.complete = True
        # asked now: httptools forgets it once the callback returns
        self.keep_alive = self.parser.should_keep_alive()
        self._wake(None)

    # -- request side ----------------------------------------------------------------
    def _wake(self, exc: BaseException | None) -> None:
        if isinstance(exc, Exception) and self.error is None:
            self.error = exc
        w = self.waiter
        if w is not None and not w.done():
            self.waiter = None
            w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._wake(exc)
        self.close()

    async def _wait(self, limit_s: float | None, what: str) -> None:
        """Until the parser wakes us; ``httpx.ReadTimeout`` after ``limit_s``."""
        w = self.waiter = self._loop.create_future()
        timer = None
        if limit_s is not None:
            timer = self._loop.call_later(limit_s, _expire, w)
        try:
            await w
        finally:
            if timer is not None:
                timer.cancel()
        if self.waiter is w:  # timed out: nobody woke us
            self.waiter = None
            raise httpx.ReadTimeout(f"no {what} from the server within {limit_s}s")

    async def send(self, data: bytes, read_timeout: float | None) -> None:
        """Write the request and wait for the response head."""
        assert self.transport is not None
        self._reset()
        self.transport.write(data)
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(read_timeout, "response")

    async def next_chunk(self, read_timeout: float | None) -> bytes:
        """Body bytes received so far (joined), waiting for some; ``b""`` at the end."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(read_timeout, "data")
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return bytes(data)

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and not self.must_close
            and self.keep_alive
        )

    def _mark_closed(self) -> None:
        self.closed = True
        if self._counted:
            self._counted = False
            self._pool.forget()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._mark_closed()


def _expire(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)


class _Pool:
    """Keep-alive connections to one origin: a LIFO of idle ones, a FIFO of waiters."""

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int,
        keepalive_expiry: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.loop = loop
        self.idle: collections.deque[_Connection] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.n_open = 0

    def forget(self) -> None:
        """A connection closed: one more may be opened."""
        self.n_open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """Tell the oldest waiter that it may open a connection."""
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def acquire(
        self, connect_timeout: float | None, pool_timeout: float | None
    ) -> _Connection:
        now = time.monotonic()
        idle = self.idle
        while idle and (idle[0].closed or now - idle[0].idle_since > self.keepalive_expiry):
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        deadline = None if pool_timeout is None else now + pool_timeout
        while self.n_open >= self.max_connections:
            w: asyncio.Future[_Connection | None] = self.loop.create_future()
            self.waiters.append(w)
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                handed: _Connection | None = await asyncio.wait_for(w, remaining)
            except BaseException as e:
                # handed a connection (or a free slot) just as we gave up: pass it on
                if w.done() and not w.cancelled():
                    got = w.result()
                    if got is not None:
                        self.release(got)
                    else:
                        self._wake_one()
                if isinstance(e, TimeoutError):
                    raise httpx.PoolTimeout(
                        f"no free connection to {self.host}:{self.port} within {pool_timeout}s"
                    ) from None
                raise
            if handed is not None:
                return handed
        self.n_open += 1
        try:
            async with asyncio.timeout(connect_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except TimeoutError:
            self.forget()
            raise httpx.ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as e:
            self.forget()
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {e}") from e
        except BaseException:
            self.forget()
            raise
        return proto

    def release(self, c: _Connection) -> None:
        if not c.reusable:
            c.close()
            return
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                c.reused = True
                w.set_result(c)
                return
        c.idle_since = time.monotonic()
        self.idle.append(c)

    def close(self) -> None:
        for w in self.waiters:
            if not w.done():
                w.cancel()
        self.waiters.clear()
        while self.idle:
            self.idle.pop().close()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, pool: _Pool, conn: _Connection, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        while True:
            chunk = await conn.next_chunk(self._timeout)
            if not chunk:
                break
            yield chunk
        self._give_back()

    def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)  # closes it unless complete and keep-alive

    async def aclose(self) -> None:
        self._give_back()


class _BufferedStream(httpx.AsyncByteStream):
    """A body received whole before the response was returned."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._body:
            yield self._body


_EXTENSIONS = {"http_version": b"HTTP/1.1"}


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    t: dict[str, float | None] = request.extensions.get("timeout", {})
    return t.get("connect"), t.get("read"), t.get("pool")


def _render(request: httpx.Request, body: bytes) -> bytes:
    url = request.url
    lines = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    chunked = False
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":
            chunked = value.lower() == b"chunked"
            continue
        lines += [name, b": ", value, b"\r\n"]
    if chunked:  # a streamed body: we have read it whole, so send its length
        lines += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport for ``http://`` origins (see the module docstring).

    ``max_connections`` caps open connections per origin; a request that finds them all busy
    waits up to the client's pool timeout, then raises ``httpx.PoolTimeout``.
    """

    def __init__(self, *, max_connections: int = 512, keepalive_expiry: float = 4.0) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._pools: dict[tuple[str, int], _Pool] = {}
        self._closed = False

    def _pool(self, url: httpx.URL) -> _Pool:
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks plain http only, not {url}")
        key = (url.host, url.port or 80)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(
                key[0],
                key[1],
                self.max_connections,
                self.keepalive_expiry,
                asyncio.get_running_loop(),
            )
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        connect_t, read_t, pool_t = _timeouts(request)
        return await self._send(
            request.url, _render(request, body), request.method == "HEAD", connect_t, read_t, pool_t
        )

    async def post(
        self,
        url: httpx.URL,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        """POST without building an ``httpx.Request`` (the gateway's hot path).

        ``headers`` must not carry ``Host`` or ``Content-Length`` (they are added);
        ``timeouts`` is ``httpx.Timeout.as_dict()``. Same response and errors as
        :meth:`handle_async_request`; the response has no ``request`` attached.
        """
        head = [
            b"POST ",
            url.raw_path,
            b" HTTP/1.1\r\nHost: ",
            url.netloc,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"\r\n", body]
        return await self._send(
            url,
            b"".join(head),
            False,
            timeouts.get("connect"),
            timeouts.get("read"),
            timeouts.get("pool"),
        )

    async def _send(
        self,
        url: httpx.URL,
        data: bytes,
        head_only: bool,
        connect_t: float | None,
        read_t: float | None,
        pool_t: float | None,
    ) -> httpx.Response:
        if self._closed:
            raise RuntimeError("LeanTransport is closed")
        pool = self._pool(url)
        for attempt in (0, 1):
            conn = await pool.acquire(connect_t, pool_t)
            try:
                await conn.send(data, read_t)
            except _Stale:
                conn.close()
                if attempt == 0 and conn.reused:
                    continue
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response"
                ) from None
            except BaseException:
                conn.close()
                raise
            if head_only:  # no body follows; the parser cannot know that
                conn.complete = conn.must_close = True
            if conn.complete and conn.error is None:
                # the whole body came with the head (the usual small JSON answer): hand the
                # connection back now, and let aread() skip httpx's decoder chain
                body = b"".join(conn.chunks)
                resp = httpx.Response(
                    conn.status,
                    headers=conn.headers,
                    stream=_BufferedStream(body),
                    extensions=_EXTENSIONS,
                )
                pool.release(conn)
                resp._content = body
                return resp
            return httpx.Response(
                conn.status,
                headers=conn.headers,
                stream=_ResponseStream(pool, conn, read_t),
                extensions=_EXTENSIONS,
            )
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        pools, self._pools = list(self._pools.values()), {}
        for p in pools:
            p.close()

    def stats(self) -> dict[str, Any]:
        """Open and idle connections per origin (for tests and debugging)."""
        return {
            f"{h}:{p}": {"open": pool.n_open, "idle": sum(not c.closed for c in pool.idle)}
            for (h, p), pool in self._pools.items()
        }

"""LeanTransport against real loopback servers: keep-alive reuse, bounded pool, streaming,
flow control, and every failure mapped to the httpx exception (and gateway error) it must be.

Servers are plain ``asyncio.start_server`` handlers speaking HTTP/1.1 by hand, so a test can
produce exactly the misbehaviour it needs (hang, close while idle, drop mid-body, garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from adapters.base import Backend
from adapters.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from adapters.transport import LeanTransport
from adapters.upstream import UpstreamClients, UpstreamConnectFailed, map_exception, open_request

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback TCP server; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.closed_by_peer = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.closed_by_peer += 1
            finally:
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()

        self._server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def read_request(self, r: asyncio.StreamReader) -> bytes | None:
        """One request's body (by content-length), or None at end of connection."""
        try:
            head = await r.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        self.requests += 1
        return await r.readexactly(length)


def response(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (
        (
            f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def echo(srv: Server) -> Handler:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (body := await srv.read_request(r)) is not None:
            w.write(response(b'{"echo":' + (body or b"null") + b"}"))
            await w.drain()

    return handle


@contextlib.asynccontextmanager
async def server(make: Callable[[Server], Handler]) -> AsyncIterator[Server]:
    srv = Server(lambda r, w: asyncio.sleep(0))
    srv.handler = make(srv)
    async with srv:
        yield srv


def client(t: LeanTransport, url: str, **timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=t, base_url=url, timeout=httpx.Timeout(5.0, **timeouts))


# -- the happy path ----------------------------------------------------------------------
async def test_keep_alive_connection_is_reused() -> None:
    async with server(echo) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:
            for i in range(5):
                r = await c.post("/v1/x", json={"i": i})
                assert r.status_code == 200
                assert r.json() == {"echo": {"i": i}}
                assert r.headers["content-type"] == "application/json"
        assert srv.requests == 5
        assert srv.connections == 1


async def test_concurrency_is_bounded_and_connections_are_reused() -> None:
    def slow(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while (body := await srv.read_request(r)) is not None:
                await asyncio.sleep(0.005)
                w.write(response(body))
                await w.drain()

        return handle

    async with server(slow) as srv:
        t = LeanTransport(max_connections=8)
        async with client(t, srv.url) as c:
            rs = await asyncio.gather(*(c.post("/", content=str(i).encode()) for i in range(200)))
            assert sorted(int(r.content) for r in rs) == list(range(200))
            stats = t.stats()
        (pool,) = stats.values()
        assert pool["open"] <= 8
        assert srv.connections <= 8
        assert srv.requests == 200


async def test_streamed_body_arrives_whole_and_in_order() -> None:
    """A chunked 2 MB response, read slower than it arrives (flow control pauses reading)."""
    piece = b"x" * 65536

    def chunked(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while await srv.read_request(r) is not None:
                w.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for i in range(32):
                    data = bytes([65 + i % 26]) + piece
                    w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    await w.drain()
                w.write(b"0\r\n\r\n")
                await w.drain()

        return handle

    async with server(chunked) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:
            for _ in range(2):  # the second one reuses the connection
                async with c.stream("POST", "/") as r:
                    got = b""
                    async for chunk in r.aiter_raw():
                        got += chunk
                        await asyncio.sleep(0.001)
                assert len(got) == 32 * (len(piece) + 1)
                assert got[:: len(piece) + 1] == bytes(65 + i % 26 for i in range(32))
        assert srv.connections == 1


async def test_small_stream_received_whole_iterates_once_and_frees_the_connection() -> None:
    """A short SSE answer that arrives with its head (the stub's, often) is still a stream."""
    events = b"data: 1\n\ndata: [DONE]\n\n"

    def sse(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while await srv.read_request(r) is not None:
                w.write(response(events))
                await w.drain()

        return handle

    async with server(sse) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:
            for _ in range(3):
                async with c.stream("POST", "/", content=b"{}") as r:
                    assert [chunk async for chunk in r.aiter_raw()] == [events]
            assert next(iter(t.stats().values())) == {"open": 1, "idle": 1}
        assert srv.connections == 1


async def test_streamed_request_body_is_sent_with_its_length() -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b'{"a":'
        yield b"1}"

    async with server(echo) as srv:
        async with client(LeanTransport(), srv.url) as c:
            r = await c.post("/", content=gen())
            assert r.json() == {"echo": {"a": 1}}


async def test_upstream_clients_use_the_lean_transport_for_http() -> None:
    async with server(echo) as srv:
        clients = UpstreamClients()
        b = Backend(name="e", url=srv.url, models=("m",))
        try:
            resp = await open_request(
                clients, b, "/v1/chat/completions", b'{"x":1}', {"content-type": "application/json"}
            )
            assert resp.status_code == 200
            assert await resp.aread() == b'{"echo":{"x":1}}'
            await resp.aclose()
            assert isinstance(clients.client(b)._transport, LeanTransport)
        finally:
            await clients.aclose()


# -- failures ------------------------------------------------------------------------------
async def test_connect_refused_is_connect_error() -> None:
    async with server(echo) as srv:
        url = srv.url
    async with client(LeanTransport(), url) as c:  # nothing listens there any more
        with pytest.raises(httpx.ConnectError) as ei:
            await c.post("/", content=b"{}")
    b = Backend(name="gone", url=url, models=("m",))
    assert isinstance(map_exception(ei.value, b), UpstreamConnectFailed)


async def test_no_answer_is_read_timeout() -> None:
    def hang(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await srv.read_request(r)
            await r.read()  # until the client gives up

        return handle

    async with server(hang) as srv:
        t = LeanTransport()
        async with client(t, srv.url, read=0.2) as c:
            with pytest.raises(httpx.ReadTimeout) as ei:
                await c.post("/", content=b"{}")
            assert next(iter(t.stats().values()))["open"] == 0  # the stuck one was closed
        b = Backend(name="slow", url=srv.url, models=("m",))
        assert isinstance(map_exception(ei.value, b), UpstreamTimeout)


async def test_all_connections_busy_is_pool_timeout() -> None:
    release = asyncio.Event()

    def held(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while (body := await srv.read_request(r)) is not None:
                await release.wait()
                w.write(response(body))
                await w.drain()

        return handle

    async with server(held) as srv:
        t = LeanTransport(max_connections=1)
        async with client(t, srv.url, pool=0.1) as c:
            first = asyncio.create_task(c.post("/", content=b"1"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout) as ei:
                await c.post("/", content=b"2")
            release.set()
            assert (await first).content == b"1"
            # the slot is free again: a waiter gets the connection handed over
            assert (await c.post("/", content=b"3")).content == b"3"
        b = Backend(name="busy", url=srv.url, models=("m",))
        assert isinstance(map_exception(ei.value, b), UpstreamUnavailable)
        assert srv.connections == 1


async def test_waiters_get_connections_in_turn() -> None:
    def slow(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while (body := await srv.read_request(r)) is not None:
                await asyncio.sleep(0.01)
                w.write(response(body))
                await w.drain()

        return handle

    async with server(slow) as srv:
        t = LeanTransport(max_connections=2)
        async with client(t, srv.url) as c:
            rs = await asyncio.gather(*(c.post("/", content=b"%d" % i) for i in range(20)))
        assert [r.content for r in rs] == [b"%d" % i for i in range(20)]
        assert srv.connections == 2


async def test_connection_dropped_mid_body_is_read_error() -> None:
    def drop(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await srv.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
            await w.drain()

        return handle

    async with server(drop) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:
            async with c.stream("POST", "/", content=b"{}") as r:
                assert r.status_code == 200
                with pytest.raises(httpx.ReadError) as ei:
                    await r.aread()
            assert next(iter(t.stats().values()))["open"] == 0
        b = Backend(name="b", url=srv.url, models=("m",))
        assert isinstance(map_exception(ei.value, b), UpstreamError)


@pytest.mark.parametrize("reply", [b"garbage\r\n\r\n", b""])
async def test_no_valid_response_is_remote_protocol_error(reply: bytes) -> None:
    def bad(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await srv.read_request(r)
            w.write(reply)
            await w.drain()

        return handle

    async with server(bad) as srv:
        async with client(LeanTransport(), srv.url) as c:
            with pytest.raises(httpx.RemoteProtocolError) as ei:
                await c.post("/", content=b"{}")
        b = Backend(name="b", url=srv.url, models=("m",))
        err = map_exception(ei.value, b)
        assert isinstance(err, UpstreamError) and not isinstance(err, UpstreamConnectFailed)
        assert srv.connections == 1  # a fresh connection is not retried


async def test_engine_closing_an_idle_connection_is_noticed() -> None:
    """The engine closes idle keep-alive connections (uvicorn after 5 s): a new one is used."""

    def close_when_idle(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            body = await srv.read_request(r)
            w.write(response(body or b""))
            await w.drain()

        return handle  # returning closes the connection

    async with server(close_when_idle) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:
            for i in range(3):
                assert (await c.post("/", content=b"%d" % i)).content == b"%d" % i
                await asyncio.sleep(0.05)  # the FIN arrives and is seen while idle
        assert srv.connections == 3


async def test_stale_reused_connection_is_retried_once() -> None:
    """A reused connection that dies before answering (the engine closed it as we sent) is
    retried on a new connection; the engine never saw the request on the old one."""

    def one_per_connection(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            body = await srv.read_request(r)
            w.write(response(body or b""))
            await w.drain()
            # keep the socket open but answer nothing more: close on the next request
            await r.readuntil(b"\r\n\r\n")

        return handle

    async with server(one_per_connection) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:
            assert (await c.post("/", content=b"1")).content == b"1"
            assert (await c.post("/", content=b"2")).content == b"2"
        assert srv.connections == 2
        assert srv.requests == 2


async def test_idle_connections_expire() -> None:
    async with server(echo) as srv:
        t = LeanTransport(keepalive_expiry=0.05)
        async with client(t, srv.url) as c:
            await c.post("/", content=b"1")
            await asyncio.sleep(0.1)
            await c.post("/", content=b"2")
        assert srv.connections == 2


async def test_cancelling_a_request_closes_its_connection() -> None:
    """What a client disconnect does in the gateway: the engine sees the connection close."""
    gone = asyncio.Event()

    def stream_forever(srv: Server) -> Handler:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await srv.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            try:
                while True:
                    w.write(b"6\r\ndata: \r\n")
                    await w.drain()
                    await asyncio.sleep(0.01)
            except ConnectionError:
                gone.set()
                raise

        return handle

    async with server(stream_forever) as srv:
        t = LeanTransport()
        async with client(t, srv.url) as c:

            async def consume() -> None:
                async with c.stream("POST", "/", content=b"{}") as r:
                    async for _ in r.aiter_raw():
                        pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(gone.wait(), 5)
            assert next(iter(t.stats().values()))["open"] == 0


async def test_https_is_refused() -> None:
    async with httpx.AsyncClient(transport=LeanTransport()) as c:
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.post("https://127.0.0.1:1/", content=b"{}")

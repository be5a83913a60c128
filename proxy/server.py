"""The HTTP server: uvicorn with the connection limits and timeouts uvicorn lacks.

:func:`build_server` is how every entry point runs the app (``driftsched serve``, the demo,
the test harness). It runs uvicorn's httptools protocol with four additions, all of them
timer handles armed and cancelled on protocol events, so a request pays nothing per chunk:

* **header timeout** (``server.header_timeout_s``): from a connection's opening (or from the
  first byte of a later request on a kept-alive connection) to the end of the request's
  headers. uvicorn has none: a client that connects and sends half a header block keeps its
  connection, and its file descriptor, for ever. Past it, a client that sent part of a
  request gets 408 in OpenAI's shape, and the connection is closed.
* **send timeout** (``server.send_timeout_s``): the transport tells the protocol when its
  write buffer fills up (``pause_writing``: the client stopped reading, and the kernel's
  buffers are full) and when it drains again (``resume_writing``). A buffer that stays full
  this long aborts the connection; the app sees ``http.disconnect``, which cancels the
  request and releases its engine hold like any client that goes away.
* **connection limit** (``server.max_connections``): uvicorn's ``limit_concurrency``, whose
  plain-text ``Service Unavailable`` is replaced by a 503 in OpenAI's shape with
  ``retry-after`` and ``connection: close``.
* a response that ends before the request body was read to its end (408, 413, an early
  401) says ``connection: close`` and closes the connection, since the rest of that body
  cannot be told from the next request (without the header a client reuses the connection
  and reads a reset).

The body read timeout and the maximum request duration need the app's error path (a 408 or
504 rendered, counted and logged like any error) and live in the app
(:mod:`proxy.openai_api`, :mod:`proxy.app`).

Relies on uvicorn's ``HttpToolsProtocol`` callbacks (``on_message_begin``,
``on_headers_complete``, ``on_response_complete``, ``pause_writing``/``resume_writing``),
its ``cycle`` and ``_start_asgi_task``; ``tests/proxy/test_server.py`` checks each against
the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar

import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from adapters.errors import ClientTimeout, GatewayError, ServerOverloaded
from proxy.config import ServerConfig

if TYPE_CHECKING:
    from proxy.app import DriftSchedApp

log = logging.getLogger("driftsched.server")

#: called with the reason each time the server closes or refuses a connection on a limit
#: (``header_timeout``, ``send_timeout``, ``over_limit``)
ConnectionEvents = Callable[[str], None]


def _no_events(reason: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    send_timeout_s: float
    events: ConnectionEvents = _no_events

    @classmethod
    def from_config(cls, server: ServerConfig,
                    events: ConnectionEvents = _no_events) -> ConnectionLimits:
        return cls(header_timeout_s=server.header_timeout_s,
                   send_timeout_s=server.send_timeout_s, events=events)


def _raw_response(err: GatewayError) -> bytes:
    """``err`` as a complete HTTP/1.1 response that closes the connection."""
    body = err.body()
    head = [f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}",
            "content-type: application/json", f"content-length: {len(body)}",
            *(f"{k}: {v}" for k, v in err.headers.items() if k != "connection"),
            "connection: close", "", ""]
    return "\r\n".join(head).encode() + body


_HEADER_TIMEOUT = _raw_response(ClientTimeout(
    "The request headers did not arrive in time (server.header_timeout_s)."))


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The answer past the connection limit (in place of uvicorn's plain text)."""
    err = ServerOverloaded("The gateway is at its connection limit (server.max_connections); "
                           "retry shortly.")
    body = err.body()
    await send({"type": "http.response.start", "status": err.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in err.headers.items()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header and send timeouts (module doc).
    :func:`protocol_class` makes a subclass that carries the limits."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        #: some bytes of a request came, its headers are not complete
        self._partial = False
        #: the keep-alive the current request's cycle gets once its body is all in
        self._keep_alive = True

    # -- header timeout ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_read()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._partial = True
        if self._read_timer is None:
            self._arm_read()

    def on_headers_complete(self) -> None:
        self._partial = False
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().on_headers_complete()
        # until its body is all in, a response to this request says ``connection: close``
        # (and uvicorn closes after it): the client must not reuse a connection whose rest
        # of body would be read as the next request (on_response_complete)
        cycle = self.cycle
        if cycle is not None:
            self._keep_alive, cycle.keep_alive = cycle.keep_alive, False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = self._keep_alive

    def shutdown(self) -> None:
        self._keep_alive = False
        super().shutdown()

    def _arm_read(self) -> None:
        self._read_timer = self.loop.call_later(self.limits.header_timeout_s, self._read_timeout)

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # a pipelined request behind a response still being sent: its time starts
            # when that response is out
            self._arm_read()
            return
        if self._partial:
            self.transport.write(_HEADER_TIMEOUT)
        self.transport.close()
        self.limits.events("header_timeout")
        log.info("request headers not received in time; connection closed",
                 extra={"client": _addr(self.client), "partial": self._partial})

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # answered before its body was all read (408, 413): the rest of the body
            # would be parsed as the next request
            self.transport.close()
        super().on_response_complete()

    # -- send timeout --------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.limits.send_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        # abort, not close: close() waits for the buffer the client is not reading
        self.transport.abort()
        self.limits.events("send_timeout")
        log.info("client stopped reading the response; connection aborted",
                 extra={"client": _addr(self.client), "send_timeout_s": self.limits.send_timeout_s})

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._read_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._stall_timer = None
        super().connection_lost(exc)

    # -- connection limit ----------------------------------------------------------------
    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable:  # uvicorn's limit_concurrency answer, in plain text
            app = _overloaded
            self.limits.events("over_limit")
        super()._start_asgi_task(cycle, app)


def body_deadline(receive: Any, timeout_s: float) -> Any:
    """``receive`` that raises a 408 (Starlette's ``HTTPException``, which the admin API
    renders in OpenAI's shape) if the request body is not all in within ``timeout_s``: the
    admin API's body read timeout. After the body, calls pass straight through."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    done = False

    async def timed() -> Any:
        nonlocal done
        if done:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                msg = await receive()
        except TimeoutError:
            raise HTTPException(408, f"The request body did not arrive within {timeout_s:g} s "
                                     "(server.body_timeout_s).") from None
        done = msg.get("type") != "http.request" or not msg.get("more_body", False)
        return msg

    return timed


def _addr(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


def protocol_class(limits: ConnectionLimits) -> type[GatewayProtocol]:
    """A :class:`GatewayProtocol` subclass carrying ``limits`` (uvicorn builds one protocol
    object per connection from a class)."""
    return type("GatewayProtocol", (GatewayProtocol,), {"limits": limits})


def ensure_fd_limit(max_connections: int | None) -> None:
    """Raise the soft open-file limit towards what ``max_connections`` needs (a client
    socket and an engine socket each, plus slack), as far as the hard limit allows: at the
    usual soft limit of 1024, ~500 streams would end in ``EMFILE`` long before the limit."""
    if max_connections is None:
        return
    need = 2 * max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning("open-file limit %d is below what server.max_connections=%d needs (%d)",
                    target, max_connections, need)


def build_server(app: DriftSchedApp, **overrides: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` with its ``server`` settings' limits (module doc); the
    connections it closes or refuses are counted in ``driftsched_connections_closed_total``.
    ``overrides`` are uvicorn ``Config`` arguments (a test's ``port``, ``log_level``, ...)."""
    server = app.settings.server

    def events(reason: str) -> None:
        gw = app.gateway
        if gw is not None:
            gw.metrics.connections_closed.labels(reason).inc()

    ensure_fd_limit(server.max_connections)
    kwargs: dict[str, Any] = {
        "host": server.host, "port": server.port, "access_log": False, "log_config": None,
        "log_level": server.log_level, "lifespan": "on", "proxy_headers": False,
        "http": protocol_class(ConnectionLimits.from_config(server, events)),
        # uvicorn refuses a request when connections (this one included) >= the limit
        "limit_concurrency": None if server.max_connections is None
        else server.max_connections + 1,
        "timeout_keep_alive": server.keep_alive_timeout_s,
        **overrides,
    }
    return uvicorn.Server(uvicorn.Config(app, **kwargs))

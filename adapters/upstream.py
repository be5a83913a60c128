"""OpenAI-compatible HTTP upstream: pooled clients and failure mapping.

One pooled ``httpx.AsyncClient`` per backend, created lazily on the event loop and closed
with the app. Plain-``http://`` engines go through :class:`adapters.transport.LeanTransport`
(O(1) keep-alive pool; httpcore's slows down as connections grow), ``https://`` ones through
httpx's own transport. :func:`open_request` sends a request and returns the response with its body
not yet read; failures become the gateway's own exceptions:

    connect refused / DNS / connect timeout -> UpstreamConnectFailed (nothing was sent:
                                               the caller may retry another backend)
    closed before any response (a dead      -> UpstreamConnectFailed too (nothing reached
      engine's pooled connection)              the client; the engine is gone)
    pool exhausted                          -> UpstreamUnavailable (503)
    read timeout                            -> UpstreamTimeout (504)
    connection dropped mid-body             -> UpstreamError (502)

:func:`upstream_status_error` maps an engine's error status the same way: its 4xx are the
client's fault and keep their status, except 401 / 403 / 407 / 429, which are about the
*gateway's* credentials or quota at the engine, not the tenant's: those are 502
``upstream_error``. Messages name the backend, never its address: no host, port or URL of an
engine reaches a client (the caller logs the detail).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapters.base import Backend
from adapters.errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from adapters.transport import LeanTransport


class UpstreamConnectFailed(UpstreamUnavailable):
    """The request never reached the backend; safe to retry elsewhere."""

    status = 502
    default_code = "upstream_connect_error"


def default_transport(backend: Backend) -> httpx.AsyncBaseTransport | None:
    """The lean transport for plain-http engines; ``None`` (httpx's own) for https."""
    if backend.url.startswith("http://"):
        return LeanTransport(max_connections=backend.max_connections)
    return None


@dataclass(slots=True, eq=False)
class _Upstream:
    """One backend's client, and what the hot path needs to skip the client's layers."""

    url: str
    client: httpx.AsyncClient
    #: the client's transport when we chose it (sent to directly); None: httpx's default
    transport: httpx.AsyncBaseTransport | None
    timeout: dict[str, float | None]
    urls: dict[str, httpx.URL] = field(default_factory=dict)


class UpstreamClients:
    """Pooled HTTP clients keyed by backend name. Not thread-safe; one event loop.

    ``transport_factory(backend)`` returns the transport of that backend's client (``None``:
    httpx's default); by default :func:`default_transport`.
    """

    def __init__(self, transport_factory: Any | None = None) -> None:
        self._ups: dict[str, _Upstream] = {}
        self._stale: list[httpx.AsyncClient] = []
        self._transport_factory = transport_factory or default_transport

    def _upstream(self, backend: Backend) -> _Upstream:
        up = self._ups.get(backend.name)
        if up is not None and up.url != backend.url:
            # the engine was relaunched on another port; the old client is stale
            self._stale.append(up.client)
            up = None
        if up is None or up.client.is_closed:
            limits = httpx.Limits(
                max_connections=backend.max_connections,
                max_keepalive_connections=backend.max_connections,
                keepalive_expiry=30.0,
            )
            timeout = httpx.Timeout(
                connect=backend.connect_timeout_s,
                read=backend.read_timeout_s,
                write=backend.read_timeout_s,
                pool=backend.connect_timeout_s,
            )
            transport: httpx.AsyncBaseTransport | None
            if backend.kind == "litellm":  # not HTTP: LiteLLM answers in-process
                from adapters.litellm_transport import LiteLLMTransport

                transport = LiteLLMTransport.for_backend(backend)
            else:
                transport = self._transport_factory(backend)
            c = httpx.AsyncClient(base_url=backend.url, timeout=timeout, limits=limits,
                                  transport=transport)
            up = self._ups[backend.name] = _Upstream(backend.url, c, transport, timeout.as_dict())
        return up

    def client(self, backend: Backend) -> httpx.AsyncClient:
        return self._upstream(backend).client

    async def post(
        self, backend: Backend, path: str, body: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        """POST ``body``; the response comes back with its body not yet read.

        Goes straight to the transport (no cookies, auth or redirect layers, and a cached
        URL per path) unless the client uses httpx's default transport; to
        :meth:`LeanTransport.post <adapters.transport.LeanTransport.post>` without even an
        ``httpx.Request``. Raises httpx errors.
        """
        up = self._upstream(backend)
        if up.transport is None:
            req = up.client.build_request("POST", path, content=body, headers=headers)
            return await up.client.send(req, stream=True)
        url = up.urls.get(path)
        if url is None:
            url = up.urls[path] = httpx.URL(backend.url + path)
        if isinstance(up.transport, LeanTransport):
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            return await up.transport.post(url, body, raw, up.timeout)
        req = httpx.Request("POST", url, content=body, headers=headers,
                            extensions={"timeout": up.timeout})
        resp = await up.transport.handle_async_request(req)
        resp.request = req
        return resp

    async def drop(self, name: str) -> None:
        up = self._ups.pop(name, None)
        if up is not None:
            await up.client.aclose()

    async def aclose(self) -> None:
        clients = [*(u.client for u in self._ups.values()), *self._stale]
        self._ups, self._stale = {}, []
        for c in clients:
            await c.aclose()


#: engine statuses about the gateway's own standing at the engine (its key, its quota)
_GATEWAY_FAULT = frozenset({401, 403, 407, 429})
#: what an engine's message must not carry to a client: URLs, host:port, IP addresses
_ADDRESS = re.compile(
    r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+"
    r"|\[[0-9a-fA-F:.]+\](?::\d+)?"
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"
    r"|\b[a-zA-Z][a-zA-Z0-9-]*(?:\.[a-zA-Z0-9-]+)*:\d{2,5}\b"
)


def scrub(message: str) -> str:
    """``message`` with every URL, ``host:port`` and IP address replaced by ``<address>``."""
    return _ADDRESS.sub("<address>", message)


def map_exception(exc: httpx.HTTPError, backend: Backend) -> GatewayError:
    """The client's error for an I/O failure talking to ``backend`` (no exception text: it
    holds addresses; the caller logs it)."""
    where = f"backend {backend.name!r}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        what = "timed out" if isinstance(exc, httpx.ConnectTimeout) else "was refused or failed"
        return UpstreamConnectFailed(f"the connection to {where} {what}")
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamUnavailable(f"{where} has no free connection")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{where} did not answer in time")
    return UpstreamError(f"{where} failed: {type(exc).__name__}")


async def open_request(
    clients: UpstreamClients,
    backend: Backend,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> httpx.Response:
    """POST ``body`` to ``backend`` and return the response, body not yet read."""
    if backend.api_key:
        headers = {**headers, "authorization": f"Bearer {backend.api_key}"}
    try:
        return await clients.post(backend, path, body, headers)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        # the engine closed the connection before any response (a pooled connection to an
        # engine that just died): nothing reached the client, so another engine may serve it
        raise UpstreamConnectFailed(
            f"backend {backend.name!r} closed the connection before answering") from e
    except httpx.HTTPError as e:
        raise map_exception(e, backend) from e


def upstream_status_error(status: int, body: bytes, backend: Backend) -> GatewayError:
    """An error response from the engine, as the gateway's own error.

    4xx responses are the client's fault and keep their status and OpenAI-shaped message
    (vLLM's 400 for an over-long prompt, say), except 401 / 403 / 407 / 429: the engine
    refused the gateway (its key, its own rate limit), so they are 502 ``upstream_error``,
    as are 5xx. Messages are scrubbed of addresses (:func:`scrub`).
    """
    message, err_type, code, param = _parse_error(body)
    message = scrub(message) if message else None
    if 400 <= status < 500 and status not in _GATEWAY_FAULT:
        err = _PassThrough(message or f"backend returned HTTP {status}", code=code, param=param)
        err.status = status
        err.error_type = err_type or "invalid_request_error"
        return err
    if status in _GATEWAY_FAULT:
        return UpstreamError(
            f"backend {backend.name!r} refused the gateway's request (HTTP {status}); "
            "this is not about your API key or your rate limits")
    return UpstreamError(
        f"backend {backend.name!r} returned HTTP {status}" + (f": {message}" if message else ""),
    )


class _PassThrough(GatewayError):
    """An engine's 4xx relayed with its own status and fields."""

    def __init__(self, message: str, *, code: str | None, param: str | None) -> None:
        super().__init__(message, code=code, param=param)
        self.status = 400
        self.error_type = "invalid_request_error"

    @property
    def type(self) -> str:
        return self.error_type


def _parse_error(body: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    try:
        obj = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or None), None, None, None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or obj.get("message") or obj.get("detail")
            code = err.get("code")
            return (
                str(msg) if msg is not None else None,
                str(err["type"]) if isinstance(err.get("type"), str) else None,
                str(code) if code is not None else None,
                str(err["param"]) if isinstance(err.get("param"), str) else None,
            )
    return None, None, None, None

"""Providers that do not speak OpenAI (Anthropic, Bedrock, Vertex, ...) as an httpx transport.

The gateway forwards every request as an OpenAI HTTP call through the backend's pooled
``httpx.AsyncClient`` (:mod:`adapters.upstream`). For a ``provider: litellm`` backend that
client's transport is a :class:`LiteLLMTransport`: it decodes the OpenAI body, calls LiteLLM
and answers with the JSON body or SSE stream an OpenAI server would have sent, so the hot
path relays it, reads its ``usage`` and maps its errors exactly as for any engine.

    POST …/v1/chat/completions -> litellm.acompletion
    POST …/v1/completions      -> litellm.atext_completion
    POST …/v1/embeddings       -> litellm.aembedding

Failures, in the shapes :mod:`adapters.upstream` already maps:

    connect failure               -> raises httpx.ConnectError (gateway: next backend, else 502)
      (litellm.APIConnectionError, or any error caused by an httpx connect error/timeout)
    litellm.Timeout               -> raises httpx.ReadTimeout  (gateway: 504)
    provider 4xx (401, 403, 404,
      400 incl. context window,
      429, ...)                   -> that status, OpenAI error body (relayed to the client)
    anything else                 -> 502, OpenAI error body
    after the stream started      -> one SSE ``error`` event, then the end of the stream
                                     (timeouts / dropped connections raise as above)

Only OpenAI request fields are passed on (vLLM extras such as ``priority`` or
``ignore_eos`` would make a provider reject the call); the backend's ``litellm_params``
(``api_key``, ``api_base``, ``aws_region_name``, ...) are added to every call and win over
the client's fields. ``drop_params`` defaults to true: an OpenAI field the provider cannot
take is dropped, not an error.

LiteLLM is imported on first use, in a worker thread (:func:`aload_litellm`; it takes
seconds), never when this module is imported: a gateway without such a backend never loads
it. It is an extra (``pip install 'driftsched[litellm]'``), not part of the core install;
without it the backend's health check fails with :class:`LiteLLMMissing`'s message (shown
by ``GET /admin/backends``) and a request routed there fails as a connect error. Two process-wide settings come with that import: ``LITELLM_LOCAL_MODEL_COST_MAP``
defaults to ``True`` (else the import fetches LiteLLM's model map from the network, and
waits for retries where there is none), and ``litellm.suppress_debug_info`` is set (else
LiteLLM prints help banners to stdout on every error, into the gateway's JSON logs).

A transport holds no per-request state and is safe to share between concurrent requests.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

import httpx

from adapters.base import Backend
from adapters.sse import error_event

log = logging.getLogger("driftsched.litellm")

#: endpoint (path suffix) -> the OpenAI request fields passed on to LiteLLM
_CHAT_FIELDS = frozenset(
    {
        "messages",
        "temperature",
        "top_p",
        "n",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "user",
        "stream_options",
        "reasoning_effort",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
    }
)
_COMPLETION_FIELDS = frozenset(
    {
        "prompt",
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "suffix",
        "temperature",
        "top_p",
        "user",
        "stream_options",
    }
)
_EMBEDDING_FIELDS = frozenset({"input", "dimensions", "encoding_format", "user"})
_ENDPOINTS: dict[str, tuple[str, frozenset[str]]] = {
    "/v1/chat/completions": ("acompletion", _CHAT_FIELDS),
    "/v1/completions": ("atext_completion", _COMPLETION_FIELDS),
    "/v1/embeddings": ("aembedding", _EMBEDDING_FIELDS),
}
_JSON = {"content-type": "application/json"}
_SSE = {"content-type": "text/event-stream; charset=utf-8"}
_DONE = b"data: [DONE]\n\n"


INSTALL_HINT = "pip install 'driftsched[litellm]'"


class LiteLLMMissing(ImportError):
    """LiteLLM (or a package it imports) is not installed; the message says what to install."""


def load_litellm() -> ModuleType:
    """Import LiteLLM (blocking, seconds); idempotent. Raises :class:`LiteLLMMissing`."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        llm = importlib.import_module("litellm")
    except ImportError as e:
        if e.name == "litellm":
            why = "LiteLLM is not installed (the core install leaves it out)"
        else:
            why = f"LiteLLM cannot be imported ({e})"
        raise LiteLLMMissing(
            f"provider: litellm backends need LiteLLM: {why}; install the extra: {INSTALL_HINT}"
        ) from e
    setattr(llm, "suppress_debug_info", True)  # noqa: B010 (else it prints banners to stdout)
    return llm


async def aload_litellm() -> ModuleType:
    """:func:`load_litellm` without blocking the event loop (imported in a worker thread)."""
    mod = sys.modules.get("litellm")
    if mod is not None and not getattr(getattr(mod, "__spec__", None), "_initializing", False):
        return mod
    return await asyncio.to_thread(load_litellm)


async def litellm_ready() -> tuple[bool, str | None]:
    """The health check of a LiteLLM backend: ``(passed, error)``.

    Passes once LiteLLM imports; the provider itself is not called (that would cost money
    or rate-limit budget every few seconds). A provider that fails shows as errors on the
    requests sent to it.
    """
    try:
        await aload_litellm()
    except ImportError as e:
        return False, str(e)
    return True, None


class LiteLLMTransport(httpx.AsyncBaseTransport):
    """Answers OpenAI HTTP requests by calling LiteLLM for one provider model."""

    def __init__(
        self,
        model: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 600.0,
        name: str = "litellm",
    ) -> None:
        #: the LiteLLM model, e.g. ``anthropic/claude-haiku-4-5``
        self.model = model
        self.params: dict[str, Any] = {"drop_params": True, "timeout": timeout_s, **(params or {})}
        self.name = name

    @classmethod
    def for_backend(cls, backend: Backend) -> LiteLLMTransport:
        """The transport of a ``kind == "litellm"`` backend (``api_key`` is a fallback for
        ``litellm_params.api_key``)."""
        if backend.litellm_model is None:
            raise ValueError(f"backend {backend.name!r} has no litellm_model")
        params = dict(backend.litellm_params)
        if backend.api_key and "api_key" not in params:
            params["api_key"] = backend.api_key
        return cls(
            backend.litellm_model, params, timeout_s=backend.read_timeout_s, name=backend.name
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        route = next((r for suffix, r in _ENDPOINTS.items() if path.endswith(suffix)), None)
        if route is None or request.method != "POST":
            return _error(
                404,
                f"{request.method} {path} is not served by LiteLLM backends",
                "invalid_request_error",
                code="unknown_url",
            )
        fn_name, fields = route
        try:
            body = json.loads(await request.aread())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        stream = body.get("stream") is True
        kwargs = {k: v for k, v in body.items() if k in fields}
        kwargs.update(self.params)
        kwargs["model"] = self.model
        if fn_name != "aembedding":
            kwargs["stream"] = stream
        try:
            llm = await aload_litellm()
        except ImportError as e:  # as a connect failure: next backend, else 502
            raise httpx.ConnectError(f"litellm backend {self.name!r}: {e}", request=request) from e
        try:
            result = await getattr(llm, fn_name)(**kwargs)
        except Exception as e:
            return self._failed(llm, e, request)
        if stream:
            return httpx.Response(200, headers=_SSE, stream=_SSEStream(self, llm, result, request))
        return httpx.Response(200, headers=_JSON, content=_dump(result))

    def _failed(self, llm: ModuleType, exc: Exception, request: httpx.Request) -> httpx.Response:
        """A LiteLLM exception before any byte was sent: raise or answer (module doc)."""
        where = f"litellm backend {self.name!r} ({self.model})"
        message = _message(exc)
        # LiteLLM reports some connect failures as 500s or timeouts: look at the cause
        connect = _connect_failed(exc)
        if connect or isinstance(exc, llm.APIConnectionError):
            if not connect:  # LiteLLM also wraps its own failures in APIConnectionError
                log.warning("%s: %s", where, message)
            raise httpx.ConnectError(f"{where} could not connect: {message}", request=request)
        if isinstance(exc, llm.Timeout):
            raise httpx.ReadTimeout(f"{where} timed out: {message}", request=request)
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500:
            code: str | None = None
            param: str | None = None
            err_type = "invalid_request_error"
            if isinstance(exc, llm.ContextWindowExceededError):
                code, param = "context_length_exceeded", "messages"
            elif status == 401:
                code = "invalid_api_key"
            elif status == 429:
                err_type, code = "requests", "rate_limit_exceeded"
            return _error(status, message, err_type, code=code, param=param)
        if status is None:  # not a provider answer: a LiteLLM bug or bad litellm_params
            log.error("%s failed: %s", where, type(exc).__name__, exc_info=exc)
        return _error(502, f"{where} failed: {message}", "server_error", code="upstream_error")


class _SSEStream(httpx.AsyncByteStream):
    """LiteLLM's stream of chunk objects as OpenAI SSE bytes, ending with ``[DONE]``."""

    def __init__(
        self, owner: LiteLLMTransport, llm: ModuleType, chunks: Any, request: httpx.Request
    ) -> None:
        self._owner = owner
        self._llm = llm
        self._chunks = chunks
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield b"data: " + _dump(chunk) + b"\n\n"
        except Exception as e:
            try:
                resp = self._owner._failed(self._llm, e, self._request)
            except httpx.ConnectError as ce:  # the stream was already flowing: it broke
                raise httpx.ReadError(str(ce), request=self._request) from e
            yield error_event(json.loads(resp.content))
            return
        yield _DONE

    async def aclose(self) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()


def _connect_failed(exc: BaseException) -> bool:
    """Whether the cause of ``exc`` is an httpx connect failure (LiteLLM's aiohttp transport
    raises the httpx exceptions too)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, httpx.ConnectError | httpx.ConnectTimeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _message(exc: BaseException) -> str:
    """The provider's own error message where LiteLLM's embeds one, else LiteLLM's.

    LiteLLM's messages look like ``litellm.RateLimitError: AnthropicException - {"type":
    "error", "error": {"type": "rate_limit_error", "message": "..."}}`` (the JSON sometimes
    as a ``b'...'`` literal); the result is ``anthropic: ...``.
    """
    text = str(getattr(exc, "message", "") or exc)
    provider = getattr(exc, "llm_provider", None) or "provider"
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(text[start : end + 1])
        except ValueError:
            obj = None
        err = obj.get("error", obj) if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return f"{provider}: {err['message']}"
    cut = text.find(" Handle with `litellm.")
    return text[:cut] if cut > 0 else text


def _dump(obj: Any) -> bytes:
    """A LiteLLM response object (pydantic) as compact OpenAI JSON."""
    data: str = obj.model_dump_json(warnings=False)
    return data.encode()


def _error(
    status: int, message: str, err_type: str, *, code: str | None = None, param: str | None = None
) -> httpx.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return httpx.Response(status, headers=_JSON, content=json.dumps(body).encode())

"""LiteLLM backends (``provider: litellm``) through the whole gateway.

A real uvicorn gateway (:class:`GatewayThread`) and the official ``openai`` client; ``respx``
mocks the *provider's* HTTP API (Anthropic's ``/v1/messages``, JSON and SSE in Anthropic's
event format; Voyage's ``/v1/embeddings``), so LiteLLM's own request and response
translation runs for real. Loopback traffic (client -> gateway) passes through respx.

LiteLLM sends through aiohttp by default, which respx cannot see; ``DISABLE_AIOHTTP_TRANSPORT``
makes it use httpx for these tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx

from adapters.errors import ConfigError
from proxy.config import settings_from_dict
from tests.harness import GatewayThread, make_settings

pytestmark = [
    pytest.mark.e2e,
    # LiteLLM's response types make pydantic warn once when it first builds their schema
    pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning"),
]

KEY = "dsk-litellm0-" + "l" * 40
PROVIDER_KEY = "sk-ant-test-0123456789"
MODEL = "anthropic/claude-haiku-4-5"
HELLO = [{"role": "user", "content": "hello"}]


# -- the provider: Anthropic's Messages API, answering by the prompt's text --------------
def _anthropic_error(status: int, err_type: str, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"type": "error", "error": {"type": err_type, "message": message}}
    )


ERRORS = {
    "E401": (401, "authentication_error", "invalid x-api-key"),
    "E403": (403, "permission_error", "key may not use this model"),
    "E429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
    "E400": (400, "invalid_request_error", "messages: roles must alternate"),
    "ECTX": (400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
    "E500": (500, "api_error", "Internal server error"),
    "E529": (529, "overloaded_error", "Overloaded"),
}


def _events(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()


def _message_start(input_tokens: int) -> tuple[str, dict[str, Any]]:
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_s",
                "type": "message",
                "role": "assistant",
                "model": "claude-haiku-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        },
    )


def _delta(text: str) -> tuple[str, dict[str, Any]]:
    return (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
    )


STREAM = _events(
    _message_start(13),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    _delta("Hel"),
    _delta("lo"),
    _delta(" world"),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)
BROKEN_STREAM = _events(
    _message_start(13),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    _delta("Hel"),
    ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
)
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "Hello there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 11, "output_tokens": 7},
}


class Provider:
    """The mocked provider; keeps every request body it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[httpx.Headers, dict[str, Any]]] = []
        self.down_calls = 0

    def anthropic(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.headers, body))
        text = json.dumps(body["messages"][-1]["content"])
        for marker, (status, err_type, message) in ERRORS.items():
            if marker in text:
                return _anthropic_error(status, err_type, message)
        if "ECONN" in text:
            raise httpx.ConnectError("connection refused", request=request)
        if "ETIME" in text:
            raise httpx.ReadTimeout("read timed out", request=request)
        if body.get("stream"):
            content = BROKEN_STREAM if "EMID" in text else STREAM
            return httpx.Response(
                200, content=content, headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, json=MESSAGE)

    def down(self, request: httpx.Request) -> httpx.Response:
        self.down_calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    def voyage(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.headers, body))
        return httpx.Response(
            200,
            json={
                "object": "list",
                "model": "voyage-3",
                "data": [{"object": "embedding", "embedding": [0.25, -0.5, 1.0], "index": 0}],
                "usage": {"total_tokens": 4},
            },
        )


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    p = Provider()
    with pytest.MonkeyPatch.context() as mp, respx.mock(assert_all_called=False) as router:
        mp.setenv("DISABLE_AIOHTTP_TRANSPORT", "True")
        router.route(host="127.0.0.1").pass_through()
        router.post("https://api.anthropic.com/v1/messages").mock(side_effect=p.anthropic)
        router.post("https://api.voyageai.com/v1/embeddings").mock(side_effect=p.voyage)
        router.route(host="anthropic-down.example").mock(side_effect=p.down)
        yield p


@pytest.fixture(scope="module")
def gw(provider: Provider) -> Iterator[GatewayThread]:
    settings = make_settings(
        upstreams=[
            {
                "name": "claude",
                "provider": "litellm",
                "models": ["claude"],
                "litellm_model": MODEL,
                "litellm_params": {"api_key": PROVIDER_KEY},
            },
            {  # listed first, so picked first for "claude-ha"; it cannot connect
                "name": "claude-down",
                "provider": "litellm",
                "models": ["claude-ha"],
                "litellm_model": MODEL,
                "litellm_params": {
                    "api_key": PROVIDER_KEY,
                    "api_base": "https://anthropic-down.example",
                },
            },
            {
                "name": "claude-up",
                "provider": "litellm",
                "models": ["claude-ha"],
                "litellm_model": MODEL,
                "litellm_params": {"api_key": PROVIDER_KEY},
            },
            {
                "name": "voyage",
                "provider": "litellm",
                "models": ["voyage"],
                "litellm_model": "voyage/voyage-3",
                "api_key": "vk-test",
            },
        ],
        tenants=[{"name": "a", "api_keys": [KEY], "rpm": 100_000}],
    )
    g = GatewayThread(settings)
    yield g
    g.stop()


def client(gw: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)


def tokens(gw: GatewayThread) -> tuple[int, int]:
    u = gw.admin("GET", "/admin/tenants/a/usage").json()
    return int(u["tokens_in"]), int(u["tokens_out"])


# -- success paths ---------------------------------------------------------------------------
def test_chat_non_streaming_translates_and_reports_usage(
    gw: GatewayThread, provider: Provider
) -> None:
    before = tokens(gw)
    r = client(gw).chat.completions.create(
        model="claude",
        messages=HELLO,
        max_tokens=20,
        temperature=0.5,
        extra_body={"priority": -1, "ignore_eos": True},  # vLLM extras: not for Anthropic
    )
    assert r.choices[0].message.content == "Hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (11, 7)
    headers, sent = provider.requests[-1]
    assert headers["x-api-key"] == PROVIDER_KEY
    assert sent["model"] == "claude-haiku-4-5"
    assert sent["max_tokens"] == 20 and sent["temperature"] == 0.5
    content = sent["messages"][0]["content"]  # Anthropic takes a string or text blocks
    assert content == "hello" or content == [{"type": "text", "text": "hello"}]
    assert "priority" not in sent and "ignore_eos" not in sent
    after = tokens(gw)
    assert (after[0] - before[0], after[1] - before[1]) == (11, 7)


def test_chat_streaming_with_include_usage(gw: GatewayThread, provider: Provider) -> None:
    before = tokens(gw)
    stream = client(gw).chat.completions.create(
        model="claude", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (13, 5)
    assert provider.requests[-1][1]["stream"] is True
    after = tokens(gw)
    assert (after[0] - before[0], after[1] - before[1]) == (13, 5)


def test_chat_streaming_without_include_usage_still_accounts(gw: GatewayThread) -> None:
    before = tokens(gw)
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        timeout=30,
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "claude", "messages": HELLO, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all('"usage":{' not in e for e in events)  # the injected usage chunk is hidden
    after = tokens(gw)
    assert (after[0] - before[0], after[1] - before[1]) == (13, 5)


def test_text_completions(gw: GatewayThread) -> None:
    c = client(gw)
    r = c.completions.create(model="claude", prompt="Say hello", max_tokens=10)
    assert r.choices[0].text == "Hello there"
    assert r.usage is not None and r.usage.completion_tokens == 7
    chunks = list(
        c.completions.create(
            model="claude", prompt="Say hello", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(ch.choices[0].text or "" for ch in chunks if ch.choices) == "Hello world"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 13


def test_embeddings(gw: GatewayThread, provider: Provider) -> None:
    r = client(gw).embeddings.create(model="voyage", input="hello")
    assert r.data[0].embedding == [0.25, -0.5, 1.0]
    assert r.usage.prompt_tokens == 4
    headers, sent = provider.requests[-1]
    assert headers["authorization"] == "Bearer vk-test"  # backend api_key -> provider key
    assert sent["model"] == "voyage-3"


def test_admin_shows_litellm_backends_healthy_without_secrets(gw: GatewayThread) -> None:
    r = gw.admin("GET", "/admin/backends")
    by_name = {b["name"]: b for b in r.json()}
    assert by_name["claude"]["kind"] == "litellm"
    assert by_name["claude"]["state"] == "healthy"
    assert by_name["claude"]["url"] == "litellm://claude"
    assert PROVIDER_KEY not in r.text


def test_backend_added_at_runtime(gw: GatewayThread) -> None:
    r = gw.admin(
        "POST",
        "/admin/backends",
        json={
            "name": "claude-rt",
            "provider": "litellm",
            "models": ["claude-rt"],
            "litellm_model": MODEL,
            "litellm_params": {"api_key": PROVIDER_KEY},
        },
    )
    assert r.status_code == 201, r.text
    out = client(gw).chat.completions.create(model="claude-rt", messages=HELLO)
    assert out.choices[0].message.content == "Hello there"


def test_connect_failure_is_retried_on_another_backend(
    gw: GatewayThread, provider: Provider
) -> None:
    calls = provider.down_calls
    r = client(gw).chat.completions.create(model="claude-ha", messages=HELLO)
    assert r.choices[0].message.content == "Hello there"
    assert provider.down_calls > calls  # tried, failed to connect, went to claude-up


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("marker", "status", "exc", "code"),
    [
        # the provider refusing the gateway (its key, its own rate limit) is not the
        # tenant's auth or rate-limit error: 502 (issue 14)
        ("E401", 502, openai.InternalServerError, "upstream_error"),
        ("E403", 502, openai.InternalServerError, "upstream_error"),
        ("E429", 502, openai.InternalServerError, "upstream_error"),
        ("E400", 400, openai.BadRequestError, None),
        ("ECTX", 400, openai.BadRequestError, "context_length_exceeded"),
        ("E500", 502, openai.InternalServerError, "upstream_error"),
        ("E529", 502, openai.InternalServerError, "upstream_error"),
        ("ETIME", 504, openai.InternalServerError, "upstream_timeout"),
        ("ECONN", 502, openai.InternalServerError, "upstream_connect_error"),
    ],
)
def test_provider_errors_become_openai_errors(
    gw: GatewayThread,
    marker: str,
    status: int,
    exc: type[openai.APIStatusError],
    code: str | None,
    stream: bool,
) -> None:
    with pytest.raises(exc) as ei:
        out = client(gw).chat.completions.create(
            model="claude", messages=[{"role": "user", "content": marker}], stream=stream
        )
        if stream:
            list(out)  # type: ignore[arg-type]
    e = ei.value
    assert e.status_code == status
    assert isinstance(e.body, dict) and isinstance(e.body.get("message"), str)
    assert e.code == code
    if marker in ERRORS and status != 502:
        assert ERRORS[marker][2] in e.body["message"]  # the provider's own words
    assert PROVIDER_KEY not in json.dumps(e.body)


def test_error_mid_stream_becomes_error_event(gw: GatewayThread) -> None:
    stream = client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "EMID"}], stream=True
    )
    got: list[str] = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        for c in stream:
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "Hel"


# -- configuration and start-up --------------------------------------------------------------
def test_config_rules() -> None:
    s = settings_from_dict(
        {
            "upstreams": [
                {"name": "c", "provider": "litellm", "models": ["m"], "litellm_model": MODEL}
            ]
        }
    )
    assert s.upstreams[0].url == "litellm://c"
    assert "litellm_params" not in repr(s.upstreams[0])  # may hold keys
    bad = [
        ({"name": "c", "provider": "litellm", "models": ["m"]}, "litellm_model: required"),
        (
            {"name": "c", "url": "http://x", "models": ["m"], "litellm_model": MODEL},
            "only for provider litellm",
        ),
        ({"name": "c", "models": ["m"]}, "upstreams[0].url"),
        ({"name": "c", "url": "litellm://c", "models": ["m"]}, "must start with http"),
        (
            {"name": "c", "provider": "bedrock", "url": "http://x", "models": ["m"]},
            "upstreams[0].provider",
        ),
    ]
    for entry, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            settings_from_dict({"upstreams": [entry]})


def test_openai_only_gateway_does_not_import_litellm() -> None:
    """Start (lifespan) and open a client for every backend: LiteLLM never loads."""
    script = textwrap.dedent("""
        import asyncio, json, sys
        from proxy.app import create_app
        from tests.harness import make_settings

        async def main():
            settings = make_settings(
                upstreams=[{"name": "up", "url": "http://127.0.0.1:9", "models": ["m"]}],
                pool={"engine": "external", "instances": 0, "external": [
                    {"name": "ext", "url": "http://127.0.0.1:9", "models": ["m2"]}]})
            app = create_app(settings)
            async with app.api.router.lifespan_context(app.api):
                gw = app.gateway
                assert gw is not None
                for b in gw.pool.backends():
                    gw.clients.client(b)
                await asyncio.sleep(0.1)
            print(json.dumps(sorted(m for m in sys.modules if "litellm" in m)))

        asyncio.run(main())
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == ["adapters.litellm_transport"]  # our module, never litellm itself

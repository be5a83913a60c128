"""The gateway through the official OpenAI SDK, against a real engine process over loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness import GatewayThread, Proc, make_settings, start_stub

pytestmark = pytest.mark.e2e

KEY_A = "dsk-tenanta0-" + "a" * 40
KEY_B = "dsk-tenantb0-" + "b" * 40
KEY_RL = "dsk-ratelim0-" + "c" * 40
KEY_Q = "dsk-quota000-" + "d" * 40
KEY_C = "dsk-concur00-" + "e" * 40


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_stub(tmp_path_factory.mktemp("stub"), chunks=16)
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def gw(stub: str) -> Iterator[GatewayThread]:
    settings = make_settings(
        upstreams=[{"name": "stub0", "url": stub, "models": ["stub", "other-model"],
                    "read_timeout_s": 2.0}],
        tenants=[
            {"name": "a", "qos_class": "premium", "api_keys": [KEY_A], "rpm": 10_000, "tpm": 10_000_000},
            {"name": "b", "allowed_models": ["other-model"], "api_keys": [KEY_B]},
            {"name": "rl", "rpm": 2, "api_keys": [KEY_RL]},
            {"name": "q", "daily_token_quota": 200, "api_keys": [KEY_Q]},
            {"name": "c", "max_concurrency": 1, "queue_timeout_s": 0.5, "api_keys": [KEY_C]},
        ],
        server={"max_body_bytes": 64 * 1024},
    )
    g = GatewayThread(settings)
    yield g
    g.stop()


def client(gw: GatewayThread, key: str = KEY_A, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, **kw)  # type: ignore[arg-type]


MSG = [{"role": "user", "content": "hello there"}]


def test_chat_non_streaming_usage_and_headers(gw: GatewayThread) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(model="stub", messages=MSG, max_tokens=5)
    r = raw.parse()
    assert r.choices[0].message.content == " tok" * 5
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert raw.headers["x-request-id"]
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 10000
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000000"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")


def test_request_id_is_echoed(gw: GatewayThread) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", headers={
        "authorization": f"Bearer {KEY_A}", "x-request-id": "my-trace-123"},
        json={"model": "stub", "messages": MSG})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-trace-123"


def test_streaming_relays_chunks_and_done_without_injected_usage(gw: GatewayThread) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {KEY_A}"},
                      json={"model": "stub", "messages": MSG, "stream": True, "max_tokens": 8}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    # the gateway asked the engine for usage but this client did not: no usage chunk
    assert all(p["choices"] for p in payloads)
    assert sum(1 for p in payloads if p["choices"][0]["delta"].get("content") == " tok") == 8


def test_streaming_with_include_usage_via_sdk(gw: GatewayThread) -> None:
    chunks = list(client(gw).chat.completions.create(
        model="stub", messages=MSG, stream=True, max_tokens=6,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].choices == []


def test_unknown_fields_pass_through_untouched(gw: GatewayThread) -> None:
    r = client(gw).chat.completions.create(
        model="stub", messages=MSG, max_tokens=3,
        extra_body={"top_k": 7, "min_tokens": 2, "ignore_eos": True, "stub_echo": True,
                    "chat_template_kwargs": {"x": [1, 2]}})
    echo = r.model_extra["echo"]  # type: ignore[index]
    assert echo["top_k"] == 7 and echo["min_tokens"] == 2 and echo["ignore_eos"] is True
    assert echo["chat_template_kwargs"] == {"x": [1, 2]}
    assert "stream_options" not in echo  # non-streaming bodies are forwarded as sent


def test_completions_and_embeddings(gw: GatewayThread) -> None:
    c = client(gw)
    r = c.completions.create(model="stub", prompt="once upon", max_tokens=4)
    assert r.choices[0].text == " tok" * 4 and r.usage and r.usage.completion_tokens == 4
    e = c.embeddings.create(model="stub", input=["a", "b"])
    assert len(e.data) == 2 and e.usage.prompt_tokens > 0
    streamed = list(c.completions.create(model="stub", prompt="x", max_tokens=3, stream=True))
    assert len(streamed) >= 3


def test_models_lists_only_allowed(gw: GatewayThread) -> None:
    assert sorted(m.id for m in client(gw).models.list()) == ["other-model", "stub"]
    assert [m.id for m in client(gw, KEY_B).models.list()] == ["other-model"]
    with pytest.raises(openai.NotFoundError):
        client(gw, KEY_B).models.retrieve("stub")


def test_auth_errors(gw: GatewayThread) -> None:
    with pytest.raises(openai.AuthenticationError) as ei:
        client(gw, "dsk-nope0000-xxxxxxxx").chat.completions.create(model="stub", messages=MSG)
    assert ei.value.code == "invalid_api_key"
    assert "xxxxxxxx" not in str(ei.value)  # only the prefix is echoed
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "stub", "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_model_errors(gw: GatewayThread) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        client(gw).chat.completions.create(model="no-such-model", messages=MSG)
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, KEY_B).chat.completions.create(model="stub", messages=MSG)


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1,2]", None),
    (b'{"messages": []}', "model"),
    (b'{"model": "stub"}', "messages"),
    (b'{"model": "stub", "messages": "hi"}', "messages"),
    (b'{"model": "stub", "messages": [{"content": "x"}]}', "messages[0]"),
    (b'{"model": "stub", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
    (b'{"model": "stub", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b"", None),
    (b"\xff\xfe", None),
])
def test_bad_bodies_get_400_in_openai_shape(gw: GatewayThread, body: bytes, param: str | None) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", content=body,
                   headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_body_too_large_is_413(gw: GatewayThread) -> None:
    big = {"model": "stub", "messages": [{"role": "user", "content": "x" * 100_000}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=big,
                   headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # chunked upload without content-length is cut off too
    def gen() -> Iterator[bytes]:
        yield b'{"model": "stub", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}]}'
    r = httpx.post(gw.url + "/v1/chat/completions", content=gen(),
                   headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 413


def test_unknown_url_and_method(gw: GatewayThread) -> None:
    r = httpx.post(gw.url + "/v1/nope", headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_rpm_429_with_real_retry_after_and_sdk_retry(gw: GatewayThread) -> None:
    c = client(gw, KEY_RL, max_retries=0)
    c.chat.completions.create(model="stub", messages=MSG, max_tokens=1)
    c.chat.completions.create(model="stub", messages=MSG, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="stub", messages=MSG, max_tokens=1)
    resp = ei.value.response
    assert ei.value.code == "rate_limit_exceeded"
    # 2 rpm: one request refills every 30 s
    wait_ms = int(resp.headers["retry-after-ms"])
    assert 25_000 < wait_ms <= 30_000
    assert int(resp.headers["retry-after"]) == -(-wait_ms // 1000)
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert resp.json()["error"]["type"] == "requests"


def test_quota_exhausted_is_insufficient_quota_and_not_retried(gw: GatewayThread) -> None:
    c = client(gw, KEY_Q, max_retries=3)
    c.chat.completions.create(model="stub", messages=MSG, max_tokens=100)
    c.chat.completions.create(model="stub", messages=MSG, max_tokens=16)
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="stub", messages=MSG, max_tokens=150)
    assert time.monotonic() - t0 < 1.0  # x-should-retry: false -> the SDK did not retry
    assert ei.value.code == "insufficient_quota"
    assert ei.value.response.headers["x-should-retry"] == "false"
    assert int(ei.value.response.headers["retry-after"]) > 0


def test_concurrency_cap_queues_then_times_out_with_503(gw: GatewayThread) -> None:
    import threading

    c = client(gw, KEY_C, max_retries=0)
    holder = threading.Thread(target=lambda: c.chat.completions.create(
        model="stub", messages=MSG, max_tokens=2, extra_body={"stub_delay_ms": 1500}))
    holder.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as ei:
        c.chat.completions.create(model="stub", messages=MSG, max_tokens=2)
    waited = time.monotonic() - t0
    assert ei.value.status_code == 503 and ei.value.code == "queue_timeout"
    assert 0.4 < waited < 1.5
    assert ei.value.response.headers["retry-after"]
    holder.join()
    # the slot is free again: a queued request is admitted when the holder finishes
    holder = threading.Thread(target=lambda: c.chat.completions.create(
        model="stub", messages=MSG, max_tokens=2, extra_body={"stub_delay_ms": 200}))
    holder.start()
    time.sleep(0.05)
    r = c.chat.completions.create(model="stub", messages=MSG, max_tokens=2)
    assert r.usage is not None
    holder.join()


@pytest.mark.parametrize(("fault", "status", "code"), [
    ("500", 502, "upstream_error"),
    ("hang", 504, "upstream_timeout"),
    ("garbage", 502, "upstream_error"),
])
def test_upstream_failures_map_to_5xx(gw: GatewayThread, fault: str, status: int, code: str) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                   headers={"authorization": f"Bearer {KEY_A}"},
                   json={"model": "stub", "messages": MSG, "stub_fault": fault})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_upstream_4xx_is_relayed_as_client_error(gw: GatewayThread) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(gw, max_retries=0).chat.completions.create(
            model="stub", messages=MSG, extra_body={"stub_fault": "400"})
    assert "stub fault 400" in str(ei.value)


@pytest.mark.parametrize("fault", ["break", "truncate"])
def test_broken_stream_ends_with_error_event(gw: GatewayThread, fault: str) -> None:
    with pytest.raises(openai.APIError) as ei:
        list(client(gw, max_retries=0).chat.completions.create(
            model="stub", messages=MSG, stream=True, max_tokens=10,
            extra_body={"stub_fault": fault}))
    assert "upstream" in str(ei.value).lower() or "stream" in str(ei.value).lower()


def test_metrics_health_and_usage(gw: GatewayThread) -> None:
    client(gw).chat.completions.create(model="stub", messages=MSG, max_tokens=3)
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["backends"] == {"stub0": "healthy"}
    text = httpx.get(gw.url + "/metrics").text
    assert 'driftsched_requests_total{endpoint="chat",status="200",tenant="a"}' in text
    assert 'driftsched_completion_tokens_total{tenant="a"}' in text
    assert "driftsched_time_to_first_token_seconds_bucket" in text
    assert "driftsched_queue_wait_seconds_bucket" in text
    assert 'driftsched_backend_up{backend="stub0",state="healthy"} 1.0' in text
    u = gw.admin("GET", "/admin/tenants/a/usage").json()
    assert u["requests"] > 0 and u["tokens_out"] > 0 and u["in_flight"] == 0


def test_no_input_produces_a_bare_500(gw: GatewayThread, tmp_path: Path) -> None:
    weird = [
        {"model": "stub", "messages": [{"role": "user", "content": None}]},
        {"model": "stub", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"model": 5, "messages": MSG},
        {"model": "stub", "messages": MSG, "stream_options": "x", "stream": True},
        {"model": "stub", "messages": MSG, "priority": "high"},
        {"model": "stub", "messages": MSG, "max_tokens": True},
    ]
    for body in weird:
        r = httpx.post(gw.url + "/v1/chat/completions", json=body,
                       headers={"authorization": f"Bearer {KEY_A}"})
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["error"]["type"] == "invalid_request_error"


def test_no_backend_up_is_503(tmp_path: Path) -> None:
    proc, url = start_stub(tmp_path)
    settings = make_settings(
        upstreams=[{"name": "s", "url": url, "models": ["stub"], "connect_timeout_s": 0.5}],
        tenants=[{"name": "a", "api_keys": [KEY_A]}])
    g = GatewayThread(settings)
    try:
        proc.stop()
        with pytest.raises(openai.APIStatusError) as ei:
            client(g, max_retries=0).chat.completions.create(model="stub", messages=MSG)
        assert ei.value.status_code in (502, 503)
        assert ei.value.body is not None
    finally:
        g.stop()


def test_connect_failure_is_retried_on_another_backend(tmp_path: Path) -> None:
    proc, url = start_stub(tmp_path)
    dead = f"http://127.0.0.1:{_unused_port()}"
    settings = make_settings(
        upstreams=[{"name": "dead", "url": dead, "models": ["stub"], "connect_timeout_s": 0.5},
                   {"name": "live", "url": url, "models": ["stub"]}],
        tenants=[{"name": "a", "api_keys": [KEY_A]}])
    g = GatewayThread(settings)
    try:
        # force the dead backend to look healthy so the router tries it first
        for b in g.app.gateway.pool.backends():  # type: ignore[union-attr]
            b.state = "healthy"
        for _ in range(4):
            r = client(g, max_retries=0).chat.completions.create(model="stub", messages=MSG, max_tokens=2)
            assert r.usage is not None
    finally:
        g.stop()
        proc.stop()


def test_an_engine_that_hangs_up_without_answering_is_failed_over(tmp_path: Path) -> None:
    """An engine that accepts the connection and closes it without a byte (a dead engine's
    pooled connection, a crashing process): nothing reached the client, so the request goes
    to another engine instead of a 502."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    hung_up = 0
    models = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def hang_up() -> None:  # healthy to probes, hangs up on completions
        nonlocal hung_up
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            head = conn.recv(65536)
            if head.startswith(b"POST /v1/chat/completions"):
                hung_up += 1
            else:
                body = (models if b"/v1/models" in head.split(b"\r\n")[0] else "{}").encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    proc, url = start_stub(tmp_path)
    rude = f"http://127.0.0.1:{srv.getsockname()[1]}"
    settings = make_settings(
        upstreams=[{"name": "hangup", "url": rude, "models": ["stub"]},
                   {"name": "live", "url": url, "models": ["stub"]}],
        tenants=[{"name": "a", "api_keys": [KEY_A]}])
    g = GatewayThread(settings)
    try:
        for _ in range(6):
            r = client(g, max_retries=0).chat.completions.create(model="stub", messages=MSG,
                                                                 max_tokens=2)
            assert r.usage is not None
        assert hung_up >= 1  # requests were sent to the rude engine first
    finally:
        g.stop()
        proc.stop()
        srv.close()


def _unused_port() -> int:
    from tests.conftest import free_port

    return free_port()


_ = Proc

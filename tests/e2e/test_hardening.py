"""Issue 14's defects, through a real gateway process (``driftsched serve``) on a real Redis,
in front of the stub engine and a fault engine (``tests/e2e/fault_engine.py``). Each test
failed on the old code (6582049 and the main before this change) and passes now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.harness import ADMIN_KEY, GatewayThread, Proc, make_settings, start_gateways, start_stub

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-hardena0-" + "a" * 40
KEY_ONE = "dsk-hardone0-" + "b" * 40
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "hello"}]


def start_fault_engine(tmp: Path) -> tuple[Proc, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return Proc([sys.executable, "-m", "tests.e2e.fault_engine", "--port", str(port)],
                url + "/health", tmp / "fault.log"), url


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("hardening")
    stub, stub_url = start_stub(tmp, chunks=4)
    fault, fault_url = start_fault_engine(tmp)
    cfg = {
        "server": {"access_log": True, "auth_cache_ttl_s": 0},
        "admin": {"api_key": ADMIN_KEY},
        "store": {"type": "redis", "url": redis_server, "prefix": f"dshard{time.time_ns()}"},
        "upstreams": [{"name": "stub0", "url": stub_url, "models": ["stub"]},
                      {"name": "fault0", "url": fault_url, "models": ["fault"]}],
        "tenants": [{"name": "a", "api_keys": [KEY]},
                    {"name": "one", "max_concurrency": 1, "queue_timeout_s": 1.0,
                     "api_keys": [KEY_ONE]}],
    }
    # a DRIFTSCHED_* variable that is not a gateway setting (the experiments' own) must not
    # stop the gateway (the old code: "environment variable DRIFTSCHED_SHARED_DATA: unknown
    # setting")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTSCHED_SHARED_DATA", str(tmp))
        try:
            procs, urls = start_gateways(cfg, tmp, 1)
        except BaseException:
            stub.stop()
            fault.stop()
            raise
    try:
        yield {"url": urls[0], "log": procs[0].log}
    finally:
        procs[0].stop()
        stub.stop()
        fault.stop()


def chat(gw: dict[str, Any], body: bytes | dict[str, Any], key: str = KEY,
         **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw["url"] + "/v1/chat/completions", content=content, timeout=30,
                      headers={"authorization": f"Bearer {key}",
                               "content-type": "application/json"}, **kw)


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return dict(err)


def metric(gw: dict[str, Any], line_prefix: str) -> float:
    for line in httpx.get(gw["url"] + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def usage(gw: dict[str, Any], tenant: str) -> dict[str, Any]:
    r = httpx.get(gw["url"] + f"/admin/tenants/{tenant}/usage", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- 1. one error path ---------------------------------------------------------------------
def test_deep_json_is_400_without_a_traceback(gw: dict[str, Any]) -> None:
    """JSON nested 1,000+ deep: a 500 with a 16 KB RecursionError traceback in the log."""
    deep = b"[" * 5000 + b"]" * 5000
    nested = (b'{"model": "stub", "messages": [{"role": "user", "content": '
              + b"[" * 1200 + b"]" * 1200 + b"}]}")
    for body in (deep, nested):
        err = assert_openai_error(chat(gw, body), 400)
        assert err["type"] == "invalid_request_error"
    r = httpx.post(gw["url"] + "/admin/tenants", content=b'{"name": ' + deep + b"}",
                   headers={**ADMIN, "content-type": "application/json"}, timeout=10)
    assert_openai_error(r, 400)
    log = gw["log"].read_text()
    assert "RecursionError" not in log and "Traceback" not in log


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_is_400_counted(gw: dict[str, Any], stream: bool) -> None:
    """``"\\ud800"`` in a message: a 500 (plain-text when not streaming), neither logged nor
    counted."""
    before = metric(gw, 'driftsched_http_errors_total{status="400",surface="v1"}')
    body = (b'{"model": "stub", "stream": ' + json.dumps(stream).encode()
            + b', "messages": [{"role": "user", "content": "a \\ud800 b"}]}')
    err = assert_openai_error(chat(gw, body), 400)
    assert "surrogate" in err["message"]
    # surrogates encoded as bytes (CESU-8) and bodies in other encodings are 400 too
    assert_openai_error(chat(gw, b'{"model": "stub", "messages": [{"role": "user", '
                                 b'"content": "\xed\xa0\x80"}]}'), 400)
    assert_openai_error(chat(gw, b"\xff\xfe\x00\xd8"), 400)
    assert metric(gw, 'driftsched_http_errors_total{status="400",surface="v1"}') >= before + 3
    assert metric(gw, 'driftsched_requests_total{endpoint="chat",status="400",tenant="a"}') >= 3
    # a valid surrogate pair (an emoji) is fine
    ok = chat(gw, b'{"model": "stub", "messages": [{"role": "user", "content": '
                  b'"\\ud83d\\ude00"}], "max_tokens": 2}')
    assert ok.status_code == 200, ok.text


def test_non_ascii_admin_token_is_401(gw: dict[str, Any]) -> None:
    """A non-ASCII admin bearer token: 500 before authentication (hmac on str)."""
    for token in (b"Bearer \xe9t\xe9", b"Bearer " + ADMIN_KEY.encode() + b"\xff"):
        r = httpx.get(gw["url"] + "/admin/tenants", headers={"authorization": token}, timeout=10)
        assert assert_openai_error(r, 401)["code"] == "invalid_admin_key"


def test_unknown_urls_and_methods_are_counted(gw: dict[str, Any]) -> None:
    before = metric(gw, 'driftsched_http_errors_total{status="404",surface="v1"}')
    assert_openai_error(httpx.get(gw["url"] + "/v1/nope", timeout=10), 404)
    assert metric(gw, 'driftsched_http_errors_total{status="404",surface="v1"}') == before + 1
    assert metric(gw, 'driftsched_requests_total{endpoint="unknown",status="404",tenant="-"}') >= 1


# -- 2. bounds -----------------------------------------------------------------------------
def test_huge_max_tokens_is_400_and_keeps_the_day_count(gw: dict[str, Any]) -> None:
    """On the Redis store one request with ``max_completion_tokens: 10**30`` took the
    tenant's daily token count back to 0 (charged 1e30 in Lua doubles, refunded likewise)."""
    assert chat(gw, {"model": "stub", "messages": MSG, "max_tokens": 4}).status_code == 200
    today = usage(gw, "a")["tokens_today"]
    assert today > 0
    answers = {f: chat(gw, {"model": "stub", "messages": MSG, f: 10**30})
               for f in ("max_completion_tokens", "max_tokens")}
    assert usage(gw, "a")["tokens_today"] == today  # the old code: 0
    for field, r in answers.items():
        assert assert_openai_error(r, 400)["param"] == field


@pytest.mark.parametrize("extra", [{"n": 0}, {"n": 10**6}, {"n": "2"}, {"n": True},
                                   {"max_tokens": 2**31}, {"priority": 2**63}])
def test_out_of_range_fields_are_400(gw: dict[str, Any], extra: dict[str, Any]) -> None:
    err = assert_openai_error(chat(gw, {"model": "stub", "messages": MSG, **extra}), 400)
    assert err["param"] == next(iter(extra))


def test_admin_refuses_non_finite_and_out_of_range_numbers(gw: dict[str, Any]) -> None:
    """The admin API took ``Infinity`` (shown back as ``null``)."""
    url = gw["url"] + "/admin/tenants/a"
    h = {**ADMIN, "content-type": "application/json"}
    for raw in (b'{"weight": Infinity}', b'{"weight": NaN}', b'{"weight": 1e999}',
                b'{"ttft_slo_ms": 1e400}', b'{"rpm": 1' + b"0" * 30 + b"}",
                b'{"queue_timeout_s": -Infinity}'):
        assert_openai_error(httpx.patch(url, content=raw, headers=h, timeout=10), 400)
    r = httpx.post(gw["url"] + "/admin/tenants", content=b'{"name": "inf", "weight": 1e999}',
                   headers=h, timeout=10)
    assert_openai_error(r, 400)
    t = httpx.get(url, headers=ADMIN, timeout=10).json()
    assert t["weight"] == 1.0 and t["rpm"] is None


def test_admin_refuses_lone_surrogates(gw: dict[str, Any]) -> None:
    """A key name or model name with ``"\\ud800"`` reached Redis' encoder: a 500."""
    h = {**ADMIN, "content-type": "application/json"}
    r = httpx.post(gw["url"] + "/admin/tenants/a/keys", content=b'{"name": "x\\ud800"}',
                   headers=h, timeout=10)
    assert_openai_error(r, 400)
    r = httpx.patch(gw["url"] + "/admin/tenants/a", content=b'{"allowed_models": ["\\udfff"]}',
                    headers=h, timeout=10)
    assert_openai_error(r, 400)


# -- 4. secrets and upstream errors --------------------------------------------------------
def test_admin_docs_need_the_admin_key(gw: dict[str, Any]) -> None:
    for path in ("/admin/docs", "/admin/openapi.json"):
        assert_openai_error(httpx.get(gw["url"] + path, timeout=10), 401)
        assert httpx.get(gw["url"] + path, headers=ADMIN, timeout=10).status_code == 200


def test_admin_docs_public_by_config(tmp_path: Path) -> None:
    proc, url = start_stub(tmp_path)
    settings = make_settings(upstreams=[{"name": "s", "url": url, "models": ["stub"]}])
    settings = settings.model_copy(update={
        "admin": settings.admin.model_copy(update={"public_docs": True})})
    g = GatewayThread(settings)
    try:
        spec = httpx.get(g.url + "/admin/openapi.json", timeout=10)
        assert spec.status_code == 200 and "/admin/tenants" in spec.json()["paths"]
        assert httpx.get(g.url + "/admin/docs", timeout=10).status_code == 200
        assert_openai_error(httpx.get(g.url + "/admin/tenants", timeout=10), 401)
    finally:
        g.stop()
        proc.stop()


@pytest.mark.parametrize("status", ["401", "403", "429"])
def test_upstream_auth_and_rate_errors_are_502(gw: dict[str, Any], status: str) -> None:
    """An engine's 401/403/429 reached the tenant as its own auth or rate-limit error, with
    the engine's message (and the address in it)."""
    r = chat(gw, {"model": "fault", "messages": MSG, "fault": status})
    err = assert_openai_error(r, 502)
    assert err["code"] == "upstream_error" and err["type"] == "server_error"
    assert "10.1.2.3" not in r.text and "retry-after" not in r.headers


def test_502_messages_carry_no_address(tmp_path: Path) -> None:
    """A refused connection: 502 ``could not connect to backend 'dead': cannot connect to
    127.0.0.1:<port>``."""
    port = free_port()
    proc, url = start_stub(tmp_path)  # readiness needs one healthy backend
    settings = make_settings(
        upstreams=[{"name": "dead", "url": f"http://127.0.0.1:{port}", "models": ["stub"],
                    "connect_timeout_s": 0.5},
                   {"name": "live", "url": url, "models": ["other"]}],
        tenants=[{"name": "a", "api_keys": [KEY]}])
    g = GatewayThread(settings)
    try:
        for b in g.app.gateway.pool.backends():  # type: ignore[union-attr]
            b.state = "healthy"  # the router tries the dead one
        r = httpx.post(g.url + "/v1/chat/completions", json={"model": "stub", "messages": MSG},
                       headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        err = assert_openai_error(r, 502)
        assert "127.0.0.1" not in err["message"] and str(port) not in err["message"], err
        assert "dead" in err["message"]
    finally:
        g.stop()
        proc.stop()


def test_in_stream_engine_error_is_recorded_as_an_error(gw: dict[str, Any]) -> None:
    """An engine's in-stream error event was relayed, and the request recorded as 200."""
    line = 'driftsched_requests_total{endpoint="chat",status="502",tenant="a"}'
    before, errors = metric(gw, line), usage(gw, "a")["errors"]
    with httpx.stream("POST", gw["url"] + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "fault", "messages": MSG, "stream": True,
                            "fault": "stream_error"}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert "engine failed mid-stream" in text
    assert metric(gw, line) == before + 1
    assert usage(gw, "a")["errors"] == errors + 1


# -- 5. a malformed engine answer cannot leak the hold -------------------------------------
def test_malformed_usage_does_not_keep_the_hold(gw: dict[str, Any]) -> None:
    """``usage`` with non-integer counts raised in settling before the hold was released:
    the tenant (concurrency 1) was stuck, every later request a 503 queue_timeout."""
    r = chat(gw, {"model": "fault", "messages": MSG, "fault": "bad_usage"}, key=KEY_ONE)
    assert r.status_code == 200, r.text
    for _ in range(3):
        r = chat(gw, {"model": "fault", "messages": MSG}, key=KEY_ONE)
        assert r.status_code == 200, r.text
    assert usage(gw, "one")["in_flight"] == 0


# -- 4/5. config: check-config, environment ------------------------------------------------
def test_check_config_redacts_secrets_and_takes_env_types(tmp_path: Path) -> None:
    """check-config printed the admin key, tenant keys and upstream keys in clear; any
    non-setting DRIFTSCHED_* variable made it fail; ``DRIFTSCHED_ADMIN__API_KEY=null`` turned
    the admin API off."""
    secrets = {"admin": "adm-SECRET-1234", "tenant": "dsk-tenantx0-SECRETSECRETSECRET",
               "up": "sk-upstream-SECRET", "llm": "sk-ant-SECRET"}
    cfg = {
        "admin": {"api_key": secrets["admin"]},
        "tenants": [{"name": "x", "api_keys": [secrets["tenant"]]}],
        "upstreams": [
            {"name": "u", "url": "http://127.0.0.1:1", "models": ["m"], "api_key": secrets["up"]},
            {"name": "l", "provider": "litellm", "models": ["c"], "litellm_model": "anthropic/x",
             "litellm_params": {"api_key": secrets["llm"], "api_base": "https://example.org"}},
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTSCHED_")}

    def check(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "-c", str(path)],
                              capture_output=True, text=True, timeout=60, env={**env, **extra})

    out = check(DRIFTSCHED_SHARED_DATA=str(tmp_path), DRIFTSCHED_URL="http://x")
    assert out.returncode == 0, out.stderr
    for s in secrets.values():
        assert s not in out.stdout + out.stderr
    printed = json.loads(out.stdout)
    assert printed["admin"]["api_key"] == "<redacted>"
    assert printed["tenants"][0]["api_keys"] == ["<redacted>"]
    assert printed["upstreams"][0]["api_key"] == "<redacted>"
    assert printed["upstreams"][1]["litellm_params"] == {"api_key": "<redacted>",
                                                         "api_base": "https://example.org"}
    out = check(DRIFTSCHED_ADMIN__API_KEY="null")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["admin"]["api_key"] == "<redacted>"  # set (to "null"), on
    out = check(DRIFTSCHED_ADMIN_API_KEY="k")
    assert out.returncode == 2 and "DRIFTSCHED_ADMIN__API_KEY" in out.stderr


def test_the_gateway_log_holds_no_key(gw: dict[str, Any]) -> None:
    chat(gw, {"model": "stub", "messages": MSG, "max_tokens": 1})
    chat(gw, {"model": "stub", "messages": MSG}, key=KEY[:-4] + "zzzz")  # a wrong key
    log = gw["log"].read_text()
    assert '"tenant": "a"' in log  # the access log is on
    for secret in (KEY, KEY[13:], KEY[:-4] + "zzzz", ADMIN_KEY):
        assert secret not in log

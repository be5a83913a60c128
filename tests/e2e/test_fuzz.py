"""Fuzz suite (issue 14): bodies, headers, paths and methods for every ``/v1`` and ``/admin``
endpoint, against a real gateway process (``driftsched serve``) on a real Redis in front of
the stub engine. The bar: **no 5xx, and every error in OpenAI's shape**
(``{"error": {"message", "type", "param", "code"}}``); a 200 stream ends with ``[DONE]`` and
carries no error event.

Examples per test are bounded so the CI run stays under a minute; set
``DRIFTSCHED_FUZZ_EXAMPLES`` (examples per test) for a longer run. The module prints its
figures at the end (inputs sent, 5xx seen, per status).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ADMIN_KEY, start_gateways, start_stub

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

KEY = "dsk-fuzz0000-" + "f" * 40
EXAMPLES = int(os.environ.get("DRIFTSCHED_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
#: what the module saw, printed at its end
SEEN: Counter[str] = Counter()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("fuzz")
    stub, stub_url = start_stub(tmp, chunks=2)
    cfg = {
        "server": {"access_log": False, "auth_cache_ttl_s": 1, "max_body_bytes": 256 * 1024},
        "admin": {"api_key": ADMIN_KEY},
        "store": {"type": "redis", "url": redis_server, "prefix": f"dsfuzz{time.time_ns()}"},
        "upstreams": [{"name": "stub0", "url": stub_url, "models": ["stub"]}],
        "tenants": [{"name": "fuzz", "api_keys": [KEY]}],
    }
    try:
        procs, urls = start_gateways(cfg, tmp, 1)
    except BaseException:
        stub.stop()
        raise
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=urls[0], timeout=30) as client:
            yield client
        log = procs[0].log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        procs[0].stop()
        stub.stop()
        n = sum(v for k, v in SEEN.items() if k.startswith("status "))
        print(f"\nfuzz: {n} inputs in {time.monotonic() - t0:.1f}s, "
              f"{SEEN['5xx']} 5xx, {SEEN['bad shape']} errors not in OpenAI's shape; "
              + ", ".join(f"{k}: {v}" for k, v in sorted(SEEN.items()) if k.startswith("status")))


def check(r: httpx.Response, method: str = "POST") -> None:
    """The bar, for one response."""
    SEEN[f"status {r.status_code}"] += 1
    if r.status_code >= 500:
        SEEN["5xx"] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400 and method != "HEAD":
        try:
            err = r.json()["error"]
            ok = (set(err) == {"message", "type", "param", "code"}
                  and isinstance(err["message"], str) and isinstance(err["type"], str))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            SEEN["bad shape"] += 1
        assert ok, (r.status_code, r.headers.get("content-type"), r.text[:500])
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        text = r.text
        assert text.rstrip().endswith("data: [DONE]") and '{"error"' not in text, text[-500:]


# -- strategies ----------------------------------------------------------------------------
#: any character, lone surrogates included (and drawn often: they broke the old code)
ANY_CHAR = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))
#: (``st.text`` leaves surrogates out whatever its alphabet; a list of characters does not)
text = st.one_of(st.text(max_size=20), st.lists(ANY_CHAR, max_size=20).map("".join))
ints = st.one_of(st.integers(-10, 10), st.sampled_from(
    [2**31 - 1, 2**31, 2**53, 2**63, -(2**63), 10**30, -(10**30)]), st.integers())
numbers = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(text, kids, max_size=4)), max_leaves=12)
#: extra fields: anything but the stub's own switches (faults, delays, ignore_eos)
extra_keys = text.filter(lambda k: not k.startswith("stub_") and k != "ignore_eos")


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(value, json_values)


small_tokens = st.one_of(st.integers(1, 4), ints, json_values)
content = st.one_of(text, st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]), "text": maybe(text)}), max_size=3),
    json_values)
message = st.one_of(st.fixed_dictionaries({
    "role": maybe(st.sampled_from(["user", "system", "assistant", "tool"])),
    "content": content}), json_values)
common = {
    "model": maybe(st.sampled_from(["stub", "stub", "nope", ""])),
    "max_tokens": small_tokens, "max_completion_tokens": small_tokens,
    "n": st.one_of(st.integers(1, 2), ints, json_values),
    "stream": maybe(st.booleans()),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": maybe(st.booleans())}),
                                json_values),
    "priority": st.one_of(ints, json_values),
    "temperature": numbers,
}
body_fields = {
    "chat": {**common, "messages": st.one_of(st.lists(message, max_size=3), json_values)},
    "completions": {**common, "prompt": st.one_of(text, st.lists(st.one_of(text, ints),
                                                                  max_size=3), json_values)},
    "embeddings": {"model": common["model"], "input": st.one_of(text, st.lists(text, max_size=3),
                                                                 json_values)},
}
V1 = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
      "embeddings": "/v1/embeddings"}


@st.composite
def v1_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """Half: a valid body with up to two fields mutated (so most inputs get past validation
    into estimation, shaping, queueing and the engine); half: any subset of the fields."""
    endpoint = draw(st.sampled_from(sorted(body_fields)))
    fields = body_fields[endpoint]
    core = {"chat": "messages", "completions": "prompt", "embeddings": "input"}[endpoint]
    if draw(st.booleans()):
        said = draw(st.one_of(st.just("hi"), text))
        body: dict[str, Any] = {
            "model": "stub",
            core: [{"role": "user", "content": said}] if endpoint == "chat" else said}
        if endpoint != "embeddings":
            body.update(max_tokens=draw(st.integers(1, 4)), stream=draw(st.booleans()))
        for k in draw(st.sets(st.sampled_from(sorted(fields)), max_size=2)):
            body[k] = draw(fields[k])
    else:
        body = {k: draw(fields[k]) for k in sorted(draw(st.sets(st.sampled_from(sorted(fields)))))}
    body.update(draw(st.dictionaries(extra_keys, json_values, max_size=2)))
    return V1[endpoint], body


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN/Infinity literals, \\udXXX escapes


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bytes that are not (quite) a good body: binary, truncated, deep, other encodings."""
    good = dumps({"model": "stub", "messages": [{"role": "user", "content": draw(text)}],
                  "max_tokens": 2})
    depth = draw(st.integers(1, 3000))
    return draw(st.one_of(
        st.binary(max_size=200),
        st.just(good[: draw(st.integers(0, len(good)))]),
        st.just(b"[" * depth + b"]" * depth),
        st.just(b'{"model": "stub", "messages": [{"role": "user", "content": '
                + b"{\"a\":" * depth + b"1" + b"}" * depth + b"}]}"),
        st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1"]).map(
            lambda enc: good.decode().encode(enc, "replace")),
        st.just(good.replace(b'"user"', b'"\\ud800"')),
        st.just(good.replace(b"user", b"us\xed\xa0\x80er")),
        st.just(good.replace(b"2}", b"1" + b"0" * 5000 + b"}")),
    ))


#: a valid HTTP field value (RFC 9110: visible ASCII, obs-text 0x80-0xFF, inner spaces and
#: tabs). Anything else is refused by the HTTP server's parser (uvicorn) with its own
#: plain-text 400 before the gateway sees the request, and by the client library too.
_FIELD_BYTES = [*range(0x21, 0x7F), *range(0x80, 0x100)]
header_value = st.one_of(
    st.lists(st.sampled_from([*_FIELD_BYTES, 0x20, 0x09]), max_size=40).map(bytes),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
).map(lambda b: bytes(c for c in b if c in _FIELD_BYTES or c in b" \t").strip(b" \t"))
auth = st.one_of(st.just(f"Bearer {KEY}".encode()), st.just(f"Bearer {ADMIN_KEY}".encode()),
                 header_value, header_value.map(lambda v: (b"Bearer " + v).strip()))
header_names = st.sampled_from(["authorization", "content-type", "x-request-id",
                                "content-encoding", "accept", "x-forwarded-for", "cookie"])


def segment() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["stub0", "nope", "fuzz-x", "key_x", "..", "%00"]),
                     text.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")))


@st.composite
def paths(draw: st.DrawFn) -> str:
    seg = draw(segment()).replace("stub0", "stub1")  # the engine itself is not drained
    tenant = draw(segment())
    tenant = "nofuzz" if tenant == "fuzz" else tenant
    return draw(st.sampled_from([
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
        f"/v1/models/{seg}", f"/v1/{seg}", "/v1/", "/healthz", "/readyz", "/metrics",
        f"/{seg}", "/admin/tenants", f"/admin/tenants/{tenant}", f"/admin/tenants/{tenant}/usage",
        f"/admin/tenants/{tenant}/keys", "/admin/usage", "/admin/keys",
        f"/admin/keys?tenant={seg}&prefix={seg}", f"/admin/keys/{seg}",
        f"/admin/keys/{seg}/rotate", "/admin/scheduler", "/admin/backends",
        f"/admin/backends/{seg}", f"/admin/backends/{seg}/drain?wait={seg}",
        f"/admin/backends/{seg}/undrain", "/admin/docs", "/admin/openapi.json", f"/admin/{seg}",
    ]))


methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
tenant_fields = {
    "name": st.one_of(st.from_regex(r"\Afz-[a-z0-9]{1,8}\Z"), text), "qos_class": maybe(text),
    "weight": numbers, "rpm": ints, "tpm": ints, "max_concurrency": ints,
    "daily_token_quota": ints, "ttft_slo_ms": numbers, "tpot_slo_ms": numbers,
    "queue_timeout_s": numbers, "allowed_models": st.one_of(st.lists(text, max_size=3), json_values),
}
backend_fields = {
    "name": st.one_of(st.from_regex(r"\Afz-[a-z0-9]{1,8}\Z"), text),
    "url": st.sampled_from(["http://127.0.0.1:1", "ftp://x", "", "http://[::1"]),
    "models": st.one_of(st.lists(text, max_size=2), json_values), "max_connections": ints,
    "connect_timeout_s": numbers, "kv_capacity_tokens": ints,
}


@st.composite
def admin_calls(draw: st.DrawFn) -> tuple[str, str, bytes]:
    kind = draw(st.sampled_from(["create", "patch", "key", "rotate", "backend"]))
    fields = backend_fields if kind == "backend" else tenant_fields
    body: Any = {k: draw(fields[k]) for k in sorted(draw(st.sets(st.sampled_from(sorted(fields)))))}
    if kind in ("key", "rotate"):
        body = draw(st.fixed_dictionaries({}, optional={"name": maybe(text),
                                                        "grace_s": numbers}))
    if draw(st.integers(0, 9)) == 0:
        body = draw(json_values)
    if kind == "patch" and isinstance(body, dict):
        body.pop("name", None)
    method, path = {"create": ("POST", "/admin/tenants"),
                    "patch": ("PATCH", "/admin/tenants/fz-target"),
                    "key": ("POST", "/admin/tenants/fz-target/keys"),
                    "rotate": ("POST", "/admin/keys/key_nope/rotate"),
                    "backend": ("POST", "/admin/backends")}[kind]
    raw = dumps(body) if draw(st.integers(0, 4)) else draw(raw_bodies())
    return method, path, raw


# -- the suite ------------------------------------------------------------------------------
@FUZZ
@given(call=v1_bodies())
def test_v1_bodies(gw: httpx.Client, call: tuple[str, dict[str, Any]]) -> None:
    path, body = call
    check(gw.post(path, content=dumps(body), headers={"authorization": f"Bearer {KEY}"}))


@FUZZ
@given(path=st.sampled_from(sorted(V1.values())), raw=raw_bodies())
def test_v1_raw_bytes(gw: httpx.Client, path: str, raw: bytes) -> None:
    check(gw.post(path, content=raw, headers={"authorization": f"Bearer {KEY}",
                                              "content-type": "application/json"}))


@FUZZ
@given(path=paths(), method=methods, auth_value=st.none() | auth,
       extra=st.dictionaries(header_names, header_value, max_size=3))
def test_paths_methods_and_headers(gw: httpx.Client, path: str, method: str,
                                   auth_value: bytes | None, extra: dict[str, bytes]) -> None:
    headers = [(k.encode(), v) for k, v in extra.items() if k != "authorization"]
    if auth_value is not None:
        headers.append((b"authorization", auth_value))
    body = dumps({"model": "stub", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 1}) if method in ("POST", "PUT", "PATCH") else None
    check(gw.request(method, path, content=body, headers=headers), method)


@FUZZ
@given(call=admin_calls())
def test_admin_bodies(gw: httpx.Client, call: tuple[str, str, bytes]) -> None:
    if gw.get("/admin/tenants/fz-target",
              headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 404:
        gw.post("/admin/tenants", json={"name": "fz-target"},
                headers={"authorization": f"Bearer {ADMIN_KEY}"})
    method, path, raw = call
    check(gw.request(method, path, content=raw, headers={
        "authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}), method)


def test_the_fuzzed_tenant_still_works(gw: httpx.Client) -> None:
    """After it all, a plain request still succeeds (nothing was left broken or held)."""
    r = gw.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                json={"model": "stub", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 2})
    assert r.status_code == 200, r.text
    u = gw.get("/admin/tenants/fuzz/usage", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert u.json()["in_flight"] == 0

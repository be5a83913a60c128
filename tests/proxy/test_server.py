"""Timeouts and limits of the server (``proxy/server.py``, ``server.*`` settings), through the
real server on loopback in front of the stub engine: half requests, slow bodies, requests
past the maximum duration, clients that stop reading, and the connection limit.

Each test failed before these limits existed: uvicorn keeps a half-sent request's
connection for ever, and a client that stops reading kept its engine hold renewed for ever.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import GatewayThread, make_settings, start_stub

pytestmark = pytest.mark.e2e

KEY = "dsk-servlim0-" + "q" * 40
MSG = [{"role": "user", "content": "hello"}]
LIMITS = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "send_timeout_s": 1.0,
          "max_request_duration_s": 3.0, "max_connections": 6}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    proc, url = start_stub(tmp_path_factory.mktemp("stub"), chunks=8)
    g = GatewayThread(make_settings(
        upstreams=[{"name": "stub0", "url": url, "models": ["stub"]}],
        tenants=[{"name": "t", "api_keys": [KEY]}], server=LIMITS))
    yield g
    g.stop()
    proc.stop()


_open: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def raw_connect(gw: GatewayThread, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _open.append(s)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", gw.port))
    return s


def health(s: socket.socket) -> None:
    """One ``GET /healthz`` on ``s``, read to its end (the connection stays open)."""
    s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    got = b""
    while not got.endswith(b'{"status":"ok"}'):
        got += s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200"), got


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def request_head(path: str, body_len: int, key: str = KEY) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {body_len}\r\n\r\n").encode()


def openai_error(raw: bytes, status: int) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw[:300]
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


def closed_metric(gw: GatewayThread, reason: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    m = re.search(rf'^driftsched_connections_closed_total{{reason="{reason}"}} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


def in_flight(gw: GatewayThread) -> int:
    return int(gw.admin("GET", "/admin/tenants/t/usage").json()["in_flight"])


def wait_settled(gw: GatewayThread, timeout: float) -> float:
    """Seconds until the tenant holds no engine slot (fails after ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if in_flight(gw) == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"the hold was not released within {timeout}s")


# -- header timeout ------------------------------------------------------------------------
def test_half_a_header_block_gets_408_and_is_closed(gw: GatewayThread) -> None:
    before = closed_metric(gw, "header_timeout")
    s = raw_connect(gw)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthori")
    raw = read_all(s)  # the old server: blocked here until the socket timeout
    took = time.monotonic() - t0
    assert openai_error(raw, 408)["code"] == "request_timeout"
    assert 0.4 < took < 3, took
    assert closed_metric(gw, "header_timeout") == before + 1


def test_a_silent_connection_is_closed(gw: GatewayThread) -> None:
    s = raw_connect(gw)
    t0 = time.monotonic()
    assert read_all(s) == b""  # nothing was asked: nothing is answered
    assert time.monotonic() - t0 < 3


def test_the_header_timeout_covers_each_request_on_a_kept_alive_connection(
        gw: GatewayThread) -> None:
    s = raw_connect(gw)
    health(s)
    time.sleep(0.7)  # longer than the header timeout: idle between requests is keep-alive's
    s.sendall(b"GET /healthz HTTP/1.1\r\nho")
    assert openai_error(read_all(s), 408)["code"] == "request_timeout"


# -- body timeout --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/tenants"])
def test_half_a_body_gets_408_and_is_closed(gw: GatewayThread, path: str) -> None:
    body = json.dumps({"model": "stub", "messages": MSG}).encode()
    key = KEY if path.startswith("/v1") else "adm-test-key"
    s = raw_connect(gw)
    t0 = time.monotonic()
    s.sendall(request_head(path, len(body), key) + body[:10])
    raw = read_all(s)
    assert openai_error(raw, 408)["type"] == "invalid_request_error"
    assert 0.4 < time.monotonic() - t0 < 3
    assert b"connection: close" in raw.lower()  # so that no client reuses the connection


def test_an_answer_before_the_body_is_in_closes_the_connection(gw: GatewayThread) -> None:
    """A response sent before the request body was all read (here: a bad key, answered at
    once) tells the client ``connection: close``; a client that reused the connection would
    send its next request into the rest of the body and read a reset."""
    body = json.dumps({"model": "stub", "messages": MSG}).encode()
    s = raw_connect(gw)
    s.sendall(request_head("/v1/chat/completions", len(body), "dsk-wrong" + "w" * 40)
              + body[:10])
    raw = read_all(s)  # the server closes after its answer
    assert openai_error(raw, 401)["code"] == "invalid_api_key"
    assert b"connection: close" in raw.lower()
    # a whole request on a kept-alive connection is unaffected
    s = raw_connect(gw)
    health(s)
    health(s)


def test_a_whole_body_in_slow_pieces_within_the_timeout_is_served(gw: GatewayThread) -> None:
    body = json.dumps({"model": "stub", "messages": MSG, "max_tokens": 2}).encode()
    s = raw_connect(gw)
    s.sendall(request_head("/v1/chat/completions", len(body)) + body[:5])
    time.sleep(0.2)
    s.sendall(body[5:])
    assert s.recv(65536).startswith(b"HTTP/1.1 200")


# -- maximum request duration --------------------------------------------------------------
def test_a_request_past_the_max_duration_gets_504_and_frees_its_hold(gw: GatewayThread) -> None:
    t0 = time.monotonic()
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                   headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "stub", "messages": MSG, "stub_fault": "hang"})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert r.headers["x-should-retry"] == "false"
    assert 2.9 < time.monotonic() - t0 < 6
    wait_settled(gw, 2)


def test_a_stream_past_the_max_duration_ends_with_an_error_event(gw: GatewayThread) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "stub", "messages": MSG, "stream": True, "max_tokens": 200,
                            "ignore_eos": True, "stub_chunk_delay_ms": 50}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert '"deadline_exceeded"' in text and "[DONE]" not in text
    assert text.count('"content":" tok"') > 10  # it ran until the deadline
    wait_settled(gw, 2)


# -- send timeout --------------------------------------------------------------------------
def test_a_client_that_stops_reading_is_cut_off_and_its_hold_released(gw: GatewayThread) -> None:
    """The client reads the response headers, then nothing: the gateway's writes back up
    into its buffer. The old gateway waited on that buffer for ever, renewing the hold."""
    before = closed_metric(gw, "send_timeout")
    body = json.dumps({"model": "stub", "messages": MSG, "stream": True, "ignore_eos": True,
                       "max_tokens": 200_000}).encode()  # ~25 MB of SSE, as fast as it goes
    s = raw_connect(gw, rcvbuf=4096)
    s.sendall(request_head("/v1/chat/completions", len(body)) + body)
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    assert in_flight(gw) == 1
    took = wait_settled(gw, 2.5)  # buffers fill in well under a second, then 1 s
    assert closed_metric(gw, "send_timeout") == before + 1
    try:
        rest = read_all(s)  # what was in the kernel's buffers, then the end
    except ConnectionResetError:
        rest = b""
    assert b"[DONE]" not in rest and len(rest) < 5_000_000
    print(f"hold released {took:.2f}s after the client stopped reading")


# -- connection limit ----------------------------------------------------------------------
def test_past_the_connection_limit_a_request_gets_an_openai_503(gw: GatewayThread) -> None:
    before = closed_metric(gw, "over_limit")
    idle = []
    for _ in range(LIMITS["max_connections"]):
        s = raw_connect(gw)
        health(s)  # now idle, kept alive (5 s)
        idle.append(s)
    with httpx.Client() as c:
        r = c.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "stub", "messages": MSG, "max_tokens": 1})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "server_overloaded"
    assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    for s in idle:
        s.close()
    time.sleep(0.1)
    assert closed_metric(gw, "over_limit") == before + 1
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "stub", "messages": MSG, "max_tokens": 1}, timeout=10)
    assert r.status_code == 200, r.text

"""Slow and stalled clients against a gateway process: connections that send nothing, half a
header block, or half a body, and streaming clients that stop reading, while ordinary
clients keep being served. Promise: the server closes every such connection within its
timeout (``server.header_timeout_s``, ``body_timeout_s``, ``send_timeout_s``) plus a
little, the stalled streams' engine holds are released, and the ordinary clients see no
error."""

from __future__ import annotations

import json
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.tools import MSG, gateway_config, leaked_slots, metric_sum, settle
from tests.harness import start_gateways, start_stub

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-chaosslo-" + "s" * 40
TIMEOUT_S = 1.0
#: a connection's timeout, plus the time a loaded 2-core machine takes to get to it
CLOSE_BOUND_S = TIMEOUT_S + 2.0


@pytest.fixture
def gw(tmp_path: Path, redis_server: str) -> Iterator[str]:
    stub, stub_url = start_stub(tmp_path, chunks=8)
    cfg = gateway_config(
        redis_server, upstreams=[{"name": "stub0", "url": stub_url, "models": ["stub"]}],
        tenants=[{"name": "s", "api_keys": [KEY]}],
        server={"header_timeout_s": TIMEOUT_S, "body_timeout_s": TIMEOUT_S,
                "send_timeout_s": TIMEOUT_S, "max_connections": 2000})
    try:
        procs, urls = start_gateways(cfg, tmp_path, 1)
    except BaseException:
        stub.stop()
        raise
    yield urls[0]
    for p in (*procs, stub):
        p.stop()


def _connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    return s


def _head(body_len: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {body_len}\r\n\r\n").encode()


def attack(url: str, silent: int, half_header: int, half_body: int,
           stalled: int) -> dict[str, list[socket.socket]]:
    body = json.dumps({"model": "stub", "messages": MSG}).encode()
    big = json.dumps({"model": "stub", "messages": MSG, "stream": True, "ignore_eos": True,
                      "max_tokens": 200_000}).encode()
    socks: dict[str, list[socket.socket]] = {k: [] for k in
                                             ("silent", "half_header", "half_body", "stalled")}
    for _ in range(silent):
        socks["silent"].append(_connect(url))
    for _ in range(half_header):
        s = _connect(url)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthoriz")
        socks["half_header"].append(s)
    for _ in range(half_body):
        s = _connect(url)
        s.sendall(_head(len(body)) + body[:7])
        socks["half_body"].append(s)
    for _ in range(stalled):
        s = _connect(url, rcvbuf=4096)
        s.sendall(_head(len(big)) + big)  # then never read
        socks["stalled"].append(s)
    return socks


def closed_after(socks: dict[str, list[socket.socket]], t0: float,
                 bound: float) -> dict[str, float | None]:
    """Per kind, the seconds after ``t0`` by which the server had closed every connection of
    that kind (reading what it sent meanwhile); ``None``: some were still open at ``bound``."""
    sel = selectors.DefaultSelector()
    kinds: dict[str, float | None] = {k: 0.0 for k in socks}
    left: dict[str, int] = {k: len(v) for k, v in socks.items()}
    for kind, ss in socks.items():
        for s in ss:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, kind)
    while any(left.values()) and time.monotonic() - t0 < bound:
        for key, _ in sel.select(timeout=0.05):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                sel.unregister(s)
                left[key.data] -= 1
                kinds[key.data] = time.monotonic() - t0
    for k, n in left.items():
        if n:
            kinds[k] = None
    sel.close()
    for ss in socks.values():
        for s in ss:
            s.close()
    return kinds


def _scenario(url: str, figures: Any, silent: int, half_header: int, half_body: int,
              stalled: int, ordinary: int, stall_bound_s: float = CLOSE_BOUND_S + 1) -> None:
    """``stall_bound_s``: the send timeout starts once the kernel's buffers and the
    server's are full, which takes the relay a while for many streams on 2 cores."""
    before = {r: metric_sum(url, "driftsched_connections_closed_total", reason=r)
              for r in ("header_timeout", "send_timeout")}
    cancelled0 = metric_sum(url, "driftsched_requests_total", status="499")
    t0 = time.monotonic()
    socks = attack(url, silent, half_header, half_body, stalled)
    latencies: list[float] = []
    statuses: list[int] = []

    def ordinary_clients() -> None:  # meanwhile, ordinary clients
        with httpx.Client(timeout=10) as c:
            for _ in range(ordinary):
                t = time.monotonic()
                r = c.post(url + "/v1/chat/completions", json={
                    "model": "stub", "messages": MSG, "max_tokens": 2},
                    headers={"authorization": f"Bearer {KEY}"})
                statuses.append(r.status_code)
                latencies.append(time.monotonic() - t)

    clients = threading.Thread(target=ordinary_clients)
    clients.start()
    # a stalled reader must stay stalled (reading it would unstall it): the server's count
    # says when it was cut off, and reading it afterwards must end (closed, not streaming)
    stalled_socks = socks.pop("stalled")
    closed = closed_after(socks, t0, CLOSE_BOUND_S + 3)
    cut_at: float | None = None
    while time.monotonic() - t0 < stall_bound_s + 3:
        if metric_sum(url, "driftsched_connections_closed_total",
                      reason="send_timeout") - before["send_timeout"] >= stalled:
            cut_at = time.monotonic() - t0
            break
        time.sleep(0.05)
    drained = closed_after({"stalled": stalled_socks}, time.monotonic(), 10)["stalled"]
    closed["stalled"] = cut_at if drained is not None else None
    clients.join(60)
    took, held = settle([url], timeout=5)
    after = {r: metric_sum(url, "driftsched_connections_closed_total", reason=r) - before[r]
             for r in before}
    # the stalled streams were cancelled (499), not run to their end for nobody: the old
    # relay lost the cancellation whenever redis-py swallowed it (a command in flight)
    cancelled = metric_sum(url, "driftsched_requests_total", status="499") - cancelled0
    figures(attack_connections=sum(len(v) for v in socks.values()) + stalled,
            closed_by_s={k: round(v, 2) if v is not None else None for k, v in closed.items()},
            closed_header_timeout=after["header_timeout"],
            closed_send_timeout=after["send_timeout"], stalled_cancelled=cancelled,
            ordinary_ok=statuses.count(200), ordinary=len(statuses),
            ordinary_p50_ms=round(statistics.median(latencies) * 1000, 1),
            ordinary_max_ms=round(max(latencies) * 1000, 1),
            leaked_slots=leaked_slots(held), settled_s=took)
    assert statuses == [200] * ordinary, statuses
    for kind, at in closed.items():
        bound = stall_bound_s if kind == "stalled" else CLOSE_BOUND_S
        assert at is not None and at < bound, (kind, closed)
    assert after == {"header_timeout": silent + half_header, "send_timeout": stalled}, after
    assert cancelled == stalled, cancelled
    assert leaked_slots(held) == 0 and not any(held.values()), held


def test_slow_and_stalled_clients(gw: str, figures: Any) -> None:
    _scenario(gw, figures, silent=20, half_header=40, half_body=40, stalled=4, ordinary=30)


@pytest.mark.chaos_slow
def test_slowloris_flood(gw: str, figures: Any) -> None:
    _scenario(gw, figures, silent=200, half_header=400, half_body=300, stalled=20, ordinary=200,
              stall_bound_s=10)


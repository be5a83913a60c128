"""A client that goes away at any stage releases every slot and cancels the engine's work."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import GatewayThread, make_settings, start_stub

pytestmark = pytest.mark.e2e

KEY = "dsk-disconn0-" + "z" * 40
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayThread, str]]:
    proc, url = start_stub(tmp_path_factory.mktemp("stub"), chunks=1000)
    g = GatewayThread(make_settings(
        upstreams=[{"name": "stub0", "url": url, "models": ["stub"]}],
        tenants=[{"name": "d", "max_concurrency": 1, "queue_timeout_s": 30, "api_keys": [KEY]}]))
    yield g, url
    g.stop()
    proc.stop()


def engine_counter(url: str, name: str) -> int:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\d+)", text, re.M)
    assert m, text
    return int(m.group(1))


def settled(gw: GatewayThread, url: str, timeout: float = 5.0) -> None:
    """Wait until the gateway and the engine hold nothing, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        u = gw.admin("GET", "/admin/tenants/d/usage").json()
        b = gw.admin("GET", "/admin/backends").json()[0]
        engines = gw.admin("GET", "/admin/scheduler").json()["engines"]  # the one ledger
        holds = sum(e["held_tokens"] + e["seqs"] for e in engines)
        if (u["in_flight"] == 0 and b["in_flight"] == 0 and holds == 0
                and engine_counter(url, "vllm:num_requests_running") == 0):
            return
        time.sleep(0.05)
    raise AssertionError(f"slots leaked: usage={u} backend={b} engines={engines}")


def test_disconnect_mid_stream_cancels_upstream_and_frees_slot(env: tuple[GatewayThread, str]) -> None:
    gw, url = env
    cancelled0 = engine_counter(url, "stub_cancelled_total")
    with httpx.stream("POST", gw.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "stub", "messages": MSG, "stream": True, "max_tokens": 1000,
                            "stub_chunk_delay_ms": 20}) as r:
        it = r.iter_raw()
        next(it)
        next(it)
    # closing the response closed the connection mid-stream
    settled(gw, url)
    assert engine_counter(url, "stub_cancelled_total") == cancelled0 + 1


def test_disconnect_while_waiting_for_engine(env: tuple[GatewayThread, str]) -> None:
    gw, url = env
    cancelled0 = engine_counter(url, "stub_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", timeout=0.5,
                   headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "stub", "messages": MSG, "stub_delay_ms": 5000})
    settled(gw, url)
    assert engine_counter(url, "stub_cancelled_total") == cancelled0 + 1


def test_disconnect_while_queued_never_reaches_engine(env: tuple[GatewayThread, str]) -> None:
    gw, url = env
    requests0 = engine_counter(url, "stub_requests_total")
    holder = threading.Thread(target=lambda: httpx.post(
        gw.url + "/v1/chat/completions", timeout=10, headers={"authorization": f"Bearer {KEY}"},
        json={"model": "stub", "messages": MSG, "max_tokens": 2, "stub_delay_ms": 1500}))
    holder.start()
    time.sleep(0.3)
    with pytest.raises(httpx.ReadTimeout):  # queued behind the holder (max_concurrency 1)
        httpx.post(gw.url + "/v1/chat/completions", timeout=0.4,
                   headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "stub", "messages": MSG, "max_tokens": 2})
    holder.join()
    settled(gw, url)
    assert engine_counter(url, "stub_requests_total") == requests0 + 1
    metrics = httpx.get(gw.url + "/metrics").text
    assert re.search(r'driftsched_client_disconnects_total\{stage="queued",tenant="d"\} [1-9]', metrics)
    # and the slot is usable again right away
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=5, headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "stub", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200


def test_many_abrupt_disconnects_leak_nothing(env: tuple[GatewayThread, str]) -> None:
    gw, url = env
    gw.admin("PATCH", "/admin/tenants/d", json={"max_concurrency": 8})
    try:
        def one(i: int) -> None:
            try:
                with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=2,
                                  headers={"authorization": f"Bearer {KEY}"},
                                  json={"model": "stub", "messages": MSG, "stream": i % 2 == 0,
                                        "stub_chunk_delay_ms": 5, "stub_delay_ms": 50 * (i % 3)}) as r:
                    for n, _ in enumerate(r.iter_raw()):
                        if n >= i % 4:
                            break
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        settled(gw, url, timeout=10)
    finally:
        gw.admin("PATCH", "/admin/tenants/d", json={"max_concurrency": 1})

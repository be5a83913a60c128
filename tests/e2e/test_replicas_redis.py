"""Two gateway processes sharing one Redis enforce a tenant's limits jointly."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ADMIN_KEY, start_gateways, start_stub

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY_RPM = "dsk-replrpm0-" + "r" * 40
KEY_CON = "dsk-replcon0-" + "s" * 40
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[list[str]]:
    tmp = tmp_path_factory.mktemp("replicas")
    stub, stub_url = start_stub(tmp)
    prefix = f"dsrepl{time.time_ns()}"
    cfg = {
        "server": {"access_log": False, "auth_cache_ttl_s": 0},
        "admin": {"api_key": ADMIN_KEY},
        "store": {"type": "redis", "url": redis_server, "prefix": prefix, "lease_ttl_s": 5},
        "upstreams": [{"name": "stub0", "url": stub_url, "models": ["stub"]}],
        "tenants": [
            {"name": "rpm", "rpm": 20, "api_keys": [KEY_RPM]},
            {"name": "con", "max_concurrency": 3, "queue_timeout_s": 0.2, "api_keys": [KEY_CON]},
        ],
    }
    try:
        procs, urls = start_gateways(cfg, tmp, 2)
    except BaseException:
        stub.stop()
        raise
    try:
        yield urls
    finally:
        for p in procs:
            p.stop()
        stub.stop()


def post(url: str, key: str, **extra: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=10, headers={"authorization": f"Bearer {key}"},
                      json={"model": "stub", "messages": MSG, "max_tokens": 1, **extra})


def test_rpm_is_enforced_jointly(replicas: list[str]) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker(url: str) -> None:
        for _ in range(15):
            s = post(url, KEY_RPM).status_code
            with lock:
                results.append(s)

    threads = [threading.Thread(target=worker, args=(u,)) for u in replicas for _ in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    # 60 attempts against rpm=20: exactly the bucket (20) plus the refill of the elapsed
    # seconds (one request per 3 s) pass, across both replicas together
    ok = results.count(200)
    assert results.count(429) + ok == 60
    assert 20 <= ok <= 20 + int(elapsed / 3) + 1, (ok, elapsed)


def test_concurrency_is_enforced_jointly(replicas: list[str]) -> None:
    peak = 0
    running = 0
    lock = threading.Lock()
    statuses: list[int] = []

    def worker(url: str) -> None:
        nonlocal peak, running
        r = post(url, KEY_CON, stub_delay_ms=600)
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(replicas[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # max_concurrency 3, queue timeout 0.2 s, each request holds its slot 0.6 s:
    # exactly 3 are served, the other 5 time out in the queue (503), whichever replica they hit
    assert statuses.count(200) == 3, statuses
    assert statuses.count(503) == 5, statuses
    time.sleep(0.2)
    for u in replicas:
        usage = httpx.get(u + "/admin/tenants/con/usage",
                          headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert usage["in_flight"] == 0


def test_tenants_and_keys_are_shared(replicas: list[str]) -> None:
    a, b = replicas
    h = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(a + "/admin/tenants", json={"name": "shared1"}, headers=h).status_code == 201
    key = httpx.post(a + "/admin/tenants/shared1/keys", headers=h).json()["key"]
    assert post(b, key).status_code == 200
    key_id = httpx.get(b + "/admin/keys", params={"tenant": "shared1"}, headers=h).json()[0]["key_id"]
    assert httpx.delete(b + f"/admin/keys/{key_id}", headers=h).status_code == 200
    assert post(a, key).status_code == 401


_ = Path

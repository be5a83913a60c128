"""When Redis goes away: 503 store_unavailable (fail closed) or admission without limits (fail open)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.harness import GatewayThread, make_settings, start_stub

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-outage00-" + "o" * 40


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary
    p = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return p, f"redis://127.0.0.1:{port}/0"


def start_gateway(tmp: Path, url: str, fail_open: bool = False) -> tuple[Any, GatewayThread]:
    """A stub engine and an in-process gateway on the Redis at ``url``."""
    stub, stub_url = start_stub(tmp)
    g = GatewayThread(make_settings(
        upstreams=[{"name": "s", "url": stub_url, "models": ["stub"]}],
        tenants=[{"name": "o", "rpm": 1000, "api_keys": [KEY]}],
        store={"type": "redis", "url": url, "fail_open": fail_open},
        server={"auth_cache_ttl_s": 300, "access_log": False}))
    return stub, g


def call(g: GatewayThread) -> httpx.Response:
    return httpx.post(g.url + "/v1/chat/completions", timeout=15,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "stub", "messages": [{"role": "user", "content": "x"}],
                            "max_tokens": 1})


@pytest.mark.parametrize("fail_open", [False, True])
def test_redis_outage(tmp_path: Path, fail_open: bool) -> None:
    redis_proc, url = start_redis(tmp_path)
    stub, g = start_gateway(tmp_path, url, fail_open)
    try:
        assert call(g).status_code == 200  # also caches the key
        redis_proc.kill()
        redis_proc.wait()
        r = call(g)
        if fail_open:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
            assert r.headers["retry-after"]
        admin = g.admin("GET", "/admin/tenants")
        assert admin.status_code == 503 and admin.json()["error"]["code"] == "store_unavailable"
        ready = httpx.get(g.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["store"] is False
    finally:
        g.stop()
        stub.stop()
        if redis_proc.poll() is None:
            redis_proc.kill()


@pytest.mark.parametrize("condition", ["oom", "readonly"])
def test_a_redis_that_cannot_write_is_store_unavailable(tmp_path: Path, condition: str) -> None:
    """A Redis that answers but refuses writes (out of memory under ``noeviction``; a primary
    demoted to a read-only replica) gives 503 ``store_unavailable``, not a 500; and the
    gateway serves again once it can write."""
    import redis as redis_py

    redis_proc, url = start_redis(tmp_path)
    stub, g = start_gateway(tmp_path, url)
    admin = redis_py.Redis.from_url(url)
    try:
        assert call(g).status_code == 200
        if condition == "oom":
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
        else:
            admin.replicaof("127.0.0.1", free_port())  # nobody there: a read-only replica
        for _ in range(3):
            r = call(g)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
        if condition == "oom":
            admin.config_set("maxmemory", 0)
        else:
            admin.replicaof("no", "one")
        assert call(g).status_code == 200
    finally:
        admin.close()
        g.stop()
        stub.stop()
        redis_proc.kill()

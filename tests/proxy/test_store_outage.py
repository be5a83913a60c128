"""When Redis goes away: 503 store_unavailable (fail closed) or admission without limits (fail open)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

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


@pytest.mark.parametrize("fail_open", [False, True])
def test_redis_outage(tmp_path: Path, fail_open: bool) -> None:
    redis_proc, url = start_redis(tmp_path)
    stub, stub_url = start_stub(tmp_path)
    g = GatewayThread(make_settings(
        upstreams=[{"name": "s", "url": stub_url, "models": ["stub"]}],
        tenants=[{"name": "o", "rpm": 1000, "api_keys": [KEY]}],
        store={"type": "redis", "url": url, "fail_open": fail_open},
        server={"auth_cache_ttl_s": 300, "access_log": False}))
    try:
        def call() -> httpx.Response:
            return httpx.post(g.url + "/v1/chat/completions", timeout=15,
                              headers={"authorization": f"Bearer {KEY}"},
                              json={"model": "stub", "messages": [{"role": "user", "content": "x"}],
                                    "max_tokens": 1})
        assert call().status_code == 200  # also caches the key
        redis_proc.kill()
        redis_proc.wait()
        r = call()
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

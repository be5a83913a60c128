"""Builders for integration tests: real processes and real HTTP over loopback.

* :class:`Proc` runs a command (an engine, a gateway) as a subprocess and waits for a URL.
* :class:`GatewayThread` runs the real server (:func:`proxy.server.build_server`) with
  ``create_app(settings)`` in a background thread (its own event loop), so a test can also
  look inside the app.
* :func:`make_settings` builds validated settings from a few keywords.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from adapters.procutil import stop_process
from proxy.app import DriftSchedApp, create_app
from proxy.config import Settings, settings_from_dict
from proxy.server import build_server
from tests.conftest import free_port

ADMIN_KEY = "adm-test-key"


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Proc:
    def __init__(self, args: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        try:
            wait_http(ready_url, timeout, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"{args!r} failed to start; log:\n{log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        stop_process(self.proc)
        self._fh.close()


def start_stub(
    tmp: Path, chunks: int = 32, model: str = "stub", max_model_len: int | None = None
) -> tuple[Proc, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = [] if max_model_len is None else ["--max-model-len", str(max_model_len)]
    p = Proc([sys.executable, "-m", "adapters.stub_engine", "--port", str(port), "--model", model,
              "--chunks", str(chunks), *extra], url + "/health", tmp / f"stub-{port}.log")
    return p, url


def start_gateways(cfg: dict[str, Any], tmp: Path, n: int) -> tuple[list[Proc], list[str]]:
    """``n`` gateway processes (``driftsched serve``) on one config, each on a free port and
    ready (``/readyz``); their procs and base URLs. On a failed start the started ones stop."""
    import yaml

    path = tmp / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs: list[Proc] = []
    urls: list[str] = []
    try:
        for i in range(n):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            procs.append(Proc([sys.executable, "-m", "proxy.cli", "serve", "-c", str(path),
                               "--port", str(port)], url + "/readyz", tmp / f"gw{i}.log",
                              timeout=60))
            urls.append(url)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, urls


def make_settings(
    *,
    upstreams: list[dict[str, Any]] | None = None,
    pool: dict[str, Any] | None = None,
    tenants: list[dict[str, Any]] | None = None,
    store: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> Settings:
    return settings_from_dict({
        "server": {"access_log": False, "auth_cache_ttl_s": 0, **(server or {})},
        "admin": {"api_key": ADMIN_KEY},
        "store": store or {"type": "memory"},
        "upstreams": upstreams or [],
        **({"pool": pool} if pool else {}),
        "tenants": tenants or [],
    })


class GatewayThread:
    """A real uvicorn server on a free port, running ``create_app(settings)`` in a thread."""

    def __init__(self, settings: Settings, ready_timeout: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app: DriftSchedApp = create_app(settings)
        # the server `driftsched serve` runs: its protocol, timeouts and connection limit
        self.server = build_server(self.app, host="127.0.0.1", port=self.port,
                                   log_level="warning")
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("gateway thread died during start-up")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("gateway not ready")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the gateway's loop (to look at or change its state)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path,
                             headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(20)

"""``driftsched demo``: the whole product on the embedded default.

Memory store (no Redis), a pool of simulator engines launched through the same pool manager
that launches vLLM (no GPU), three tenants of three QoS classes with fresh keys. It checks
itself through the official OpenAI SDK, prints how to call it, and keeps serving.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from typing import Any

DEMO_MODEL = "sim-llama3-8b"


def demo_settings(port: int, engines: int, time_scale: float) -> tuple[Any, dict[str, str], str]:
    from proxy.config import settings_from_dict
    from proxy.keys import KEY_PREFIX

    def key() -> str:
        return f"{KEY_PREFIX}demo{secrets.token_hex(2)}-{secrets.token_urlsafe(24)}"

    keys = {"acme": key(), "globex": key(), "batchco": key()}
    admin_key = "adm-" + secrets.token_urlsafe(24)
    settings = settings_from_dict({
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "admin": {"api_key": admin_key},
        "store": {"type": "memory"},
        "pool": {
            "engine": "sim",
            "model": DEMO_MODEL,
            "instances": engines,
            "startup_timeout_s": 60,
            "sim": {"profile": "llama3-8b-a100", "time_scale": time_scale},
        },
        "tenants": [
            {"name": "acme", "qos_class": "premium", "rpm": 600, "tpm": 400_000,
             "max_concurrency": 64, "api_keys": [keys["acme"]]},
            {"name": "globex", "qos_class": "standard", "rpm": 300, "tpm": 200_000,
             "max_concurrency": 32, "api_keys": [keys["globex"]]},
            {"name": "batchco", "qos_class": "batch", "rpm": 120, "tpm": 100_000,
             "max_concurrency": 16, "daily_token_quota": 2_000_000, "api_keys": [keys["batchco"]]},
        ],
    })
    return settings, keys, admin_key


def _self_check(base: str, keys: dict[str, str], admin_key: str, done: threading.Event) -> None:
    import httpx
    import openai

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        print("self-check: gateway not ready after 90 s; see logs/engines/", file=sys.stderr)
        done.set()
        return
    client = openai.OpenAI(base_url=base + "/v1", api_key=keys["acme"])
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "Say hello to DriftSched."}],
        max_tokens=32,
    )
    t1 = time.perf_counter()
    chunks = 0
    for _ in client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "Stream a short poem."}],
        max_tokens=48, stream=True,
    ):
        chunks += 1
    t2 = time.perf_counter()
    usage = r.usage
    print(
        "\nself-check through the OpenAI SDK: OK\n"
        f"  chat completion: {usage.completion_tokens if usage else '?'} tokens in "
        f"{(t1 - t0) * 1000:.0f} ms; stream: {chunks} chunks in {(t2 - t1) * 1000:.0f} ms\n"
    )
    print(f"DriftSched is serving on {base}  (Ctrl-C stops it and its engines)\n")
    print("Tenant keys (demo only; shown once):")
    for tenant, k in keys.items():
        print(f"  {tenant:8s} {k}")
    print(f"Admin key: {admin_key}\n")
    print("Try it:")
    print(f"  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {keys['acme']}' \\")
    print(f"       -H 'Content-Type: application/json' -d '{{\"model\": \"{DEMO_MODEL}\", "
          "\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
    print(f"  DRIFTSCHED_ADMIN_KEY={admin_key} driftsched --help  # tenants, keys, usage, backends")
    print(f"  curl -s {base}/metrics | grep driftsched_requests_total\n", flush=True)
    done.set()


def run_demo(port: int = 8000, engines: int = 2, time_scale: float = 1.0,
             exit_after_check: bool = False) -> int:
    from proxy.app import create_app
    from proxy.logs import configure_logging
    from proxy.server import build_server

    configure_logging("warning")
    settings, keys, admin_key = demo_settings(port, engines, time_scale)
    app = create_app(settings)
    server = build_server(app, host="127.0.0.1", port=port, log_level="warning")
    done = threading.Event()
    base = f"http://127.0.0.1:{port}"
    failed: list[BaseException] = []

    def check() -> None:
        try:
            _self_check(base, keys, admin_key, done)
        except BaseException as e:  # report, then stop the server
            failed.append(e)
            print(f"self-check FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            server.should_exit = True
            done.set()
            return
        if exit_after_check:
            server.should_exit = True

    threading.Thread(target=check, daemon=True).start()
    print(f"starting DriftSched demo: memory store, {engines} simulator engine(s) ...", flush=True)
    server.run()
    return 1 if failed else 0

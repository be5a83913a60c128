"""``driftsched demo``: the whole product on the embedded default.

Memory store (no Redis), a pool of engines launched through the same pool manager that
launches vLLM in production, three tenants of three QoS classes with fresh keys. It checks
itself through the official OpenAI SDK, prints how to call it, and keeps serving.

Engines (``--engine``):

* ``sim`` (the default): simulator engines (no GPU), ``pool.engine: sim``;
* ``vllm-cpu``: real vLLM on the CPU with the tiny local model of the ``vllm_cpu`` test tier
  (random weights: the text is gibberish, the scheduling, batching, KV cache and metrics are
  vLLM's), ``pool.engine: vllm``. The virtualenv and the model come from
  :mod:`adapters.vllm_cpu`, as the tests' do; ``install`` sets the venv up on first use.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SIM_MODEL = "sim-llama3-8b"
ENGINES = ("sim", "vllm-cpu")
INSTALL_HINT = "`make demo ENGINE=vllm-cpu` or `driftsched demo --engine vllm-cpu --install`"


def sim_pool(engines: int, time_scale: float) -> dict[str, Any]:
    return {
        "engine": "sim",
        "model": SIM_MODEL,
        "instances": engines,
        "startup_timeout_s": 60,
        "sim": {"profile": "llama3-8b-a100", "time_scale": time_scale},
    }


def vllm_cpu_pool(python: str, model_dir: Path, engines: int) -> dict[str, Any]:
    """The ``pool:`` of real vLLM-CPU engines serving the tiny model in ``model_dir``."""
    from adapters.vllm_cpu import BASE_EXTRA_ARGS, SERVED_NAME, vllm_env

    return {
        "engine": "vllm",
        "python": python,
        "model": str(model_dir),
        "served_model_name": SERVED_NAME,
        "instances": engines,
        "startup_timeout_s": 240,  # 20-60 s on 2 busy cores (docs/vllm-cpu.md)
        "env": {**vllm_env(), "VLLM_CACHE_ROOT": str(model_dir.parent / "vllm-cache")},
        # the class levels reach vLLM as `priority`; 8 batch slots on 2 cores, so the
        # gateway's admission queue holds the rest
        "args": [*BASE_EXTRA_ARGS, "--scheduling-policy", "priority", "--block-size", "32",
                 "--max-num-seqs", "8"],
    }


def demo_settings(port: int, pool: dict[str, Any]) -> tuple[Any, dict[str, str], str]:
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
        "pool": pool,
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


def _wait_ready(base: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base + "/readyz", timeout=2)
            if r.status_code == 200:
                return
            states = r.json().get("backends") or {}
        except (httpx.HTTPError, ValueError):
            pass
        if states and all(s == "failed" for s in states.values()):
            raise RuntimeError(f"every engine failed to start ({states}); see logs/engines/")
        time.sleep(0.3)
    raise RuntimeError(f"gateway not ready after {timeout_s:.0f} s (engines {states or '?'}); "
                       "see logs/engines/")


def _engines_line(base: str, admin_key: str) -> str:
    """One line per engine from ``/admin/backends``, once the first scrapes filled in the KV
    capacity (a vLLM engine's comes from its ``/metrics``; up to 5 s)."""
    import httpx

    deadline = time.monotonic() + 5
    while True:
        rows = httpx.get(base + "/admin/backends", timeout=5,
                         headers={"Authorization": f"Bearer {admin_key}"}).json()
        if time.monotonic() > deadline or all(b.get("kv_capacity_tokens") for b in rows):
            break
        time.sleep(0.25)
    return "; ".join(
        f"{b['name']} ({b['kind']}, pid {b.get('pid')}, {b['state']}, KV "
        f"{b.get('kv_capacity_tokens') or '?'} tokens, "
        f"log {b.get('log_path') or '-'})" for b in rows)


def _self_check(base: str, model: str, keys: dict[str, str], admin_key: str,
                ready_timeout_s: float) -> None:
    import openai

    _wait_ready(base, ready_timeout_s)
    client = openai.OpenAI(base_url=base + "/v1", api_key=keys["acme"])
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello to DriftSched."}],
        max_tokens=32,
    )
    t1 = time.perf_counter()
    chunks = 0
    for _ in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Stream a short poem."}],
        max_tokens=48, stream=True,
    ):
        chunks += 1
    t2 = time.perf_counter()
    usage = r.usage
    print(
        "\nself-check through the OpenAI SDK: OK\n"
        f"  chat completion: {usage.completion_tokens if usage else '?'} tokens in "
        f"{(t1 - t0) * 1000:.0f} ms; stream: {chunks} chunks in {(t2 - t1) * 1000:.0f} ms\n"
        f"  engines: {_engines_line(base, admin_key)}\n"
    )
    print(f"DriftSched is serving {model} on {base}  (Ctrl-C stops it and its engines)\n")
    print("Tenant keys (demo only; shown once):")
    for tenant, k in keys.items():
        print(f"  {tenant:8s} {k}")
    print(f"Admin key: {admin_key}\n")
    print("Try it:")
    print(f"  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {keys['acme']}' \\")
    print(f"       -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", "
          "\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
    print(f"  DRIFTSCHED_ADMIN_KEY={admin_key} driftsched --help  # tenants, keys, usage, backends")
    print(f"  curl -s {base}/metrics | grep driftsched_requests_total\n", flush=True)


def _vllm_cpu_python(install: bool) -> str | int:
    """The vLLM-CPU venv's python, or the exit code after saying what to do instead."""
    from adapters.vllm_cpu import VllmCpuError, VllmCpuUnsupported, vllm_python

    if install:
        print("vLLM-CPU: setting up .vllm-venv if needed (scripts/setup_vllm_cpu.sh; first "
              "time 2-5 min, ~500 MB download) ...", flush=True)
    try:
        return vllm_python(install=install, how_to_install=INSTALL_HINT,
                           log=sys.stderr if install else None)
    except VllmCpuUnsupported as e:
        print(f"error: {e}\n"
              "  The demo runs here on simulator engines instead, through the same gateway and "
              "pool code: `make demo` (or `driftsched demo`).\n"
              "  vllm-cpu needs Linux on x86_64 with AVX2 (or aarch64), Python 3.11 and 5 GiB "
              "free disk (docs/vllm-cpu.md).", file=sys.stderr)
        return e.exit_code
    except VllmCpuError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run_demo(port: int = 8000, engines: int | None = None, time_scale: float = 1.0,
             exit_after_check: bool = False, engine: str = "sim", install: bool = False) -> int:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "sim":
        return _serve(port, sim_pool(engines or 2, time_scale), SIM_MODEL, exit_after_check,
                      ready_timeout_s=90,
                      what=f"{engines or 2} simulator engine(s)")
    from adapters.vllm_cpu import SERVED_NAME, VllmCpuError, build_tiny_model

    python = _vllm_cpu_python(install)
    if isinstance(python, int):
        return python
    with tempfile.TemporaryDirectory(prefix="driftsched-demo-") as tmp:
        print("building the tiny local model (random weights, 5-10 s) ...", flush=True)
        try:
            model_dir = build_tiny_model(python, Path(tmp) / "tiny")
        except VllmCpuError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        pool = vllm_cpu_pool(python, model_dir, engines or 1)
        return _serve(port, pool, SERVED_NAME, exit_after_check,
                      ready_timeout_s=pool["startup_timeout_s"] + 30,
                      what=f"{engines or 1} vLLM-CPU engine(s) (tiny random-weight model: "
                           "the text is gibberish; start-up 20-60 s)")


def _serve(port: int, pool: dict[str, Any], model: str, exit_after_check: bool,
           ready_timeout_s: float, what: str) -> int:
    from proxy.app import create_app
    from proxy.logs import configure_logging
    from proxy.server import build_server

    configure_logging("warning")
    settings, keys, admin_key = demo_settings(port, pool)
    app = create_app(settings)
    server = build_server(app, host="127.0.0.1", port=port, log_level="warning")
    base = f"http://127.0.0.1:{port}"
    failed: list[BaseException] = []

    def check() -> None:
        try:
            _self_check(base, model, keys, admin_key, ready_timeout_s)
        except BaseException as e:  # report, then stop the server
            failed.append(e)
            print(f"self-check FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            server.should_exit = True
            return
        if exit_after_check:
            server.should_exit = True

    threading.Thread(target=check, daemon=True).start()
    print(f"starting DriftSched demo: memory store, {what} ...", flush=True)
    server.run()
    return 1 if failed else 0

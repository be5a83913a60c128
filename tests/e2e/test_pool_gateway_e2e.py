"""The gateway driving simulator engines through the pool manager (the production code path)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.harness import GatewayThread, make_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "dsk-poolgw00-" + "p" * 40
MODEL = "sim-test"
MSG = [{"role": "user", "content": "Tell me a story about schedulers."}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    logs = tmp_path_factory.mktemp("engines")
    settings = make_settings(
        pool={
            "engine": "sim", "model": MODEL, "instances": 2, "log_dir": str(logs),
            "health_interval_s": 0.2, "scrape_interval_s": 0.2, "stop_grace_s": 3,
            "restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1},
            "sim": {"profile": "llama3-8b-a100", "time_scale": 1.0},
        },
        tenants=[{"name": "t", "api_keys": [KEY]}],
    )
    g = GatewayThread(settings, ready_timeout=60)
    # both engines up before the tests start
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(b["state"] == "healthy" for b in g.admin("GET", "/admin/backends").json()):
            break
        time.sleep(0.1)
    yield g
    g.stop()


def sdk(gw: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_streaming_chunks_arrive_as_generated(gw: GatewayThread) -> None:
    # warm up the SDK (its first stream builds pydantic models while holding the GIL that
    # this in-process gateway shares)
    list(sdk(gw).chat.completions.create(model=MODEL, messages=MSG, stream=True, max_tokens=2))
    t0 = time.monotonic()
    arrivals = []
    for chunk in sdk(gw).chat.completions.create(model=MODEL, messages=MSG, stream=True,
                                                 max_tokens=120, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 120
    # the first token is relayed long before the last one is generated (no buffering)
    assert arrivals[0] < arrivals[-1] / 3, arrivals


def test_usage_and_backends_view(gw: GatewayThread) -> None:
    r = sdk(gw).chat.completions.create(model=MODEL, messages=MSG, max_tokens=12,
                                        extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 12
    backends = gw.admin("GET", "/admin/backends").json()
    assert [b["name"] for b in backends] == ["sim-0", "sim-1"]
    for b in backends:
        assert b["state"] == "healthy" and b["pid"] and b["metrics"]["age_s"] < 5
        assert b["kv_capacity_tokens"] and b["log_path"] and Path(b["log_path"]).exists()


def test_engine_killed_mid_stream_fails_cleanly_and_is_restarted(gw: GatewayThread) -> None:
    client = sdk(gw)
    errors: list[BaseException] = []
    got_chunks = threading.Event()

    def stream() -> None:
        try:
            for _ in client.chat.completions.create(
                    model=MODEL, messages=MSG, stream=True, max_tokens=2000,
                    extra_body={"ignore_eos": True}):
                got_chunks.set()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=stream)
    t.start()
    assert got_chunks.wait(10)
    victim = next(b for b in gw.admin("GET", "/admin/backends").json() if b["in_flight"] > 0)
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(10)
    assert not t.is_alive(), "streaming client hung after its engine died"
    assert errors and isinstance(errors[0], openai.APIError), errors
    # new requests are routed to the surviving engine meanwhile
    for _ in range(3):
        r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
        assert r.usage is not None
    # and the dead engine comes back with a new process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        b = next(x for x in gw.admin("GET", "/admin/backends").json() if x["name"] == victim["name"])
        if b["state"] == "healthy" and b["pid"] != victim["pid"]:
            assert b["restarts"] >= 1
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"engine {victim['name']} was not restarted: {b}")
    u = gw.admin("GET", "/admin/tenants/t/usage").json()
    assert u["in_flight"] == 0

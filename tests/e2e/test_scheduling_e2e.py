"""Scheduling through the real path: gateway -> admission queue -> pool -> simulator engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import GatewayThread, make_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "sim-sched"
KEYS = {
    "gold": "dsk-gold0000-" + "g" * 40,
    "bulk": "dsk-bulk0000-" + "b" * 40,
    "drifty": "dsk-drifty00-" + "d" * 40,
}


def gateway(tmp: Path, policy: dict[str, Any], sim: dict[str, Any],
            tenants: list[dict[str, Any]], scheduler: dict[str, Any] | None = None) -> GatewayThread:
    settings = make_settings(
        pool={"engine": "sim", "model": MODEL, "instances": 1, "log_dir": str(tmp),
              "health_interval_s": 0.2, "scrape_interval_s": 0.2, "stop_grace_s": 3, "sim": sim},
        tenants=tenants,
    ).model_copy(update={"scheduler": make_settings().scheduler.model_copy(
        update={"policy": make_settings().scheduler.policy.model_copy(update=policy),
                **(scheduler or {})})})
    return GatewayThread(settings, ready_timeout=60)


#: one pooled client per gateway, shared by a burst's threads (a client per request costs
#: ~30 ms of set-up under the GIL, which spreads a "simultaneous" burst over seconds)
_clients: dict[str, httpx.Client] = {}


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.popitem()[1].close()


def chat(gw: GatewayThread, tenant: str, content: str, max_tokens: int, **extra: Any) -> httpx.Response:
    client = _clients.get(gw.url)
    if client is None:
        client = _clients[gw.url] = httpx.Client(limits=httpx.Limits(max_connections=64))
    return client.post(gw.url + "/v1/chat/completions", timeout=120,
                      headers={"authorization": f"Bearer {KEYS[tenant]}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, **extra})


def burst(gw: GatewayThread, tenant: str, kind: str, start: int, n: int,
          stream: bool = False) -> None:
    """``n`` concurrent chats of ``tenant`` with prompts ``"<kind> <i>"``; all must succeed."""
    def one(i: int) -> None:
        r = chat(gw, tenant, f"{kind} {i}", 1000, stream=stream)
        assert r.status_code == 200, r.text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(start, start + n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture
def priority_gw(tmp_path: Path) -> Iterator[GatewayThread]:
    g = gateway(tmp_path, {"type": "priority", "parameters": {"aging_s": 60}},
                {"max_num_seqs": 1, "time_scale": 1.0},
                [{"name": "gold", "qos_class": "premium", "api_keys": [KEYS["gold"]]},
                 {"name": "bulk", "qos_class": "batch", "api_keys": [KEYS["bulk"]]}])
    yield g
    g.stop()


def test_premium_overtakes_queued_batch_under_priority(priority_gw: GatewayThread) -> None:
    gw = priority_gw
    finished: list[tuple[str, float]] = []
    lock = threading.Lock()

    def run(tenant: str, i: int) -> None:
        r = chat(gw, tenant, f"{tenant} request {i}", 60, ignore_eos=True)
        assert r.status_code == 200, r.text
        with lock:
            finished.append((tenant, time.monotonic()))

    threads = [threading.Thread(target=run, args=("bulk", i)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.3)  # the engine takes one request at a time: 4 batch requests now queue
    depth = gw.admin("GET", "/admin/scheduler").json()["queue_depth"]
    assert depth.get("bulk", 0) >= 3, depth
    gold = [threading.Thread(target=run, args=("gold", i)) for i in range(2)]
    for t in gold:
        t.start()
    for t in threads + gold:
        t.join()
    order = [name for name, _ in sorted(finished, key=lambda x: x[1])]
    # both premium requests arrived after every batch request but are served before the
    # batch requests still queued (at most the one running, plus one admitted meanwhile)
    assert order.index("gold") <= 2 and order[:4].count("gold") == 2, order


@pytest.fixture
def drift_gw(tmp_path: Path) -> Iterator[GatewayThread]:
    # the simulator learns each prompt's true output length from the workload file: prompts
    # "short i" produce 20 tokens, prompts "long i" produce 80 (a 4x drift)
    workload = tmp_path / "workload.jsonl"
    with workload.open("w") as f:
        for i in range(200):
            for kind, n in (("short", 20), ("long", 80)):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{kind} {i}"}],
                                    "output_tokens": n}) + "\n")
    # gate "none": a single tenant, so no class above it to be under SLO pressure (the SLO
    # gate has its tests in tests/test_drift_controller.py)
    # feasibility none: this test is about the drift controller alone
    g = gateway(tmp_path, {"type": "driftsched", "parameters": {
        "drift": {"gate": "none", "warmup_s": 0, "cooldown_s": 0}, "feasibility": "none"}},
                {"workload": str(workload), "time_scale": 4.0},
                [{"name": "drifty", "qos_class": "standard", "max_concurrency": 8,
                  "api_keys": [KEYS["drifty"]]}])
    yield g
    g.stop()


def test_drift_controller_throttles_a_drifting_tenant(drift_gw: GatewayThread) -> None:
    gw = drift_gw
    # the estimator learns this tenant's ~20-token outputs (20 completions of warm-up), then
    # the controller's baseline forms from 20 more (a baseline of a few noisy cold-start
    # samples is too uncertain to call a drift against)
    for b in range(6):
        burst(gw, "drifty", "short", b * 10, 10)
    before = gw.admin("GET", "/admin/scheduler").json()["drift"]["drifty"]
    assert before["decreases"] == 0 and before["limit"] == 8, before
    # outputs become 4x longer, for a burst that arrives at once (as under load: requests are
    # predicted when they arrive, so a queue full of them carries the stale prediction)
    burst(gw, "drifty", "long", 0, 40)
    view = gw.admin("GET", "/admin/scheduler").json()
    after = view["drift"]["drifty"]
    assert after["decreases"] >= 1, json.dumps(view)
    assert after["limit"] < 8, after
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'driftsched_tenant_concurrency_limit{tenant="drifty"}' in metrics
    assert 'driftsched_tenant_drift_ratio{tenant="drifty"}' in metrics


@pytest.fixture
def gated_gw(tmp_path: Path) -> Iterator[GatewayThread]:
    workload = tmp_path / "workload.jsonl"
    with workload.open("w") as f:
        for i in range(200):
            for kind, n in (("short", 20), ("long", 80), ("gold", 2)):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{kind} {i}"}],
                                    "output_tokens": n}) + "\n")
    # feasibility none: gold's impossible SLO must be missed by served requests, not shed
    g = gateway(tmp_path, {"type": "driftsched",
                           "parameters": {"drift": {"warmup_s": 0, "cooldown_s": 0},
                                          "feasibility": "none"}},
                {"workload": str(workload), "time_scale": 4.0},
                [{"name": "drifty", "qos_class": "standard", "max_concurrency": 8,
                  "api_keys": [KEYS["drifty"]]},
                 # a TTFT SLO no request can meet: gold's attainment is 0
                 {"name": "gold", "qos_class": "premium", "ttft_slo_ms": 0.001,
                  "api_keys": [KEYS["gold"]]}],
                scheduler={"slo_min_samples": 5})
    yield g
    g.stop()


def test_drift_throttles_only_while_a_higher_class_misses_its_slo(gated_gw: GatewayThread) -> None:
    """The SLO gate through the real path: gold's requests feed the rolling attainment, the
    gateway reports it to the drift controller, which then cuts the drifting tenant (and
    nobody before it drifts). Without pressure nothing is cut: the unit tests, and the
    ``overload`` experiment."""
    gw = gated_gw

    def view() -> dict[str, Any]:
        return dict(gw.admin("GET", "/admin/scheduler").json())

    for b in range(6):  # estimator warm-up, then the controller's baseline (above)
        burst(gw, "drifty", "short", b * 10, 10)
    v = view()
    assert v["drift"]["drifty"]["decreases"] == 0 and v["drift_pressure"] == [], v
    burst(gw, "gold", "gold", 0, 10, stream=True)  # premium misses every TTFT SLO
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and view()["drift_pressure"] != [0]:
        time.sleep(0.2)
    v = view()
    assert v["slo_attainment"]["0"]["attainment"] == 0.0 and v["drift_pressure"] == [0], v
    assert v["drift"]["drifty"]["decreases"] == 0  # pressure alone cuts nobody who is calm
    # the gauge shows it too, now: gold's misses age out of the window while the burst
    # below runs (on a loaded machine it can outlast the window)
    gauge = 'driftsched_class_slo_attainment{level="0"} 0.0'
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and gauge not in httpx.get(gw.url + "/metrics").text:
        time.sleep(0.2)
    assert gauge in httpx.get(gw.url + "/metrics").text
    burst(gw, "drifty", "long", 0, 40)  # 4x drift while premium suffers
    v = view()
    cut = v["drift"]["drifty"]
    assert cut["decreases"] >= 1 and cut["limit"] < 8 and cut["pressured"], json.dumps(v)
    assert cut["last_action"] in ("decrease", "slo_decrease")

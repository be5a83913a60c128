"""The gateway driving REAL vLLM (CPU) through the pool manager, with the official client.

One gateway and ONE launched engine for the module (the machine has 2 cores), configured as
docs/vllm-cpu.md recommends: the pool's ``env`` is :func:`vllm_env` and its ``args`` are
``TEST_SERVER_EXTRA_ARGS`` (priority scheduling, 32-token blocks, a KV cache shrunk to 128
blocks, 8 batch slots). The gateway is told ``max_num_seqs: 64`` and a KV budget of 4x the
cache, so that it forwards more than vLLM can hold: queueing, priority order and preemption
then happen inside vLLM, which is what these tests look at. The restart test runs last.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.config import settings_from_dict
from tests.harness import ADMIN_KEY, GatewayThread
from tests.vllm_cpu.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    NUM_BLOCKS,
    SERVED_NAME,
    TEST_SERVER_EXTRA_ARGS,
    vllm_env,
)

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]

PREM_KEY = "dsk-vllmpre0-" + "p" * 40
BAT_KEY = "dsk-vllmbat0-" + "b" * 40
USABLE_KV_TOKENS = (NUM_BLOCKS - 1) * BLOCK_SIZE  # vLLM reserves one block
START_TIMEOUT_S = float(os.environ.get("DRIFTSCHED_VLLM_START_TIMEOUT", "240"))


def pool_config(python: str, model: Path, logs: Path) -> dict[str, Any]:
    """The ``pool:`` section that runs vLLM-CPU here (also shown in docs/vllm-cpu.md)."""
    return {
        "engine": "vllm", "python": python, "model": str(model),
        "served_model_name": SERVED_NAME, "instances": 1, "log_dir": str(logs),
        "env": {**vllm_env(), "VLLM_CACHE_ROOT": str(logs / "vllm-cache")},
        "args": TEST_SERVER_EXTRA_ARGS,
        "max_num_seqs": 64,  # the gateway's view; vLLM keeps its --max-num-seqs 8
        "startup_timeout_s": START_TIMEOUT_S, "stop_grace_s": 15,
        "health_interval_s": 0.5, "scrape_interval_s": 0.5,
        "restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1},
    }  # fmt: skip


def backends(gw: GatewayThread) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = gw.admin("GET", "/admin/backends").json()
    return out


def wait_backend(gw: GatewayThread, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    b = backends(gw)[0]
    while time.monotonic() < deadline:
        b = backends(gw)[0]
        if pred(b):
            return b
        time.sleep(0.2)
    pytest.fail(f"{what} not reached within {timeout:.0f}s: {b}")


@pytest.fixture(scope="module")
def gw(vllm_python: str, tiny_model_dir: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    logs = tmp_path_factory.mktemp("vllm-pool")
    settings = settings_from_dict({
        "server": {"access_log": False, "auth_cache_ttl_s": 0},
        "admin": {"api_key": ADMIN_KEY},
        "store": {"type": "memory"},
        "scheduler": {"kv_budget_fraction": 4},
        "pool": pool_config(vllm_python, tiny_model_dir, logs),
        "tenants": [{"name": "prem", "qos_class": "premium", "api_keys": [PREM_KEY]},
                    {"name": "bat", "qos_class": "batch", "api_keys": [BAT_KEY]}],
    })
    t0 = time.monotonic()
    g = GatewayThread(settings, ready_timeout=START_TIMEOUT_S)
    try:
        wait_backend(g, lambda b: b["kv_capacity_tokens"] is not None, 30, "first scrape")
    except BaseException:
        g.stop()
        raise
    print(f"\n[vllm_cpu] gateway + vLLM engine ready in {time.monotonic() - t0:.1f}s")
    yield g
    g.stop()


def sdk(gw: GatewayThread, key: str = PREM_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)


def msg(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_backend_view_of_a_launched_vllm_engine(gw: GatewayThread) -> None:
    assert [m.id for m in sdk(gw).models.list().data] == [SERVED_NAME]
    b = backends(gw)[0]
    assert b["name"] == "vllm-0" and b["kind"] == "vllm" and b["state"] == "healthy"
    assert b["pid"] and Path(b["log_path"]).exists()
    assert "vllm.entrypoints.openai.api_server" in Path(b["log_path"]).read_text()[:2000]
    assert b["supports_priority"] is True  # --scheduling-policy priority in pool.args
    assert b["max_num_seqs"] == 64
    # from vllm:cache_config_info: (num_gpu_blocks - 1) * block_size
    assert b["kv_capacity_tokens"] == USABLE_KV_TOKENS
    assert b["metrics"]["age_s"] is not None and b["metrics"]["age_s"] < 5


def test_non_streaming_usage(gw: GatewayThread) -> None:
    r = sdk(gw).chat.completions.create(model=SERVED_NAME, messages=msg("hello there"),
                                        max_tokens=25, extra_body={"ignore_eos": True})
    assert r.model == SERVED_NAME and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 25
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 25
    c = sdk(gw).completions.create(model=SERVED_NAME, prompt="once upon a time", max_tokens=7,
                                   extra_body={"ignore_eos": True})
    assert c.usage is not None and c.usage.completion_tokens == 7


def test_streaming_with_usage(gw: GatewayThread) -> None:
    t0 = time.monotonic()
    arrivals: list[float] = []
    usage = None
    token_ids = 0
    for chunk in sdk(gw).chat.completions.create(
            model=SERVED_NAME, messages=msg("tell me a story"), stream=True, max_tokens=150,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True}):
        if chunk.choices:
            arrivals.append(time.monotonic() - t0)
            token_ids += len(getattr(chunk.choices[0], "token_ids", None) or [])
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 150 and usage.prompt_tokens > 0
    assert token_ids == 150
    assert len(arrivals) > 10 and arrivals[0] < arrivals[-1], arrivals[:3]


def test_gateway_counts_with_the_model_directory_tokenizer(gw: GatewayThread) -> None:
    """A vllm pool counts prompt tokens with its model directory's tokenizer.json (no config):
    the gateway refuses a request past the context length at vLLM's own boundary."""
    text = "今天天气很好。Schedulers keep queues short. " * 20
    r = sdk(gw).chat.completions.create(model=SERVED_NAME, messages=msg(text), max_tokens=1)
    assert r.usage is not None
    n = r.usage.prompt_tokens
    # exactly the context length: past the gateway and taken by vLLM (the first chunk is
    # enough; closing the stream cancels the rest)
    with sdk(gw).chat.completions.create(model=SERVED_NAME, messages=msg(text), stream=True,
                                         max_tokens=MAX_MODEL_LEN - n) as stream:
        assert next(iter(stream)).choices is not None
    with pytest.raises(openai.BadRequestError) as e:
        sdk(gw).chat.completions.create(model=SERVED_NAME, messages=msg(text),
                                        max_tokens=MAX_MODEL_LEN - n + 1)
    assert e.value.code == "context_length_exceeded"
    assert f"({n} in the messages" in e.value.message  # the gateway's refusal, its count


def _priority_round(gw: GatewayThread) -> tuple[dict[str, float], dict[str, float],
                                                 dict[str, float]]:
    """One round of :func:`test_priority_is_passed_as_class_level`: (first token, sent,
    done) times per request tag."""
    first: dict[str, float] = {}
    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    errors: list[BaseException] = []
    started = threading.Semaphore(0)

    def run(tag: str, key: str, max_tokens: int) -> None:
        try:
            sent[tag] = time.monotonic()
            for chunk in sdk(gw, key).chat.completions.create(
                    model=SERVED_NAME, messages=msg(f"request {tag} please"), stream=True,
                    max_tokens=max_tokens, extra_body={"ignore_eos": True}):
                if chunk.choices and tag not in first:
                    first[tag] = time.monotonic()
                    started.release()
            done[tag] = time.monotonic()
        except BaseException as e:
            errors.append(e)

    # one short filler frees the first slot; the seven long ones free theirs 100 tokens later
    fillers = [threading.Thread(target=run, args=(f"fill{i}", PREM_KEY, 300 if i == 0 else 400))
               for i in range(8)]
    for t in fillers:
        t.start()
    for _ in fillers:
        assert started.acquire(timeout=60), f"fillers did not start: {first} {errors}"
    low = threading.Thread(target=run, args=("low", BAT_KEY, 60))
    high = threading.Thread(target=run, args=("high", PREM_KEY, 60))
    low.start()
    time.sleep(0.05)
    high.start()
    for t in [*fillers, low, high]:
        t.join(180)
    assert not errors, errors
    return first, sent, done


def test_priority_is_passed_as_class_level(gw: GatewayThread) -> None:
    """All 8 vLLM slots busy; a batch request, then a premium one (60 tokens each) wait *in
    vLLM* (the gateway, told 64 slots, admits both at once). The gateway adds ``priority`` 2
    and 0. Exactly one slot frees first (the short filler). vLLM's priority scheduler must
    give it to the premium request, though the batch one arrived earlier, and the batch one
    must wait for the next slot: the premium one's, 60 tokens later, before the long fillers
    end (FCFS: the other way round, as far apart). The fillers fit the 4096-token KV cache
    together, so no preemption frees a slot early. Checked: with ``pass_priority: false``
    this test fails.

    Valid only if both requests reached vLLM before the first slot freed: a round where the
    premium request was sent less than 0.3 s before the short filler ended (a slow machine)
    is run again, up to three times."""
    for _ in range(3):
        first, sent, done = _priority_round(gw)
        rel = {k: round(v - first["fill0"], 3) for k, v in first.items()}
        if done["fill0"] - sent["high"] < 0.3:
            continue
        assert first["high"] < first["low"], rel
        # the batch request waited for the next slot, which the premium one freed (0.1 s:
        # client-side observation jitter), not merely for the next engine step
        assert first["low"] > done["high"] - 0.1, (round(done["high"] - first["fill0"], 3), rel)
        return
    pytest.fail(f"the premium request never reached vLLM well before the first slot freed: "
                f"{round(done['fill0'] - sent['high'], 3)} s")


def test_preemption_under_a_small_kv_cache_shows_in_backends(gw: GatewayThread) -> None:
    """8 x (~10 + 600) tokens need ~160 blocks of 32; vLLM has 127: it preempts."""
    before = backends(gw)[0]["metrics"]["num_preemptions_total"]
    results: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            r = sdk(gw, BAT_KEY).chat.completions.create(
                model=SERVED_NAME, messages=msg(f"distinct prompt number {i} for kv"),
                max_tokens=600, extra_body={"ignore_eos": True})
            assert r.usage is not None
            results.append(r.usage.completion_tokens)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    peak_usage = peak_running = 0.0
    while any(t.is_alive() for t in threads):
        m = backends(gw)[0]["metrics"]
        peak_usage = max(peak_usage, m["kv_cache_usage_perc"])
        peak_running = max(peak_running, m["num_requests_running"])
        time.sleep(0.2)
    assert not errors, errors
    assert results == [600] * 8  # preempted requests are recomputed, not cut short
    b = wait_backend(gw, lambda b: b["metrics"]["num_preemptions_total"] > before, 10,
                     "a scraped preemption")
    assert peak_usage > 0.5 and peak_running >= 2, (peak_usage, peak_running)
    assert b["in_flight"] == 0


@pytest.mark.timeout(START_TIMEOUT_S + 120, func_only=True)
def test_kill_9_of_the_engine_fails_in_flight_cleanly_and_restarts_it(gw: GatewayThread) -> None:
    victim = backends(gw)[0]
    errors: dict[str, BaseException] = {}
    streaming = threading.Event()

    def stream() -> None:
        try:
            for _ in sdk(gw).chat.completions.create(
                    model=SERVED_NAME, messages=msg("a long one"), stream=True, max_tokens=900,
                    extra_body={"ignore_eos": True}):
                streaming.set()
        except BaseException as e:
            errors["stream"] = e

    def plain() -> None:
        try:
            sdk(gw).chat.completions.create(model=SERVED_NAME, messages=msg("another long one"),
                                            max_tokens=900, extra_body={"ignore_eos": True})
        except BaseException as e:
            errors["plain"] = e

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    assert streaming.wait(60)
    os.kill(victim["pid"], 9)  # the API server, leader of the engine's process group
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client hung after its engine died"
    assert isinstance(errors.get("stream"), openai.APIError), errors
    plain_err = errors.get("plain")
    assert isinstance(plain_err, openai.APIStatusError), errors
    assert plain_err.status_code in (502, 503), plain_err
    b = wait_backend(gw, lambda b: b["state"] == "healthy" and b["pid"] not in (None, victim["pid"]),
                     START_TIMEOUT_S, "a restarted healthy engine")
    assert b["restarts"] >= 1 and b["in_flight"] == 0
    with pytest.raises(ProcessLookupError):  # nothing of the old group is left (EngineCore)
        os.killpg(victim["pid"], 0)
    r = sdk(gw).chat.completions.create(model=SERVED_NAME, messages=msg("back again?"),
                                        max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 5

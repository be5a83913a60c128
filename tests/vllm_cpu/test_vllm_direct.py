"""Real vLLM 0.32 (CPU) serving the tiny model, driven directly over HTTP (no gateway yet).

These pin down the engine behaviours DriftSched relies on — OpenAI shapes, usage, exact
``max_tokens`` with ``ignore_eos``, ``priority`` under ``--scheduling-policy priority``, the
``/metrics`` names the scraper reads, and a real preemption when the KV cache is too small —
so that a vLLM upgrade that changes any of them fails here first. One server for the whole
module (see conftest.py for its flags); every test leaves it idle.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.vllm_cpu.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    NUM_BLOCKS,
    SERVED_NAME,
    VllmServer,
)

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]

LABELS = {"engine": "0", "model_name": SERVED_NAME}
COUNTER = "vllm:num_preemptions_total"


def chat_body(content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "ignore_eos": True, **extra}


def scrape(base_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """All samples by sample name (so counters appear as ``..._total``)."""
    text = httpx.get(base_url + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    (labels, v), = samples[name]
    assert labels == LABELS, (name, labels)
    return v


async def wait_idle(base_url: str) -> None:
    """Until vLLM's own gauges say nothing runs or waits (they lag a step or so)."""
    deadline = time.monotonic() + 30.0
    while True:
        m = await asyncio.to_thread(scrape, base_url)
        if value(m, "vllm:num_requests_running") == 0 and value(m, "vllm:num_requests_waiting") == 0:
            return
        assert time.monotonic() < deadline, "vLLM did not go idle"
        await asyncio.sleep(0.2)


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any],
                      marks: dict[str, float] | None = None) -> dict[str, Any]:
    """Stream one chat completion; return token ids, usage, finish_reason, timings."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    t0 = time.monotonic()
    res: dict[str, Any] = {"token_ids": [], "usage": None, "finish_reason": None,
                           "first_token_at": None, "chunks": 0, "text": ""}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            d = json.loads(line[len("data: "):])
            res["chunks"] += 1
            if d.get("usage"):
                res["usage"] = d["usage"]
            for ch in d.get("choices", []):
                ids = ch.get("token_ids") or []
                if ids and res["first_token_at"] is None:
                    res["first_token_at"] = time.monotonic()
                    if marks is not None:
                        marks.setdefault("first", time.monotonic())
                res["token_ids"].extend(ids)
                res["text"] += ch.get("delta", {}).get("content") or ""
                if ch.get("finish_reason"):
                    res["finish_reason"] = ch["finish_reason"]
        assert done, "stream ended without [DONE]"
    res["done_at"] = time.monotonic()
    res["elapsed"] = res["done_at"] - t0
    return res


@pytest.fixture
async def client(vllm_server: VllmServer) -> Any:
    async with httpx.AsyncClient(base_url=vllm_server.base_url, timeout=120, trust_env=False) as c:
        yield c


async def test_models_version_and_health(vllm_server: VllmServer, client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/version")).json()["version"] == "0.32.0"
    models = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == [SERVED_NAME]
    assert models[0]["max_model_len"] == MAX_MODEL_LEN


async def test_chat_non_streaming_usage_and_exact_max_tokens(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "Hello world, please tell me about the queue."}]
    r = await client.post("/v1/chat/completions", json={
        "model": SERVED_NAME, "messages": messages, "max_tokens": 37, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 37
    assert usage["total_tokens"] == usage["prompt_tokens"] + 37
    # prompt_tokens is the chat template rendered and tokenized, exactly as /tokenize says.
    tok = (await client.post("/tokenize", json={"model": SERVED_NAME, "messages": messages,
                                                "add_generation_prompt": True})).json()
    assert usage["prompt_tokens"] == tok["count"] > 0


@pytest.mark.parametrize("max_tokens", [1, 25, 200])
async def test_chat_streaming_exact_tokens_and_usage(client: httpx.AsyncClient, max_tokens: int) -> None:
    res = await stream_chat(client, chat_body("Tell me about batching.", max_tokens))
    assert len(res["token_ids"]) == max_tokens
    assert res["finish_reason"] == "length"
    assert res["usage"]["completion_tokens"] == max_tokens
    assert res["usage"]["total_tokens"] == res["usage"]["prompt_tokens"] + max_tokens


async def test_completions_exact_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={
        "model": SERVED_NAME, "prompt": "The engine", "max_tokens": 9, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 9
    assert r.json()["choices"][0]["finish_reason"] == "length"


TOKEN_PROMPTS = [
    [{"role": "user", "content": "Hello world, please tell me about the queue."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "今天天气很好。人工智能正在改变世界。" * 8}],
    [{"role": "user", "content": "def f(x):\n    return {k: v for k, v in x.items()}\n" * 6},
     {"role": "assistant", "content": "It copies a dict."},
     {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "why?"}]}],
]


@pytest.mark.parametrize("i", range(len(TOKEN_PROMPTS)), ids=["english", "cjk", "code"])
async def test_gateway_counter_equals_vllm_prompt_tokens(vllm_server: VllmServer,
                                                          client: httpx.AsyncClient, i: int) -> None:
    """adapters/tokens.py with the model directory's tokenizer.json and chat template counts
    what vLLM reports, chat (the template's overhead measured, not assumed) and completions."""
    pytest.importorskip("tokenizers")
    from adapters.tokenizer_file import load_counter

    counter = load_counter(str(vllm_server.model_dir))
    messages = TOKEN_PROMPTS[i]
    r = await client.post("/v1/chat/completions", json={
        "model": SERVED_NAME, "messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert counter.count_chat(messages) == r.json()["usage"]["prompt_tokens"]
    prompt = str(messages[-1]["content"])
    r = await client.post("/v1/completions", json={
        "model": SERVED_NAME, "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert counter.count_prompt(prompt) == r.json()["usage"]["prompt_tokens"]


async def test_metrics_names_and_labels(vllm_server: VllmServer, client: httpx.AsyncClient) -> None:
    await wait_idle(vllm_server.base_url)
    m = await asyncio.to_thread(scrape, vllm_server.base_url)
    assert value(m, "vllm:num_requests_running") == 0.0
    assert value(m, "vllm:num_requests_waiting") == 0.0
    assert 0.0 <= value(m, "vllm:kv_cache_usage_perc") <= 1.0  # a fraction, not a percent
    assert value(m, COUNTER) >= 0.0
    assert "vllm:gpu_cache_usage_perc" not in m  # renamed to kv_cache_usage_perc
    # The KV-cache geometry is published as labels of an info gauge: capacity in tokens is
    # num_gpu_blocks * block_size (also kv_cache_size_tokens before the override applies).
    (info, _), = m["vllm:cache_config_info"]
    assert int(info["num_gpu_blocks"]) == NUM_BLOCKS
    assert int(info["block_size"]) == BLOCK_SIZE
    assert info["num_gpu_blocks_override"] == str(NUM_BLOCKS)
    # Token counters move with traffic.
    before = value(m, "vllm:generation_tokens_total")
    await client.post("/v1/chat/completions", json=chat_body("hi", 7))
    after = value(await asyncio.to_thread(scrape, vllm_server.base_url), "vllm:generation_tokens_total")
    assert after - before == 7


async def test_priority_field_orders_the_queue(vllm_server: VllmServer, client: httpx.AsyncClient) -> None:
    """Fill all MAX_NUM_SEQS slots, queue a low-priority request, then a high-priority one:
    with --scheduling-policy priority (lower value first) the later, high-priority request
    gets a slot, and its first token, before the low-priority one (FCFS would do the
    opposite).

    The blockers have staggered lengths (300..370 tokens), so slots free up one at a time
    (equal blockers would free all 8 in one step and admit both extra requests in the same
    step), and the first one frees only after >= 300 decode steps, long after "low" and
    "high" (sent 0.1 s apart) are queued. They fit in the KV cache (<= 12 blocks each, 88
    in all, of 127), so nothing is preempted. /metrics is not polled to check the queue:
    under load one scrape takes 0.2-0.5 s."""
    blocker_tokens = [300 + 10 * i for i in range(MAX_NUM_SEQS)]
    await wait_idle(vllm_server.base_url)
    preempt0 = value(await asyncio.to_thread(scrape, vllm_server.base_url), COUNTER)
    marks = [dict[str, float]() for _ in range(MAX_NUM_SEQS)]
    blockers = [asyncio.create_task(stream_chat(
        client, chat_body(f"blocker {i}", blocker_tokens[i], priority=0), marks[i]))
        for i in range(MAX_NUM_SEQS)]
    deadline = time.monotonic() + 120
    while not all("first" in mk for mk in marks):
        assert time.monotonic() < deadline, "blockers never started"
        await asyncio.sleep(0.005)
    all_running_at = time.monotonic()
    low_marks: dict[str, float] = {}
    high_marks: dict[str, float] = {}
    low = asyncio.create_task(stream_chat(client, chat_body("low", 5, priority=10), low_marks))
    await asyncio.sleep(0.1)
    high = asyncio.create_task(stream_chat(client, chat_body("high", 5, priority=-10), high_marks))
    high_sent_at = time.monotonic()
    results = await asyncio.gather(*blockers, low, high)
    assert [len(r["token_ids"]) for r in results[:MAX_NUM_SEQS]] == blocker_tokens
    assert len(results[-2]["token_ids"]) == len(results[-1]["token_ids"]) == 5
    preempted = value(await asyncio.to_thread(scrape, vllm_server.base_url), COUNTER) - preempt0
    assert preempted == 0, "the blockers were meant to fit in the KV cache"
    first_blocker_done = min(r["done_at"] for r in results[:MAX_NUM_SEQS])
    assert high_marks["first"] < low_marks["first"], (
        f"low before high: high sent {high_sent_at - all_running_at:.3f}s after the blockers "
        f"all ran; marks high={high_marks} low={low_marks}; first blocker done (as seen "
        f"by the client) at {first_blocker_done - all_running_at:.3f}s")
    print(f"\n[vllm_cpu] priority: high first by "
          f"{(low_marks['first'] - high_marks['first']) * 1000:.0f} ms")


async def test_real_preemption_with_shrunken_kv_cache(vllm_server: VllmServer,
                                                      client: httpx.AsyncClient) -> None:
    """8 concurrent requests that each grow to 20 blocks need 160 blocks; the cache has 127.
    vLLM must preempt (by recompute) some of them, count it in vllm:num_preemptions_total,
    and still deliver every token."""
    await wait_idle(vllm_server.base_url)
    before = value(await asyncio.to_thread(scrape, vllm_server.base_url), COUNTER)
    n_out = 600
    peak = {"kv": 0.0, "waiting": 0.0, "running": 0.0}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            m = await asyncio.to_thread(scrape, vllm_server.base_url)
            peak["kv"] = max(peak["kv"], value(m, "vllm:kv_cache_usage_perc"))
            peak["waiting"] = max(peak["waiting"], value(m, "vllm:num_requests_waiting"))
            peak["running"] = max(peak["running"], value(m, "vllm:num_requests_running"))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    t0 = time.monotonic()
    results = await asyncio.gather(*[
        stream_chat(client, chat_body(f"request number {i} about memory", n_out))
        for i in range(MAX_NUM_SEQS)])
    elapsed = time.monotonic() - t0
    stop.set()
    await watcher
    await wait_idle(vllm_server.base_url)
    m = await asyncio.to_thread(scrape, vllm_server.base_url)
    preempted = value(m, COUNTER) - before
    print(f"\n[vllm_cpu] preemption run: {MAX_NUM_SEQS}x{n_out} tokens in {elapsed:.1f}s, "
          f"{preempted:.0f} preemptions, peaks {peak}")
    assert all(len(r["token_ids"]) == n_out for r in results)
    assert all(r["usage"]["completion_tokens"] == n_out for r in results)
    assert preempted >= 1
    assert peak["kv"] > 0.5
    # Per-request preemption counts are also exported, as a histogram.
    assert m["vllm:request_num_preemptions_count"][0][1] >= MAX_NUM_SEQS


async def test_throughput_1_and_8_streams(vllm_server: VllmServer, client: httpx.AsyncClient,
                                          record_property: Any) -> None:
    """Informational (printed, recorded as junit properties); asserts only a sane floor.
    The machine is shared: expect wide variation (see docs/vllm-cpu.md)."""
    # 8 x (prompt + 200) tokens = 8 x 7 blocks: fits in the cache, so no preemption here.
    for conc, n_out in ((1, 200), (8, 200)):
        await wait_idle(vllm_server.base_url)
        t0 = time.monotonic()
        results = await asyncio.gather(*[stream_chat(client, chat_body(f"speed {i}", n_out))
                                         for i in range(conc)])
        wall = time.monotonic() - t0
        tokens = sum(len(r["token_ids"]) for r in results)
        ttfts = sorted(r["first_token_at"] - t0 for r in results)
        rate = tokens / wall
        print(f"\n[vllm_cpu] {conc} stream(s): {tokens} tokens in {wall:.2f}s = {rate:.0f} tok/s, "
              f"median TTFT {ttfts[len(ttfts) // 2] * 1000:.0f} ms")
        record_property(f"tok_per_s_{conc}_streams", round(rate, 1))
        assert tokens == conc * n_out
        assert rate > 5, "tiny model under 5 tok/s: something is badly wrong"

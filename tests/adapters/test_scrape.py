"""Prometheus text parsing into EngineMetrics, and the scrape over real HTTP."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import httpx
import pytest

from adapters.scrape import MetricsNotExported, parse_metrics, parse_samples, scrape
from tests.conftest import free_port
from tests.harness import Proc

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="2048"} 1.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 12.0
"""


def test_sums_across_label_sets_and_averages_usage() -> None:
    s = parse_metrics(VLLM_TEXT, now=42.0)
    m = s.metrics
    assert m.num_requests_running == 5.0
    assert m.num_requests_waiting == 4.0
    assert m.kv_cache_usage_perc == 0.375
    assert m.num_preemptions_total == 7.0
    assert m.scraped_at == 42.0
    assert s.kv_capacity_tokens == (2048 - 1) * 16  # one block is vLLM's null block


def test_missing_metrics_read_as_zero() -> None:
    s = parse_metrics("# nothing here\nprocess_cpu_seconds_total 1.5\n", now=1.0)
    assert s.metrics.num_requests_running == 0.0
    assert s.metrics.kv_cache_usage_perc == 0.0
    assert s.metrics.num_preemptions_total == 0.0
    assert s.kv_capacity_tokens is None


def test_old_gpu_cache_name_only_as_fallback() -> None:
    old = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.8\n'
    assert parse_metrics(old, now=1).metrics.kv_cache_usage_perc == 0.8
    both = old + 'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n'
    assert parse_metrics(both, now=1).metrics.kv_cache_usage_perc == 0.1


def test_tolerates_odd_lines_and_label_values() -> None:
    text = (
        'vllm:num_requests_running{model_name="a b}c",path="x\\"y"} 2 1700000000000\n'
        "garbage line without value\n"
        "vllm:num_requests_waiting{unterminated 3\n"
        "vllm:num_requests_waiting NaN\n"
        "vllm:num_requests_waiting 1\n"
    )
    samples = parse_samples(text)
    assert samples[0].labels == {"model_name": "a b}c", "path": 'x"y'}
    m = parse_metrics(text, now=1).metrics
    assert m.num_requests_running == 2.0
    assert m.num_requests_waiting == 1.0
    assert not math.isnan(m.kv_cache_usage_perc)


async def test_scrape_over_http() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics" and request.url.host == "engine":
            return httpx.Response(200, text=VLLM_TEXT)
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        s = await scrape(client, "http://engine")
        assert s.metrics.num_requests_running == 5.0
        assert s.metrics.scraped_at > 0
        with pytest.raises(MetricsNotExported):
            await scrape(client, "http://other")


def test_only_exact_names_are_read() -> None:
    # names that merely start with a read name are other metrics, whatever comes first
    text = (
        "vllm:num_requests_running_max 99\n"
        "vllm:num_requests_running{engine=\"0\"} 2\n"
        "vllm:num_preemptions_created 1.7e9\n"
        "vllm:num_preemptions_total 3\n"
        "\tvllm:num_requests_waiting 4\n"  # leading blanks are allowed by the text format
    )
    m = parse_metrics(text, now=1).metrics
    assert m.num_requests_running == 2.0
    assert m.num_preemptions_total == 3.0
    assert m.num_requests_waiting == 4.0


def test_parse_metrics_equals_a_fold_of_every_sample_of_a_simulator(tmp_path: Path) -> None:
    """The name filter in front of the library loses nothing on a real simulator's text."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sim = Proc([sys.executable, "-m", "adapters.sim", "--host", "127.0.0.1", "--port", str(port),
                "--model", "m", "--log-level", "warning"], url + "/health", tmp_path / "sim.log")
    try:
        for n in (3, 5, 7):
            httpx.post(url + "/v1/chat/completions", timeout=30, json={
                "model": "m", "max_tokens": n, "messages": [{"role": "user", "content": "hi"}],
            }).raise_for_status()
        text = httpx.get(url + "/metrics").text
    finally:
        sim.stop()
    every = parse_samples(text)
    assert any(s.name.endswith("_bucket") for s in every)  # histograms were parsed too
    want = {s.name: s.value for s in every if s.labels.get("model_name") == "m"}
    s = parse_metrics(text, now=1.0)
    assert s.metrics.generation_tokens_total == want["vllm:generation_tokens_total"] == 15.0
    assert s.metrics.num_requests_running == want["vllm:num_requests_running"] == 0.0
    assert s.metrics.kv_cache_usage_perc == want["vllm:kv_cache_usage_perc"]
    assert s.metrics.num_preemptions_total == want["vllm:num_preemptions_total"]
    (info,) = [x for x in every if x.name == "vllm:cache_config_info"]
    blocks, block = int(info.labels["num_gpu_blocks"]), int(info.labels["block_size"])
    assert s.kv_capacity_tokens == (blocks - 1) * block

"""The simulator as a real process on a loopback port, driven with the official openai client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from adapters.sim.workload import prompt_key
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

MODEL = "sim-llama"
KNOWN_CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]
KNOWN_PROMPT = "Once upon a time"


@contextmanager
def sim_server(*args: str) -> Iterator[str]:
    """Start ``python -m adapters.sim`` and yield its base URL; SIGTERM it afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapters.sim",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            MODEL,
            "--log-level",
            "warning",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0].decode()
                pytest.fail(f"simulator did not start (rc={proc.poll()}):\n{out}")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out = proc.stdout.read().decode() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
        assert rc == 0, out


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "workload.jsonl"
    rows = [
        {"messages": KNOWN_CHAT, "output_tokens": 7, "tenant": "ignored"},
        {"prompt": KNOWN_PROMPT, "output_tokens": 4},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def server(workload: Path) -> Iterator[str]:
    with sim_server("--workload", str(workload), "--max-model-len", "4096") as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as c:
        yield c


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_and_models(server: str, client: openai.OpenAI) -> None:
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200 and r.content == b""
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "vllm"
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["max_model_len"] == 4096


def test_chat_non_streaming_max_tokens_and_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x" * 40}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (17, 5, 22)
    assert r.id.startswith("chatcmpl-")


def test_workload_lookup_gives_the_true_length_and_max_tokens_caps_it(
    client: openai.OpenAI,
) -> None:
    r = client.chat.completions.create(model=MODEL, messages=KNOWN_CHAT)
    assert r.usage is not None and r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "stop"
    capped = client.chat.completions.create(
        model=MODEL, messages=KNOWN_CHAT, max_completion_tokens=3
    )
    assert capped.usage is not None and capped.usage.completion_tokens == 3
    assert capped.choices[0].finish_reason == "length"
    c = client.completions.create(model=MODEL, prompt=KNOWN_PROMPT)
    assert c.usage is not None and c.usage.completion_tokens == 4
    assert c.choices[0].text == " tok" * 4 and c.choices[0].finish_reason == "stop"
    assert prompt_key(KNOWN_CHAT) != prompt_key(KNOWN_PROMPT)


def test_chat_stream_arrives_over_time_with_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    arrivals, chunks = [], []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.completion_tokens, last.usage.prompt_tokens) == (12, 9)
    # ~13 ms per decode step at time-scale 1: the chunks are spread over >= ~140 ms
    assert arrivals[-1] - arrivals[1] > 0.08


def test_completions_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="abc", max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == " tok" * 3
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" for c in chunks)


def test_openai_shaped_errors(server: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "nope" in nf.value.message
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="y" * (4 * 5000))
    assert "maximum context length" in long.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="y", max_tokens=5000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=2
        )
    with pytest.raises(openai.BadRequestError):  # vLLM refuses priority unless policy=priority
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"priority": 3}
        )
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": "nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_metrics_names_and_disconnect_aborts(server: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        assert metric(server, "vllm:num_requests_running") == 1
        assert metric(server, "vllm:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 5
    while metric(server, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "disconnected request still running"
        time.sleep(0.05)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
    ):
        assert f"{name}{{" in text, name
    assert f'model_name="{MODEL}"' in text


def test_time_scale_and_priority_policy() -> None:
    with (
        sim_server(
            "--time-scale",
            "10",
            "--scheduling-policy",
            "priority",
            "--max-num-seqs",
            "1",
            "--tokens-per-event",
            "8",
        ) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client,
    ):
        t0 = time.monotonic()
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=100,
            stream=True,
            extra_body={"ignore_eos": True, "priority": 2},
        )
        events = [c for c in stream if c.choices and c.choices[0].delta.content]
        wall = time.monotonic() - t0
        # first token alone, then groups of 8: 1 + 8*12 + 3
        assert [len((c.choices[0].delta.content or "").split()) for c in events] == [1] + [
            8
        ] * 12 + [3]
        e2e = metric(url, "vllm:e2e_request_latency_seconds_sum")
        # 100 steps of ~13 ms simulated = ~1.3 s simulated, ~0.13 s of wall time
        assert 1.2 < e2e < 6.0  # upper bound loose: a busy machine adds lag
        assert wall < e2e / 3


def test_kv_pressure_preempts_and_every_request_still_completes() -> None:
    with (
        sim_server("--kv-capacity-tokens", "256", "--time-scale", "20") as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client,
    ):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 256

        def one(i: int) -> int:
            r = client.completions.create(
                model=MODEL,
                prompt=f"{i:03d}" + "p" * 157,
                max_tokens=60,
                extra_body={"ignore_eos": True},
            )
            assert r.usage is not None
            return r.usage.completion_tokens

        with ThreadPoolExecutor(4) as pool:  # 4 x (40 + 60) tokens > 256: must preempt
            assert list(pool.map(one, range(4))) == [60] * 4
        assert metric(url, "vllm:num_preemptions_total") > 0
        assert metric(url, "vllm:kv_cache_usage_perc") == 0

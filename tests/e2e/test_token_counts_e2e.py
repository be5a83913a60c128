"""Real token counts end to end: a gateway over loopback whose pool launches a simulator
engine with the same tokenizer.json (``pool.tokenizer``): the engine's ``usage.prompt_tokens``
equals vLLM's computation for that tokenizer, and the gateway refuses a request for its
context length exactly where the engine would (so its own count is the same number)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import GatewayThread, make_settings
from tests.tokenizer_builder import build_tokenizer_dir, reference_count

pytest.importorskip("tokenizers")
pytestmark = [pytest.mark.e2e]

MODEL = "sim-tok"
KEY = "dsk-tokcount-" + "t" * 40
MAX_MODEL_LEN = 2048
PROMPTS = [
    "Hello there, how are you?",
    "今天天气很好, 我们去公园散步吧。人工智能正在改变世界。" * 6,
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 5,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def gw(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    settings = make_settings(
        pool={
            "engine": "sim", "model": MODEL, "instances": 1, "tokenizer": str(tok_dir),
            "log_dir": str(tmp_path_factory.mktemp("engines")), "health_interval_s": 0.2,
            "scrape_interval_s": 0.2, "stop_grace_s": 3,
            "sim": {"time_scale": 50.0}, "args": ["--max-model-len", str(MAX_MODEL_LEN)],
        },
        tenants=[{"name": "t", "api_keys": [KEY]}],
    )
    g = GatewayThread(settings, ready_timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the engine up and its max_model_len read
        models = httpx.get(g.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"})
        backends = g.admin("GET", "/admin/backends").json()
        if models.status_code == 200 and all(b["state"] == "healthy" for b in backends):
            break
        time.sleep(0.1)
    yield g
    g.stop()


def chat(gw: GatewayThread, content: str, max_tokens: int) -> httpx.Response:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize("prompt", PROMPTS, ids=["english", "cjk", "code"])
def test_engine_usage_is_vllms_count_and_the_gateway_refuses_at_the_same_boundary(
        gw: GatewayThread, tok_dir: Path, prompt: str) -> None:
    messages = [{"role": "user", "content": prompt}]
    expected = reference_count(tok_dir, messages)
    ok = chat(gw, prompt, 1)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == expected

    fits = chat(gw, prompt, MAX_MODEL_LEN - expected)  # exactly the context length
    assert fits.status_code == 200, fits.text
    over = chat(gw, prompt, MAX_MODEL_LEN - expected + 1)
    assert over.status_code == 400
    err = over.json()["error"]
    # refused by the gateway itself (its message, not the engine's), with the real count
    assert err["code"] == "context_length_exceeded", err
    assert "you requested" in err["message"] and f"({expected} in the messages" in err["message"]

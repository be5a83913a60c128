"""The gateway's per-model counters (proxy/tokens.py): a configured tokenizer recounts the
request, a model without one keeps the heuristic, a tokenizer that cannot load falls back
(the gateway runs without the `tokenizers` package), and the counting thread batches."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from adapters.tokens import HEURISTIC, TokenCounter
from proxy.requests import parse_request
from proxy.tokens import CountingThread, PromptTokens
from tests.harness import make_settings
from tests.tokenizer_builder import build_tokenizer_dir, reference_count

pytest.importorskip("tokenizers")

CJK = "今天天气很好。人工智能正在改变世界。" * 30  # past inline_chars: counted in the thread


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


def tokens_for(tok_dir: Path | str) -> PromptTokens:
    return PromptTokens(make_settings(upstreams=[
        {"name": "a", "url": "http://127.0.0.1:9", "models": ["m"], "tokenizer": str(tok_dir)},
        {"name": "b", "url": "http://127.0.0.1:9", "models": ["plain"]}]))


def chat(model: str, content: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


async def test_configured_model_is_recounted_other_models_keep_the_heuristic(tok_dir: Path) -> None:
    tokens = tokens_for(tok_dir)
    req = parse_request("chat", chat("m", CJK))
    assert req.prompt_tokens == HEURISTIC.count_chat(req.source)
    counted = await tokens.count(req)
    assert counted.prompt_tokens == reference_count(tok_dir, req.source) != req.prompt_tokens
    other = parse_request("chat", chat("plain", CJK))
    assert (await tokens.count(other)) is other


async def test_unloadable_tokenizer_falls_back_and_never_fails_a_request(
        tok_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    tokens = tokens_for(tok_dir)
    req = parse_request("chat", chat("m", CJK))
    assert (await tokens.count(req)).prompt_tokens == req.prompt_tokens
    assert (await tokens.counter("m")) is HEURISTIC
    assert "driftsched[tokenizers]" in caplog.text


async def test_counting_thread_batches_waiters_and_hands_back_errors() -> None:
    batches: list[int] = []

    def encode(texts: Sequence[str]) -> list[int]:
        batches.append(len(texts))
        if any(t.startswith("boom") for t in texts):
            raise ValueError("bad text")
        return [len(t) for t in texts]

    thread = CountingThread(idle_s=0.2)
    counter = TokenCounter("len", encode, inline_chars=0)
    texts = [f"text {i}" for i in range(50)]
    await asyncio.gather(*(thread.fill(counter, [t]) for t in texts))
    assert counter.pending(texts) == [] and sum(batches) == 50 and len(batches) < 50
    with pytest.raises(ValueError, match="bad text"):
        await thread.fill(TokenCounter("len", encode), ["boom"])
    await asyncio.sleep(0.5)  # idle: the thread has exited, and starts again on demand
    assert not thread._running
    await thread.fill(counter, ["again"])
    assert counter.text("again") == 5

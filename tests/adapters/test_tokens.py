"""Prompt-token counting (adapters/tokens.py, adapters/tokenizer_file.py) with a real
tokenizer.json trained in a fixture, against vLLM's own computation (the template rendered
whole and encoded), and the offline fallbacks."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from adapters.tokenizer_file import TokenizerUnavailable, cached_bpe_file, load_counter
from adapters.tokens import HEURISTIC, ChatFormat, TokenCounter, estimate_tokens, texts_of
from tests.tokenizer_builder import build_tokenizer_dir, reference_count

pytest.importorskip("tokenizers")

CJK = "今天天气很好, 我们去公园散步吧。人工智能正在改变世界。" * 4
CODE = "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n" * 3
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CJK}],
    [{"role": "user", "content": "Explain:\n```python\n" + CODE + "```"},
     {"role": "assistant", "content": "It computes Fibonacci numbers recursively."},
     {"role": "user", "content": "  and faster?  "}],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "},
                                  {"type": "text", "text": "part two"}]}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


def test_heuristic_is_chars_over_4_on_ascii_and_about_one_token_per_cjk_character() -> None:
    assert estimate_tokens("abcdefghi") == 3
    assert estimate_tokens("") == 0
    # issue 12: chars / 4 counted 1,000 CJK characters as 257 tokens
    assert estimate_tokens("字" * 1000) == 1000
    assert estimate_tokens("привет") == 4  # two-byte letters: between chars/4 and one each
    assert HEURISTIC.count_chat([{"role": "user", "content": "abcd"}]) == 3 + 4 + 1
    assert HEURISTIC.count_prompt([1, 2, 3]) == 3
    assert HEURISTIC.count_prompt("") == 1


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_count_equals_the_whole_rendered_template(tok_dir: Path, i: int) -> None:
    counter = load_counter(str(tok_dir))
    messages = CONVERSATIONS[i]
    assert counter.count_chat(messages) == reference_count(tok_dir, messages)


def test_template_overhead_is_measured_not_assumed(tok_dir: Path) -> None:
    counter = load_counter(str(tok_dir / "tokenizer.json"))
    # <s> ... <|assistant|>\n = 1 + 2; each message <|role|>\n ... </s>\n = 4
    assert counter.chat == ChatFormat(base=3, per_message=4, roles={"system": 4})
    assert counter.exact and counter.name.endswith("tokenizer.json")


def test_completion_prompt_gets_the_special_tokens_vllm_adds(tok_dir: Path) -> None:
    counter = load_counter(str(tok_dir))
    for prompt in ("The quick brown fox", CJK, CODE):
        assert counter.count_prompt(prompt) == reference_count(tok_dir, prompt)
    assert counter.count_prompt([5, 6, 7, 8]) == 4  # token ids are counted as given


def test_real_counts_differ_from_the_heuristic_where_it_is_wrong(tok_dir: Path) -> None:
    counter = load_counter(str(tok_dir))
    msgs = [{"role": "user", "content": CJK}]
    # the test vocabulary has no CJK merges: each character is 3 byte tokens
    assert counter.count_chat(msgs) > 2 * HEURISTIC.count_chat(msgs)


def test_cache_counts_each_text_once_and_is_bounded() -> None:
    calls: list[int] = []

    def encode(texts: Sequence[str]) -> list[int]:
        calls.append(len(texts))
        return [len(t) for t in texts]

    c = TokenCounter("len", encode, cache_entries=2, inline_chars=3)
    assert c.pending(["ab", "abcd", "abcde"]) == ["abcd", "abcde"]
    c.fill(["abcd", "abcde"])
    assert calls == [2] and c.pending(["abcd", "abcde"]) == []
    assert c.text("abcd") == 4 and calls == [2]  # cached
    c.text("xyz")  # evicts the oldest (abcd): two entries at most
    assert c.pending(["abcd"]) == ["abcd"]
    assert c.count_chat([{"role": "user", "content": "abcde"}]) == 3 + 4 + 5 and calls == [2, 1]


def test_texts_of_names_every_counted_text() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert list(texts_of(msgs)) == ["ab", "", "[{'id': '1'}]"]
    assert list(texts_of(["p", "q"])) == ["p", "q"]
    assert HEURISTIC.count_chat(msgs) == 3 + 4 + 1 + 256 + 4 + 0 + 4


def test_missing_file_and_missing_package_are_reported(tok_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TokenizerUnavailable, match="no such tokenizer file"):
        load_counter(str(tmp_path / "nope"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(TokenizerUnavailable, match=r"not a tokenizer\.json"):
        load_counter(str(bad))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(TokenizerUnavailable, match=r"driftsched\[tokenizers\]"):
        load_counter(str(tok_dir))


def test_no_chat_template_means_the_default_format(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    counter = load_counter(str(tmp_path))
    assert counter.exact and counter.chat == ChatFormat()


def test_tiktoken_is_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no LiteLLM copy either
    assert cached_bpe_file("https://example.invalid/cl100k_base.tiktoken") is None
    with pytest.raises(TokenizerUnavailable, match="not in tiktoken's cache"):
        load_counter("tiktoken:cl100k_base")
    with pytest.raises(TokenizerUnavailable, match="only tiktoken:cl100k_base"):
        load_counter("tiktoken:p50k_base")


def test_cl100k_from_a_cached_file_matches_the_traces_counts(shared_data: Path) -> None:
    """The ShareGPT file's prompt_tokens were counted with cl100k_base (tiktoken)."""
    pytest.importorskip("tiktoken")
    try:
        counter = load_counter("tiktoken:cl100k_base")
    except TokenizerUnavailable as e:
        pytest.skip(str(e))
    rows = []
    with open(shared_data / "sharegpt" / "sharegpt_first_turn_dev.jsonl", encoding="utf-8") as f:
        for line, _ in zip(f, range(300), strict=False):
            rows.append(json.loads(line))
    same = sum(counter.text(r["prompt"]) == r["prompt_tokens"] for r in rows)
    assert same == len(rows)

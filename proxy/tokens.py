"""Fast local prompt-token counts for admission (microseconds, no tokenizer).

The count is an estimate (about four characters per token, the usual rule of thumb for
BPE vocabularies on English text, plus the chat template's per-message overhead); what is
charged at admission is reconciled with the engine's real ``usage`` at completion.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
PER_MESSAGE_OVERHEAD = 4


def _text_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    n += _text_tokens(part["text"])
                elif part.get("type") in ("image_url", "input_image", "input_audio"):
                    n += 256
            elif isinstance(part, str):
                n += _text_tokens(part)
        return n
    return 0


def count_chat(messages: list[Any]) -> int:
    n = 3
    for m in messages:
        if isinstance(m, dict):
            n += PER_MESSAGE_OVERHEAD + _content_tokens(m.get("content"))
            if m.get("tool_calls"):
                n += _text_tokens(str(m["tool_calls"]))
    return n


def count_prompt(prompt: Any) -> int:
    """``prompt`` of /v1/completions or ``input`` of /v1/embeddings: str, list of str, or ids."""
    if isinstance(prompt, str):
        return max(1, _text_tokens(prompt))
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) for x in prompt):
            return len(prompt)
        return max(1, sum(count_prompt(p) for p in prompt))
    return 1

"""What the simulator knows about a prompt: its token count and its true output length.

**Prompt key** (:func:`prompt_key`), reusable by whoever writes the workload file:

- chat (a list of messages): each message's text content, in order, joined with ``"\\n"``;
  a message's content is its string, or the concatenation (no separator) of the ``text`` of
  its text parts when it is a list of parts; roles, names and other fields are ignored;
- completions (a prompt): the string itself; a list of one string is that string; a list of
  token ids is their decimal values joined with ``","``;
- the key is the lowercase hex SHA-256 of that text encoded as UTF-8.

**Prompt tokens** (:func:`count_prompt_tokens`): the gateway's heuristic
(:data:`adapters.tokens.HEURISTIC`, the same code): per text ``ceil(len(text) / 4)`` for ASCII
(non-ASCII characters count by their UTF-8 bytes, a CJK character one token), plus, for chat,
4 per message and 3 for the assistant header; a list of token ids counts its length; never
less than 1. An engine started with ``--tokenizer`` counts with that tokenizer instead.

**Workload file** (JSONL): every line with ``"output_tokens"`` and either ``"messages"`` or
``"prompt"`` teaches the true output length of that prompt (0 counts as 1: an engine always
emits at least one token; a later line for the same prompt wins); other fields are ignored, blank
lines are skipped. A prompt the file does not know gets a length drawn from a lognormal
distribution (median 200, sigma 1.0, at least 1, at most 2048), seeded by ``--seed`` and the
prompt key, so the same prompt always gets the same length in every engine with that seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

from adapters.tokens import HEURISTIC

DRAW_MEDIAN = 200.0
DRAW_SIGMA = 1.0
DRAW_MAX = 2048


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        return ",".join(str(x) for x in prompt)
    return ""


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def canonical_text(messages_or_prompt: Any) -> str:
    """The text that :func:`prompt_key` hashes (see the module docstring)."""
    if _is_messages(messages_or_prompt):
        return "\n".join(_content_text(m.get("content")) for m in messages_or_prompt)
    return _prompt_text(messages_or_prompt)


def prompt_key(messages_or_prompt: Any) -> str:
    """Hex SHA-256 of :func:`canonical_text`; a list of message dicts is a chat prompt."""
    return hashlib.sha256(canonical_text(messages_or_prompt).encode("utf-8")).hexdigest()


def count_prompt_tokens(messages_or_prompt: Any) -> int:
    """The heuristic prompt-token count (see the module docstring); at least 1."""
    return HEURISTIC.count(messages_or_prompt)


class OutputLengths:
    """Prompt key -> true output length: the workload file's answer, else a seeded draw."""

    __slots__ = ("_known", "_seed")

    def __init__(self, known: dict[str, int] | None = None, *, seed: int = 0) -> None:
        self._known = dict(known or {})
        self._seed = seed

    def __len__(self) -> int:
        return len(self._known)

    def lookup(self, key: str) -> int | None:
        return self._known.get(key)

    def true_length(self, key: str) -> int:
        known = self._known.get(key)
        if known is not None:
            return known
        rng = random.Random(f"{self._seed}:{key}")
        draw = DRAW_MEDIAN * math.exp(DRAW_SIGMA * rng.gauss(0.0, 1.0))
        return max(1, min(DRAW_MAX, round(draw)))

    @classmethod
    def from_jsonl(cls, path: str | Path, *, seed: int = 0) -> OutputLengths:
        """Read a workload file; raises ``ValueError`` naming the line of a malformed entry."""
        known: dict[str, int] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON: {e}") from e
                if not isinstance(row, dict) or "output_tokens" not in row:
                    continue
                source = row.get("messages", row.get("prompt"))
                if source is None:
                    raise ValueError(f"{path}:{lineno}: output_tokens without messages/prompt")
                out = row["output_tokens"]
                if not isinstance(out, int) or isinstance(out, bool) or out < 0:
                    raise ValueError(f"{path}:{lineno}: output_tokens must be an int >= 0")
                known[prompt_key(source)] = max(1, out)  # an engine always emits a token
        return cls(known, seed=seed)

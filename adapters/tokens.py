"""Prompt-token counts: one implementation for the gateway and the simulator engine.

One question: *how many prompt tokens will the engine report for this request?* A
:class:`TokenCounter` answers it for one model from two parts:

- an **encoder**, the lengths of a batch of texts: the model's ``tokenizer.json`` (HF
  ``tokenizers``), a tiktoken encoding, or :func:`estimate_tokens` (no tokenizer);
- a :class:`ChatFormat`, the tokens the chat template adds around the messages (measured from
  the template once, :mod:`adapters.tokenizer_file`), and the special tokens a completion
  prompt gets (vLLM encodes a chat prompt's rendered template without special tokens and a
  completion prompt with them).

**Counting rule** (the same in the gateway and the simulator): a chat request is
``base + sum(role overhead + content tokens)``; content is the message's string, or its text
parts joined, plus :data:`IMAGE_TOKENS` per image or audio part and the tokens of
``str(tool_calls)``; a completion prompt is its text's tokens + ``prompt_special``; a list of
token ids counts its length; a list of strings is the sum; never less than 1.

Counts of texts are cached (an LRU keyed by the text, bounded in entries and characters), so
a repeated system prompt or the earlier turns of a conversation cost a dict look-up. The
cache and :meth:`TokenCounter.fill` are safe to use from another thread: a dict's item
assignment is atomic, and a lost update only costs a recount.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: the heuristic's characters per token on ASCII text (the usual rule for English BPE)
CHARS_PER_TOKEN = 4
#: what an image or audio part is charged (the gateway cannot see how the engine encodes it)
IMAGE_TOKENS = 256
_MEDIA_PARTS = ("image_url", "input_image", "input_audio")

#: the lengths, in tokens, of a batch of texts (may run in another thread)
Encoder = Callable[[Sequence[str]], list[int]]


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` without a tokenizer: ``ceil(chars / 4)`` for ASCII; each non-ASCII
    character counts half a token per UTF-8 byte past its first (a CJK character, three
    bytes, is one token; a Cyrillic or accented letter, two bytes, is half a token), which is
    what BPE vocabularies give to within ~20%, where chars / 4 is 4x low on CJK.

    >>> estimate_tokens("Hello, world"), estimate_tokens("你好世界"), estimate_tokens("")
    (3, 4, 0)
    """
    n = len(text)
    if text.isascii():
        return -(-n // CHARS_PER_TOKEN)
    extra = len(text.encode("utf-8", "surrogatepass")) - n  # bytes past each char's first
    return -(-(2 * n + 3 * extra) // (2 * CHARS_PER_TOKEN))


def estimate_batch(texts: Sequence[str]) -> list[int]:
    return [estimate_tokens(t) for t in texts]


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """Tokens a chat template adds: ``base`` once per request (BOS, the generation prompt, a
    default system prompt) and per message ``roles[role]`` (``per_message`` for a role not
    listed). The defaults are the heuristic's (a Llama-style template's size)."""

    base: int = 3
    per_message: int = 4
    roles: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def overhead(self, role: Any) -> int:
        return self.roles.get(role, self.per_message) if isinstance(role, str) else self.per_message


class TokenCounter:
    """Prompt tokens of requests to one model (see the module docstring for the rule).

    ``exact`` is true when the encoder is a real tokenizer; then :meth:`pending` names the
    texts worth counting in another thread (not cached and longer than ``inline_chars``)
    before the count runs on the event loop.
    """

    def __init__(self, name: str, encode: Encoder | None = None, *,
                 chat: ChatFormat | None = None, prompt_special: int = 0,
                 inline_chars: int = 256, cache_entries: int = 16_384,
                 cache_chars: int = 32_000_000) -> None:
        self.name = name
        self.exact = encode is not None
        self._encode: Encoder = encode or estimate_batch
        self.chat = chat or ChatFormat()
        self.prompt_special = prompt_special
        self.inline_chars = inline_chars
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._cache_entries = cache_entries
        self._cache_chars = cache_chars
        self._chars = 0

    def __repr__(self) -> str:
        return f"TokenCounter({self.name!r})"

    # -- texts -----------------------------------------------------------------------------
    def text(self, text: str) -> int:
        """Tokens of one text (no special tokens); cached when an encoder is exact."""
        if not self.exact:
            return estimate_tokens(text)
        n = self._cache.get(text)
        if n is not None:
            return n
        return self._store(text, self._encode([text])[0])

    def fill(self, texts: Sequence[str]) -> None:
        """Count ``texts`` in one encoder call and cache them (for a worker thread)."""
        for t, n in zip(texts, self._encode(texts), strict=True):
            self._store(t, n)

    def pending(self, texts: Sequence[str]) -> list[str]:
        """The texts that are neither cached nor short: worth counting off the event loop."""
        if not self.exact:
            return []
        return [t for t in texts if len(t) > self.inline_chars and t not in self._cache]

    def _store(self, text: str, n: int) -> int:
        if len(text) > self._cache_chars // 16:
            return n  # one huge text must not evict everything
        cache = self._cache
        if text not in cache:
            self._chars += len(text)
        cache[text] = n
        while len(cache) > self._cache_entries or self._chars > self._cache_chars:
            try:
                old, _ = cache.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
            self._chars -= len(old)
        return n

    # -- requests --------------------------------------------------------------------------
    def count_chat(self, messages: Sequence[Any]) -> int:
        """Prompt tokens of chat ``messages`` (a list of message objects)."""
        fmt = self.chat
        n = fmt.base
        for m in messages:
            if isinstance(m, dict):
                n += fmt.overhead(m.get("role")) + self._content(m.get("content"))
                if m.get("tool_calls"):
                    n += self.text(str(m["tool_calls"]))
        return max(1, n)

    def count_prompt(self, prompt: Any) -> int:
        """``prompt`` of /v1/completions or ``input`` of /v1/embeddings: str, list of str, or
        token ids (a list of ints, or a list of such lists)."""
        if isinstance(prompt, str):
            return max(1, self.text(prompt) + self.prompt_special)
        if isinstance(prompt, list):
            if prompt and all(isinstance(x, int) for x in prompt):
                return len(prompt)
            return max(1, sum(self.count_prompt(p) for p in prompt))
        return 1

    def count(self, source: Any) -> int:
        """:meth:`count_chat` for a list of message dicts, else :meth:`count_prompt`."""
        if is_messages(source):
            return self.count_chat(source)
        return self.count_prompt(source)

    def _content(self, content: Any) -> int:
        text, media = content_text(content)
        return self.text(text) + media * IMAGE_TOKENS


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def content_text(content: Any) -> tuple[str, int]:
    """A message's text (its string, or its text parts joined, as chat templates render
    them) and how many image or audio parts it has."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    media = 0
    for part in content:
        if isinstance(part, dict):
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") in _MEDIA_PARTS:
                media += 1
        elif isinstance(part, str):
            texts.append(part)
    return "".join(texts), media


def texts_of(source: Any) -> Iterator[str]:
    """Every text :meth:`TokenCounter.count` encodes for ``source`` (messages or a prompt)."""
    if is_messages(source):
        for m in source:
            yield content_text(m.get("content"))[0]
            if m.get("tool_calls"):
                yield str(m["tool_calls"])
    elif isinstance(source, str):
        yield source
    elif isinstance(source, list):
        for p in source:
            if isinstance(p, str):
                yield p


#: the counter of a model without a tokenizer: :func:`estimate_tokens`, the default format
HEURISTIC = TokenCounter("heuristic")

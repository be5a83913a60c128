"""Cheap request features for the output-token estimator.

One question: *what does the estimator see of a request?* The answer is a flat ``dict`` that
the gateway builds once on the request path, hands to ``OutputTokenEstimator.predict_one``
and later puts, unchanged, into the completion event that trains the estimator. Keys:

``tenant`` (str), ``model`` (str)
    Categorical; the estimator keeps per-tenant state and one-hot encodes the model.
``max_tokens`` (float, only when the request sets it)
    The request's output cap; predictions are clipped to it.
``log_prompt_tokens``, ``log_prompt_tokens_sq``, ``log_messages``, ``has_max_tokens``,
``log_max_tokens``
    Dense numeric features, scaled to roughly [0, 2].
``w<bucket>``
    Hashed word unigrams and bigrams of the prompt text (CRC32, so stable across processes
    and restarts), each ``1 / sqrt(n_distinct)``.

``oracle_output_tokens`` (float, only when the input has it)
    A request's true output length, for the ablation estimator that reads it
    (:class:`policies.estimator_variants.OracleEstimator`); the gateway fills it only with
    ``scheduler.estimator.kind: oracle``. No other estimator reads it.

Every value is a ``str`` or a ``float``, so the dict survives a JSON round trip (a Redis
Stream) as is. Only the first ``head_chars`` and last ``tail_chars`` characters of the prompt
are read, which bounds the cost on huge prompts (docs/estimator.md, "Cost").
"""

from __future__ import annotations

import itertools
import math
import string
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RequestFeatures", "prompt_text"]

_PUNCT = str.maketrans(dict.fromkeys(string.punctuation.replace("'", ""), " "))


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text the estimator reads from OpenAI chat ``messages``: the last user message.

    Content given as a list of parts keeps its ``text`` parts. No user message -> ``""``.

    >>> prompt_text([{"role": "system", "content": "Be brief."},
    ...              {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}])
    'Hi there'
    """
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, Mapping) and "text" in p
            )
        return ""
    return ""


class RequestFeatures:
    """Turn a request summary into the estimator's feature dict (River ``transform_one``).

    Parameters
    ----------
    n_buckets
        Size of the hashing space for word n-grams (a power of two).
    head_chars, tail_chars
        How much of the prompt text is read: its start (where instructions usually are) and
        its end (where a pasted document is followed by the question).
    bigrams
        Add hashed word bigrams to the unigrams.
    cache_size
        N-grams whose feature name is remembered (cleared when full); only a speed-up.

    The input dict has ``prompt`` (str), ``prompt_tokens`` (int), and optionally ``tenant``,
    ``model``, ``n_messages`` (messages in the request, default 1), ``max_tokens`` and
    ``oracle_output_tokens``.
    Deterministic: the output depends only on the input and the parameters (the n-gram
    cache changes speed, not results).

    >>> fx = RequestFeatures()
    >>> x = fx.transform_one({"prompt": "Write a poem.", "prompt_tokens": 4, "tenant": "acme"})
    >>> x["tenant"], x["model"], round(x["log_prompt_tokens"], 3)
    ('acme', '', 0.322)
    >>> sorted(k for k in x if k.startswith("w"))
    ['w195806', 'w227935', 'w245315', 'w246593', 'w94618']
    """

    def __init__(
        self,
        n_buckets: int = 2**18,
        head_chars: int = 300,
        tail_chars: int = 100,
        bigrams: bool = True,
        cache_size: int = 2**16,
    ) -> None:
        if n_buckets <= 0 or n_buckets & (n_buckets - 1):
            raise ValueError("n_buckets must be a power of two")
        if head_chars < 0 or tail_chars < 0:
            raise ValueError("head_chars and tail_chars must be >= 0")
        self.n_buckets = n_buckets
        self.head_chars = head_chars
        self.tail_chars = tail_chars
        self.bigrams = bigrams
        self.cache_size = cache_size
        self._keys: dict[str, str] = {}  # n-gram -> feature name; halves the hashing cost

    def transform_one(self, x: Mapping[str, Any]) -> dict[str, float | str]:
        text = str(x.get("prompt") or "")
        if len(text) > self.head_chars + self.tail_chars:
            text = text[: self.head_chars] + " " + text[len(text) - self.tail_chars :]
        lp = math.log1p(max(0.0, float(x.get("prompt_tokens") or 0))) / 5.0
        out: dict[str, float | str] = {
            "tenant": str(x.get("tenant") or ""),
            "model": str(x.get("model") or ""),
            "log_prompt_tokens": lp,
            "log_prompt_tokens_sq": lp * lp,
            "log_messages": math.log(max(1.0, float(x.get("n_messages") or 1))),
        }
        max_tokens = x.get("max_tokens")
        if max_tokens is not None and max_tokens > 0:
            out["max_tokens"] = float(max_tokens)
            out["has_max_tokens"] = 1.0
            out["log_max_tokens"] = math.log1p(float(max_tokens)) / 5.0
        oracle = x.get("oracle_output_tokens")
        if oracle is not None:
            out["oracle_output_tokens"] = float(oracle)
        words = text.lower().translate(_PUNCT).split()
        grams = set(words)
        if self.bigrams:
            grams.update(map(" ".join, itertools.pairwise(words)))
        if grams:
            weight = 1.0 / math.sqrt(len(grams))
            keys = self._keys
            for g in grams:
                k = keys.get(g)
                if k is None:
                    # surrogatepass: any str hashes (the gateway refuses lone surrogates
                    # at its edge, but the estimator must not depend on it)
                    b = g.encode("utf-8", "surrogatepass")
                    k = f"w{zlib.crc32(b) & (self.n_buckets - 1)}"
                    if len(keys) >= self.cache_size:
                        keys.clear()
                    keys[g] = k
                out[k] = weight
        return out

"""Seeded randomness, prompt text of a given token count, arrival processes, length profiles.

Every generator comes from :func:`rng_for` (seed + a purpose such as ``("arrival",
tenant)``), so adding a tenant or a drift event changes no other tenant's draws.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from experiments.traces import (
    MOONCAKE_BUCKET_S,
    Data,
    FloatArray,
    IntArray,
    ShareGPTRow,
    window_trace,
)

CHAT_OVERHEAD = 7  # one user message: 3 (assistant header) + 4 (per message)
CHARS_PER_TOKEN = 4
MIN_CHAT_TOKENS = CHAT_OVERHEAD + 1
MOONCAKE_BLOCK_TOKENS = 512
FILLERS = ("sharegpt", "words")


def stable_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def rng_for(seed: int, *stream: object) -> np.random.Generator:
    """An independent generator per (seed, purpose, tenant...): adding a tenant changes no other."""
    return np.random.default_rng([seed, stable_hash(*stream)])


_WORDS = (
    "the of and to in is for on that with as this it be are by from at or an was not "
    "can data model time system user request value list code file function error set "
    "table query server page text number string result output input type name test "
    "example write explain please help make create how what why when which use need "
    "first new more other some each into also than then them these only over such"
).split()


class Filler:
    """Deterministic text for prompts known only by their token count (Azure, Mooncake)."""

    def __init__(self, corpus: str) -> None:
        if len(corpus) < 4096:
            raise ValueError("filler corpus too small")
        self.corpus = corpus

    @classmethod
    def create(cls, kind: str, data: Data, max_chars: int = 2_000_000) -> Filler:
        """``sharegpt``: real prompt text, in file order (read at run time, never stored);
        ``words``: common English words in a fixed pseudo-random order (no data needed).
        Built once per :class:`Data`."""
        key = f"filler:{kind}:{max_chars}"
        if key in data.cache:
            return cast(Filler, data.cache[key])
        if kind == "words":
            idx = np.random.default_rng(0).integers(0, len(_WORDS), max_chars // 5)
            corpus = " ".join(np.asarray(_WORDS)[idx].tolist())
        elif kind == "sharegpt":
            parts, n = [], 0
            for row in data.sharegpt():
                parts.append(row.prompt)
                n += len(row.prompt) + 1
                if n >= max_chars:
                    break
            corpus = "\n".join(parts)
        else:
            raise ValueError(f"unknown filler {kind!r}; choose sharegpt or words")
        data.cache[key] = filler = cls(corpus)
        return filler

    def take(self, n: int, offset: int) -> str:
        """``n`` characters from ``offset`` (wrapping around the corpus)."""
        c, out = self.corpus, []
        offset %= len(c)
        while n > 0:
            piece = c[offset : offset + n]
            out.append(piece)
            n -= len(piece)
            offset = 0
        return "".join(out)


def synth_messages(
    tokens: int,
    tag: str,
    filler: Filler,
    offset: int,
    blocks: Sequence[int] | None = None,
    block_salt: int = 0,
) -> list[dict[str, Any]]:
    """One user message that counts ``max(tokens, 8)`` prompt tokens (more only if ``tag``
    alone is longer). ``tag`` ends the text and makes it unique. With ``blocks`` (Mooncake
    prefix-block ids) requests that share a block id share that block's text, in order."""
    n_chars = CHARS_PER_TOKEN * (max(tokens, MIN_CHAT_TOKENS) - CHAT_OVERHEAD)
    body_chars = max(0, n_chars - len(tag))
    if blocks:
        per = MOONCAKE_BLOCK_TOKENS * CHARS_PER_TOKEN
        text = "".join(
            filler.take(per, stable_hash(block_salt, b)) for b in blocks[: body_chars // per + 1]
        )[:body_chars]
        text += filler.take(body_chars - len(text), offset)
    else:
        text = filler.take(body_chars, offset)
    return [{"role": "user", "content": text + tag}]


def renewal(
    rng: np.random.Generator,
    rate: float,
    start: float,
    end: float,
    draw: Callable[[int], FloatArray],
) -> FloatArray:
    """Arrival times in ``[start, end)`` of a renewal process whose gaps come from ``draw``."""
    out: list[FloatArray] = []
    t = start
    n = max(16, int((end - start) * rate * 1.2) + 16)
    while t < end:
        gaps = draw(n)
        ts = t + np.cumsum(gaps)
        out.append(ts[ts < end])
        t = float(ts[-1])
    return np.concatenate(out) if out else np.zeros(0)


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a tenant's requests arrive. ``rate`` is the long-run mean in req/s."""

    process: str  # poisson | gamma | onoff | constant | trace
    rate: float | None = None
    cv: float = 1.0
    on_s: float = 10.0
    off_s: float = 10.0
    trace: str | None = None
    offset_s: float = 0.0
    rate_scale: float = 1.0

    def times(
        self,
        rng: np.random.Generator,
        start: float,
        end: float,
        data: Data,
    ) -> tuple[FloatArray, IntArray | None]:
        """Arrival times in ``[start, end)``, and trace rows for ``process: trace``."""
        if self.process == "trace":
            assert self.trace is not None
            jitter = MOONCAKE_BUCKET_S if self.trace == "mooncake" else 0.0
            t, rows = window_trace(
                data.trace(self.trace), self.offset_s, self.rate_scale, end - start, jitter, rng
            )
            return t + start, rows
        rate = self.rate or 0.0
        if rate <= 0 or end <= start:
            return np.zeros(0), None
        if self.process == "poisson":
            return renewal(rng, rate, start, end, lambda n: rng.exponential(1 / rate, n)), None
        if self.process == "gamma":
            k = 1.0 / (self.cv * self.cv)
            return renewal(rng, rate, start, end, lambda n: rng.gamma(k, 1 / (rate * k), n)), None
        if self.process == "constant":
            phase = rng.uniform(0, 1 / rate)
            t = start + phase + np.arange(int((end - start - phase) * rate) + 1) / rate
            return t[t < end], None
        # onoff: Poisson at rate * (on + off) / on during on-periods, silent during off;
        # the first on-period starts at `start`.
        period = self.on_s + self.off_s
        on_rate = rate * period / self.on_s
        busy = renewal(
            rng,
            on_rate,
            0.0,
            (end - start) * self.on_s / period + 1e-9,
            lambda n: rng.exponential(1 / on_rate, n),
        )
        cycles = np.floor(busy / self.on_s)
        t = start + busy + cycles * self.off_s
        return t[t < end], None


@dataclass(frozen=True, slots=True)
class LogNormal:
    median: float
    sigma: float
    lo: int = 1
    hi: int = 1 << 20

    def draw(self, rng: np.random.Generator, n: int) -> IntArray:
        x = np.round(self.median * np.exp(self.sigma * rng.standard_normal(n)))
        return np.clip(x, self.lo, self.hi).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Sample:
    """One request's lengths: real ``text`` (ShareGPT) or a prompt-token target."""

    prompt_tokens: int
    output_tokens: int
    source: str
    text: str | None = None
    blocks: list[int] | None = None


@dataclass(frozen=True, slots=True)
class Lengths:
    """A length population: lognormal, fixed, sharegpt (real prompts) or trace (token counts)."""

    profile: str
    prompt: LogNormal | int | None = None
    output: LogNormal | int | None = None
    trace: str | None = None
    prompt_range: tuple[int, int] | None = None  # sharegpt filter (simulator token count)
    output_range: tuple[int, int] | None = None  # sharegpt filter (response tokens)

    def sample(
        self,
        rng: np.random.Generator,
        n: int,
        data: Data,
        max_context: int,
        rows: IntArray | None = None,
    ) -> list[Sample]:
        """``n`` draws; ``rows`` aligns a trace profile with trace arrivals (same trace)."""
        if self.profile == "sharegpt":
            pool = sharegpt_pool(data, max_context, self.prompt_range, self.output_range)
            pick = rng.integers(0, len(pool), n)
            return [
                Sample(
                    pool[i].prompt_tokens,
                    pool[i].response_tokens,
                    f"sharegpt:{pool[i].id}",
                    pool[i].prompt,
                )
                for i in pick
            ]
        if self.profile == "trace":
            assert self.trace is not None
            tr = data.trace(self.trace)
            idx = rows if rows is not None else rng.integers(0, len(tr.t), n)
            return [
                Sample(
                    int(tr.prompt[i]),
                    int(tr.output[i]),
                    f"{tr.name}:{i}",
                    blocks=tr.blocks[i] if tr.blocks else None,
                )
                for i in idx
            ]
        p, o = _draw(self.prompt, rng, n), _draw(self.output, rng, n)
        return [Sample(int(p[i]), int(o[i]), self.profile) for i in range(n)]


def _draw(d: LogNormal | int | None, rng: np.random.Generator, n: int) -> IntArray:
    if isinstance(d, LogNormal):
        return d.draw(rng, n)
    return np.full(n, d or 1, dtype=np.int64)


def sharegpt_pool(
    data: Data,
    max_context: int,
    prompt_range: tuple[int, int] | None = None,
    output_range: tuple[int, int] | None = None,
) -> list[ShareGPTRow]:
    """ShareGPT rows whose prompt fits in half the context (and the ranges, if given)."""
    plo, phi = prompt_range or (1, max_context // 2)
    olo, ohi = output_range or (1, 1 << 30)
    pool = [
        r
        for r in data.sharegpt()
        if plo <= r.prompt_tokens <= min(phi, max_context // 2) and olo <= r.response_tokens <= ohi
    ]
    if not pool:
        raise ValueError(
            f"no ShareGPT prompt with prompt tokens in [{plo}, {phi}] and "
            f"response tokens in [{olo}, {ohi}]"
        )
    return pool

"""Readers of the real traces in ``../shared/data`` (read at run time, never copied).

Azure 2023 ``conv``/``code`` (arrival times, context and generated tokens), Mooncake's
conversation trace (ms timestamps quantised to ~3 s, input/output lengths, 512-token prefix
block ids) and the ShareGPT first-turn set (real prompts with their real response length in
cl100k tokens). :func:`window_trace` cuts a replay window out of a trace.
"""

from __future__ import annotations

import calendar
import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from adapters.sim.workload import count_prompt_tokens

TRACES = ("azure-conv", "azure-code", "mooncake")
MOONCAKE_BUCKET_S = 3.0  # Mooncake timestamps are quantised to ~3 s: jitter within it

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def default_data_dir() -> Path:
    """``$DRIFTSCHED_SHARED_DATA``, else ``shared/data`` beside the checkout (``../shared/data``)."""
    env = os.environ.get("DRIFTSCHED_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True, slots=True)
class Trace:
    """Arrival times (s from the first request, sorted) and token counts of a real trace."""

    name: str
    t: FloatArray
    prompt: IntArray
    output: IntArray
    blocks: list[list[int]] | None = None  # Mooncake's 512-token prefix-block ids

    @property
    def span_s(self) -> float:
        """Length of one pass, including one mean gap so a looped trace keeps its rate."""
        n = len(self.t)
        return float(self.t[-1] + (self.t[-1] / (n - 1) if n > 1 else 1.0))


@dataclass(frozen=True, slots=True)
class ShareGPTRow:
    id: str
    prompt: str
    response_tokens: int  # cl100k, as in the data set: the true output length
    prompt_tokens: int  # the simulator's count of the prompt as one user message


class Data:
    """Lazy, cached readers of ``../shared/data`` (read at run time; never copied)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_data_dir()
        self._traces: dict[str, Trace] = {}
        self._sharegpt: list[ShareGPTRow] | None = None
        #: things derived from the data (e.g. filler text), built once per reader
        self.cache: dict[str, object] = {}

    def _file(self, rel: str) -> Path:
        p = self.root / rel
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (set --data or $DRIFTSCHED_SHARED_DATA)")
        return p

    def trace(self, name: str) -> Trace:
        if name not in TRACES:
            raise ValueError(f"unknown trace {name!r}; choose from {', '.join(TRACES)}")
        if name not in self._traces:
            self._traces[name] = (
                self._mooncake() if name == "mooncake" else self._azure(name.split("-", 1)[1])
            )
        return self._traces[name]

    def _azure(self, kind: str) -> Trace:
        path = self._file(f"azure2023/AzureLLMInferenceTrace_{kind}.csv")
        ts: list[float] = []
        ctx: list[int] = []
        gen: list[int] = []
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            head = next(rows)
            if head != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
                raise ValueError(f"{path}: unexpected columns {head}")
            for row in rows:
                stamp = row[0]
                sec = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
                ts.append(sec + (float("0" + stamp[19:]) if len(stamp) > 20 else 0.0))
                ctx.append(int(row[1]))
                gen.append(int(row[2]))
        t = np.asarray(ts, dtype=np.float64)
        return Trace(
            f"azure-{kind}", t - t[0], np.asarray(ctx, np.int64), np.asarray(gen, np.int64)
        )

    def _mooncake(self) -> Trace:
        path = self._file("mooncake/conversation_trace.jsonl")
        ts: list[float] = []
        inp: list[int] = []
        out: list[int] = []
        blocks: list[list[int]] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    ts.append(d["timestamp"] / 1000.0)
                    inp.append(d["input_length"])
                    out.append(d["output_length"])
                    blocks.append(d["hash_ids"])
        t = np.asarray(ts, dtype=np.float64)
        return Trace(
            "mooncake", t - t[0], np.asarray(inp, np.int64), np.asarray(out, np.int64), blocks
        )

    def sharegpt(self) -> list[ShareGPTRow]:
        if self._sharegpt is None:
            rows = []
            with open(self._file("sharegpt/sharegpt_first_turn_dev.jsonl"), encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        d = json.loads(line)
                        prompt = d["prompt"]
                        rows.append(
                            ShareGPTRow(
                                d["id"],
                                prompt,
                                int(d["response_tokens"]),
                                count_prompt_tokens([{"content": prompt}]),
                            )
                        )
            self._sharegpt = rows
        return self._sharegpt


def window_trace(
    tr: Trace,
    offset_s: float,
    rate_scale: float,
    duration_s: float,
    jitter_s: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[FloatArray, IntArray]:
    """Arrivals of ``tr`` in ``[offset_s, offset_s + duration_s * rate_scale)``, compressed by
    ``rate_scale`` (2 = twice the rate) onto ``[0, duration_s)``, with the row of each. The
    trace loops when the window runs past its end. ``jitter_s`` spreads each arrival uniformly
    over ``[t, t + jitter_s)`` (Mooncake's 3 s buckets), then re-sorts."""
    if rate_scale <= 0:
        raise ValueError("rate_scale must be > 0")
    t = tr.t
    if jitter_s > 0:
        assert rng is not None
        t = t + rng.uniform(0.0, jitter_s, len(t))
    end = offset_s + duration_s * rate_scale
    span = max(tr.span_s, float(t.max()) + 1e-9)
    times: list[FloatArray] = []
    rows: list[IntArray] = []
    k = int(offset_s // span)
    while k * span < end:
        shifted = t + k * span
        m = (shifted >= offset_s) & (shifted < end)
        times.append(shifted[m])
        rows.append(np.nonzero(m)[0].astype(np.int64))
        k += 1
    at = np.concatenate(times) if times else np.zeros(0)
    idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(at, kind="stable")
    return (at[order] - offset_s) / rate_scale, idx[order]

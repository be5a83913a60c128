"""Prompt-token counting: cost per count and agreement with an engine's ``prompt_tokens``.

    python bench/token_count_bench.py --tokenizer DIR [--engine URL --model NAME] [--n 300]

**Cost** (µs per count of a ~1k-token prompt, p50): the event loop's share (the loop thread's
CPU time per count: a cached count, a count through :class:`proxy.tokens.CountingThread`,
one at a time and 32 at once) and the encoder itself (inline, what the loop would pay
without the thread); the heuristic for comparison.

**Agreement**: for ShareGPT prompts (``../shared/data``, or ``--data``), the code prompts among
them and CJK prompts (those, and generated CJK text when the file has few), each sent as one
user message: the share of requests whose count is within 5% of the engine's
``usage.prompt_tokens`` and the total's ratio, for the tokenizer's counter, the heuristic
and ``tiktoken:cl100k_base`` (where its file is cached). The engine is ``--engine`` (a vLLM
serving the same tokenizer: ``--model`` is its served name) or, without it, a simulator
engine this script starts with ``--tokenizer`` (which proves that the two agree).
Prompts longer than the engine's context are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.tokenizer_file import TokenizerUnavailable, load_counter  # noqa: E402
from adapters.tokens import HEURISTIC, TokenCounter  # noqa: E402
from proxy.tokens import CountingThread  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "sharegpt" / "sharegpt_first_turn_dev.jsonl"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_CODE = re.compile(r"```|\bdef |\bfunction\b|\bclass \w+|#include|;\n|\{\n")


def load_prompts(path: Path, n: int, seed: int) -> dict[str, list[str]]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")] if path.exists() else []
    texts = [r["prompt"] for r in rows if r.get("prompt")]
    rng = random.Random(seed)
    cjk = [t for t in texts if len(_CJK.findall(t)) > 0.3 * len(t)]
    code = [t for t in texts if _CODE.search(t)]
    if len(cjk) < n:  # the file has few: add generated CJK prose of ShareGPT's lengths
        chars = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
        for _ in range(n - len(cjk)):
            k = rng.choice([20, 60, 200, 600, 1500])
            cjk.append("".join(rng.choice(chars) for _ in range(k)) + "。请解释。")
    pick = lambda xs: rng.sample(xs, min(n, len(xs)))  # noqa: E731
    return {"sharegpt": pick(texts) if texts else pick(cjk), "code": pick(code), "cjk": pick(cjk)}


def p50_us(fn: Any, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


async def loop_cost(counter: TokenCounter, texts: list[str], concurrent: int) -> float:
    """The loop thread's CPU µs per count through the counting thread (cache cold)."""
    thread = CountingThread()
    msgs = [[{"role": "user", "content": t + f" #{i}"}] for i, t in enumerate(texts)]

    async def one(m: list[dict[str, Any]]) -> int:
        pending = counter.pending([m[0]["content"]])
        if pending:
            await thread.fill(counter, pending)
        return counter.count_chat(m)

    await one([{"role": "user", "content": "warm-up " * 200}])
    t0 = time.thread_time()
    if concurrent == 1:  # awaited in the request's own task, as the gateway does
        for m in msgs:
            await one(m)
    else:  # (the tasks' own cost is counted too)
        for i in range(0, len(msgs), concurrent):
            await asyncio.gather(*(one(m) for m in msgs[i:i + concurrent]))
    return (time.thread_time() - t0) / len(msgs) * 1e6


def cost(counter: TokenCounter, prompts: list[str]) -> dict[str, float]:
    long = sorted(prompts, key=lambda t: abs(counter.text(t) - 1000))[:5]
    text = long[0]
    n = counter.text(text)
    enc = counter._encode  # the encoder alone, uncached
    return {
        "prompt_tokens": n,
        "encode_inline_us": p50_us(lambda: enc([text]), 50),
        "cached_count_us": p50_us(lambda: counter.count_chat([{"role": "user", "content": text}]), 2000),
        "heuristic_us": p50_us(lambda: HEURISTIC.count_chat([{"role": "user", "content": text}]), 2000),
        "loop_us_via_thread_serial": asyncio.run(loop_cost(counter, long * 40, 1)),
        "loop_us_via_thread_32_at_once": asyncio.run(loop_cost(counter, long * 64, 32)),
    }


def engine_counts(url: str, model: str, prompts: list[str]) -> list[int | None]:
    out: list[int | None] = []
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        for p in prompts:
            r = c.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 1,
                "messages": [{"role": "user", "content": p}]})
            out.append(r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else None)
    return out


def agreement(counter: TokenCounter, prompts: list[str], truth: list[int | None]) -> dict[str, float]:
    pairs = [(counter.count_chat([{"role": "user", "content": p}]), t)
             for p, t in zip(prompts, truth, strict=True) if t]
    within = sum(abs(c - t) <= 0.05 * t for c, t in pairs)
    return {"n": len(pairs), "within_5pct": round(within / max(1, len(pairs)), 4),
            "total_ratio": round(sum(c for c, _ in pairs) / max(1, sum(t for _, t in pairs)), 4),
            "exact": round(sum(c == t for c, t in pairs) / max(1, len(pairs)), 4)}


def start_sim(tokenizer: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "adapters.sim", "--port", str(port),
                             "--model", "bench", "--tokenizer", tokenizer, "--time-scale", "100",
                             "--log-level", "warning"], cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the simulator engine did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory with one")
    p.add_argument("--engine", help="an engine serving that tokenizer (default: a sim engine)")
    p.add_argument("--model", default="bench", help="its served model name")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--n", type=int, default=300, help="prompts per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    counter = load_counter(args.tokenizer)
    others = {"heuristic": HEURISTIC}
    try:
        others["tiktoken:cl100k_base"] = load_counter("tiktoken:cl100k_base")
    except TokenizerUnavailable as e:
        print(f"(cl100k_base skipped: {e})", file=sys.stderr)
    sets = load_prompts(args.data, args.n, args.seed)
    report: dict[str, Any] = {"tokenizer": counter.name, "chat_format": repr(counter.chat),
                              "cost": cost(counter, sets["sharegpt"] + sets["code"])}
    proc = None
    url = args.engine
    if url is None:
        port = 18000 + os.getpid() % 1000
        proc = start_sim(args.tokenizer, port)
        url = f"http://127.0.0.1:{port}"
    try:
        report["engine"] = url if args.engine else "sim engine (--tokenizer)"
        for name, prompts in sets.items():
            truth = engine_counts(url, args.model, prompts)
            report[name] = {"tokenizer": agreement(counter, prompts, truth),
                            **{k: agreement(c, prompts, truth) for k, c in others.items()}}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

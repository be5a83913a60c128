"""Simulator fidelity against real vLLM on CPU (prints a table; not a test).

1. **Calibrate** a step-time profile for the tiny Llama (tests/vllm_cpu/build_tiny_model.py)
   on vLLM-CPU on this machine, fitting ``T(N) = max(a + b*N, c*N)`` plus decode attention:

   - decode steps at 1, 2, 4 and 8 concurrent requests: the latency difference between
     ``max_tokens`` ``L2`` and ``L1`` (same prompts, ``ignore_eos``) over ``L2 - L1`` is the
     step time at ``N`` = batch size; prefill and HTTP overhead cancel out;
   - decode attention: the same at one request with a 700-token prompt; the extra time per
     step over the short prompt gives the effective bandwidth (``kv_bytes_per_token`` is the
     tiny model's real 1024 bytes); no extra time means no attention term;
   - prefill: one request of ``P`` prompt tokens and ``max_tokens`` 1 for several ``P``,
     minus the HTTP/server overhead of the simulator itself (measured on a zero-cost
     profile), so that the simulator does not count it twice.

   ``a``, ``b``, the attention cost per context token and ``request_overhead_ms`` (latency
   outside the engine: vLLM's API server) are fitted jointly by non-negative least squares
   on relative errors, then ``c`` by a 1-D search (see :func:`fit`). The CPU cost of a
   step is part of ``a`` here (model and scheduler share the same cores), so
   ``cpu_ms_per_step`` is 0. The profile is written as JSON for ``--profile-file``.
2. **Compare** the same request mix (token-id prompts of 32/128/384 tokens, 32/96/192 output
   tokens, all distinct so prefix caching cannot help) on vLLM and on the calibrated
   simulator: closed loops of 1, 2, 4 and 8 streams, then 8 streams with a KV cache of 63
   usable 32-token blocks (``--num-gpu-blocks-override 64`` / ``--kv-capacity-tokens 2016``).
   Throughput is output tokens per wall second, TTFT is seen by a streaming client,
   preemptions come from ``vllm:num_preemptions_total``.
3. **Report**: a markdown table with the sim/vLLM ratios, appended with the date, host and
   load average (and the raw JSON) to ``docs/simulator-fidelity.md``.

ONE engine runs at a time; each is started in its own process group and the group is killed.

Usage: .venv/bin/python bench/sim_fidelity.py [--vllm-python .vllm-venv/bin/python]
    [--out docs/simulator-fidelity.md] [--profile-dir bench/profiles] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from adapters.vllm_cpu import build_tiny_model, vllm_env

REPO = Path(__file__).resolve().parents[1]
SERVED = "tiny"
BLOCK = 32
MAX_SEQS = 8
BATCHED = 2048
MODEL_LEN = 1024
KV_BYTES = 1024  # tiny Llama: 2 layers x (K+V) x 4 heads x 32 dims x 2 bytes
BIG_KV_TOKENS = (1 << 30) // KV_BYTES  # VLLM_CPU_KVCACHE_SPACE=1 GiB
PRESSURE_BLOCKS = 64  # 63 usable
PRESSURE_KV_TOKENS = (PRESSURE_BLOCKS - 1) * BLOCK
NO_ATTENTION_BW = 1e18
VLLM_ENV = vllm_env()  # adapters/vllm_cpu.py: what every CPU engine needs
VLLM_ARGS = [
    "--enforce-eager", "--dtype", "bfloat16", "--distributed-executor-backend", "uni",
    "--seed", "0", "--block-size", str(BLOCK), "--max-num-seqs", str(MAX_SEQS),
    "--max-model-len", str(MODEL_LEN), "--max-num-batched-tokens", str(BATCHED),
]  # fmt: skip


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- engines ------------------------------------------------------------------------------------
@contextmanager
def engine(argv: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> Iterator[str]:
    """Run one engine in its own process group until /health answers; kill the group after."""
    port = free_port()
    argv = [*argv, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent,
                                env={**os.environ, **env}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} not healthy within {timeout}s; see {log}")
            time.sleep(0.25)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # whatever of the group outlived its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def vllm_engine(python: str, model: Path, log: Path,
                extra: tuple[str, ...] = ()) -> AbstractContextManager[str]:
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", SERVED, *VLLM_ARGS, *extra]
    return engine(argv, {**VLLM_ENV, "VLLM_CACHE_ROOT": str(log.parent / "vllm-cache")}, log)


def sim_engine(profile: str, profile_file: Path, kv_tokens: int,
               log: Path) -> AbstractContextManager[str]:
    argv = [sys.executable, "-m", "adapters.sim", "--model", SERVED, "--profile", profile,
            "--profile-file", str(profile_file), "--kv-capacity-tokens", str(kv_tokens),
            "--max-num-seqs", str(MAX_SEQS), "--max-num-batched-tokens", str(BATCHED),
            "--max-model-len", str(MODEL_LEN), "--log-level", "warning"]
    return engine(argv, {"PYTHONPATH": str(REPO)}, log, timeout=60)


# -- client -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Req:
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Result:
    latency_s: float
    ttft_s: float
    tokens: int


_rng = random.Random(0)


def prompt(n: int) -> list[int]:
    """Distinct token ids (no prefix-cache hits), avoiding the tiny tokenizer's specials."""
    return [_rng.randrange(16, 1000) for _ in range(n)]


async def one(client: httpx.AsyncClient, url: str, r: Req) -> Result:
    body = {"model": SERVED, "prompt": r.prompt, "max_tokens": r.max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    t0 = time.perf_counter()
    ttft = -1.0
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft < 0 and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Result(time.perf_counter() - t0, ttft, tokens)


async def closed_loop(url: str, reqs: list[Req], streams: int) -> tuple[list[Result], float]:
    """``streams`` workers take the requests in order; returns results and wall seconds."""
    queue = list(reversed(reqs))
    out: list[Result] = []
    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            while queue:
                out.append(await one(client, url, queue.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        return out, time.perf_counter() - t0


def run(url: str, reqs: list[Req], streams: int) -> tuple[list[Result], float]:
    return asyncio.run(closed_loop(url, reqs, streams))


def preemptions(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


# -- calibration ----------------------------------------------------------------------------------
DECODE_L1, DECODE_L2 = 32, 256
PREFILL_LENS = (64, 256, 512, 900)
CTX_SHORT = 16 + (DECODE_L1 + DECODE_L2) // 4  # mean context of a short-prompt decode point
REPEATS = 3


def decode_latencies(url: str, batch: int, prompt_len: int = 16) -> tuple[float, float]:
    """Median latency of ``batch`` concurrent requests at ``max_tokens`` L1, then at L2."""
    out = []
    for n in (DECODE_L1, DECODE_L2):
        res, _ = run(url, [Req(prompt(prompt_len), n) for _ in range(batch)], batch)
        out.append(statistics.median(r.latency_s for r in res))
    return out[0], out[1]


def prefill_s(url: str, n: int, reps: int = 5) -> float:
    """Median client-side TTFT of one request with ``n`` prompt tokens on an idle engine."""
    return statistics.median(run(url, [Req(prompt(n), 1)], 1)[0][0].ttft_s for _ in range(reps))


def measure(url: str, cycles: int = 5) -> dict[str, Any]:
    """Calibration points; the cases are interleaved over ``cycles`` rounds and each point
    is a median over the rounds, so that a burst of load elsewhere hits all of them alike."""
    run(url, [Req(prompt(32), 16) for _ in range(4)], 4)  # warm-up
    keys: list[tuple[int, int]] = [(1, 16), (2, 16), (4, 16), (8, 16), (1, 700)]
    lat: dict[tuple[int, int], list[tuple[float, float]]] = {k: [] for k in keys}
    ttft: dict[int, list[float]] = {p: [] for p in (16, *PREFILL_LENS)}
    for _ in range(cycles):
        for batch, plen in keys:
            lat[batch, plen].append(decode_latencies(url, batch, plen))
        for p in ttft:
            ttft[p].append(run(url, [Req(prompt(p), 1)], 1)[0][0].ttft_s)

    def step(k: tuple[int, int]) -> float:
        l1 = statistics.median(x for x, _ in lat[k])
        l2 = statistics.median(y for _, y in lat[k])
        return (l2 - l1) / (DECODE_L2 - DECODE_L1)

    return {"decode_step_s": {b: step((b, 16)) for b in (1, 2, 4, 8)},
            "decode_step_s_ctx700": step((1, 700)),
            "prefill_latency_s": {p: statistics.median(v) for p, v in ttft.items()}}


def _nnls(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0, by trying each subset of them (4 here)."""
    n = len(rows[0])
    best: tuple[float, list[float]] = (math.inf, [0.0] * n)
    for mask in range(1, 1 << n):
        cols = [k for k in range(n) if mask >> k & 1]
        x, *_ = np.linalg.lstsq(np.array([[r[k] for k in cols] for r in rows]), np.array(ys),
                                rcond=None)
        if min(x) < 0:
            continue
        coef = [0.0] * n
        for k, v in zip(cols, x, strict=True):
            coef[k] = float(v)
        err = sum((sum(c * v for c, v in zip(coef, r, strict=True)) - y) ** 2
                  for r, y in zip(rows, ys, strict=True))
        if err < best[0]:
            best = (err, coef)
    return best[1]


def fit(m: dict[str, Any], sim_overhead_s: float, host: str) -> dict[str, Any]:
    """Fit ``a``, ``b``, the attention cost per context token ``k`` (-> bandwidth) and the
    request overhead ``o`` jointly (relative errors, all >= 0), then ``c`` by a 1-D search.

    decode step, B requests of mean context X:  a + b*B + k*B*X
    TTFT - simulator's own overhead, P tokens:  o + max(a + b*P, c*P)
    """
    pts: list[tuple[str, list[float], float]] = []  # (label, [a, b, k, o] features, ms)
    for batch, t in m["decode_step_s"].items():
        pts.append((f"decode N={batch}", [1, batch, batch * CTX_SHORT, 0], t * 1000))
    ctx_long = CTX_SHORT + 684
    pts.append((f"decode N=1 ctx~{ctx_long}", [1, 1, ctx_long, 0], m["decode_step_s_ctx700"] * 1000))
    for p, t in m["prefill_latency_s"].items():
        pts.append((f"TTFT P={p}", [1, p, 0, 1], max(t - sim_overhead_s, 1e-4) * 1000))
    a, b, k, o = _nnls([[f / y for f in x] for _, x, y in pts], [1.0] * len(pts))
    prefill = [(x[1], y) for label, x, y in pts if label.startswith("TTFT")]

    def err(c: float) -> float:
        return sum(((o + max(a + b * n, c * n)) / y - 1) ** 2 for n, y in prefill)

    c = min((i * 0.0005 for i in range(2001)), key=err)  # 0 .. 1 ms/token
    bw = KV_BYTES / (k / 1000) if k > 0 else NO_ATTENTION_BW
    profile = {
        "name": f"tiny-llama-cpu-{host}", "a_ms": round(a, 4), "b_ms": round(b, 5),
        "c_ms": round(c, 5), "kv_bytes_per_token": KV_BYTES, "max_num_batched_tokens": BATCHED,
        "max_num_seqs": MAX_SEQS, "bandwidth_bytes_per_s": float(f"{bw:.4g}"),
        "gpu_memory_bytes": 1 << 30, "weight_bytes": 1_200_000, "cpu_ms_per_step": 0.0,
        "request_overhead_ms": round(o, 3),
    }  # fmt: skip

    def model_ms(x: list[float]) -> float:
        _, n, ctx, over = x
        return over * o + (max(a + b * n, c * n) if over else a + b * n) + k * ctx

    residuals = {label: (model_ms(x), y) for label, x, y in pts}
    return {"profile": profile, "fit_ms": residuals, "sim_overhead_s": sim_overhead_s}


# -- comparison ----------------------------------------------------------------------------------
def workload(n: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    return [Req(prompt(rng.choice((32, 128, 384))), rng.choice((32, 96, 192))) for _ in range(n)]


CASES: list[tuple[str, int, int]] = [  # (case, streams, requests)
    ("sweep", 1, 12), ("sweep", 2, 16), ("sweep", 4, 24), ("sweep", 8, 32),
]
PRESSURE: tuple[str, int, int] = ("kv-pressure", 8, 32)


def summarize(res: list[Result], wall: float, preempted: float) -> dict[str, float]:
    tokens = sum(r.tokens for r in res)
    return {"requests": len(res), "output_tokens": tokens, "wall_s": round(wall, 3),
            "throughput_tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(statistics.median(r.ttft_s for r in res) * 1000, 1),
            "preemptions": preempted}  # fmt: skip


def compare(url: str, cases: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    run(url, [Req(prompt(32), 16) for _ in range(4)], 4)  # warm-up
    rows = []
    for i, (case, streams, n) in enumerate(cases):
        reps = []
        for rep in range(REPEATS):
            before = preemptions(url)
            res, wall = run(url, workload(n, seed=100 + 10 * i + rep), streams)
            time.sleep(1.5)  # let the counter settle
            reps.append(summarize(res, wall, preemptions(url) - before))
        row: dict[str, Any] = {"case": case, "streams": streams}
        for k in ("throughput_tok_s", "ttft_p50_ms", "preemptions"):
            row[k] = statistics.median(r[k] for r in reps)
            row[k + "_range"] = (min(r[k] for r in reps), max(r[k] for r in reps))
        row["runs"] = reps
        rows.append(row)
        say(f"  {case} x{streams}: {[(r['throughput_tok_s'], r['ttft_p50_ms']) for r in reps]}")
    return rows


def ratio(s: float, v: float) -> str:
    return f"{s / v:.2f}" if v else ("—" if not s else "∞")


def table(vllm: list[dict[str, Any]], sim: list[dict[str, Any]]) -> str:
    """Medians of the repeats, with (min-max) after them; ratios are sim / vLLM."""
    lines = [
        "| case | streams | vLLM tok/s | sim tok/s | ratio | vLLM TTFT p50 (ms) | sim TTFT p50 (ms) "
        "| ratio | vLLM preemptions | sim preemptions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict[str, Any], k: str, digits: int) -> str:
        lo, hi = row[k + "_range"]
        return f"{row[k]:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"

    for v, s in zip(vllm, sim, strict=True):
        tput = ratio(s["throughput_tok_s"], v["throughput_tok_s"])
        ttft = ratio(s["ttft_p50_ms"], v["ttft_p50_ms"])
        lines.append(
            f"| {v['case']} | {v['streams']} | {cell(v, 'throughput_tok_s', 0)} "
            f"| {cell(s, 'throughput_tok_s', 0)} | {tput} | {cell(v, 'ttft_p50_ms', 1)} "
            f"| {cell(s, 'ttft_p50_ms', 1)} | {ttft} | {cell(v, 'preemptions', 0)} "
            f"| {cell(s, 'preemptions', 0)} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=str(REPO / ".vllm-venv" / "bin" / "python"))
    ap.add_argument("--out", default=str(REPO / "docs" / "simulator-fidelity.md"))
    ap.add_argument("--profile-dir", default=str(REPO / "bench" / "profiles"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    host = socket.gethostname().split(".")[0].lower() or "local"
    load_before = os.getloadavg()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sim-fidelity-") as tmp_s:
        tmp = Path(tmp_s)
        model = tmp / "tiny"
        say("building the tiny model ...")
        build_tiny_model(args.vllm_python, model)
        # the simulator's own HTTP/server overhead, on a zero-cost profile
        zero = {"name": "zero", "a_ms": 0.0, "b_ms": 0.0, "c_ms": 0.0, "kv_bytes_per_token": KV_BYTES,
                "max_num_batched_tokens": BATCHED, "max_num_seqs": MAX_SEQS,
                "bandwidth_bytes_per_s": NO_ATTENTION_BW, "gpu_memory_bytes": 1 << 30,
                "weight_bytes": 0, "cpu_ms_per_step": 0.0}  # fmt: skip
        zero_file = tmp / "zero.json"
        zero_file.write_text(json.dumps(zero))
        with sim_engine("zero", zero_file, BIG_KV_TOKENS, tmp / "sim-zero.log") as url:
            run(url, [Req(prompt(16), 1) for _ in range(4)], 1)
            overhead = statistics.median(prefill_s(url, 16) for _ in range(3))
        say(f"simulator overhead per request: {overhead * 1000:.1f} ms")
        say("vLLM (1 GiB KV): calibrating ...")
        with vllm_engine(args.vllm_python, model, tmp / "vllm.log") as url:
            measured = measure(url)
            say(f"  measured: {measured}")
            calib = fit(measured, overhead, host)
            say(f"  profile: {calib['profile']}")
            say("vLLM (1 GiB KV): sweep ...")
            vllm_rows = compare(url, CASES)
        say(f"vLLM ({PRESSURE_BLOCKS} blocks): KV pressure ...")
        with vllm_engine(args.vllm_python, model, tmp / "vllm-small.log",
                         ("--num-gpu-blocks-override", str(PRESSURE_BLOCKS))) as url:
            vllm_rows += compare(url, [PRESSURE])
        profile_file = tmp / "profile.json"
        profile_file.write_text(json.dumps(calib["profile"], indent=1))
        name = calib["profile"]["name"]
        say("simulator: sweep ...")
        with sim_engine(name, profile_file, BIG_KV_TOKENS, tmp / "sim.log") as url:
            sim_rows = compare(url, CASES)
        say("simulator: KV pressure ...")
        with sim_engine(name, profile_file, PRESSURE_KV_TOKENS, tmp / "sim-small.log") as url:
            sim_rows += compare(url, [PRESSURE])
    load_after = os.getloadavg()
    md = table(vllm_rows, sim_rows)
    print(md)
    raw = {"host": host, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
           "runtime_s": round(time.monotonic() - t_start, 1), "calibration": measured,
           **calib, "vllm": vllm_rows, "sim": sim_rows}  # fmt: skip
    if args.no_write:
        print(json.dumps(raw, indent=1, default=str))
        return 0
    pdir = Path(args.profile_dir)
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / f"{name}.json").write_text(json.dumps(calib["profile"], indent=1) + "\n")
    fit_rows = "\n".join(f"| {k} | {m:.2f} | {v:.2f} | {m / v:.2f} |"
                         for k, (m, v) in calib["fit_ms"].items() if v)
    section = f"""
## {raw['date']} on `{host}` ({raw['cpus']} CPUs, load average {load_before[0]:.2f} before, \
{load_after[0]:.2f} after; {raw['runtime_s']:.0f} s)

Profile `{name}` (`bench/profiles/{name}.json`): a = {calib['profile']['a_ms']} ms,
b = {calib['profile']['b_ms']} ms/token, c = {calib['profile']['c_ms']} ms/token,
bandwidth {calib['profile']['bandwidth_bytes_per_s']:.3g} B/s, CPU per step 0 (inside a),
request overhead {calib['profile']['request_overhead_ms']} ms; the simulator's own HTTP overhead
({overhead * 1000:.1f} ms, on a zero-cost profile) is subtracted from the TTFT points.

| calibration point | model (ms) | measured (ms) | ratio |
|---|---|---|---|
{fit_rows}

{md}

<details><summary>raw JSON</summary>

```json
{json.dumps(raw, indent=1, default=str)}
```
</details>
"""
    out = Path(args.out)
    if not out.exists():
        out.write_text(HEADER)
    with out.open("a") as fh:
        fh.write(section)
    say(f"appended to {out}")
    return 0


HEADER = """# Simulator fidelity: calibrated simulator vs real vLLM (CPU)

Produced by `bench/sim_fidelity.py` (see its docstring for the method). Each run appends a
section: the calibrated profile, how well it fits the calibration points, and the same
request mix on real vLLM 0.32 (CPU, tiny Llama) and on the simulator with that profile.
Cells are medians over 3 runs of each case (min-max in brackets); ratios are sim / vLLM
of the medians. The target is 0.8-1.2 on throughput and median TTFT.
"""


if __name__ == "__main__":
    raise SystemExit(main())

"""How much load one simulator process sustains on one core (prints a table; not a test).

For each (time scale, tokens per SSE event, concurrency) it starts ``python -m adapters.sim``
pinned to one CPU (``taskset``, when available), keeps ``concurrency`` streaming chat requests
in flight with a minimal raw-socket client (``ignore_eos`` + ``max_tokens``, so every request
generates exactly that many tokens), and measures over a window after a warm-up:

- generated tokens per wall second (from ``vllm:generation_tokens_total``) and SSE events/s;
- "engine busy": simulated seconds spent in steps per simulated second (about 100 % under
  load; it only counts steps, so it stays below 100 % when the process lags);
- ``lag``: the share of simulated time lost because the process could not keep up
  (``sim:lag_seconds_total``); the simulator *sustains* a load when lag stays under 2 %;
- the simulator's CPU use (share of one core) and CPU milliseconds per 1000 tokens;
- "waiting for CPU": share of wall time the simulator was runnable but another process held
  its core (``/proc/PID/schedstat``); when it is high the lag is the machine's, not ours.

Usage: python bench/sim_capacity.py [--concurrency 64 256 1024] [--time-scales 1 10] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from adapters.sim.profiles import PROFILES

PROMPT = "word " * 80  # 100 tokens of text, 107 with the chat template


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_seconds(pid: int) -> float:
    """Time the simulator was runnable but waiting for a CPU (other processes on its core)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(("vllm:", "sim:")) and "{" in line:
            name = line.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def stream_forever(
    port: int, body: bytes, stop: asyncio.Event, counts: list[int], delay: float = 0.0
) -> None:
    """One client connection: send a streaming request, read to [DONE], repeat (keep-alive)."""
    await asyncio.sleep(delay)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        while not stop.is_set():
            writer.write(head + body)
            tail = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                tail = (tail + data)[-64:]
                if b"[DONE]" in tail:
                    # chunked encoding terminator follows [DONE]
                    while not tail.endswith(b"0\r\n\r\n"):
                        more = await reader.read(65536)
                        if not more:
                            return
                        tail = (tail + more)[-64:]
                    break
            counts[0] += 1
    finally:
        writer.close()


@dataclass
class Result:
    scale: float
    tpe: int
    concurrency: int
    tok_s: float
    events_s: float
    sim_tok_s: float
    busy: float
    lag: float
    cpu: float
    cpu_ms_per_1k: float
    cpu_wait: float


def run_one(args: argparse.Namespace, scale: float, tpe: int, conc: int) -> Result:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "adapters.sim",
        "--port",
        str(port),
        "--model",
        "m",
        "--profile",
        args.profile,
        "--time-scale",
        str(scale),
        "--tokens-per-event",
        str(tpe),
        "--max-num-seqs",
        str(max(conc, 1)),
        "--log-level",
        "warning",
    ]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.cpu), *cmd]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = json.dumps(
            {
                "model": "m",
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        return asyncio.run(_measure(args, url, port, proc.pid, body, scale, tpe, conc))
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def _measure(
    args: argparse.Namespace,
    url: str,
    port: int,
    pid: int,
    body: bytes,
    scale: float,
    tpe: int,
    conc: int,
) -> Result:
    stop = asyncio.Event()
    counts = [0]
    # staggered starts, so the window sees a steady mix of prefills and decodes
    tasks = [
        asyncio.create_task(stream_forever(port, body, stop, counts, args.warmup * i / conc))
        for i in range(conc)
    ]
    await asyncio.sleep(args.warmup)
    m0, c0, t0 = await asyncio.to_thread(scrape, url), cpu_seconds(pid), time.perf_counter()
    w0 = runqueue_wait_seconds(pid)
    await asyncio.sleep(args.duration)
    m1, c1, t1 = await asyncio.to_thread(scrape, url), cpu_seconds(pid), time.perf_counter()
    w1 = runqueue_wait_seconds(pid)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = t1 - t0
    tokens = m1["vllm:generation_tokens_total"] - m0["vllm:generation_tokens_total"]
    events = tokens / tpe  # approximately: first token alone, then groups of tpe
    lag = (m1["sim:lag_seconds_total"] - m0["sim:lag_seconds_total"]) / (wall * scale)
    cpu = (c1 - c0) / wall
    if os.environ.get("SIM_BENCH_DEBUG"):
        d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
        print(
            f"  debug: wall {wall:.2f}s steps {d['sim:steps_total']:.0f} busy {d['sim:busy_seconds_total']:.2f}s"
            f" lag {d['sim:lag_seconds_total']:.2f}s running {m1['vllm:num_requests_running']}"
            f" requests done {counts[0]} runqueue wait {w1 - w0:.2f}s",
            flush=True,
        )
    return Result(
        scale,
        tpe,
        conc,
        tokens / wall,
        events / wall,
        tokens / wall / scale,
        (m1["sim:busy_seconds_total"] - m0["sim:busy_seconds_total"]) / (wall * scale),
        lag,
        cpu,
        1e6 * (c1 - c0) / max(tokens, 1),
        (w1 - w0) / wall,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--profile", default="llama3-8b-a100", choices=sorted(PROFILES))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--time-scales", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--tokens-per-event", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--cpu", type=int, default=0, help="CPU to pin the simulator to")
    args = ap.parse_args()
    others = sorted(set(os.sched_getaffinity(0)) - {args.cpu})
    if others:  # keep the load generator off the simulator's core
        os.sched_setaffinity(0, others)
    print(
        f"profile {args.profile}, prompt 100 tokens, {args.max_tokens} output tokens per request,"
        f" simulator pinned to CPU {args.cpu}\n"
    )
    print(
        "| time scale | tokens/event | streams | tokens/s (wall) | SSE events/s | sim tokens/s |"
        " engine busy | lag | CPU (1 core) | CPU ms / 1k tokens | waiting for CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for scale in args.time_scales:
        for tpe in args.tokens_per_event:
            for conc in args.concurrency:
                try:
                    r = run_one(args, scale, tpe, conc)
                except (httpx.HTTPError, OSError) as e:
                    print(f"| {scale:g} | {tpe} | {conc} | failed: {e!r} |", flush=True)
                    continue
                print(
                    f"| {r.scale:g} | {r.tpe} | {r.concurrency} | {r.tok_s:,.0f} | {r.events_s:,.0f} |"
                    f" {r.sim_tok_s:,.0f} | {100 * r.busy:.0f} % | {100 * r.lag:.1f} % |"
                    f" {100 * r.cpu:.0f} % | {r.cpu_ms_per_1k:.1f} | {100 * r.cpu_wait:.0f} % |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

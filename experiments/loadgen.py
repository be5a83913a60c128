"""Open-loop replay of a workload file against a local OpenAI-compatible endpoint.

Every request leaves at its ``arrival_s`` (divided by ``--speedup``) whatever the earlier ones
are doing, so an overloaded server faces a growing number of open streams, not a slower
sender. Each request is streamed with ``stream_options.include_usage`` under its tenant's API
key, with ``x-request-id`` = the workload's ``id``, and recorded in one CSV row
(:data:`experiments.record.COLUMNS`):

``request_id, tenant, qos_class`` -- from the workload; ``intended_s`` (arrival_s / speedup),
``dispatched_s`` (the generator started the request), ``sent_s`` (its bytes were written,
after connecting), ``first_token_s``, ``done_s`` -- seconds from the replay's start (``t0``;
its Unix time is in the summary); ``lag_s = dispatched_s - intended_s`` (the generator's own
lateness); ``connect_s = sent_s - dispatched_s`` (getting a connection: long when the server
accepts late); ``ttft_s = first_token_s - dispatched_s`` and ``e2e_s = done_s -
dispatched_s`` (successes only) -- latency as the client sees it, connecting included;
``status`` (HTTP, 0: no answer); ``error`` (empty on success; else the server's OpenAI error
``code`` such as ``rate_limit_exceeded`` or ``queue_timeout``, or ``timeout``,
``connect_error``, ``stream_broken``, ``incomplete``, ``cancelled``, ``loadgen_overflow``);
``retry_after_s`` (from ``retry-after-ms`` / ``retry-after``); ``prompt_tokens`` /
``completion_tokens`` (the server's ``usage``); ``finish_reason``; ``n_events`` (SSE
events); ``expected_prompt_tokens`` / ``expected_output_tokens`` (the workload's truth).

The run is bounded by count (``--max-requests``), by time (``--duration``: only requests that
arrive before it; ``--drain-timeout``: how long to wait for the last answers, after which
they are cancelled) and per request (``--request-timeout``). It reports its own lag from the
intended times (p50 / p99 / max), its CPU use and the most requests it had in flight: if the
lag p99 is more than a few milliseconds, the generator, not the server, was the bottleneck.
Loopback only. Several ``--base-url`` values (comma-separated: gateway replicas) get the
requests round-robin, in arrival order, as a load balancer would spread them.

Example::

    python -m experiments.loadgen w.jsonl --base-url http://127.0.0.1:8000 \\
        --keys-file keys.json --model sim-llama3-8b --out results/requests.csv
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import ipaddress
import json
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from experiments.clients import Client, Prepared, make_client
from experiments.record import CANCELLED, COLUMNS, OVERFLOW, TIMEOUT, Record, csv_row
from experiments.workload_file import Request, Workload, WorkloadError, load_workload

perf = time.perf_counter
START_LEAD_S = 0.05  # t0 is this far after the replay is set up


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def runqueue_wait_seconds() -> float:
    """Time this process was runnable but another process held the CPU (Linux; else 0):
    when it is large, lag comes from a busy machine rather than from the generator."""
    try:
        with open("/proc/self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def check_loopback(base_url: str) -> None:
    """Raise ``ValueError`` unless ``base_url`` points at this machine."""
    host = httpx.URL(base_url).host
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"--base-url {base_url}: loopback only (127.0.0.0/8, ::1, localhost)")


def select(
    requests: Sequence[Request], max_requests: int | None, duration_s: float | None
) -> list[Request]:
    out = [r for r in requests if duration_s is None or r.arrival_s < duration_s]
    return out[:max_requests] if max_requests is not None else out


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(
    records: Sequence[Record],
    *,
    wall_s: float,
    cpu_s: float,
    max_inflight: int,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    lags = [r.lag_s for r in records if r.lag_s is not None]
    connects = [r.connect_s for r in records if r.connect_s is not None]
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    return {
        **extra,
        "requests": len(records),
        "sent": len(lags),
        "ok": len(ok),
        "errors": dict(Counter(r.error for r in records if r.error).most_common()),
        "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in records).items())},
        "wall_s": round(wall_s, 3),
        "lag_s": {"p50": _pct(lags, 50), "p99": _pct(lags, 99), "max": max(lags) if lags else None},
        "late_over_10ms": sum(1 for x in lags if x > 0.010),
        "connect_s": {
            "p50": _pct(connects, 50),
            "p99": _pct(connects, 99),
            "max": max(connects) if connects else None,
        },
        "max_inflight": max_inflight,
        "loadgen_cpu_s": round(cpu_s, 3),
        "loadgen_cpu_share": round(cpu_s / wall_s, 3) if wall_s > 0 else None,
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
    }


async def replay(
    workload: Workload,
    *,
    base_url: str,
    keys: Mapping[str, str],
    model: str,
    client: str = "raw",
    speedup: float = 1.0,
    max_requests: int | None = None,
    duration_s: float | None = None,
    request_timeout_s: float = 600.0,
    drain_timeout_s: float = 120.0,
    max_inflight: int = 10000,
    request_id_prefix: str = "",
    progress: bool = True,
    stop: asyncio.Event | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """Replay ``workload`` open-loop; returns every request's record and the summary.
    ``base_url``: one URL, or several comma-separated (round-robin over them).

    ``stop`` (optional) ends the replay early: nothing more is sent and what is in flight is
    cancelled (recorded as ``cancelled``).
    """
    urls = base_urls(base_url)
    for u in urls:
        check_loopback(u)
    if speedup <= 0:
        raise ValueError("speedup must be > 0")
    reqs = select(workload.requests, max_requests, duration_s)
    missing = sorted({r.tenant for r in reqs} - set(keys))
    if missing:
        raise ValueError(f"no API key for tenant(s) {', '.join(missing)}")
    clients: list[Client] = [make_client(client, u) for u in urls]
    records, prepared = [], []
    for i, r in enumerate(reqs):
        p = Prepared(r.path, r.body(model), keys[r.tenant], request_id_prefix + r.id,
                     r.output_tokens)  # fmt: skip
        cl = clients[i % len(clients)]
        cl.prepare(p)
        prepared.append((cl, p))
        records.append(
            Record(
                r.id,
                r.tenant,
                r.qos_class,
                r.arrival_s / speedup,
                expected_prompt_tokens=r.prompt_tokens,
                expected_output_tokens=r.output_tokens,
            )
        )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    inflight: set[asyncio.Task[None]] = set()
    bar = tqdm(
        total=len(records),
        unit="req",
        disable=not progress,
        mininterval=0.5,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    peak = 0
    t0 = perf() + START_LEAD_S
    t0_unix = time.time() + START_LEAD_S
    c0, q0 = cpu_seconds(), runqueue_wait_seconds()

    async def one(cl: Client, p: Prepared, rec: Record) -> None:
        rec.dispatched_s = perf() - t0
        try:
            async with asyncio.timeout(request_timeout_s):
                await cl.send(p, rec, t0)
        except TimeoutError:
            rec.fail(TIMEOUT, perf() - t0)
        except asyncio.CancelledError:
            rec.fail(CANCELLED, perf() - t0)
            raise
        finally:
            bar.update(1)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            errs = sum(1 for r in records if r.error)
            lags = [r.lag_s for r in records[max(0, sent - 200) : sent] if r.lag_s is not None]
            bar.set_postfix(
                inflight=len(inflight),
                errors=errs,
                lag_ms=f"{1000 * (max(lags) if lags else 0):.1f}",
                refresh=False,
            )

    drained = asyncio.Event()

    def _done(task: asyncio.Task[None]) -> None:
        inflight.discard(task)
        if not inflight:
            drained.set()

    tick = loop.create_task(ticker()) if progress else None
    sent = 0
    try:
        for rec, (cl, p) in zip(records, prepared, strict=True):
            delay = t0 + rec.intended_s - perf()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
            if stop.is_set():
                break
            if len(inflight) >= max_inflight:
                rec.fail(OVERFLOW, perf() - t0)
                bar.update(1)
                continue
            task = loop.create_task(one(cl, p, rec))
            sent += 1
            drained.clear()
            inflight.add(task)
            task.add_done_callback(_done)
            peak = max(peak, len(inflight))
        if inflight and not stop.is_set():
            waiters: set[asyncio.Task[bool]] = {
                loop.create_task(drained.wait()),
                loop.create_task(stop.wait()),
            }
            await asyncio.wait(
                waiters, timeout=drain_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()
    finally:
        pending = list(inflight)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for rec in records:
            if rec.dispatched_s is None and not rec.error:
                rec.fail(CANCELLED, perf() - t0)
        if tick is not None:
            tick.cancel()
        bar.close()
        for cl in clients:
            await cl.aclose()
    wall = perf() - t0
    summary = summarize(
        records,
        wall_s=wall,
        cpu_s=cpu_seconds() - c0,
        max_inflight=peak,
        extra={
            "t0_unix": round(t0_unix, 6),
            "client": client,
            "loadgen_runqueue_wait_s": round(runqueue_wait_seconds() - q0, 3),
            "base_url": base_url,
            "model": model,
            "speedup": speedup,
            "workload": workload.header.get("name"),
        },
    )
    return records, summary


def base_urls(text: str) -> list[str]:
    """The URLs of a ``--base-url`` value (comma-separated)."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError("--base-url: no URL given")
    return urls


def write_csv(path: str | Path, records: Sequence[Record]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in sorted(records, key=lambda r: (r.intended_s, r.request_id)):
            w.writerow(csv_row(r))


def load_keys(
    keys: str | None, keys_file: str | None, key: str | None, tenants: Sequence[str]
) -> dict[str, str]:
    """tenant -> API key: ``--keys a=k1,b=k2``, then ``--keys-file`` (JSON object), then
    ``--key`` for every tenant still without one."""
    out: dict[str, str] = {}
    if keys_file:
        data = json.loads(Path(keys_file).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{keys_file}: expected a JSON object tenant -> key")
        out.update(data)
    for part in filter(None, (keys or "").split(",")):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--keys: {part.split('=')[0]!r}: use tenant=key")
        out[name.strip()] = value.strip()
    if key:
        for t in tenants:
            out.setdefault(t, key)
    return out


async def first_model(base_url: str, key: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
        r = await c.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.loadgen",
        description="Replay a workload open-loop (streaming) against a local OpenAI-compatible "
        "endpoint; one CSV row per request; reports its own lag.",
    )
    p.add_argument("workload", help="workload JSONL (prompts_dataset.py)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="loopback only; several comma-separated: round-robin over them")
    p.add_argument("--keys", default=None, help="tenant=key,... (never logged)")
    p.add_argument("--keys-file", default=None, help="JSON object tenant -> key")
    p.add_argument("--key", default=None, help="key for every tenant not given one otherwise")
    p.add_argument("--model", default=None, help="model to ask for (default: first of /v1/models)")
    p.add_argument("--out", required=True, help="per-request CSV")
    p.add_argument("--summary", default=None, help="summary JSON (default: OUT.summary.json)")
    p.add_argument(
        "--client",
        choices=["raw", "httpx", "openai"],
        default="raw",
        help="raw: httptools HTTP/1.1, the fastest (default)",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="send at arrival_s / SPEEDUP (match the simulator's --time-scale)",
    )
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="only requests arriving before this many seconds",
    )
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="after the last send, wait this long for answers, then cancel",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=10000,
        help="requests beyond this many in flight are not sent (loadgen_overflow)",
    )
    p.add_argument("--request-id-prefix", default="")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    return p


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(a: argparse.Namespace) -> tuple[list[Record], dict[str, Any]]:
    w = load_workload(a.workload)
    keys = load_keys(a.keys, a.keys_file, a.key, w.tenants)
    model = a.model or await first_model(base_urls(a.base_url)[0],
                                         next(iter(keys.values()), ""))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    records, summary = await replay(
        w,
        base_url=a.base_url,
        keys=keys,
        model=model,
        client=a.client,
        speedup=a.speedup,
        max_requests=a.max_requests,
        duration_s=a.duration,
        request_timeout_s=a.request_timeout,
        drain_timeout_s=a.drain_timeout,
        max_inflight=a.max_inflight,
        request_id_prefix=a.request_id_prefix,
        progress=not a.no_progress,
        stop=stop,
    )
    summary["interrupted"] = stop.is_set()
    return records, summary


def _report(a: argparse.Namespace, records: list[Record], summary: dict[str, Any]) -> int:
    write_csv(a.out, records)
    spath = a.summary or str(Path(a.out).with_suffix("")) + ".summary.json"
    Path(spath).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    lag = summary["lag_s"]
    ms = {k: (None if v is None else round(1000 * v, 2)) for k, v in lag.items()}
    print(
        f"loadgen: {summary['sent']}/{summary['requests']} sent, {summary['ok']} ok, errors "
        f"{summary['errors'] or '{}'}; lag ms p50 {ms['p50']} p99 {ms['p99']} max {ms['max']}; "
        f"max in flight {summary['max_inflight']}; CPU {summary['loadgen_cpu_share']} of a "
        f"core; -> {a.out}, {spath}",
        file=sys.stderr,
    )
    return 130 if summary["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        for u in base_urls(a.base_url):
            check_loopback(u)
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    _raise_nofile()
    use_uvloop = a.loop == "uvloop"
    if a.loop == "auto":
        try:
            import uvloop as _uvloop

            use_uvloop = _uvloop is not None
        except ImportError:
            use_uvloop = False
    try:
        if use_uvloop:
            import uvloop

            records, summary = uvloop.run(_main(a))
        else:
            records, summary = asyncio.run(_main(a))
        return _report(a, records, summary)
    except (WorkloadError, ValueError, OSError, httpx.HTTPError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

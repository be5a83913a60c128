"""Gateway overhead, side by side in one run: direct vs DriftSched (memory, redis) vs LiteLLM.

Not a test: it prints tables (and optionally writes JSON). See bench/README.md.

Every target fronts the same fast stub engine (``python -m adapters.stub_engine``, 32 tokens
per answer). Server processes run as real processes on loopback:

* core 0 (``taskset -c 0``): the process under test — DriftSched (memory store), DriftSched
  (redis store) and the LiteLLM proxy; only one of them carries load at a time;
* core 1: the stub engine and this script (the load generator).

Cells, each a short window after a warm-up, run target after target so that the machine's
noise falls on all of them alike:

1. closed loop, 1/16/64 concurrent clients, non-streaming and streaming: max throughput,
   latency, and CPU per request of the process under test (``/proc/PID/stat``);
2. open loop at fixed rates (50/200/400 req/s, non-streaming): p50/p99 latency, and the
   latency *added* over direct-to-stub at the same rate. A target whose closed-loop maximum
   is below a rate is not driven at it (``overload``), since its queue would only grow.

Usage: python bench/gateway_bench.py [--duration 3] [--targets direct,memory,redis,litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Result, closed_loop, open_loop, render_request

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODEL = "stub"
TENANT_KEY = "sk-bench-" + "k" * 24
LITELLM_KEY = "sk-bench-litellm-master"
ADMIN_KEY = "adm-bench"
TICK = os.sysconf("SC_CLK_TCK")
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say something short, please."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_tree_cpu(pid: int) -> tuple[float, float]:
    """``(cpu, runq)`` seconds of ``pid`` and its live descendants, all threads.

    ``cpu``: utime + stime (``/proc/PID/stat``); ``runq``: time spent runnable but waiting
    for a core (``/proc/PID/task/TID/schedstat``) — high when other processes hold the core.
    """
    cpu = runq = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{p}/task/{task}/schedstat") as f:
                        runq += int(f.read().split()[1]) / 1e9
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, IndexError, ValueError):
            continue
    return cpu, runq


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    ready_path: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}); log:\n"
                    + self.log.read_text()[-3000:]
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name} not ready after {timeout}s; log:\n" + self.log.read_text()[-3000:]
        )

    def cpu(self) -> tuple[float, float]:
        return proc_tree_cpu(self.proc.pid) if self.proc else (0.0, 0.0)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@dataclass
class Target:
    name: str
    server: Server | None  # None: the stub itself (direct)
    headers: dict[str, str]

    def cpu(self) -> tuple[float, float]:
        return self.server.cpu() if self.server else (0.0, 0.0)


@dataclass
class Cell:
    kind: str  # "closed" | "open"
    stream: bool
    level: float  # concurrency or rate
    target: str
    res: Result | None = None
    target_cpu_s: float = 0.0
    target_runq_s: float = 0.0
    stub_cpu_s: float = 0.0
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.res
        out: dict[str, Any] = {
            "kind": self.kind,
            "stream": self.stream,
            "level": self.level,
            "target": self.target,
            "skipped": self.skipped,
        }
        if r is not None:
            n = r.ok + r.errors
            out.update(
                rate=r.rate,
                ok=r.ok,
                errors=r.errors,
                error_kinds=dict(r.error_kinds),
                p50_ms=r.pct(50) * 1e3,
                p90_ms=r.pct(90) * 1e3,
                p99_ms=r.pct(99) * 1e3,
                ttft_p50_ms=r.pct(50, "ttfts") * 1e3,
                cpu_ms_per_req=self.target_cpu_s / n * 1e3 if n else None,
                runq_ms_per_req=self.target_runq_s / n * 1e3 if n else None,
                per_core_rate=n / self.target_cpu_s if self.target_cpu_s else None,
                target_core=self.target_cpu_s / r.window_s if r.window_s else None,
                stub_core=self.stub_cpu_s / r.window_s if r.window_s else None,
                loadgen_core=r.loadgen_cpu_s / r.window_s if r.window_s else None,
                max_connections=r.max_connections,
            )
        return out


# -- set-up ------------------------------------------------------------------------------
def pin(core: int | None, nice: int = 0) -> list[str]:
    """Command prefix: ``taskset -c CORE`` (when pinning) and ``nice -n N`` (when not 0)."""
    out: list[str] = []
    if core is not None and shutil.which("taskset") is not None:
        out += ["taskset", "-c", str(core)]
    if nice:
        out += ["nice", "-n", str(nice)]
    return out


def driftsched_config(
    tmp: Path, name: str, port: int, stub_url: str, store: dict[str, Any]
) -> Path:
    cfg = {
        "server": {"host": HOST, "port": port, "access_log": False, "log_level": "warning"},
        "admin": {"api_key": ADMIN_KEY},
        "store": store,
        "upstreams": [{"name": "stub", "url": stub_url, "models": [MODEL]}],
        "tenants": [
            {
                "name": "bench",
                "qos_class": "standard",
                # limits far above the load, so every check runs and none refuses
                "rpm": 100_000_000,
                "tpm": 10_000_000_000,
                "max_concurrency": 100_000,
                "api_keys": [TENANT_KEY],
            }
        ],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def litellm_config(tmp: Path, stub_url: str) -> Path:
    cfg = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": stub_url + "/v1",
                    "api_key": "none",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cleanup_redis(url: str, prefix: str) -> None:
    with contextlib.suppress(Exception):
        import redis

        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


def sanity(target: Target, port: int) -> None:
    """One plain and one streamed request, checked end to end before measuring."""
    url = f"http://{HOST}:{port}/v1/chat/completions"
    r = httpx.post(url, json=BODY, headers=target.headers, timeout=30)
    if r.status_code != 200 or not r.json().get("choices"):
        raise RuntimeError(f"{target.name}: sanity request failed: {r.status_code} {r.text[:300]}")
    r = httpx.post(url, json={**BODY, "stream": True}, headers=target.headers, timeout=30)
    if r.status_code != 200 or "[DONE]" not in r.text or r.text.count("data:") < 33:
        raise RuntimeError(f"{target.name}: sanity stream failed: {r.status_code} {r.text[-300:]}")


# -- measuring ---------------------------------------------------------------------------
async def settle(target: Target, quiet: float = 0.10, limit_s: float = 5.0) -> None:
    """Wait until the process under test is idle (an overloaded one drains its queue)."""
    if target.server is None:
        await asyncio.sleep(0.2)
        return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        c0 = target.cpu()[0]
        await asyncio.sleep(0.2)
        if (target.cpu()[0] - c0) / 0.2 < quiet:
            return


@contextlib.contextmanager
def realtime(pids: list[int], on: bool) -> Iterator[None]:
    """SCHED_FIFO for ``pids`` (0 = this process) while the block runs, when ``on``.

    For the latency cells only: they use a fraction of a core, so other work on a shared
    machine is barely delayed, but it no longer adds its run-queue waits to our latencies.
    """
    if not on:
        yield
        return
    done: list[int] = []
    try:
        for pid in pids:
            try:
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
                done.append(pid)
            except (PermissionError, ProcessLookupError) as e:
                print(f"  (no real-time priority for pid {pid}: {e})", file=sys.stderr)
        yield
    finally:
        for pid in done:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


async def run_cell(
    cell: Cell,
    target: Target,
    port: int,
    stub: Server,
    duration: float,
    timeout_s: float,
    rt: bool = False,
) -> None:
    body = json.dumps({**BODY, "stream": True} if cell.stream else BODY).encode()
    raw = render_request(
        HOST, port, "/v1/chat/completions", body, {**target.headers, "connection": "keep-alive"}
    )
    await settle(target)
    marks: dict[str, tuple[float, float, float]] = {}

    def probe(which: str) -> None:
        cpu, runq = target.cpu()
        marks[which] = (cpu, runq, stub.cpu()[0])

    if cell.kind == "closed":
        res = await closed_loop(
            HOST, port, raw, int(cell.level), duration, probe=probe, timeout_s=timeout_s
        )
    else:
        pids = [0] + [s.proc.pid for s in (target.server, stub) if s is not None and s.proc]
        with realtime(pids, rt):
            res = await open_loop(
                HOST, port, raw, cell.level, duration, probe=probe, timeout_s=timeout_s
            )
    cell.res = res
    if "start" in marks and "end" in marks:
        cell.target_cpu_s = marks["end"][0] - marks["start"][0]
        cell.target_runq_s = marks["end"][1] - marks["start"][1]
        cell.stub_cpu_s = marks["end"][2] - marks["start"][2]


def fmt(x: float | None, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def print_tables(
    cells: list[Cell], targets: list[str], out: Callable[[str], None]
) -> dict[str, Any]:
    by = {(c.kind, c.stream, c.level, c.target): c for c in cells}
    summary: dict[str, Any] = {}
    head = (
        f"{'':>8} {'target':>8} | {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} | {'cpu ms/req':>10} "
        f"{'req/s/core':>10} {'core use':>8} {'runq ms/req':>11} | errors"
    )

    for stream in (False, True):
        levels = sorted({c.level for c in cells if c.kind == "closed" and c.stream == stream})
        if not levels:
            continue
        kind = "streaming, 32 chunks (streams/s)" if stream else "non-streaming"
        out(f"\n## Closed loop, {kind}: max throughput of the process under test")
        out(f"{'clients':>8} " + head[9:])
        best: dict[str, float] = {}
        best_core: dict[str, float] = {}
        for lv in levels:
            for t in targets:
                c = by.get(("closed", stream, lv, t))
                if c is None or c.res is None:
                    continue
                d = c.to_json()
                best[t] = max(best.get(t, 0.0), d["rate"])
                if d["per_core_rate"]:
                    best_core[t] = max(best_core.get(t, 0.0), d["per_core_rate"])
                proc = t != "direct"
                out(
                    f"{int(lv):>8} {t:>8} | {d['rate']:7.0f} {fmt(d['p50_ms'], 2):>8} "
                    f"{fmt(d['p99_ms'], 2):>8} | "
                    f"{fmt(d['cpu_ms_per_req'], 3) if proc else '-':>10} "
                    f"{fmt(d['per_core_rate'], 0) if proc else '-':>10} "
                    f"{(str(round(d['target_core'] * 100)) + '%') if proc else '-':>8} "
                    f"{fmt(d['runq_ms_per_req'], 3) if proc else '-':>11} | "
                    f"{c.res.errors or ''} {dict(c.res.error_kinds) if c.res.errors else ''}"
                )
        summary["max_stream" if stream else "max_plain"] = best
        summary["core_stream" if stream else "core_plain"] = best_core

    loads = [c.to_json() for c in cells if c.res is not None and c.kind == "closed"]
    lg = max((d["loadgen_core"] or 0 for d in loads), default=0.0)
    st = max((d["stub_core"] or 0 for d in loads), default=0.0)
    out(
        f"\ncore 1, highest share seen in a closed-loop cell: load generator {lg * 100:.0f}%, "
        f"stub engine {st * 100:.0f}%"
    )
    summary["loadgen_core_max"], summary["stub_core_max"] = lg, st

    rates = sorted({c.level for c in cells if c.kind == "open"})
    if rates:
        out(
            "\n## Open loop, non-streaming, fixed rate: latency, and added over direct at that rate"
        )
        out(
            f"{'req/s':>8} {'target':>8} | {'p50 ms':>7} {'p99 ms':>7} | {'+p50 ms':>8} "
            f"{'+p99 ms':>8} | {'cpu ms/req':>10} {'runq ms/req':>11} | errors"
        )
        added: dict[str, dict[str, tuple[float, float]]] = {}
        for rate in rates:
            base = by.get(("open", False, rate, "direct"))
            b50 = base.res.pct(50) * 1e3 if base and base.res else float("nan")
            b99 = base.res.pct(99) * 1e3 if base and base.res else float("nan")
            for t in targets:
                c = by.get(("open", False, rate, t))
                if c is None:
                    continue
                if c.res is None:
                    out(f"{int(rate):>8} {t:>8} | {c.skipped or '-'}")
                    continue
                d = c.to_json()
                p50, p99 = d["p50_ms"], d["p99_ms"]
                if t != "direct":
                    added.setdefault(t, {})[str(int(rate))] = (p50 - b50, p99 - b99)
                a50 = f"{p50 - b50:+8.2f}" if t != "direct" else f"{'':>8}"
                a99 = f"{p99 - b99:+8.2f}" if t != "direct" else f"{'':>8}"
                out(
                    f"{int(rate):>8} {t:>8} | {p50:7.2f} {p99:7.2f} | {a50} {a99} | "
                    f"{fmt(d['cpu_ms_per_req'], 3) if t != 'direct' else '-':>10} "
                    f"{fmt(d['runq_ms_per_req'], 3) if t != 'direct' else '-':>11} | "
                    f"{c.res.errors or ''} {dict(c.res.error_kinds) if c.res.errors else ''}"
                )
        summary["added_ms"] = added
    return summary


def print_verdict(summary: dict[str, Any], out: Callable[[str], None]) -> None:
    out("\n## DriftSched vs LiteLLM (targets: one worker on one core)")
    out(
        "measured = best closed-loop req/s in this run; per core = 1 / (CPU s per request), "
        "what one whole core would give (robust when other processes share the core)"
    )
    for t, need in (("memory", 10.0), ("redis", 5.0)):
        for kind, key in (("non-streaming", "plain"), ("streaming", "stream")):
            d, c = summary.get(f"max_{key}", {}), summary.get(f"core_{key}", {})
            if t not in d or not d.get("litellm"):
                continue
            r_meas = d[t] / d["litellm"]
            r_core = c[t] / c["litellm"] if c.get(t) and c.get("litellm") else float("nan")
            verdict = (
                "MET"
                if min(r_meas, r_core) >= need
                else ("MET per core" if r_core >= need else "MISSED")
            )
            out(
                f"{t:>7}/litellm {kind:>13}: measured {d[t]:6.0f}/{d['litellm']:4.0f} = "
                f"{r_meas:5.1f}x; per core {c.get(t, 0):6.0f}/{c.get('litellm', 0):4.0f} = "
                f"{r_core:5.1f}x  (>= {need:.0f}x: {verdict})"
            )
    for t in ("memory", "redis", "litellm"):
        a = summary.get("added_ms", {}).get(t, {}).get("200")
        if not a:
            continue
        line = f"{t:>7} added latency at 200 req/s: p50 {a[0]:+.2f} ms, p99 {a[1]:+.2f} ms"
        if t == "memory":
            ok = a[0] <= 1.0 and a[1] <= 3.0
            line += f"  (targets <= 1 / <= 3 ms: {'MET' if ok else 'MISSED'})"
        out(line)


# -- main --------------------------------------------------------------------------------
@contextlib.contextmanager
def servers_running(servers: list[Server], timeout: float) -> Iterator[None]:
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout)
        yield
    finally:
        for s in reversed(servers):
            s.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    p.add_argument("--targets", default="direct,memory,redis,litellm")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--rates", default="50,200,400")
    p.add_argument("--modes", default="plain,stream", help="closed-loop modes: plain,stream")
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument(
        "--realtime",
        action="store_true",
        help="run the open-loop latency cells at SCHED_FIFO priority (root): on a "
        "machine shared with other work, latency then shows the gateway, not "
        "the run queue",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this niceness (e.g. -10, as root, to "
        "keep other work on the machine from preempting them)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    p.add_argument("--json", help="also write every cell to this JSON file")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run DriftSched from another source tree, e.g. a `git worktree` of an "
        "older commit, as target LABEL (repeatable); the memory store, or the redis store "
        "when LABEL ends in 'redis' (e.g. old-redis=DIR)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument(
        "--litellm",
        metavar="PATH",
        help="the LiteLLM proxy CLI (default: .bench-venv/bin/litellm, made by `make bench` "
        "from the [bench] extra, else `litellm` beside this Python or on PATH)",
    )
    a = p.parse_args(argv)

    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    compare = dict(c.split("=", 1) for c in a.compare)
    targets += [label for label in compare if label not in targets]
    concs = [int(x) for x in a.concurrency.split(",") if x]
    rates = [float(x) for x in a.rates.split(",") if x]
    modes = [m.strip() == "stream" for m in a.modes.split(",") if m.strip()]
    two_cores = not a.no_pin and len(os.sched_getaffinity(0)) >= 2
    core_gw, core_load = (0, 1) if two_cores else (None, None)
    if core_load is not None:
        os.sched_setaffinity(0, {core_load})
    if a.nice:
        os.nice(a.nice)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    py = sys.executable
    stub_port = free_port()
    stub_url = f"http://{HOST}:{stub_port}"
    stub = Server(
        "stub",
        [
            *pin(core_load, a.nice),
            py,
            "-m",
            "adapters.stub_engine",
            "--port",
            str(stub_port),
            "--chunks",
            str(a.chunks),
            "--model",
            MODEL,
        ],
        stub_port,
        "/health",
        tmp / "stub.log",
    )
    servers = [stub]
    tmap: dict[str, tuple[Target, int]] = {"direct": (Target("direct", None, {}), stub_port)}
    prefix = f"gwbench-{uuid.uuid4().hex[:8]}"
    for t in targets:
        if t in ("memory", "redis") or t in compare:
            store = (
                {"type": "redis", "url": a.redis_url, "prefix": f"{prefix}-{t}"}
                if t.endswith("redis")
                else {"type": "memory"}
            )
            port = free_port()
            cfg = driftsched_config(tmp, t, port, stub_url, store)
            srv = Server(
                t,
                [
                    *pin(core_gw, a.nice),
                    py,
                    "-m",
                    "proxy.cli",
                    "serve",
                    "-c",
                    str(cfg),
                    "--port",
                    str(port),
                ],
                port,
                "/readyz",
                tmp / f"{t}.log",
                cwd=Path(compare[t]).resolve() if t in compare else ROOT,
            )
            servers.append(srv)
            tmap[t] = (Target(t, srv, {"authorization": f"Bearer {TENANT_KEY}"}), port)
        elif t == "litellm":
            exe = (
                a.litellm
                or shutil.which("litellm", path=str(ROOT / ".bench-venv" / "bin"))
                or shutil.which("litellm", path=str(Path(py).parent))
                or shutil.which("litellm")
            )
            if exe is None or not Path(exe).exists():
                print(
                    f"litellm CLI not found ({exe or 'make bench installs it'}); "
                    "skipping the LiteLLM reference",
                    file=sys.stderr,
                )
                continue
            port = free_port()
            cfg = litellm_config(tmp, stub_url)
            srv = Server(
                t,
                [
                    *pin(core_gw, a.nice),
                    exe,
                    "--config",
                    str(cfg),
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ],
                port,
                "/health/liveliness",
                tmp / "litellm.log",
                env={"LITELLM_LOG": "ERROR"},
            )
            servers.append(srv)
            tmap[t] = (Target(t, srv, {"authorization": f"Bearer {LITELLM_KEY}"}), port)
        elif t != "direct":
            p.error(f"unknown target {t!r}")
    targets = [t for t in targets if t in tmap]

    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t_begin = time.monotonic()
    cells: list[Cell] = []
    try:
        with servers_running(servers, timeout=180):
            for t in targets:
                sanity(tmap[t][0], tmap[t][1])
            out(
                f"# gateway_bench: {len(targets)} targets, {a.duration:g}s per cell; pinning: "
                + (
                    f"process under test on core {core_gw}, stub + load generator on core "
                    f"{core_load}"
                    if two_cores
                    else "none"
                )
                + f"; nice {a.nice}; "
                + ("real-time latency cells; " if a.realtime else "")
                + "load average "
                + " ".join(Path("/proc/loadavg").read_text().split()[:3])
            )
            for t in targets:
                srv = tmap[t][0].server
                if srv is not None and srv.proc is not None:
                    out(f"  {t}: pid {srv.proc.pid}")

            async def run_all() -> None:
                for stream in modes:
                    for c in concs:
                        for t in targets:
                            cell = Cell("closed", stream, c, t)
                            await run_cell(
                                cell, tmap[t][0], tmap[t][1], stub, a.duration, a.timeout
                            )
                            cells.append(cell)
                            r = cell.res
                            assert r is not None
                            print(
                                f"  closed {'stream' if stream else 'plain '} c={c:<3} {t:>8}: "
                                f"{r.rate:7.0f}/s p50 {r.pct(50) * 1e3:7.2f} ms"
                                + (f" errors {dict(r.error_kinds)}" if r.errors else ""),
                                flush=True,
                            )
                maxes = {
                    t: max(
                        (
                            c.res.rate
                            for c in cells
                            if c.target == t and not c.stream and c.res is not None
                        ),
                        default=math.inf,
                    )
                    for t in targets
                }
                for rate in rates:
                    for t in targets:
                        cell = Cell("open", False, rate, t)
                        cells.append(cell)
                        if maxes[t] < rate * 1.05:
                            cell.skipped = f"overload (max {maxes[t]:.0f}/s)"
                            continue
                        await run_cell(
                            cell, tmap[t][0], tmap[t][1], stub, a.duration, a.timeout, rt=a.realtime
                        )
                        r = cell.res
                        assert r is not None
                        print(
                            f"  open   plain  {rate:5.0f}/s {t:>8}: p50 {r.pct(50) * 1e3:6.2f} "
                            f"p99 {r.pct(99) * 1e3:6.2f} ms"
                            + (f" errors {dict(r.error_kinds)}" if r.errors else ""),
                            flush=True,
                        )

            asyncio.run(run_all())
    finally:
        if "redis" in targets:
            cleanup_redis(a.redis_url, prefix)
        if not a.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs in {tmp}", file=sys.stderr)

    summary = print_tables(cells, targets, out)
    print_verdict(summary, out)
    out(f"\n(total bench time {time.monotonic() - t_begin:.0f}s)")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"cells": [c.to_json() for c in cells], "summary": summary, "table": lines},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

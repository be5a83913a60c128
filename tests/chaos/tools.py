"""Builders for the chaos scenarios: a private Redis that can be killed and frozen, gateway
processes on it, a load generator that classifies every request's outcome, and the settle
check that counts leaked slots.

Outcomes (:class:`Tally`): ``ok`` (200, and a stream that ends with ``[DONE]``), ``error``
(an HTTP error in OpenAI's shape, or a stream ended by an SSE error event: a *clean*
error), ``aborted`` (the client hung up on purpose), ``cut`` (the connection broke under a
process the scenario killed: expected where the scenario says so), and ``lost`` (no answer
within the client's timeout, a malformed error, a stream that stopped without ``[DONE]`` or
an error event, or a broken connection where nothing was killed). The promise is 0 lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port
from tests.harness import ADMIN_KEY

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "chaos"}]


class RedisProc:
    """A redis-server of the scenario's own (killing the session's would break other tests),
    on a fixed port so that a restart comes back at the same address. ``aof``: data survive a
    restart (appendonly, fsync always), as a production Redis is run."""

    def __init__(self, workdir: Path, aof: bool = True) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.binary, self.dir, self.aof = binary, workdir, aof
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else \
            ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


def gateway_config(store_url: str, *, upstreams: list[dict[str, Any]] | None = None,
                   pool: dict[str, Any] | None = None, tenants: list[dict[str, Any]],
                   server: dict[str, Any] | None = None, lease_ttl_s: float = 5) -> dict[str, Any]:
    return {
        "server": {"access_log": False, "auth_cache_ttl_s": 1, **(server or {})},
        "admin": {"api_key": ADMIN_KEY},
        "store": {"type": "redis", "url": store_url, "prefix": f"chaos{time.time_ns()}",
                  "lease_ttl_s": lease_ttl_s},
        "upstreams": upstreams or [],
        **({"pool": pool} if pool else {}),
        "tenants": tenants,
    }


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    #: what made each lost request lost (first few)
    lost_why: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def add(self, outcome: str, status: int | None = None, why: str = "",
            latency: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if status is not None:
            self.statuses[status] += 1
        if outcome == "lost" and len(self.lost_why) < 10:
            self.lost_why.append(why)
        if latency is not None:
            self.latencies.append(latency)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def lost(self) -> int:
        return self.outcomes["lost"]

    @property
    def fivexx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def _is_openai_error(body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


async def request(client: httpx.AsyncClient, url: str, key: str, tally: Tally, *,
                  stream: bool = False, abort_after_chunks: int | None = None,
                  expect_cut: bool = False, **body: Any) -> str:
    """One chat completion, classified into ``tally`` (module doc); returns the outcome.
    ``expect_cut``: a broken connection is ``cut`` (the scenario kills this process)."""
    payload = {"model": "stub", "messages": MSG, "stream": stream, **body}
    t0 = time.monotonic()
    status: int | None = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload,
                                 headers={"authorization": f"Bearer {key}"}) as r:
            status = r.status_code
            if r.status_code != 200:
                raw = await r.aread()
                ok = _is_openai_error(raw)
                tally.add("error" if ok else "lost", status, f"{status} not OpenAI: {raw[:80]!r}",
                          time.monotonic() - t0)
                return "error" if ok else "lost"
            if not stream:
                raw = await r.aread()
                tally.add("ok", status, latency=time.monotonic() - t0)
                return "ok"
            chunks, tail = 0, b""
            async for chunk in r.aiter_raw():
                chunks += 1
                tail = (tail + chunk)[-400:]
                if abort_after_chunks is not None and chunks >= abort_after_chunks:
                    tally.add("aborted", status)
                    return "aborted"  # leaving the block closes the connection mid-stream
        if tail.endswith(b"data: [DONE]\n\n"):
            outcome = "ok"
        elif b'"error"' in tail.rsplit(b"data: ", 1)[-1]:
            outcome = "error"
        else:
            outcome = "cut" if expect_cut else "lost"
        tally.add(outcome, status, f"stream ended without [DONE]: {tail[-80:]!r}",
                  time.monotonic() - t0)
        return outcome
    except httpx.TimeoutException as e:
        tally.add("lost", status, f"timeout: {type(e).__name__}")
        return "lost"
    except httpx.TransportError as e:
        outcome = "cut" if expect_cut else "lost"
        tally.add(outcome, status, f"transport: {type(e).__name__}: {e}")
        return outcome


def leaks(url: str) -> dict[str, int]:
    """What one gateway still holds: tenants' in-flight (the admission queue's ledger),
    engine holds (sequences and tokens), backends' in-flight, and queued requests."""
    with httpx.Client(base_url=url, headers=ADMIN, timeout=5) as c:
        usage = c.get("/admin/usage").json()
        sched = c.get("/admin/scheduler").json()
        backends = c.get("/admin/backends").json()
    depth = sched["queue_depth"]
    return {
        "in_flight": sum(u["in_flight"] for u in usage),
        "engine_seqs": sum(e["seqs"] for e in sched["engines"]),
        "engine_tokens": sum(e["held_tokens"] for e in sched["engines"]),
        "backend_in_flight": sum(b["in_flight"] for b in backends),
        "queued": depth if isinstance(depth, int) else sum(depth.values()),
    }


def settle(urls: list[str], timeout: float = 10.0) -> tuple[float, dict[str, int]]:
    """Wait until no gateway holds anything; (seconds it took, what was still held: all
    zero unless slots leaked)."""
    t0 = time.monotonic()
    while True:
        held: Counter[str] = Counter()
        for u in urls:
            held.update(leaks(u))
        if not any(held.values()) or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, dict(held)
        time.sleep(0.05)


def leaked_slots(held: dict[str, int]) -> int:
    return held["in_flight"] + held["engine_seqs"] + held["backend_in_flight"]


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus series over the lines whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_until(pred: Any, within_s: float, step: float = 0.05) -> float:
    """Seconds until ``pred()`` is true (raises after ``within_s``); the client tasks of the
    scenario run meanwhile."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > within_s:
            raise AssertionError(f"not within {within_s}s: {pred}")
        await asyncio.sleep(step)
    return time.monotonic() - t0

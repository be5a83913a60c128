"""A lean HTTP/1.1 load generator for the gateway benchmark (not a test).

One asyncio protocol per keep-alive connection, the response parsed by ``httptools`` (the
C parser uvicorn uses), requests pre-rendered as bytes: a request costs the generator a few
tens of microseconds of CPU, so on its own core it is never the bottleneck (the benchmark
reports its CPU use to prove it).

Two shapes of load:

* :func:`closed_loop` — ``concurrency`` clients, each with its own connection, send the next
  request as soon as the previous response has ended (maximum throughput);
* :func:`open_loop` — requests leave at a fixed rate (constant spacing, as wrk2 does),
  whatever the responses do; a request takes an idle connection or opens a new one, so a
  slow server faces a growing number of connections instead of a slower sender.

Latency is measured from the moment the request is written to the moment its last byte is
parsed; for a stream, ``ttft`` is the first body byte.
"""

from __future__ import annotations

import asyncio
import collections
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

perf = time.perf_counter


def cpu_self() -> float:
    """CPU seconds (user + system) this process has used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def render_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.first_body = 0.0
        self.body_bytes = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("server closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        if not self.first_body:
            self.first_body = perf()
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(exc)

    async def request(self, raw: bytes) -> tuple[int, float, float, int]:
        """Send one request; returns (status, seconds to first body byte, total seconds, bytes)."""
        if self.closed or self.transport is None:
            raise ConnectionResetError("connection closed")
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.first_body = 0.0
        self.body_bytes = 0
        t0 = perf()
        self.transport.write(raw)
        await self.waiter
        t1 = perf()
        ttft = (self.first_body or t1) - t0
        return self.parser.get_status_code(), ttft, t1 - t0, self.body_bytes

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


async def connect(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, host, port)
    return proto


@dataclass
class Result:
    """What one cell measured, over its window (warm-up excluded)."""

    window_s: float = 0.0
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    loadgen_cpu_s: float = 0.0
    sent: int = 0
    max_connections: int = 0
    #: (status or exception name) -> count, for the first few errors
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def rate(self) -> float:
        return self.ok / self.window_s if self.window_s else 0.0

    def pct(self, q: float, which: str = "latencies") -> float:
        xs = sorted(getattr(self, which))
        if not xs:
            return float("nan")
        i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
        return xs[i]


class _Window:
    """Records only requests whose time (completion, or for open loop the scheduled send)
    falls inside [start, end)."""

    def __init__(self, res: Result) -> None:
        self.res = res
        self.start = float("inf")
        self.end = float("inf")

    def record(self, at: float, status: int, ttft: float, lat: float) -> None:
        if not (self.start <= at < self.end):
            return
        if status == 200:
            self.res.ok += 1
            self.res.latencies.append(lat)
            self.res.ttfts.append(ttft)
        else:
            self.res.errors += 1
            self.res.error_kinds[str(status)] += 1

    def error(self, at: float, exc: BaseException) -> None:
        if self.start <= at < self.end:
            self.res.errors += 1
            self.res.error_kinds[type(exc).__name__] += 1


Probe = Callable[[str], None]


def _no_probe(_which: str) -> None:
    return None


async def closed_loop(
    host: str,
    port: int,
    raw: bytes,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.5,
    timeout_s: float = 30.0,
    probe: Probe = _no_probe,
) -> Result:
    """``probe("start")`` / ``probe("end")`` are called at the edges of the window."""
    res = Result(max_connections=concurrency)
    win = _Window(res)
    stop = False

    async def client() -> None:
        conn: _Conn | None = None
        while not stop:
            try:
                if conn is None or conn.closed:
                    conn = await connect(host, port)
                status, ttft, lat, _ = await asyncio.wait_for(conn.request(raw), timeout_s)
                win.record(perf(), status, ttft, lat)
            except (TimeoutError, OSError, httptools.HttpParserError) as e:
                win.error(perf(), e)
                if conn is not None:
                    conn.close()
                conn = None
                await asyncio.sleep(0.01)
        if conn is not None:
            conn.close()

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    probe("start")
    c0, win.start = cpu_self(), perf()
    await asyncio.sleep(duration_s)
    win.end = perf()
    res.loadgen_cpu_s = cpu_self() - c0
    probe("end")
    res.window_s = win.end - win.start
    stop = True
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return res


async def open_loop(
    host: str,
    port: int,
    raw: bytes,
    rate: float,
    duration_s: float,
    warmup_s: float = 0.5,
    max_connections: int = 1024,
    timeout_s: float = 10.0,
    prewarm: int = 8,
    probe: Probe = _no_probe,
) -> Result:
    """Send at ``rate`` req/s for ``warmup_s + duration_s``; wait up to ``timeout_s`` for the tail.

    The window is the requests *sent* after the warm-up; ``probe("start")`` is called when the
    first of them leaves, ``probe("end")`` when the last has been answered.

    Requests that find ``max_connections`` busy count as errors (``overload``); so do
    requests still unanswered ``timeout_s`` after the last send.
    """
    res = Result()
    win = _Window(res)
    idle: collections.deque[_Conn] = collections.deque()
    for _ in range(prewarm):
        idle.append(await connect(host, port))
    open_conns = prewarm
    inflight: set[asyncio.Task[None]] = set()

    async def fire(scheduled: float) -> None:
        nonlocal open_conns
        conn: _Conn | None = None
        try:
            while idle:
                c = idle.pop()
                if not c.closed:
                    conn = c
                    break
                open_conns -= 1
            if conn is None:
                if open_conns >= max_connections:
                    raise ConnectionRefusedError("overload: every connection busy")
                open_conns += 1
                res.max_connections = max(res.max_connections, open_conns)
                try:
                    conn = await connect(host, port)
                except OSError:
                    open_conns -= 1
                    raise
            status, ttft, lat, _ = await conn.request(raw)
            win.record(scheduled, status, ttft, lat)
            idle.append(conn)
        except (OSError, httptools.HttpParserError) as e:
            win.error(scheduled, e)
            if conn is not None:
                conn.close()
                open_conns -= 1
        except asyncio.CancelledError:
            win.error(scheduled, TimeoutError())
            if conn is not None:
                conn.close()
            raise

    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    total = int((warmup_s + duration_s) * rate)
    t_start = perf() + 0.01
    win.start = t_start + warmup_s
    c0 = None
    for i in range(total):
        at = t_start + i * interval
        if c0 is None and at >= win.start:
            c0 = cpu_self()
            probe("start")
        delay = at - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        t = loop.create_task(fire(at))
        inflight.add(t)
        t.add_done_callback(inflight.discard)
        res.sent += 1
    win.end = t_start + total * interval
    if inflight:
        await asyncio.wait(set(inflight), timeout=timeout_s)
    for t in list(inflight):
        t.cancel()
    await asyncio.gather(*inflight, return_exceptions=True)
    probe("end")
    res.loadgen_cpu_s = cpu_self() - (c0 or cpu_self())
    res.window_s = duration_s
    for c in idle:
        c.close()
    return res

"""What one admission ``dispatch()`` costs, by backlog depth and tenant count (prints a table;
not a test).

For each store (``memory``, ``redis``), backlog (queued items) and tenant count it builds one
queue state and measures two dispatches, each the worst case for the old single-order design
(one global (score, seq) order that a dispatch walks from the top):

* ``throttled``: ``tenants - 1`` tenants are at their concurrency limit (limit 1, one item of
  each already granted) and own 90 % of the backlog, all of it scored *before* the remaining
  10 %, which belongs to one unthrottled tenant. The one engine has room for exactly one more
  sequence. Each iteration (untimed) releases the previous grant and enqueues one more item
  of the unthrottled tenant (so the backlog stays constant), then times
  ``dispatch(max_grants=1)``, which must grant exactly one item of the unthrottled tenant.
* ``full``: the same state with the last grant kept, so the engine is at ``max_seqs``; the
  timed ``dispatch()`` must grant nothing.

Per cell: a few warm-up dispatches, then up to ``--iters`` timed ones (stopping early after
``--cell-budget`` seconds once ``--min-iters`` are in, for slow cells), median and p99 in
microseconds. Redis timings include the client round trip (loopback, redis-py). After the
queue is filled the heap is frozen (``gc.freeze()``) so collections do not rescan the
backlog; the GC stays enabled.

Targets (issue): <= 0.2 ms per dispatch in memory, <= 1 ms on Redis, up to 50k queued items
and 1,000 tenants; the ``p50``/``p99`` columns say PASS or MISS against them.

Redis: a throw-away ``redis-server`` on a free loopback port (``--save "" --appendonly no``),
flushed between cells and killed at the end.

Old code: ``--old DIR`` runs the same scenarios against another source tree that still has
the pre-flow queue (``proxy/store/queue_memory.py`` / ``queue_redis.py``, the concurrency
limit carried by each ``QueueItem``, no ``set_limits``), e.g.::

    git worktree add /tmp/old_main 6582049
    .venv/bin/python bench/dispatch_bench.py --old /tmp/old_main
    git worktree remove --force /tmp/old_main

``--order counter`` runs the new queue in exact-VTC order (the ``fair`` policy): every item
carries a charge, so each grant moves its tenant's counter and re-ranks its flows.

Usage: .venv/bin/python bench/dispatch_bench.py [--quick] [--stores memory,redis]
       [--order key|counter]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

NOW0 = 1.7e9
DEADLINE = NOW0 + 1e8  # far in the future
LEASE_TTL_S = 1e7  # no lease lapses during a run
ENGINE_TTL_S = 1e7
MODEL = "m"
FOOTPRINT = 100
REPLICA = "bench"
FREE_TENANT = "free"
WARMUP = 5
FILL_BATCH = 500  # concurrent enqueues per batch when filling redis
TARGET_US = {"memory": 200.0, "redis": 1000.0}
CHARGE = 300.0  # fair-share charge of every item with --order counter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the two APIs -----------------------------------------------------------------------------


class Api:
    """The queue API of one source tree: new (``proxy.admission``) or old (``proxy.store``)."""

    def __init__(self, old: bool, order: str = "key") -> None:
        self.old = old
        #: the new queue's order; "counter" (exact VTC) charges every item CHARGE
        self.order = order
        if old:
            from proxy.store.queue_base import EngineCapacity, QueueItem
            from proxy.store.queue_memory import MemoryQueue
            from proxy.store.queue_redis import RedisQueue
        else:
            from proxy.admission.base import EngineCapacity, QueueItem
            from proxy.admission.memory import MemoryQueue
            from proxy.admission.redis import RedisQueue
        self.EngineCapacity = EngineCapacity
        self.QueueItem = QueueItem
        self.MemoryQueue = MemoryQueue
        self.RedisQueue = RedisQueue
        import proxy

        self.source = str(Path(proxy.__file__).resolve().parent.parent)

    def item(self, item_id: str, tenant: str, score: float, limit: int | None) -> Any:
        kw: dict[str, Any] = dict(
            id=item_id,
            tenant=tenant,
            replica=REPLICA,
            model=MODEL,
            score=score,
            footprint=FOOTPRINT,
            deadline=DEADLINE,
        )
        if self.old:
            kw["concurrency_limit"] = limit  # the old design: the limit travels with each item
        elif self.order == "counter":
            kw["charge"] = CHARGE
        return self.QueueItem(**kw)

    async def set_limits(self, q: Any, limits: dict[str, int | None]) -> None:
        if not self.old:
            await q.set_limits(limits)

    def engine(self, max_seqs: int) -> Any:
        return self.EngineCapacity("e0", (MODEL,), None, max_seqs, True)

    def memory(self) -> Any:
        if self.old:
            return self.MemoryQueue(REPLICA)
        return self.MemoryQueue(REPLICA, order=self.order)

    def redis(self, url: str, prefix: str) -> Any:
        if self.old:
            return self.RedisQueue(REPLICA, url, prefix=prefix)
        return self.RedisQueue(REPLICA, url, prefix=prefix, order=self.order)


# -- redis-server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(self.url)
        try:
            for _ in range(100):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    if await client.ping():
                        return
                except OSError:
                    pass
                except Exception:  # redis.exceptions.ConnectionError
                    pass
                await asyncio.sleep(0.05)
            raise RuntimeError("redis-server did not answer PING")
        finally:
            await client.aclose()

    async def ping_floor(self, n: int = 200) -> tuple[float, float]:
        """Median and p99 (us) of a PING through redis-py's asyncio client: the round-trip
        floor under every Redis dispatch on this machine."""
        from redis.asyncio import Redis

        client = Redis.from_url(self.url, decode_responses=True)
        try:
            samples = []
            for i in range(WARMUP + n):
                t0 = time.perf_counter_ns()
                await client.ping()
                t1 = time.perf_counter_ns()
                if i >= WARMUP:
                    samples.append((t1 - t0) / 1e3)
            samples.sort()
            return statistics.median(samples), samples[max(0, math.ceil(0.99 * n) - 1)]
        finally:
            await client.aclose()

    async def flush(self) -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(self.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- one cell ---------------------------------------------------------------------------------


@dataclass
class Row:
    store: str
    scenario: str
    backlog: int
    tenants: int
    samples_us: list[float]
    fill_s: float

    @property
    def n(self) -> int:
        return len(self.samples_us)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def p99(self) -> float:
        s = sorted(self.samples_us)
        return s[max(0, math.ceil(0.99 * len(s)) - 1)]


async def _fill(q: Any, items: list[Any], store: str, now: float) -> None:
    if store == "memory":
        for it in items:
            await q.enqueue(it, now)
        return
    for i in range(0, len(items), FILL_BATCH):
        await asyncio.gather(*(q.enqueue(it, now) for it in items[i : i + FILL_BATCH]))


async def run_cell(
    api: Api,
    store: str,
    backlog: int,
    tenants: int,
    args: argparse.Namespace,
    server: RedisServer | None,
    label: str,
) -> list[Row]:
    rng = random.Random(backlog * 7919 + tenants)
    throttled = [f"t{i:04d}" for i in range(tenants - 1)]
    n_free = max(1, backlog // 10)
    n_throttled = backlog - n_free

    if store == "memory":
        q = api.memory()
    else:
        assert server is not None
        await server.flush()
        q = api.redis(server.url, f"bench{backlog}x{tenants}")
    await q.start()
    try:
        now = NOW0
        t_fill = time.perf_counter()
        # one engine: a sequence for each throttled tenant's granted item, plus one
        await q.set_engines([api.engine(len(throttled) + 1)], now, ENGINE_TTL_S)
        await api.set_limits(q, {t: 1 for t in throttled})
        # put every throttled tenant at its limit: one item each, granted
        holders = [api.item(f"h-{t}", t, -1.0, 1) for t in throttled]
        await _fill(q, holders, store, now)
        granted = 0
        while granted < len(holders):
            now += 1e-3
            got = await q.dispatch(now, LEASE_TTL_S, max_grants=1000)
            if not got:
                raise RuntimeError(f"holders: {granted}/{len(holders)} granted, then none")
            granted += len(got)
        # the backlog: 90 % throttled (scores in [0, 1)), then the free tenant ([1, 2))
        items = [
            api.item(f"q-{i}", throttled[i % len(throttled)], rng.random(), 1)
            for i in range(n_throttled if throttled else 0)
        ]
        n_free_items = backlog - len(items)
        items += [
            api.item(f"f-{i}", FREE_TENANT, 1.0 + i / n_free_items, None)
            for i in range(n_free_items)
        ]
        await _fill(q, items, store, now)
        fill_s = time.perf_counter() - t_fill
        log(f"  [{label} {store} {backlog}x{tenants}] filled in {fill_s:.1f}s")

        gc.collect()
        gc.freeze()
        rows: list[Row] = []

        # (a) throttled: every dispatch grants exactly one item of the free tenant
        samples: list[float] = []
        prev = None
        extra = 0
        started = time.perf_counter()
        for i in range(WARMUP + args.iters):
            if prev is not None:
                await q.release(prev.id)
                extra += 1
                await q.enqueue(api.item(f"x-{extra}", FREE_TENANT, 2.0 + extra, None), now)
            now += 1e-3
            t0 = time.perf_counter_ns()
            got = await q.dispatch(now, LEASE_TTL_S, max_grants=1)
            t1 = time.perf_counter_ns()
            if len(got) != 1 or got[0].tenant != FREE_TENANT:
                raise RuntimeError(f"throttled: expected 1 grant for {FREE_TENANT!r}, got {got}")
            prev = got[0]
            if i >= WARMUP:
                samples.append((t1 - t0) / 1e3)
                if (
                    len(samples) >= args.min_iters
                    and time.perf_counter() - started > args.cell_budget
                ):
                    break
        rows.append(Row(store, "throttled", backlog, tenants, samples, fill_s))
        log(
            f"  [{label} {store} {backlog}x{tenants}] throttled: n={len(samples)} "
            f"p50={rows[-1].p50:.1f}us"
        )

        # (b) full: the last grant stays held, the engine is at max_seqs, nothing is granted
        samples = []
        started = time.perf_counter()
        for i in range(WARMUP + args.iters):
            now += 1e-3
            t0 = time.perf_counter_ns()
            got = await q.dispatch(now, LEASE_TTL_S, max_grants=64)
            t1 = time.perf_counter_ns()
            if got:
                raise RuntimeError(f"full: expected no grant, got {got}")
            if i >= WARMUP:
                samples.append((t1 - t0) / 1e3)
                if (
                    len(samples) >= args.min_iters
                    and time.perf_counter() - started > args.cell_budget
                ):
                    break
        rows.append(Row(store, "full", backlog, tenants, samples, fill_s))
        log(
            f"  [{label} {store} {backlog}x{tenants}] full: n={len(samples)} "
            f"p50={rows[-1].p50:.1f}us"
        )
        return rows
    finally:
        gc.unfreeze()
        await q.aclose()
        del q
        gc.collect()


# -- table ------------------------------------------------------------------------------------


def verdict(store: str, us: float) -> str:
    return "PASS" if us <= TARGET_US[store] else "MISS"


def print_table(rows: list[Row], title: str) -> None:
    head = (
        "store",
        "scenario",
        "backlog",
        "tenants",
        "n",
        "p50 us",
        "p99 us",
        "target us",
        "p50",
        "p99",
    )
    lines = [
        (
            r.store,
            r.scenario,
            f"{r.backlog:,}",
            f"{r.tenants:,}",
            str(r.n),
            f"{r.p50:,.1f}",
            f"{r.p99:,.1f}",
            f"<= {TARGET_US[r.store]:,.0f}",
            verdict(r.store, r.p50),
            verdict(r.store, r.p99),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6, 7}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(title)
    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt(line))
    print()


def git_rev(path: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes in proxy/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


# -- main -------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace, api: Api) -> int:
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in TARGET_US:
            raise SystemExit(f"--stores: unknown store {s!r}; known: memory, redis")
    backlogs = [1_000, 10_000] if args.quick else [1_000, 10_000, 50_000]
    tenant_counts = [10, 100] if args.quick else [10, 100, 1_000]
    label = "old" if args.old else f"new, {args.order} order"
    log(f"{label} code: {api.source} @ {git_rev(api.source)}")

    server: RedisServer | None = None
    floor: tuple[float, float] | None = None
    rows: list[Row] = []
    t_start = time.perf_counter()
    try:
        if "redis" in stores:
            binary = shutil.which(args.redis_server)
            if binary is None:
                raise SystemExit(f"{args.redis_server} not found on PATH")
            server = RedisServer(binary)
            await server.ready()
            log(f"redis-server on port {server.port} (pid {server.proc.pid})")
        for store in stores:
            for backlog in backlogs:
                for tenants in tenant_counts:
                    rows += await run_cell(api, store, backlog, tenants, args, server, label)
        if server is not None:
            floor = await server.ping_floor()
    finally:
        if server is not None:
            server.stop()
            log(f"redis-server (pid {server.proc.pid}) stopped")
    elapsed = time.perf_counter() - t_start

    order = {"throttled": 0, "full": 1}
    rows.sort(key=lambda r: (stores.index(r.store), order[r.scenario], r.backlog, r.tenants))
    print_table(
        rows,
        f"dispatch() cost, {label} code ({api.source} @ {git_rev(api.source)}), "
        f"{os.cpu_count()} CPUs, {elapsed:.0f}s",
    )
    if floor is not None:
        print(
            f"redis round-trip floor (PING via redis.asyncio, same machine): "
            f"p50 {floor[0]:,.1f} us, p99 {floor[1]:,.1f} us"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="backlogs 1k and 10k, 10 and 100 tenants only"
    )
    ap.add_argument("--stores", default="memory,redis", help="comma list: memory,redis")
    ap.add_argument(
        "--old",
        metavar="DIR",
        default=None,
        help="measure the old queue (proxy/store/queue_*.py) of this source tree",
    )
    ap.add_argument("--iters", type=int, default=200, help="timed dispatches per cell at most")
    ap.add_argument(
        "--min-iters",
        type=int,
        default=30,
        help="timed dispatches per cell at least (before --cell-budget applies)",
    )
    ap.add_argument(
        "--cell-budget",
        type=float,
        default=3.0,
        help="seconds of timed dispatches per cell once --min-iters are in",
    )
    ap.add_argument("--redis-server", default="redis-server", help="redis-server binary")
    ap.add_argument("--order", choices=["key", "counter"], default="key",
                    help="the new queue's order: key, or counter (exact VTC; every item "
                         "charged, each grant re-ranks its tenant)")
    args = ap.parse_args()
    root = str(Path(args.old).resolve()) if args.old else str(REPO)
    if args.old and not (Path(root) / "proxy" / "store" / "queue_memory.py").exists():
        raise SystemExit(f"--old {root}: no proxy/store/queue_memory.py there")
    sys.path.insert(0, root)
    api = Api(old=args.old is not None, order=args.order)
    if Path(api.source) != Path(root):
        raise SystemExit(f"imported proxy from {api.source}, expected {root}")
    return asyncio.run(amain(args, api))


if __name__ == "__main__":
    sys.exit(main())

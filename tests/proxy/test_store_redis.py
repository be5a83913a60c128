"""Redis-only properties of the store: several instances and processes sharing one Redis
enforce one set of limits, key layout, failure reporting, and bit-identical answers to the
memory store."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.crc import key_slot

from proxy.store.base import Limits, StoreUnavailable
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore

pytestmark = pytest.mark.redis

T0 = 19_700 * 86400.0 + 3600.0

StoreFactory = Callable[[], Awaitable[RedisStore]]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def new_store(redis_server: str, redis_prefix: str) -> AsyncIterator[StoreFactory]:
    """Started RedisStores sharing one prefix, each with its own connection pool."""
    opened: list[RedisStore] = []

    async def make() -> RedisStore:
        s = RedisStore(redis_server, prefix=redis_prefix)
        await s.start()
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.aclose()


@pytest.fixture
async def raw(redis_server: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server, decode_responses=True)
    yield r
    await r.aclose()


# -- N instances enforce limits jointly --------------------------------------------------------
@pytest.mark.parametrize(
    ("limits", "admitted"),
    [(Limits(rpm=50), 50), (Limits(tpm=1000), 100), (Limits(daily_token_quota=200), 20)],
)
async def test_instances_enforce_one_limit_jointly(
    new_store: StoreFactory, limits: Limits, admitted: int
) -> None:
    stores = [await new_store() for _ in range(4)]
    calls = [
        s.try_acquire("acme", 10, limits, T0)
        for i, s in enumerate(stores)
        for j in range(60)
    ]
    decisions = await asyncio.gather(*calls)
    assert sum(d.ok for d in decisions) == admitted


#: one OS process: wait for the go signal, then concurrent try_acquire calls; prints admitted
_HAMMER = """
import asyncio, os, sys
from redis.asyncio import Redis
from proxy.store.base import Limits
from proxy.store.redis import RedisStore

async def main(url, prefix, n, now):
    store = RedisStore(url, prefix=prefix)
    await store.start()
    r = Redis.from_url(url)
    await r.rpush(prefix + ":ready", os.getpid())
    assert await r.blpop([prefix + ":go"], timeout=20) is not None
    rpm, quota = Limits(rpm=50), Limits(rpm=500, daily_token_quota=5)
    results = await asyncio.gather(
        *(store.try_acquire("rpm", 1, rpm, now) for i in range(n)),
        *(store.try_acquire("quota", 1, quota, now) for i in range(n)),
    )
    await r.aclose()
    await store.aclose()
    print(sum(d.ok for d in results))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


def test_processes_enforce_one_limit_jointly(redis_server: str, redis_prefix: str) -> None:
    argv = [sys.executable, "-c", _HAMMER, redis_server, redis_prefix, "80", repr(T0)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    r = redis_sync.Redis.from_url(redis_server)
    try:
        for _ in procs:
            assert r.blpop([f"{redis_prefix}:ready"], timeout=30) is not None
        r.rpush(f"{redis_prefix}:go", "go", "go")
        outs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        r.close()
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(int(o) for o in outs) == 50 + 5  # the rpm bucket, the daily quota


# -- layout and failures -------------------------------------------------------------------------
async def test_keys_live_under_the_prefix_one_slot_per_tenant(
    new_store: StoreFactory, raw: Redis, redis_prefix: str
) -> None:
    s = await new_store()
    limits = Limits(rpm=10, tpm=1000, daily_token_quota=5000)
    for tenant in ("acme", "zeta"):
        await s.try_acquire(tenant, 10, limits, T0)
        await s.record_usage(tenant, T0, requests=1)
    keys = [k async for k in raw.scan_iter(match=f"{redis_prefix}:*")]
    acme = [k for k in keys if "{acme}" in k]
    assert len(acme) == 4  # rpm, tpm, day, usage
    assert len({key_slot(k.encode()) for k in acme}) == 1
    for k in acme:
        if not k.endswith(":usage"):
            assert 0 < await raw.ttl(k) <= 2 * 86400, k


async def test_unreachable_redis_is_reported_not_hung() -> None:
    s = RedisStore(f"redis://127.0.0.1:{closed_port()}/0", prefix="x", socket_timeout_s=1.0)
    assert await s.ping() is False
    with pytest.raises(StoreUnavailable):
        await s.start()
    assert await s.ping() is False
    await s.aclose()


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(
        [*argv, "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        time.sleep(0.02)
    proc.kill()
    pytest.fail("redis-server did not start")


async def test_redis_restart_is_reported_then_recovered(tmp_path: Path) -> None:
    port = closed_port()
    server = start_redis(port, tmp_path)
    a = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="x", socket_timeout_s=1.0)
    try:
        await a.start()
        server.terminate()
        server.wait()
        with pytest.raises(StoreUnavailable):
            await a.try_acquire("acme", 1, Limits(), T0)
        assert await a.ping() is False

        server = start_redis(port, tmp_path)
        assert await a.ping() is True
        assert (await a.try_acquire("acme", 1, Limits(), T0)).ok
    finally:
        await a.aclose()
        server.terminate()
        server.wait()


# -- same answers as the memory store ------------------------------------------------------------
async def test_same_decisions_as_memory(new_store: StoreFactory) -> None:
    """A seeded random run of every operation gives bit-identical answers on both stores."""
    red = await new_store()
    mem = MemoryStore()
    rng = random.Random(7)
    limits = {
        "acme": Limits(rpm=8, tpm=3000),
        "zeta": Limits(tpm=900),
        "quo": Limits(rpm=30, daily_token_quota=6000),
        "req": Limits(rpm=3),
    }
    reasons: set[str | None] = set()
    now = 19_700 * 86400.0 + 86400 - 120  # crosses a UTC midnight
    for i in range(400):
        now += rng.choice([0.0, 0.05, 0.5, 1.7, 4.0])
        tenant = rng.choice(list(limits))
        op = rng.random()
        if op < 0.6:
            args = (tenant, rng.randint(0, 1200), limits[tenant], now)
            dm, dr = await mem.try_acquire(*args), await red.try_acquire(*args)
            assert asdict(dm) == asdict(dr), i
            reasons.add(dm.reason)
        elif op < 0.85:
            delta = rng.randint(-800, 800)
            await mem.reconcile(tenant, delta, limits[tenant], now)
            await red.reconcile(tenant, delta, limits[tenant], now)
        else:
            usage = {"requests": 1, "errors": rng.randint(0, 1), "tokens_out": rng.randint(0, 50)}
            delta = rng.randint(-100, 100)
            await mem.finish(tenant, delta, limits[tenant], now, **usage)
            await red.finish(tenant, delta, limits[tenant], now, **usage)
        assert await mem.get_usage(tenant, now) == await red.get_usage(tenant, now), i
    assert reasons == {None, "too_large", "quota", "rpm", "tpm"}

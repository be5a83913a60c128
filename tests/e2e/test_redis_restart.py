"""A Redis restart costs no request made after Redis is back (issue 13; the stale-connection
503s of ``docs/reliability.md``).

A ``driftsched serve`` process on its own ``redis-server`` (append-only file, so the tenant
and its key survive), 16 clients keeping many pooled connections busy. Redis is killed with
SIGKILL and restarted on the same port 1 s later while the clients go on. Every pooled
connection of the store, the queue, the subscription and the completion bus went stale;
redis-py's retry (:func:`proxy.redisconn.retry_policy`) sends a command that meets a dead
connection again on a new one. Checked: requests during the outage get 503
``store_unavailable`` at once (no hang), every request that starts after Redis answers again
succeeds, and nothing is held afterwards (at worst until a lease frees a hold; below).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.chaos.tools import RedisProc, Tally, gateway_config, leaked_slots, request, settle
from tests.harness import start_gateways, start_stub

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-restart0-" + "r" * 40
#: the backstop for a hold nobody releases: a request whose enqueue ran on the Redis that
#: was killed before its reply came back fails with 503 and its item is left queued (then
#: granted to nobody) until the lease frees it (1 run in 13 with ``appendfsync always``:
#: the fsync delays the reply)
LEASE_TTL_S = 6


async def test_no_503_after_redis_is_back(tmp_path: Path) -> None:
    redis = RedisProc(tmp_path)
    stub, stub_url = start_stub(tmp_path, chunks=4)
    cfg = gateway_config(redis.url, lease_ttl_s=LEASE_TTL_S, server={"auth_cache_ttl_s": 0},
                         upstreams=[{"name": "stub0", "url": stub_url, "models": ["stub"]}],
                         tenants=[{"name": "r", "max_concurrency": 32, "api_keys": [KEY]}])
    procs, urls = start_gateways(cfg, tmp_path, 1)
    url = urls[0]
    marks: dict[str, float] = {}
    done: list[tuple[float, float, int | None, str]] = []
    stop = False
    try:
        async with httpx.AsyncClient(timeout=15) as client:

            async def worker() -> None:
                while not stop:
                    one = Tally()
                    t0 = time.monotonic()
                    outcome = await request(client, url, KEY, one, max_tokens=2)
                    done.append((t0, time.monotonic(), next(iter(one.statuses), None), outcome))
                    await asyncio.sleep(0.02)

            workers = [asyncio.create_task(worker()) for _ in range(16)]
            await asyncio.sleep(1.0)
            redis.kill()
            marks["down"] = time.monotonic()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(redis.start)  # returns once it answers PING
            marks["up"] = time.monotonic()
            await asyncio.sleep(2.0)
            stop = True
            await asyncio.gather(*workers)
        took, held = settle([url], timeout=LEASE_TTL_S + 4)
    finally:
        for p in procs:
            p.stop()
        stub.stop()
        redis.stop()

    before = [d for d in done if d[1] < marks["down"]]
    during = [d for d in done if d[1] >= marks["down"] and d[0] < marks["up"]]
    after = [d for d in done if d[0] >= marks["up"]]
    bad_after = [(round(s - marks["up"], 3), status, outcome) for s, _, status, outcome in after
                 if outcome != "ok"]
    first_ok = min((e for s, e, _, outcome in after if outcome == "ok"), default=marks["up"])
    print(f"\nbefore {len(before)}, during {len(during)} "
          f"({sorted({d[2] for d in during}, key=str)}), after {len(after)}: "
          f"{len(bad_after)} not ok, the first answered {first_ok - marks['up']:.3f} s after "
          f"Redis was back; settled in {took:.2f} s")
    assert before and all(d[3] == "ok" for d in before), [d for d in before if d[3] != "ok"]
    assert during and {d[2] for d in during} <= {200, 503}
    assert max(e - s for s, e, _, _ in during) < 5.0  # refused at once, not hung
    assert len(after) > 50 and not bad_after, bad_after[:10]
    assert leaked_slots(held) == 0, held

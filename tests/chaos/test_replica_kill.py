"""Replica SIGKILL: two gateway processes share one Redis; the one holding a tenant's whole
concurrency (streams running, more requests queued behind them) is killed with SIGKILL.
Promise: the survivor gets the tenant's slots back once the dead replica's leases expire
(``store.lease_ttl_s``), its own requests are all answered, and nothing stays held."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.tools import (
    RedisProc,
    Tally,
    gateway_config,
    leaked_slots,
    leaks,
    request,
    settle,
    wait_until,
)
from tests.harness import start_gateways, start_stub

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-chaosrep-" + "r" * 40
LEASE_TTL_S = 2.0
CONCURRENCY = 4


async def test_replica_sigkill(tmp_path: Path, figures: Any) -> None:
    redis = RedisProc(tmp_path)
    stub, stub_url = start_stub(tmp_path, chunks=8)
    cfg = gateway_config(
        redis.url, lease_ttl_s=LEASE_TTL_S,
        upstreams=[{"name": "stub0", "url": stub_url, "models": ["stub"]}],
        tenants=[{"name": "r", "max_concurrency": CONCURRENCY, "queue_timeout_s": 30,
                  "api_keys": [KEY]}])
    procs, (a, b) = start_gateways(cfg, tmp_path, 2)
    try:
        on_a, on_b = Tally(), Tally()
        async with httpx.AsyncClient(timeout=30) as client:
            running = [asyncio.create_task(request(
                client, a, KEY, on_a, stream=True, expect_cut=True, max_tokens=400,
                ignore_eos=True, stub_chunk_delay_ms=50)) for _ in range(CONCURRENCY)]
            await wait_until(lambda: leaks(b)["in_flight"] == CONCURRENCY, 10)
            queued = [asyncio.create_task(request(client, a, KEY, on_a, expect_cut=True,
                                                  max_tokens=2)) for _ in range(3)]
            await asyncio.sleep(0.5)
            held_by_dead = leaks(b)
            procs[0].proc.kill()
            killed = time.monotonic()
            procs[0].proc.wait(5)
            # the survivor's requests: the tenant's whole concurrency at once
            results = await asyncio.gather(*(request(client, b, KEY, on_b, max_tokens=2)
                                             for _ in range(CONCURRENCY)))
            recovery = time.monotonic() - killed
            await asyncio.gather(*running, *queued)
        took, held = settle([b], timeout=3 * LEASE_TTL_S)
        figures(held_by_dead_replica=held_by_dead["in_flight"],
                queued_on_dead_replica=held_by_dead["queued"],
                dead_replica_clients_cut=on_a.outcomes["cut"],
                survivor_requests=on_b.total, survivor_ok=on_b.outcomes["ok"],
                lost=on_b.lost + on_a.lost, fivexx=on_b.fivexx, recovery_s=recovery,
                lease_ttl_s=LEASE_TTL_S, leaked_slots=leaked_slots(held), settled_s=took)
        assert results == ["ok"] * CONCURRENCY, (on_b.outcomes, on_b.statuses, on_b.lost_why)
        assert on_a.lost == 0, on_a.lost_why
        # leases expire after lease_ttl_s; renewal and dispatch add a little
        assert recovery < 2 * LEASE_TTL_S + 1.0, recovery
        assert leaked_slots(held) == 0 and not any(held.values()), held
    finally:
        for p in procs:
            p.stop()
        stub.stop()
        redis.stop()

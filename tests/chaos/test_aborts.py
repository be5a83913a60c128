"""Abort storms: many clients hanging up mid-stream and while queued, against gateway
processes on Redis in front of the stub engine. Promise: 0 leaked slots, 0 lost requests
(every client that stayed got its answer or a clean error), no 5xx."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.tools import Tally, gateway_config, leaked_slots, request, settle
from tests.harness import Proc, start_gateways, start_stub

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-chaosab0-" + "a" * 40
TENANTS = [{"name": "storm", "max_concurrency": 8, "queue_timeout_s": 30, "api_keys": [KEY]}]


def _start(tmp: Path, redis_url: str, replicas: int) -> tuple[list[Proc], list[str]]:
    stub, url = start_stub(tmp, chunks=32)
    try:
        procs, urls = start_gateways(gateway_config(
            redis_url, upstreams=[{"name": "stub0", "url": url, "models": ["stub"],
                                   "max_num_seqs": 64}],
            tenants=TENANTS), tmp, replicas)
    except BaseException:
        stub.stop()
        raise
    return [stub, *procs], urls


@pytest.fixture
def one(tmp_path: Path, redis_server: str) -> Iterator[list[str]]:
    procs, urls = _start(tmp_path, redis_server, 1)
    yield urls
    for p in procs:
        p.stop()


async def storm(urls: list[str], n: int, concurrency: int, seed: int) -> tuple[Tally, int]:
    """``n`` streams, spread over ``urls``: a third run to the end, a third hang up after a
    few chunks, a third give up while still waiting (queued or before the first byte)."""
    rng = random.Random(seed)
    tally = Tally()
    sem = asyncio.Semaphore(concurrency)
    gave_up = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal gave_up
            kind = i % 3
            body: dict[str, Any] = {"max_tokens": 32, "stub_chunk_delay_ms": 5}
            async with sem:
                url = urls[i % len(urls)]
                if kind == 1:
                    await request(client, url, KEY, tally, stream=True,
                                  abort_after_chunks=rng.randint(1, 12), **body)
                elif kind == 2:
                    try:
                        await asyncio.wait_for(request(client, url, KEY, tally, stream=True,
                                                       **body), rng.uniform(0.001, 0.1))
                    except TimeoutError:
                        gave_up += 1
                else:
                    await request(client, url, KEY, tally, stream=True, **body)

        await asyncio.gather(*(one(i) for i in range(n)))
    return tally, gave_up


def _check(figures: Any, urls: list[str], tally: Tally, gave_up: int) -> None:
    took, held = settle(urls)
    figures(requests=tally.total + gave_up, completed=tally.outcomes["ok"],
            aborted_mid_stream=tally.outcomes["aborted"], gave_up_waiting=gave_up,
            clean_errors=tally.outcomes["error"], lost=tally.lost, fivexx=tally.fivexx,
            leaked_slots=leaked_slots(held), settled_s=took)
    assert tally.lost == 0, tally.lost_why
    assert tally.fivexx == 0, tally.statuses
    assert leaked_slots(held) == 0 and not any(held.values()), held


async def test_abort_storm(one: list[str], figures: Any) -> None:
    tally, gave_up = await storm(one, n=150, concurrency=40, seed=1)
    assert tally.outcomes["ok"] > 30 and tally.outcomes["aborted"] > 30 and gave_up > 10
    _check(figures, one, tally, gave_up)


@pytest.mark.chaos_slow
async def test_abort_storm_two_replicas(tmp_path: Path, redis_server: str, figures: Any) -> None:
    """The issue's storm: 1,100 requests over two replicas sharing the tenant's limit."""
    procs, urls = _start(tmp_path, redis_server, 2)
    try:
        tally, gave_up = await storm(urls, n=1100, concurrency=60, seed=2)
        _check(figures, urls, tally, gave_up)
    finally:
        for p in procs:
            p.stop()

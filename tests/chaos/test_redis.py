"""Redis outages under load: frozen (SIGSTOP, then SIGCONT) and killed (SIGKILL, then
restarted on its append-only file). Clients keep sending short requests, and two streams
run across the outage. Promise: during the outage every request gets an answer or a clean
error within the Redis timeout (503 ``store_unavailable``, never a hang or a bare 500);
within a bound of Redis coming back requests succeed again; nothing stays held."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.tools import RedisProc, Tally, gateway_config, leaked_slots, request, settle
from tests.harness import Proc, start_gateways, start_stub

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.redis]

KEY = "dsk-chaosred-" + "d" * 40
#: the stores' socket timeout is 5 s: a request during a freeze waits at most about that
#: long (a few Redis calls may each wait), never for ever
ANSWER_BOUND_S = 12.0
RECOVERY_BOUND_S = 3.0


def _env(tmp: Path) -> tuple[RedisProc, list[Proc], str]:
    redis = RedisProc(tmp)
    stub, stub_url = start_stub(tmp, chunks=8)
    cfg = gateway_config(redis.url, lease_ttl_s=5,
                         upstreams=[{"name": "stub0", "url": stub_url, "models": ["stub"]}],
                         tenants=[{"name": "d", "max_concurrency": 16, "queue_timeout_s": 30,
                                   "api_keys": [KEY]}])
    procs, urls = start_gateways(cfg, tmp, 1)
    return redis, [stub, *procs], urls[0]


async def outage(url: str, down: Callable[[], None], up: Callable[[], None],
                 down_s: float) -> dict[str, Any]:
    """Load before, during and after an outage of ``down_s``; what each phase got: a
    request is "before" if it ended before the outage began, "after" if it started after
    the outage ended, and "during" otherwise."""
    phases = {"before": Tally(), "during": Tally(), "after": Tally()}
    streams = Tally()
    marks: dict[str, float] = {}
    stop = False
    first_ok_after: list[float] = []
    done: list[tuple[float, float, Tally]] = []

    async with httpx.AsyncClient(timeout=ANSWER_BOUND_S) as client:

        async def worker() -> None:
            while not stop:
                started = time.monotonic()
                one = Tally()
                outcome = await request(client, url, KEY, one, max_tokens=2)
                done.append((started, time.monotonic(), one))
                if outcome == "ok" and "up" in marks and started > marks["up"] \
                        and not first_ok_after:
                    first_ok_after.append(time.monotonic() - marks["up"])
                await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - started)))

        long = [asyncio.create_task(request(client, url, KEY, streams, stream=True,
                                            max_tokens=120, ignore_eos=True,
                                            stub_chunk_delay_ms=50)) for _ in range(2)]
        workers = [asyncio.create_task(worker()) for _ in range(4)]
        await asyncio.sleep(0.5)
        marks["down"] = time.monotonic()
        down()
        await asyncio.sleep(down_s)
        up()
        marks["up"] = time.monotonic()
        await asyncio.sleep(2.0)
        stop = True
        await asyncio.gather(*workers, *long)
    for started, ended, one in done:
        phase = ("before" if ended < marks["down"] else
                 "after" if started > marks["up"] else "during")
        t = phases[phase]
        t.outcomes.update(one.outcomes)
        t.statuses.update(one.statuses)
        t.latencies += one.latencies
        t.lost_why += one.lost_why
    during = phases["during"]
    return {"phases": phases, "streams": streams,
            "recovery_s": first_ok_after[0] if first_ok_after else None,
            "during_max_latency_s": max(during.latencies, default=0.0)}


def _report(figures: Any, res: dict[str, Any], held: dict[str, int], took: float) -> None:
    p = res["phases"]
    lost = sum(t.lost for t in p.values()) + res["streams"].lost
    figures(during_requests=p["during"].total, during_ok=p["during"].outcomes["ok"],
            during_clean_errors=p["during"].outcomes["error"],
            during_statuses=dict(p["during"].statuses),
            during_max_latency_s=res["during_max_latency_s"],
            streams=dict(res["streams"].outcomes), lost=lost,
            fivexx_outside_outage=p["before"].fivexx + p["after"].fivexx, recovery_s=res["recovery_s"],
            leaked_slots=leaked_slots(held), settled_s=took)
    assert lost == 0, [t.lost_why for t in (*p.values(), res["streams"])]
    assert p["before"].outcomes["ok"] == p["before"].total > 0, p["before"].statuses
    assert p["during"].total > 0 and set(p["during"].statuses) <= {200, 503}, p["during"].statuses
    assert res["recovery_s"] is not None and res["recovery_s"] < RECOVERY_BOUND_S, res
    assert leaked_slots(held) == 0 and not any(held.values()), held


@pytest.mark.parametrize("freeze_s", [
    # shorter than the stores' socket timeout: requests wait, then succeed
    2.0,
    # longer: requests in the freeze fail cleanly (503) after the timeout
    pytest.param(7.0, marks=pytest.mark.chaos_slow)])
async def test_redis_freeze(tmp_path: Path, figures: Any, freeze_s: float) -> None:
    redis, procs, url = _env(tmp_path)
    try:
        res = await outage(url, lambda: redis.signal(signal.SIGSTOP),
                           lambda: redis.signal(signal.SIGCONT), down_s=freeze_s)
        took, held = settle([url], timeout=10)
        _report(figures, res, held, took)
    finally:
        for p in procs:
            p.stop()
        redis.stop()


@pytest.mark.chaos_slow
async def test_redis_kill_and_restart(tmp_path: Path, figures: Any) -> None:
    redis, procs, url = _env(tmp_path)
    try:
        res = await outage(url, redis.kill, redis.start, down_s=2.0)
        took, held = settle([url], timeout=10)
        _report(figures, res, held, took)
    finally:
        for p in procs:
            p.stop()
        redis.stop()

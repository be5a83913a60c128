"""Backends the gateway does not launch: health-checked and scraped, never supervised.

:class:`StaticPool` serves the top-level ``upstreams:`` list (and, inside
:class:`adapters.pool.EnginePool`, the ``pool.external`` endpoints and those registered
through the admin API). Every ``health_interval_s`` it GETs each backend's ``health_path``
(2xx = pass); every ``scrape_interval_s`` it reads ``/metrics`` where the endpoint exports
them (a 404 turns scraping off for that endpoint).

Health states (shared with launched engines, see :class:`HealthTracker`):
``starting`` -> ``healthy`` on the first pass; a ``starting`` external endpoint that fails
becomes ``unhealthy`` at once; a ``healthy`` one after ``unhealthy_after`` failures in a row;
``unhealthy`` -> ``healthy`` on the next pass. A drained backend shows ``draining`` instead
of ``healthy`` until it is undrained.

A LiteLLM backend (``provider: litellm``) has no health URL and no ``/metrics``: its health
check passes once LiteLLM imports (:func:`adapters.litellm_transport.litellm_ready`), and it
is never scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import httpx

from adapters.base import Backend, BackendState
from adapters.clock import Clock, SystemClock
from adapters.config import UpstreamConfig
from adapters.errors import InvalidRequest, NotFound
from adapters.litellm_transport import litellm_ready
from adapters.model_len import probe_model_len
from adapters.scrape import MetricsNotExported, scrape

log = logging.getLogger("driftsched.pool")

#: defaults for the top-level ``upstreams:`` list, which has no interval settings
HEALTH_INTERVAL_S = 2.0
SCRAPE_INTERVAL_S = 1.0
UNHEALTHY_AFTER = 3


def backend_from_upstream(u: UpstreamConfig, kind: str = "static") -> Backend:
    """``kind`` is ``"litellm"`` whatever the pool's kind when ``u.provider`` is litellm."""
    return Backend(
        name=u.name,
        url=u.url,
        models=tuple(u.models),
        kind="litellm" if u.provider == "litellm" else kind,  # type: ignore[arg-type]
        api_key=u.api_key,
        kv_capacity_tokens=u.kv_capacity_tokens,
        max_model_len=u.max_model_len,
        max_num_seqs=u.max_num_seqs,
        connect_timeout_s=u.connect_timeout_s,
        read_timeout_s=u.read_timeout_s,
        max_connections=u.max_connections,
        health_path=u.health_path,
        supports_priority=u.supports_priority and u.provider == "openai",
        litellm_model=u.litellm_model,
        litellm_params=dict(u.litellm_params),
    )


def auth_headers(b: Backend) -> dict[str, str]:
    return {"authorization": f"Bearer {b.api_key}"} if b.api_key else {}


class HealthTracker:
    """Applies health-check results and drain requests to backend states.

    Owns the per-backend counters so :class:`Backend` stays plain data. Event loop only.
    """

    def __init__(self, unhealthy_after: int = UNHEALTHY_AFTER) -> None:
        self.unhealthy_after = unhealthy_after
        self._fails: dict[str, int] = {}
        self._draining: set[str] = set()

    def forget(self, name: str) -> None:
        self._fails.pop(name, None)
        self._draining.discard(name)

    def reset(self, b: Backend, state: BackendState) -> None:
        """A (re)launch or stop: clear the failure count and set ``state``."""
        self._fails[b.name] = 0
        b.state = state

    def _up(self, b: Backend) -> BackendState:
        return "draining" if b.name in self._draining else "healthy"

    def record(self, b: Backend, ok: bool, error: str | None, *, launched: bool) -> None:
        """One health-check result. ``launched``: a starting engine waits for its start-up
        timeout instead of turning unhealthy on its first failure."""
        if b.state in ("restarting", "failed", "stopped"):
            return
        if ok:
            self._fails[b.name] = 0
            if b.state in ("starting", "unhealthy", "healthy"):
                b.state = self._up(b)
            return
        fails = self._fails.get(b.name, 0) + 1
        self._fails[b.name] = fails
        if b.state == "starting" and launched:
            return  # still loading; keep the error that explains the (re)start
        b.last_error = error
        if b.state == "starting":
            b.state = "unhealthy"
        elif b.state == "healthy" and fails >= self.unhealthy_after:
            b.state = "unhealthy"

    def draining(self, name: str) -> bool:
        return name in self._draining

    def drain(self, b: Backend) -> None:
        self._draining.add(b.name)
        if b.state == "healthy":
            b.state = "draining"

    def undrain(self, b: Backend) -> None:
        self._draining.discard(b.name)
        if b.state == "draining":
            b.state = "healthy" if self._fails.get(b.name, 0) == 0 else "unhealthy"


def probe_timeout(interval_s: float) -> float:
    """Seconds one health check may take: twice the interval, within [0.5, 5]."""
    return max(0.5, min(5.0, 2 * interval_s))


async def probe(client: httpx.AsyncClient, b: Backend, timeout_s: float) -> tuple[bool, str | None]:
    """One health check: ``(passed, error)``."""
    try:
        resp = await client.get(b.url + b.health_path, timeout=timeout_s, headers=auth_headers(b))
    except httpx.HTTPError as e:
        return False, f"health check failed: {type(e).__name__}: {e}"
    if 200 <= resp.status_code < 300:
        return True, None
    return False, f"health check failed: HTTP {resp.status_code}"


async def wait_in_flight_zero(b: Backend, poll_s: float = 0.05) -> None:
    """Poll: the gateway decrements the plain ``Backend.in_flight`` int; there is no event."""
    while b.in_flight > 0:  # noqa: ASYNC110
        await asyncio.sleep(poll_s)


async def every(interval_s: float, fn: Callable[[], Awaitable[None]]) -> None:
    """Call ``await fn()`` every ``interval_s`` (first call at once) until cancelled.

    An unexpected exception is logged with its traceback and the loop goes on: one bad
    round must not end health checking for the life of the gateway.
    """
    while True:
        try:
            await fn()
        except Exception:
            log.exception("pool loop %s failed; continuing", getattr(fn, "__name__", fn))
        await asyncio.sleep(interval_s)


def backend_snapshot(b: Backend, *, now: float | None = None) -> dict[str, Any]:
    """A JSON-able view of one backend for ``GET /admin/backends``.

    ``free_tokens`` is None when the capacity is unknown; ``metrics.age_s`` is None before
    the first scrape (``scraped_at`` is the pool clock's ``monotonic()`` seconds).
    """
    now = time.monotonic() if now is None else now
    m = b.metrics
    return {
        "name": b.name,
        "url": b.url,
        "kind": b.kind,
        "state": b.state,
        "models": list(b.models),
        "pid": b.pid,
        "restarts": b.restarts,
        "in_flight": b.in_flight,
        "kv_capacity_tokens": b.kv_capacity_tokens,
        "max_num_seqs": b.max_num_seqs,
        "max_model_len": b.max_model_len,
        "supports_priority": b.supports_priority,
        "metrics": {
            "num_requests_running": m.num_requests_running,
            "num_requests_waiting": m.num_requests_waiting,
            "kv_cache_usage_perc": m.kv_cache_usage_perc,
            "num_preemptions_total": m.num_preemptions_total,
            "scraped_at": m.scraped_at or None,
            "age_s": round(now - m.scraped_at, 3) if m.scraped_at else None,
        },
        "last_error": b.last_error,
        "log_path": b.log_path,
    }


class StaticPool:
    """A fixed (admin-editable) set of OpenAI-compatible endpoints; launches nothing."""

    def __init__(
        self,
        upstreams: Sequence[UpstreamConfig] = (),
        *,
        kind: str = "static",
        health_interval_s: float = HEALTH_INTERVAL_S,
        scrape_interval_s: float | None = SCRAPE_INTERVAL_S,
        unhealthy_after: int = UNHEALTHY_AFTER,
        client: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.kind = kind
        self.clock: Clock = clock or SystemClock()
        self.health_interval_s = health_interval_s
        self.scrape_interval_s = scrape_interval_s
        self.health = HealthTracker(unhealthy_after)
        self._backends: list[Backend] = []
        self._no_metrics: set[str] = set()
        self._client = client
        self._own_client = client is None
        self._tasks: list[asyncio.Task[None]] = []
        for u in upstreams:
            self._add(u)

    # -- BackendPool ---------------------------------------------------------------------
    async def start(self) -> None:
        """Run one round of health checks (so the pool can serve at once), then loop."""
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False)
        await self.check_health()
        self._tasks = [asyncio.create_task(every(self.health_interval_s, self.check_health))]
        if self.scrape_interval_s is not None:
            self._tasks.append(asyncio.create_task(every(self.scrape_interval_s, self.scrape)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for b in self._backends:
            self.health.reset(b, "stopped")
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def backends(self) -> list[Backend]:
        return list(self._backends)

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock.monotonic()
        return [backend_snapshot(b, now=now) for b in self._backends]

    def models(self) -> list[str]:
        return models_of(self._backends)

    def candidates(self, model: str) -> list[Backend]:
        return [b for b in self._backends if b.routable and b.serves(model)]

    # -- admin -----------------------------------------------------------------------------
    def get(self, name: str) -> Backend:
        for b in self._backends:
            if b.name == name:
                return b
        raise NotFound(f"backend {name!r} not found", code="backend_not_found")

    def has(self, name: str) -> bool:
        return any(b.name == name for b in self._backends)

    def _add(self, u: UpstreamConfig) -> Backend:
        if self.has(u.name):
            raise InvalidRequest(f"backend {u.name!r} already exists", code="backend_exists")
        b = backend_from_upstream(u, self.kind)
        self._backends.append(b)
        if b.kind == "litellm":
            self._no_metrics.add(b.name)
        return b

    async def add(self, u: UpstreamConfig) -> Backend:
        """Register an endpoint and check its health once before returning it."""
        b = self._add(u)
        if self._client is not None:
            await self._check(b)
        return b

    async def add_external(self, u: UpstreamConfig) -> Backend:
        """Same as :meth:`add` (the name :class:`~adapters.pool.EnginePool` uses)."""
        return await self.add(u)

    def remove(self, name: str) -> Backend:
        """Unregister; requests already sent there finish on their own."""
        b = self.get(name)
        self._backends.remove(b)
        self.health.forget(name)
        self._no_metrics.discard(name)
        b.state = "stopped"
        return b

    async def drain(self, name: str) -> None:
        b = self.get(name)
        self.health.drain(b)
        await wait_in_flight_zero(b)

    def undrain(self, name: str) -> None:
        self.health.undrain(self.get(name))

    # -- loops -----------------------------------------------------------------------------
    async def _check(self, b: Backend) -> None:
        if b.kind == "litellm":
            ok, err = await litellm_ready()
            self.health.record(b, ok, err, launched=False)
            return
        assert self._client is not None
        ok, err = await probe(self._client, b, probe_timeout(self.health_interval_s))
        self.health.record(b, ok, err, launched=False)

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.backends()))

    async def _scrape_one(self, b: Backend) -> None:
        assert self._client is not None
        try:
            s = await scrape(self._client, b.url, headers=auth_headers(b),
                             now=self.clock.monotonic())
        except MetricsNotExported:
            self._no_metrics.add(b.name)
            return
        except httpx.HTTPError:
            return  # keep the last metrics; their age tells the reader
        b.metrics = s.metrics
        await probe_model_len(self._client, b, auth_headers(b))

    async def scrape(self) -> None:
        live = [
            b for b in self.backends() if b.name not in self._no_metrics and b.state != "stopped"
        ]
        await asyncio.gather(*(self._scrape_one(b) for b in live))


def models_of(backends: Iterable[Backend]) -> list[str]:
    seen: dict[str, None] = {}
    for b in backends:
        if b.state not in ("failed", "stopped"):
            seen.update(dict.fromkeys(b.models))
    return list(seen)

"""One request's life in the gateway, from admission to settlement, apart from HTTP.

:class:`RequestLifecycle` is the one object that

1. **begins** a request (:meth:`~RequestLifecycle.begin`): refuses what can never run
   (400 ``context_length_exceeded``), estimates its output, shapes it (RPM / TPM / daily
   quota), queues it and waits for its grant;
2. gives it its **engine** (:meth:`~RequestLifecycle.next_engine`): the engine the grant
   names, or a fallback when that one is gone or refused the connection -- the hold moves
   with it in the admission queue, which is the only ledger of engine capacity;
3. **grows** it while it streams (:meth:`~RequestLifecycle.streamed`): events beyond the
   conservative prediction are charged to the engine live;
4. **settles** it on every path (:meth:`~RequestLifecycle.settle`): releases the hold,
   reconciles the token charge with real usage, records the SLO outcome, feeds learning
   and accounting, and counts metrics.

The HTTP handler (:mod:`proxy.openai_api`) keeps only ASGI I/O and error rendering. The id
of the request in the queue and of its hold is minted here (:func:`mint_id`); the client's
``x-request-id`` is only echoed and logged. A request holds one lease, its hold in the
admission queue (renewed by the scheduler); shaping charges buckets and holds nothing.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.shaping import ratelimit_headers
from proxy.store.base import Decision, Limits

if TYPE_CHECKING:
    from adapters.base import Backend
    from proxy.auth import Principal
    from proxy.gateway import Gateway
    from proxy.requests import ParsedRequest
    from proxy.scheduler import Admitted

#: tokens streamed beyond the footprint are charged to the engine in steps of this many
GROW_STEP = 16


def mint_id() -> str:
    """A fresh request id (128 random bits, hex): the queue item, hold and charge id."""
    return os.urandom(16).hex()


@dataclass(slots=True)
class Outcome:
    """What the HTTP side saw of the request, for :meth:`RequestLifecycle.settle`."""

    status: int = 0
    usage: dict[str, Any] | None = None
    #: SSE events relayed (an estimate of tokens when the engine reported no usage)
    streamed_events: int = 0
    #: ``clock.monotonic()`` of the first byte relayed to the client
    first_byte_at: float | None = None


@dataclass(slots=True, eq=False)
class RequestLifecycle:
    gw: Gateway
    principal: Principal
    req: ParsedRequest
    #: monotonic start of the request (for its latencies)
    t0: float
    id: str = field(default_factory=mint_id)
    #: where the request is: shaping -> queued -> upstream (disconnect metrics use it)
    stage: str = "shaping"
    admitted: Admitted | None = None
    admitted_at: float | None = None
    #: ``x-ratelimit-*`` headers of the shaping decision
    rl_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: the engine now serving the request, and whether any engine got it
    backend: Backend | None = None
    upstream_reached: bool = False
    _shaped: bool = False
    _charged: int = 0
    _tried: set[str] = field(default_factory=set)
    #: events relayed past which the next grow step is charged (checked inline by the relay)
    grow_mark: int = 1 << 62

    # -- begin ---------------------------------------------------------------------------
    async def begin(self) -> None:
        """Refuse, shape, queue and wait for a grant; raises the request's GatewayError
        (400 / 429 / 503). Cancellation (the client went away) leaves nothing held."""
        gw, req = self.gw, self.req
        tenant = self.principal.tenant
        sched = gw.scheduler
        sched.check_fits(tenant, req)
        x = sched.features_of(tenant, req)
        est = sched.estimate(x, req.max_tokens)
        if req.endpoint == "embeddings":
            expected_out = 0
        else:
            expected_out = req.max_tokens if req.max_tokens is not None else max(1, round(est.p50))
        self.stage = "shaping"
        # RPM/TPM/quota here; concurrency is the queue's job (the live, drift-adjusted limit)
        charge, limits = req.prompt_tokens + expected_out, Limits.of(tenant)
        step = gw.shaper.step(tenant, charge, limits) if sched.queue.runs_store_steps else None
        if step is None:
            self._charge_shaped(await gw.shaper.acquire(tenant, charge, limits), charge)
            self.admitted = adm = await sched.admit(tenant, req, self.id, x, est)
        else:
            # shaping runs first in the queue's enqueue script: one round trip for both
            def shaped(reply: Any) -> None:
                self._charge_shaped(gw.shaper.judge(tenant, charge, limits, reply), charge)

            self.admitted = adm = await sched.admit(tenant, req, self.id, x, est, step, shaped)
        self.admitted_at = gw.clock.monotonic()
        tm = gw.metrics.tenant(tenant.name, tenant.qos_class)
        tm.queue_wait.observe(self.admitted_at - self.t0)
        tm.in_flight.inc()
        self.stage = "upstream"
        self.grow_mark = adm.grant.footprint - adm.qreq.prompt_tokens + 2

    def _charge_shaped(self, decision: Decision, charge: int) -> None:
        """Shaping passed and charged ``charge`` tokens: the request is now queued."""
        self._shaped, self._charged = True, charge
        self.rl_headers = ratelimit_headers(decision.state)
        self.stage = "queued"

    # -- engine --------------------------------------------------------------------------
    async def next_engine(self) -> Backend | None:
        """The engine to try next: the granted one while it is routable, else the best
        fallback not tried yet (its hold moves there); ``None`` when none is left."""
        gw = self.gw
        assert self.admitted is not None
        candidates = [b for b in gw.pool.candidates(self.req.model) if b.name not in self._tried]
        granted = self.admitted.grant.backend
        backend = next((b for b in candidates if b.name == granted), None)
        if backend is None:
            backend = gw.router.pick(candidates, self.admitted.grant.footprint)
            if backend is not None:
                await gw.scheduler.move(self.id, backend.name)
        if backend is not None:
            self._tried.add(backend.name)
        self.backend = backend
        return backend

    # -- streaming -----------------------------------------------------------------------
    async def streamed(self, events: int) -> None:
        """``events`` SSE events relayed so far: charge what passes the footprint. The relay
        calls it only once ``events > grow_mark`` (no coroutine per chunk on the hot path)."""
        if events > self.grow_mark:
            self.grow_mark += GROW_STEP
            await self.gw.scheduler.grow(self.id, GROW_STEP)

    # -- settle --------------------------------------------------------------------------
    async def settle(self, out: Outcome) -> None:
        """Release, reconcile, record and count; runs on every path (call it shielded)."""
        gw, req = self.gw, self.req
        tenant = self.principal.tenant
        tm = gw.metrics.tenant(tenant.name, tenant.qos_class)
        usage = out.usage or {}
        p_tok = int(usage.get("prompt_tokens") or 0)
        c_tok = int(usage.get("completion_tokens") or 0)
        if not usage and self.upstream_reached:
            # the engine did work but reported nothing (disconnect, broken stream): estimate
            p_tok = req.prompt_tokens
            c_tok = max(0, out.streamed_events - 2)
        # the release runs while the rest settles; on Redis it also settles the store's
        # charge and usage (one script), else the store is settled at the same time
        delta = 0
        if self._shaped:
            actual = p_tok + c_tok if self.upstream_reached else 0
            delta = actual - self._charged
        usage_counts = {"requests": 1, "errors": 0 if out.status == 200 else 1,
                        "tokens_in": p_tok, "tokens_out": c_tok}
        outcome = None
        if self.stage in ("queued", "upstream") and out.status != 499 \
                and req.endpoint != "embeddings":
            # queued or served (not refused by its own rate limits, not abandoned by the
            # client): an SLO outcome for the controllers' feedback
            end = gw.clock.monotonic()
            outcome = gw.scheduler.outcome(
                tenant, ok=out.status == 200 and bool(usage),
                ttft_s=out.first_byte_at - self.t0
                if req.stream and out.first_byte_at is not None else None,
                e2e_s=end - self.t0, output_tokens=c_tok)
        released, settle = None, None
        if self.admitted is not None:
            known = bool(usage) and out.status == 200 and req.endpoint != "embeddings"
            if gw.scheduler.queue.runs_store_steps:
                # the store's settlement runs in the release's script: one round trip
                settle = gw.shaper.finish_step(tenant.name, delta, Limits.of(tenant),
                                               **usage_counts)
            released = asyncio.ensure_future(gw.scheduler.complete(
                self.admitted, c_tok if known else None, settle, outcome))
            tm.in_flight.dec()
        elif outcome is not None:
            gw.scheduler.record_outcome(tenant, outcome)
        try:
            if settle is None:
                await gw.shaper.finish(tenant.name, delta, Limits.of(tenant), **usage_counts)
        finally:
            if released is not None:
                await released
        if p_tok:
            tm.prompt_tokens.inc(p_tok)
        if c_tok:
            tm.completion_tokens.inc(c_tok)
        if out.status == 200:
            now = gw.clock.monotonic()
            if out.first_byte_at is not None:
                tm.ttft.observe(out.first_byte_at - self.t0)
            tm.e2e.observe(now - self.t0)

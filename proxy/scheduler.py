"""Admission: estimate, enqueue under the policy's key, wait for a grant, release.

The gateway side of scheduling. Per request:

1. **estimate** output tokens (River estimator: ``p50`` for ordering, ``p90`` for capacity);
2. **enqueue** a :class:`~proxy.admission.base.QueueItem` whose score is the active
   policy's key and whose footprint is prompt + ``p90`` (capped by ``max_tokens``);
3. **wait** for the grant that any replica's dispatch makes once the tenant is under its
   (drift-adjusted) concurrency limit and an engine has room for the footprint; the grant
   names the engine;
4. on completion **release** the hold with the fair-share correction (actual minus
   predicted cost), feed the estimator (off the request path) and the drift controller.

Fair share is the admission queue's: each item carries its grant charge
(:attr:`~proxy.admission.base.QueueItem.charge`, the policy's
:class:`~policies.base.ChargeModel`) and the queue keeps every tenant's virtual counter, on
Redis for all replicas at once. A key that reads the counters (``driftsched``'s debt) reads
the ledger as the capacity loop last saw it (:class:`FairLedger`).

A dispatch loop per replica wakes on release/enqueue notifications (not polling) and a
capacity publisher pushes every engine's admission budget (KV capacity x
``kv_budget_fraction``, max sequences, the TPOT governor's soft cap on them, which the top
class may exceed, routable) to the shared queue twice a second.

Feedback, off the request path: each finished request's SLO outcome (TTFT and TPOT against
its class's SLOs; a failure is a miss) goes into a rolling per-level window
(:class:`SloWindow`); once a second each level's attainment is reported to the drift
controller (:meth:`~policies.drift.DriftController.on_attainment`), which throttles
drifting tenants only while a more important level misses its target. The capacity loop
also feeds each engine's scrape to the :class:`~policies.governor.TpotGovernor`.

Replicas decide as one. Every finished request is one
:class:`~proxy.completions.Completion` that every replica applies (:meth:`Scheduler.apply`:
its own at once, the others' from the completion bus), so every replica's estimator, SLO
windows, governor headroom and drift controller see all the traffic. What they decide is
published by one of them, the **leader** (:meth:`~proxy.admission.base.AdmissionQueue.leader`:
the oldest live replica by heartbeat; it hands over when its heartbeat lapses):

* the TPOT governor's caps on shared engines (``external`` endpoints, which every replica
  reaches): the leader computes them from its scrapes; the others publish the cap the queue
  holds (the leader's, read just before) and adopt it, so that a new leader starts from it.
  Engines a replica launched itself (``sim``, ``vllm``) only it reaches: it governs them.
* the drift controller's limit changes: the leader writes them; the others write a tenant's
  limit only the first time they see the tenant (from their own controller, which has seen
  the same completions) and when an operator changes the tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from adapters.base import Backend, BackendPool
from adapters.clock import Clock
from adapters.errors import (
    ContextLengthExceeded,
    QueueFull,
    QueueTimeout,
    SloUnattainable,
    StoreUnavailable,
)
from policies.base import Policy, QueuedRequest, TenantState
from policies.drift import DriftController
from policies.estimator import Estimate, OutputTokenEstimator
from policies.features import RequestFeatures
from policies.governor import GovernorParams, TpotGovernor
from proxy.admission.base import (
    AdmissionQueue,
    EngineCapacity,
    EngineLoad,
    Grant,
    QueueItem,
    QueueStats,
)
from proxy.completions import Completion, CompletionBus, LocalCompletions
from proxy.config import Settings
from proxy.requests import ParsedRequest
from proxy.store.base import StoreStep, Tenant
from proxy.store.base import StoreUnavailable as StoreDown

log = logging.getLogger("driftsched.scheduler")
#: shorter answers' TPOT is not held against the SLO in the controller's feedback
_MIN_TPOT_TOKENS = 16
#: failed releases kept for retry at most (beyond, the oldest is left to its lease)
_MAX_UNRELEASED = 10_000
#: engine kinds a replica launches itself (its pool's): only it reaches them
_LAUNCHED = frozenset({"sim", "vllm"})


@dataclass(slots=True)
class Admitted:
    """A granted request: what completion needs to release and account it."""

    grant: Grant
    qreq: QueuedRequest
    estimate: Estimate
    queued_s: float
    #: estimator features, kept for learning at completion
    features: dict[str, Any]
    #: the fair-share charge its grant added to the tenant's counter
    charge: float = 0.0
    #: tokens grown (streamed past the footprint) not yet charged to the engine, and the
    #: task charging them: growth never makes the stream wait for the store
    pending_grow: int = 0
    growing: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished request against its class's SLOs (:meth:`Scheduler.outcome`)."""

    #: met every SLO of its class (None: the class has none)
    met: bool | None
    #: its stream's mean time per output token, when long enough to judge (else None)
    stream_tpot_s: float | None


class SloWindow:
    """Per-level SLO outcomes of the last ``window_s`` seconds (met or missed)."""

    def __init__(self, window_s: float, min_samples: int) -> None:
        self.window_s, self.min_samples = window_s, min_samples
        self._events: dict[int, deque[tuple[float, bool]]] = {}
        self._met: dict[int, int] = {}

    def record(self, level: int, met: bool, now: float) -> None:
        self._events.setdefault(level, deque()).append((now, met))
        self._met[level] = self._met.get(level, 0) + met

    def attainment(self, now: float) -> dict[int, tuple[float, int]]:
        """level -> (attainment, requests) over the window, for levels with enough requests."""
        out = {}
        for level, ev in self._events.items():
            while ev and ev[0][0] < now - self.window_s:
                self._met[level] -= ev.popleft()[1]
            if len(ev) >= self.min_samples:
                out[level] = (self._met[level] / len(ev), len(ev))
        return out


class Scheduler:
    def __init__(
        self,
        *,
        settings: Settings,
        clock: Clock,
        queue: AdmissionQueue,
        pool: BackendPool,
        policy: Policy,
        estimator: OutputTokenEstimator,
        drift: DriftController | None,
        replica_id: str,
        completions: CompletionBus | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.queue = queue
        self.pool = pool
        self.policy = policy
        self.estimator = estimator
        self.drift = drift
        self.replica_id = replica_id
        self.completions: CompletionBus = completions or LocalCompletions()
        self.features = RequestFeatures()
        cfg = settings.scheduler
        self._budget_fraction = cfg.kv_budget_fraction
        tpots = [c.tpot_slo_ms for c in settings.classes.values() if c.tpot_slo_ms]
        tpots += [t.tpot_slo_ms for t in settings.tenants if t.tpot_slo_ms]
        gov = cfg.governor.model_dump()
        if gov["enabled"] is None:
            gov["enabled"] = policy.type == "driftsched"
        self.governor = TpotGovernor(GovernorParams(**gov), min(tpots) / 1000.0 if tpots else None)
        self.slo = SloWindow(cfg.slo_window_s, cfg.slo_min_samples)
        self._min_misses = cfg.slo_min_misses
        #: level -> (attainment, requests) of the last evaluation, for /metrics
        self.attainment_snapshot: dict[int, tuple[float, int]] = {}
        self._next_slo_check = 0.0
        self._lease_ttl = settings.store.lease_ttl_s
        self._replica_ttl = settings.store.replica_ttl_s
        #: the queue's fair-share ledger as last read, plus this replica's charges since
        self.ledger = FairLedger()
        self._held: dict[str, Admitted] = {}
        #: releases that failed (the store was down): id -> correction, retried in order
        self._unreleased: dict[str, float] = {}
        self._learn: deque[tuple[dict[str, Any], float]] = deque(maxlen=10_000)
        self._learn_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: refreshed by the capacity loop, read by /metrics and the admin API
        self.depth_snapshot: dict[str, int] = {}
        self.loads_snapshot: list[EngineLoad] = []
        #: each tenant's configured concurrency limit, as last read from its record
        self._base_limits: dict[str, int | None] = {}
        #: the limits this replica last wrote to the shared queue (read there at dispatch)
        self._published: dict[str, int | None] = {}
        #: measured drain rates (grants per second): per backlogged tenant, and in total
        self._drain = DrainRates()
        #: the replica that publishes the shared decisions, as last read (None: unknown)
        self.leader: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock.time()
        await self.queue.heartbeat(now, self._replica_ttl)
        await self.follow_leader(now)
        self.loads_snapshot = await self.queue.loads(now)
        await self.publish_capacity()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._capacity_loop(), name="capacity"),
            asyncio.create_task(self._renew_loop(), name="hold-renewal"),
            asyncio.create_task(self._learn_loop(), name="estimator-learning"),
        ]
        await self.completions.start(self.apply)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.completions.aclose()

    # -- request path ----------------------------------------------------------------------
    def features_of(self, tenant: Tenant, req: ParsedRequest) -> dict[str, Any]:
        return self.features.transform_one({
            "prompt": req.prompt_text, "prompt_tokens": req.prompt_tokens,
            "tenant": tenant.name, "model": req.model, "n_messages": req.n_messages or 1,
            "max_tokens": req.max_tokens,
            "oracle_output_tokens": req.oracle_output_tokens,  # None unless estimator.kind oracle
        })

    def estimate(self, x: dict[str, Any], max_tokens: int | None) -> Estimate:
        est = self.estimator.estimate_one(x)
        if max_tokens is not None:
            est = Estimate(min(est.p50, max_tokens), min(est.p90, max_tokens))
        return est

    def slo_ms(self, tenant: Tenant) -> tuple[float | None, float | None]:
        """The tenant's (TTFT, TPOT) SLOs in ms: its own, else its class's."""
        cls = self.settings.classes[tenant.qos_class]
        ttft = tenant.ttft_slo_ms if tenant.ttft_slo_ms is not None else cls.ttft_slo_ms
        tpot = tenant.tpot_slo_ms if tenant.tpot_slo_ms is not None else cls.tpot_slo_ms
        return ttft, tpot

    def outcome(
        self, tenant: Tenant, *, ok: bool, ttft_s: float | None, e2e_s: float, output_tokens: int,
    ) -> Outcome:
        """A finished request's outcome against its class's SLOs (a failure is a miss; a
        class without SLOs is not counted). ``ttft_s`` None (not streamed): the end-to-end
        time is held against TTFT + TPOT x (tokens - 1). TPOT is judged from
        ``_MIN_TPOT_TOKENS`` output tokens on (feedback, not the report)."""
        n = max(output_tokens - 1, 0)
        # the TPOT of a short answer is a step or two of jitter and SSE coalescing
        stream_tpot = (e2e_s - ttft_s) / n if ok and ttft_s is not None and n >= _MIN_TPOT_TOKENS \
            else None
        ttft, tpot = self.slo_ms(tenant)
        if ttft is None and tpot is None:
            return Outcome(None, stream_tpot)
        met = ok
        if met:
            if ttft_s is None:
                met = e2e_s * 1000.0 <= (ttft or math.inf) + (tpot or math.inf) * n
            else:
                met = ttft is None or ttft_s * 1000.0 <= ttft
                if met and tpot is not None and stream_tpot is not None:
                    met = stream_tpot * 1000.0 <= tpot
        return Outcome(met, stream_tpot)

    def record_outcome(self, tenant: Tenant, outcome: Outcome) -> None:
        """A request that reached the queue and was never granted finished (a granted one's
        outcome goes with :meth:`complete`): feed it to every replica's controllers."""
        level = self.settings.classes[tenant.qos_class].level
        c = Completion(tenant.name, level, tenant.max_concurrency, outcome.met,
                       outcome.stream_tpot_s)
        self.apply(c)
        self.completions.publish(c)

    def apply(self, c: Completion) -> None:
        """Feed one finished request, this replica's or (from the completion bus) another's,
        to the estimator and the controllers: the SLO window of its level, the governor's
        outer loop, the drift controller. Every replica applies every replica's events, so
        their controllers see the same traffic and decide alike."""
        if c.features and c.actual is not None:
            self.learn(c.features, c.actual)
        if c.level is None:
            return  # the estimator's only
        now = self.clock.time()
        if c.stream_tpot_s is not None:
            act = self.governor.observe_stream(c.stream_tpot_s, now)
            if act != "none":
                log.info("tpot governor acted", extra={
                    "action": act, "headroom": round(self.governor.headroom, 3),
                    "target_ms": round((self.governor.target_s or 0) * 1000, 1)})
        if c.met is not None:
            self.slo.record(c.level, c.met, now)
        if self.drift is None or c.predicted is None or c.actual is None:
            return
        try:
            action = self.drift.observe(c.tenant, c.predicted, c.actual)
        except KeyError:
            # a tenant only other replicas have served: track it as they do, and publish
            # its limit as they do
            self.drift.configure(c.tenant, c.level, c.base_limit)
            self._base_limits.setdefault(c.tenant, c.base_limit)
            action = self.drift.observe(c.tenant, c.predicted, c.actual)
        if action != "none":
            st_d = self.drift.status(c.tenant)
            log.info("drift controller acted", extra={
                "tenant": c.tenant, "action": action, "ratio": round(st_d.ratio, 3),
                "limit": st_d.limit})

    def tenant_state(self, tenant: Tenant, charge: float = 0.0) -> TenantState:
        """What the policy's key reads of ``tenant`` now: its level, live limit, drift
        annotations and, under a fair-share policy, its ledger position with ``charge``
        (the request's own) counted as queued."""
        level = self.settings.classes[tenant.qos_class].level
        self._base_limits[tenant.name] = tenant.max_concurrency
        if self.policy.fair_share is None:
            st = TenantState(tenant.name, level, limit=tenant.max_concurrency,
                             queue_timeout_s=tenant.queue_timeout_s)
        else:
            vc, floor, queued = self.ledger.position(tenant.name)
            st = TenantState(tenant.name, level, vc, floor, queued + charge,
                             limit=tenant.max_concurrency,
                             queue_timeout_s=tenant.queue_timeout_s)
        if self.drift is not None:
            self.drift.configure(tenant.name, level, tenant.max_concurrency)
            st = self.drift.annotate(st)
        return st

    def limit_of(self, name: str) -> int | None:
        """The tenant's concurrency limit now: the drift controller's, else its record's."""
        if self.drift is not None:
            with contextlib.suppress(KeyError):
                return self.drift.limit(name)
        return self._base_limits.get(name)

    @property
    def leading(self) -> bool:
        """Whether this replica publishes the shared decisions (module doc)."""
        return self.leader == self.replica_id

    async def follow_leader(self, now: float) -> None:
        """Read who leads; on taking the lead, publish every limit once (the queue holds
        the previous leader's)."""
        was = self.leading
        self.leader = await self.queue.leader(now)
        if self.leading and not was:
            log.info("this replica now publishes the shared scheduling decisions",
                     extra={"replica": self.replica_id})
            self._published.clear()

    async def publish_limits(self, names: list[str] | None = None) -> None:
        """Write the limits that changed (of ``names``, default every tenant seen) to the
        shared queue, where every replica's next dispatch reads them. Only the leader writes
        a change; another replica writes a tenant's limit the first time it sees it."""
        changed: dict[str, int | None] = {}
        for name in self._base_limits if names is None else names:
            limit = self.limit_of(name)
            if name not in self._published or (self.leading and self._published[name] != limit):
                changed[name] = limit
        if changed:
            await self.queue.set_limits(changed)
            self._published.update(changed)

    async def tenant_changed(self, tenant: Tenant) -> None:
        """An operator changed ``tenant`` (admin API): apply its limit to queued requests
        now, on every replica (the shared queue reads it at the next dispatch)."""
        self.tenant_state(tenant)
        self._published.pop(tenant.name, None)  # write it even if this replica thinks it knows
        await self.publish_limits([tenant.name])

    def check_fits(self, tenant: Tenant, req: ParsedRequest) -> None:
        """Refuse what no engine serving the model can ever run (400, never queued): a
        prompt at or past every engine's ``max_model_len`` (or, with ``max_tokens``, a
        prompt + ``max_tokens`` past it, as vLLM refuses), or a prompt larger than every
        engine's whole KV capacity. Unknown lengths or capacities never refuse; the prompt
        length is the gateway's estimate (:mod:`proxy.tokens`)."""
        engines = [b for b in self.pool.backends()
                   if b.serves(req.model) and b.state not in ("failed", "stopped")]
        if not engines or req.endpoint == "embeddings":
            return
        prompt = req.prompt_tokens
        lens = [b.max_model_len for b in engines]
        if all(n is not None for n in lens):
            longest = max(n for n in lens if n is not None)
            what = "prompt" if req.endpoint == "completions" else "messages"
            if prompt >= longest:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {longest} tokens. However, your "
                    f"{what} resulted in {prompt} tokens. Please reduce the length of the {what}.",
                    param=what)
            if req.max_tokens is not None and prompt + req.max_tokens > longest:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {longest} tokens. However, you "
                    f"requested {prompt + req.max_tokens} tokens ({prompt} in the {what}, "
                    f"{req.max_tokens} in the completion). Please reduce the length of the "
                    f"{what} or completion.", param=what)
        kvs = [b.kv_capacity_tokens for b in engines]
        if all(n is not None for n in kvs):
            largest = max(n for n in kvs if n is not None)
            if prompt + 1 > largest:
                raise ContextLengthExceeded(
                    f"This request needs at least {prompt + 1} tokens of KV cache; the largest "
                    f"engine serving model `{req.model}` holds {largest}. Please reduce the "
                    "length of the messages.", param="messages")

    def retry_after_s(self, tenant: Tenant, whole: bool = False) -> float:
        """A truthful ``retry-after``: the backlog (the tenant's, or ``whole`` queue's) over
        its measured drain rate, 1..60 s; the tenant's queue timeout when nothing drains."""
        depth = sum(self.depth_snapshot.values()) if whole else \
            self.depth_snapshot.get(tenant.name, 0)
        rate = self._drain.total if whole else self._drain.of(tenant.name)
        retry = depth / rate if rate > 0 else tenant.queue_timeout_s
        return float(max(1, min(60, math.ceil(retry))))

    def _queue_full(self, tenant: Tenant, result: str) -> QueueFull:
        whole = result == "full"
        cap = self.settings.scheduler.max_queued if whole \
            else self.settings.scheduler.max_queued_per_tenant
        rate = self._drain.total if whole else self._drain.of(tenant.name)
        retry = self.retry_after_s(tenant, whole)
        who = "The gateway's admission queue" if whole else f"Tenant {tenant.name!r}'s queue"
        return QueueFull(
            f"{who} is full ({cap} requests waiting); it drains at about {rate:.1f} "
            f"requests/s. Please retry after {retry:.0f}s.", retry_after_s=retry)

    async def admit(
        self, tenant: Tenant, req: ParsedRequest, rid: str, x: dict[str, Any], est: Estimate,
        shaping: StoreStep | None = None, shaped: Callable[[Any], object] | None = None,
    ) -> Admitted:
        """Queue the request and return once it is granted an engine.

        ``x`` and ``est`` come from :meth:`features_of` and :meth:`estimate`. Raises
        :class:`QueueTimeout` after ``tenant.queue_timeout_s``. Cancellation (client gone)
        removes the item, or releases the grant if it raced with the cancel.

        ``shaping`` (a queue that :attr:`~proxy.admission.base.AdmissionQueue.runs_store_steps`):
        the request's rate shaping, run first in the enqueue's script; ``shaped`` gets its
        reply at once, before any wait, and raises the 429 when it refused.
        """
        now = self.clock.time()
        level = self.settings.classes[tenant.qos_class].level
        ttft, tpot = self.slo_ms(tenant)
        qreq = QueuedRequest(
            id=rid, tenant=tenant.name, arrival=now, prompt_tokens=req.prompt_tokens,
            predicted_output_p50=est.p50, predicted_output_p90=est.p90,
            qos_class=tenant.qos_class, level=level, weight=tenant.weight,
            max_tokens=req.max_tokens, ttft_slo_s=ttft / 1000 if ttft else None,
            tpot_slo_s=tpot / 1000 if tpot else None, model=req.model,
        )
        fs, feas = self.policy.fair_share, self.policy.feasibility
        charge = fs.charge(qreq) if fs is not None else 0.0
        state = self.tenant_state(tenant, charge)
        item = QueueItem(
            id=rid, tenant=tenant.name, replica=self.replica_id, model=req.model,
            score=self.policy.ordering.key(qreq, state, now), footprint=qreq.footprint,
            deadline=now + tenant.queue_timeout_s, exempt=self.governor.exempts(level),
            charge=charge, late_at=feas.late_at(qreq) if feas is not None else math.inf,
        )
        granted = False
        try:
            await self.publish_limits([tenant.name])
            # shaped, queued and, when it fits now, granted: one atomic step (one round trip)
            done = await self.queue.enqueue_dispatch(item, now, self._lease_ttl,
                                                     store_step=shaping)
            if shaped is not None and shaping is not None:
                shaped(done.store_reply)  # raises the shaping 429 (then nothing was queued)
            result = done.result
            if result in ("tenant_full", "full"):
                raise self._queue_full(tenant, result)
        except StoreDown as e:
            # the script may have run before the connection failed: the item may be queued,
            # even granted, with nobody waiting; withdraw it once the store answers
            self._release_later(rid, -charge)
            if not self.settings.store.fail_open:
                raise StoreUnavailable("The admission queue's store is unavailable.") from e
            log.warning("queue unavailable, admitting without scheduling (fail_open): %s", e)
            bypass = Grant(rid, tenant.name, self.replica_id, "", qreq.footprint)
            return Admitted(bypass, qreq, est, 0.0, {})
        self.ledger.queued(tenant.name, charge)
        try:
            try:
                res = await self.queue.wait(rid, tenant.queue_timeout_s + 0.5)
            except StoreDown as e:
                raise StoreUnavailable("The admission queue's store is unavailable.") from e
            if res == "expired" and feas is not None and feas.rule == "shed" \
                    and self.clock.time() < item.deadline:
                raise SloUnattainable(
                    f"Request could no longer be started within the TTFT SLO of tenant "
                    f"{tenant.name!r} ({ttft:g} ms) and was shed.",
                    retry_after_s=self.retry_after_s(tenant))
            if not isinstance(res, Grant):
                raise QueueTimeout(
                    f"Request waited {tenant.queue_timeout_s:g}s in the queue of tenant "
                    f"{tenant.name!r} without capacity becoming free.",
                    retry_after_s=self.retry_after_s(tenant),
                )
            granted = True
            adm = Admitted(res, qreq, est, self.clock.time() - now, x, charge)
            self._held[rid] = adm
            return adm
        finally:
            if not granted:
                await asyncio.shield(self._withdraw(rid, charge))

    async def _withdraw(self, rid: str, charge: float) -> None:
        try:
            if not await self.queue.cancel(rid):
                # granted while we gave up: give it back, unserved, so uncharged
                await self.queue.release(rid, -charge)
        except Exception as e:
            log.warning("withdrawing a queued request failed; retrying: %s", e)
            self._release_later(rid, -charge)

    def _release_later(self, rid: str, correction: float) -> None:
        """Release ``rid`` (a hold, or an item still queued) from the capacity loop once the
        store answers (:meth:`retry_releases`); its lease is the backstop."""
        self._unreleased[rid] = correction
        while len(self._unreleased) > _MAX_UNRELEASED:
            del self._unreleased[next(iter(self._unreleased))]

    async def move(self, rid: str, engine: str) -> None:
        """The request is served by fallback ``engine``: its hold moves there."""
        adm = self._held.get(rid)
        if adm is None or adm.grant.backend == engine:
            return
        try:
            await self.queue.move(rid, engine)
        except StoreDown as e:
            log.warning("moving a hold to its fallback engine failed: %s", e)
        adm.grant = replace(adm.grant, backend=engine)

    async def grow(self, rid: str, delta_tokens: int) -> None:
        """Charge tokens generated beyond the prediction to the engine, live and best
        effort: in a background task, so the stream never waits for the store; what a
        failed step could not charge is added to the next one."""
        adm = self._held.get(rid)
        if not delta_tokens or adm is None:
            return
        adm.pending_grow += delta_tokens
        if adm.growing is None:
            adm.growing = asyncio.create_task(self._charge_growth(adm), name="grow")

    async def _charge_growth(self, adm: Admitted) -> None:
        rid = adm.grant.id
        try:
            while adm.pending_grow and rid in self._held:
                delta, adm.pending_grow = adm.pending_grow, 0
                try:
                    await self.queue.grow(rid, delta)
                except Exception as e:
                    adm.pending_grow += delta  # charged with the next step, if the store is back
                    log.warning("charging a stream's growth failed; retried at its next step: "
                                "%s", e)
                    return
        finally:
            adm.growing = None

    async def complete(
        self, adm: Admitted, actual_output: int | None, settle: StoreStep | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        """Release the hold, correcting its fair-share charge by the real output length, and
        feed the finished request to every replica's estimator and controllers
        (:meth:`apply`; ``actual_output`` None: unknown, charged as predicted, nothing
        learned; ``outcome`` None: no SLO outcome to count). ``settle``: the store's token
        settlement, run in the release's script (a queue that runs store steps); lost, with
        a warning, when the release fails."""
        rid = adm.grant.id
        self._held.pop(rid, None)
        fs = self.policy.fair_share
        correction = 0.0
        if fs is not None and actual_output is not None and adm.charge:
            correction = fs.correction(adm.qreq, actual_output)
        if adm.growing is not None:
            adm.growing.cancel()
        try:
            # freed and re-dispatched into the room it made: one atomic step
            await self.queue.release_dispatch(rid, correction, self.clock.time(),
                                              self._lease_ttl, store_step=settle)
        except Exception as e:
            # retried by the capacity loop until the store answers (the lease is the backstop)
            log.warning("releasing a grant failed; retrying: %s", e)
            self._release_later(rid, correction)
        q = adm.qreq
        known = actual_output is not None
        c = Completion(
            q.tenant, q.level, self._base_limits.get(q.tenant),
            outcome.met if outcome is not None else None,
            outcome.stream_tpot_s if outcome is not None else None,
            adm.estimate.p50 if known else None,
            float(actual_output) if actual_output is not None else None,
            adm.features if known else {},
        )
        self.apply(c)
        self.completions.publish(c)

    def learn(self, x: dict[str, Any], y: float) -> None:
        """Queue one completion for the estimator to learn from, off the request path."""
        self._learn.append((x, y))
        self._learn_wake.set()

    # -- background --------------------------------------------------------------------------
    def governs(self, b: Backend) -> bool:
        """Whether this replica's governor sets ``b``'s cap: an engine it launched (nobody
        else reaches it), or a shared one while it leads (module doc)."""
        return self.leading or b.kind in _LAUNCHED

    def capacities(self) -> list[EngineCapacity]:
        out = []
        views = {ld.name: ld for ld in self.loads_snapshot}
        for b in self.pool.backends():
            budget = None
            if b.kv_capacity_tokens is not None:
                budget = max(1, math.floor(b.kv_capacity_tokens * self._budget_fraction))
            view = views.get(b.name)
            if not self.governs(b) and view is not None and view.max_seqs == b.max_num_seqs:
                # the leader's cap, as the queue holds it: published unchanged, and adopted
                # so that this replica starts from it if it takes the lead
                self.governor.adopt(b.name, view.soft_seqs, b.max_num_seqs)
            soft = self.governor.cap(b.name, b.max_num_seqs)
            out.append(EngineCapacity(b.name, tuple(b.models), budget, b.max_num_seqs,
                                      b.routable, soft if soft != b.max_num_seqs else None))
        return out

    def feedback(self, now: float) -> None:
        """Feed the governor the engines' latest scrapes and, once a second, the drift
        controller each level's SLO attainment (the capacity loop calls this)."""
        held = {ld.name: ld.seqs for ld in self.loads_snapshot}
        for b in self.pool.backends():
            if not self.governs(b):
                continue
            m = b.metrics
            act = self.governor.observe(b.name, m.scraped_at, m.generation_tokens_total,
                                        m.num_requests_running, held.get(b.name, 0), now)
            if act != "none":
                g = self.governor.engines[b.name]
                log.info("tpot governor acted", extra={
                    "backend": b.name, "action": act, "cap": g.cap,
                    "tpot_ms": round((g.tpot_s or 0.0) * 1000, 1)})
        if now < self._next_slo_check:
            return
        self._next_slo_check = now + 1.0
        self.attainment_snapshot = att = self.slo.attainment(now)
        if self.drift is None:
            return
        for name, action in self.drift.tick():
            st_d = self.drift.status(name)
            log.info("drift controller acted", extra={
                "tenant": name, "action": action, "ratio": round(st_d.ratio, 3),
                "limit": st_d.limit})
        for level, (value, n) in sorted(att.items()):
            if round((1.0 - value) * n) < self._min_misses:
                continue  # one or two misses in a window are noise, not pressure
            for name in self.drift.on_attainment(level, value):
                st_d = self.drift.status(name)
                log.info("drift controller acted", extra={
                    "tenant": name, "action": "slo_decrease", "ratio": round(st_d.ratio, 3),
                    "limit": st_d.limit, "attainment": round(value, 3), "level": level})

    async def publish_capacity(self) -> None:
        await self.queue.set_engines(self.capacities(), self.clock.time(), ttl_s=5.0)

    async def retry_releases(self) -> None:
        """Release the holds and withdraw the items whose release or withdrawal failed, oldest
        first, until one fails again."""
        while self._unreleased:
            rid, correction = next(iter(self._unreleased.items()))
            await self.queue.release(rid, correction)
            del self._unreleased[rid]

    async def _capacity_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                now = self.clock.time()
                await self.follow_leader(now)
                # the queue's view first: the governor's feedback reads the holds, and a
                # replica that does not govern an engine publishes the cap it holds
                self.loads_snapshot = await self.queue.loads(now)
                self.feedback(now)
                await self.publish_capacity()
                await self.retry_releases()
                await self.publish_limits()
                await self.queue.dispatch(now, self._lease_ttl)
                stats = await self.queue.stats()
                self.ledger.observe(stats)
                self._drain.observe(stats, now)
                self.depth_snapshot = stats.queued
            except StoreDown as e:
                log.warning("capacity publication failed: %s", e)
            except Exception:
                log.exception("capacity publication failed")

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                await self.queue.wait_capacity(0.25)
                await self.queue.dispatch(self.clock.time(), self._lease_ttl)
            except asyncio.CancelledError:
                raise
            except StoreDown as e:
                log.warning("dispatch failed: %s", e)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("dispatch failed")
                await asyncio.sleep(0.5)

    async def _heartbeat_loop(self) -> None:
        """Tell the queue this replica is alive (a lapsed one is reaped by the others)."""
        while True:
            await asyncio.sleep(self._replica_ttl / 5)
            try:
                await self.queue.heartbeat(self.clock.time(), self._replica_ttl)
            except StoreDown as e:
                log.warning("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat failed")

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            if self._held:
                try:
                    await self.queue.renew(list(self._held), self.clock.time(), self._lease_ttl)
                except Exception:
                    log.exception("renewing holds failed")

    async def _learn_loop(self) -> None:
        """Learning happens here, off the request path, in small batches."""
        while True:
            await self._learn_wake.wait()
            self._learn_wake.clear()
            n = 0
            while self._learn:
                x, y = self._learn.popleft()
                try:
                    self.estimator.learn_one(x, y)
                except Exception:
                    log.exception("estimator learning failed")
                n += 1
                if n % 8 == 0:  # ~50 us each: yield often, keep request latency flat
                    await asyncio.sleep(0)


class DrainRates:
    """Grants per second from the queue's counters (:class:`QueueStats`), smoothed (EWMA,
    ~5 s): in total and per backlogged tenant. What a "queue full" ``retry-after`` is
    derived from."""

    def __init__(self, half_life_s: float = 5.0) -> None:
        self.half_life_s = half_life_s
        self.total = 0.0
        self._rates: dict[str, float] = {}
        self._last: QueueStats | None = None
        self._at = 0.0

    def of(self, tenant: str) -> float:
        return self._rates.get(tenant, 0.0)

    def observe(self, stats: QueueStats, now: float) -> None:
        last, dt = self._last, now - self._at
        self._last, self._at = stats, now
        if last is None or dt <= 0:
            return
        a = 1.0 - 0.5 ** (dt / self.half_life_s)
        total = max(0, stats.granted_total - last.granted_total) / dt
        self.total += a * (total - self.total)
        rates = {}
        for tenant, n in stats.granted.items():
            before = last.granted.get(tenant)
            old = self._rates.get(tenant, 0.0)
            rate = max(0, n - before) / dt if before is not None else old
            rates[tenant] = old + a * (rate - old)
        self._rates = rates


class FairLedger:
    """The admission queue's fair-share ledger as this replica last read it
    (:meth:`~proxy.admission.base.AdmissionQueue.stats`, every 0.5 s), plus the charges this
    replica queued since: what a key that reads counters sees (``driftsched``'s debt). The
    queue's own decisions never use this copy; it may lag other replicas by one read."""

    __slots__ = ("_backlogged", "_charges", "_counters", "_floor", "_since")

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}
        self._charges: dict[str, float] = {}
        self._backlogged: dict[str, int] = {}
        self._floor = 0.0
        self._since: dict[str, float] = {}

    def observe(self, stats: QueueStats) -> None:
        self._counters, self._charges = stats.counters, stats.queued_charge
        self._backlogged, self._floor = stats.queued, stats.floor
        self._since = {}

    def queued(self, tenant: str, charge: float) -> None:
        if charge:
            self._since[tenant] = self._since.get(tenant, 0.0) + charge

    def position(self, tenant: str) -> tuple[float, float, float]:
        """(counter, floor, queued charges) of ``tenant``; a tenant with nothing queued is
        at least at the floor (the lift the queue applies when it enqueues)."""
        floor = self._floor
        queued = self._charges.get(tenant, 0.0) + self._since.get(tenant, 0.0)
        vc = self._counters.get(tenant, 0.0)
        if vc < floor and tenant not in self._backlogged and tenant not in self._since:
            vc = floor
        return vc, floor, queued

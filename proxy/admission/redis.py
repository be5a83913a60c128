"""The shared admission queue: Redis, for N gateway replicas with one order and one ledger.

Why choose it: more than one gateway process in front of one engine pool. Every step that
changes the queue or the ledger is one Lua script (``lua/common.lua`` + ``lua/<name>.lua``,
loaded once, run by EVALSHA), and the scripts repeat :mod:`proxy.admission.core` function
for function, so replicas decide as the memory queue would, and replicas that dispatch at
the same moment grant each item once and never over-commit an engine. Holds are leases: a
crashed replica's capacity comes back when its leases lapse. Each instance holds ONE
pub/sub connection, subscribed to its replica's outcome channel and to the capacity
channel; its reader task fills the replica-local mailbox and rings the capacity bell.

Key layout (all under ``prefix``; every key shares the ``{q}`` hash tag):

* ``P:{q}:items`` hash id -> item JSON ``{t, r, m, f, x?, g?, l?, q}`` (``g``: the charge as a
  string; ``q``: enqueue seq);
  ``:deadlines`` zset id -> deadline; ``:seq`` enqueue counter; ``:depth`` hash tenant ->
  queued items.
* flows: ``P:{q}:flow:<len(model)>:<model>:<tenant>`` zset ``"<seq:016d>:<id>"`` -> score;
  ``P:{q}:ready:<model>`` zset ``"<head seq:016d>:<tenant>"`` -> head score, the heads of
  the model's flows whose tenant is under its limit; ``:fhead`` hash flow name -> its
  member in the ready zset; ``P:{q}:tmodels:<tenant>`` set of the tenant's flow models.
* ``:limits`` hash tenant -> concurrency limit (absent: unlimited); ``:granted`` hash
  tenant -> grants made (field ``""``: all tenants).
* fair share: ``:vc`` hash tenant -> virtual counter; ``:backlog`` zset backlogged tenant ->
  its counter (the floor is its first score); ``:qcharge`` hash backlogged tenant -> the
  charges of its queued items; ``:conf`` hash ``order`` (``key`` / ``counter``, written by
  :meth:`RedisQueue.start`) and ``drained`` (the counter of the tenant that drained last).
  Counters are ``%.17g`` strings, so Lua and Python agree to the last bit.
* feasibility: ``:late`` zset id -> late_at of queued items that have one (``l`` in the
  item JSON; ``conf`` field ``late``: the rule, ``demote`` or ``shed``).
* replicas: ``:alive`` zset replica -> alive until (its heartbeat); ``:since`` /
  ``:beat_ttl`` hashes replica -> start of its unbroken run of beats / its heartbeat ttl;
  ``P:{q}:owned:<replica>`` set of the ids queued or held for it (what reaping frees).
* ``P:{q}:engines`` hash name -> capacity JSON; ``:fresh`` hash name -> valid-until;
  ``:held`` / ``:seqs`` hash engine -> tokens / sequences held.
* ``P:{q}:holds`` hash id -> hold JSON ``{e, t, r, f, g}`` (current and granted
  footprint; this is also the stored grant :meth:`RedisQueue.wait` reads first);
  ``:leases`` zset id -> expiry; ``:inflight`` hash tenant -> holds; ``:expired`` zset
  id -> when it expired (kept ``expired_memory_s`` for late waiters).
* channels (not keys) ``P:queue:replica:<replica>`` (JSON outcome) and
  ``P:queue:capacity``.

Every script declares one key, ``:seq``; the others (the layout above, per flow, per model,
per tenant) are derived from it inside the scripts, so they share
its hash tag and slot: a dispatch sees one global order and one capacity view atomically.
The enqueue and release scripts also run the store's step for the request (its tenant's
shaping keys, another hash tag), so the queue needs one Redis primary, not a Redis Cluster
(docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.admission.base import (
    EngineCapacity,
    EngineLoad,
    Enqueued,
    EnqueueResult,
    Grant,
    LateRule,
    Outcome,
    QueueCaps,
    QueueItem,
    QueueOrder,
    QueueStats,
    WaitResult,
)
from proxy.admission.mailbox import Bell, Mailbox, Snapshot
from proxy.redisconn import (
    connect,
    load_scripts,
    lua_source,
    num,
    text,
    unavailable_on_io_error,
)
from proxy.store.base import StoreStep

TYPE = "redis"

log = logging.getLogger("driftsched.store.queue")

_SCRIPTS = (
    "enqueue",
    "set_limits",
    "stats",
    "cancel",
    "dispatch",
    "release",
    "move",
    "grow",
    "renew",
    "set_engines",
    "loads",
    "in_flight",
    "heartbeat",
    "leader",
)
_KEYS = (
    "seq",
    "items",
    "deadlines",
    "depth",
    "engines",
    "fresh",
    "held",
    "seqs",
    "holds",
    "leases",
    "inflight",
    "expired",
    "fhead",
    "limits",
    "granted",
    "vc",
    "backlog",
    "qcharge",
    "conf",
    "alive",
    "late",
)
_ENQUEUED: dict[int, EnqueueResult] = {
    1: "queued", 0: "duplicate", -1: "tenant_full", -2: "full", -3: "refused"}
#: how long an "expired" outcome stays visible to a late :meth:`RedisQueue.wait`
EXPIRED_MEMORY_S = 600.0


#: the scripts that run the dispatch step (``lua/dispatching.lua``)
_DISPATCHING = ("dispatch", "enqueue", "release")


#: the scripts that run a store step first (``store_step``, :func:`_store_steps`)
_STORE_STEPPING = ("enqueue", "release")
#: the store scripts they can run
_STORE_STEPS = ("try_acquire", "reconcile")


def _store_steps() -> str:
    """The store's scripts (``proxy/store/lua``, the one implementation of shaping and of
    settling tokens) as ``store_step(name, keys, args)``: each body becomes a function of
    its KEYS and ARGV, in a block of its own so the store's helpers stay private."""
    bodies = "\n".join(
        f"steps['{name}'] = function(KEYS, ARGV)\n"
        f"{lua_source('proxy.store', f'{name}.lua')}\nend"
        for name in _STORE_STEPS
    )
    return (f"local store_step\ndo\n{lua_source('proxy.store', 'common.lua')}\n"
            f"local steps = {{}}\n{bodies}\n"
            "store_step = function(name, keys, args)\n  return steps[name](keys, args)\nend\n"
            "end\n")


def _load_script(name: str) -> str:
    step = ("dispatching.lua",) if name in _DISPATCHING else ()
    source = lua_source("proxy.admission", "common.lua", *step, f"{name}.lua")
    if name in _STORE_STEPPING:
        return _store_steps() + source
    return source


def _capacity_json(cap: EngineCapacity) -> str:
    d = {
        "budget_tokens": cap.budget_tokens,
        "max_seqs": cap.max_seqs,
        "models": list(cap.models),
        "routable": cap.routable,
    }
    if cap.soft_seqs is not None:
        d["soft_seqs"] = cap.soft_seqs
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


def _item_json(item: QueueItem) -> str:
    d: dict[str, Any] = {
        "t": item.tenant,
        "r": item.replica,
        "m": item.model,
        "f": int(item.footprint),
    }
    if item.exempt:
        d["x"] = True
    if item.charge:
        d["g"] = num(float(item.charge))  # a string: cjson re-encodes numbers with 14 digits
    if item.late_at != math.inf:
        d["l"] = num(float(item.late_at))
    return json.dumps(d, separators=(",", ":"))


def _outcome(raw: str, replica: str) -> tuple[str, Outcome] | None:
    """An outcome message from ``replica``'s channel: ``(item id, outcome)``."""
    msg = json.loads(raw)
    if msg.get("k") == "x":
        return str(msg["id"]), "expired"
    if msg.get("k") == "g":
        grant = Grant(str(msg["id"]), str(msg["t"]), replica, str(msg["e"]), int(msg["f"]))
        return grant.id, grant
    return None


class RedisQueue:
    """:class:`~proxy.admission.base.AdmissionQueue` on Redis. Safe for many tasks and
    many processes; ``replica_id`` must be unique among live replicas (it routes grants).

    ``client``: an already configured ``redis.asyncio.Redis`` to share (e.g. the store's;
    not closed by :meth:`aclose`); otherwise the queue opens its own pool from ``url``. A
    refused, lost or timed-out connection surfaces as
    :class:`~proxy.store.base.StoreUnavailable`.

    It runs store steps (:attr:`runs_store_steps`): the store's shaping before an enqueue
    and its token settlement with a release, in the same script. Their keys are the store's
    (another hash tag), so this needs store and queue on one Redis, not a Redis Cluster
    (which the gateway's one-primary client does not speak anyway).
    """

    runs_store_steps = True

    def __init__(
        self,
        replica_id: str,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "driftsched",
        caps: QueueCaps | None = None,
        order: QueueOrder = "key",
        late: LateRule = "demote",
        client: Redis | None = None,
        max_connections: int = 64,
        socket_timeout_s: float = 5.0,
    ) -> None:
        self.replica_id = replica_id
        if order not in ("key", "counter"):
            raise ValueError(f"unknown queue order {order!r}")
        self.caps = caps or QueueCaps()
        self.order: QueueOrder = order
        if late not in ("demote", "shed"):
            raise ValueError(f"unknown late rule {late!r}")
        self.late: LateRule = late
        self._beaten = False
        self._url = url
        self._keys = [f"{prefix}:{{q}}:{k}" for k in _KEYS]
        self._channels = f"{prefix}:queue:"
        self._mine = f"{self._channels}replica:{replica_id}"
        self._capacity = f"{self._channels}capacity"
        self._client = client
        self._owns_client = client is None
        self._max_connections = max_connections
        self._socket_timeout_s = socket_timeout_s
        self._sources = {name: _load_script(name) for name in _SCRIPTS}
        self._scripts: dict[str, AsyncScript] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._mailbox = Mailbox()
        self._bell = Bell()
        self._started = False
        self._closed = False

    def key(self, name: str) -> str:
        """The full Redis key of ``name`` (one of the layout's keys)."""
        return self._keys[_KEYS.index(name)]

    # -- lifecycle -----------------------------------------------------------------------
    @unavailable_on_io_error
    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("RedisQueue was closed; build a new one")
        if self._client is None:
            self._client = connect(self._url, self._max_connections, self._socket_timeout_s)
        try:
            self._scripts = await load_scripts(self._client, self._sources)
            old = await self._client.hget(self.key("conf"), "order")
            if old is not None and text(old) != self.order:
                log.warning("the shared queue was ordered by %r; now by %r (replicas on one "
                            "Redis must run the same scheduling policy)", text(old), self.order)
            await self._client.hset(self.key("conf"), mapping={"order": self.order,
                                                                "late": self.late})
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(self._mine, self._capacity)
            if self._pubsub.connection is not None:
                self._pubsub.connection.register_connect_callback(self._on_pubsub_connect)
        except BaseException:
            await self.aclose()
            raise
        self._reader = asyncio.create_task(
            self._read_notifications(self._pubsub), name=f"queue-reader-{self.replica_id}"
        )
        self._started = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mailbox.close()
        self._bell.ring()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            try:
                # redis-py types PubSub.aclose from 8.2 on; Any keeps both sides of that clean
                pubsub: Any = self._pubsub
                await pubsub.aclose()
            except RedisError as e:  # the connection is going away anyway
                log.debug("closing the queue subscription: %s", e)
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    async def _run(self, name: str, *args: Any) -> Any:
        script = self._scripts.get(name)
        if script is None:
            raise RuntimeError("RedisQueue.start() must be awaited first")
        return await script(keys=self._keys[:1], args=[self._channels, *args])

    async def _run_stepped(self, name: str, args: list[str], step: StoreStep | None) -> Any:
        """Run ``name`` with a store step first: its keys after the queue's, its script name
        and arguments after the script's own (which must then be complete)."""
        if step is None:
            return await self._run(name, *args)
        script = self._scripts.get(name)
        if script is None:
            raise RuntimeError("RedisQueue.start() must be awaited first")
        return await script(keys=[self._keys[0], *step.keys],
                            args=[self._channels, *args, step.script, *step.args])

    # -- notifications -------------------------------------------------------------------
    async def _read_notifications(self, pubsub: PubSub) -> None:
        delay = 0.1
        while True:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except RedisError as e:
                log.warning("queue channel lost (%s); retrying in %.1fs", e, delay)
                self._lost_messages()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if msg is None or msg.get("type") != "message":
                continue
            if text(msg["channel"]) == self._capacity:
                self._bell.ring()
                continue
            try:
                got = _outcome(text(msg["data"]), self.replica_id)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring a malformed queue message: %r", e)
                continue
            if got is not None:
                self._mailbox.deliver(*got)

    def _lost_messages(self) -> None:
        self._bell.ring()
        self._mailbox.wake_all()  # waiters re-read the shared state

    async def _on_pubsub_connect(self, connection: Connection) -> None:
        """Called by redis-py on every (re)connection of the subscription."""
        self._lost_messages()

    async def wait_capacity(self, timeout_s: float) -> None:
        await self._bell.wait(timeout_s)

    # -- engines -------------------------------------------------------------------------
    @unavailable_on_io_error
    async def set_engines(self, engines: list[EngineCapacity], now: float, ttl_s: float) -> None:
        pairs = [x for cap in engines for x in (cap.name, _capacity_json(cap))]
        await self._run("set_engines", num(now), num(now + ttl_s), *pairs)

    @unavailable_on_io_error
    async def set_limits(self, limits: dict[str, int | None]) -> None:
        if limits:
            pairs = [x for t, n in limits.items() for x in (t, "" if n is None else str(int(n)))]
            await self._run("set_limits", *pairs)

    # -- queue ---------------------------------------------------------------------------
    @unavailable_on_io_error
    async def enqueue(self, item: QueueItem, now: float) -> EnqueueResult:
        code, _, _, _ = await self._run("enqueue", *self._enqueue_args(item))
        return _ENQUEUED[int(code)]

    @unavailable_on_io_error
    async def enqueue_dispatch(
        self, item: QueueItem, now: float, lease_ttl_s: float, max_grants: int = 64,
        store_step: StoreStep | None = None,
    ) -> Enqueued:
        args = [*self._enqueue_args(item), *self._dispatch_args(now, lease_ttl_s, max_grants)]
        code, raw_grants, expired, reply = await self._run_stepped("enqueue", args, store_step)
        grants = self._delivered(raw_grants, expired)
        return Enqueued(_ENQUEUED[int(code)], grants, reply if store_step else None)

    def _enqueue_args(self, item: QueueItem) -> tuple[str, ...]:
        caps = self.caps
        return (
            item.id,
            num(float(item.score)),
            num(float(item.deadline)),
            _item_json(item),
            "" if caps.max_queued_per_tenant is None else str(caps.max_queued_per_tenant),
            "" if caps.max_queued is None else str(caps.max_queued),
        )

    def _dispatch_args(self, now: float, lease_ttl_s: float, max_grants: int) -> tuple[str, ...]:
        return (num(now), num(lease_ttl_s), str(int(max_grants)), self.replica_id,
                num(EXPIRED_MEMORY_S))

    def _delivered(self, raw_grants: list[Any], expired: list[Any]) -> list[Grant]:
        """A dispatch's reply as grants; this replica's outcomes go to its mailbox."""
        grants = [
            Grant(text(i), text(t), text(r), text(e), int(text(f))) for i, t, r, e, f in raw_grants
        ]
        for g in grants:
            if g.replica == self.replica_id:
                self._mailbox.deliver(g.id, g)
        for item_id in expired:
            self._mailbox.deliver(text(item_id), "expired")
        return grants

    @unavailable_on_io_error
    async def cancel(self, item_id: str) -> bool:
        self._mailbox.discard(item_id)
        return bool(await self._run("cancel", item_id))

    @unavailable_on_io_error
    async def dispatch(self, now: float, lease_ttl_s: float, max_grants: int = 64) -> list[Grant]:
        raw_grants, expired = await self._run(
            "dispatch", *self._dispatch_args(now, lease_ttl_s, max_grants))
        return self._delivered(raw_grants, expired)

    @unavailable_on_io_error
    async def _snapshot(self, item_id: str) -> Snapshot:
        pipe = self._client_or_raise().pipeline(transaction=True)
        pipe.hget(self.key("holds"), item_id)
        pipe.zscore(self.key("expired"), item_id)
        pipe.hexists(self.key("items"), item_id)
        hold, expired, queued = await pipe.execute()
        if hold is not None:
            h = json.loads(text(hold))
            return Grant(item_id, str(h["t"]), str(h["r"]), str(h["e"]), int(h["g"]))
        if expired is not None:
            return "expired"
        return "queued" if queued else None

    async def wait(self, item_id: str, timeout_s: float) -> WaitResult:
        return await self._mailbox.wait(item_id, timeout_s, lambda: self._snapshot(item_id))

    def _client_or_raise(self) -> Redis:
        if self._client is None or not self._scripts:
            raise RuntimeError("RedisQueue.start() must be awaited first")
        return self._client

    # -- holds ---------------------------------------------------------------------------
    @unavailable_on_io_error
    async def release(self, item_id: str, correction: float = 0.0) -> None:
        self._mailbox.discard(item_id)
        await self._run("release", item_id, num(float(correction)))

    @unavailable_on_io_error
    async def release_dispatch(
        self, item_id: str, correction: float, now: float, lease_ttl_s: float,
        max_grants: int = 64, store_step: StoreStep | None = None,
    ) -> list[Grant]:
        self._mailbox.discard(item_id)
        args = [item_id, num(float(correction)), *self._dispatch_args(now, lease_ttl_s,
                                                                      max_grants)]
        _, raw_grants, expired = await self._run_stepped("release", args, store_step)
        return self._delivered(raw_grants, expired)

    @unavailable_on_io_error
    async def move(self, item_id: str, engine: str) -> bool:
        return bool(await self._run("move", item_id, engine))

    @unavailable_on_io_error
    async def grow(self, item_id: str, delta_tokens: int) -> None:
        if delta_tokens:
            await self._run("grow", item_id, str(int(delta_tokens)))

    @unavailable_on_io_error
    async def renew(self, item_ids: list[str], now: float, lease_ttl_s: float) -> int:
        if not item_ids:
            return 0
        return int(await self._run("renew", num(now), num(lease_ttl_s), *item_ids))

    @unavailable_on_io_error
    async def heartbeat(self, now: float, ttl_s: float) -> bool:
        known = bool(await self._run("heartbeat", self.replica_id, num(now + ttl_s), num(now),
                                     num(ttl_s)))
        if not known and self._beaten:
            log.warning("this replica was declared dead (no heartbeat for %.1fs): its queued "
                        "requests were dropped and its holds freed by another replica", ttl_s)
            self._mailbox.wake_all()  # its waiters re-read the queue: "expired"
        self._beaten = True
        return known

    @unavailable_on_io_error
    async def leader(self, now: float) -> str | None:
        found = await self._run("leader", num(now))
        return text(found) if found else None

    # -- views ---------------------------------------------------------------------------
    @unavailable_on_io_error
    async def loads(self, now: float) -> list[EngineLoad]:
        out: list[EngineLoad] = []
        for name, held, seqs, cap_json, fresh in await self._run("loads", num(now)):
            cap_raw, fresh_raw = text(cap_json), text(fresh)
            n_held, n_seqs = int(text(held)), int(text(seqs))
            if not cap_raw:
                out.append(EngineLoad(text(name), n_held, n_seqs, None, None, False))
                continue
            cap = json.loads(cap_raw)
            routable = bool(cap["routable"]) and now < float(fresh_raw or "0")
            out.append(
                EngineLoad(
                    text(name), n_held, n_seqs, cap["budget_tokens"], cap["max_seqs"], routable,
                    cap.get("soft_seqs"),
                )
            )
        return sorted(out, key=lambda load: load.name)

    @unavailable_on_io_error
    async def depth(self) -> dict[str, int]:
        raw = await self._client_or_raise().hgetall(self.key("depth"))
        return {text(t): int(n) for t, n in raw.items()}

    @unavailable_on_io_error
    async def stats(self) -> QueueStats:
        total, rows, vc, qcharge, floor = await self._run("stats")
        queued = {text(t): int(n) for t, n, _ in rows}
        granted = {text(t): int(g) for t, _, g in rows}
        counters = {text(vc[i]): float(text(vc[i + 1])) for i in range(0, len(vc), 2)}
        charges = {text(qcharge[i]): float(text(qcharge[i + 1]))
                   for i in range(0, len(qcharge), 2)}
        return QueueStats(queued, granted, int(total), counters, charges, float(text(floor)))

    @unavailable_on_io_error
    async def in_flight(self, tenant: str, now: float) -> int:
        return int(await self._run("in_flight", num(now), tenant))

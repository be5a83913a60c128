"""The shared store: Redis, for N gateway replicas enforcing one set of limits.

Why choose it: more than one gateway process. Every limit check is one Lua script (loaded
once, run by EVALSHA), so N replicas enforce a tenant's RPM, TPM and quota exactly as one
process would. (Concurrency is the admission queue's: :mod:`proxy.admission.redis`.)

Key layout (all under ``prefix``; ``{...}`` is the Redis Cluster hash tag):

* ``P:{admin}:tenants`` hash name -> tenant JSON; ``P:{admin}:keys`` hash key_id -> key
  JSON; ``P:{admin}:digests`` hash digest -> key_id; ``P:{admin}:seeded`` the seed marker
  (its absence means the store lost the configured tenants); ``P:{admin}:tenant-keys:T`` set of
  key ids. Admin data shares one slot so it can change in one transaction.
* ``P:t:{T}:rpm`` / ``:tpm`` bucket hashes, ``:day:N`` tokens charged on UTC day N,
  ``:usage`` hash of cumulative counters. One tenant's limit state shares one slot so one
  script can charge all of it.
* channel (not a key) ``P:changes``: admin writes announced to every replica (JSON
  ``{"k": kind, "n": name}``), so each drops its cached tenants and keys at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.redisconn import (
    connect,
    load_scripts,
    lua_source,
    num,
    text,
    unavailable_on_io_error,
)
from proxy.store.base import (
    Decision,
    KeyRecord,
    Limits,
    OnChange,
    Reason,
    StoreStep,
    Tenant,
    Usage,
)
from proxy.store.buckets import charge_of, clamp_delta, decision, next_midnight, utc_day

TYPE = "redis"

log = logging.getLogger("driftsched.store.redis")

_SCRIPTS = ("try_acquire", "reconcile")
#: a day's token counter outlives its day long enough for late reconciles
_DAY_TTL_S = 2 * 86400
_REASONS: dict[str, Reason] = {r: r for r in ("rpm", "tpm", "quota", "too_large")}
_USAGE_FIELDS = ("requests", "errors", "tokens_in", "tokens_out")

def _opt_float(x: bytes | str) -> float | None:
    s = text(x)
    return float(s) if s else None


def _load_script(name: str) -> str:
    return lua_source("proxy.store", "common.lua", f"{name}.lua")


class _Keys:
    def __init__(self, prefix: str) -> None:
        admin = f"{prefix}:{{admin}}"
        self.tenants = f"{admin}:tenants"
        self.keys = f"{admin}:keys"
        self.digests = f"{admin}:digests"
        self.seeded = f"{admin}:seeded"
        self.changes = f"{prefix}:changes"
        self._tenant_keys = f"{admin}:tenant-keys:"
        self._tenant = f"{prefix}:t:"

    def tenant_keys(self, tenant: str) -> str:
        return self._tenant_keys + tenant

    def of(self, tenant: str, what: str) -> str:
        return f"{self._tenant}{{{tenant}}}:{what}"



class RedisStore:
    """:class:`~proxy.store.base.Store` on Redis. Safe for many tasks and many processes.

    By default the store opens its own pool from ``url``: at most ``max_connections``
    connections; callers beyond that wait up
    to ``socket_timeout_s`` for a free one. ``client``: an already configured
    ``redis.asyncio.Redis`` to use instead (not closed by :meth:`aclose`). A refused, lost or
    timed-out connection surfaces as :class:`~proxy.store.base.StoreUnavailable`.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "driftsched",
        client: Redis | None = None,
        max_connections: int = 64,
        socket_timeout_s: float = 5.0,
        ping_timeout_s: float = 1.0,
    ) -> None:
        self._url = url
        self._k = _Keys(prefix)
        self._client = client
        self._owns_client = client is None
        self._max_connections = max_connections
        self._socket_timeout_s = socket_timeout_s
        self._ping_timeout_s = ping_timeout_s
        self._sources = {name: _load_script(name) for name in _SCRIPTS}
        self._scripts: dict[str, AsyncScript] = {}
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    @unavailable_on_io_error
    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("RedisStore was closed; build a new one")
        if self._client is None:
            self._client = connect(self._url, self._max_connections, self._socket_timeout_s)
        try:
            self._scripts = await load_scripts(self._client, self._sources)
        except BaseException:
            await self.aclose()
            raise
        self._started = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    async def ping(self) -> bool:
        if self._client is None or self._closed:
            return False
        try:
            async with asyncio.timeout(self._ping_timeout_s):
                return bool(await self._client.ping())
        except Exception as e:  # the contract: report, never raise
            log.debug("redis ping failed: %r", e)
            return False

    @property
    def _r(self) -> Redis:
        if self._client is None or not self._scripts:
            raise RuntimeError("RedisStore.start() must be awaited first")
        return self._client

    def _script(self, name: str) -> AsyncScript:
        script = self._scripts.get(name)
        if script is None:
            raise RuntimeError("RedisStore.start() must be awaited first")
        return script

    async def _run(self, name: str, keys: list[str], args: list[str]) -> Any:
        return await self._script(name)(keys=keys, args=args)

    # -- changes -------------------------------------------------------------------------
    @unavailable_on_io_error
    async def announce(self, kind: str, name: str) -> None:
        await self._r.publish(self._k.changes, json.dumps({"k": kind, "n": name}))

    async def watch(self, on_change: OnChange) -> None:
        """One subscription of its own; after a lost one, ``("all", "")`` once it is back
        (announcements made meanwhile were missed)."""
        delay, missed = 0.1, False
        while True:
            pubsub = self._r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._k.changes)
                if missed:
                    await on_change("all", "")
                delay, missed = 0.1, False
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=None)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        change = json.loads(text(msg["data"]))
                        kind, name = str(change["k"]), str(change["n"])
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning("ignoring a malformed change announcement: %r", e)
                        continue
                    await on_change(kind, name)
            except (RedisError, OSError) as e:
                log.warning("change announcements lost (%s); retrying in %.1fs", e, delay)
                missed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    any_pubsub: Any = pubsub  # PubSub.aclose is typed from redis-py 8.2 on
                    await any_pubsub.aclose()

    # -- tenants -------------------------------------------------------------------------
    @unavailable_on_io_error
    async def put_tenant(self, tenant: Tenant) -> None:
        await self._r.hset(self._k.tenants, tenant.name, tenant.to_json())

    @unavailable_on_io_error
    async def seeded(self) -> str | None:
        raw = await self._r.get(self._k.seeded)
        return None if raw is None else text(raw)

    @unavailable_on_io_error
    async def mark_seeded(self, marker: str) -> None:
        await self._r.set(self._k.seeded, marker)

    @unavailable_on_io_error
    async def get_tenant(self, name: str) -> Tenant | None:
        raw = await self._r.hget(self._k.tenants, name)
        return None if raw is None else Tenant.from_json(raw)

    @unavailable_on_io_error
    async def list_tenants(self) -> list[Tenant]:
        raws = await self._r.hvals(self._k.tenants)
        return sorted((Tenant.from_json(r) for r in raws), key=lambda t: t.name)

    @unavailable_on_io_error
    async def delete_tenant(self, name: str, now: float | None = None) -> bool:
        when = time.time() if now is None else now
        k = self._k

        async def txn(pipe: Pipeline) -> bool:
            existed = bool(await pipe.hexists(k.tenants, name))
            ids = sorted(text(i) for i in await pipe.smembers(k.tenant_keys(name)))
            raws = await pipe.hmget(k.keys, ids) if ids else []
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.hdel(k.tenants, name)
            for raw in raws:
                if raw is None:
                    continue
                rec = KeyRecord.from_json(raw)
                if rec.revoked_at is None or rec.revoked_at > when:
                    pipe.hset(k.keys, rec.key_id, replace(rec, revoked_at=when).to_json())
            return existed

        existed: bool = await self._r.transaction(
            txn, k.tenants, k.keys, k.tenant_keys(name), value_from_callable=True
        )
        await self._r.delete(k.of(name, "usage"))
        return existed

    # -- keys ----------------------------------------------------------------------------
    @unavailable_on_io_error
    async def put_key(self, record: KeyRecord) -> None:
        k = self._k

        async def txn(pipe: Pipeline) -> None:
            raw = await pipe.hget(k.keys, record.key_id)
            pipe.multi()  # type: ignore[no-untyped-call]
            if raw is not None:
                old = KeyRecord.from_json(raw)
                if old.digest != record.digest:
                    pipe.hdel(k.digests, old.digest)
                if old.tenant != record.tenant:
                    pipe.srem(k.tenant_keys(old.tenant), record.key_id)
            pipe.hset(k.keys, record.key_id, record.to_json())
            pipe.hset(k.digests, record.digest, record.key_id)
            pipe.sadd(k.tenant_keys(record.tenant), record.key_id)

        await self._r.transaction(txn, k.keys)

    @unavailable_on_io_error
    async def get_key_by_digest(self, digest: str) -> KeyRecord | None:
        key_id = await self._r.hget(self._k.digests, digest)
        return None if key_id is None else await self.get_key(text(key_id))

    @unavailable_on_io_error
    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._r.hget(self._k.keys, key_id)
        return None if raw is None else KeyRecord.from_json(raw)

    @unavailable_on_io_error
    async def list_keys(
        self, tenant: str | None = None, prefix: str | None = None
    ) -> list[KeyRecord]:
        if tenant is None:
            raws: list[Any] = list(await self._r.hvals(self._k.keys))
        else:
            ids = sorted(text(i) for i in await self._r.smembers(self._k.tenant_keys(tenant)))
            raws = list(await self._r.hmget(self._k.keys, ids)) if ids else []
        records = [KeyRecord.from_json(r) for r in raws if r is not None]
        found = [
            r
            for r in records
            if (tenant is None or r.tenant == tenant)
            and (prefix is None or r.prefix.startswith(prefix))
        ]
        return sorted(found, key=lambda r: (r.created_at, r.key_id))

    # -- limits ------------------------------------------------------------------------------
    def acquire_step(self, tenant: str, tokens: int, limits: Limits, now: float) -> StoreStep:
        k = self._k
        keys = (k.of(tenant, "rpm"), k.of(tenant, "tpm"), k.of(tenant, f"day:{utc_day(now)}"))
        args = (
            num(now),
            str(charge_of(int(tokens))),
            num(limits.rpm),
            num(limits.tpm),
            num(limits.daily_token_quota),
            num(next_midnight(now)),
            str(_DAY_TTL_S),
        )
        return StoreStep("try_acquire", keys, args)

    def decision_of(self, reply: Any, limits: Limits) -> Decision:
        _ok, reason, retry, rpm_tokens, tpm_tokens, used = reply
        return decision(
            limits,
            reason=_REASONS[text(reason)] if reason else None,
            retry_after_s=float(text(retry)),
            rpm_tokens=_opt_float(rpm_tokens),
            tpm_tokens=_opt_float(tpm_tokens),
            used_today=int(float(text(used))),
        )

    @unavailable_on_io_error
    async def try_acquire(self, tenant: str, tokens: int, limits: Limits, now: float) -> Decision:
        return self.decision_of(await self._step(self.acquire_step(tenant, tokens, limits, now)),
                                limits)

    def finish_step(
        self, tenant: str, delta_tokens: int, limits: Limits, now: float,
        *, requests: int = 0, errors: int = 0, tokens_in: int = 0, tokens_out: int = 0,
    ) -> StoreStep | None:
        day = self._k.of(tenant, f"day:{utc_day(now)}")
        keys = (self._k.of(tenant, "tpm"), day, self._k.of(tenant, "usage"))
        args = [num(now), str(clamp_delta(int(delta_tokens))), num(limits.tpm), str(_DAY_TTL_S)]
        values = (requests, errors, tokens_in, tokens_out)
        for f, v in zip(_USAGE_FIELDS, values, strict=True):
            if v:
                args += [f, str(int(v))]
        if not delta_tokens and len(args) == 4:
            return None
        return StoreStep("reconcile", keys, tuple(args))  # reconcile + usage: one script

    @unavailable_on_io_error
    async def finish(
        self, tenant: str, delta_tokens: int, limits: Limits, now: float,
        *, requests: int = 0, errors: int = 0, tokens_in: int = 0, tokens_out: int = 0,
    ) -> None:
        step = self.finish_step(tenant, delta_tokens, limits, now, requests=requests,
                                errors=errors, tokens_in=tokens_in, tokens_out=tokens_out)
        if step is not None:
            await self._step(step)

    async def _step(self, step: StoreStep) -> Any:
        return await self._run(step.script, list(step.keys), list(step.args))

    @unavailable_on_io_error
    async def reconcile(self, tenant: str, delta_tokens: int, limits: Limits, now: float) -> None:
        if delta_tokens == 0:
            return
        keys = [self._k.of(tenant, "tpm"), self._k.of(tenant, f"day:{utc_day(now)}")]
        args = [num(now), str(clamp_delta(int(delta_tokens))), num(limits.tpm), str(_DAY_TTL_S)]
        await self._run("reconcile", keys, args)

    # -- usage ---------------------------------------------------------------------------
    @unavailable_on_io_error
    async def record_usage(
        self,
        tenant: str,
        now: float,
        *,
        requests: int = 0,
        errors: int = 0,
        tokens_in: int = 0,
        tokens_out: int = 0,
    ) -> None:
        values = dict(zip(_USAGE_FIELDS, (requests, errors, tokens_in, tokens_out), strict=True))
        changed = {f: v for f, v in values.items() if v}
        if not changed:
            return
        key = self._k.of(tenant, "usage")
        pipe = self._r.pipeline(transaction=True)
        for f, v in changed.items():
            pipe.hincrby(key, f, v)
        await pipe.execute()

    @unavailable_on_io_error
    async def get_usage(self, tenant: str, now: float) -> Usage:
        k = self._k
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(k.of(tenant, "usage"))
        pipe.get(k.of(tenant, f"day:{utc_day(now)}"))
        counters, today = await pipe.execute()
        c = {text(f): int(v) for f, v in counters.items()}
        return Usage(
            requests=c.get("requests", 0),
            errors=c.get("errors", 0),
            tokens_in=c.get("tokens_in", 0),
            tokens_out=c.get("tokens_out", 0),
            tokens_today=0 if today is None else int(float(text(today))),
        )

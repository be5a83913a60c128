"""Completion events shared by the gateway replicas, so that N replicas decide as one.

One question: *which finished requests do this replica's estimator and controllers learn
from?* Its own (the scheduler applies them directly, with no delay) plus, through this bus,
every other replica's. Each event is a :class:`Completion`: the estimator's features and the
real output length (learning), the predicted length (the drift controller), the request's SLO
outcome (the class attainment windows that gate the drift controller) and its stream's time
per output token (the TPOT governor's outer loop). Without the bus N replicas would hold N
estimators and N sets of controllers, each fed 1/N of every tenant's traffic and each deciding
differently; with it every replica's controllers see the same events and reach the same limits
(:mod:`proxy.scheduler`; the replica-parity experiment in docs/experiments.md).

* ``memory`` (:class:`LocalCompletions`, one process): :meth:`publish` does nothing; the
  scheduler's own completions are all there is.
* ``redis`` (:class:`RedisCompletions`): :meth:`publish` appends the event to an in-process
  buffer and returns at once; a sender task XADDs the buffer in pipelined batches to one
  capped stream ``<prefix>:completions`` (``MAXLEN ~ max_len``). A reader task per replica
  XREADs (blocking) from its own last id and hands the events of the *other* replicas to
  ``on_completion``; its own events carry its replica id and are skipped, because the
  scheduler already applied them.

Delivery is best effort and at most once. Requests never wait on the bus: when Redis is
down, events are dropped (counted in :attr:`RedisCompletions.dropped`) and the reader retries
with backoff, so replicas keep learning from their own completions and converge again
afterwards. A reader that falls more than ``max_len`` events behind skips the trimmed ones.
A replica that starts (or restarts) reads the stream's backlog first (``replay``), so a new
replica's estimator starts from the last ``max_len`` completions instead of from the prior;
replayed events older than ``feedback_max_age_s`` feed the estimator only, not the
controllers (a window of outcomes from before the replica started says nothing about now).

Event fields: ``r`` replica id, ``t`` its wall-clock time (s), ``y`` output tokens (empty:
unknown), ``x`` the estimator features as JSON (:class:`policies.features.RequestFeatures`
makes every value a ``str`` or ``float``, so they survive the round trip unchanged; absent:
nothing to learn), ``f`` the controllers' part as a JSON list ``[tenant, level, base limit,
met, stream TPOT, predicted]``. An event is about 1-4 KB, so the stream holds at most
``max_len`` x 4 KB (8 MB at the default). Events without ``f`` (written by an older release)
are learned from and otherwise ignored.

Not thread-safe: call every method on the event loop that ran :meth:`start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.redisconn import connect

if TYPE_CHECKING:
    from proxy.config import StoreConfig

__all__ = [
    "Completion",
    "CompletionBus",
    "LocalCompletions",
    "OnCompletion",
    "RedisCompletions",
    "build_completion_bus",
]

log = logging.getLogger("driftsched.completions")



@dataclass(frozen=True, slots=True)
class Completion:
    """One finished request, as every replica's estimator and controllers see it."""

    tenant: str
    #: its class level (classes are the same on every replica); None: the event feeds the
    #: estimator only (replayed from before this replica started, or from an older release)
    level: int | None
    #: the tenant's configured concurrency limit (None: unlimited), for a replica that has
    #: not read the tenant's record itself
    base_limit: int | None = None
    #: whether it met its class's SLOs (None: not counted: no SLOs, or never queued)
    met: bool | None = None
    #: its stream's mean time per output token (s), when long enough to judge
    stream_tpot_s: float | None = None
    #: predicted (p50, at admission) and real output tokens (None: unknown)
    predicted: float | None = None
    actual: float | None = None
    #: the estimator's features (empty: nothing to learn from; never mutated)
    features: dict[str, Any] = field(default_factory=dict)


#: ``on_completion(event)``: called on the event loop for other replicas' events
OnCompletion = Callable[[Completion], None]

_MAX_BACKOFF_S = 5.0


class CompletionBus(Protocol):
    """Shares completions between replicas. Safe to call from any task of one event loop."""

    async def start(self, on_completion: OnCompletion) -> None:
        """Begin delivering other replicas' completions to ``on_completion``. Does no I/O
        itself."""

    def publish(self, c: Completion) -> None:
        """Offer one completion of this replica to the others. Never blocks, never raises."""

    async def aclose(self) -> None:
        """Stop delivering; send what is buffered (best effort, bounded wait)."""


class LocalCompletions:
    """One process: nothing to share (the scheduler learns from its own completions)."""

    async def start(self, on_completion: OnCompletion) -> None:
        return None

    def publish(self, c: Completion) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisCompletions:
    """:class:`CompletionBus` on a capped Redis Stream (see the module docstring).

    ``client``: an already configured ``redis.asyncio.Redis`` (``decode_responses=True``) to
    use instead of opening a pool from ``url``; not closed by :meth:`aclose`. ``max_len``:
    approximate cap of the stream. ``replay``: read the stream's backlog at start.
    ``buffer``: events kept while Redis is slow or down (older ones are dropped first).
    ``linger_s``: how long the sender waits after an event for more, and the reader after a
    read, so that events travel in batches (one XADD pipeline and one wake-up of every
    replica's reader per batch, not per completion) at the cost of that much delay.
    ``feedback_max_age_s``: older events (a replayed backlog) feed only the estimator.
    """

    def __init__(
        self,
        replica_id: str,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "driftsched",
        client: Redis | None = None,
        max_len: int = 2000,
        replay: bool = True,
        batch: int = 256,
        buffer: int = 10_000,
        block_ms: int = 1000,
        socket_timeout_s: float = 5.0,
        linger_s: float = 0.05,
        feedback_max_age_s: float = 10.0,
    ) -> None:
        if max_len < 1 or batch < 1 or buffer < 1:
            raise ValueError("max_len, batch and buffer must be >= 1")
        self.replica_id = replica_id
        self.key = f"{prefix}:completions"
        self._url = url
        self._client = client
        self._owns_client = client is None
        self._max_len = max_len
        self._replay = replay
        self._batch = batch
        self._block_ms = block_ms
        self._linger_s = linger_s
        self._max_age_s = feedback_max_age_s
        self._socket_timeout_s = max(socket_timeout_s, block_ms / 1000 + 1.0)
        self._buf: deque[Completion] = deque(maxlen=buffer)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._on: OnCompletion | None = None
        #: counters (this replica): events offered, written, lost, read from others, applied
        self.published = 0
        self.sent = 0
        self.dropped = 0
        self.received = 0
        self.learned = 0

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, on_completion: OnCompletion) -> None:
        if self._tasks:
            raise RuntimeError("RedisCompletions already started")
        if self._client is None:
            self._client = connect(self._url, 4, self._socket_timeout_s)
        self._on = on_completion
        self._tasks = [
            asyncio.create_task(self._send_loop(self._client), name="completions-sender"),
            asyncio.create_task(self._read_loop(self._client), name="completions-reader"),
        ]

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._client is not None:
            if self._buf:
                with contextlib.suppress(TimeoutError, RedisError, OSError):
                    async with asyncio.timeout(1.0):
                        await self._flush(self._client)
            if self._owns_client:
                await self._client.aclose()
            self._client = None

    # -- publishing ----------------------------------------------------------------------
    def publish(self, c: Completion) -> None:
        if len(self._buf) == self._buf.maxlen:
            self.dropped += 1  # the deque drops its oldest entry
        self._buf.append(c)  # encoded by the sender, off the request path
        self.published += 1
        self._wake.set()

    def _fields(self, c: Completion) -> dict[str, str]:
        met = None if c.met is None else int(c.met)
        f = [c.tenant, c.level, c.base_limit, met, c.stream_tpot_s, c.predicted]
        fields = {
            "r": self.replica_id,
            "t": repr(time.time()),
            "y": "" if c.actual is None else repr(float(c.actual)),
            "f": json.dumps(f, separators=(",", ":")),
        }
        if c.features:
            fields["x"] = json.dumps(c.features, separators=(",", ":"))
        return fields

    async def _flush(self, r: Redis) -> None:
        """Write the buffer in pipelined batches; a failed batch is dropped, then raised."""
        while self._buf:
            n = min(len(self._buf), self._batch)
            batch = [self._buf.popleft() for _ in range(n)]
            pipe = r.pipeline(transaction=False)
            for c in batch:
                pipe.xadd(
                    self.key,
                    self._fields(c),  # type: ignore[arg-type]
                    maxlen=self._max_len,
                    approximate=True,
                )
            try:
                await pipe.execute()
            except BaseException:
                self.dropped += n
                raise
            self.sent += n

    async def _send_loop(self, r: Redis) -> None:
        failing, delay = False, 0.1
        while True:
            await self._wake.wait()
            if self._linger_s and len(self._buf) < self._batch:
                await asyncio.sleep(self._linger_s)  # let more arrive: one batch
            self._wake.clear()
            try:
                await self._flush(r)
            except (RedisError, OSError) as e:
                if not failing:
                    log.warning("completion events not shared (dropped) while redis fails: %s", e)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
                self._wake.set()
                continue
            if failing:
                log.info("completion events shared again")
            failing, delay = False, 0.1

    # -- reading -------------------------------------------------------------------------
    async def _read_loop(self, r: Redis) -> None:
        last: str | None = None
        failing, delay = False, 0.1
        while True:
            try:
                if last is None:
                    last = "0-0" if self._replay else await self._tail_id(r)
                resp: Any = await r.xread({self.key: last}, count=self._batch, block=self._block_ms)
            except (RedisError, OSError) as e:
                if not failing:
                    log.warning("reading other replicas' completions failed: %s", e)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            if failing:
                log.info("reading other replicas' completions again")
            failing, delay = False, 0.1
            for _stream, entries in resp or ():
                for event_id, fields in entries:
                    last = str(event_id)
                    self._consume(cast("dict[str, str]", fields))
            # a long backlog must not starve the request path; and the next read waits a
            # little, so that replicas' events are read in batches
            await asyncio.sleep(self._linger_s)

    async def _tail_id(self, r: Redis) -> str:
        """The id of the newest event (start after it), or ``0-0`` for an empty stream."""
        newest = await r.xrevrange(self.key, "+", "-", count=1)
        return str(newest[0][0]) if newest else "0-0"

    def _consume(self, fields: Mapping[str, str]) -> None:
        if fields.get("r") == self.replica_id:
            return  # applied locally when it completed
        self.received += 1
        try:
            c = _parse(fields, self._max_age_s)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            log.warning("ignoring a malformed completion event: %r", e)
            return
        assert self._on is not None
        try:
            self._on(c)
        except Exception:
            log.exception("applying another replica's completion failed")
            return
        self.learned += 1


def _parse(fields: Mapping[str, str], max_age_s: float) -> Completion:
    """The :class:`Completion` an event holds; one older than ``max_age_s`` (or from an
    older release, without ``f``) keeps only what the estimator learns from."""
    x = json.loads(fields["x"]) if "x" in fields else {}
    if not isinstance(x, dict):
        raise TypeError("features are not a JSON object")
    y = float(fields["y"]) if fields.get("y") else None
    if y is not None and not math.isfinite(y):
        raise ValueError(f"output tokens {y!r}")
    at = float(fields.get("t") or 0.0)
    if "f" not in fields or time.time() - at > max_age_s:
        return Completion(str(x.get("tenant", "")), None, actual=y, features=x)
    tenant, level, base, met, tpot, pred = json.loads(fields["f"])
    if not isinstance(tenant, str) or not isinstance(level, int):
        raise TypeError("tenant or level of the wrong type")
    return Completion(
        tenant, level, None if base is None else int(base), None if met is None else bool(met),
        None if tpot is None else float(tpot), None if pred is None else float(pred), y, x)


def build_completion_bus(
    cfg: StoreConfig, replica_id: str, *, redis_client: Redis | None = None
) -> CompletionBus:
    """A new, not started bus for ``cfg.type`` (``memory``: local learning only)."""
    if cfg.type == "memory":
        return LocalCompletions()
    if cfg.type == "redis":
        return RedisCompletions(replica_id, cfg.url, prefix=cfg.prefix, client=redis_client)
    raise ValueError(f"store.type: unknown store {cfg.type!r}; known: ['memory', 'redis']")

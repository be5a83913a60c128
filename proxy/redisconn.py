"""The one Redis helper: connection pools, script loading, argument and error conventions.

Shared by the store (:mod:`proxy.store.redis`), the admission queue
(:mod:`proxy.admission.redis`) and the completion bus (:mod:`proxy.completions`), so all
three talk to Redis the same way: a blocking pool (callers wait for a free connection
instead of failing), ``decode_responses``, one socket timeout, Lua loaded once and run by
EVALSHA, and a lost or refused connection raised as
:class:`~proxy.store.base.StoreUnavailable`. Importing it opens nothing.

**Reconnecting.** A command that fails with a connection error (a pooled connection that
went stale when Redis restarted or failed over, a refused connect) is retried by redis-py's
own :class:`~redis.asyncio.retry.Retry`: :data:`RETRIES` more times, with exponential backoff
(:data:`BACKOFF_BASE_S` doubling, capped at :data:`BACKOFF_CAP_S`), each on a fresh
connection. A Redis that stays down therefore fails in well under a second (the caller's
503 ``store_unavailable``), not after a long retry budget. Timeouts are not retried: a frozen
Redis already costs the socket timeout once.

**Sentinel.** A ``redis+sentinel://`` URL (:mod:`proxy.redisurl`) gets a pool whose every
new connection asks the Sentinels for the current primary (redis-py's
:class:`~redis.asyncio.sentinel.SentinelConnectionPool`, made blocking here), so after a
failover the retry above lands on the promoted replica. The Lua scripts follow too: a
primary that lacks a script answers NOSCRIPT, and redis-py's script objects load it again
and re-run (:class:`~redis.commands.core.AsyncScript`; pipelines check ``SCRIPT EXISTS``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.redisurl import SentinelTarget, is_sentinel_url, parse_sentinel_url
from proxy.store.base import StoreUnavailable

_P = ParamSpec("_P")
_R = TypeVar("_R")


#: how many times a command that lost its connection is sent again, on a new connection
RETRIES = 2
BACKOFF_BASE_S = 0.025
BACKOFF_CAP_S = 0.2
#: the longest one Sentinel may take to answer before the next one is asked
SENTINEL_TIMEOUT_S = 1.0


def retry_policy() -> Retry:
    """Connection errors only (a timeout is not retried), a few times, short backoff."""
    return Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES,
                 supported_errors=(RedisConnectionError,))


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (every connection to the current primary), waiting for a
    free connection like :class:`BlockingConnectionPool`; closing it closes its Sentinels."""

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            manager: Sentinel = self.sentinel_manager
            for sentinel in manager.sentinels:  # (Sentinel.aclose is newer than redis 5)
                await sentinel.aclose()


def connect(url: str, max_connections: int, timeout_s: float) -> Redis:
    """A client whose pool waits (up to ``timeout_s``) for a free connection instead of
    failing at once when all ``max_connections`` are busy (redis-py's default pool raises).
    ``url``: ``redis://``, ``rediss://`` or ``redis+sentinel://`` (:mod:`proxy.redisurl`)."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": retry_policy(),
    }
    if is_sentinel_url(url):
        return _connect_sentinel(parse_sentinel_url(url), max_connections, timeout_s, common)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, **common
    )
    return Redis.from_pool(pool)


def _connect_sentinel(
    target: SentinelTarget, max_connections: int, timeout_s: float, common: dict[str, Any]
) -> Redis:
    sentinel_timeout = min(timeout_s, SENTINEL_TIMEOUT_S)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": sentinel_timeout,
        "socket_connect_timeout": sentinel_timeout,
        "decode_responses": True,
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
        sentinel_kwargs["username"] = target.sentinel_username
    if target.ssl:
        sentinel_kwargs["ssl"] = True
    sentinels = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    pool = _SentinelPool(  # type: ignore[no-untyped-call]
        target.service_name,
        sentinels,
        max_connections=max_connections,
        timeout=timeout_s,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **common,
    )
    return Redis.from_pool(pool)


def lua_source(package: str, *files: str) -> str:
    """The text of ``files`` in ``package``'s ``lua/`` folder, joined (a prelude first)."""
    lua = resources.files(package).joinpath("lua")
    return "\n".join(lua.joinpath(f).read_text() for f in files)


async def load_scripts(client: Redis, sources: dict[str, str]) -> dict[str, AsyncScript]:
    """SCRIPT LOAD every source in one pipelined round trip; the callable scripts by name."""
    pipe = client.pipeline(transaction=False)
    for source in sources.values():
        pipe.script_load(source)
    await pipe.execute()
    return {name: client.register_script(source) for name, source in sources.items()}


#: error codes of a Redis that is there but cannot serve now (out of memory, a replica or a
#: primary without its replicas, loading its data, a failed snapshot, a script running too
#: long, a cluster in trouble, a blocked read cut by a role change): the store is
#: unavailable, as when the connection is lost. Any other error reply (a bug: a bad script,
#: a wrong type) stays an error of its own.
_UNAVAILABLE_CODES = ("OOM", "READONLY", "MASTERDOWN", "LOADING", "MISCONF", "NOREPLICAS",
                      "BUSY", "TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED")
#: the classes redis-py raises for some of them (BusyLoadingError is a ConnectionError)
_UNAVAILABLE_CLASSES = (OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError,
                        ClusterDownError)


def store_unavailable(e: RedisError) -> bool:
    """Whether ``e`` means "the store cannot serve now" (:data:`_UNAVAILABLE_CODES`, a lost,
    refused or timed-out connection), not a bug. An error raised inside a script carries the
    code of the command that failed (Redis 7: ``OOM command not allowed ... script: ...``)."""
    if isinstance(e, (RedisConnectionError, RedisTimeoutError, *_UNAVAILABLE_CLASSES)):
        return True
    if not isinstance(e, ResponseError):
        return False
    # redis-py strips the code of the classes above; the rest keep it in the message
    return str(e).split(" ", 1)[0].upper() in _UNAVAILABLE_CODES


def unavailable_on_io_error(
    fn: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Re-raise a Redis that cannot serve now (:func:`store_unavailable`: connection lost,
    refused or timed out, out of memory, read-only, loading, ...) as
    :class:`StoreUnavailable`."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except RedisError as e:
            if store_unavailable(e):
                raise StoreUnavailable(f"redis: {e}") from e
            raise

    return wrapper


def num(x: float | None) -> str:
    """A script argument: ``""`` for unlimited, exact decimal text otherwise."""
    if x is None:
        return ""
    return str(x) if isinstance(x, int) else repr(float(x))


def text(x: bytes | str) -> str:
    """A reply as ``str`` (replies are decoded already; raw bytes are tolerated)."""
    return x.decode() if isinstance(x, bytes) else x

"""The one Redis helper: connection pools, script loading, argument and error conventions.

Shared by the store (:mod:`proxy.store.redis`), the admission queue
(:mod:`proxy.admission.redis`) and the completion bus (:mod:`proxy.completions`), so all
three talk to Redis the same way: a blocking pool (callers wait for a free connection
instead of failing), ``decode_responses``, one socket timeout, Lua loaded once and run by
EVALSHA, and a lost or refused connection raised as
:class:`~proxy.store.base.StoreUnavailable`. Importing it opens nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.store.base import StoreUnavailable

_P = ParamSpec("_P")
_R = TypeVar("_R")


def connect(url: str, max_connections: int, timeout_s: float) -> Redis:
    """A client whose pool waits (up to ``timeout_s``) for a free connection instead of
    failing at once when all ``max_connections`` are busy (redis-py's default pool raises)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
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


def unavailable_on_io_error(
    fn: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Re-raise a lost or refused connection as :class:`StoreUnavailable`."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise StoreUnavailable(f"redis: {e}") from e

    return wrapper


def num(x: float | None) -> str:
    """A script argument: ``""`` for unlimited, exact decimal text otherwise."""
    if x is None:
        return ""
    return str(x) if isinstance(x, int) else repr(float(x))


def text(x: bytes | str) -> str:
    """A reply as ``str`` (replies are decoded already; raw bytes are tolerated)."""
    return x.decode() if isinstance(x, bytes) else x

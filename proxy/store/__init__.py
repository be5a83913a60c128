"""State stores: the :class:`~proxy.store.base.Store` contract and its two implementations.

``memory`` for one process, ``redis`` for N replicas sharing one Redis. Build one from
configuration with :func:`build_store`, then ``await store.start()`` in the app's lifespan
and ``await store.aclose()`` on shutdown. Importing this package opens nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.base import Store

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.config import StoreConfig

__all__ = ["Store", "build_store"]


def build_store(cfg: StoreConfig, *, redis_client: Redis | None = None) -> Store:
    """A new, not yet started store for ``cfg.type``.

    ``redis_client``: (redis only) an existing ``redis.asyncio.Redis`` to share instead of
    opening a pool from ``cfg.url``; the store then leaves closing it to its owner.
    ``cfg.lease_ttl_s`` and ``cfg.fail_open`` are the caller's to apply.
    """
    if cfg.type == "memory":
        from proxy.store.memory import MemoryStore

        return MemoryStore()
    if cfg.type == "redis":
        from proxy.store.redis import RedisStore

        return RedisStore(cfg.url, prefix=cfg.prefix, client=redis_client)
    raise ValueError(f"store.type: unknown store {cfg.type!r}; known: ['memory', 'redis']")

"""Build the admission queue (:class:`~proxy.admission.base.AdmissionQueue`) from config.

The queue lives in the same backend as the store (``store.type``): ``memory`` for one
process, ``redis`` for N replicas sharing one Redis. Then ``await queue.start()`` in the
app's lifespan and ``await queue.aclose()`` on shutdown. Importing this module opens nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.admission.base import AdmissionQueue, LateRule, QueueCaps, QueueOrder

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.config import StoreConfig

__all__ = ["build_queue"]


def build_queue(
    cfg: StoreConfig,
    replica_id: str,
    *,
    caps: QueueCaps | None = None,
    order: QueueOrder = "key",
    late: LateRule = "demote",
    redis_client: Redis | None = None,
) -> AdmissionQueue:
    """A new, not yet started queue for ``cfg.type``.

    ``replica_id``: this gateway process, unique among live replicas (grants for the
    requests whose connection it holds are delivered to it). ``caps``: depth limits
    checked at enqueue (default: none). ``order``: how flows are ranked (the policy's
    :attr:`~policies.base.Policy.order`). ``late``: what happens to an item past its
    ``late_at`` (:data:`~proxy.admission.base.LateRule`). ``redis_client``: (redis only)
    an existing ``redis.asyncio.Redis`` to share, e.g. the store's; its owner closes it.
    """
    if cfg.type == "memory":
        from proxy.admission.memory import MemoryQueue

        return MemoryQueue(replica_id, caps, order, late)
    if cfg.type == "redis":
        from proxy.admission.redis import RedisQueue

        return RedisQueue(replica_id, cfg.url, prefix=cfg.prefix, caps=caps, order=order,
                          late=late, client=redis_client)
    raise ValueError(f"store.type: unknown store {cfg.type!r}; known: ['memory', 'redis']")

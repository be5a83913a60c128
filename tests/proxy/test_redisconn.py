"""The Redis helper: store URLs (plain and ``redis+sentinel://``), reconnecting after a
restart without an error per stale pooled connection, failing fast when Redis stays down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters.errors import ConfigError
from proxy.config import settings_from_dict
from proxy.redisconn import connect
from proxy.redisurl import SentinelTarget, parse_sentinel_url
from proxy.store.base import Limits, StoreUnavailable
from proxy.store.redis import RedisStore
from tests.chaos.tools import RedisProc

T0 = 19_700 * 86400.0 + 3600.0


# -- URLs ------------------------------------------------------------------------------------
def test_sentinel_url_forms() -> None:
    assert parse_sentinel_url("redis+sentinel://10.0.0.1/mymaster") == SentinelTarget(
        sentinels=(("10.0.0.1", 26379),), service_name="mymaster")
    t = parse_sentinel_url(
        "rediss+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/cache/3"
        "?sentinel_password=sp&sentinel_username=su")
    assert t.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert (t.service_name, t.db, t.username, t.password) == ("cache", 3, "app", "p@ss")
    assert (t.sentinel_username, t.sentinel_password, t.ssl) == ("su", "sp", True)
    assert "p@ss" not in repr(t) and "sp" not in repr(t).replace("ssl", "")
    only_password = parse_sentinel_url("redis+sentinel://:pw@s1:1/m/0")
    assert (only_password.username, only_password.password) == (None, "pw")


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://s1:26379", "path is /service_name"),
    ("redis+sentinel://s1/m/x", "db must be a number"),
    ("redis+sentinel://s1/m/0/extra", "path is /service_name"),
    ("redis+sentinel:///m", "at least one sentinel"),
    ("redis+sentinel://:hunter2@s1:port/m", "bad port"),
    ("redis+sentinel://s1/m?master_name=x", "unknown sentinel URL option"),
])
def test_bad_sentinel_urls_are_config_errors(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as e:
        settings_from_dict({"store": {"type": "redis", "url": url}})
    assert "hunter2" not in str(e.value)


def test_store_url_schemes() -> None:
    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/1", "unix:///run/redis.sock",
                "redis+sentinel://h1,h2/ds/0"):
        assert settings_from_dict({"store": {"type": "redis", "url": url}}).store.url == url
    with pytest.raises(ConfigError, match="got scheme 'http'"):
        settings_from_dict({"store": {"type": "redis", "url": "http://h:6379"}})


# -- reconnecting ----------------------------------------------------------------------------
@pytest.mark.redis
async def test_a_restart_costs_no_error_and_a_dead_redis_fails_fast(tmp_path: Path) -> None:
    """16 pooled connections go stale when Redis restarts (same port, data on its AOF): the
    next 32 commands all succeed, scripts included (the restarted Redis has an empty script
    cache: NOSCRIPT, loaded again). With Redis gone for good a command fails within 1 s."""
    redis = RedisProc(tmp_path)
    client = connect(redis.url, 64, 5.0)
    try:
        incr = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        await client.script_load(incr.script)

        await asyncio.gather(*(client.ping() for _ in range(16)))  # 16 connections at once
        assert len(client.connection_pool._available_connections) == 16
        assert await incr(keys=["n"], args=[1]) == 1
        redis.kill()
        redis.start()
        got = await asyncio.gather(*(incr(keys=["n"], args=[1]) for _ in range(32)),
                                   return_exceptions=True)
        errors = [g for g in got if isinstance(g, BaseException)]
        assert not errors, errors[:3]
        assert sorted(got) == list(range(2, 34))  # type: ignore[type-var]

        redis.kill()
        t0 = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await client.get("n")
        assert time.monotonic() - t0 < 1.0
    finally:
        await client.aclose()
        redis.stop()


@pytest.mark.redis
async def test_the_store_answers_right_after_a_restart(tmp_path: Path) -> None:
    """The store's view of the same: every call after the restart succeeds (the 503
    ``store_unavailable`` path is for a Redis that is really down)."""
    redis = RedisProc(tmp_path)
    store = RedisStore(redis.url, prefix="x", socket_timeout_s=2.0)
    try:
        await store.start()
        await asyncio.gather(*(store.try_acquire(f"t{i}", 1, Limits(), T0) for i in range(12)))
        redis.kill()
        with pytest.raises(StoreUnavailable):
            await store.try_acquire("t0", 1, Limits(), T0)
        redis.start()
        got = await asyncio.gather(*(store.try_acquire(f"t{i}", 1, Limits(), T0)
                                     for i in range(24)), return_exceptions=True)
        assert all(not isinstance(g, BaseException) and g.ok for g in got), got
    finally:
        await store.aclose()
        redis.stop()

"""Shared fixtures: free ports and a real redis-server per test session."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole session. Yields its URL."""
    from experiments.stack import RedisProcess

    try:
        server = RedisProcess(tmp_path_factory.mktemp("redis"))
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A unique key prefix so tests sharing one redis-server never see each other's keys."""
    return f"dstest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` beside the checkout (or $DRIFTSCHED_SHARED_DATA)."""
    env = os.environ.get("DRIFTSCHED_SHARED_DATA")
    p = Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    if not p.exists():
        pytest.skip(f"shared data not found at {p}")
    return p

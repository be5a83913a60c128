"""EnginePool and StaticPool against real processes and real HTTP over loopback.

Simulator engines (``python -m adapters.sim``) are launched through the pool; a few tests use
a tiny shell script as the engine's "python" to get a process that crashes, hangs or forks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.base import Backend
from adapters.config import PoolConfig, RestartConfig, SimEngineConfig, UpstreamConfig
from adapters.engines import engine_spec, visible_devices
from adapters.errors import ConfigError
from adapters.pool import EnginePool, build_pool
from adapters.procutil import pid_alive
from adapters.static import StaticPool
from proxy.config import settings_from_dict
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FAST = {"health_interval_s": 0.2, "scrape_interval_s": 0.2, "stop_grace_s": 3.0}


def sim_pool_config(tmp_path: Path, instances: int, **kw: Any) -> PoolConfig:
    return PoolConfig(
        engine="sim",
        model="sim-m",
        instances=instances,
        log_dir=str(tmp_path / "logs"),
        sim=SimEngineConfig(kv_capacity_tokens=4096, max_num_seqs=16),
        restart=RestartConfig(backoff_initial_s=0.1, backoff_max_s=0.4, max_restarts=3),
        **{**FAST, **kw},
    )


def fake_engine(tmp_path: Path, body: str) -> str:
    """An executable used as ``pool.python`` for ``engine: vllm``; it ignores its arguments."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


async def wait_for(
    cond: Callable[[], bool], limit_s: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_gone(pid: int, limit_s: float = 10.0) -> None:
    await wait_for(lambda: not pid_alive(pid), limit_s, f"pid {pid} to exit")


async def read_text(path: str | None) -> str:
    assert path is not None
    return await asyncio.to_thread(Path(path).read_text)


@pytest.fixture
async def two_sims(tmp_path: Path) -> AsyncIterator[EnginePool]:
    pool = EnginePool(sim_pool_config(tmp_path, 2))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()


# -- command lines (pure) ---------------------------------------------------------------------


def test_sim_and_vllm_command_lines() -> None:
    cfg = PoolConfig(
        engine="sim", model="m", served_model_name="srv", sim=SimEngineConfig(workload="w.jsonl")
    )
    spec = engine_spec(cfg, 0, 9000)
    assert spec.argv[:3] == (sys.executable, "-m", "adapters.sim")
    assert ("--served-model-name", "srv") == spec.argv[spec.argv.index("--served-model-name") :][:2]
    assert "--workload" in spec.argv and "--kv-capacity-tokens" not in spec.argv
    assert spec.served_model == "srv" and spec.url == "http://127.0.0.1:9000"

    vcfg = PoolConfig(
        engine="vllm", model="tiny", gpus_per_instance=2, python="/venv/bin/python",
        args=["--max-num-seqs", "8", "--scheduling-policy", "priority"], env={"X": "1"},
    )  # fmt: skip
    v = engine_spec(vcfg, 1, 9001)
    assert v.argv[:3] == ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server")
    assert v.env["CUDA_VISIBLE_DEVICES"] == "2,3" and v.env["X"] == "1"
    assert v.max_num_seqs == 8 and v.supports_priority and v.name == "vllm-1"
    assert visible_devices(3, 0) == ""


def test_build_pool_picks_the_pool_kind(tmp_path: Path) -> None:
    up = [{"name": "u", "url": "http://127.0.0.1:1", "models": ["m"]}]
    plain = settings_from_dict({"upstreams": up})
    assert isinstance(build_pool(plain.pool, plain.upstreams), StaticPool)
    cfg = settings_from_dict({"upstreams": up, "pool": {"instances": 1, "log_dir": str(tmp_path)}})
    pool = build_pool(cfg.pool, cfg.upstreams)
    assert isinstance(pool, EnginePool)
    assert [(b.name, b.kind) for b in pool.backends()] == [("sim-0", "sim"), ("u", "external")]
    u = UpstreamConfig.model_validate(up[0])
    with pytest.raises(ConfigError, match="duplicate"):
        EnginePool(PoolConfig(engine="external", external=[u]), [u])


# -- launched simulator engines -----------------------------------------------------------------


async def test_two_engines_healthy_scraped_drained_and_stopped(two_sims: EnginePool) -> None:
    pool = two_sims
    await wait_for(lambda: all(b.state == "healthy" for b in pool.backends()), what="healthy")
    await wait_for(lambda: all(b.metrics.scraped_at > 0 for b in pool.backends()), what="a scrape")
    a, b = pool.backends()
    assert a.url != b.url and a.pid != b.pid
    assert pool.models() == ["sim-m"] and pool.candidates("sim-m") == [a, b]
    snap = pool.snapshot()
    assert snap[0]["state"] == "healthy" and snap[0]["kv_capacity_tokens"] == 4096
    assert snap[0]["max_num_seqs"] == 16 and snap[0]["kv_capacity_tokens"] == 4096
    assert snap[0]["metrics"]["age_s"] < 5 and snap[0]["pid"] == a.pid
    log_text = await read_text(snap[0]["log_path"])
    assert log_text.startswith("==== ") and "adapters.sim" in log_text

    # drain: nothing new routed; completes when the gateway's in-flight count reaches 0
    a.in_flight = 2
    drain = asyncio.create_task(pool.drain("sim-0"))
    await asyncio.sleep(0.3)
    assert a.state == "draining" and not drain.done()
    assert pool.candidates("sim-m") == [b]
    a.in_flight = 0
    await asyncio.wait_for(drain, 2)
    await asyncio.sleep(0.3)  # health checks keep it draining
    assert a.state == "draining"
    pool.undrain("sim-0")
    assert a.state == "healthy"

    # external endpoints at runtime (here: engine 1's URL under another name)
    ext = await pool.add_external(UpstreamConfig(name="ext", url=b.url, models=["sim-m"]))
    assert ext.state == "healthy" and ext.kind == "external"
    assert pool.remove("ext") is ext and len(pool.backends()) == 2

    pids = [a.pid, b.pid]
    await pool.stop()
    for pid in pids:
        assert pid is not None and not pid_alive(pid)
    assert [x.state for x in pool.backends()] == ["stopped", "stopped"]


async def test_killed_engine_is_restarted(tmp_path: Path) -> None:
    pool = EnginePool(sim_pool_config(tmp_path, 1))
    await pool.start()
    try:
        (b,) = pool.backends()
        await wait_for(lambda: b.state == "healthy", what="healthy")
        old = b.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await wait_for(lambda: b.state != "healthy", 5, "the crash to be noticed")
        await wait_for(lambda: b.state == "healthy" and b.pid != old, what="restart")
        assert b.restarts == 1 and "exited with code -9" in (b.last_error or "")
        assert (await read_text(b.log_path)).count("start #") == 2
        assert not pid_alive(old)
    finally:
        await pool.stop()


# -- crash loops, hangs and orphans (fake engines) ----------------------------------------------


async def test_crash_loop_backs_off_then_fails(tmp_path: Path) -> None:
    cfg = PoolConfig(
        engine="vllm", python=fake_engine(tmp_path, "exit 3"), log_dir=str(tmp_path / "logs"),
        restart=RestartConfig(max_restarts=2, backoff_initial_s=0.1, backoff_max_s=0.15), **FAST,
    )  # fmt: skip
    pool = EnginePool(cfg)
    t0 = time.monotonic()
    await pool.start()
    try:
        (b,) = pool.backends()
        await wait_for(lambda: b.state == "failed", 10, "failed")
        assert time.monotonic() - t0 >= 0.25  # backoffs 0.1 + 0.15 (capped, not 0.2)
        assert b.restarts == 2 and b.pid is None
        assert "exited with code 3" in (b.last_error or "")
        assert (await read_text(b.log_path)).count("start #") == 3
        assert pool.models() == [] and pool.candidates("sim-llama3-8b") == []
    finally:
        await pool.stop()
    assert b.state == "stopped"


async def test_missing_executable_fails_cleanly(tmp_path: Path) -> None:
    cfg = PoolConfig(
        engine="vllm", python=str(tmp_path / "nope"), log_dir=str(tmp_path / "logs"),
        restart=RestartConfig(max_restarts=0), **FAST,
    )  # fmt: skip
    pool = EnginePool(cfg)
    await pool.start()
    try:
        (b,) = pool.backends()
        await wait_for(lambda: b.state == "failed", 5, "failed")
        assert "cannot start" in (b.last_error or "")
    finally:
        await pool.stop()


FORKING_HANG = 'sleep 300 &\necho $! > "$(dirname "$0")/child.pid"\nexec sleep 300'


async def test_startup_timeout_and_stop_kill_the_whole_group(tmp_path: Path) -> None:
    cfg = PoolConfig(
        engine="vllm", python=fake_engine(tmp_path, FORKING_HANG), log_dir=str(tmp_path / "logs"),
        startup_timeout_s=0.6, restart=RestartConfig(max_restarts=1, backoff_initial_s=0.1), **FAST,
    )  # fmt: skip
    pool = EnginePool(cfg)
    await pool.start()
    try:
        (b,) = pool.backends()
        await wait_for(lambda: b.state == "starting" and b.pid is not None, 5, "launch")
        first = b.pid
        assert first is not None
        await wait_for(lambda: (tmp_path / "child.pid").exists(), 5, "the child")
        child = int((tmp_path / "child.pid").read_text())
        await wait_for(lambda: b.restarts == 1, 5, "a restart after the start-up timeout")
        assert "no healthy /health" in (b.last_error or "")
        await wait_gone(first, 2)
        await wait_gone(child, 2)  # the engine's own child went with its group
        await wait_for(lambda: b.pid is not None and pid_alive(b.pid), 5, "the relaunch")
        second = b.pid
        assert second is not None
        child2 = int((tmp_path / "child.pid").read_text())
    finally:
        await pool.stop()
    assert not pid_alive(second) and not pid_alive(child2)


GATEWAY = """
import asyncio, sys
from adapters.pool import EnginePool
from adapters.config import PoolConfig

async def main() -> None:
    cfg = PoolConfig.model_validate_json(sys.argv[1])
    pool = EnginePool(cfg)
    await pool.start()
    while not all(b.pid for b in pool.backends()) or pool.backends()[0].state != "healthy":
        await asyncio.sleep(0.05)
    print(" ".join(str(b.pid) for b in pool.backends()), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_gateway_sigkill_leaves_no_orphans(tmp_path: Path) -> None:
    """A sim engine (parent-death signal) and a forking fake engine (group watchdog)."""
    script = tmp_path / "gateway.py"
    script.write_text(GATEWAY)
    procs = []
    for cfg in (
        sim_pool_config(tmp_path, 1),
        PoolConfig(
            engine="vllm", python=fake_engine(tmp_path, FORKING_HANG), log_dir=str(tmp_path), **FAST
        ),
    ):
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cfg.model_dump_json(),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        procs.append(p)
    # the fake engine never becomes healthy: wait for its child's pid file instead
    await wait_for(lambda: (tmp_path / "child.pid").exists(), 15, "the fake engine's child")
    child = int((tmp_path / "child.pid").read_text())
    assert procs[0].stdout is not None
    line = await asyncio.wait_for(procs[0].stdout.readline(), 20)
    sim_pid = int(line.split()[0])
    assert pid_alive(sim_pid) and pid_alive(child)
    for p in procs:
        p.kill()
        await p.wait()
    await wait_gone(sim_pid, 5)
    await wait_gone(child, 10)


# -- static upstreams ------------------------------------------------------------------------------


async def test_static_pool_marks_unreachable_upstream_unhealthy(tmp_path: Path) -> None:
    dead = UpstreamConfig(name="dead", url=f"http://127.0.0.1:{free_port()}", models=["m"])
    pool = StaticPool([dead], health_interval_s=0.1)
    await pool.start()
    try:
        (b,) = pool.backends()
        assert b.state == "unhealthy" and "health check failed" in (b.last_error or "")
        assert pool.candidates("m") == [] and pool.models() == ["m"]
        assert pool.snapshot()[0]["state"] == "unhealthy"
    finally:
        await pool.stop()


async def test_static_pool_follows_a_real_engine(two_sims: EnginePool) -> None:
    engines = two_sims.backends()
    await wait_for(lambda: all(b.state == "healthy" for b in engines), what="healthy")
    ups = [UpstreamConfig(name=f"u{i}", url=b.url, models=["sim-m"]) for i, b in enumerate(engines)]
    pool = StaticPool(ups, health_interval_s=0.1, scrape_interval_s=0.1)
    await pool.start()
    try:
        u0, u1 = pool.backends()
        assert u0.state == u1.state == "healthy"
        await wait_for(lambda: u0.metrics.scraped_at > 0, 5, "a scrape")
        victim: Backend = engines[1]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGSTOP)  # hangs: health checks time out, no restart
        try:
            await wait_for(lambda: u1.state == "unhealthy", 10, "unhealthy")
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        await wait_for(lambda: u1.state == "healthy", 10, "recovery")
        assert pool.candidates("sim-m") == [u0, u1]
    finally:
        await pool.stop()

"""``--profile-file``: calibrated step-time profiles loaded from JSON (bench/sim_fidelity.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from adapters.config import PoolConfig, SimEngineConfig
from adapters.engines import engine_spec
from adapters.sim.__main__ import build_parser
from adapters.sim.driver import Driver
from adapters.sim.engine import Engine, SimRequest
from adapters.sim.profiles import PROFILES, available_profiles, profile_from_dict
from adapters.sim.settings import SimSettings

CPU = {
    "name": "tiny-llama-cpu-test", "a_ms": 2.5, "b_ms": 0.01, "c_ms": 0.0,
    "kv_bytes_per_token": 1024, "max_num_batched_tokens": 2048, "max_num_seqs": 8,
    "bandwidth_bytes_per_s": 1e12, "gpu_memory_bytes": 1 << 30, "weight_bytes": 1_200_000,
    "cpu_ms_per_step": 0.0,
}  # fmt: skip


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_file_adds_profiles_to_the_builtins(tmp_path: Path) -> None:
    f = write(tmp_path, [CPU])
    profiles = available_profiles(f)
    assert set(PROFILES) < set(profiles)
    p = profiles["tiny-llama-cpu-test"]
    assert p.step_time_s(4, 0) == pytest.approx((2.5 + 0.04) / 1000)
    s = SimSettings(model="tiny", profile="tiny-llama-cpu-test", profile_file=f,
                    kv_capacity_tokens=4064)
    assert s.profile_obj == p and s.kv_tokens == 4064


def test_single_object_and_cli_option(tmp_path: Path) -> None:
    f = write(tmp_path, CPU)
    args = build_parser().parse_args(
        ["--model", "m", "--profile", "tiny-llama-cpu-test", "--profile-file", f])
    assert args.profile_file == f
    assert available_profiles(f)["tiny-llama-cpu-test"].a_ms == 2.5


def test_bad_files_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        profile_from_dict({**CPU, "speed": 1})
    with pytest.raises(ValueError, match="missing key"):
        profile_from_dict({"name": "x", "a_ms": 1})
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        SimSettings(model="m", profile="nope", profile_file=write(tmp_path, CPU))
    with pytest.raises(ValueError, match="profile-file"):
        available_profiles(str(tmp_path / "absent.json"))


def test_pool_passes_the_profile_file() -> None:
    cfg = PoolConfig(engine="sim", sim=SimEngineConfig(profile="p", profile_file="/x/p.json"))
    argv = engine_spec(cfg, 0, 9000).argv
    assert argv[argv.index("--profile-file") + 1] == "/x/p.json"
    assert "--profile-file" not in engine_spec(PoolConfig(engine="sim"), 0, 9000).argv


async def test_request_overhead_delays_queueing_not_the_engine() -> None:
    profile = profile_from_dict({**CPU, "request_overhead_ms": 80.0})
    driver = Driver(lambda clock: Engine(profile, clock=clock, kv_capacity_tokens=4096))
    loop = asyncio.create_task(driver.run())
    try:
        t0 = time.perf_counter()
        stream = driver.submit(SimRequest("a", 10, 3), every=1)
        aborted = driver.submit(SimRequest("b", 10, 3), every=1)
        driver.abort(aborted.req.request_id)  # before it reached the engine: never queued
        assert not driver.engine.has_work()
        while not stream.req.finished:
            await asyncio.wait_for(stream.event.wait(), 2)
            stream.event.clear()
        took = time.perf_counter() - t0
        assert 0.08 <= took < 0.5, took
        assert driver.engine.get("b") is None and aborted.req.status == "waiting"
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

"""Unit tests of the simulator's pure step loop (fake clock, no I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator

import pytest

from adapters.clock import FakeClock
from adapters.sim.driver import Driver
from adapters.sim.engine import Engine, Policy, SimRequest, Step
from adapters.sim.profiles import PROFILES, Profile
from adapters.sim.workload import OutputLengths, count_prompt_tokens, prompt_key

LLAMA3 = PROFILES["llama3-8b-a100"]


def make_engine(
    *,
    kv_tokens: int = 100_000,
    max_num_seqs: int = 256,
    budget: int = 2048,
    policy: Policy = "fcfs",
    profile: Profile = LLAMA3,
) -> tuple[Engine, FakeClock]:
    clock = FakeClock()
    engine = Engine(
        profile,
        clock=clock.monotonic,
        kv_capacity_tokens=kv_tokens,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        policy=policy,
    )
    return engine, clock


def make_request(name: str, prompt: int, output: int = 100, priority: int = 0) -> SimRequest:
    return SimRequest(name, prompt, output, priority=priority)


def run_step(engine: Engine, clock: FakeClock) -> tuple[Step, list[SimRequest]]:
    step = engine.schedule()
    clock.advance(step.duration_s)
    return step, engine.complete(step)


def scheduled(step: Step) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in step.scheduled]


def ids(reqs: Iterator[SimRequest] | list[SimRequest]) -> list[str]:
    return [r.request_id for r in reqs]


# -- scheduling order and budgets -----------------------------------------------------------


def test_running_decodes_first_then_waiting_gets_the_rest_of_the_budget() -> None:
    engine, clock = make_engine(budget=100)
    engine.add(make_request("a", 10))
    engine.add(make_request("b", 10))
    run_step(engine, clock)
    engine.add(make_request("c", 500))
    step, _ = run_step(engine, clock)
    assert scheduled(step) == [("a", 1), ("b", 1), ("c", 98)]
    assert (step.num_decodes, step.num_prefill_tokens, step.num_tokens) == (2, 98, 100)


def test_chunked_prefill_spreads_a_long_prompt_over_steps_and_first_token_after_the_last() -> None:
    engine, clock = make_engine(budget=2048)
    req = make_request("long", 5000, output=3)
    engine.add(req)
    durations = []
    for expected_chunk in (2048, 2048, 904):
        step, produced = run_step(engine, clock)
        durations.append(step.duration_s)
        assert scheduled(step) == [("long", expected_chunk)]
        assert produced == ([] if expected_chunk == 2048 else [req])
    assert req.first_token_time == pytest.approx(sum(durations))
    assert req.generated == 1 and req.num_computed == 5000


def test_max_num_seqs_caps_running_requests() -> None:
    engine, clock = make_engine(max_num_seqs=2)
    for name in "abc":
        engine.add(make_request(name, 10))
    step, _ = run_step(engine, clock)
    assert ids(engine.running) == ["a", "b"]
    assert engine.num_waiting == 1
    assert scheduled(step) == [("a", 10), ("b", 10)]


def test_waiting_head_that_does_not_fit_blocks_the_queue() -> None:
    engine, clock = make_engine(kv_tokens=64)  # 4 blocks
    engine.add(make_request("a", 40))  # 3 blocks
    engine.add(make_request("big", 30))  # 2 blocks: does not fit
    engine.add(make_request("small", 5))  # would fit, but must not skip ahead
    step, _ = run_step(engine, clock)
    assert scheduled(step) == [("a", 40)]
    assert engine.num_waiting == 2


def test_priority_policy_admits_lower_priority_value_first_then_arrival() -> None:
    engine, clock = make_engine(policy="priority", max_num_seqs=3)
    engine.add(make_request("late-low", 10, priority=5))
    engine.add(make_request("first-high", 10, priority=0))
    engine.add(make_request("mid", 10, priority=1))
    engine.add(make_request("second-high", 10, priority=0))
    step, _ = run_step(engine, clock)
    assert ids(r for r, _ in step.scheduled) == ["first-high", "second-high", "mid"]


def test_fcfs_ignores_priority() -> None:
    engine, clock = make_engine(max_num_seqs=1)
    engine.add(make_request("first", 10, priority=9))
    engine.add(make_request("second", 10, priority=0))
    step, _ = run_step(engine, clock)
    assert scheduled(step) == [("first", 10)]


# -- KV blocks --------------------------------------------------------------------------------


def test_blocks_cover_prompt_and_generated_tokens_in_16_token_units() -> None:
    engine, clock = make_engine(kv_tokens=160)  # 10 blocks
    req = make_request("a", 17, output=20)
    engine.add(req)
    run_step(engine, clock)  # prefill 17 tokens -> 2 blocks
    assert (req.blocks, engine.free_blocks) == (2, 8)
    while req.num_tokens < 33:  # decodes up to 32 computed tokens stay in 2 blocks
        run_step(engine, clock)
    assert req.num_computed == 32 and req.blocks == 2
    run_step(engine, clock)  # the 33rd token needs a third block
    assert req.blocks == 3
    assert engine.kv_usage == pytest.approx(0.3)
    while not req.finished:
        run_step(engine, clock)
    assert req.generated == 20 and req.finish_reason == "stop"
    assert engine.free_blocks == 10 and engine.kv_usage == 0.0 and not engine.has_work()


def test_abort_frees_blocks_and_skips_the_request_in_an_inflight_step() -> None:
    engine, _ = make_engine(kv_tokens=160)
    engine.add(make_request("a", 40))
    engine.add(make_request("w", 10))
    step = engine.schedule()
    assert engine.abort("a") is not None
    assert engine.free_blocks == 10 - 1  # only w's block is still held
    produced = engine.complete(step)
    assert ids(produced) == ["w"]
    assert engine.abort("a") is None and engine.stats.aborted == 1


def test_abort_of_a_waiting_request_removes_it_from_the_queue() -> None:
    engine, clock = make_engine(max_num_seqs=1)
    engine.add(make_request("a", 10))
    engine.add(make_request("b", 10))
    engine.add(make_request("c", 10))
    engine.abort("b")
    assert engine.num_waiting == 2
    run_step(engine, clock)
    engine.abort("a")
    step, _ = run_step(engine, clock)
    assert scheduled(step) == [("c", 10)]


# -- preemption -------------------------------------------------------------------------------


def test_fcfs_preempts_newest_by_recompute_admits_nothing_that_step_and_reprefills() -> None:
    engine, clock = make_engine(kv_tokens=64)  # 4 blocks
    a = make_request("a", 32, output=3)
    b = make_request("b", 32, output=5)
    engine.add(a)
    engine.add(b)
    run_step(engine, clock)  # both prefilled: 2 blocks each, 0 free
    engine.add(make_request("c", 8))  # would fit once b's blocks are freed

    step, _ = run_step(engine, clock)  # a needs a 3rd block -> b (newest) is preempted
    assert ids(step.preempted) == ["b"]
    assert scheduled(step) == [("a", 1)]  # c is not admitted in a preempting step
    assert (b.status, b.num_computed, b.blocks, b.num_preemptions) == ("waiting", 0, 0, 1)
    assert engine.waiting.peek() is b  # back at the front, ahead of c
    assert engine.stats.num_preemptions == 1

    step, _ = run_step(engine, clock)  # b needs 33 tokens = 3 blocks, 1 free: stays queued
    assert scheduled(step) == [("a", 1)]
    assert a.finished and engine.free_blocks == 4

    step, produced = run_step(engine, clock)  # recompute: prompt + the 1 generated token
    assert scheduled(step) == [("b", 33), ("c", 8)]
    assert b.generated == 2 and b in produced
    assert step.num_decodes == 0 and step.num_prefill_tokens == 41


def test_priority_policy_preempts_the_lowest_priority_not_the_newest() -> None:
    def scenario(policy: Policy) -> tuple[Engine, Step]:
        engine, clock = make_engine(kv_tokens=7 * 16, policy=policy)
        engine.add(make_request("a", 31, priority=0))
        run_step(engine, clock)
        engine.add(make_request("b", 31, priority=5))
        run_step(engine, clock)
        engine.add(make_request("c", 31, priority=1))
        run_step(engine, clock)  # all running, 0 blocks free; b needs a 3rd block next
        assert engine.free_blocks == 0
        step, _ = run_step(engine, clock)
        return engine, step

    _, fcfs = scenario("fcfs")
    assert ids(fcfs.preempted) == ["c"]  # newest
    assert scheduled(fcfs) == [("a", 1), ("b", 1)]

    _, prio = scenario("priority")
    assert ids(prio.preempted) == ["b"]  # largest priority value; it was the requester
    assert scheduled(prio) == [("a", 1)]  # the loop stops at a request that preempted itself


def test_priority_victim_already_scheduled_this_step_returns_its_tokens() -> None:
    engine, clock = make_engine(kv_tokens=64, policy="priority", budget=100)
    engine.add(make_request("low", 30, priority=5))
    run_step(engine, clock)
    engine.add(make_request("high", 32, priority=0))
    run_step(engine, clock)  # 4 blocks used; high needs a 3rd block next step, low does not
    step, _ = run_step(engine, clock)
    assert ids(step.preempted) == ["low"]
    assert scheduled(step) == [("high", 1)]
    assert step.num_tokens == 1
    assert ids(engine.running) == ["high"]


def test_a_request_that_preempts_itself_stops_the_step_and_the_next_one_runs_the_rest() -> None:
    engine, clock = make_engine(kv_tokens=64, policy="priority")
    engine.add(make_request("b", 31, priority=5))
    run_step(engine, clock)
    engine.add(make_request("a", 32, priority=0))
    run_step(engine, clock)  # running [b, a], 0 free; b is first and needs a block
    step, _ = run_step(engine, clock)
    assert step.empty and ids(step.preempted) == ["b"] and step.duration_s == 0.0
    step, _ = run_step(engine, clock)
    assert scheduled(step) == [("a", 1)]  # b (33 tokens, 3 blocks) does not fit in 1 free


# -- time model -------------------------------------------------------------------------------


def test_step_time_follows_the_profile_formula() -> None:
    p = LLAMA3
    # memory-bound prefill of 100 tokens: a + b*N
    assert p.step_time_s(100, 0) == pytest.approx((9.8 + 0.029 * 100 + 3.0) / 1000)
    # compute-bound 2048 tokens: c*N
    assert p.step_time_s(2048, 0) == pytest.approx((0.0667 * 2048 + 3.0) / 1000)
    # decode attention: context tokens * KV bytes / bandwidth
    attn = 10_000 * 131072 / 1.5e12
    assert p.step_time_s(10, 10_000) == pytest.approx((9.8 + 0.29 + 3.0) / 1000 + attn)
    assert p.step_time_s(0, 0) == 0.0


def test_engine_step_duration_counts_decode_context() -> None:
    engine, clock = make_engine(budget=2048)
    engine.add(make_request("a", 100))
    engine.add(make_request("b", 200))
    first, _ = run_step(engine, clock)
    assert first.duration_s == pytest.approx(LLAMA3.step_time_s(300, 0))
    engine.add(make_request("c", 50))
    step, _ = run_step(engine, clock)
    assert step.num_tokens == 52 and step.decode_context_tokens == 101 + 201
    assert step.duration_s == pytest.approx(LLAMA3.step_time_s(52, 302))
    assert clock.monotonic() == pytest.approx(first.duration_s + step.duration_s)


def test_default_kv_capacity_from_gpu_memory() -> None:
    cap = PROFILES["llama3-8b-a100"].default_kv_capacity_tokens
    expected = (0.9 * 80 * 2**30 - 16.06e9) / 131072
    assert cap % 16 == 0 and expected - 16 < cap <= expected
    assert PROFILES["llama2-7b-h100"].default_kv_capacity_tokens < cap  # 4x KV bytes per token


def test_ttft_and_finish_times_come_from_the_clock() -> None:
    engine, clock = make_engine()
    clock.advance(5.0)
    req = make_request("a", 10, output=2)
    engine.add(req)
    s1, _ = run_step(engine, clock)
    s2, _ = run_step(engine, clock)
    assert req.arrival_time == 5.0
    assert req.first_token_time == pytest.approx(5.0 + s1.duration_s)
    assert req.finish_time == pytest.approx(5.0 + s1.duration_s + s2.duration_s)
    assert engine.stats.prompt_tokens == 10 and engine.stats.generation_tokens == 2


# -- workload -----------------------------------------------------------------------------------


def test_prompt_key_canonicalisation_and_token_counts() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
        },
    ]
    assert prompt_key(msgs) == prompt_key(
        [{"role": "x", "content": "be brief"}, {"role": "y", "content": "hi there"}]
    )
    assert prompt_key(msgs) == prompt_key("be brief\nhi there")
    assert prompt_key(["one"]) == prompt_key("one")
    assert count_prompt_tokens("abcdefghi") == 3
    assert count_prompt_tokens("") == 1
    assert count_prompt_tokens([1, 2, 3]) == 3
    assert count_prompt_tokens(msgs) == 3 + (4 + 2) + (4 + 2)


def test_output_lengths_known_and_seeded_draws() -> None:
    lengths = OutputLengths({prompt_key("known"): 42}, seed=7)
    assert lengths.true_length(prompt_key("known")) == 42
    draws = [lengths.true_length(prompt_key(f"p{i}")) for i in range(2000)]
    assert draws == [OutputLengths(seed=7).true_length(prompt_key(f"p{i}")) for i in range(2000)]
    assert draws != [OutputLengths(seed=8).true_length(prompt_key(f"p{i}")) for i in range(2000)]
    assert all(1 <= d <= 2048 for d in draws)
    median = sorted(draws)[len(draws) // 2]
    assert 170 < median < 235
    assert math.isfinite(sum(draws))


# -- driver (real event loop, scaled time) -----------------------------------------------------


async def test_driver_runs_steps_in_scaled_time_and_idles_without_stepping() -> None:
    driver = Driver(lambda clock: Engine(LLAMA3, clock=clock), time_scale=50.0)
    task = asyncio.create_task(driver.run())
    try:
        req = SimRequest("a", 10, 20)
        stream = driver.submit(req, every=None)
        t0 = time.perf_counter()
        await asyncio.wait_for(stream.event.wait(), 10)
        wall = time.perf_counter() - t0
        ideal = LLAMA3.step_time_s(10, 0) + sum(LLAMA3.step_time_s(1, 10 + i) for i in range(1, 20))
        assert req.finished and req.generated == 20
        assert req.finish_time is not None and req.first_token_time is not None
        assert req.finish_time - req.arrival_time >= ideal - 1e-9  # never faster than the model
        assert req.first_token_time - req.arrival_time >= LLAMA3.step_time_s(10, 0) - 1e-9
        assert wall >= ideal / 50 * 0.8
        steps = driver.engine.stats.steps
        await asyncio.sleep(0.05)
        assert driver.engine.stats.steps == steps == 20
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

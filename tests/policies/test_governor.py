"""The TPOT governor on synthetic scrapes: slow start, multiplicative decrease when the
engine's live TPOT exceeds the target, additive growth only while saturated and fast, no
action on idle engines, counter resets or repeated scrapes; and the gateway's wiring
(scrape parsing, capacities, SLO outcomes)."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.scrape import parse_metrics
from policies.governor import GovernorParams, TpotGovernor


class Engine:
    """An engine whose streams advance one token per ``step_s`` each."""

    def __init__(self, gov: TpotGovernor, name: str = "e") -> None:
        self.gov, self.name = gov, name
        self.t = self.gen = 0.0

    def scrape(self, running: float, step_s: float, held: int, dt: float = 1.0) -> str:
        self.t += dt
        self.gen += running * dt / step_s
        return self.gov.observe(self.name, self.t, self.gen, running, held, now=self.t)


def test_slow_start_then_growth_while_saturated_and_fast() -> None:
    gov = TpotGovernor(GovernorParams(), target_s=0.100)  # target 80 ms
    assert gov.cap("e", 256) == 64  # initial_fraction 0.25
    eng = Engine(gov)
    eng.scrape(running=64, step_s=0.040, held=64)  # first scrape: a reference only
    acts = [eng.scrape(running=64, step_s=0.040, held=gov.cap("e", 256) or 0) for _ in range(60)]
    assert acts.count("increase") == 12 and "decrease" not in acts
    assert gov.cap("e", 256) == 256  # +16 (256 / 16) per 2 s interval, up to max_num_seqs


def test_no_growth_without_demand() -> None:
    gov = TpotGovernor(GovernorParams(), target_s=0.100)
    gov.cap("e", 256)
    eng = Engine(gov)
    acts = [eng.scrape(running=10, step_s=0.020, held=10) for _ in range(20)]
    assert set(acts) == {"none"} and gov.cap("e", 256) == 64


def test_slow_engine_is_cut_multiplicatively_to_its_running_batch() -> None:
    gov = TpotGovernor(GovernorParams(initial_fraction=1.0, smoothing=0.5, beta=0.85),
                       target_s=0.100)
    assert gov.cap("e", 256) == 256
    eng = Engine(gov)
    eng.scrape(running=200, step_s=0.120, held=200)
    assert eng.scrape(running=200, step_s=0.120, held=200) == "decrease"
    assert gov.cap("e", 256) == 217  # floor(256 * 0.85)
    assert eng.scrape(running=200, step_s=0.120, held=200) == "none"  # one change per interval
    assert eng.scrape(running=200, step_s=0.120, held=200) == "decrease"
    assert gov.cap("e", 256) == 184
    st = gov.engines["e"]
    assert st.decreases == 2 and st.tpot_s is not None and st.tpot_s == pytest.approx(0.120)
    for _ in range(40):  # never below min_seqs
        eng.scrape(running=8, step_s=0.5, held=8)
    assert gov.cap("e", 256) == 8


def test_idle_reset_and_repeated_scrapes_are_ignored() -> None:
    gov = TpotGovernor(GovernorParams(), target_s=0.100)
    gov.cap("e", 256)
    assert gov.observe("e", 1.0, 1000.0, 10, 10, now=1.0) == "none"
    assert gov.observe("e", 1.0, 1000.0, 10, 10, now=1.5) == "none"  # same scrape again
    assert gov.observe("e", 2.0, 1000.0, 0, 0, now=2.0) == "none"  # idle: no tokens
    assert gov.observe("e", 3.0, 5.0, 10, 10, now=3.0) == "none"  # restarted: counter reset
    assert gov.engines["e"].tpot_s is None
    assert gov.observe("unknown", 4.0, 50.0, 1, 1, now=4.0) == "none"


def test_ungoverned_without_slo_unknown_max_seqs_or_disabled() -> None:
    assert TpotGovernor(GovernorParams(), target_s=None).cap("e", 256) == 256
    assert TpotGovernor(GovernorParams(), target_s=0.1).cap("e", None) is None
    assert TpotGovernor(GovernorParams(enabled=False), target_s=0.1).cap("e", 256) == 256


@pytest.mark.parametrize(("params", "message"), [
    ({"beta": 1.0}, "beta"), ({"low": 0}, "low"), ({"initial_fraction": 0}, "initial_fraction"),
    ({"min_seqs": 0}, "min_seqs"), ({"smoothing": 2}, "smoothing"),
])
def test_params_are_validated(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GovernorParams(**params)  # type: ignore[arg-type]


def test_scrape_reads_the_generation_counter() -> None:
    text = (
        'vllm:num_requests_running{model_name="m",engine="0"} 3\n'
        'vllm:generation_tokens_total{model_name="m",engine="0"} 1200\n'
        'vllm:generation_tokens_total{model_name="m",engine="1"} 300\n'
    )
    m = parse_metrics(text, now=1.0).metrics
    assert m.generation_tokens_total == 1500 and m.num_requests_running == 3
    assert parse_metrics("vllm:num_requests_running 1\n", now=1.0).metrics.generation_tokens_total is None


def test_slo_outcomes_roll_into_per_level_attainment() -> None:
    """``Scheduler.outcome`` and ``record_outcome``: TTFT and TPOT against the class's
    SLOs, a failure is a miss, a class without SLOs is not counted; the window forgets old
    outcomes."""
    from adapters.clock import FakeClock
    from policies.registry import build_policy
    from proxy.config import Settings
    from proxy.scheduler import Scheduler
    from proxy.store.base import Tenant

    clock = FakeClock()
    settings = Settings.model_validate({"scheduler": {"slo_window_s": 10, "slo_min_samples": 4}})
    policy = build_policy({"type": "driftsched"})
    sch = Scheduler(settings=settings, clock=clock, queue=None, pool=None,  # type: ignore[arg-type]
                    policy=policy, estimator=None, drift=None, replica_id="r")  # type: ignore[arg-type]
    prem, batch = Tenant(name="p", qos_class="premium"), Tenant(name="b", qos_class="batch")

    def rec(tenant: Tenant, **kw: Any) -> None:
        sch.record_outcome(tenant, sch.outcome(tenant, **kw))

    # premium: TTFT 1 s, TPOT 100 ms
    rec(prem, ok=True, ttft_s=0.5, e2e_s=0.5 + 0.09 * 100, output_tokens=101)
    rec(prem, ok=True, ttft_s=1.5, e2e_s=2.0, output_tokens=5)  # TTFT miss
    rec(prem, ok=True, ttft_s=0.2, e2e_s=0.2 + 0.15 * 20, output_tokens=21)  # TPOT
    rec(prem, ok=False, ttft_s=None, e2e_s=30.0, output_tokens=0)  # timed out
    rec(prem, ok=True, ttft_s=None, e2e_s=5.0, output_tokens=50)  # not streamed: met
    # a 3-token answer's TPOT is a step of jitter: not held against the SLO
    rec(prem, ok=True, ttft_s=0.2, e2e_s=0.8, output_tokens=3)
    for _ in range(10):
        rec(batch, ok=False, ttft_s=None, e2e_s=1.0, output_tokens=0)
    assert sch.slo.attainment(clock.time()) == {0: (0.5, 6)}
    clock.advance(11)
    rec(prem, ok=True, ttft_s=0.1, e2e_s=0.2, output_tokens=2)
    assert sch.slo.attainment(clock.time()) == {}  # 1 request < slo_min_samples
    assert sch.governor.target_s == pytest.approx(0.08)  # tightest TPOT SLO (100 ms) x 0.8
    assert sch.governor.params.enabled  # on by default with driftsched, off with the others
    assert sch.governor.exempts(0) and not sch.governor.exempts(1)  # premium passes the cap
    fcfs = Scheduler(settings=settings, clock=clock, queue=None, pool=None,  # type: ignore[arg-type]
                     policy=build_policy({"type": "fcfs"}), estimator=None,  # type: ignore[arg-type]
                     drift=None, replica_id="r")
    assert not fcfs.governor.params.enabled and fcfs.governor.cap("e", 256) == 256
    assert not fcfs.governor.exempts(0)


def test_outer_loop_tightens_the_target_while_the_streams_tail_misses_the_slo() -> None:
    gov = TpotGovernor(GovernorParams(), target_s=0.100)
    assert gov.target_s == pytest.approx(0.080)
    t = 0.0
    acts = []
    for i in range(200):  # 1 in 10 streams at 120 ms: p95 over the 100 ms SLO
        t += 0.25
        acts.append(gov.observe_stream(0.120 if i % 10 == 0 else 0.060, t))
    assert "tighten" in acts and "relax" not in acts
    assert gov.headroom < 0.8 and gov.target_s == pytest.approx(0.100 * gov.headroom)
    low = gov.headroom
    for _ in range(400):  # a healthy tail: back up, never past the configured headroom
        t += 0.25
        gov.observe_stream(0.050, t)
    assert gov.headroom > low and gov.headroom <= 0.8
    for _ in range(2000):  # bounded below
        t += 0.25
        gov.observe_stream(0.500, t)
    assert gov.headroom == pytest.approx(0.5)


def test_config_and_params_agree_on_every_default() -> None:
    """``scheduler.governor`` (pydantic, validated config) and :class:`GovernorParams` (the
    governor's own) name the same knobs with the same defaults; ``enabled`` is auto (None)
    in the config only."""
    from dataclasses import fields

    from proxy.config import GovernorConfig

    cfg = GovernorConfig().model_dump()
    assert cfg.pop("enabled") is None
    assert cfg == {f.name: f.default for f in fields(GovernorParams) if f.name != "enabled"}

"""The drift controller on a fake clock: 4x drift throttles, recovery is additive under
pressure and multiplicative without, premium is compensated instead of throttled, a
persistent estimator bias is not drift, and (gate "slo") drift throttles only while a more
important class misses its SLO target."""

from __future__ import annotations

import random

import pytest

from adapters.clock import FakeClock
from policies.base import TenantState
from policies.drift import DriftController, DriftParams

N_REACT = 12  # a 4x drift must lower the limit within this many completions (the
# confidence bound that keeps noise from looking like drift costs a couple of samples)


def controller(clock: FakeClock, **params: object) -> DriftController:
    # these tests drive the controller from the first sample, on drift alone (gate "none";
    # the SLO gate has its own tests)
    params = {"warmup": 0, "warmup_s": 0, "cooldown_s": 0, "gate": "none", **params}
    return DriftController(DriftParams(**params), clock=clock)  # type: ignore[arg-type]


def feed(
    ctl: DriftController, clock: FakeClock, tenant: str, n: int, ratio: float, rng: random.Random
) -> list[int | None]:
    """``n`` completions whose actual output is ``ratio`` x the prediction (+-10% noise);
    returns the limit after each."""
    limits = []
    for _ in range(n):
        clock.advance(0.5)
        predicted = rng.uniform(50, 500)
        ctl.observe(tenant, predicted, predicted * ratio * rng.uniform(0.9, 1.1))
        limits.append(ctl.limit(tenant))
    return limits


@pytest.mark.parametrize("detector", ["adwin", "page-hinkley"])
def test_4x_drift_throttles_fast_and_recovers_additively(detector: str) -> None:
    clock, rng = FakeClock(), random.Random(1)
    ctl = controller(clock, detector=detector)
    ctl.configure("b", level=1, base_limit=16)
    assert set(feed(ctl, clock, "b", 100, 1.0, rng)) == {16}
    calm = ctl.status("b")
    assert calm.state == "ok" and calm.last_action == "none" and calm.decreases == 0

    drifting = feed(ctl, clock, "b", 40, 4.0, rng)
    first_drop = next(i for i, lim in enumerate(drifting) if lim is not None and lim < 16)
    assert first_drop < N_REACT
    assert drifting[first_drop] == 8  # multiplicative: beta = 0.5
    assert drifting[-1] == 1  # floor: min_limit
    st = ctl.status("b")
    assert st.state == "drifting" and st.ratio > 3 and st.last_action == "decrease"
    assert st.last_action_at is not None and st.last_action_at <= clock.time()

    # the estimator catches up: predictions are right again
    recovering = feed(ctl, clock, "b", 200, 1.0, rng)
    steps = [b - a for a, b in zip([1, *recovering], recovering, strict=False)]  # type: ignore[operator]
    assert all(s in (0, 1) for s in steps)  # additive, never a jump, never down
    assert recovering[-1] == 16 and max(recovering) == 16  # type: ignore[type-var]
    assert ctl.status("b").state == "ok" and ctl.status("b").increases == 15


def test_premium_drift_is_compensated_not_throttled() -> None:
    clock, rng = FakeClock(), random.Random(2)
    ctl = controller(clock, overflow=True)
    ctl.configure("p", level=0, base_limit=8)
    feed(ctl, clock, "p", 30, 1.0, rng)
    assert set(feed(ctl, clock, "p", 40, 4.0, rng)) == {8}
    st = ctl.status("p")
    assert st.boost and st.overflow and st.last_action == "compensate" and st.decreases == 0
    assert ctl.annotate(TenantState("p", level=0)) == TenantState(
        "p", level=0, limit=8, drift_ratio=st.ratio, boost=True, overflow=True
    )
    feed(ctl, clock, "p", 100, 1.0, rng)
    st = ctl.status("p")
    assert not st.boost and not st.overflow and st.last_action == "restore" and st.limit == 8


def test_unlimited_tenant_is_throttled_then_unlimited_again() -> None:
    clock, rng = FakeClock(), random.Random(3)
    ctl = controller(clock, unlimited_as=8, increase=2, cooldown=3)
    ctl.configure("u", level=2, base_limit=None)
    assert ctl.limit("u") is None
    feed(ctl, clock, "u", 20, 1.0, rng)
    assert feed(ctl, clock, "u", 20, 4.0, rng)[-1] == 1
    assert feed(ctl, clock, "u", 150, 1.0, rng)[-1] is None


def test_higher_class_slo_misses_throttle_drifting_lower_tenants_and_hold_recovery() -> None:
    clock, rng = FakeClock(), random.Random(4)
    ctl = controller(clock, gate="slo", attainment_target=0.9, attainment_hold_s=60.0)
    for name, level in (("prem", 0), ("std", 1), ("bat", 2), ("calm", 1)):
        ctl.configure(name, level=level, base_limit=10)
    for name in ("std", "bat", "calm"):
        feed(ctl, clock, name, 30, 1.0, rng)
    for name in ("std", "bat"):  # drift, but premium meets its SLO: nobody is throttled
        feed(ctl, clock, name, 20, 4.0, rng)
    assert (ctl.limit("std"), ctl.limit("bat"), ctl.limit("calm")) == (10, 10, 10)
    assert ctl.status("std").state == "drifting" and not ctl.status("std").pressured
    assert ctl.on_attainment(0, 0.95) == ()
    assert ctl.under_pressure() == ()
    # premium misses: the drifting lower tenants lose half their limit, the calm one nothing
    assert ctl.on_attainment(0, 0.70) == ("bat", "std")
    assert ctl.under_pressure() == (0,)
    assert (ctl.limit("prem"), ctl.limit("std"), ctl.limit("bat"), ctl.limit("calm")) == (10, 5, 5, 10)
    assert ctl.status("std").last_action == "slo_decrease" and ctl.status("std").pressured
    assert ctl.on_attainment(1, 0.5) == ()  # bat is held: one decrease per hold period
    held = feed(ctl, clock, "std", 40, 1.0, rng)  # 20 s: held, no increase (the drifted
    assert max(x or 10 for x in held) <= 5  # samples still in the window may cut it further)
    clock.advance(60)  # the hold and the pressure are over
    feed(ctl, clock, "std", 40, 1.0, rng)
    assert ctl.limit("std") == 10


def test_slo_gate_throttles_drift_only_under_pressure_and_recovers_multiplicatively() -> None:
    clock, rng = FakeClock(), random.Random(5)
    ctl = controller(clock, gate="slo", attainment_hold_s=10.0)
    ctl.configure("p", level=0, base_limit=None)
    ctl.configure("s", level=1, base_limit=32)
    feed(ctl, clock, "s", 40, 1.0, rng)
    assert set(feed(ctl, clock, "s", 20, 4.0, rng)) == {32}  # drifting, no pressure
    ctl.on_attainment(0, 0.5)  # premium misses (no decrease yet: hold starts now)
    limits = feed(ctl, clock, "s", 20, 4.0, rng)  # 10 s under pressure: AIMD decreases
    assert min(x for x in limits if x is not None) <= 4 and ctl.status("s").decreases >= 3
    cut = ctl.limit("s")
    assert cut is not None
    # pressure gone (hold over), still drifting: the limit is given back, doubling
    limits = feed(ctl, clock, "s", 30, 4.0, rng)
    assert limits[-1] == 32
    steps = [b for a, b in zip([cut, *limits], limits, strict=False) if b != a]
    assert all(b is not None and b <= 32 for b in steps) and len(steps) <= 5, steps


def test_a_persistent_estimator_bias_is_not_drift() -> None:
    """An estimator that under-predicts a tenant 4x from the start (a population it has not
    learnt) is miscalibrated, not drifting: the baseline absorbs it."""
    clock, rng = FakeClock(), random.Random(6)
    ctl = controller(clock, warmup=20)
    ctl.configure("t", level=1, base_limit=16)
    assert set(feed(ctl, clock, "t", 300, 4.0, rng)) == {16}
    st = ctl.status("t")
    assert st.decreases == 0 and 3.5 < st.baseline < 4.5 and 0.8 < st.ratio < 1.25, st
    # a further 4x on top of the bias is drift
    assert min(x or 16 for x in feed(ctl, clock, "t", 20, 16.0, rng)) < 16


def test_statuses_and_annotate() -> None:
    clock = FakeClock()
    ctl = controller(clock)
    ctl.configure("a", level=1, base_limit=4)
    ctl.configure("a", level=1, base_limit=6)  # a config change moves an untouched limit
    assert ctl.limit("a") == 6
    st = ctl.statuses()["a"]
    assert (st.state, st.samples, st.ratio, st.detections) == ("warmup", 0, 1.0, 0)
    unknown = TenantState("zz")
    assert ctl.annotate(unknown) is unknown
    with pytest.raises(KeyError):
        ctl.observe("zz", 10, 10)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"beta": 1.0}, "beta"),
        ({"threshold": 1.1}, "threshold"),
        ({"min_samples": 60}, "min_samples"),
        ({"detector": "kswin"}, "detector"),
        ({"cooldown": 0}, "cooldown"),
        ({"gate": "always"}, "gate"),
        ({"baseline_window": 0}, "baseline_window"),
    ],
)
def test_params_are_validated(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftParams(**params)  # type: ignore[arg-type]


def test_warmup_ignores_the_estimators_cold_start() -> None:
    clock = FakeClock()
    c = DriftController(DriftParams(warmup=20, warmup_s=0, cooldown_s=0, gate="none"), clock=clock)
    c.configure("t", level=1, base_limit=8)
    # a cold estimator over- and under-predicts wildly at first: not drift
    for i in range(20):
        c.observe("t", predicted=256 if i < 10 else 5, actual=20)
    assert c.status("t").samples == 0 and c.limit("t") == 8
    for _ in range(20):
        c.observe("t", predicted=20, actual=20)
    assert c.limit("t") == 8
    for _ in range(15):  # the window of good samples is moved into the baseline first
        c.observe("t", predicted=20, actual=80)
    assert c.limit("t") is not None and c.limit("t") < 8  # type: ignore[operator]


def test_noisy_but_unbiased_predictions_are_not_drift() -> None:
    """Single requests scatter widely around a good median (lognormal, sigma 1): that must
    not throttle the tenant, or a well-predicted tenant would lose its capacity to noise."""
    import random

    clock = FakeClock()
    c = DriftController(DriftParams(gate="none", warmup_s=0, cooldown_s=0), clock=clock)
    c.configure("t", level=1, base_limit=32)
    rng = random.Random(7)
    for _ in range(3000):
        c.observe("t", predicted=100, actual=100 * rng.lognormvariate(0, 1.0))
    st = c.status("t")
    assert st.decreases == 0 and c.limit("t") == 32, st
    for _ in range(40):  # a real 4x drift on top of the same noise is still caught
        c.observe("t", predicted=100, actual=400 * rng.lognormvariate(0, 1.0))
    assert c.status("t").decreases >= 1


def test_a_tenants_first_seconds_are_warm_up() -> None:
    clock = FakeClock()
    c = DriftController(DriftParams(warmup=0, warmup_s=30, gate="none"), clock=clock)
    c.configure("t", level=1, base_limit=8)
    for i in range(100):  # 20 s of ramp-up: short answers first, then long ones
        clock.advance(0.2)
        c.observe("t", predicted=100, actual=30 if i < 50 else 300)
    assert c.status("t").samples == 0 and c.limit("t") == 8


def test_limit_changes_are_paced_in_time_and_recovery_needs_no_completions() -> None:
    """AIMD steps at most once per ``cooldown_s`` (a limit acts as in-flight requests
    finish), and ``tick`` gives the limit back without waiting for the throttled tenant's
    rare completions."""
    clock, rng = FakeClock(), random.Random(8)
    ctl = controller(clock, cooldown_s=5.0)
    ctl.configure("t", level=1, base_limit=64)
    feed(ctl, clock, "t", 40, 1.0, rng)
    limits = feed(ctl, clock, "t", 40, 4.0, rng)  # 20 s of drift: at most 4-5 halvings
    assert ctl.status("t").decreases <= 5 and min(x or 64 for x in limits) >= 2, limits
    ctl2 = controller(clock, cooldown_s=5.0, gate="slo", attainment_hold_s=10.0)
    ctl2.configure("p", level=0, base_limit=None)
    ctl2.configure("s", level=1, base_limit=32)
    feed(ctl2, clock, "s", 40, 1.0, rng)
    ctl2.on_attainment(0, 0.5)
    feed(ctl2, clock, "s", 16, 4.0, rng)  # 8 s of drift, under pressure (10 s)
    assert ctl2.limit("s") == 16
    assert ctl2.tick() == ()  # still pressured and drifting: no recovery
    clock.advance(20)  # no completion at all, pressure over
    grown = []
    for _ in range(30):
        clock.advance(1.0)
        grown += [a for _, a in ctl2.tick()]
    assert ctl2.limit("s") == 32 and set(grown) == {"increase"} and len(grown) <= 5

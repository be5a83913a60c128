"""The drift controller on a fake clock: 4x drift throttles, recovery is additive, premium is
compensated instead of throttled, and SLO misses of a higher class throttle lower classes."""

from __future__ import annotations

import random

import pytest

from policies.base import TenantState
from policies.drift import DriftController, DriftParams
from proxy.clock import FakeClock

N_REACT = 12  # a 4x drift must lower the limit within this many completions (the
# confidence bound that keeps noise from looking like drift costs a couple of samples)


def controller(clock: FakeClock, **params: object) -> DriftController:
    params = {"warmup": 0, **params}  # these tests drive the controller from the first sample
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


def test_higher_class_slo_misses_throttle_lower_classes_and_hold_recovery() -> None:
    clock, rng = FakeClock(), random.Random(4)
    ctl = controller(clock, attainment_target=0.9, attainment_hold_s=60.0)
    for name, level in (("prem", 0), ("std", 1), ("bat", 2)):
        ctl.configure(name, level=level, base_limit=10)
    assert ctl.on_attainment(0, 0.95) == ()
    assert ctl.on_attainment(0, 0.70) == ("bat", "std")
    assert (ctl.limit("prem"), ctl.limit("std"), ctl.limit("bat")) == (10, 5, 5)
    assert ctl.status("std").last_action == "slo_decrease"
    assert ctl.on_attainment(1, 0.5) == ()  # bat is held: one decrease per hold period
    feed(ctl, clock, "std", 40, 1.0, rng)  # 20 s: still held, good predictions or not
    assert ctl.limit("std") == 5
    clock.advance(60)
    feed(ctl, clock, "std", 40, 1.0, rng)
    assert ctl.limit("std") == 10


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
    ],
)
def test_params_are_validated(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftParams(**params)  # type: ignore[arg-type]


def test_warmup_ignores_the_estimators_cold_start() -> None:
    clock = FakeClock()
    c = DriftController(DriftParams(warmup=20), clock=clock)
    c.configure("t", level=1, base_limit=8)
    # a cold estimator over- and under-predicts wildly at first: not drift
    for i in range(20):
        c.observe("t", predicted=256 if i < 10 else 5, actual=20)
    assert c.status("t").samples == 0 and c.limit("t") == 8
    for _ in range(20):
        c.observe("t", predicted=20, actual=20)
    assert c.limit("t") == 8
    for _ in range(10):
        c.observe("t", predicted=20, actual=80)
    assert c.limit("t") is not None and c.limit("t") < 8  # type: ignore[operator]


def test_noisy_but_unbiased_predictions_are_not_drift() -> None:
    """Single requests scatter widely around a good median (lognormal, sigma 1): that must
    not throttle the tenant, or a well-predicted tenant would lose its capacity to noise."""
    import random

    clock = FakeClock()
    c = DriftController(DriftParams(), clock=clock)
    c.configure("t", level=1, base_limit=32)
    rng = random.Random(7)
    for _ in range(3000):
        c.observe("t", predicted=100, actual=100 * rng.lognormvariate(0, 1.0))
    st = c.status("t")
    assert st.decreases == 0 and c.limit("t") == 32, st
    for _ in range(40):  # a real 4x drift on top of the same noise is still caught
        c.observe("t", predicted=100, actual=400 * rng.lognormvariate(0, 1.0))
    assert c.status("t").decreases >= 1

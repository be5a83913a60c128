"""LeastLoadedRouter: pure ranking over Backend values with an injected clock."""

from __future__ import annotations

from adapters.base import Backend, EngineMetrics
from adapters.clock import FakeClock
from adapters.router import LeastLoadedRouter

NOW = 1000.0


def make_backend(
    name: str,
    *,
    cap: int | None = 1000,
    seqs: int | None = 8,
    in_flight: int = 0,
    held: int = 0,
    state: str = "healthy",
    metrics: EngineMetrics | None = None,
) -> Backend:
    b = Backend(
        name=name, url=f"http://{name}", models=("m",), kv_capacity_tokens=cap, max_num_seqs=seqs
    )
    b.state = state  # type: ignore[assignment]
    b.in_flight = in_flight
    if metrics is None and held:  # tokens in use, as a fresh scrape reports them
        assert cap is not None
        metrics = EngineMetrics(kv_cache_usage_perc=held / cap, scraped_at=NOW)
    if metrics is not None:
        b.metrics = metrics
    return b


def router() -> LeastLoadedRouter:
    clock = FakeClock()
    clock.advance(NOW)  # monotonic NOW
    return LeastLoadedRouter(metrics_max_age_s=5.0, clock=clock)


def test_empty_and_all_unroutable_give_none() -> None:
    r = router()
    assert r.pick([], 10) is None
    bs = [
        make_backend(n, state=s)
        for n, s in [("a", "draining"), ("b", "unhealthy"), ("c", "restarting")]
    ]
    assert r.pick(bs, 10) is None


def test_never_picks_non_routable_even_when_emptier() -> None:
    a = make_backend("a", held=900)
    b = make_backend("b", state="draining")
    c = make_backend("c", state="starting")
    assert router().pick([b, c, a], 10) is a


def test_most_free_tokens_wins() -> None:
    a = make_backend("a", held=500)
    b = make_backend("b", held=100)
    c = make_backend("c", cap=2000, held=1200)
    assert router().pick([a, b, c], 50) is b


def test_fitting_beats_not_fitting_on_seqs() -> None:
    # b has more free tokens but no free sequence slot
    a = make_backend("a", held=800, in_flight=1)
    b = make_backend("b", held=0, in_flight=8)
    assert router().pick([b, a], 100) is a


def test_ties_break_on_in_flight_then_order() -> None:
    a = make_backend("a", cap=None, seqs=None, in_flight=3)
    b = make_backend("b", cap=None, seqs=None, in_flight=1)
    c = make_backend("c", cap=None, seqs=None, in_flight=1)
    assert router().pick([a, b, c], 10) is b
    assert router().pick([a, c, b], 10) is c


def test_unknown_capacity_counts_as_infinite() -> None:
    a = make_backend("a", cap=1000, held=0)
    b = make_backend("b", cap=None, in_flight=3)
    assert router().pick([a, b], 10) is b


def test_fresh_scrape_adds_load_the_gateway_did_not_send() -> None:
    busy = EngineMetrics(
        num_requests_running=6, num_requests_waiting=4, kv_cache_usage_perc=0.9, scraped_at=NOW - 1
    )
    a = make_backend("a", cap=1000, seqs=None, metrics=busy)
    b = make_backend("b", cap=1000, seqs=None, held=300)
    r = router()
    assert r.load(a) == (900.0, 10.0)
    assert r.pick([a, b], 10) is b


def test_lagging_scrape_never_hides_fresh_in_flight() -> None:
    idle = EngineMetrics(num_requests_running=0, kv_cache_usage_perc=0.0, scraped_at=NOW - 0.5)
    a = make_backend("a", in_flight=5, metrics=idle)
    assert router().load(a) == (0.0, 5.0)


def test_stale_metrics_are_ignored() -> None:
    stale = EngineMetrics(num_requests_running=50, kv_cache_usage_perc=1.0, scraped_at=NOW - 60)
    a = make_backend("a", metrics=stale)
    assert router().load(a) == (0.0, 0.0)


def test_nothing_fits_still_returns_the_best() -> None:
    a = make_backend("a", held=990)
    b = make_backend("b", held=950)
    assert router().pick([a, b], 500) is b

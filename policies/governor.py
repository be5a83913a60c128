"""The TPOT governor: a per-engine cap on admitted sequences, AIMD on the engine's live
time per output token.

Why. An engine's step time grows with its batch: a vLLM engine filled to ``max_num_seqs``
decodes every sequence at the pace of its largest steps (prefill chunks plus hundreds of
decodes), and that pace, not the queue order, decides whether a running request meets its
TPOT SLO. Admission by KV footprint alone fills the batch as far as memory allows. The
governor keeps each engine's batch as large as the tightest TPOT SLO among the classes
allows, and no larger; beyond that point a larger batch adds little throughput (the step is
compute-bound) and only slows every stream.

Signal (no per-chunk work on the request path): from two successive ``/metrics`` scrapes of
an engine, ``tpot = mean running sequences / (generation tokens per second)`` — the mean
time between two tokens of one stream over the interval, prefill stalls included. It is
smoothed (exponential mean, ``smoothing``) and compared every ``interval_s`` with
``target = tightest TPOT SLO x headroom``:

* above target: ``cap <- max(min_seqs, floor(cap x beta))`` (gently: every cut stops
  admission to the engine until its batch has drained below the new cap);
* under ``target x low`` and the engine is *saturated* (the gateway holds at least ``cap
  - 1`` sequences on it): ``cap += increase`` (default ``max_num_seqs / 16``).

Outer loop (:meth:`TpotGovernor.observe_stream`): the inner loop holds the *mean* TPOT,
the SLO is about each stream's. From the TPOT of finished streams (16 tokens or more), the
headroom shrinks by 10 % every ``outer_interval_s`` while their p95 over the last
``outer_window_s`` exceeds the SLO (down to ``min_headroom``), and grows back by 5 % while
it is under 85 % of it (up to ``headroom``).

The cap starts at ``initial_fraction x max_num_seqs`` (slow start: on a cold pool the
arrivals of the first seconds would otherwise be admitted all at once, and queue inside
the engine, where no gateway policy can reorder them). Engines whose ``max_num_seqs`` or
generation counter are unknown are not governed (cap None). The cap is *soft*: requests of a
class level <= ``exempt_level`` (premium) may fill the engine up to ``max_num_seqs``, so the
top class never waits in the gateway for a slot the governor holds back; its streams count
in the measured TPOT, so the others' cap shrinks to make room. With several gateway
replicas, one governs each engine (the leader for shared engines, :mod:`proxy.scheduler`);
the others :meth:`~TpotGovernor.adopt` its caps. Not thread-safe; time comes from the
caller.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from policies.registry import check


@dataclass(frozen=True, slots=True)
class GovernorParams:
    enabled: bool = True
    #: target = tightest TPOT SLO x headroom
    headroom: float = 0.8
    #: grow only while the smoothed TPOT is under target x low
    low: float = 0.85
    interval_s: float = 2.0
    #: weight of the newest measurement in the exponential mean
    smoothing: float = 0.25
    beta: float = 0.9
    #: cap growth per interval; 0 = max_num_seqs / 16
    increase: int = 0
    min_seqs: int = 8
    initial_fraction: float = 0.25
    #: outer loop: the headroom moves within [min_headroom, headroom] so that the p95 of
    #: the streams' own TPOT (at completion) stays under the SLO
    #: class levels <= this may fill an engine past the cap (up to max_num_seqs): the top
    #: class never waits for a slot the governor holds back; -1: nobody
    exempt_level: int = 0
    min_headroom: float = 0.5
    outer_interval_s: float = 10.0
    outer_window_s: float = 30.0

    def __post_init__(self) -> None:
        check("headroom", self.headroom)
        check("interval_s", self.interval_s)
        check("min_seqs", self.min_seqs)
        check("increase", self.increase, strict=False)
        check("outer_interval_s", self.outer_interval_s)
        check("outer_window_s", self.outer_window_s)
        for ok, why in (
            (0.0 < self.low <= 1.0, "low: must be in (0, 1]"),
            (0.0 < self.smoothing <= 1.0, "smoothing: must be in (0, 1]"),
            (0.0 < self.beta < 1.0, "beta: must be in (0, 1)"),
            (0.0 < self.initial_fraction <= 1.0, "initial_fraction: must be in (0, 1]"),
            (0.0 < self.min_headroom <= self.headroom, "min_headroom: must be in (0, headroom]"),
        ):
            if not ok:
                raise ValueError(why)


@dataclass(slots=True)
class EngineGovernorState:
    """One engine as the governor sees it (admin API, metrics)."""

    cap: int
    max_seqs: int
    #: smoothed seconds per output token per stream (None: no measurement yet)
    tpot_s: float | None = None
    decreases: int = 0
    increases: int = 0
    #: last scrape folded in: (scraped_at, generation tokens, running)
    _last: tuple[float, float, float] | None = None
    _next_change: float = 0.0


class TpotGovernor:
    """Per-engine admission caps from live TPOT (module doc)."""

    def __init__(self, params: GovernorParams, target_s: float | None) -> None:
        self.params = params
        #: the tightest TPOT SLO (None: no class has one, nothing to govern for)
        self.slo_s = target_s
        self.headroom = params.headroom
        self.target_s = None if target_s is None else target_s * params.headroom
        self.engines: dict[str, EngineGovernorState] = {}
        #: (completed at, TPOT) of finished streams, for the outer loop
        self._streams: deque[tuple[float, float]] = deque()
        self._next_outer = 0.0

    def observe_stream(self, tpot_s: float, now: float) -> str:
        """A stream finished with this TPOT (long enough to measure). Every
        ``outer_interval_s``: if the p95 of the last ``outer_window_s`` of streams is over
        the SLO, the headroom shrinks by 10 % (down to ``min_headroom``); under 85 % of the
        SLO it grows back by 5 % (up to ``headroom``). The mean TPOT the inner loop holds is
        what the cap controls; this keeps the *tail* the SLO is about under it. Returns
        "tighten", "relax" or "none"."""
        if self.slo_s is None or not self.params.enabled:
            return "none"
        p = self.params
        self._streams.append((now, tpot_s))
        while self._streams and self._streams[0][0] < now - p.outer_window_s:
            self._streams.popleft()
        if now < self._next_outer or len(self._streams) < 20:
            return "none"
        self._next_outer = now + p.outer_interval_s
        tp = sorted(x for _, x in self._streams)
        p95 = tp[min(len(tp) - 1, int(0.95 * len(tp)))]
        old = self.headroom
        if p95 > self.slo_s:
            self.headroom = max(p.min_headroom, self.headroom * 0.9)
        elif p95 < 0.85 * self.slo_s:
            self.headroom = min(p.headroom, self.headroom * 1.05)
        self.target_s = self.slo_s * self.headroom
        if self.headroom < old:
            return "tighten"
        return "relax" if self.headroom > old else "none"

    def exempts(self, level: int) -> bool:
        """Whether requests of class ``level`` may pass the cap (up to max_num_seqs)."""
        return self.params.enabled and self.slo_s is not None and level <= self.params.exempt_level

    def cap(self, engine: str, max_seqs: int | None) -> int | None:
        """The admission cap on ``engine``'s sequences (None: ungoverned)."""
        if not self.params.enabled or self.target_s is None or max_seqs is None:
            return max_seqs
        st = self.engines.get(engine)
        if st is None or st.max_seqs != max_seqs:
            first = max(self.params.min_seqs, math.ceil(max_seqs * self.params.initial_fraction))
            st = EngineGovernorState(cap=min(max_seqs, first), max_seqs=max_seqs)
            self.engines[engine] = st
        return st.cap

    def adopt(self, engine: str, cap: int | None, max_seqs: int | None) -> None:
        """Take ``cap`` (None: ``max_seqs``, ungoverned) as ``engine``'s cap: another replica
        governs it (the leader); this one follows, ready to go on from there."""
        if not self.params.enabled or self.target_s is None or max_seqs is None:
            return
        self.cap(engine, max_seqs)  # creates the engine's state if new
        st = self.engines[engine]
        st.cap = max(1, min(max_seqs, cap if cap is not None else max_seqs))
        st._last = None  # its own scrapes resume from scratch when it governs again

    def observe(
        self, engine: str, scraped_at: float, generation_tokens: float | None, running: float,
        held_seqs: int, now: float,
    ) -> str:
        """Fold one scrape of ``engine`` in (repeated scrapes are ignored) and adjust its cap
        when ``interval_s`` has passed. Returns "decrease", "increase" or "none"."""
        st = self.engines.get(engine)
        if st is None or generation_tokens is None or self.target_s is None:
            return "none"
        p = self.params
        last = st._last
        if last is not None and scraped_at <= last[0]:
            return "none"  # the same scrape again
        st._last = (scraped_at, generation_tokens, running)
        if last is None:
            return "none"
        dt, dgen = scraped_at - last[0], generation_tokens - last[1]
        mean_running = 0.5 * (last[2] + running)
        # idle, restarted (the counter went back), or under half a token per stream in the
        # interval: no rate to measure
        if dgen <= 0 or dgen < 0.5 * mean_running:
            return "none"
        tpot = mean_running * dt / dgen
        st.tpot_s = tpot if st.tpot_s is None else st.tpot_s + p.smoothing * (tpot - st.tpot_s)
        if now < st._next_change:
            return "none"
        if st.tpot_s > self.target_s:
            new = max(p.min_seqs, math.floor(st.cap * p.beta))
            if new < st.cap:
                st.cap, st.decreases, st._next_change = new, st.decreases + 1, now + p.interval_s
                return "decrease"
            return "none"
        if st.tpot_s < self.target_s * p.low and held_seqs >= st.cap - 1 and st.cap < st.max_seqs:
            step = p.increase or max(1, st.max_seqs // 16)
            st.cap = min(st.max_seqs, st.cap + step)
            st.increases += 1
            st._next_change = now + p.interval_s
            return "increase"
        return "none"

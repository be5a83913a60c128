"""Runs the pure :class:`~adapters.sim.engine.Engine` in real time on the event loop.

Simulated time is wall time multiplied by ``time_scale``: a step the profile says takes
``d`` seconds sleeps ``d / time_scale`` wall seconds, and every timestamp the engine records
(arrival, first token, finish) reads the same scaled clock, so TTFTs and latencies reported in
``/metrics`` are in simulated seconds and match what a client measures times ``time_scale``.

Steps are chained on ideal deadlines (the next step starts when the previous one should have
ended), which absorbs the driver's own CPU time, timer rounding and short stalls (the process
descheduled by a busy machine): steps that should already have finished run back to back
until the loop is on time again, so throughput stays the profile's and tokens arrive in a
short burst. When the loop is behind by more than ``MAX_CATCH_UP_S`` of wall time (CPU
saturated), it gives up catching up: the loss is counted in :attr:`Driver.lag_s` (simulated
seconds, ``sim:lag_seconds_total``) and the engine simply looks slower than its profile.

Idle, the loop awaits an :class:`asyncio.Event`; it never spins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from adapters.sim.engine import Engine, SimRequest

log = logging.getLogger("adapters.sim")

MAX_CATCH_UP_S = 0.1


class TokenStream:
    """What a request handler waits on. ``event`` is set when there is news to read."""

    __slots__ = ("disconnected", "event", "every", "req", "sent")

    def __init__(self, req: SimRequest, every: int | None) -> None:
        self.req = req
        #: wake the reader every this many new tokens (first and last always); None: last only
        self.every = every
        self.sent = 0
        self.disconnected = False
        self.event = asyncio.Event()


class Driver:
    """Owns an engine and its step loop; hands tokens to waiting handlers.

    ``on_finish`` is called on the loop for every request that finishes normally.
    """

    def __init__(
        self,
        engine_factory: Callable[[Callable[[], float]], Engine],
        *,
        time_scale: float = 1.0,
        on_finish: Callable[[SimRequest], None] | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = time_scale
        self._t0 = time.perf_counter()
        self._floor = 0.0
        self.engine = engine_factory(self.now)
        self._on_finish = on_finish
        self._streams: dict[str, TokenStream] = {}
        self._wake = asyncio.Event()
        self.lag_s = 0.0

    def now(self) -> float:
        """Simulated seconds since the driver started; never before the last step's end.

        Timers may fire up to ~1 ms early (uvloop rounds to milliseconds); the floor keeps a
        step's tokens from being stamped before the step's ideal end.
        """
        t = (time.perf_counter() - self._t0) * self.time_scale
        if t < self._floor:
            return self._floor
        return t

    def submit(self, req: SimRequest, *, every: int | None) -> TokenStream:
        """Queue ``req`` in the engine, after the profile's ``request_overhead_ms`` if any."""
        stream = TokenStream(req, every)
        self._streams[req.request_id] = stream
        overhead_s = self.engine.profile.request_overhead_ms / 1000.0 / self.time_scale
        if overhead_s > 0:
            asyncio.get_running_loop().call_later(overhead_s, self._admit, req)
        else:
            self._admit(req)
        return stream

    def _admit(self, req: SimRequest) -> None:
        if req.request_id not in self._streams:  # aborted during its overhead
            return
        self.engine.add(req)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Abort an unfinished request (client went away); frees its KV. Idempotent."""
        self._streams.pop(request_id, None)
        if self.engine.abort(request_id) is not None:
            log.debug("aborted %s", request_id)

    async def run(self) -> None:
        """The step loop; runs until cancelled."""
        engine = self.engine
        scale = self.time_scale
        perf = time.perf_counter
        next_start: float | None = None
        while True:
            if not engine.has_work():
                next_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            step = engine.schedule()
            if step.empty and step.preempted:  # the only candidate preempted itself: retry
                await asyncio.sleep(0)
                continue
            if step.empty:  # nothing fits (cannot happen with capacity >= max_model_len)
                next_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            t = perf()
            if next_start is None:
                start = t
            elif t - next_start > MAX_CATCH_UP_S:
                self.lag_s += (t - next_start) * scale
                start = t
            else:
                start = next_start
            end = start + step.duration_s / scale
            delay = end - perf()
            await asyncio.sleep(delay if delay > 0 else 0)
            next_start = end
            self._floor = max(self._floor, (end - self._t0) * scale)
            self._deliver(engine.complete(step))

    def _deliver(self, produced: list[SimRequest]) -> None:
        streams = self._streams
        for req in produced:
            stream = streams.get(req.request_id)
            if stream is None:
                continue
            if req.finished:
                del streams[req.request_id]
                stream.event.set()
                if self._on_finish is not None:
                    self._on_finish(req)
            elif stream.every is not None and (
                stream.sent == 0 or req.generated - stream.sent >= stream.every
            ):
                stream.event.set()

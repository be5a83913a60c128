"""The simulator's scheduler: a pure, discrete step loop that mirrors vLLM v1.

No I/O and no sleeping: a driver calls :meth:`Engine.schedule` to plan a step (which says
how long the step takes), lets that much simulated time pass, then calls
:meth:`Engine.complete` to apply it. Time comes from the injected ``clock`` (simulated
seconds); the engine only reads it to stamp arrivals, first tokens and finishes.

One step, as in ``vllm/v1/core/sched/scheduler.py``:

1. **Running requests first**, in admission order: each gets the tokens it still needs (one
   for a decode, the rest of its prompt for a chunked prefill) within the step's token budget
   (``max_num_batched_tokens``). KV is held in 16-token blocks covering every computed token.
   When a request needs a block and none is free, the engine preempts by recompute: the
   newest running request (FCFS), or the one with the largest ``(priority, arrival)``
   (priority policy), loses its blocks and goes back to the front of the waiting queue with
   nothing computed; the request that needed the block retries. If the victim is that very
   request, it is not scheduled this step.
2. **Then waiting requests**, only if nothing was preempted this step: in queue order (FCFS:
   arrival, preempted ones in front; priority: ``(priority, arrival)``, lower first) while
   the budget lasts, fewer than ``max_num_seqs`` are running, and their blocks fit. The
   first one that does not fit stops admission (no skipping ahead). A prompt longer than
   the remaining budget is prefilled in chunks across steps.

A request whose computed tokens reach its known tokens (prompt + generated) samples one new
token when the step completes; a recomputed request therefore re-prefills prompt + generated
tokens and then continues. It finishes when it has generated ``output_tokens``.

Not thread-safe: one driver owns an engine.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from adapters.sim.profiles import BLOCK_SIZE, Profile

Policy = Literal["fcfs", "priority"]
Status = Literal["waiting", "running", "finished", "aborted"]
FinishReason = Literal["stop", "length"]


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request inside the engine. Identity is the object (and ``request_id``)."""

    request_id: str
    prompt_tokens: int
    #: tokens it will generate before finishing (true length, already capped by max_tokens)
    output_tokens: int
    #: finish reason once ``output_tokens`` are generated
    finish_reason: FinishReason = "stop"
    priority: int = 0
    arrival_time: float = 0.0

    # -- state, owned by the engine -----------------------------------------------------
    seq: int = 0
    status: Status = "waiting"
    num_computed: int = 0
    generated: int = 0
    blocks: int = 0
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: prompt plus generated."""
        return self.prompt_tokens + self.generated

    @property
    def finished(self) -> bool:
        return self.status in ("finished", "aborted")


@dataclass(slots=True)
class Step:
    """A planned step: what runs, how many tokens, how long it takes."""

    scheduled: list[tuple[SimRequest, int]] = field(default_factory=list)
    preempted: list[SimRequest] = field(default_factory=list)
    num_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decodes: int = 0
    decode_context_tokens: int = 0
    duration_s: float = 0.0

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters (vLLM's ``*_total`` metrics)."""

    steps: int = 0
    #: simulated seconds spent in steps (sum of step durations)
    busy_s: float = 0.0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_stop: int = 0
    finished_length: int = 0
    aborted: int = 0


class _Waiting:
    """The waiting queue: FCFS deque or a ``(priority, arrival, seq)`` heap; lazy removal."""

    __slots__ = ("_fifo", "_heap", "_live", "_priority")

    def __init__(self, policy: Policy) -> None:
        self._priority = policy == "priority"
        self._fifo: deque[SimRequest] = deque()
        self._heap: list[tuple[int, float, int, SimRequest]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def add(self, req: SimRequest, *, front: bool = False) -> None:
        self._live += 1
        if self._priority:
            heapq.heappush(self._heap, (req.priority, req.arrival_time, req.seq, req))
        elif front:
            self._fifo.appendleft(req)
        else:
            self._fifo.append(req)

    def peek(self) -> SimRequest | None:
        if self._priority:
            while self._heap and self._heap[0][3].status != "waiting":
                heapq.heappop(self._heap)
            return self._heap[0][3] if self._heap else None
        while self._fifo and self._fifo[0].status != "waiting":
            self._fifo.popleft()
        return self._fifo[0] if self._fifo else None

    def pop(self) -> SimRequest:
        req = self.peek()
        assert req is not None
        if self._priority:
            heapq.heappop(self._heap)
        else:
            self._fifo.popleft()
        self._live -= 1
        return req

    def discard(self, req: SimRequest) -> None:
        """Forget ``req`` (already marked not waiting); its entry is dropped lazily."""
        self._live -= 1


def _blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


class Engine:
    """vLLM v1's continuous-batching scheduler over a block-counted KV cache."""

    def __init__(
        self,
        profile: Profile,
        *,
        clock: Callable[[], float],
        kv_capacity_tokens: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        policy: Policy = "fcfs",
    ) -> None:
        self.profile = profile
        self.clock = clock
        capacity = (
            profile.default_kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
        )
        self.num_blocks = capacity // BLOCK_SIZE
        self.free_blocks = self.num_blocks
        self.max_num_seqs = max_num_seqs or profile.max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens or profile.max_num_batched_tokens
        self.policy: Policy = policy
        self.running: list[SimRequest] = []
        self.waiting = _Waiting(policy)
        self.stats = EngineStats()
        self._seq = 0
        self._by_id: dict[str, SimRequest] = {}

    # -- queries ------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * BLOCK_SIZE

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Share of KV blocks in use, 0..1."""
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 0.0

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def get(self, request_id: str) -> SimRequest | None:
        return self._by_id.get(request_id)

    # -- commands -----------------------------------------------------------------------
    def add(self, req: SimRequest) -> None:
        """Queue a new request (stamped with the clock's time and an arrival number)."""
        if req.request_id in self._by_id:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.arrival_time = self.clock()
        req.seq = self._seq
        self._seq += 1
        req.status = "waiting"
        self._by_id[req.request_id] = req
        self.waiting.add(req)

    def abort(self, request_id: str) -> SimRequest | None:
        """Drop a request wherever it is and free its KV; ``None`` if unknown or done."""
        req = self._by_id.pop(request_id, None)
        if req is None:
            return None
        if req.status == "waiting":
            req.status = "aborted"
            self.waiting.discard(req)
        elif req.status == "running":
            req.status = "aborted"
            self.running.remove(req)
            self._free(req)
        req.finish_time = self.clock()
        self.stats.aborted += 1
        return req

    def schedule(self) -> Step:
        """Plan the next step (mutates queues and KV, as vLLM's ``schedule()`` does).

        The step is empty when there is nothing to run, and also (rarely) when the first
        running request that needed a block was itself the preemption victim: the caller
        should then schedule again (``step.preempted`` is non-empty in that case).
        """
        step = Step()
        budget = self.max_num_batched_tokens
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            victim: SimRequest | None = None
            while True:
                need = _blocks_for(req.num_computed + n) - req.blocks
                if need <= self.free_blocks:
                    self.free_blocks -= need
                    req.blocks += need
                    break
                victim = self._pick_victim()
                vi = running.index(victim)
                del running[vi]
                if vi < i:  # already scheduled this step: give its tokens back
                    i -= 1
                    for k, (r, m) in enumerate(step.scheduled):
                        if r is victim:
                            budget += m
                            del step.scheduled[k]
                            break
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is req:
                    break
            if victim is req:
                break
            step.scheduled.append((req, n))
            budget -= n
            i += 1

        if not step.preempted:
            while budget > 0 and len(running) < self.max_num_seqs:
                head = self.waiting.peek()
                if head is None:
                    break
                n = min(head.num_tokens - head.num_computed, budget)
                need = _blocks_for(head.num_computed + n) - head.blocks
                if need > self.free_blocks:
                    break
                self.waiting.pop()
                self.free_blocks -= need
                head.blocks += need
                head.status = "running"
                running.append(head)
                step.scheduled.append((head, n))
                budget -= n

        for req, n in step.scheduled:
            step.num_tokens += n
            if req.generated > 0 and req.num_computed == req.num_tokens - 1:
                step.num_decodes += 1
                step.decode_context_tokens += req.num_tokens
            else:
                step.num_prefill_tokens += n
        step.duration_s = self.profile.step_time_s(step.num_tokens, step.decode_context_tokens)
        return step

    def complete(self, step: Step) -> list[SimRequest]:
        """Apply a planned step; returns the requests that produced a token (in step order).

        Requests aborted while the step ran are skipped. Finished requests free their KV and
        are among the returned ones (``finished`` is true).
        """
        now = self.clock()
        self.stats.steps += 1
        self.stats.busy_s += step.duration_s
        produced: list[SimRequest] = []
        any_finished = False
        for req, n in step.scheduled:
            if req.status != "running":
                continue
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                continue  # partial prefill chunk
            req.generated += 1
            if req.first_token_time is None:
                req.first_token_time = now
                self.stats.prompt_tokens += req.prompt_tokens
            produced.append(req)
            if req.generated >= req.output_tokens:
                req.status = "finished"
                req.finish_time = now
                self._free(req)
                del self._by_id[req.request_id]
                any_finished = True
                if req.finish_reason == "stop":
                    self.stats.finished_stop += 1
                else:
                    self.stats.finished_length += 1
        self.stats.generation_tokens += len(produced)
        if any_finished:
            self.running = [r for r in self.running if r.status == "running"]
        return produced

    # -- internals ----------------------------------------------------------------------
    def _pick_victim(self) -> SimRequest:
        if self.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time, r.seq))
        return self.running[-1]

    def _preempt(self, req: SimRequest) -> None:
        self._free(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = "waiting"
        self.stats.num_preemptions += 1
        self.waiting.add(req, front=True)

    def _free(self, req: SimRequest) -> None:
        self.free_blocks += req.blocks
        req.blocks = 0

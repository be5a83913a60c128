"""Prompt-token counts of the gateway: each model's own tokenizer, off the event loop.

One question: *how many prompt tokens is this request, for the model it names?* The count
(:mod:`adapters.tokens`, the same code as the simulator engine's) drives the context-length
check, the TPM charge, the KV footprint and the estimator's features; what was charged is
reconciled with the engine's ``usage`` at completion.

Which tokenizer counts a model (:func:`tokenizer_specs`): its upstream's ``tokenizer``, the
pool's (for the served model; by default a vllm engine's model directory when it holds a
``tokenizer.json``), else ``tokens.fallback``. A tokenizer is loaded at the first request to
its model, in a thread; one that cannot be loaded is logged once and the model falls back to
the heuristic (never an error for the client).

The cost on the event loop: :func:`parse_request` has already counted the request with the
heuristic (a few µs); :meth:`PromptTokens.count` recounts it with the model's tokenizer, where
cached texts cost a dict look-up, short ones are encoded inline and the rest in
:class:`CountingThread` (the tokenizer releases the GIL there), batched when many wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

from adapters.tokenizer_file import TokenizerUnavailable, load_counter
from adapters.tokens import HEURISTIC, TokenCounter, texts_of
from proxy.config import Settings
from proxy.requests import ParsedRequest

log = logging.getLogger("driftsched.tokens")

_Job = tuple[TokenCounter, Sequence[str], "asyncio.Future[None]"]


def tokenizer_specs(settings: Settings) -> dict[str, str]:
    """Model -> configured ``tokenizer`` value (the first one configured for a model wins)."""
    out: dict[str, str] = {}
    ups = list(settings.upstreams)
    pool = settings.pool
    if pool is not None:
        spec = pool.tokenizer
        if spec is None and pool.engine == "vllm" and (Path(pool.model) / "tokenizer.json").is_file():
            spec = pool.model
        if spec is not None and pool.engine != "external":
            out.setdefault(pool.served_model_name or pool.model, spec)
        ups += pool.external
    for u in ups:
        if u.tokenizer is not None:
            for m in u.models:
                out.setdefault(m, u.tokenizer)
    return out


class PromptTokens:
    """The counters of one gateway, by model. Safe to call from one event loop at a time."""

    def __init__(self, settings: Settings) -> None:
        cfg = settings.tokens
        self._options = {"inline_chars": cfg.inline_chars, "cache_entries": cfg.cache_entries}
        self._specs = tokenizer_specs(settings)
        self._fallback = cfg.fallback
        self._counters: dict[str, TokenCounter] = {}
        self._loading: dict[str, asyncio.Future[TokenCounter]] = {}
        self.thread = CountingThread()

    async def count(self, req: ParsedRequest) -> ParsedRequest:
        """``req`` with ``prompt_tokens`` counted by its model's counter."""
        counter = self._counters.get(req.model) or await self._load(req.model)
        if not counter.exact:
            return req  # parse_request counted it with the heuristic already
        pending = counter.pending(list(texts_of(req.source)))
        if pending:
            await self.thread.fill(counter, pending)
        return dataclasses.replace(req, prompt_tokens=counter.count(req.source))

    async def counter(self, model: str) -> TokenCounter:
        """The counter of ``model`` (loaded on first use)."""
        return self._counters.get(model) or await self._load(model)

    async def _load(self, model: str) -> TokenCounter:
        spec = self._specs.get(model, self._fallback)
        fut = self._loading.get(spec)
        if fut is None:
            fut = self._loading[spec] = asyncio.ensure_future(self._load_spec(spec))
        counter = await asyncio.shield(fut)
        self._counters[model] = counter
        return counter

    async def _load_spec(self, spec: str) -> TokenCounter:
        if spec == "heuristic":
            return HEURISTIC
        loop = asyncio.get_running_loop()
        try:
            counter = await loop.run_in_executor(None, lambda: load_counter(spec, **self._options))
        except TokenizerUnavailable as e:
            log.warning("tokenizer unavailable, counting prompt tokens with the heuristic: %s", e)
            return HEURISTIC
        except Exception:
            log.warning("tokenizer %s failed to load, counting prompt tokens with the heuristic",
                        spec, exc_info=True)
            return HEURISTIC
        log.info("prompt tokens counted by %s (chat format %s)", counter.name, counter.chat)
        return counter


class CountingThread:
    """Counts texts for the event loop in one worker thread, batching what waits.

    :meth:`fill` costs the loop a queue put and, at the end, one wake-up per batch. The thread
    starts on demand and exits after ``idle_s`` without work, so nothing has to stop it.
    """

    def __init__(self, idle_s: float = 10.0) -> None:
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    def fill(self, counter: TokenCounter, texts: Sequence[str]) -> asyncio.Future[None]:
        """Count ``texts`` into ``counter``'s cache; the future is done when they are."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._jobs.put((counter, texts, fut))
        with self._lock:
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="driftsched-tokens", daemon=True).start()
        return fut

    def _run(self) -> None:
        while True:
            try:
                jobs = [self._jobs.get(timeout=self.idle_s)]
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._running = False
                        return
                continue
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._work(jobs)

    @staticmethod
    def _work(jobs: list[_Job]) -> None:
        by_counter: dict[int, tuple[TokenCounter, list[str]]] = {}
        for counter, texts, _ in jobs:
            by_counter.setdefault(id(counter), (counter, []))[1].extend(texts)
        errors: dict[int, BaseException] = {}
        for key, (counter, texts) in by_counter.items():
            try:
                counter.fill(list(dict.fromkeys(texts)))
            except Exception as e:  # handed to the waiter, which raises it
                errors[key] = e
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]] = {}
        for counter, _, fut in jobs:
            by_loop.setdefault(fut.get_loop(), []).append((fut, errors.get(id(counter))))
        for loop, done in by_loop.items():
            # a closed loop (its app stopped meanwhile) has nobody waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, done)


def _deliver(done: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for fut, error in done:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

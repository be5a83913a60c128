"""The simulator's HTTP face: vLLM's OpenAI-compatible server over a :class:`Driver`.

Routes: ``GET /health`` (200, empty), ``GET /version``, ``GET /v1/models`` (vLLM's shape, with
``max_model_len``), ``GET /metrics`` (see :mod:`adapters.sim.metrics`), and the generation
routes ``POST /v1/chat/completions`` and ``POST /v1/completions``
(:mod:`adapters.sim.generate`). The generation routes bypass Starlette's middleware so each
SSE event is one direct ASGI ``send``; everything else is an ordinary Starlette app, whose
lifespan loads the workload file and runs the step loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from adapters.sim.driver import Driver
from adapters.sim.engine import Engine, SimRequest
from adapters.sim.generate import Generation
from adapters.sim.metrics import SimMetrics
from adapters.sim.protocol import Kind, json_bytes
from adapters.sim.settings import SimSettings
from adapters.sim.workload import OutputLengths
from adapters.tokenizer_file import load_counter

log = logging.getLogger("adapters.sim")

VERSION = "0.32.0+sim"
GENERATION_PATHS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "text"}


class SimApp:
    """The ASGI app of one simulated engine. ``driver`` and ``generation`` are its state."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.driver = Driver(
            self._engine, time_scale=settings.time_scale, on_finish=self._on_finish
        )
        self.metrics = SimMetrics(self.driver, settings.names[0])
        self.generation = Generation(settings, self.driver)
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/version", self.version, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/metrics", self.metrics_route, methods=["GET"]),
                *(
                    Route(path, self.method_not_allowed, methods=["GET"])
                    for path in GENERATION_PATHS
                ),
            ],
            lifespan=self.lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = GENERATION_PATHS.get(scope["path"])
            if kind is not None:
                await self.generation(scope, receive, send, kind)
                return
        await self.app(scope, receive, send)

    def _engine(self, clock: Callable[[], float]) -> Engine:
        s = self.settings
        return Engine(
            s.profile_obj,
            clock=clock,
            kv_capacity_tokens=s.kv_tokens,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            policy=s.scheduling_policy,
        )

    def _on_finish(self, req: SimRequest) -> None:
        self.metrics.observe_finished(req)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        path = self.settings.workload
        if path is not None:
            self.generation.lengths = await asyncio.to_thread(
                OutputLengths.from_jsonl, path, seed=self.settings.seed
            )
            log.info("workload %s: %d known prompts", path, len(self.generation.lengths))
        if self.settings.tokenizer is not None:
            # a tokenizer that cannot be loaded stops the engine: it was asked for
            self.generation.counter = await asyncio.to_thread(load_counter, self.settings.tokenizer)
            log.info("prompt tokens counted by %s", self.generation.counter.name)
        task = asyncio.create_task(self.driver.run(), name="sim-step-loop")
        task.add_done_callback(_exit_if_died)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- plain routes ----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return Response(json_bytes({"version": VERSION}), media_type="application/json")

    async def models(self, request: Request) -> Response:
        s = self.settings
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": self.created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": s.model,
                "parent": None,
                "max_model_len": s.model_len,
                "permission": [permission],
            }
            for name in s.names
        ]
        return Response(json_bytes({"object": "list", "data": data}), media_type="application/json")

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def method_not_allowed(self, request: Request) -> Response:
        return Response(b'{"detail":"Method Not Allowed"}', 405, media_type="application/json")


def _exit_if_died(task: asyncio.Task[None]) -> None:
    """A dead step loop would hang every request: die loudly so the pool restarts us."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("step loop died", exc_info=task.exception())
        os._exit(70)


def create_app(settings: SimSettings) -> SimApp:
    """The ASGI app of one simulated engine (the step loop runs in its lifespan)."""
    return SimApp(settings)

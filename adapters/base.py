"""Contracts for everything that talks to an engine: value types and protocols only.

A :class:`Backend` is one OpenAI-compatible endpoint (a vLLM server the pool launched, a
simulator engine, an external endpoint, or a provider reached through LiteLLM). A
:class:`BackendPool` owns a set of backends, keeps their state current (health checks,
``/metrics`` scrapes, process supervision) and answers one question: *which backends may
take a request for this model now?*

Threading: all of this lives on the gateway's event loop; backend state is mutated only from
that loop, so no locks are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

BackendState = Literal[
    "starting",  # launched, /health not yet OK
    "healthy",  # takes traffic
    "unhealthy",  # health checks failing (not launched by us, or not yet restarted)
    "restarting",  # process exited; waiting for backoff / relaunch
    "draining",  # finishes in-flight requests, admits nothing new
    "failed",  # gave up after repeated crashes
    "stopped",
]


@dataclass(slots=True)
class EngineMetrics:
    """Last scrape of an engine's ``/metrics`` (vLLM names). Lags reality by up to a scrape."""

    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage_perc: float = 0.0
    num_preemptions_total: float = 0.0
    #: ``vllm:generation_tokens_total`` (None: not exported); the TPOT governor's signal
    generation_tokens_total: float | None = None
    scraped_at: float = 0.0


@dataclass(slots=True, eq=False)
class Backend:
    """One endpoint and its live state. Identity is ``name``."""

    name: str
    url: str
    models: tuple[str, ...]
    kind: Literal["static", "sim", "vllm", "external", "litellm"] = "static"
    api_key: str | None = None
    #: token budget for admission by predicted footprint (None = unknown)
    kv_capacity_tokens: int | None = None
    max_num_seqs: int | None = None
    #: longest prompt + output the engine accepts (vLLM's ``max_model_len``; None = unknown)
    max_model_len: int | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    max_connections: int = 512
    health_path: str = "/health"
    #: engine understands vLLM's ``priority`` request field
    supports_priority: bool = False
    #: ``kind == "litellm"``: the LiteLLM model called (``anthropic/claude-haiku-4-5``) and
    #: the extra arguments of every call (``api_key``, ``api_base``, ...; never logged)
    litellm_model: str | None = None
    litellm_params: dict[str, Any] = field(default_factory=dict)

    # -- live state (mutated on the event loop only) ------------------------------------
    state: BackendState = "starting"
    #: ``/v1/models`` was read for ``max_model_len`` (:mod:`adapters.model_len`)
    model_len_probed: bool = False
    #: requests the gateway has sent here and not yet finished (does not lag)
    in_flight: int = 0
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    last_error: str | None = None
    restarts: int = 0
    pid: int | None = None
    log_path: str | None = None

    @property
    def routable(self) -> bool:
        return self.state == "healthy"

    def serves(self, model: str) -> bool:
        return model in self.models

    def free_seqs(self) -> float:
        if self.max_num_seqs is None:
            return float("inf")
        return self.max_num_seqs - self.in_flight


class BackendPool(Protocol):
    """Owns backends and their state; says which may take a request now."""

    async def start(self) -> None:
        """Launch or connect every backend; returns once the pool is running.

        Does not wait for every engine to be healthy; ``/readyz`` reports that.
        """

    async def stop(self) -> None:
        """Stop supervision, and every process the pool launched (SIGTERM, then SIGKILL)."""

    def backends(self) -> list[Backend]:
        """Every backend, in a stable order (configuration order)."""

    def models(self) -> list[str]:
        """Every model served by at least one backend that is not failed or stopped."""

    def candidates(self, model: str) -> list[Backend]:
        """Routable backends serving ``model`` (empty: none may take it now)."""


class Router(Protocol):
    """Which backend should take this request? One question, no side effects."""

    def pick(self, candidates: list[Backend], footprint_tokens: int) -> Backend | None:
        """The best of ``candidates`` for a request holding ``footprint_tokens``.

        ``None`` when ``candidates`` is empty. Ties break on configuration order.
        """

"""Configuration of everything engine-side: static upstreams and the engine pool.

Pydantic models, strict (unknown keys are errors that name the key). They live here, beside
the code that reads them, so that ``adapters/`` depends on nothing in ``proxy/``; the
gateway's :class:`proxy.config.Settings` composes them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    """A static backend the gateway does not launch.

    ``provider: openai`` (default): an OpenAI-compatible server at ``url``.
    ``provider: litellm``: a provider that does not speak OpenAI (Anthropic, Bedrock,
    Vertex, ...) called through LiteLLM (see docs/engines.md); ``litellm_model`` is required,
    ``url`` is only a label (default ``litellm://<name>``) and ``api_key``, when set, is the
    provider key unless ``litellm_params`` has one.
    """

    name: str
    #: how requests reach the backend (declared before ``url``, whose check depends on it)
    provider: Literal["openai", "litellm"] = "openai"
    url: str = Field("", validate_default=True)
    models: list[str] = Field(min_length=1)
    api_key: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    #: max seconds between bytes from the upstream (also caps a non-streamed response)
    read_timeout_s: float = Field(600.0, gt=0)
    max_connections: int = Field(512, ge=1)
    #: token budget for admission by footprint (None: unknown, count requests only)
    kv_capacity_tokens: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    #: the engine's context length (null: read from its ``/v1/models``, as vLLM reports it)
    max_model_len: int | None = Field(None, ge=1)
    health_path: str = "/health"
    #: the engine runs vLLM with ``--scheduling-policy priority``: the gateway adds the
    #: ``priority`` field (the tenant's class level) to requests that do not carry one
    supports_priority: bool = False
    #: how the gateway counts prompt tokens of ``models`` (adapters/tokenizer_file.py): a
    #: ``tokenizer.json`` (or a directory with one), or ``tiktoken:cl100k_base``; null:
    #: ``tokens.fallback``
    tokenizer: str | None = Field(None, min_length=1)
    #: provider litellm: the model LiteLLM calls, e.g. ``anthropic/claude-haiku-4-5``
    litellm_model: str | None = Field(None, min_length=1)
    #: provider litellm: extra arguments of every LiteLLM call (``api_key``, ``api_base``,
    #: ``aws_region_name``, ``vertex_project``, ``drop_params``, ...)
    litellm_params: dict[str, Any] = Field(default_factory=dict, repr=False)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("provider") == "litellm":
            return v.rstrip("/") or f"litellm://{info.data.get('name', '')}"
        if not v:
            raise ValueError("required (provider openai)")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _provider(self) -> UpstreamConfig:
        if self.provider == "litellm" and self.litellm_model is None:
            raise ValueError("litellm_model: required when provider is litellm")
        if self.provider != "litellm" and (self.litellm_model or self.litellm_params):
            raise ValueError("litellm_model, litellm_params: only for provider litellm")
        return self


class RestartConfig(_Strict):
    max_restarts: int = Field(5, ge=0)
    #: crashes counted within this window; a longer healthy run resets the count
    window_s: float = Field(300.0, gt=0)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)


class SimEngineConfig(_Strict):
    """Arguments for ``engine: sim`` (see docs/engines.md)."""

    profile: str = "llama3-8b-a100"
    #: JSON file with more profiles (``--profile-file``), e.g. from bench/sim_fidelity.py
    profile_file: str | None = None
    workload: str | None = None
    time_scale: float = Field(1.0, gt=0)
    kv_capacity_tokens: int | None = Field(None, ge=16)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    tokens_per_event: int = Field(1, ge=1)
    seed: int = 0


class PoolConfig(_Strict):
    engine: Literal["sim", "vllm", "external"] = "sim"
    model: str = "sim-llama3-8b"
    #: name the model is served under (``--served-model-name``); defaults to ``model``
    served_model_name: str | None = None
    instances: int = Field(1, ge=0)
    gpus_per_instance: int = Field(0, ge=0)
    host: str = "127.0.0.1"
    #: first port; instance i listens on base_port + i (0 = pick free ports)
    base_port: int = Field(0, ge=0, le=65535)
    #: extra command-line arguments for every engine
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    log_dir: str = "logs/engines"
    startup_timeout_s: float = Field(600.0, gt=0)
    health_interval_s: float = Field(1.0, gt=0)
    scrape_interval_s: float = Field(1.0, gt=0)
    stop_grace_s: float = Field(10.0, gt=0)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    sim: SimEngineConfig = Field(default_factory=SimEngineConfig)
    #: python interpreter for vllm engines (a separate venv); default: this interpreter
    python: str | None = None
    kv_capacity_tokens: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    #: the served model's tokenizer (a ``tokenizer.json``, a directory with one, or
    #: ``tiktoken:cl100k_base``): the gateway counts prompt tokens with it, and a sim engine
    #: too (``--tokenizer``); null: a vllm engine's ``model`` directory when it holds a
    #: ``tokenizer.json``, else ``tokens.fallback``
    tokenizer: str | None = Field(None, min_length=1)
    #: engines the gateway does not launch (``engine: external`` or in addition)
    external: list[UpstreamConfig] = Field(default_factory=list)

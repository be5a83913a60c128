"""Configuration: one YAML file plus environment overrides, validated at start-up.

Precedence (highest first): environment variables, the YAML file, defaults.

* ``DRIFTSCHED_CONFIG`` names the YAML file (the CLI's ``--config`` wins over it).
* ``DRIFTSCHED_<SECTION>__<KEY>[__<KEY>...]`` overrides one value; the value is parsed as a
  YAML scalar, so ``DRIFTSCHED_SERVER__PORT=9000`` is an int and
  ``DRIFTSCHED_STORE__TYPE=redis`` a string. ``DRIFTSCHED_ADMIN_KEY`` is a shortcut for
  ``DRIFTSCHED_ADMIN__API_KEY``.

Unknown keys are errors that name the key (``tenants[1].rpmm: extra inputs are not
permitted``), never silently ignored. The engine-side sections (``upstreams``, ``pool``) are
defined in :mod:`adapters.config`, beside the code that reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from adapters.config import PoolConfig, UpstreamConfig, _Strict
from adapters.errors import ConfigError

ENV_PREFIX = "DRIFTSCHED_"


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: one JSON log line per request (at INFO)
    access_log: bool = True
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    #: seconds a key -> tenant lookup is cached in-process (revocations take this long)
    auth_cache_ttl_s: float = Field(5.0, ge=0)


class AdminConfig(_Strict):
    #: bearer token for /admin; admin API disabled (403) when unset
    api_key: str | None = None


class StoreConfig(_Strict):
    type: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "driftsched"
    #: an engine hold (a request's admission slot) not renewed for this long is reclaimed
    #: (crashed replica)
    lease_ttl_s: float = Field(30.0, gt=0)
    #: when the store is unreachable: admit without limits (true) or fail with 503 (false)
    fail_open: bool = False


class ClassConfig(_Strict):
    """A QoS class: its scheduling level (lower = more important) and default SLOs."""

    level: int = 1
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


def default_classes() -> dict[str, ClassConfig]:
    return {
        "premium": ClassConfig(level=0, ttft_slo_ms=1000, tpot_slo_ms=100),
        "standard": ClassConfig(level=1, ttft_slo_ms=3000, tpot_slo_ms=200),
        "batch": ClassConfig(level=2, ttft_slo_ms=None, tpot_slo_ms=None),
    }


class TenantFields(_Strict):
    """A tenant's settings, as the YAML file and the admin API take them."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    qos_class: str = "standard"
    weight: float = Field(1.0, gt=0)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    daily_token_quota: int | None = Field(None, ge=1)
    ttft_slo_ms: float | None = Field(None, gt=0)
    tpot_slo_ms: float | None = Field(None, gt=0)
    queue_timeout_s: float = Field(30.0, ge=0)
    #: empty = every model served by the backends
    allowed_models: list[str] = Field(default_factory=list)


class TenantConfig(TenantFields):
    #: plaintext keys to seed (hashed on load; never stored in clear). Prefer the admin API.
    api_keys: list[str] = Field(default_factory=list)


class PolicyConfig(_Strict):
    type: str = "fcfs"
    parameters: dict[str, Any] = Field(default_factory=dict)


class EstimatorConfig(_Strict):
    """The output-token estimator (docs/estimator.md)."""

    #: where the model is saved and restored from (None: start cold, never save)
    path: str | None = None
    #: saving pauses the event loop ~0.1-0.5 s (pickling holds the GIL): keep it rare
    save_interval_s: float = Field(300.0, gt=0)
    prior_tokens: float = Field(256.0, gt=0)
    quantile: float = Field(0.9, ge=0.5, lt=1.0)


class GovernorConfig(_Strict):
    """The TPOT governor (policies/governor.py): per-engine caps on admitted sequences."""

    #: None: on with the ``driftsched`` policy, off with the others
    enabled: bool | None = None
    headroom: float = Field(0.8, gt=0)
    low: float = Field(0.85, gt=0, le=1)
    interval_s: float = Field(2.0, gt=0)
    smoothing: float = Field(0.25, gt=0, le=1)
    beta: float = Field(0.9, gt=0, lt=1)
    increase: int = Field(0, ge=0)
    min_seqs: int = Field(8, ge=1)
    initial_fraction: float = Field(0.25, gt=0, le=1)
    #: class levels <= this may pass the cap, up to max_num_seqs (-1: none)
    exempt_level: int = Field(0, ge=-1)
    min_headroom: float = Field(0.5, gt=0)
    outer_interval_s: float = Field(10.0, gt=0)
    outer_window_s: float = Field(30.0, gt=0)


class SchedulerConfig(_Strict):
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    #: per-engine sequence caps that keep the engines' time per output token under the
    #: tightest TPOT SLO (x headroom)
    governor: GovernorConfig = Field(default_factory=GovernorConfig)
    #: rolling window of the per-class SLO attainment the drift controller is fed
    slo_window_s: float = Field(10.0, gt=0)
    #: requests a class needs in the window before its attainment counts
    slo_min_samples: int = Field(20, ge=1)
    #: misses in the window below which a class is not under pressure, whatever its share
    slo_min_misses: int = Field(3, ge=1)
    #: share of an engine's KV capacity that admission may fill with predicted footprints
    kv_budget_fraction: float = Field(0.9, gt=0, le=4)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    #: forward vLLM's ``priority`` field (the class level) to engines that support it
    pass_priority: bool = True
    #: requests waiting in the admission queue, all tenants and replicas (null: no cap);
    #: over it a request gets 429 ``queue_full`` with a retry-after from the drain rate
    max_queued: int | None = Field(50_000, ge=1)
    #: requests one tenant may have waiting (null: no cap)
    max_queued_per_tenant: int | None = Field(5_000, ge=1)


class Settings(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    classes: dict[str, ClassConfig] = Field(default_factory=default_classes)
    tenants: list[TenantConfig] = Field(default_factory=list)
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    pool: PoolConfig | None = None
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        names = [t.name for t in self.tenants]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tenants: duplicate name(s) {sorted(dup)}")
        for i, t in enumerate(self.tenants):
            if t.qos_class not in self.classes:
                raise ValueError(
                    f"tenants[{i}].qos_class: unknown class {t.qos_class!r}; "
                    f"known: {sorted(self.classes)}"
                )
        up = [u.name for u in self.upstreams]
        if len(set(up)) != len(up):
            raise ValueError("upstreams: duplicate names")
        return self


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        lines.append(f"{loc or '<root>'}: {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sections = set(Settings.model_fields)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        if name == ENV_PREFIX + "ADMIN_KEY":
            out.setdefault("admin", {})["api_key"] = raw
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(path) < 2 or path[0] not in sections:
            raise ConfigError(
                f"environment variable {name}: unknown setting; expected "
                f"{ENV_PREFIX}<SECTION>__<KEY> with SECTION in {sorted(sections)}"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: conflicts with another override")
        node[path[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _deep_merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read YAML (``path`` or ``$DRIFTSCHED_CONFIG``), apply env and explicit overrides."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded or {}
    data = _deep_merge(data, _env_overrides(environ))
    if overrides:
        data = _deep_merge(data, overrides)
    return settings_from_dict(data)


def settings_from_dict(data: Mapping[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None

"""Configuration: one YAML file plus environment overrides, validated at start-up.

Precedence (highest first): environment variables, the YAML file, defaults.

* ``DRIFTSCHED_CONFIG`` names the YAML file (the CLI's ``--config`` wins over it).
* ``DRIFTSCHED_<SECTION>__<KEY>[__<KEY>...]`` overrides one value. The value is read as the
  type of the setting it names (:func:`env_overrides`): a string setting takes the text as
  it is (``DRIFTSCHED_ADMIN__API_KEY=null`` is the four-letter key ``null``, never "unset"),
  numbers and booleans are parsed and validated, ``null`` unsets only an optional setting
  that is not a string (``DRIFTSCHED_SCHEDULER__MAX_QUEUED=null``), and lists or mappings
  are JSON. ``DRIFTSCHED_ADMIN_KEY`` is a shortcut for ``DRIFTSCHED_ADMIN__API_KEY``.
* **Which variables are settings**: those two, and every ``DRIFTSCHED_*`` name holding
  ``__``. Any other ``DRIFTSCHED_*`` variable (``DRIFTSCHED_URL`` of the CLI,
  ``DRIFTSCHED_SHARED_DATA`` of the experiments, ...) is not the gateway's and is ignored,
  except a name that starts with a section and one ``_`` (``DRIFTSCHED_SERVER_PORT``), an
  error that says to write ``__``.

Unknown keys are errors that name the key (``tenants[1].rpmm: extra inputs are not
permitted``), never silently ignored. Numbers are finite and bounded (``Infinity`` is an
error). Keys (the admin key, tenants' seeded keys) are :class:`~pydantic.SecretStr`: their
``repr`` never shows them, and :func:`redacted` is what may be printed. The engine-side
sections (``upstreams``, ``pool``) are defined in :mod:`adapters.config`, beside the code
that reads them.
"""

from __future__ import annotations

import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    ValidationError,
    model_validator,
)

from adapters.config import PoolConfig, UpstreamConfig
from adapters.config import _Strict as _EngineStrict
from adapters.errors import ConfigError
from proxy.redisurl import is_sentinel_url, parse_sentinel_url

ENV_PREFIX = "DRIFTSCHED_"
REDACTED = "<redacted>"


class _Strict(_EngineStrict):
    """Unknown keys are errors; numbers are finite (``.inf`` / ``Infinity`` refused)."""

    model_config = ConfigDict(allow_inf_nan=False)


def _non_empty(v: SecretStr) -> SecretStr:
    if not v.get_secret_value():
        raise ValueError("an empty key is not allowed (leave the setting out instead)")
    return v


def _dump_secret(v: SecretStr, info: SerializationInfo) -> str:
    if info.context and info.context.get("redact"):
        return REDACTED
    return v.get_secret_value()


#: a key in configuration. ``repr`` / ``str`` show ``**********``; a JSON dump gives the key
#: (settings round-trip), unless dumped with ``context={"redact": True}`` (:func:`redacted`)
Secret = Annotated[SecretStr, AfterValidator(_non_empty),
                   PlainSerializer(_dump_secret, return_type=str, when_used="json")]

# Bounds of a tenant's numbers (YAML and admin API alike): finite, positive, and small
# enough that the stores' token arithmetic stays exact (integers below 2**53).
Weight = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
Rpm = Annotated[int, Field(ge=1, le=10**9)]
Tpm = Annotated[int, Field(ge=1, le=10**12)]
Concurrency = Annotated[int, Field(ge=1, le=10**6)]
DailyQuota = Annotated[int, Field(ge=1, le=10**15)]
#: an SLO in milliseconds: at most a day
SloMs = Annotated[float, Field(gt=0, le=86_400_000, allow_inf_nan=False)]
#: seconds a request may wait in the queue: at most a day
QueueTimeout = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: one JSON log line per request (at INFO)
    access_log: bool = True
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    #: seconds a key -> tenant lookup is cached in-process (revocations take this long)
    auth_cache_ttl_s: float = Field(5.0, ge=0)
    # Timeouts and limits (proxy/server.py, docs/reliability.md). Each one ends a request
    # that would otherwise hold a connection, and maybe an engine hold, for ever.
    #: seconds from a connection's opening (or a new request's first byte on a kept-alive
    #: connection) to the end of the request headers; then 408 and the connection closed
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    #: seconds from the end of the headers to the end of the body; then 408 and closed
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    #: seconds a /v1 request may run in all (queue, engine, stream); then 504
    #: ``deadline_exceeded`` (an SSE error event mid-stream) and its hold released. null: none
    max_request_duration_s: float | None = Field(900.0, gt=0, le=86_400)
    #: seconds the client may leave the response unread (the server's write buffer full)
    #: before its connection is aborted and its request's engine hold released
    send_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: open client connections; a request beyond them gets 503 ``server_overloaded``
    #: (``retry-after: 1``, connection closed). null: no limit
    max_connections: int | None = Field(4096, ge=1, le=1_000_000)
    #: seconds an idle kept-alive connection stays open
    keep_alive_timeout_s: int = Field(5, ge=1, le=3600)


class AdminConfig(_Strict):
    #: bearer token for /admin; admin API disabled (403) when unset (an empty key is an
    #: error, not "unset")
    api_key: Secret | None = None
    #: serve /admin/docs and /admin/openapi.json without the admin key
    public_docs: bool = False


def _redis_url(v: str) -> str:
    """A URL redis-py (``redis://``, ``rediss://``, ``unix://``) or :mod:`proxy.redisurl`
    (``redis+sentinel://``, ``rediss+sentinel://``) can connect to."""
    if is_sentinel_url(v):
        parse_sentinel_url(v)  # raises ValueError naming the problem
        return v
    scheme = v.split("://", 1)[0].lower() if "://" in v else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss://, unix://, redis+sentinel:// or "
                         f"rediss+sentinel:// URL, got scheme {scheme!r}")
    return v


class StoreConfig(_Strict):
    type: Literal["memory", "redis"] = "memory"
    #: ``redis://``/``rediss://``/``unix://``, or ``redis+sentinel://h:p[,h:p]/service[/db]``
    #: to follow the primary a Sentinel names (failover; :mod:`proxy.redisurl`)
    url: Annotated[str, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    prefix: str = "driftsched"
    #: an engine hold (a request's admission slot) not renewed for this long is reclaimed
    #: (crashed replica)
    lease_ttl_s: float = Field(30.0, gt=0)
    #: a replica that has not beaten its heartbeat (every replica_ttl_s / 5) for this long is
    #: declared dead by another replica's next dispatch: its queued requests are dropped and
    #: its holds freed at once, not after their leases (a dispatching replica is never dead)
    replica_ttl_s: float = Field(1.5, gt=0)
    #: how often each replica checks that the store still holds the configured tenants and
    #: keys (its seed marker), re-seeding them when it lost them (a Redis without persistence)
    seed_check_s: float = Field(2.0, gt=0)
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
    qos_class: str = Field("standard", max_length=64)
    weight: Weight = 1.0
    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_concurrency: Concurrency | None = None
    daily_token_quota: DailyQuota | None = None
    ttft_slo_ms: SloMs | None = None
    tpot_slo_ms: SloMs | None = None
    queue_timeout_s: QueueTimeout = 30.0
    #: empty = every model served by the backends
    allowed_models: list[ModelName] = Field(default_factory=list, max_length=1000)


class TenantConfig(TenantFields):
    #: plaintext keys to seed (hashed on load; never stored in clear). Prefer the admin API.
    api_keys: list[Secret] = Field(default_factory=list)


class PolicyConfig(_Strict):
    type: str = "fcfs"
    parameters: dict[str, Any] = Field(default_factory=dict)


class EstimatorConfig(_Strict):
    """The output-token estimator (docs/estimator.md)."""

    #: ``river`` (the estimator); ``oracle`` and ``tenant-mean`` are ablations for
    #: experiments (policies/estimator_variants.py): ``oracle`` trusts the client's
    #: ``x-oracle-output-tokens`` header, so never configure it in service
    kind: Literal["river", "oracle", "tenant-mean"] = "river"
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


class TokensConfig(_Strict):
    """How prompt tokens are counted (docs/configuration.md, "Token counts")."""

    #: models without a ``tokenizer``: ``heuristic`` (chars / 4, CJK-aware), or a tokenizer
    #: value (``tiktoken:cl100k_base``, a ``tokenizer.json``) used for every such model
    fallback: str = Field("heuristic", min_length=1)
    #: texts up to this many characters are counted on the event loop, longer ones in a
    #: worker thread (both cached)
    inline_chars: int = Field(256, ge=0)
    #: texts whose counts are remembered per model
    cache_entries: int = Field(16_384, ge=0)


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
    tokens: TokensConfig = Field(default_factory=TokensConfig)

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


def _bare(ann: Any) -> Any:
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    return ann


def _optional(ann: Any) -> tuple[list[Any], bool]:
    """The alternatives of a type (``Annotated`` stripped), and whether ``None`` is one."""
    ann = _bare(ann)
    if get_origin(ann) in (Union, types.UnionType):
        args = [_bare(a) for a in get_args(ann)]
        return [a for a in args if a is not type(None)], type(None) in args
    return [ann], False


def _setting_type(path: list[str]) -> Any:
    """The annotation of the setting at ``path`` (``None``: no such setting)."""
    ann: Any = Settings
    for part in path:
        alts, _ = _optional(ann)
        node = alts[0] if len(alts) == 1 else None
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part)
            if field is None:
                return None
            ann = field.annotation
        elif get_origin(node) is dict:
            ann = get_args(node)[1]
        else:
            return None
    return ann


def _is_text(t: Any) -> bool:
    if get_origin(t) is Literal:
        return all(isinstance(v, str) for v in get_args(t))
    return t in (str, SecretStr)


def _env_value(name: str, raw: str, ann: Any) -> Any:
    """``raw`` as the type of its setting (module doc)."""
    if ann is None:
        return raw  # not a setting: validation names the unknown key
    alts, nullable = _optional(ann)
    if any(_is_text(a) for a in alts):
        return raw
    if any(get_origin(a) in (list, dict) or (isinstance(a, type) and issubclass(a, BaseModel))
           for a in alts):
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"environment variable {name}: not valid JSON: {e}") from None
    if nullable and raw.strip().lower() in ("null", "none", "~"):
        return None
    return raw.strip()  # pydantic parses it (9000 -> int, false -> bool) and checks bounds


_SECTION_TYPO = re.compile(r"^([A-Za-z]+)_")
#: ``litellm_params`` entries that hold credentials
_SECRET_PARAM = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings named by ``DRIFTSCHED_*`` variables, as nested data (module doc)."""
    out: dict[str, Any] = {}
    sections = set(Settings.model_fields)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):]
        if name == ENV_PREFIX + "ADMIN_KEY":
            path = ["admin", "api_key"]
        elif "__" in rest:
            path = [p.lower() for p in rest.split("__")]
            if path[0] not in sections or not all(path):
                raise ConfigError(
                    f"environment variable {name}: unknown setting; expected "
                    f"{ENV_PREFIX}<SECTION>__<KEY> with SECTION in {sorted(sections)}"
                )
        elif rest.lower() in sections:
            raise ConfigError(
                f"environment variable {name}: a whole section cannot be set; set its keys "
                f"({ENV_PREFIX}{rest}__<KEY>) or use the YAML file"
            )
        else:
            m = _SECTION_TYPO.match(rest)
            if m and m.group(1).lower() in sections:
                raise ConfigError(
                    f"environment variable {name}: settings are {ENV_PREFIX}<SECTION>__<KEY>, "
                    f"with two underscores after the section (did you mean "
                    f"{ENV_PREFIX}{m.group(1)}__{rest[len(m.group(0)):]}?)"
                )
            continue  # not a gateway setting (DRIFTSCHED_URL, DRIFTSCHED_SHARED_DATA, ...)
        value = _env_value(name, raw, _setting_type(path))
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
    data = _deep_merge(data, env_overrides(environ))
    if overrides:
        data = _deep_merge(data, overrides)
    return settings_from_dict(data)


def settings_from_dict(data: Mapping[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def redacted(settings: Settings) -> dict[str, Any]:
    """``settings`` as JSON data with every secret replaced by ``<redacted>``: the admin key,
    tenants' keys, upstreams' ``api_key`` and those of their ``litellm_params`` that are
    named like credentials (``api_key``, ``aws_secret_access_key``, ...). What
    ``driftsched check-config`` prints."""
    data: dict[str, Any] = settings.model_dump(mode="json", context={"redact": True})
    ups = list(data.get("upstreams") or [])
    if data.get("pool"):
        ups += data["pool"].get("external") or []
    for u in ups:
        if u.get("api_key") is not None:
            u["api_key"] = REDACTED
        for k in u.get("litellm_params") or {}:
            if _SECRET_PARAM.search(k):
                u["litellm_params"][k] = REDACTED
    return data


def secret_values(settings: Settings) -> list[str]:
    """Every secret value in ``settings`` (what the log formatter scrubs from each line)."""
    out: list[str] = []
    if settings.admin.api_key is not None:
        out.append(settings.admin.api_key.get_secret_value())
    for t in settings.tenants:
        out += [k.get_secret_value() for k in t.api_keys]
    ups = [*settings.upstreams, *(settings.pool.external if settings.pool else [])]
    for u in ups:
        if u.api_key:
            out.append(u.api_key)
        out += [v for k, v in u.litellm_params.items()
                if isinstance(v, str) and _SECRET_PARAM.search(k)]
    return out

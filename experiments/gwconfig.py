"""The gateway configuration of one experiment run, written from the workload's header.

One run = one policy on one workload: :func:`gateway_config` returns the YAML-able mapping
that ``python -m proxy.cli serve -c FILE`` reads (reference: ``docs/configuration.md``).
Every policy of an experiment gets the same mapping except ``scheduler.policy``, the
policy's gateway features (:data:`SCHEDULER_FEATURES`) and the per-run paths (port, engine
logs), so the comparison is policy against policy; the engines' flags are the same for all.
``policy`` is a variant's name (:mod:`experiments.variants`): its base policy's mapping with
the variant's settings applied on top.

- **tenants**: the header's ``tenants`` (name, class, weight), no RPM/TPM/quota limits (the
  load must reach the scheduler), no ``max_concurrency`` (the drift controller starts from
  its ``unlimited_as``), the default ``queue_timeout_s`` (30 s), one fresh random key each;
- **classes**: the gateway's defaults (premium 1000/100 ms TTFT/TPOT, standard 3000/200 ms,
  batch no SLO); a workload class not among them gets level 1 and no SLO;
- **pool**: ``engine: sim`` with the workload file (the simulator generates each prompt's
  true length), the profile, ``time_scale``, ``tokens_per_event``, and ``max_num_seqs``
  stated explicitly (the simulator's default, 256) so that admission knows the engines'
  sequence slots -- the pool does not learn them from the simulator;
- **time scale** ``X != 1``: the simulator runs X times faster than wall time and the load
  generator sends X times faster, but the gateway's clocks (SLOs used for ordering, queue
  timeouts, the policies' time constants) run on wall time: every time-valued setting is
  divided by X here (:data:`TIME_PARAMS`), so a run at X behaves like one at 1, X times
  faster (up to the gateway's own, unscaled, overhead). Reports are in simulated seconds.

The estimator starts cold (no ``scheduler.estimator.path``) unless the runner is given a
saved one (``--estimator``; each policy then starts from its own copy).

- **baseline parameters** (:data:`BASELINE_PARAMETERS`): ``priority`` runs with
  ``driftsched``'s ``aging_s`` (60 s; the policy's own default, 5 s, lets queued lower
  classes overtake premium under sustained overload, as ``policies/driftsched.py``
  explains), so that both class-aware policies are tuned alike; every other parameter is
  the policy's default.

The variant's settings are applied after scaling (they hold no time values), then
``overrides`` (``--set [name:]dotted.key=value``, ``name`` a variant's name) last.
"""

from __future__ import annotations

import copy
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from experiments.variants import resolve
from policies.drift import DriftParams
from policies.driftsched import DriftschedParams
from policies.priority import PriorityParams

MODEL = "sim-llama3-8b"
DEFAULT_CLASSES: dict[str, dict[str, Any]] = {
    "premium": {"level": 0, "ttft_slo_ms": 1000, "tpot_slo_ms": 100},
    "standard": {"level": 1, "ttft_slo_ms": 3000, "tpot_slo_ms": 200},
    "batch": {"level": 2},
}
QUEUE_TIMEOUT_S = 30.0
#: the drift controller's base limit for tenants without max_concurrency
UNLIMITED_AS = DriftParams().unlimited_as
#: time-valued policy parameters (seconds, or seconds per unit) scaled by 1 / time_scale
TIME_PARAMS: dict[str, tuple[str, ...]] = {
    "priority": ("aging_s",),
    "driftsched": (
        "aging_s",
        "prefill_s_per_token",
        "decode_s_per_token",
        "max_slack_s",
        "debt_s_per_ktoken",
        "max_debt_s",
        "drift.attainment_hold_s",
        "drift.warmup_s",
        "drift.cooldown_s",
    ),
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "priority": {f.name: f.default for f in fields(PriorityParams)},
    "driftsched": {
        **{f.name: f.default for f in fields(DriftschedParams)},
        **{f"drift.{f.name}": f.default for f in fields(DriftParams)},
    },
}
#: policy parameters the experiments set beyond the policy's defaults (module doc)
BASELINE_PARAMETERS: dict[str, dict[str, Any]] = {
    "priority": {"aging_s": DriftschedParams().aging_s},
}
#: gateway features beyond the queue order, per policy. The class-aware policies forward the
#: class level as vLLM's ``priority`` (the engines' own waiting queues then order by class
#: too); only ``driftsched`` runs the TPOT governor (SLO-aware batch caps; the variant
#: ``priority+governor`` gives it to ``priority``). The baselines keep plain admission,
#: which fills each engine's batch: the work-conserving reference the throughput target
#: compares against.
SCHEDULER_FEATURES: dict[str, dict[str, Any]] = {
    "fcfs": {"pass_priority": False, "governor": {"enabled": False}},
    "fair": {"pass_priority": False, "governor": {"enabled": False}},
    "priority": {"pass_priority": True, "governor": {"enabled": False}},
    "driftsched": {"pass_priority": True, "governor": {"enabled": True}},
}
_KEY_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """The simulated pool every policy runs against."""

    instances: int = 2
    profile: str = "llama3-8b-a100"
    time_scale: float = 1.0
    tokens_per_event: int = 8
    max_num_seqs: int = 256
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Override:
    """``--set [policy:]dotted.key=value``: ``policy`` None applies to every policy."""

    path: tuple[str, ...]
    value: Any
    policy: str | None = None

    @classmethod
    def parse(cls, text: str) -> Override:
        spec, sep, raw = text.partition("=")
        if not sep or not spec.strip():
            raise ValueError(f"--set {text!r}: use [policy:]dotted.key=value")
        policy, colon, dotted = spec.strip().rpartition(":")
        path = tuple(p for p in dotted.split(".") if p)
        if not path:
            raise ValueError(f"--set {text!r}: empty key")
        return cls(path, yaml.safe_load(raw) if raw else "", policy if colon else None)

    def render(self) -> str:
        where = f"{self.policy}:" if self.policy else ""
        return f"{where}{'.'.join(self.path)}={yaml.safe_dump(self.value).strip()}"


@dataclass(slots=True)
class Tenants:
    """Tenant names, classes and weights from the workload header, with their run keys."""

    classes: dict[str, str]
    weights: dict[str, float]
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_header(cls, header: Mapping[str, Any], seen: Mapping[str, str]) -> Tenants:
        """``seen``: tenant -> class of the requests (used when the header lists none)."""
        classes, weights = dict(seen), {t: 1.0 for t in seen}
        for t in header.get("tenants") or []:
            classes[t["name"]] = str(t.get("qos_class") or seen.get(t["name"], "standard"))
            weights[t["name"]] = float(t.get("weight") or 1.0)
        keys = {name: new_key() for name in classes}
        return cls(classes, weights, keys)


def new_key() -> str:
    """A throwaway tenant key in the gateway's format (``dsk-<8 id>-<secret>``)."""
    ident = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(8))
    return f"dsk-{ident}-{secrets.token_urlsafe(32)[:43]}"


def class_table(used: Sequence[str], time_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """Class definitions for the classes in ``used`` (defaults; unknown: level 1, no SLO),
    SLOs divided by ``time_scale`` (the gateway measures wall time)."""
    out = {}
    for name in sorted(set(used) | set(DEFAULT_CLASSES)):
        c = dict(DEFAULT_CLASSES.get(name, {"level": 1}))
        for k in ("ttft_slo_ms", "tpot_slo_ms"):
            if k in c:
                c[k] = c[k] / time_scale
        out[name] = c
    return out


def scaled_parameters(policy: str, params: Mapping[str, Any], time_scale: float) -> dict[str, Any]:
    """``params`` with every time-valued parameter of ``policy`` (defaults included)
    divided by ``time_scale``; unchanged at 1 or for a policy without time parameters."""
    out = copy.deepcopy(dict(params))
    if time_scale == 1.0:
        return out
    for dotted in TIME_PARAMS.get(policy, ()):
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        value = node.get(leaf, _DEFAULTS[policy][dotted])
        node[leaf] = float(value) / time_scale
    return out


def set_path(cfg: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = cfg
    for p in path[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {'.'.join(path)}: {p} is not a mapping")
        node = nxt
    node[path[-1]] = value


def gateway_config(
    *,
    policy: str,
    tenants: Tenants,
    workload_path: str,
    port: int,
    admin_key: str,
    log_dir: str,
    pool: PoolOptions,
    overrides: Sequence[Override] = (),
) -> dict[str, Any]:
    """The full gateway configuration of the run of ``policy``, a variant's name (module
    doc); ``ValueError`` for an unknown name."""
    variant = resolve(policy)
    base = variant.policy
    x = pool.time_scale
    cfg: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "log_level": "info",
            "access_log": True,
            "auth_cache_ttl_s": 60,
        },
        "admin": {"api_key": admin_key},
        "store": {"type": "memory"},
        "classes": class_table(list(tenants.classes.values()), x),
        "tenants": [
            {
                "name": name,
                "qos_class": cls,
                "weight": tenants.weights[name],
                "queue_timeout_s": QUEUE_TIMEOUT_S / x,
                "api_keys": [tenants.keys[name]],
            }
            for name, cls in sorted(tenants.classes.items())
        ],
        "pool": {
            "engine": "sim",
            "model": MODEL,
            "instances": pool.instances,
            "log_dir": log_dir,
            "health_interval_s": 1.0,
            "scrape_interval_s": 1.0,
            "stop_grace_s": 5.0,
            "sim": {
                "profile": pool.profile,
                "workload": workload_path,
                "time_scale": x,
                "tokens_per_event": pool.tokens_per_event,
                "max_num_seqs": pool.max_num_seqs,
                "seed": pool.seed,
                # vLLM's --scheduling-policy priority: an engine orders its own waiting
                # requests by the ``priority`` field, for the policies that send one
                "scheduling_policy": "priority",
            },
        },
        "scheduler": {
            "policy": {
                "type": base,
                "parameters": scaled_parameters(base, BASELINE_PARAMETERS.get(base, {}), x),
            },
            **copy.deepcopy(SCHEDULER_FEATURES.get(base, {})),
            "slo_window_s": 10.0 / x,
        },
    }
    for dotted, value in variant.settings:
        set_path(cfg, dotted.split("."), copy.deepcopy(value))
    for o in overrides:
        if o.policy in (None, policy):
            set_path(cfg, o.path, copy.deepcopy(o.value))
    return cfg


def redacted(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` without secrets (tenant keys, the admin key), for the report."""
    out = copy.deepcopy(dict(cfg))
    if out.get("admin", {}).get("api_key"):
        out["admin"]["api_key"] = "<redacted>"
    for t in out.get("tenants", []):
        if t.get("api_keys"):
            t["api_keys"] = ["<redacted>"] * len(t["api_keys"])
    return out


def slo_table(cfg: Mapping[str, Any], time_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """tenant -> {qos_class, level, ttft_slo_s, tpot_slo_s} in simulated seconds (tenant
    overrides win over class defaults); None: no SLO."""
    classes = cfg["classes"]
    out = {}
    for t in cfg["tenants"]:
        c = classes[t["qos_class"]]
        row: dict[str, Any] = {"qos_class": t["qos_class"], "level": c.get("level", 1)}
        for k in ("ttft_slo_ms", "tpot_slo_ms"):
            v = t.get(k, c.get(k))
            row[k.replace("_ms", "_s")] = None if v is None else float(v) * time_scale / 1000.0
        out[t["name"]] = row
    return out

"""Synthetic multi-tenant mixes from a YAML/JSON scenario spec (``experiments/scenarios``).

::

    name: drift                      # required
    description: ...
    seed: 0
    duration_s: 120                  # required: seconds of arrivals
    max_context: 8192                # engine max_model_len (prompt + output must fit)
    max_tokens: null                 # default cap sent with each request (null: none)
    ignore_eos: false                # true for real engines (max_tokens = output_tokens)
    filler: sharegpt                 # text for token-count-only prompts: sharegpt | words
    params: {temperature: 0.7}       # generation parameters for every request
    assumes: {...}                   # free-form, copied to the header
    tenants:                         # required, names unique
      - name: acme                   # required
        qos_class: premium           # required
        weight: 2                    # the tenant's weight (header; the runner configures it)
        rate: 3.0                    # mean req/s (every process but trace)
        arrival: poisson             # poisson | constant | {process: gamma, cv: 3}
                                     # | {process: onoff, on_s: 10, off_s: 20}
                                     # | {process: trace, trace: azure-code, offset_s, rate_scale}
        lengths: sharegpt            # sharegpt [prompt_tokens: [lo, hi], output_tokens: [lo, hi]]
                                     # | {profile: lognormal, prompt: {median, sigma[, min, max]},
                                     #    output: {...}} | {profile: fixed, prompt: N, output: N}
                                     # | {profile: trace, trace: azure-conv}
        max_tokens: 1024             # overrides the spec's
        params: {}                   # overrides the spec's
        start_s: 0                   # active window (default: the whole run)
        end_s: null
    drift:                           # from at_s on, the tenant's outputs are output_scale
      - {at_s: 45, tenant: acme, output_scale: 4}      # times longer, and/or its lengths
      - {at_s: 60, tenant: acme, lengths: {...}}       # come from another population

``rate`` is the long-run mean for every process: ``onoff`` sends Poisson at ``rate * (on_s +
off_s) / on_s`` during on-periods (the first starts at ``start_s``); ``gamma`` has gaps with
coefficient of variation ``cv``. A ``trace`` arrival with ``lengths: {profile: trace}`` of the
same trace keeps each arrival's own token counts. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments.assemble import Assembler, Draft, Options, make_header
from experiments.generators import FILLERS, Arrival, Lengths, LogNormal, Sample, rng_for
from experiments.traces import TRACES, Data
from experiments.workload_file import GEN_PARAMS, TENANT_RE, Request, is_int, is_num


class SpecError(ValueError):
    """A scenario spec that does not validate; the message names the key."""


def _keys(
    d: Any, where: str, allowed: Iterable[str], required: Iterable[str] = ()
) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(d).__name__}")
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            raise SpecError(f"{where}.{k}: unknown key; allowed: {', '.join(sorted(allowed))}")
    for k in required:
        if k not in d:
            raise SpecError(f"{where}: missing key {k!r}")
    return d


def _number(
    d: dict[str, Any],
    key: str,
    where: str,
    default: float | None = None,
    *,
    positive: bool = False,
    minimum: float | None = None,
) -> float:
    raw: Any = d.get(key, default)
    if not is_num(raw):
        raise SpecError(f"{where}.{key}: {raw!r} must be a number")
    v = float(raw)
    if positive and v <= 0:
        raise SpecError(f"{where}.{key}: {v} must be > 0")
    if minimum is not None and v < minimum:
        raise SpecError(f"{where}.{key}: {v} must be >= {minimum}")
    return v


def _int_or_null(d: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    v = d.get(key, default)
    if v is not None and not (is_int(v) and v >= 1):
        raise SpecError(f"{where}.{key}: {v!r} must be an int >= 1 or null")
    return v


def _range(v: Any, where: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v) and v[0] <= v[1]):
        raise SpecError(f"{where}: {v!r} must be [min, max] ints")
    return int(v[0]), int(v[1])


def _trace_name(v: Any, where: str) -> str:
    if v not in TRACES:
        raise SpecError(f"{where}: {v!r}; choose from {', '.join(TRACES)}")
    return str(v)


def parse_arrival(v: Any, where: str) -> Arrival:
    if isinstance(v, str):
        v = {"process": v}
    d = _keys(
        v,
        where,
        ("process", "cv", "on_s", "off_s", "trace", "offset_s", "rate_scale"),
        ("process",),
    )
    p = d["process"]
    if p in ("poisson", "constant"):
        _keys(d, where, ("process",))
        return Arrival(p)
    if p == "gamma":
        _keys(d, where, ("process", "cv"), ("cv",))
        return Arrival(p, cv=_number(d, "cv", where, positive=True))
    if p == "onoff":
        _keys(d, where, ("process", "on_s", "off_s"), ("on_s", "off_s"))
        return Arrival(
            p,
            on_s=_number(d, "on_s", where, positive=True),
            off_s=_number(d, "off_s", where, minimum=0.0),
        )
    if p == "trace":
        _keys(d, where, ("process", "trace", "offset_s", "rate_scale"), ("trace",))
        return Arrival(
            p,
            trace=_trace_name(d["trace"], f"{where}.trace"),
            offset_s=_number(d, "offset_s", where, 0.0, minimum=0.0),
            rate_scale=_number(d, "rate_scale", where, 1.0, positive=True),
        )
    raise SpecError(f"{where}.process: {p!r}; choose poisson, gamma, onoff, constant or trace")


def _dist(v: Any, where: str) -> LogNormal | int:
    if is_int(v) and v >= 1:
        return int(v)
    d = _keys(v, where, ("median", "sigma", "min", "max"), ("median", "sigma"))
    return LogNormal(
        _number(d, "median", where, positive=True),
        _number(d, "sigma", where, minimum=0.0),
        int(_number(d, "min", where, 1, minimum=1)),
        int(_number(d, "max", where, 1 << 20, minimum=1)),
    )


def parse_lengths(v: Any, where: str) -> Lengths:
    if isinstance(v, str):
        v = {"profile": v}
    d = _keys(
        v,
        where,
        ("profile", "prompt", "output", "trace", "prompt_tokens", "output_tokens"),
        ("profile",),
    )
    p = d["profile"]
    if p == "sharegpt":
        _keys(d, where, ("profile", "prompt_tokens", "output_tokens"))
        return Lengths(
            p,
            prompt_range=_range(d.get("prompt_tokens"), f"{where}.prompt_tokens"),
            output_range=_range(d.get("output_tokens"), f"{where}.output_tokens"),
        )
    if p == "trace":
        _keys(d, where, ("profile", "trace"), ("trace",))
        return Lengths(p, trace=_trace_name(d["trace"], f"{where}.trace"))
    if p in ("lognormal", "fixed"):
        _keys(d, where, ("profile", "prompt", "output"), ("prompt", "output"))
        pr, out = _dist(d["prompt"], f"{where}.prompt"), _dist(d["output"], f"{where}.output")
        if p == "fixed" and not (isinstance(pr, int) and isinstance(out, int)):
            raise SpecError(f"{where}: profile fixed takes integer prompt and output")
        return Lengths(p, prompt=pr, output=out)
    raise SpecError(f"{where}.profile: {p!r}; choose sharegpt, lognormal, fixed or trace")


@dataclass(frozen=True, slots=True)
class TenantSpec:
    name: str
    qos_class: str
    weight: float
    arrival: Arrival
    lengths: Lengths
    max_tokens: int | None
    params: dict[str, Any]
    start_s: float
    end_s: float | None


@dataclass(frozen=True, slots=True)
class DriftSpec:
    """From ``at_s`` on, ``tenant``'s outputs are ``output_scale`` times longer and/or its
    lengths come from another population (``lengths``)."""

    at_s: float
    tenant: str
    output_scale: float = 1.0
    lengths: Lengths | None = None


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    description: str
    duration_s: float
    tenants: list[TenantSpec]
    drift: list[DriftSpec]
    raw: dict[str, Any]
    assumes: dict[str, Any]


SPEC_KEYS = (
    "name",
    "description",
    "seed",
    "duration_s",
    "max_context",
    "max_tokens",
    "ignore_eos",
    "filler",
    "params",
    "tenants",
    "drift",
    "assumes",
)
TENANT_KEYS = (
    "name",
    "qos_class",
    "weight",
    "rate",
    "arrival",
    "lengths",
    "max_tokens",
    "params",
    "start_s",
    "end_s",
)


def parse_spec(raw: Any, opts: Options) -> Spec:
    """Validate a scenario spec (a mapping, e.g. from YAML); fills ``opts`` from it."""
    d = _keys(raw, "spec", SPEC_KEYS, ("name", "duration_s", "tenants"))
    opts.seed = int(_number(d, "seed", "spec", opts.seed))
    opts.max_context = int(_number(d, "max_context", "spec", opts.max_context, positive=True))
    opts.max_tokens = _int_or_null(d, "max_tokens", "spec", opts.max_tokens)
    opts.ignore_eos = d.get("ignore_eos", opts.ignore_eos)
    if not isinstance(opts.ignore_eos, bool):
        raise SpecError(f"spec.ignore_eos: {opts.ignore_eos!r} must be true or false")
    opts.filler = d.get("filler", opts.filler)
    if opts.filler not in FILLERS:
        raise SpecError(f"spec.filler: {opts.filler!r}; choose {' or '.join(FILLERS)}")
    opts.params = dict(_keys(d.get("params", {}), "spec.params", GEN_PARAMS))
    tenants: list[TenantSpec] = []
    if not isinstance(d["tenants"], list) or not d["tenants"]:
        raise SpecError("spec.tenants: a non-empty list is required")
    for i, tv in enumerate(d["tenants"]):
        w = f"spec.tenants[{i}]"
        t = _keys(tv, w, TENANT_KEYS, ("name", "qos_class", "arrival", "lengths"))
        if not (isinstance(t["name"], str) and TENANT_RE.match(t["name"])):
            raise SpecError(f"{w}.name: {t['name']!r} must match {TENANT_RE.pattern}")
        arrival = parse_arrival(t["arrival"], f"{w}.arrival")
        if arrival.process == "trace":
            if "rate" in t:
                raise SpecError(f"{w}.rate: a trace sets its own rate; use arrival.rate_scale")
        else:
            arrival = replace(arrival, rate=_number(t, "rate", w, positive=True))
        end = t.get("end_s")
        tenants.append(
            TenantSpec(
                t["name"],
                str(t["qos_class"]),
                _number(t, "weight", w, 1.0, positive=True),
                arrival,
                parse_lengths(t["lengths"], f"{w}.lengths"),
                _int_or_null(t, "max_tokens", w, opts.max_tokens),
                dict(_keys(t.get("params", {}), f"{w}.params", GEN_PARAMS)),
                _number(t, "start_s", w, 0.0, minimum=0.0),
                None if end is None else _number(t, "end_s", w, positive=True),
            )
        )
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise SpecError("spec.tenants: tenant names must be unique")
    drift: list[DriftSpec] = []
    for i, ev in enumerate(d.get("drift") or []):
        w = f"spec.drift[{i}]"
        e = _keys(ev, w, ("at_s", "tenant", "output_scale", "lengths"), ("at_s", "tenant"))
        if e["tenant"] not in names:
            raise SpecError(f"{w}.tenant: {e['tenant']!r} is not a tenant ({', '.join(names)})")
        if "output_scale" not in e and "lengths" not in e:
            raise SpecError(f"{w}: give output_scale and/or lengths")
        drift.append(
            DriftSpec(
                _number(e, "at_s", w, minimum=0.0),
                e["tenant"],
                _number(e, "output_scale", w, 1.0, positive=True),
                parse_lengths(e["lengths"], f"{w}.lengths") if "lengths" in e else None,
            )
        )
    assumes = d.get("assumes", {})
    if not isinstance(assumes, dict):
        raise SpecError("spec.assumes: must be a mapping")
    return Spec(
        str(d["name"]),
        str(d.get("description", "")),
        _number(d, "duration_s", "spec", positive=True),
        tenants,
        sorted(drift, key=lambda e: e.at_s),
        raw,
        assumes,
    )


def load_spec(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) if str(path).endswith((".yaml", ".yml")) else json.load(f)


def build_synthetic(
    spec: Spec,
    opts: Options,
    data: Data,
    *,
    rate_scale: float = 1.0,
) -> tuple[dict[str, Any], list[Request]]:
    """Every tenant's arrivals and lengths, drift applied, merged in arrival order."""
    drafts: list[Draft] = []
    for t in spec.tenants:
        arr = t.arrival
        arr = (
            replace(arr, rate_scale=arr.rate_scale * rate_scale)
            if arr.process == "trace"
            else replace(arr, rate=(arr.rate or 0.0) * rate_scale)
        )
        end = min(spec.duration_s, t.end_s or spec.duration_s)
        times, rows = arr.times(rng_for(opts.seed, "arrival", t.name), t.start_s, end, data)
        events = [e for e in spec.drift if e.tenant == t.name]
        # phase k: from events[k-1].at_s (or 0) on; its population and cumulative scale
        bounds = [e.at_s for e in events]
        phase = np.searchsorted(np.asarray(bounds, dtype=np.float64), times, side="right")
        pops, scales, lengths, scale = [t.lengths], [1.0], t.lengths, 1.0
        for e in events:
            lengths = e.lengths or lengths
            scale *= e.output_scale
            pops.append(lengths)
            scales.append(scale)
        aligned = (
            rows
            if arr.process == "trace"
            and t.lengths.profile == "trace"
            and t.lengths.trace == arr.trace
            else None
        )
        samples: list[Sample | None] = [None] * len(times)
        for k, pop in enumerate(pops):
            where = np.nonzero(phase == k)[0]
            if not len(where):
                continue
            same = aligned is not None and pop is t.lengths
            got = pop.sample(
                rng_for(opts.seed, "lengths", t.name, k),
                len(where),
                data,
                opts.max_context,
                aligned[where] if same and aligned is not None else None,
            )
            for j, got_one in zip(where.tolist(), got, strict=True):
                out = max(1, round(got_one.output_tokens * scales[k]))
                samples[j] = replace(got_one, output_tokens=out) if scales[k] != 1.0 else got_one
        for j, maybe in enumerate(samples):
            assert maybe is not None
            drafts.append(
                Draft(float(times[j]), t.name, t.qos_class, maybe, t.max_tokens, t.params)
            )
    asm = Assembler(opts, data)
    reqs = asm.build(drafts)
    tenants = [{"name": t.name, "qos_class": t.qos_class, "weight": t.weight} for t in spec.tenants]
    drift = [
        {
            "at_s": e.at_s,
            "tenant": e.tenant,
            "output_scale": e.output_scale,
            **({"lengths": e.lengths.profile} if e.lengths else {}),
        }
        for e in spec.drift
    ]
    params = {"spec": spec.raw, "rate_scale": rate_scale}
    return make_header(
        spec.name,
        "synthetic",
        opts,
        spec.duration_s,
        tenants,
        reqs,
        asm,
        params,
        drift,
        spec.assumes,
    ), reqs

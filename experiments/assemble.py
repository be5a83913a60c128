"""From drafts (arrival, tenant, sampled lengths) to a workload: unique prompts, caps, header.

:class:`Assembler` is where every builder ends: it synthesizes text for token-count-only
samples, makes every prompt unique (so the simulator finds each request's own true length),
fits prompt + output into ``max_context``, applies the ``max_tokens`` policy and numbers the
requests in arrival order. :func:`build_from_trace` (Azure, Mooncake) and
:func:`build_sharegpt` are the single-source builders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapters.sim.workload import count_prompt_tokens, prompt_key
from experiments.generators import (
    Arrival,
    Filler,
    Lengths,
    Sample,
    rng_for,
    sharegpt_pool,
    stable_hash,
    synth_messages,
)
from experiments.traces import MOONCAKE_BUCKET_S, Data, IntArray, window_trace
from experiments.workload_file import (
    DEFAULT_MAX_CONTEXT,
    FORMAT,
    TENANT_RE,
    VERSION,
    Request,
)


@dataclass(slots=True)
class Options:
    """What every builder shares."""

    seed: int = 0
    max_context: int = DEFAULT_MAX_CONTEXT
    max_tokens: int | None = None  # None: requests carry no cap
    ignore_eos: bool = False  # real engines: max_tokens = output_tokens, ignore_eos true
    long_prompts: str = "clip"  # clip | drop
    filler: str = "sharegpt"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Draft:
    arrival_s: float
    tenant: str
    qos_class: str
    sample: Sample
    max_tokens: int | None
    params: dict[str, Any]


class Assembler:
    """Turns drafts into unique, capped, sorted requests, and counts what it clipped."""

    def __init__(self, opts: Options, data: Data) -> None:
        self.opts, self.data = opts, data
        self._filler: Filler | None = None
        self.clipped = 0
        self.dropped = 0

    def filler(self) -> Filler:
        if self._filler is None:
            self._filler = Filler.create(self.opts.filler, self.data)
        return self._filler

    def build(self, drafts: list[Draft]) -> list[Request]:
        drafts = sorted(drafts, key=lambda d: d.arrival_s)  # stable: ties keep draft order
        out: list[Request] = []
        seen: set[str] = set()
        ctx = self.opts.max_context
        salt = stable_hash(self.opts.seed, "blocks")
        for d in drafts:
            s = d.sample
            cap = d.max_tokens
            p_target, out_tokens = max(1, s.prompt_tokens), max(1, s.output_tokens)
            clipped = False
            if s.text is None and p_target + min(out_tokens, cap or out_tokens) > ctx:
                if self.opts.long_prompts == "drop":
                    self.dropped += 1
                    continue
                clipped = True  # keep room for the output (at most half the context)
                p_target = min(p_target, ctx - min(out_tokens, ctx // 2))
            n = len(out)
            if s.text is not None:
                messages = [{"role": "user", "content": s.text}]
            else:
                offset = stable_hash(self.opts.seed, "filler", n)
                messages = synth_messages(
                    p_target, f" [{d.tenant} #{n:x}]", self.filler(), offset, s.blocks, salt
                )
            key = prompt_key(messages)
            k = 1
            while key in seen:  # a repeated real prompt: make it unique, its length its own
                k += 1
                messages = [{"role": "user", "content": f"{s.text} #{k}"}]
                key = prompt_key(messages)
            seen.add(key)
            p_tokens = count_prompt_tokens(messages)
            room = ctx - p_tokens
            if room < 1:
                self.dropped += 1
                continue
            if out_tokens > room or (cap is not None and out_tokens > cap):
                clipped = True
                out_tokens = min(out_tokens, room, cap or room)
            self.clipped += clipped
            mt = min(cap, room) if cap is not None else None
            params = {**self.opts.params, **d.params}
            if self.opts.ignore_eos:
                mt, params["ignore_eos"] = out_tokens, True
            out.append(
                Request(
                    id=f"r{n:06d}",
                    arrival_s=round(d.arrival_s, 6),
                    tenant=d.tenant,
                    qos_class=d.qos_class,
                    messages=messages,
                    prompt=None,
                    max_tokens=mt,
                    output_tokens=out_tokens,
                    prompt_tokens=p_tokens,
                    source=s.source,
                    params=params,
                )
            )
        return out


def recount(header: dict[str, Any], reqs: list[Request]) -> dict[str, Any]:
    """``header`` with ``n_requests`` and each tenant's ``n`` / ``rate_req_s`` redone."""
    duration = float(header.get("duration_s") or 0.0)
    tenants = []
    for t in header.get("tenants", []):
        n = sum(1 for r in reqs if r.tenant == t["name"])
        tenants.append({**t, "n": n, "rate_req_s": round(n / duration, 4) if duration else 0.0})
    return {**header, "n_requests": len(reqs), "tenants": tenants}


def make_header(
    name: str,
    source: str,
    opts: Options,
    duration_s: float,
    tenants: list[dict[str, Any]],
    reqs: list[Request],
    asm: Assembler,
    params: dict[str, Any],
    drift: list[dict[str, Any]] | None = None,
    assumes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``_workload`` header (see :mod:`experiments.workload_file`)."""
    return recount(
        {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "source": source,
            "seed": opts.seed,
            "duration_s": duration_s,
            "max_context": opts.max_context,
            "n_requests": len(reqs),
            "tenants": tenants,
            "drift": drift or [],
            "clipped": asm.clipped,
            "dropped": asm.dropped,
            "params": params,
            "assumes": assumes or {},
        },
        reqs,
    )


@dataclass(frozen=True, slots=True)
class TenantShare:
    name: str
    qos_class: str
    weight: float


def parse_tenants(text: str) -> list[TenantShare]:
    """``"acme:premium:2,globex:standard"`` -> tenants (weight: share of requests, default 1)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        bits = part.split(":")
        if not 1 <= len(bits) <= 3 or not TENANT_RE.match(bits[0]):
            raise ValueError(f"bad tenant {part!r}; use name[:class[:weight]]")
        weight = float(bits[2]) if len(bits) == 3 else 1.0
        if weight <= 0:
            raise ValueError(f"tenant {bits[0]!r}: weight must be > 0")
        out.append(TenantShare(bits[0], bits[1] if len(bits) > 1 else "standard", weight))
    if not out or len({t.name for t in out}) != len(out):
        raise ValueError(f"tenants {text!r}: need at least one, names unique")
    return out


def _assign(rng: np.random.Generator, tenants: list[TenantShare], n: int) -> IntArray:
    w = np.asarray([t.weight for t in tenants], dtype=np.float64)
    return rng.choice(len(tenants), size=n, p=w / w.sum()).astype(np.int64)


def build_from_trace(
    trace: str,
    *,
    duration_s: float,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    tenants: list[TenantShare],
    opts: Options,
    data: Data,
    limit: int | None = None,
    name: str | None = None,
) -> tuple[dict[str, Any], list[Request]]:
    """Azure or Mooncake arrivals and token counts; synthesized prompt text of those lengths."""
    tr = data.trace(trace)
    jitter = MOONCAKE_BUCKET_S if trace == "mooncake" else 0.0
    t, rows = window_trace(
        tr, start_s, rate_scale, duration_s, jitter, rng_for(opts.seed, "jitter", trace)
    )
    if limit is not None:
        t, rows = t[:limit], rows[:limit]
    who = _assign(rng_for(opts.seed, "assign", trace), tenants, len(t))
    samples = Lengths("trace", trace=trace).sample(
        rng_for(opts.seed), len(t), data, opts.max_context, rows
    )
    drafts = [
        Draft(
            float(t[i]),
            tenants[who[i]].name,
            tenants[who[i]].qos_class,
            samples[i],
            opts.max_tokens,
            {},
        )
        for i in range(len(t))
    ]
    asm = Assembler(opts, data)
    reqs = asm.build(drafts)
    params = {
        "trace": trace,
        "start_s": start_s,
        "rate_scale": rate_scale,
        "max_tokens": opts.max_tokens,
        "filler": opts.filler,
        "limit": limit,
    }
    header = make_header(
        name or trace,
        trace,
        opts,
        duration_s,
        [{"name": x.name, "qos_class": x.qos_class, "weight": x.weight} for x in tenants],
        reqs,
        asm,
        params,
    )
    return header, reqs


def build_sharegpt(
    *,
    duration_s: float,
    rate: float | None,
    arrivals: str | None = None,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    order: str = "shuffle",
    tenants: list[TenantShare],
    opts: Options,
    data: Data,
    limit: int | None = None,
    name: str | None = None,
) -> tuple[dict[str, Any], list[Request]]:
    """Real ShareGPT prompts with their real response lengths; Poisson arrivals at ``rate``
    or a trace's arrival times (``arrivals``)."""
    if arrivals:
        t, _ = window_trace(
            data.trace(arrivals),
            start_s,
            rate_scale,
            duration_s,
            MOONCAKE_BUCKET_S if arrivals == "mooncake" else 0.0,
            rng_for(opts.seed, "jitter", arrivals),
        )
    else:
        if not rate or rate <= 0:
            raise ValueError("sharegpt: give --rate (req/s) or --arrivals TRACE")
        arr = Arrival("poisson", rate=rate)
        t, _ = arr.times(rng_for(opts.seed, "arrival"), 0.0, duration_s, data)
    if limit is not None:
        t = t[:limit]
    pool = sharegpt_pool(data, opts.max_context)
    idx = np.arange(len(pool))
    if order == "shuffle":
        idx = rng_for(opts.seed, "order").permutation(len(pool))
    elif order != "file":
        raise ValueError("order must be shuffle or file")
    who = _assign(rng_for(opts.seed, "assign"), tenants, len(t))
    drafts = []
    for i in range(len(t)):
        r = pool[int(idx[i % len(pool)])]
        s = Sample(0, r.response_tokens, f"sharegpt:{r.id}", r.prompt)
        tn = tenants[who[i]]
        drafts.append(Draft(float(t[i]), tn.name, tn.qos_class, s, opts.max_tokens, {}))
    asm = Assembler(opts, data)
    reqs = asm.build(drafts)
    params = {
        "rate": rate,
        "arrivals": arrivals,
        "rate_scale": rate_scale,
        "start_s": start_s,
        "order": order,
        "max_tokens": opts.max_tokens,
        "limit": limit,
    }
    header = make_header(
        name or "sharegpt",
        "sharegpt",
        opts,
        duration_s,
        [{"name": x.name, "qos_class": x.qos_class, "weight": x.weight} for x in tenants],
        reqs,
        asm,
        params,
    )
    return header, reqs

"""What a workload offers: per-tenant rates, burstiness, lengths, drift, and the capacity of
a simulated pool for its length mix (so a scenario's load factor can be checked)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from experiments.workload_file import Request, Workload

BACKLOG = 512


def _pct(x: npt.NDArray[Any], q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def _group_stats(reqs: Sequence[Request], duration_s: float) -> dict[str, Any]:
    t = np.asarray([r.arrival_s for r in reqs], dtype=np.float64)
    p = np.asarray([r.prompt_tokens for r in reqs], dtype=np.float64)
    o = np.asarray([r.output_tokens for r in reqs], dtype=np.float64)
    gaps = np.diff(t)
    per_s = np.bincount(t.astype(np.int64)) if len(t) else np.zeros(1, np.int64)
    return {
        "n": len(reqs),
        "rate_req_s": round(len(reqs) / duration_s, 3) if duration_s else None,
        "interarrival_cv": round(float(gaps.std() / gaps.mean()), 3)
        if len(gaps) > 1 and gaps.mean() > 0
        else None,
        "max_req_in_1s": int(per_s.max()),
        "prompt_p50_p90_p99": [round(_pct(p, q)) for q in (50, 90, 99)] if len(p) else [],
        "output_mean": round(float(o.mean()), 1) if len(o) else None,
        "output_p50_p90_p99": [round(_pct(o, q)) for q in (50, 90, 99)] if len(o) else [],
        "output_tok_s": round(float(o.sum()) / duration_s, 1) if duration_s else None,
    }


def describe(w: Workload) -> dict[str, Any]:
    """Per-tenant and overall rates, burstiness and length percentiles; drift before/after."""
    reqs = w.requests
    duration = float(w.header.get("duration_s") or (reqs[-1].arrival_s if reqs else 0.0))
    out: dict[str, Any] = {
        "name": w.header.get("name"),
        "duration_s": duration,
        "all": _group_stats(reqs, duration),
        "tenants": {},
    }
    for name in w.tenants:
        mine = [r for r in reqs if r.tenant == name]
        out["tenants"][name] = {"qos_class": mine[0].qos_class, **_group_stats(mine, duration)}
    drift = []
    for ev in w.header.get("drift") or []:
        mine = [r for r in reqs if r.tenant == ev.get("tenant")]
        before = [r.output_tokens for r in mine if r.arrival_s < ev["at_s"]]
        after = [r.output_tokens for r in mine if r.arrival_s >= ev["at_s"]]
        drift.append(
            {
                **ev,
                "output_mean_before": round(float(np.mean(before)), 1) if before else None,
                "output_mean_after": round(float(np.mean(after)), 1) if after else None,
            }
        )
    out["drift"] = drift
    return out


def estimate_capacity(
    reqs: Sequence[Request],
    *,
    engines: int = 2,
    profile: str = "llama3-8b-a100",
    kv_capacity_tokens: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    n_requests: int = 3000,
) -> dict[str, float]:
    """Saturation throughput of ``engines`` simulated engines for this file's length mix.

    The pure :class:`adapters.sim.engine.Engine` runs on a fake clock with a standing queue
    (refilled to ``BACKLOG`` waiting requests) fed the file's requests in order, cycled to
    ``n_requests``; throughput is measured between the 20th and 70th percentile completions,
    so neither ramp-up nor drain counts. Arrival times are ignored: this is the rate one
    engine sustains for this mix, times ``engines`` (the router spreads load evenly).
    """
    from adapters.sim.engine import Engine, SimRequest
    from adapters.sim.profiles import PROFILES

    if not reqs:
        raise ValueError("no requests")
    now = [0.0]
    eng = Engine(
        PROFILES[profile],
        clock=lambda: now[0],
        kv_capacity_tokens=kv_capacity_tokens,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    lo, hi = n_requests // 5, 7 * n_requests // 10
    fed = done = tokens = tok_lo = 0
    t_lo = 0.0
    while done < hi:
        while fed < n_requests and eng.num_waiting < BACKLOG:
            r = reqs[fed % len(reqs)]
            eng.add(SimRequest(str(fed), r.prompt_tokens, r.output_tokens))
            fed += 1
        s = eng.schedule()
        now[0] += s.duration_s
        for r2 in eng.complete(s):
            tokens += 1
            if r2.finished:
                done += 1
                if done == lo:
                    t_lo, tok_lo = now[0], tokens
    span = max(now[0] - t_lo, 1e-9)
    return {
        "engines": engines,
        "req_s": round(engines * (done - lo) / span, 2),
        "output_tok_s": round(engines * (tokens - tok_lo) / span, 1),
        "preemptions": eng.stats.num_preemptions,
    }

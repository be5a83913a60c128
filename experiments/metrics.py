"""Experiment metrics, per tenant, per class and per run (definitions: :data:`DEFINITIONS`).

Every function is pure and takes plain data (:class:`experiments.rundata.Req` and friends,
in simulated seconds); :func:`compute` assembles one policy's numbers into a JSON-able dict
that :mod:`experiments.report` renders. Percentiles are linear-interpolated
(``numpy.percentile``) over the successful requests only; attainment and goodput count every
request sent, failures as misses.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.fairness import (
    INPUT_WEIGHT,
    OUTPUT_WEIGHT,
    fair_share_jain,
    jain,
    service_difference,
    spread_tokens,
)
from experiments.rundata import Access, DriftAction, Req, RunData
from policies.baselines import EWMA_ALPHA, PRIOR_TOKENS, Item, as_of_arrival, score

ROLLING_WINDOW_S = 10.0
RECOVERY_TARGET = 0.95
#: requests arriving before this are the cold start (empty queues, untrained estimator)
WARMUP_S = 30.0

DEFINITIONS: dict[str, str] = {
    "TTFT": "first streamed token - request dispatch, as the client measures it",
    "TPOT": "(completion - first token) / (output tokens - 1); 0 for a one-token answer",
    "e2e": "completion - dispatch (successful requests)",
    "normalised latency": "e2e / output tokens",
    "SLO met": (
        "the request succeeded, TTFT <= its class's TTFT SLO and TPOT <= its TPOT SLO "
        "(a class without SLO: succeeded)"
    ),
    "attainment": "requests meeting their SLO / requests sent (rejected, timed-out, failed "
    "and cancelled requests are misses)",
    "throughput": "output tokens of successful requests / makespan (first dispatch to the "
    "last end -- completion or failure -- of a dispatched request)",
    "output tokens": "output tokens of successful requests (the work done, whatever the makespan)",
    "engine busy share": "simulated seconds the engines spent in steps (sim:busy_seconds_total)"
    " / (engines x makespan); none for engines that do not report it",
    "in-window throughput": "output tokens streamed while arrivals last (each request's "
    "tokens spread evenly between its first token and its completion) / the arrival window",
    "goodput": "requests meeting their SLO / makespan",
    "attainment after warm-up": f"attainment of the requests arriving after {WARMUP_S:g} s "
    "(a diagnostic: the cold start -- empty queues, an untrained estimator -- excluded; the "
    "targets use the whole run)",
    "service": f"{INPUT_WEIGHT:g} x prompt + {OUTPUT_WEIGHT:g} x output tokens (VTC's cost)",
    "fair-share Jain": "Jain's index over x_i = served service_i / max-min fair share_i, the "
    "fair shares from weighted water-filling of the service the group received over the "
    "tenants' demands (their requests' true prompt + output lengths); 1 = every tenant got "
    "exactly its fair share",
    "attainment Jain": "Jain's index over the attainment of each tenant of the group (1 = "
    "every tenant met its SLO equally often; all 0 also reads 1), beside the lowest tenant's",
    "VTC service difference": "per 60 s window, max - min of weighted service (service / "
    "weight) among the group's tenants with arrivals in the window; max and mean over windows",
    "estimator MAE / tau": "mean |predicted - actual output tokens| and Kendall's tau-b "
    "between them, over the successful requests the gateway made a prediction for (its "
    "access log: the p50 it estimated at arrival, before queueing; n = those requests)",
    "estimator baselines": "predicted for the same requests as of each one's arrival at the "
    "gateway (access log arrival_unix), from exactly the successful completions that finished "
    "(arrival + duration) before that arrival: global running mean (River's "
    "StatisticRegressor(Mean)), per-tenant running mean, per-tenant EWMA (alpha "
    f"{EWMA_ALPHA:g}, the first completion sets it), all {PRIOR_TOKENS:g} tokens (the gateway "
    "estimator's prior) before any history; max_tokens = the request's cap, scored only on "
    "the requests that set one (its own n). Same rule as driftsched estimator-eval "
    "(policies/baselines.py)",
    "within-tenant tau": "the mean of the per-tenant Kendall tau-b, weighted by each tenant's "
    "n (tenants with a defined tau: >= 2 requests, neither side constant); how well a "
    "predictor ranks requests of the same tenant, which the tenant alone cannot",
    "p90 coverage": "share of requests whose output was <= the predicted p90",
    "drift: limit reaction": "drift onset -> first action of the drift controller on the "
    "drifting tenant (decrease, SLO decrease or compensation)",
    "drift: premium recovery": "drift onset -> start of the last stretch in which the top "
    "class's rolling 10 s attainment (requests by arrival) stays >= 0.95 until the end of "
    "arrivals (0 if it never fell below); 'first' is the first return above 0.95",
    "queue time": "gateway access log queue_ms (arrival to admission); a request shed from "
    "the queue counts its whole wait",
    "preemptions": "sum of the engines' vllm:num_preemptions_total at the end of the run",
}


def pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else None


def slo_met(r: Req, slo: Mapping[str, Any]) -> bool:
    if not r.ok:
        return False
    ttft, tpot = slo.get("ttft_slo_s"), slo.get("tpot_slo_s")
    if ttft is not None and (r.ttft_s is None or r.ttft_s > ttft):
        return False
    return not (tpot is not None and (r.tpot_s is None or r.tpot_s > tpot))


def makespan(reqs: Sequence[Req]) -> float:
    """First dispatch to the last end (completion or failure) of a dispatched request; 0
    without one. A request the generator never sent ends when the replay stopped: not
    counted."""
    sent = [r for r in reqs if r.dispatched_s is not None]
    starts = [r.dispatched_s for r in sent if r.dispatched_s is not None]
    ends = [r.done_s for r in sent if r.done_s is not None]
    if not starts or not ends:
        return 0.0
    return max(1e-9, max(ends) - min(starts))


def group_stats(
    reqs: Sequence[Req], slos: Mapping[str, Mapping[str, Any]], span: float, window_s: float
) -> dict[str, Any]:
    """Latency, attainment, throughput and goodput of a group of requests (one tenant, one
    class, or all); ``span`` is the run's makespan, ``window_s`` its arrival window."""
    ok = [r for r in reqs if r.ok]
    met = sum(slo_met(r, slos[r.tenant]) for r in reqs)
    late = [r for r in reqs if r.intended_s >= WARMUP_S]
    met_late = sum(slo_met(r, slos[r.tenant]) for r in late)
    out_tok = sum(r.completion_tokens or 0 for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    norm = [r.e2e_s / r.completion_tokens for r in ok if r.e2e_s and r.completion_tokens]
    in_window = sum(spread_tokens(r, 0.0, window_s) for r in ok)
    return {
        "n": len(reqs),
        "ok": len(ok),
        "met": met,
        "attainment": met / len(reqs) if reqs else None,
        "attainment_after_warmup": met_late / len(late) if late else None,
        "errors": dict(Counter(r.error for r in reqs if r.error).most_common()),
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
        "e2e_p50": pct(e2e, 50),
        "e2e_p99": pct(e2e, 99),
        "norm_latency_p50": pct(norm, 50),
        "norm_latency_p99": pct(norm, 99),
        "output_tokens": out_tok,
        "throughput_tok_s": out_tok / span if span > 0 else None,
        "throughput_window_tok_s": in_window / window_s if window_s > 0 else None,
        "goodput_req_s": met / span if span > 0 else None,
    }


def attainment_fairness(tenant_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Jain's index over the tenants' attainment, and the lowest one (tenants without
    requests are left out)."""
    att = {t: s["attainment"] for t, s in tenant_stats.items() if s["attainment"] is not None}
    if not att:
        return {"jain": None, "min": None, "min_tenant": None}
    low = min(sorted(att), key=lambda t: att[t])
    return {"jain": jain(list(att.values())), "min": att[low], "min_tenant": low}


def busy_share(engines: Sequence[Mapping[str, float]], span: float) -> float | None:
    """Engines' busy seconds / (engines x ``span``); None unless every engine reports it."""
    busy = [e.get("sim:busy_seconds_total") for e in engines]
    if not busy or span <= 0 or any(b is None for b in busy):
        return None
    return sum(b for b in busy if b is not None) / (len(busy) * span)


# -- time series ---------------------------------------------------------------------------
def rolling_attainment(
    reqs: Sequence[Req],
    slos: Mapping[str, Mapping[str, Any]],
    end_s: float,
    window_s: float = ROLLING_WINDOW_S,
    step_s: float = 1.0,
) -> tuple[list[float], list[float | None]]:
    """Attainment of the requests arriving in (t - window, t], for t = window..end (the
    first window also holds arrivals at 0); None where no request arrived."""
    items = sorted((r.intended_s, slo_met(r, slos[r.tenant])) for r in reqs)
    times = [float(t) for t in np.arange(window_s, end_s + 1e-9, step_s)]
    arr = np.array([a for a, _ in items]) if items else np.zeros(0)
    met = np.cumsum([0, *(int(m) for _, m in items)])
    values: list[float | None] = []
    for t in times:
        lo = np.searchsorted(arr, t - window_s, "right") if t - window_s > 0 else 0
        hi = np.searchsorted(arr, t, "right")
        n = int(hi - lo)
        values.append(float(met[hi] - met[lo]) / n if n else None)
    return times, values


def recovery(
    times: Sequence[float], values: Sequence[float | None], onset: float, end: float
) -> dict[str, Any]:
    """How long after ``onset`` the rolling attainment got back to (and stayed) >= 0.95."""
    after = [
        (t, v) for t, v in zip(times, values, strict=True) if onset <= t <= end and v is not None
    ]
    if not after:
        return {"min": None, "first_s": None, "sustained_s": None}
    low = [t for t, v in after if v < RECOVERY_TARGET]
    first: float | None = 0.0
    if low:
        first = next((t - onset for t, v in after if t > low[0] and v >= RECOVERY_TARGET), None)
    sustained: float | None = 0.0
    if low:
        last_low = max(low)
        sustained = next((t - onset for t, _ in after if t > last_low), None)
    return {"min": min(v for _, v in after), "first_s": first, "sustained_s": sustained}


def limit_reaction(
    actions: Sequence[DriftAction], tenant: str, onset: float
) -> tuple[float | None, DriftAction | None]:
    """Seconds from ``onset`` to the drift controller's first action on ``tenant``."""
    for a in sorted(actions, key=lambda a: a.t_s):
        if (
            a.tenant == tenant
            and a.t_s >= onset
            and a.action
            in (
                "decrease",
                "slo_decrease",
                "compensate",
            )
        ):
            return a.t_s - onset, a
    return None, None


# -- estimator ---------------------------------------------------------------------------
def estimator_accuracy(
    access: Sequence[Access],
    tenant_of: Mapping[str, str],
    scopes: Mapping[str, Callable[[str], bool]],
    client_times: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The gateway's predictions and the baselines', per scope (a filter on request ids).

    Each scope: the gateway's ``n``, ``mae``, ``tau``, ``tau_within``, ``p90_coverage`` and
    ``tenants`` (:func:`policies.baselines.score`), and ``baselines`` {name: the same scores}
    for the same requests, each predicted as of its arrival from the completions that
    finished before it (:func:`policies.baselines.as_of_arrival`). The baselines learn from
    every successful completion, in or out of the scope. Arrival and finish are the
    gateway's (access log); where a line has neither, the client's dispatch and done times
    from ``client_times``; a request with neither is left out. ``{"n": 0}``: nothing to score.
    """
    items: list[Item] = []
    lines: list[Access] = []
    for a in access:
        tenant = tenant_of.get(a.request_id)
        if a.status != 200 or a.completion_tokens is None or tenant is None:
            continue
        arrival, finish = a.arrival_s, a.finish_s
        if arrival is None or finish is None:
            arrival, finish = (client_times or {}).get(a.request_id, (None, None))
        if arrival is None or finish is None:
            continue
        x = {"tenant": tenant, "max_tokens": a.max_tokens}
        items.append(Item(x, float(a.completion_tokens), arrival, finish))
        lines.append(a)
    base = as_of_arrival(items)
    out: dict[str, dict[str, Any]] = {}
    for name, keep in scopes.items():
        idx = [i for i, a in enumerate(lines) if a.predicted_p50 is not None and keep(a.request_id)]
        if not idx:
            out[name] = {"n": 0}
            continue
        y = [items[i].actual for i in idx]
        ts = [str(items[i].x["tenant"]) for i in idx]
        gw = score([lines[i].predicted_p50 for i in idx], y, ts)
        covered = [_covered(lines[i], items[i].actual) for i in idx]
        gw["p90_coverage"] = sum(covered) / len(idx)
        for t, s in gw["tenants"].items():
            mine = [c for c, u in zip(covered, ts, strict=True) if u == t]
            s["p90_coverage"] = sum(mine) / len(mine)
        gw["baselines"] = {b: score([p[i] for i in idx], y, ts) for b, p in base.items()}
        out[name] = gw
    return out


def _covered(a: Access, actual: float) -> bool:
    return a.predicted_p90 is not None and actual <= a.predicted_p90


# -- one run ---------------------------------------------------------------------------------
def _by(reqs: Iterable[Req], key: Callable[[Req], str]) -> dict[str, list[Req]]:
    out: dict[str, list[Req]] = defaultdict(list)
    for r in reqs:
        out[key(r)].append(r)
    return dict(out)


def queue_times(access: Sequence[Access]) -> dict[str, float]:
    """request id -> seconds in the admission queue (a request shed from it: its wait)."""
    out = {}
    for a in access:
        if a.queue_s is not None:
            out[a.request_id] = a.queue_s
        elif a.status == 503 and a.duration_s is not None:
            out[a.request_id] = a.duration_s
    return out


def compute(run: RunData, header: Mapping[str, Any]) -> dict[str, Any]:
    """Every metric of one policy's run (see :data:`DEFINITIONS`)."""
    reqs, slos = run.requests, run.slos
    window = float(header.get("duration_s") or max((r.intended_s for r in reqs), default=0.0))
    span = makespan(reqs)
    classes = _by(reqs, lambda r: r.qos_class)
    tenants = _by(reqs, lambda r: r.tenant)
    level = {c: min(slos[r.tenant].get("level", 1) for r in rs) for c, rs in classes.items()}
    out: dict[str, Any] = {
        "policy": run.policy,
        "makespan_s": span,
        "window_s": window,
        "all": group_stats(reqs, slos, span, window),
        "classes": {c: group_stats(rs, slos, span, window) for c, rs in classes.items()},
        "tenants": {t: group_stats(rs, slos, span, window) for t, rs in tenants.items()},
        "class_levels": level,
        "tenant_class": {t: rs[0].qos_class for t, rs in tenants.items()},
    }

    def attainment_of(group: Sequence[Req]) -> dict[str, Any]:
        f = attainment_fairness({t: out["tenants"][t] for t in {r.tenant for r in group}})
        return {f"attainment_{k}": v for k, v in f.items()}

    fair: dict[str, Any] = {"classes": {}, "all": fair_share_jain(reqs, run.weights)}
    for c, rs in classes.items():
        fair["classes"][c] = {
            **fair_share_jain(rs, run.weights),
            **attainment_of(rs),
            "service_difference": service_difference(rs, run.weights),
        }
    fair["all"].update(attainment_of(reqs))
    fair["all"]["service_difference"] = service_difference(reqs, run.weights)
    out["fairness"] = fair
    tenant_of = {r.request_id: r.tenant for r in reqs}
    arrival = {r.request_id: r.intended_s for r in reqs}
    scopes: dict[str, Callable[[str], bool]] = {"all": lambda _: True}
    drift_events = list(header.get("drift") or [])
    if drift_events:
        onset = float(drift_events[0]["at_s"])
        scopes["before_drift"] = lambda i: arrival[i] < onset
        scopes["after_drift"] = lambda i: arrival[i] >= onset
    client = {r.request_id: (r.dispatched_s, r.done_s) for r in reqs}
    out["estimator"] = estimator_accuracy(run.access, tenant_of, scopes, client)
    rolling = {c: rolling_attainment(rs, slos, window) for c, rs in classes.items()}
    out["rolling"] = {c: {"t": ts, "attainment": vs} for c, (ts, vs) in rolling.items()}
    top = min(level, key=lambda c: (level[c], c)) if level else None
    drift_out = []
    for ev in drift_events:
        onset, tenant = float(ev["at_s"]), str(ev["tenant"])
        react, action = limit_reaction(run.actions, tenant, onset)
        before = [r for r in run.timeline if r.get("t_s") is not None and r["t_s"] <= onset]
        at_onset = before[-1].get(f"limit.{tenant}") if before else None
        rec = recovery(*rolling[top], onset, window) if top else {}
        drift_out.append(
            {
                "tenant": tenant,
                "at_s": onset,
                "limit_reaction_s": react,
                "first_action": None if action is None else action.action,
                "limit_after": None if action is None else action.limit,
                "limit_at_onset": at_onset,
                "decreases_before_onset": sum(
                    a.tenant == tenant and a.t_s < onset and "decrease" in a.action
                    for a in run.actions
                ),
                "top_class": top,
                "recovery": rec,
                "actions": sum(a.tenant == tenant for a in run.actions),
            }
        )
    out["drift"] = drift_out
    out["drift_controller"] = any(
        v for r in run.timeline for k, v in r.items() if k.startswith("state.")
    )
    qt = queue_times(run.access)
    out["queue_p99_s"] = {
        c: pct([qt[r.request_id] for r in rs if r.request_id in qt], 99)
        for c, rs in {**classes, "all": reqs}.items()
    }
    out["rejects"] = dict(Counter(r.error for r in reqs if r.error).most_common())
    engines = run.info.get("engines") or []
    out["preemptions"] = sum(e.get("vllm:num_preemptions_total", 0.0) for e in engines)
    out["sim_lag_s"] = sum(e.get("sim:lag_seconds_total", 0.0) for e in engines)
    out["engine_busy_share"] = busy_share(engines, span)
    out["gateway_rejections"] = run.info.get("gateway_rejections", {})
    out["distortion"] = distortion(run)
    return out


def distortion(run: RunData) -> dict[str, Any]:
    """Signs that the machine, not the system under test, shaped the numbers."""
    s, x = run.summary, run.time_scale
    lag = (s.get("lag_s") or {}).get("p99")
    wall = float(s.get("wall_s") or 0.0)
    engines = run.info.get("engines") or []
    sim_lag = sum(e.get("sim:lag_seconds_total", 0.0) for e in engines)
    loads = [r["loadavg_1m"] for r in run.timeline if r.get("loadavg_1m") is not None]
    flags = []
    if lag is not None and lag > 0.05:
        flags.append(f"load generator lag p99 {1000 * lag:.0f} ms (> 50 ms)")
    if wall > 0 and sim_lag / max(1, len(engines)) > 0.01 * wall * x:
        flags.append(f"simulator lag {sim_lag:.1f} s (> 1% of the run)")
    cores = run.info.get("cpu_count") or 2
    if loads and float(np.mean(loads)) > 1.5 * cores:
        flags.append(f"mean load average {np.mean(loads):.1f} on {cores} cores")
    return {
        "loadgen_lag_p99_s": lag,
        "loadgen_late_over_10ms": s.get("late_over_10ms"),
        "loadgen_runqueue_wait_s": s.get("loadgen_runqueue_wait_s"),
        "loadgen_cpu_share": s.get("loadgen_cpu_share"),
        "sim_lag_s": sim_lag,
        "loadavg_mean": float(np.mean(loads)) if loads else None,
        "loadavg_max": max(loads) if loads else None,
        "flags": flags,
    }

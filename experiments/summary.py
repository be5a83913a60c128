"""The scalar numbers of a run, per policy and group, and their mean and worst over seeds.

:func:`summarize` reduces one seed's ``metrics.json`` (:func:`experiments.metrics.compute`
per policy) to ``{policy: {group: {metric: value}}}``, a group being a class or ``all``
(:data:`GROUP_METRICS` in every group, :data:`RUN_METRICS` in ``all`` only); :func:`combine`
takes the mean and the worst of each number over seeds, and :func:`pick` returns one of
them in the same shape, so :func:`experiments.targets.targets` reads a seed and the mean
alike. :func:`document` is ``summary.json``: a few KB, one table row per policy and group,
so that a number quoted in the docs can be traced to its run (docs/experiments.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from policies.baselines import MAX_TOKENS, SHORT

#: per group (class or ``all``): metric -> where compute() has it
GROUP_METRICS = (
    "n",
    "failed",
    "attainment",
    "goodput_req_s",
    "output_tokens",
    "throughput_tok_s",
    "ttft_p99",
    "tpot_p99",
    "tenants",
    "service_jain",
    "attainment_jain",
    "attainment_min",
)
#: per policy, in its ``all`` group only
RUN_METRICS = (
    "makespan_s",
    "throughput_window_tok_s",
    "engine_busy_share",
    "preemptions",
    "drift_recovery_s",
    "drift_recovered",
    "drift_min_rolling",
)
#: per seed, in a summary of several seeds (each seed's own summary.json has everything)
SEED_METRICS = (
    "attainment",
    "goodput_req_s",
    "output_tokens",
    "throughput_tok_s",
    "service_jain",
    "attainment_jain",
)
#: the worst of these is the highest; of every other metric, the lowest
LOWER_IS_BETTER = frozenset(
    {"failed", "ttft_p99", "tpot_p99", "makespan_s", "preemptions", "drift_recovery_s"}
)

#: summary.json's estimator table: one row per policy and scope (``all``, ``within`` --
#: within-tenant tau, no MAE --, ``tenant:<name>``, ``before_drift``, ``after_drift``)
ESTIMATOR_COLUMNS = (
    "policy", "scope", "n", "gateway_mae", "gateway_tau",
    *(f"{b}_{k}" for b in SHORT.values() for k in ("mae", "tau")), "max_tokens_n",
)  # fmt: skip

Summary = dict[str, dict[str, dict[str, float | None]]]


def _group(stats: Mapping[str, Any], fair: Mapping[str, Any] | None) -> dict[str, Any]:
    f = fair or {}
    return {
        "n": stats["n"],
        "failed": stats["n"] - stats["ok"],
        "attainment": stats["attainment"],
        "goodput_req_s": stats["goodput_req_s"],
        "output_tokens": stats["output_tokens"],
        "throughput_tok_s": stats["throughput_tok_s"],
        "ttft_p99": stats["ttft_p99"],
        "tpot_p99": stats["tpot_p99"],
        "tenants": f.get("tenants"),
        "service_jain": f.get("jain"),
        "attainment_jain": f.get("attainment_jain"),
        "attainment_min": f.get("attainment_min"),
    }


def summarize_policy(m: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One policy's metrics (compute()'s dict) as ``{group: {metric: value}}``."""
    fair = m["fairness"]
    out = {c: _group(s, fair["classes"].get(c)) for c, s in m["classes"].items()}
    rec = m["drift"][0]["recovery"] if m.get("drift") else {}
    low = rec.get("min")
    out["all"] = {
        **_group(m["all"], fair["all"]),
        "makespan_s": m["makespan_s"],
        "throughput_window_tok_s": m["all"]["throughput_window_tok_s"],
        "engine_busy_share": m.get("engine_busy_share"),
        "preemptions": m.get("preemptions"),
        "drift_recovery_s": rec.get("sustained_s"),
        # 1 recovered, 0 never did; None without a drift event or rolling samples after it
        "drift_recovered": None if low is None else float(rec.get("sustained_s") is not None),
        "drift_min_rolling": low,
    }
    return out


def summarize(metrics: Mapping[str, Mapping[str, Any]]) -> Summary:
    """Every policy of one seed's ``metrics.json``."""
    return {p: summarize_policy(m) for p, m in metrics.items()}


def _stats(name: str, values: Sequence[float | None]) -> dict[str, Any]:
    known = [float(v) for v in values if v is not None]
    if not known:
        return {"mean": None, "worst": None, "seeds": list(values)}
    worst = max(known) if name in LOWER_IS_BETTER else min(known)
    return {"mean": sum(known) / len(known), "worst": worst, "seeds": list(values)}


def combine(per_seed: Sequence[Summary]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{policy: {group: {metric: {mean, worst, seeds}}}}`` over the seeds' summaries, in
    their order. The mean and the worst skip a seed without a value (None, or a policy or
    class missing in it); ``seeds`` keeps one entry per seed (None where missing)."""
    names: dict[str, dict[str, list[str]]] = {}
    for s in per_seed:
        for p, groups in s.items():
            for g, row in groups.items():
                have = names.setdefault(p, {}).setdefault(g, [])
                have += [k for k in row if k not in have]
    return {
        p: {
            g: {k: _stats(k, [s.get(p, {}).get(g, {}).get(k) for s in per_seed]) for k in ks}
            for g, ks in groups.items()
        }
        for p, groups in names.items()
    }


def pick(combined: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
         which: str) -> Summary:  # fmt: skip
    """``mean`` or ``worst`` of :func:`combine`'s result, in :func:`summarize`'s shape."""
    return {
        p: {g: {k: v[which] for k, v in row.items()} for g, row in groups.items()}
        for p, groups in combined.items()
    }


def estimator_rows(
    metrics: Mapping[str, Mapping[str, Any]], tenants: bool = True
) -> list[list[Any]]:
    """The estimator table (:data:`ESTIMATOR_COLUMNS`) of one seed's ``metrics.json``;
    ``tenants`` False: only the ``all`` and ``within`` rows."""
    rows: list[list[Any]] = []
    for p, m in metrics.items():
        est = m.get("estimator") or {}
        for scope in ("all", "before_drift", "after_drift"):
            e = est.get(scope)
            if not e or not e.get("n"):
                continue
            rows.append([p, scope, *_est_cells(e, "mae", "tau")])
            if scope != "all":
                continue
            rows.append([p, "within", *_est_cells(e, None, "tau_within")])
            if tenants:
                for t, ts in (e.get("tenants") or {}).items():
                    per = {b: v["tenants"].get(t) or {"n": 0} for b, v in e["baselines"].items()}
                    rows.append([p, f"tenant:{t}", *_est_cells({**ts, "baselines": per},
                                                                "mae", "tau")])  # fmt: skip
    return rows


def _est_cells(e: Mapping[str, Any], mae: str | None, tau: str) -> list[Any]:
    def two(s: Mapping[str, Any]) -> list[Any]:
        return [_round(s.get(mae)) if mae else None, _round(s.get(tau))]

    base = e.get("baselines") or {}
    cells = [e["n"], *two(e)]
    for b in SHORT:
        cells += two(base.get(b) or {})
    return [*cells, (base.get(MAX_TOKENS) or {}).get("n")]


# -- summary.json ----------------------------------------------------------------------------
def meta(exp: Mapping[str, Any]) -> dict[str, Any]:
    """What ``summary.json`` says about the run, from its ``experiment.json``."""
    v, w, o = exp.get("versions") or {}, exp.get("workload") or {}, exp.get("options") or {}
    return {
        "scenario": exp.get("scenario"),
        "started_utc": exp.get("started_utc"),
        "git_commit": v.get("git_commit"),
        "git_dirty_files": v.get("git_dirty_files"),
        "cpu_count": v.get("cpu_count"),
        "duration_s": w.get("duration_s"),
        "n_requests": w.get("n_requests"),
        "pool": exp.get("pool"),
        "policies": exp.get("policies"),
        "drain_timeout_s": o.get("drain_timeout"),
        "estimator": o.get("estimator"),
        "overrides": exp.get("overrides") or [],
    }


def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.4g}") if abs(v) < 1e4 else round(v)
    return v


def _rows(s: Summary, classes: Sequence[str], names: Sequence[str], all_only: bool) -> list[Any]:
    rows = []
    for p, groups in s.items():
        for g in ["all"] if all_only else [*classes, "all"]:
            if g in groups:
                rows.append([p, g, *(_round(groups[g].get(k)) for k in names)])
    return rows


def tables(s: Summary, classes: Sequence[str]) -> dict[str, list[Any]]:
    """The per-group table and the per-policy table of one summary (rows of values in the
    order of :data:`GROUP_METRICS` and :data:`RUN_METRICS`)."""
    return {
        "groups": _rows(s, classes, GROUP_METRICS, all_only=False),
        "runs": _rows(s, classes, RUN_METRICS, all_only=True),
    }


def document(
    meta: Mapping[str, Any],
    classes: Sequence[str],
    seeds: Mapping[int, Summary],
    targets: Sequence[Mapping[str, Any]],
    estimator: Mapping[int, list[list[Any]]] | None = None,
) -> dict[str, Any]:
    """``summary.json``: ``meta`` (scenario, commit, pool, ...), the column names, the
    tables and the targets. One seed: its tables under ``per_seed``; several: the mean's and
    the worst's tables, and per seed only the :data:`SEED_METRICS` of each group (the seed's
    own ``seed-<n>/summary.json`` has the rest), to stay a few KB. ``estimator``: per seed,
    :func:`estimator_rows` (under ``estimator``, columns :data:`ESTIMATOR_COLUMNS`)."""
    multi = len(seeds) > 1
    columns = {"groups": ["policy", "group", *GROUP_METRICS],
               "runs": ["policy", "group", *RUN_METRICS]}  # fmt: skip
    if multi:
        columns["per_seed"] = ["policy", "group", *SEED_METRICS]
    doc: dict[str, Any] = {"schema": 1, **meta, "seeds": list(seeds), "classes": list(classes),
                           "columns": columns}  # fmt: skip
    if multi:
        both = combine(list(seeds.values()))
        doc["mean"] = tables(pick(both, "mean"), classes)
        doc["worst"] = tables(pick(both, "worst"), classes)
        doc["per_seed"] = {
            str(k): _rows(v, classes, SEED_METRICS, all_only=False) for k, v in seeds.items()
        }
    else:
        doc["per_seed"] = {str(k): tables(v, classes) for k, v in seeds.items()}
    if estimator is not None:
        columns["estimator"] = list(ESTIMATOR_COLUMNS)
        doc["estimator"] = {str(k): v for k, v in estimator.items()}
    doc["targets"] = [_round_target(t) for t in targets]
    return doc


def _round_target(t: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _round(v) for k, v in t.items()}
    if "seed_margins" in t:
        out["seed_margins"] = {str(k): _round(v) for k, v in t["seed_margins"].items()}
    return out


def read_table(doc: Mapping[str, Any], key: str = "mean") -> Summary:
    """A ``summary.json`` table back in :func:`summarize`'s shape: ``mean`` or ``worst``
    (the only seed's when the summary has one), or a seed's (``"0"``)."""
    out: Summary = {}

    def load(rows: Sequence[Sequence[Any]], names: Sequence[str]) -> None:
        for p, g, *vals in rows:
            out.setdefault(p, {}).setdefault(g, {}).update(zip(names, vals, strict=True))

    if key in doc["per_seed"] and "per_seed" in doc["columns"]:
        load(doc["per_seed"][key], doc["columns"]["per_seed"][2:])
        return out
    t = doc.get(key) or doc["per_seed"].get(key)
    if t is None and key in ("mean", "worst") and len(doc["per_seed"]) == 1:
        t = next(iter(doc["per_seed"].values()))
    if t is None:
        raise KeyError(key)
    for part in ("groups", "runs"):
        load(t[part], doc["columns"][part][2:])
    return out

"""Several seeds of one scenario: the mean and the worst over them.

``./run_experiment.sh overload --seeds 0,1,2`` writes one complete experiment per seed in
``<out>/<scenario>/<stamp>/seed-<n>/`` (its own workload, built with that seed, pool seed
included; its own ``report.md``, ``metrics.json`` and ``summary.json``), then
:func:`write_seeds_report` writes the top directory's ``report.md`` and ``summary.json``:
every number as the mean over the seeds and the worst seed's (the lowest, or for latencies,
failures, makespan, preemptions and recovery time the highest), the targets checked on the
mean with each seed's margin beside, and a per-seed table of the headline numbers.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.metrics import DEFINITIONS
from experiments.summary import (
    ESTIMATOR_COLUMNS,
    Summary,
    combine,
    document,
    estimator_rows,
    meta,
    pick,
    summarize,
)
from experiments.targets import over_seeds, targets

SEED_DIR = re.compile(r"^seed-(\d+)$")


def seed_dirs(out: Path) -> dict[int, Path]:
    """seed -> its directory under ``out`` (``seed-<n>`` holding an ``experiment.json``)."""
    found = {}
    for d in out.iterdir() if out.is_dir() else ():
        m = SEED_DIR.match(d.name)
        if m and (d / "experiment.json").exists():
            found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def _pair(mean: Summary, worst: Summary, p: str, g: str, k: str, fmt: Any = _f) -> str:
    a, b = mean[p].get(g, {}).get(k), worst[p].get(g, {}).get(k)
    return f"{fmt(a)} / {fmt(b)}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return [*out, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def _targets_table(ts: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for t in ts:
        never = t["verdict"] == "MISS" and t["value"] is None
        margin = "never recovered" if never else _f(t["margin"], "+.3f")
        per = ", ".join(f"{s}: {_f(m, '+.3f')}" for s, m in t["seed_margins"].items())
        rows.append([t["target"], _f(t["value"]), t["threshold"], margin,
                     _f(t["worst_margin"], "+.3f"), f"{t['seeds_passed']} ({per})",
                     f"**{t['verdict']}**"])  # fmt: skip
    head = ("target", "value (mean)", "threshold", "margin (mean)", "worst seed's margin",
            "seeds passed (margins)", "verdict (mean)")  # fmt: skip
    return _table(head, rows)


def _class_table(mean: Summary, worst: Summary, classes: Sequence[str]) -> list[str]:
    head = ("policy", "class", "requests", "attainment", "goodput (req/s)", "TTFT p99 (ms)",
            "TPOT p99 (ms)", "output tokens", "throughput (tok/s)", "failed")  # fmt: skip
    rows = []
    for p in mean:
        for g in [*classes, "all"]:
            if g not in mean[p]:
                continue
            c = functools.partial(_pair, mean, worst, p, g)
            rows.append([p, g, _f(mean[p][g]["n"], ".0f"), c("attainment"),
                         c("goodput_req_s", lambda v: _f(v, ".2f")), c("ttft_p99", _ms),
                         c("tpot_p99", _ms), c("output_tokens", lambda v: _f(v, ".0f")),
                         c("throughput_tok_s", lambda v: _f(v, ".0f")),
                         c("failed", lambda v: _f(v, ".0f"))])  # fmt: skip
    return _table(head, rows)


def _run_table(mean: Summary, worst: Summary) -> list[str]:
    head = ("policy", "makespan (s)", "output tokens", "throughput (tok/s)",
            "in-window throughput (tok/s)", "engine busy share", "preemptions")  # fmt: skip
    n0, n2 = (lambda v: _f(v, ".0f")), (lambda v: _f(v, ".2f"))
    rows = [[p, _pair(mean, worst, p, "all", "makespan_s", n0),
             _pair(mean, worst, p, "all", "output_tokens", n0),
             _pair(mean, worst, p, "all", "throughput_tok_s", n0),
             _pair(mean, worst, p, "all", "throughput_window_tok_s", n0),
             _pair(mean, worst, p, "all", "engine_busy_share", n2),
             _pair(mean, worst, p, "all", "preemptions", n0)] for p in mean]  # fmt: skip
    return _table(head, rows)


def _fair_table(mean: Summary, worst: Summary, classes: Sequence[str]) -> list[str]:
    head = ("policy", "group", "tenants", "fair-share (service) Jain", "attainment Jain",
            "lowest tenant attainment")  # fmt: skip
    rows = []
    for p in mean:
        for g in [*classes, "all"]:
            if g in mean[p]:
                rows.append([p, g, _f(mean[p][g]["tenants"], ".0f"),
                             _pair(mean, worst, p, g, "service_jain"),
                             _pair(mean, worst, p, g, "attainment_jain"),
                             _pair(mean, worst, p, g, "attainment_min")])  # fmt: skip
    return _table(head, rows)


def _seed_table(per_seed: Mapping[int, Summary], classes: Sequence[str]) -> list[str]:
    head = ("policy", "seed", *(f"attainment {c}" for c in [*classes, "all"]),
            "goodput (req/s)", "output tokens", "throughput (tok/s)",
            "engine busy share")  # fmt: skip
    policies = list(dict.fromkeys(p for s in per_seed.values() for p in s))
    rows = []
    for p in policies:
        for seed, s in per_seed.items():
            if p not in s:
                continue
            a = s[p]["all"]
            rows.append([p, seed, *(_f((s[p].get(c) or {}).get("attainment"))
                                    for c in [*classes, "all"]),
                         _f(a["goodput_req_s"], ".2f"), _f(a["output_tokens"], ".0f"),
                         _f(a["throughput_tok_s"], ".0f"),
                         _f(a["engine_busy_share"], ".2f")])  # fmt: skip
    return _table(head, rows)


def _estimator_seed_table(est: Mapping[int, Sequence[Sequence[Any]]]) -> list[str]:
    """The gateway estimator and the baselines, all requests and within tenants, per seed
    (:func:`experiments.summary.estimator_rows`)."""
    cols = list(ESTIMATOR_COLUMNS)
    names = [c[: -len("_mae")] for c in cols if c.endswith("_mae")]
    rows = []
    for seed, seed_rows in est.items():
        for r in seed_rows:
            d = dict(zip(cols, r, strict=True))
            rows.append([seed, d["policy"], d["scope"], d["n"],
                         *(f"{_f(d[f'{b}_mae'], '.1f')} / {_f(d[f'{b}_tau'])}"
                           for b in names)])  # fmt: skip
    return _table(("seed", "policy", "scope", "n", *names), rows)


def _class_order(metrics: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[str]:
    levels: dict[str, int] = {}
    for per_policy in metrics:
        for m in per_policy.values():
            levels.update(m["class_levels"])
    return sorted(levels, key=lambda c: (levels[c], c))


def write_seeds_report(out: Path) -> list[str]:
    """The top directory's ``report.md`` and ``summary.json`` from the seeds' ``metrics.json``
    (each seed's report is written first: :func:`experiments.report.write_report`); returns
    one console line per target."""
    from experiments.report import write_report

    dirs = seed_dirs(out)
    if not dirs:
        raise FileNotFoundError(f"no seed-<n>/ experiment under {out}")
    metrics: dict[int, dict[str, Any]] = {}
    headers: dict[int, dict[str, Any]] = {}
    for seed, d in dirs.items():
        if not (d / "metrics.json").exists():
            write_report(d)
        metrics[seed] = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        headers[seed] = json.loads((d / "experiment.json").read_text("utf-8")).get("workload", {})
    exp = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    classes = _class_order(list(metrics.values()))
    drift = any(h.get("drift") for h in headers.values())
    per_seed = {seed: summarize(m) for seed, m in metrics.items()}
    seed_targets = {seed: targets(s, classes, drift) for seed, s in per_seed.items()}
    both = combine(list(per_seed.values()))
    mean, worst = pick(both, "mean"), pick(both, "worst")
    ts = over_seeds(targets(mean, classes, drift), seed_targets)
    est = {seed: estimator_rows(m, tenants=False) for seed, m in metrics.items()}
    doc = document(meta(exp), classes, per_seed, ts, est)
    (out / "summary.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n", "utf-8")
    seeds = ", ".join(str(s) for s in dirs)
    links = ", ".join(f"[seed {s}]({d.name}/report.md)" for s, d in dirs.items())
    n_req = ", ".join(f"{headers[s].get('n_requests')}" for s in dirs)
    pool, v = exp.get("pool", {}), exp.get("versions", {})
    lines = [
        f"# Experiment `{exp.get('scenario')}`, seeds {seeds} ({exp.get('started_utc')})", "",
        f"One experiment per seed (its own workload and pool seed): {links}. Requests per "
        f"seed: {n_req}. Pool: {pool.get('instances')} x sim `{pool.get('profile')}`, time "
        f"scale {pool.get('time_scale')}. Wall time {_f(exp.get('wall_s'), '.0f')} s. "
        "Every cell is **mean / worst** over the seeds: the worst is the lowest value, or "
        "for latencies, failures, makespan, preemptions and recovery time the highest (each "
        "metric's worst seed on its own, so a row of worsts may mix seeds). Ratios in the "
        "targets are ratios of the means.", "",
        "## Targets (on the mean over seeds)", "", *_targets_table(ts),
        "## Per class", "", *_class_table(mean, worst, classes),
        "## Work done: tokens, rate, engine busy share", "", *_run_table(mean, worst),
        "## Fairness: service and SLO attainment across tenants", "",
        *_fair_table(mean, worst, classes),
        "## Per seed", "", *_seed_table(per_seed, classes),
        "## Estimator per seed (MAE / tau; per tenant in each seed's report)", "",
        *_estimator_seed_table(est),
        "## Definitions", "",
        *(f"- **{k}**: {d}" for k, d in DEFINITIONS.items()), "",
        "## Versions", "",
        f"- git commit `{v.get('git_commit')}` ({v.get('git_dirty_files')} tracked files "
        "modified)", "- `summary.json` here holds these numbers (docs/experiments.md).", "",
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [
        f"{t['verdict']:>4}  {t['target']}: {_f(t['value'])} mean ({t['threshold']}, margin "
        f"{_f(t['margin'], '+.3f')}, worst seed {_f(t['worst_margin'], '+.3f')}, "
        f"{t['seeds_passed']} seeds pass)"
        for t in ts
    ]

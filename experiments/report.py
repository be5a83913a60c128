"""``report.md``, ``metrics.json`` and ``plots/`` for one experiment directory.

``python -m experiments.report results/<scenario>/<stamp>`` rebuilds them from the raw files
(the runner calls :func:`write_report` at the end; a directory of several seeds,
``seed-<n>/``, is rebuilt seed by seed and then summed up by :mod:`experiments.seeds`). The
report states the issue's targets with PASS/MISS and margins
(:func:`experiments.targets.targets`), a policy x class table, per-tenant, fairness,
estimator, drift, engine and run-health tables, the metric definitions, the exact gateway
configuration and the versions used; ``summary.json`` (:func:`experiments.summary.document`)
holds its headline numbers in a few KB.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from experiments import plots
from experiments.bound import bound_rows, class_loads
from experiments.gwconfig import QUEUE_TIMEOUT_S
from experiments.metrics import DEFINITIONS, compute
from experiments.rundata import RunData, load_run
from experiments.summary import document, estimator_rows, meta, summarize
from experiments.targets import targets
from experiments.workload_file import load_workload
from policies.baselines import MAX_TOKENS


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return [*out, ""]


def class_order(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    levels: dict[str, int] = {}
    for m in metrics.values():
        levels.update(m["class_levels"])
    return sorted(levels, key=lambda c: (levels[c], c))


def _target_lines(ts: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for t in ts:
        margin = t["margin"]
        if t["verdict"] == "MISS" and t["value"] is None:
            margin_s = "never recovered"
        else:
            margin_s = "-" if margin is None else f"{margin:+.3f}"
        rows.append([t["target"], _fmt(t["value"]), t["threshold"], margin_s,
                     f"**{t['verdict']}**"])  # fmt: skip
    return _table(("target", "value", "threshold", "margin", "verdict"), rows)


def _main_table(metrics: Mapping[str, Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    head = ("policy", "class", "n", "attainment", "after warm-up", "TTFT p50 (ms)", "TTFT p99 (ms)",
            "TPOT p50 (ms)", "TPOT p99 (ms)", "e2e p99 (s)", "goodput (req/s)",
            "output tokens", "throughput (tok/s)", "errors")  # fmt: skip
    rows = []
    for p, m in metrics.items():
        for c in [*classes, "all"]:
            s = m["all"] if c == "all" else m["classes"].get(c)
            if not s:
                continue
            errs = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
            rows.append([p, c, s["n"], _fmt(s["attainment"]),
                         _fmt(s["attainment_after_warmup"]), _ms(s["ttft_p50"]),
                         _ms(s["ttft_p99"]), _ms(s["tpot_p50"]), _ms(s["tpot_p99"]),
                         _fmt(s["e2e_p99"], ".1f"), _fmt(s["goodput_req_s"], ".2f"),
                         s["output_tokens"], _fmt(s["throughput_tok_s"], ".0f"),
                         errs])  # fmt: skip
    return _table(head, rows)


def _tenant_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    head = ("policy", "tenant", "class", "n", "attainment", "TTFT p50/p99 (ms)",
            "TPOT p50/p99 (ms)", "norm. latency p50 (ms/tok)", "throughput (tok/s)",
            "served / fair share")  # fmt: skip
    rows = []
    for p, m in metrics.items():
        for t, s in sorted(m["tenants"].items()):
            cls = m["tenant_class"][t]
            share = m["fairness"]["classes"][cls]["served_over_fair"].get(t)
            rows.append([p, t, cls, s["n"], _fmt(s["attainment"]),
                         f"{_ms(s['ttft_p50'])} / {_ms(s['ttft_p99'])}",
                         f"{_ms(s['tpot_p50'])} / {_ms(s['tpot_p99'])}",
                         _ms(s["norm_latency_p50"]), _fmt(s["throughput_tok_s"], ".0f"),
                         _fmt(share)])  # fmt: skip
    return _table(head, rows)


def _fairness_table(metrics: Mapping[str, Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    head = ("policy", "group", "tenants", "fair-share Jain", "served / fair share",
            "attainment Jain", "lowest tenant attainment",
            "VTC service diff max / mean (weighted tokens per 60 s)")  # fmt: skip
    rows = []
    for p, m in metrics.items():
        groups = [(c, m["fairness"]["classes"].get(c)) for c in classes]
        for g, f in [*groups, ("all tenants", m["fairness"]["all"])]:
            if not f:
                continue
            shares = ", ".join(f"{t} {v:.2f}" for t, v in sorted(f["served_over_fair"].items()))
            sd = f["service_difference"]
            low = f.get("attainment_min")
            low_s = "-" if low is None else f"{low:.3f} ({f['attainment_min_tenant']})"
            rows.append([p, g, f["tenants"], _fmt(f["jain"]), shares or "-",
                         _fmt(f.get("attainment_jain")), low_s,
                         f"{_fmt(sd['max'], '.0f')} / {_fmt(sd['mean'], '.0f')}"])  # fmt: skip
    return _table(head, rows)


def _mae_tau(s: Mapping[str, Any] | None, with_n: bool = False) -> str:
    if not s or not s.get("n"):
        return "- (0)" if with_n else "-"
    cell = f"{_fmt(s['mae'], '.1f')} / {_fmt(s['tau'])}"
    return f"{cell} ({s['n']})" if with_n else cell


def _estimator_table(m: Mapping[str, Any]) -> list[str]:
    """One policy's estimator table: the gateway's predictions and each baseline side by
    side (MAE / tau), overall, within tenants, per tenant and around a drift."""
    est = m["estimator"]
    first = est.get("all") or {}
    names = list(first.get("baselines") or {})
    head = ("scope", "n", "gateway estimator", "p90 coverage",
            *(f"{b} (n)" if b == MAX_TOKENS else b for b in names))  # fmt: skip
    rows = []
    for scope in ("all", "before_drift", "after_drift"):
        e = est.get(scope)
        if not e or not e.get("n"):
            continue
        base = e["baselines"]
        rows.append([scope, e["n"], _mae_tau(e), _fmt(e["p90_coverage"], ".2f"),
                     *(_mae_tau(base[b], b == MAX_TOKENS) for b in names)])  # fmt: skip
        if scope == "all":
            rows.append(["within tenant (tau)", e["n"], _fmt(e["tau_within"]), "-",
                         *(_fmt(base[b]["tau_within"]) for b in names)])  # fmt: skip
            for t, s in e["tenants"].items():
                rows.append([f"tenant {t}", s["n"], _mae_tau(s), _fmt(s["p90_coverage"], ".2f"),
                             *(_mae_tau(base[b]["tenants"].get(t), b == MAX_TOKENS)
                               for b in names)])  # fmt: skip
    if not rows:
        return ["No successful request with a prediction.", ""]
    return _table(head, rows)


def run_has_controller(m: Mapping[str, Any]) -> bool:
    """Whether the run had a drift controller (it reported a state for some tenant)."""
    return bool(m.get("drift_controller"))


def _drift_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    head = ("policy", "drifting tenant", "onset (s)", "limit at onset (decreases before)",
            "limit reaction (s)", "first action", "limit after", "controller actions",
            "top class", "min rolling attainment",
            "first back >= 0.95 (s)", "stays >= 0.95 from (s)")  # fmt: skip
    rows = []
    for p, m in metrics.items():
        for d in m["drift"]:
            r = d["recovery"]
            at = "unlimited" if d["limit_at_onset"] is None else _fmt(d["limit_at_onset"], ".0f")
            rows.append([p, d["tenant"], _fmt(d["at_s"], ".0f"),
                         f"{at} ({d['decreases_before_onset']})" if run_has_controller(m)
                         else "-",
                         _fmt(d["limit_reaction_s"], ".1f"), d["first_action"] or "-",
                         _fmt(d["limit_after"]), d["actions"], d["top_class"],
                         _fmt(r.get("min")), _fmt(r.get("first_s"), ".0f"),
                         _fmt(r.get("sustained_s"), ".0f") if r.get("sustained_s") is not None
                         else "never"])  # fmt: skip
    return _table(head, rows)


def _engine_table(metrics: Mapping[str, Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    head = ("policy", "preemptions", *(f"queue p99 {c} (s)" for c in [*classes, "all"]),
            "makespan (s)", "output tokens", "throughput (tok/s)",
            "in-window throughput (tok/s)", "engine busy share", "rejects (client)",
            "rejections (gateway metric)")  # fmt: skip
    rows = []
    for p, m in metrics.items():
        rej = ", ".join(f"{k} {v}" for k, v in m["rejects"].items()) or "-"
        grej = ", ".join(f"{k} {v:.0f}" for k, v in m["gateway_rejections"].items()) or "-"
        rows.append([p, _fmt(m["preemptions"], ".0f"),
                     *(_fmt(m["queue_p99_s"].get(c), ".2f") for c in [*classes, "all"]),
                     _fmt(m["makespan_s"], ".0f"), m["all"]["output_tokens"],
                     _fmt(m["all"]["throughput_tok_s"], ".0f"),
                     _fmt(m["all"]["throughput_window_tok_s"], ".0f"),
                     _fmt(m.get("engine_busy_share"), ".2f"), rej, grej])  # fmt: skip
    return _table(head, rows)


def _health_table(
    metrics: Mapping[str, Mapping[str, Any]], runs: Mapping[str, RunData]
) -> list[str]:
    head = ("policy", "wall (s)", "loadgen lag p99 (ms)", "late > 10 ms", "loadgen CPU share",
            "loadgen run-queue wait (s)", "sim lag (s)", "load avg mean / max",
            "gateway CPU (s)", "engines CPU (s)", "orphans killed", "flags")  # fmt: skip
    rows = []
    for p, m in metrics.items():
        d, info = m["distortion"], runs[p].info
        res = info.get("resources") or {}
        # every replica's gateway process ("gateway", "gateway-1", ...); the rest but Redis
        # are engines (launched by the gateway's pool, or by the experiment for replicas)
        gws = [v.get("cpu_s") for k, v in res.items() if k.startswith("gateway")]
        gw_cpu = sum(c or 0.0 for c in gws) if gws and None not in gws else None
        eng = sum((v.get("cpu_s") or 0.0) for k, v in res.items()
                  if not k.startswith("gateway") and k != "redis")
        rows.append([p, _fmt(info.get("wall_s"), ".0f"), _ms(d["loadgen_lag_p99_s"]),
                     _fmt(d["loadgen_late_over_10ms"]), _fmt(d["loadgen_cpu_share"], ".2f"),
                     _fmt(d["loadgen_runqueue_wait_s"], ".1f"), _fmt(d["sim_lag_s"], ".2f"),
                     f"{_fmt(d['loadavg_mean'], '.1f')} / {_fmt(d['loadavg_max'], '.1f')}",
                     _fmt(gw_cpu, ".0f"), _fmt(eng, ".0f"), info.get("killed_orphans", "-"),
                     "; ".join(d["flags"]) or "none"])  # fmt: skip
    return _table(head, rows)


def _bound_section(out: Path, exp: Mapping[str, Any], header: Mapping[str, Any],
                   classes: Sequence[str], metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:  # fmt: skip
    """What the pool's capacity allows (:mod:`experiments.bound`); nothing when the workload
    file or the pool's profile is missing."""
    path, pool = out / "workload.jsonl", exp.get("pool") or {}
    if not path.exists() or not pool.get("profile") or not header.get("duration_s"):
        return []
    reqs = load_workload(path).requests
    loads = class_loads(reqs, classes, float(header["duration_s"]),
                        engines=int(pool.get("instances") or 2), profile=str(pool["profile"]),
                        max_num_seqs=pool.get("max_num_seqs"))  # fmt: skip
    duration = float(header["duration_s"])
    time = (duration + QUEUE_TIMEOUT_S) / duration
    head, rows = bound_rows(loads, metrics, time)
    return ["## What the capacity allows", "",
            "An upper bound on each class's attainment: the pool's saturation throughput on "
            "the class's mix (the simulator's step model) over the arrivals plus one queue "
            f"timeout ({QUEUE_TIMEOUT_S:g} s), shared out strictly in level order, every "
            "served request within its SLOs (`experiments/bound.py`; it ignores TTFT and "
            "TPOT, so it is generous). In brackets: the policy's attainment as a share of the "
            "bound.", "", *_table(head, rows)]


def _config_section(out: Path, exp: Mapping[str, Any], policies: Sequence[str]) -> list[str]:
    lines = ["## Configuration", ""]
    opts = exp.get("options", {})
    lines.append(f"- command options: `{json.dumps(opts, sort_keys=True)}`")
    lines.append(f"- overrides (`--set`): {exp.get('overrides') or 'none'}")
    lines.append(f"- pool: `{json.dumps(exp.get('pool', {}), sort_keys=True)}`")
    lines += ["", "Workload header (without the build parameters):", "", "```yaml",
              yaml.safe_dump(exp.get("workload", {}), sort_keys=False).rstrip(), "```", ""]  # fmt: skip
    first = policies[0] if policies else None
    if first and (out / first / "gateway.yaml").exists():
        lines += [f"Gateway configuration of `{first}` (secrets redacted; per-run port and "
                  "log paths differ; the other policies differ only in `scheduler`):", "",
                  "```yaml", (out / first / "gateway.yaml").read_text().rstrip(), "```", ""]  # fmt: skip
        for p in policies[1:]:
            cfg = yaml.safe_load((out / p / "gateway.yaml").read_text())
            lines.append(f"- `{p}`: `scheduler: {json.dumps(cfg.get('scheduler'))}`")
        lines.append("")
    return lines


def _versions_section(exp: Mapping[str, Any]) -> list[str]:
    v = exp.get("versions", {})
    pk = ", ".join(f"{k} {x}" for k, x in sorted((v.get("packages") or {}).items()))
    return ["## Versions", "",
            f"- git commit `{v.get('git_commit')}` ({v.get('git_dirty_files')} tracked files "
            "modified)",
            f"- Python {v.get('python')} on {v.get('platform')}, {v.get('cpu_count')} CPUs",
            f"- packages: {pk}", ""]  # fmt: skip


def write_report(out: Path) -> list[str]:
    """Compute every policy's metrics under ``out`` and write the report; returns one line
    per target (for the console)."""
    exp = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    policies = [p for p in exp.get("policies", []) if (out / p / "run.json").exists()]
    header = exp.get("workload", {})
    runs = {p: load_run(out / p) for p in policies}
    metrics = {p: compute(runs[p], header) for p in policies}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    classes = class_order(metrics)
    drift = list(header.get("drift") or [])
    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    if metrics:
        plots.attainment_bars(metrics, classes, pdir / "attainment.png")
        plots.latency_cdfs(runs, classes, pdir / "ttft_cdf.png", "ttft")
        plots.latency_cdfs(runs, classes, pdir / "tpot_cdf.png", "tpot")
        plots.timeline(runs, metrics, classes, drift, pdir / "timeline.png")
    summary = summarize(metrics)
    ts = targets(summary, classes, bool(drift))
    seed = int(header.get("seed") if header.get("seed") is not None else
               exp.get("options", {}).get("seed") or 0)  # fmt: skip
    doc = document(meta(exp), classes, {seed: summary}, ts, {seed: estimator_rows(metrics)})
    (out / "summary.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n", "utf-8")
    walls = ", ".join(f"{p} {exp['runs'][p]['wall_s']:.0f} s" for p in policies
                      if exp.get("runs", {}).get(p))  # fmt: skip
    tenants = ", ".join(f"{t['name']} ({t['qos_class']}, weight {t['weight']:g}, {t['n']} req)"
                        for t in header.get("tenants") or [])  # fmt: skip
    drift_s = "; ".join(f"{d['tenant']} x{d.get('output_scale', 1)} at {d['at_s']} s"
                        for d in drift) or "none"  # fmt: skip
    pool = exp.get("pool", {})
    lines = [
        f"# Experiment `{exp.get('scenario')}` ({exp.get('started_utc')})", "",
        f"Workload: {header.get('n_requests')} requests over {header.get('duration_s')} s "
        f"(seed {header.get('seed')}); tenants {tenants}; drift: {drift_s}. "
        f"Pool: {pool.get('instances')} x sim `{pool.get('profile')}`, time scale "
        f"{pool.get('time_scale')}, {pool.get('tokens_per_event')} tokens per SSE event. "
        "All times are simulated seconds.", "",
        f"Wall time: {walls}; the whole experiment {_fmt(exp.get('wall_s'), '.0f')} s "
        "before the report.", "",
        "## Targets (issue 11)", "", *_target_lines(ts),
        "![attainment](plots/attainment.png)", "",
        *_bound_section(out, exp, header, classes, metrics),
        "## Per class", "", *_main_table(metrics, classes),
        "![TTFT CDF](plots/ttft_cdf.png)", "", "![TPOT CDF](plots/tpot_cdf.png)", "",
        "## Per tenant", "", *_tenant_table(metrics),
        "## Fairness", "", *_fairness_table(metrics, classes),
        "## Estimator (gateway predictions vs actual output tokens)", "",
        "MAE (tokens) / Kendall tau-b of the gateway's predictions (made at arrival) and of "
        "the baselines, each predicted as of the same arrival from the completions that had "
        "finished before it (Definitions).", "",
        *(line for p, m in metrics.items() for line in [f"### {p}", "", *_estimator_table(m)]),
    ]  # fmt: skip
    if drift:
        lines += ["## Drift reaction", "", *_drift_table(metrics)]
    lines += [
        "## Timeline", "", "![timeline](plots/timeline.png)", "",
        "## Engines, queue and rejections", "", *_engine_table(metrics, classes),
        "## Run health (was the machine, not the system, the bottleneck?)", "",
        *_health_table(metrics, runs),
        "## Definitions", "",
        *(f"- **{k}**: {v}" for k, v in DEFINITIONS.items()), "",
        "SLOs (simulated seconds) per tenant: " + ", ".join(
            f"{t} ({s['qos_class']}: TTFT {_fmt(s['ttft_slo_s'], 'g')}, TPOT "
            f"{_fmt(s['tpot_slo_s'], 'g')})"
            for t, s in sorted(next(iter(runs.values())).slos.items())) + "." if runs else "",
        "",
        *_config_section(out, exp, policies),
        *_versions_section(exp),
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [
        f"{t['verdict']:>4}  {t['target']}: {_fmt(t['value'])} ({t['threshold']}, margin "
        f"{_fmt(t['margin'], '+.3f')})"
        for t in ts
    ]


def main(argv: list[str] | None = None) -> int:
    from experiments.seeds import seed_dirs, write_seeds_report

    p = argparse.ArgumentParser(prog="python -m experiments.report",
                                description="Rebuild report.md, metrics.json and plots/ "
                                "from an experiment directory.")  # fmt: skip
    p.add_argument("dir", help="results/<scenario>/<stamp> (one seed, or several: seed-<n>/)")
    a = p.parse_args(argv)
    out = Path(a.dir)
    if (out / "experiment.json").exists() and seed_dirs(out):
        for d in seed_dirs(out).values():
            write_report(d)
        lines = write_seeds_report(out)
    else:
        lines = write_report(out)
    for line in lines:
        print(line)
    print(f"report: {Path(a.dir) / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

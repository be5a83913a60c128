"""Writes deploy/grafana/driftsched-dashboard.json (the Grafana dashboard DriftSched ships).

    python deploy/grafana/build_dashboard.py          # rewrite the JSON next to this file
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

Edit the panels here, not in the JSON: tests/deploy/test_deploy.py fails when the two differ, and
fails when a query names a metric that a running gateway does not export.

Aggregation across replicas: every replica exports the *shared* views (queue depth,
admission holds, scraped engine gauges) identically, so those panels take ``max``;
per-replica counters and gauges (requests, in-flight, gateway-side engine load) are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("driftsched-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
T = 'tenant=~"$tenant"'
C = 'qos_class=~"$qos_class"'
B = 'backend=~"$backend"'


class Layout:
    """Places panels left to right on Grafana's 24-column grid, rows below each other."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"x": 0, "y": self._y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self._y += 1

    def add(self, panel: dict[str, Any], w: int = 8, h: int = 8) -> None:
        if self._x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self._x, "y": self._y, "w": w, "h": h}
        self.panels.append(panel)
        self._x += w
        self._h = max(self._h, h)

    def _newline(self) -> None:
        self._y += self._h
        self._x = 0
        self._h = 0


def target(expr: str, legend: str, ref: int = 0) -> dict[str, Any]:
    return {
        "refId": chr(ord("A") + ref),
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "range": True,
    }


def timeseries(
    title: str,
    desc: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    stack: bool = False,
    **defaults: Any,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": False,
    }
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [target(e, leg, i) for i, (e, leg) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom, **defaults}, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "calcs": ["lastNotNull", "max"],
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, desc: str, expr: str, unit: str = "short") -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [target(expr, "")],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def quantiles(metric: str, by: str, sel: str, legend: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build() -> dict[str, Any]:
    g = Layout()

    g.row("Traffic")
    g.add(
        stat(
            "Gateway replicas",
            "Replicas whose /metrics Prometheus scrapes.",
            "count(count by (instance) (driftsched_backend_up))",
        ),
        w=4,
        h=4,
    )
    g.add(
        stat(
            "Requests/s",
            "All tenants, all replicas.",
            f"sum(rate(driftsched_requests_total[{RI}]))",
            "reqps",
        ),
        w=4,
        h=4,
    )
    g.add(
        stat(
            "Non-2xx share",
            "Share of responses that were not 2xx.",
            f'sum(rate(driftsched_requests_total{{status!~"2.."}}[{RI}])) / '
            f"sum(rate(driftsched_requests_total[{RI}]))",
            "percentunit",
        ),
        w=4,
        h=4,
    )
    g.add(
        stat(
            "Queued now",
            "Requests waiting for admission in the shared queue.",
            "sum(max by (tenant) (driftsched_queue_depth))",
        ),
        w=4,
        h=4,
    )
    g.add(
        stat(
            "In flight",
            "Requests admitted and not finished, all replicas.",
            "sum(driftsched_in_flight_requests)",
        ),
        w=4,
        h=4,
    )
    g.add(
        stat(
            "Engines routable",
            "Engines taking traffic (as the replicas see them).",
            "max(sum by (instance) (driftsched_backend_up))",
        ),
        w=4,
        h=4,
    )
    g.add(
        timeseries(
            "Requests/s by tenant",
            "Finished requests, all endpoints and statuses.",
            [(f"sum by (tenant) (rate(driftsched_requests_total{{{T}}}[{RI}]))", "{{tenant}}")],
            "reqps",
        )
    )
    g.add(
        timeseries(
            "Responses/s by tenant and status",
            "HTTP status per tenant; 429 = rate "
            "limited or quota, 503 = queue timeout, no engine or store down.",
            [
                (
                    f"sum by (tenant, status) (rate(driftsched_requests_total{{{T}}}[{RI}]))",
                    "{{tenant}} {{status}}",
                )
            ],
            "reqps",
            stack=True,
        )
    )
    g.add(
        timeseries(
            "Rejections/s by reason",
            "Refused before reaching an engine (rate limits, quota, store unavailable, ...).",
            [
                (
                    f"sum by (tenant, reason) (rate(driftsched_rejections_total{{{T}}}[{RI}]))",
                    "{{tenant}} {{reason}}",
                )
            ],
            "reqps",
        )
    )
    g.add(
        timeseries(
            "Tokens/s by tenant",
            "Engine-reported usage.",
            [
                (
                    f"sum by (tenant) (rate(driftsched_prompt_tokens_total{{{T}}}[{RI}]))",
                    "prompt {{tenant}}",
                ),
                (
                    f"sum by (tenant) (rate(driftsched_completion_tokens_total{{{T}}}[{RI}]))",
                    "completion {{tenant}}",
                ),
            ],
        )
    )
    g.add(
        timeseries(
            "In flight by tenant",
            "Admitted, not finished; summed over replicas.",
            [(f"sum by (tenant) (driftsched_in_flight_requests{{{T}}})", "{{tenant}}")],
        )
    )
    g.add(
        timeseries(
            "Client disconnects/s",
            "Clients gone before the response ended, by the stage they left in.",
            [
                (
                    f"sum by (tenant, stage) "
                    f"(rate(driftsched_client_disconnects_total{{{T}}}[{RI}]))",
                    "{{tenant}} {{stage}}",
                )
            ],
            "reqps",
        )
    )

    g.row("Latency and SLOs")
    ttft, e2e = "driftsched_time_to_first_token_seconds", "driftsched_request_duration_seconds"
    g.add(
        timeseries(
            "Time to first token by class",
            "Arrival at the gateway to first byte streamed (queue wait included).",
            quantiles(ttft, "qos_class", f"{T},{C}", "{{qos_class}}"),
            "s",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Request duration by class",
            "Arrival to last byte.",
            quantiles(e2e, "qos_class", f"{T},{C}", "{{qos_class}}"),
            "s",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "TTFT p95 by tenant",
            "",
            [
                (
                    f"histogram_quantile(0.95, sum by (le, tenant) (rate({ttft}_bucket{{{T},{C}}}[{RI}])))",
                    "{{tenant}}",
                )
            ],
            "s",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Share of requests with TTFT <= 1 s",
            "The premium class's default TTFT SLO; a bucket boundary of the histogram.",
            [
                (
                    f'sum by (qos_class) (rate({ttft}_bucket{{le="1",{T},{C}}}[{RI}])) / '
                    f"sum by (qos_class) (rate({ttft}_count{{{T},{C}}}[{RI}]))",
                    "{{qos_class}}",
                )
            ],
            "percentunit",
            min=0,
            max=1,
        ),
        w=12,
    )

    g.row("Queue and admission")
    depth = "max by (tenant) (driftsched_queue_depth)"
    g.add(
        timeseries(
            "Queue depth by tenant",
            "The shared admission queue (every replica reports the same value).",
            [(f"max by (tenant) (driftsched_queue_depth{{{T}}})", "{{tenant}}")],
            stack=True,
        )
    )
    g.add(
        timeseries(
            "Queue depth by class",
            "Tenants mapped to their class through the queue-wait histogram's labels.",
            [
                (
                    f"sum by (qos_class) ({depth} * on (tenant) group_left (qos_class) "
                    "group by (tenant, qos_class) (driftsched_queue_wait_seconds_count))",
                    "{{qos_class}}",
                )
            ],
            stack=True,
        )
    )
    g.add(
        timeseries(
            "Queue wait by class",
            "Arrival to admission.",
            quantiles("driftsched_queue_wait_seconds", "qos_class", f"{T},{C}", "{{qos_class}}"),
            "s",
        )
    )
    g.add(
        timeseries(
            "Queue wait p95 by tenant",
            "",
            [
                (
                    "histogram_quantile(0.95, sum by (le, tenant) "
                    f"(rate(driftsched_queue_wait_seconds_bucket{{{T},{C}}}[{RI}])))",
                    "{{tenant}}",
                )
            ],
            "s",
        )
    )
    g.add(
        timeseries(
            "Admission: held tokens vs budget",
            "Predicted footprint admitted to each "
            "engine (shared ledger) against its budget (KV capacity x "
            "kv_budget_fraction).",
            [
                (f"max by (backend) (driftsched_admission_held_tokens{{{B}}})", "held {{backend}}"),
                (
                    f"max by (backend) (driftsched_admission_budget_tokens{{{B}}})",
                    "budget {{backend}}",
                ),
            ],
        )
    )
    g.add(
        timeseries(
            "Admission: sequences held",
            "Requests admitted to each engine.",
            [(f"max by (backend) (driftsched_admission_held_seqs{{{B}}})", "{{backend}}")],
        )
    )
    g.add(
        timeseries(
            "TPOT governor: sequence cap by engine",
            "Sequences admission may place on each engine (max_num_seqs capped by the "
            "TPOT governor; premium may pass the cap). Exported with the driftsched policy.",
            [(f"min by (backend) (driftsched_admission_seq_cap{{{B}}})", "{{backend}}")],
        )
    )
    g.add(
        timeseries(
            "TPOT governor: live time per output token by engine",
            "Mean seconds between two tokens of a stream, from the engine's generation "
            "counter (the governor's smoothed signal), against the tightest TPOT SLO.",
            [(f"max by (backend) (driftsched_backend_tpot_seconds{{{B}}})", "{{backend}}")],
            unit="s",
        )
    )

    g.row("Token drift and estimator")
    g.add(
        timeseries(
            "Drift ratio by tenant",
            "Actual / predicted output tokens over the drift "
            "window, relative to the tenant's usual ratio (1 = as usual, > 1 = longer "
            "than the estimator usually predicts for it); mean over replicas. Exported "
            "with the driftsched policy.",
            [(f"avg by (tenant) (driftsched_tenant_drift_ratio{{{T}}})", "{{tenant}}")],
        )
    )
    g.add(
        timeseries(
            "Class SLO attainment (rolling, gateway)",
            "Share of each class level's requests of the last slo_window_s that met their "
            "TTFT and TPOT SLOs (failures count as misses): the drift controller throttles "
            "drifting tenants only while a more important level is under its target.",
            [("min by (level) (driftsched_class_slo_attainment)", "level {{level}}")],
            unit="percentunit",
        )
    )
    g.add(
        timeseries(
            "Concurrency limit by tenant",
            "The drift controller's current limit (lowest over replicas).",
            [(f"min by (tenant) (driftsched_tenant_concurrency_limit{{{T}}})", "{{tenant}}")],
        )
    )
    g.add(
        timeseries(
            "Estimator error by tenant",
            "|ln(drift ratio)|: how far the tenant's recent outputs are from the "
            "estimator's usual calibration for it (0 = as usual, 0.69 = 2x). Derived from "
            "the drift ratio (the gateway exports no separate estimator-error series).",
            [(f"abs(ln(avg by (tenant) (driftsched_tenant_drift_ratio{{{T}}})))", "{{tenant}}")],
        )
    )
    g.add(
        timeseries(
            "Tenants by drift state",
            "warmup, ok, drifting, recovering.",
            [
                (
                    f"count by (state) (max by (tenant, state) "
                    f"(driftsched_tenant_drift_state{{{T}}}) == 1)",
                    "{{state}}",
                )
            ],
            stack=True,
        )
    )
    g.add(
        timeseries(
            "Drift detections and limit decreases",
            "Per tenant, summed over replicas.",
            [
                (
                    f"sum by (tenant) "
                    f"(increase(driftsched_tenant_drift_detections_total{{{T}}}[{RI}]))",
                    "detections {{tenant}}",
                ),
                (
                    f"sum by (tenant) "
                    f"(increase(driftsched_tenant_limit_decreases_total{{{T}}}[{RI}]))",
                    "decreases {{tenant}}",
                ),
            ],
        ),
        w=16,
    )

    g.row("Engines")
    g.add(
        timeseries(
            "Routable engines",
            "1 = takes traffic; the legend's state says why not.",
            [(f"max by (backend, state) (driftsched_backend_up{{{B}}})", "{{backend}} {{state}}")],
            max=1,
            min=0,
        )
    )
    g.add(
        timeseries(
            "Running and waiting (engine)",
            "vllm:num_requests_running / _waiting, scraped by the gateway.",
            [
                (
                    f"max by (backend) (driftsched_backend_num_requests_running{{{B}}})",
                    "running {{backend}}",
                ),
                (
                    f"max by (backend) (driftsched_backend_num_requests_waiting{{{B}}})",
                    "waiting {{backend}}",
                ),
            ],
        )
    )
    g.add(
        timeseries(
            "KV cache usage",
            "vllm:kv_cache_usage_perc.",
            [(f"max by (backend) (driftsched_backend_kv_cache_usage_perc{{{B}}})", "{{backend}}")],
            "percentunit",
            min=0,
            max=1,
        )
    )
    g.add(
        timeseries(
            "Preemptions/s",
            "vllm:num_preemptions_total (a counter scraped into a gauge).",
            [
                (
                    f"max by (backend) (rate(driftsched_backend_num_preemptions{{{B}}}[{RI}]))",
                    "{{backend}}",
                )
            ],
        )
    )
    g.add(
        timeseries(
            "Gateway load per engine",
            "In-flight requests and predicted tokens the "
            "replicas have on each engine, summed over replicas.",
            [
                (
                    f"sum by (backend) (driftsched_backend_in_flight_requests{{{B}}})",
                    "in flight {{backend}}",
                ),
                (
                    f"max by (backend) (driftsched_admission_held_tokens{{{B}}})",
                    "held tokens {{backend}}",
                ),
                (
                    f"max by (backend) (driftsched_backend_kv_capacity_tokens{{{B}}})",
                    "KV capacity {{backend}}",
                ),
            ],
        )
    )
    g.add(
        timeseries(
            "Upstream errors/s and restarts",
            "Engine failures seen by the gateway, "
            "and restarts by the pool (launched engines only).",
            [
                (
                    f"sum by (backend, code) (rate(driftsched_upstream_errors_total{{{B}}}[{RI}]))",
                    "{{backend}} {{code}}",
                ),
                (f"max by (backend) (driftsched_backend_restarts{{{B}}})", "restarts {{backend}}"),
            ],
        )
    )

    return {
        "uid": "driftsched-gateway",
        "title": "DriftSched gateway",
        "description": "Per-tenant traffic, latency and SLOs, the shared admission queue, token "
        "drift and engine load. Built by deploy/grafana/build_dashboard.py.",
        "tags": ["driftsched", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
                    "hide": 0,
                },
                variable("tenant", "Tenant", "label_values(driftsched_requests_total, tenant)"),
                variable(
                    "qos_class",
                    "Class",
                    "label_values(driftsched_request_duration_seconds_count, qos_class)",
                ),
                variable("backend", "Engine", "label_values(driftsched_backend_up, backend)"),
            ]
        },
        "panels": g.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the DriftSched Grafana dashboard JSON.")
    p.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

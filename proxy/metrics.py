"""Prometheus metrics, one registry per app (no module-level state).

Names follow Prometheus conventions (``driftsched_`` prefix, ``_total`` counters, base units
in seconds). Engine-side numbers keep vLLM's meaning and are re-exported per backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters.base import Backend

if TYPE_CHECKING:
    from proxy.scheduler import Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "driftsched_requests", "Requests finished, by tenant, endpoint and HTTP status",
            ["tenant", "endpoint", "status"], registry=r,
        )
        self.prompt_tokens = Counter(
            "driftsched_prompt_tokens", "Prompt tokens (engine-reported usage)", ["tenant"], registry=r
        )
        self.completion_tokens = Counter(
            "driftsched_completion_tokens", "Generated tokens (engine-reported usage)", ["tenant"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "driftsched_queue_wait_seconds", "Time from arrival to admission",
            ["tenant", "qos_class"], buckets=QUEUE_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "driftsched_time_to_first_token_seconds", "Arrival to first streamed byte",
            ["tenant", "qos_class"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "driftsched_request_duration_seconds", "Arrival to last byte",
            ["tenant", "qos_class"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "driftsched_in_flight_requests", "Requests admitted and not finished (this replica)",
            ["tenant"], registry=r,
        )
        self.rejections = Counter(
            "driftsched_rejections", "Requests refused before reaching an engine, by reason",
            ["tenant", "reason"], registry=r,
        )
        self.upstream_errors = Counter(
            "driftsched_upstream_errors", "Engine failures seen by the gateway",
            ["backend", "code"], registry=r,
        )
        self.http_errors = Counter(
            "driftsched_http_errors",
            "Error responses (OpenAI's shape) by surface (v1, admin) and HTTP status",
            ["surface", "status"], registry=r,
        )
        self.connections_closed = Counter(
            "driftsched_connections_closed",
            "Connections the server closed or refused on a limit, by reason (header_timeout, "
            "send_timeout, over_limit)", ["reason"], registry=r,
        )
        self.disconnects = Counter(
            "driftsched_client_disconnects", "Clients that went away before the response ended",
            ["tenant", "stage"], registry=r,
        )

        self._tenants: dict[tuple[str, str], TenantMetrics] = {}

    def tenant(self, name: str, qos_class: str) -> TenantMetrics:
        """One tenant's series, label lookups done once (``labels()`` costs microseconds)."""
        tm = self._tenants.get((name, qos_class))
        if tm is None:
            if len(self._tenants) >= _MAX_CACHED:
                self._tenants.clear()
            tm = self._tenants[(name, qos_class)] = TenantMetrics(self, name, qos_class)
        return tm

    def add_backends(self, source: Callable[[], Iterable[Backend]]) -> None:
        self.registry.register(_BackendCollector(source))

    def add_scheduler(self, scheduler: Scheduler) -> None:
        self.registry.register(_SchedulerCollector(scheduler))


class TenantMetrics:
    """The hot path's series of one (tenant, QoS class), bound to their label values."""

    __slots__ = ("_by_status", "_requests", "completion_tokens", "e2e", "in_flight", "name",
                 "prompt_tokens", "queue_wait", "ttft")

    def __init__(self, m: GatewayMetrics, name: str, qos_class: str) -> None:
        self.name = name
        self.queue_wait = m.queue_wait.labels(name, qos_class)
        self.ttft = m.ttft.labels(name, qos_class)
        self.e2e = m.e2e.labels(name, qos_class)
        self.in_flight = m.in_flight.labels(name)
        self.prompt_tokens = m.prompt_tokens.labels(name)
        self.completion_tokens = m.completion_tokens.labels(name)
        self._requests = m.requests
        self._by_status: dict[tuple[str, int], Counter] = {}

    def requests(self, endpoint: str, status: int) -> Counter:
        """``driftsched_requests_total{tenant, endpoint, status}`` for this tenant."""
        c = self._by_status.get((endpoint, status))
        if c is None:
            if len(self._by_status) >= _MAX_CACHED:
                self._by_status.clear()
            c = self._by_status[(endpoint, status)] = self._requests.labels(
                self.name, endpoint, str(status))
        return c


#: bound children kept per cache (a bound on memory, not on label values)
_MAX_CACHED = 10_000


class _SchedulerCollector(Collector):
    """Queue depth, admission holds and the drift controller's view, per tenant/engine."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        s = self._s
        depth = GaugeMetricFamily("driftsched_queue_depth", "Requests waiting for admission "
                                  "(all replicas)", labels=["tenant"])
        for tenant, n in sorted(s.depth_snapshot.items()):
            depth.add_metric([tenant], n)
        held = GaugeMetricFamily("driftsched_admission_held_tokens", "Predicted footprint "
                                 "admitted to the engine (all replicas)", labels=["backend"])
        seqs = GaugeMetricFamily("driftsched_admission_held_seqs", "Requests admitted to the "
                                 "engine (all replicas)", labels=["backend"])
        budget = GaugeMetricFamily("driftsched_admission_budget_tokens", "Admission budget",
                                   labels=["backend"])
        for load in s.loads_snapshot:
            held.add_metric([load.name], load.held_tokens)
            seqs.add_metric([load.name], load.seqs)
            if load.budget_tokens is not None:
                budget.add_metric([load.name], load.budget_tokens)
        cap = GaugeMetricFamily("driftsched_admission_seq_cap", "Sequences admission may hold "
                                "on the engine (max_num_seqs, capped by the TPOT governor)",
                                labels=["backend"])
        tpot = GaugeMetricFamily("driftsched_backend_tpot_seconds", "Engine's live time per "
                                 "output token per stream (TPOT governor's smoothed signal)",
                                 labels=["backend"])
        for name, g in sorted(s.governor.engines.items()):
            cap.add_metric([name], g.cap)
            if g.tpot_s is not None:
                tpot.add_metric([name], g.tpot_s)
        att = GaugeMetricFamily("driftsched_class_slo_attainment", "Rolling SLO attainment per "
                                "class level (the drift controller's feedback)", labels=["level"])
        for level, (value, _n) in sorted(s.attainment_snapshot.items()):
            att.add_metric([str(level)], value)
        out: list[Metric] = [depth, held, seqs, budget, cap, tpot, att]
        if s.drift is None:
            return out
        ratio = GaugeMetricFamily("driftsched_tenant_drift_ratio", "Actual / predicted output "
                                  "tokens over the drift window", labels=["tenant"])
        limit = GaugeMetricFamily("driftsched_tenant_concurrency_limit", "Current (drift-"
                                  "adjusted) concurrency limit", labels=["tenant"])
        state = GaugeMetricFamily("driftsched_tenant_drift_state", "1 for the tenant's drift "
                                  "state", labels=["tenant", "state"])
        det = CounterMetricFamily("driftsched_tenant_drift_detections", "Change detector "
                                  "firings", labels=["tenant"])
        dec = CounterMetricFamily("driftsched_tenant_limit_decreases", "AIMD decreases",
                                  labels=["tenant"])
        for name, st in sorted(s.drift.statuses().items()):
            ratio.add_metric([name], st.ratio)
            if st.limit is not None:
                limit.add_metric([name], st.limit)
            state.add_metric([name, st.state], 1.0)
            det.add_metric([name], st.detections)
            dec.add_metric([name], st.decreases)
        return [*out, ratio, limit, state, det, dec]


class _BackendCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[Backend]]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        fams = {
            "up": GaugeMetricFamily(
                "driftsched_backend_up", "1 when the backend takes traffic", labels=["backend", "state"]
            ),
            "in_flight": GaugeMetricFamily(
                "driftsched_backend_in_flight_requests", "Gateway-side in-flight requests", labels=["backend"]
            ),
            "cap": GaugeMetricFamily(
                "driftsched_backend_kv_capacity_tokens", "KV budget in tokens", labels=["backend"]
            ),
            "running": GaugeMetricFamily(
                "driftsched_backend_num_requests_running", "vllm:num_requests_running (scraped)",
                labels=["backend"],
            ),
            "waiting": GaugeMetricFamily(
                "driftsched_backend_num_requests_waiting", "vllm:num_requests_waiting (scraped)",
                labels=["backend"],
            ),
            "kv": GaugeMetricFamily(
                "driftsched_backend_kv_cache_usage_perc", "vllm:kv_cache_usage_perc (scraped, 0..1)",
                labels=["backend"],
            ),
            "preempt": GaugeMetricFamily(
                "driftsched_backend_num_preemptions", "vllm:num_preemptions_total (scraped)",
                labels=["backend"],
            ),
            "restarts": GaugeMetricFamily(
                "driftsched_backend_restarts", "Times the pool restarted this engine", labels=["backend"]
            ),
        }
        for b in self._source():
            fams["up"].add_metric([b.name, b.state], 1.0 if b.routable else 0.0)
            fams["in_flight"].add_metric([b.name], b.in_flight)
            if b.kv_capacity_tokens is not None:
                fams["cap"].add_metric([b.name], b.kv_capacity_tokens)
            m = b.metrics
            fams["running"].add_metric([b.name], m.num_requests_running)
            fams["waiting"].add_metric([b.name], m.num_requests_waiting)
            fams["kv"].add_metric([b.name], m.kv_cache_usage_perc)
            fams["preempt"].add_metric([b.name], m.num_preemptions_total)
            fams["restarts"].add_metric([b.name], b.restarts)
        return list(fams.values())

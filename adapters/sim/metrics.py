"""``/metrics`` with vLLM 0.32's names, labels ``model_name`` and ``engine="0"``.

Gauges and counters are read from the engine when scraped (nothing is updated per step);
the latency histograms are observed once per finished request, in simulated seconds.
Besides vLLM's names, ``sim:lag_seconds_total`` counts simulated time lost because the
simulator process could not keep up (0 when it is not CPU-bound).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.sim.driver import Driver
from adapters.sim.engine import SimRequest
from adapters.sim.profiles import BLOCK_SIZE

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class _EngineCollector(Collector):
    def __init__(self, driver: Driver, model_name: str) -> None:
        self._driver = driver
        self._labels = [model_name, "0"]

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        eng = self._driver.engine
        st = eng.stats
        names = ["model_name", "engine"]
        lv = self._labels

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(lv, value)
            return c

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            eng.num_running,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            eng.num_waiting,
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            st.num_preemptions,
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", st.generation_tokens
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )
        success.add_metric([*lv, "stop"], st.finished_stop)
        success.add_metric([*lv, "length"], st.finished_length)
        yield success
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "num_gpu_blocks", "engine"],
        )
        # vLLM counts its reserved null block in num_gpu_blocks; so does the simulator, so
        # that (num_gpu_blocks - 1) * block_size is the usable capacity for both
        info.add_metric([str(BLOCK_SIZE), str(eng.num_blocks + 1), "0"], 1.0)
        yield info
        yield counter(
            "sim:lag_seconds",
            "Simulated seconds lost to the simulator's own CPU limits.",
            self._driver.lag_s,
        )
        yield counter("sim:steps", "Engine steps run.", st.steps)
        yield counter("sim:busy_seconds", "Simulated seconds spent in engine steps.", st.busy_s)


class SimMetrics:
    """A per-app registry: the engine collector plus per-request latency histograms."""

    def __init__(self, driver: Driver, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(driver, model_name))
        names = ["model_name", "engine"]
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            names,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name, "0")
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            names,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name, "0")
        self._tpot = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            names,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        ).labels(model_name, "0")

    def observe_finished(self, req: SimRequest) -> None:
        if req.first_token_time is None or req.finish_time is None:
            return
        self._ttft.observe(req.first_token_time - req.arrival_time)
        self._e2e.observe(req.finish_time - req.arrival_time)
        if req.generated > 1:
            self._tpot.observe((req.finish_time - req.first_token_time) / (req.generated - 1))
